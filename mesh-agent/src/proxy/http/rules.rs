//! What a VirtualService rule does to a request besides choosing its destination: header
//! edits, rewrites, redirects and injected faults.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};

use super::{Done, Reply};
use crate::config::routing::{
    CorsPolicy, Fault, HeaderOps, HttpMatch, HttpRoute, Redirect, StringMatch,
};
use crate::telemetry::metrics::ResponseFlags;

/// Applies `remove`, then `set`, then `add` (Envoy's order); invalid names and values were
/// refused when the rule was loaded.
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    let parsed = |k: &str, v: &str| {
        Some((
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (k, v) in &ops.set {
        if let Some((k, v)) = parsed(k, v) {
            headers.insert(k, v);
        }
    }
    for (k, v) in &ops.add {
        if let Some((k, v)) = parsed(k, v) {
            headers.append(k, v);
        }
    }
}

/// The prefix of the first `match` that matched by URI prefix, which `rewrite.uri` replaces.
fn matched_prefix<'a>(rule: &'a HttpRoute, path: &str) -> Option<&'a str> {
    rule.matches.iter().find_map(|m: &HttpMatch| match &m.uri {
        Some(StringMatch::Prefix(p))
            if m.ignore_uri_case
                && path.len() >= p.len()
                && path[..p.len()].eq_ignore_ascii_case(p) =>
        {
            Some(p.as_str())
        }
        Some(StringMatch::Prefix(p)) if path.starts_with(p.as_str()) => Some(p.as_str()),
        _ => None,
    })
}

/// `rewrite`: the matched prefix (or the whole path) replaced by `uri`, or the regex rewrite;
/// the authority replaced.
pub fn rewrite_request<B>(req: &mut Request<B>, rule: &HttpRoute) {
    let Some(rw) = &rule.rewrite else { return };
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let new_path = if let Some(uri) = &rw.uri {
        match matched_prefix(rule, &path) {
            Some(prefix) => Some(format!("{uri}{}", &path[prefix.len()..])),
            None => Some(uri.clone()),
        }
    } else {
        rw.uri_regex.as_ref().map(|r| {
            r.pattern
                .regex
                .replace_all(&path, r.replacement.as_str())
                .into_owned()
        })
    };
    let mut parts = req.uri().clone().into_parts();
    if let Some(p) = new_path {
        let pq = match &query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        };
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(a) = &rw.authority {
        if parts.authority.is_some()
            && let Ok(a) = a.parse()
        {
            parts.authority = Some(a);
        }
        if let Ok(v) = HeaderValue::from_str(a) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The redirect answer: `Location` built from the request with the rule's parts replaced.
pub fn redirect<B>(rd: &Redirect, req: &Request<B>, authority: Option<&str>, port: u16) -> Reply {
    let scheme = rd.scheme.as_deref().unwrap_or("http");
    let request_host = authority.unwrap_or_default();
    let (host, request_port) = match request_host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()),
        _ => (request_host, None),
    };
    let host = rd.authority.as_deref().unwrap_or(host);
    let port = rd
        .port
        .or_else(|| rd.port_from_request.then_some(request_port.unwrap_or(port)));
    let path = rd.uri.as_deref().unwrap_or_else(|| req.uri().path());
    let query = if path.contains('?') {
        String::new()
    } else {
        req.uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    };
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let status = StatusCode::from_u16(rd.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut reply = Reply::new(status, ResponseFlags::None, "");
    reply.location = HeaderValue::from_str(&location).ok();
    reply
}

pub fn hit(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}

/// Injects the rule's fault: waits out a delay (`DI`), then answers an abort (`FI`).
pub async fn fault(f: &Fault, done: &mut Done) -> Option<Reply> {
    if let Some(d) = &f.delay
        && hit(d.percent)
    {
        tokio::time::sleep(d.delay).await;
        done.labels.flags = ResponseFlags::DelayInjected;
    }
    let a = f.abort.as_ref().filter(|a| hit(a.percent))?;
    let status = StatusCode::from_u16(a.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut reply = Reply::new(status, ResponseFlags::FaultInjected, "fault filter abort");
    reply.grpc_status = a.grpc_status;
    Some(reply)
}

/// What a rule's CORS policy makes of a request.
pub enum Cors {
    /// Not a cross-origin request (no `Origin`), or an origin the policy does not allow on
    /// a normal request: passed on as is.
    Plain,
    /// A preflight the agent answers itself.
    Preflight(Reply),
    /// An allowed cross-origin request: these response headers are added.
    Allowed(HeaderOps),
}

/// Envoy's CORS filter for one request.
pub fn cors<B>(policy: &CorsPolicy, req: &Request<B>) -> Cors {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return Cors::Plain;
    };
    let allowed = policy.allows(origin);
    let preflight = req.method() == hyper::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut ops = HeaderOps::default();
    if allowed {
        ops.set
            .push(("access-control-allow-origin".into(), origin.to_owned()));
        if policy.allow_credentials {
            ops.set
                .push(("access-control-allow-credentials".into(), "true".into()));
        }
    }
    match (preflight, allowed) {
        (true, true) => {
            let mut reply = Reply::new(StatusCode::OK, ResponseFlags::None, "");
            let mut set = |k: &str, v: String| {
                if !v.is_empty() {
                    ops.set.push((k.to_owned(), v));
                }
            };
            set(
                "access-control-allow-methods",
                policy.allow_methods.join(","),
            );
            set(
                "access-control-allow-headers",
                policy.allow_headers.join(","),
            );
            set(
                "access-control-max-age",
                policy
                    .max_age
                    .map(|d| d.as_secs().to_string())
                    .unwrap_or_default(),
            );
            reply.headers = ops;
            Cors::Preflight(reply)
        }
        (true, false) if policy.ignore_unmatched_preflights => {
            Cors::Preflight(Reply::new(StatusCode::OK, ResponseFlags::None, ""))
        }
        (false, true) => {
            if !policy.expose_headers.is_empty() {
                ops.set.push((
                    "access-control-expose-headers".into(),
                    policy.expose_headers.join(","),
                ));
            }
            Cors::Allowed(ops)
        }
        _ => Cors::Plain,
    }
}
