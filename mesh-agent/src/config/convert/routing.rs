//! Istio's routing kinds as written (VirtualService, DestinationRule; networking.istio.io
//! v1, v1beta1 and v1alpha3 share one schema), decoded and validated into
//! [`crate::config::routing`]. Every problem names its field (`spec.http[0].match[1].uri`).
//! Fields Istio has and nodemesh does not implement are errors, not silently ignored: a
//! routing rule applied partly would send traffic where its author did not mean.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{IstioObject, Problem, Problems, done, object_ref};
use crate::config::routing::{self as r, Host, parse_duration};

/// The API versions VirtualService and DestinationRule are read from.
pub const NETWORKING_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

type Value = serde_yaml::Value;

/// `kind: VirtualService`.
pub type VirtualService = IstioObject<VsSpec>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<HttpRoute>,
    #[serde(default)]
    tls: Vec<Value>,
    #[serde(default)]
    tcp: Vec<TcpRoute>,
    #[serde(default)]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpRoute {
    name: Option<String>,
    #[serde(rename = "match", default)]
    matches: Vec<HttpMatch>,
    #[serde(default)]
    route: Vec<RouteDestination>,
    redirect: Option<Redirect>,
    direct_response: Option<DirectResponse>,
    delegate: Option<Value>,
    rewrite: Option<Rewrite>,
    timeout: Option<String>,
    retries: Option<Retries>,
    fault: Option<Fault>,
    mirror: Option<Destination>,
    #[serde(default)]
    mirrors: Vec<MirrorPolicy>,
    mirror_percent: Option<i64>,
    mirror_percentage: Option<Percentage>,
    cors_policy: Option<CorsPolicy>,
    headers: Option<Headers>,
}

#[derive(Debug, Default, Deserialize)]
struct MirrorPolicy {
    destination: Option<Destination>,
    percentage: Option<Percentage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CorsPolicy {
    #[serde(default)]
    allow_origins: Vec<StringMatch>,
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    max_age: Option<String>,
    allow_credentials: Option<bool>,
    unmatched_preflights: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpMatch {
    name: Option<String>,
    uri: Option<StringMatch>,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    #[serde(default)]
    headers: BTreeMap<String, StringMatch>,
    port: Option<u32>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    query_params: BTreeMap<String, StringMatch>,
    ignore_uri_case: Option<bool>,
    #[serde(default)]
    without_headers: BTreeMap<String, StringMatch>,
    source_namespace: Option<String>,
    stat_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct StringMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Destination {
    host: Option<String>,
    subset: Option<String>,
    port: Option<PortSelector>,
}

#[derive(Debug, Default, Deserialize)]
struct PortSelector {
    number: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct RouteDestination {
    destination: Option<Destination>,
    weight: Option<i64>,
    headers: Option<Headers>,
}

#[derive(Debug, Default, Deserialize)]
struct Headers {
    request: Option<HeaderOps>,
    response: Option<HeaderOps>,
}

#[derive(Debug, Default, Deserialize)]
struct HeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Redirect {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    derive_port: Option<String>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct DirectResponse {
    status: Option<u32>,
    body: Option<DirectBody>,
}

#[derive(Debug, Default, Deserialize)]
struct DirectBody {
    string: Option<String>,
    bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rewrite {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Default, Deserialize)]
struct RegexRewrite {
    #[serde(rename = "match")]
    pattern: Option<String>,
    rewrite: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Retries {
    attempts: Option<i64>,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Fault {
    delay: Option<Delay>,
    abort: Option<Abort>,
}

#[derive(Debug, Default, Deserialize)]
struct Percentage {
    value: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Delay {
    fixed_delay: Option<String>,
    exponential_delay: Option<Value>,
    percentage: Option<Percentage>,
    percent: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Abort {
    http_status: Option<u32>,
    grpc_status: Option<String>,
    http2_error: Option<String>,
    percentage: Option<Percentage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpRoute {
    #[serde(rename = "match", default)]
    matches: Vec<TcpMatch>,
    #[serde(default)]
    route: Vec<RouteDestination>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpMatch {
    #[serde(default)]
    destination_subnets: Vec<String>,
    port: Option<u32>,
    source_subnet: Option<String>,
    #[serde(default)]
    source_labels: BTreeMap<String, String>,
    #[serde(default)]
    gateways: Vec<String>,
    source_namespace: Option<String>,
}

/// Collects a rule's problems under a field path.
struct At<'a> {
    problems: &'a mut Vec<Problem>,
}

impl At<'_> {
    fn bad(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.invalid(field, reason);
    }

    fn unsupported(&mut self, field: impl Into<String>, what: &str) {
        let reason = format!(
            "{what} is not supported by nodemesh yet; remove it or apply the rule elsewhere"
        );
        self.problems.invalid(field, reason);
    }

    fn duration(&mut self, s: Option<&str>, field: &str) -> Option<std::time::Duration> {
        let s = s?;
        parse_duration(s).map_err(|e| self.bad(field, e)).ok()
    }

    fn port(&mut self, n: Option<u32>, field: &str) -> Option<u16> {
        let n = n?;
        match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.bad(field, format!("port {n} is out of range 1..65535"));
                None
            }
        }
    }

    fn host(&mut self, h: &str, namespace: &str, field: &str) -> Option<Host> {
        Host::resolve(h, namespace)
            .map_err(|e| self.bad(field, e))
            .ok()
    }

    fn percent(&mut self, p: Option<&Percentage>, legacy: Option<i64>, field: &str) -> f64 {
        let v = match (p.and_then(|p| p.value), legacy) {
            (Some(v), _) => v,
            (None, Some(v)) => v as f64,
            // Istio: no percentage means every request.
            (None, None) => 100.0,
        };
        if !(0.0..=100.0).contains(&v) {
            self.bad(field, format!("{v} is not a percentage in 0..100"));
        }
        v.clamp(0.0, 100.0)
    }

    fn string_match(
        &mut self,
        m: &StringMatch,
        field: &str,
        ignore_case: bool,
        empty_ok: bool,
    ) -> Option<r::StringMatch> {
        let set = [&m.exact, &m.prefix, &m.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            self.bad(field, "set only one of exact, prefix, regex");
            return None;
        }
        Some(match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), _, _) => r::StringMatch::Exact(e.clone()),
            (_, Some(p), _) => r::StringMatch::Prefix(p.clone()),
            (_, _, Some(re)) => match r::Pattern::whole(re, ignore_case) {
                Ok(p) => r::StringMatch::Regex(p),
                Err(e) => {
                    self.bad(format!("{field}.regex"), e);
                    return None;
                }
            },
            _ if empty_ok => r::StringMatch::Present,
            _ => {
                self.bad(field, "empty; set one of exact, prefix, regex");
                return None;
            }
        })
    }

    fn header_matches(
        &mut self,
        m: &BTreeMap<String, StringMatch>,
        field: &str,
    ) -> Vec<(String, r::StringMatch)> {
        let mut out = Vec::new();
        for (name, sm) in m {
            let f = format!("{field}[{name:?}]");
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.bad(&f, "not a valid header name");
                continue;
            }
            if let Some(sm) = self.string_match(sm, &f, false, true) {
                out.push((name.to_ascii_lowercase(), sm));
            }
        }
        out
    }

    fn header_ops(&mut self, ops: Option<&HeaderOps>, field: &str) -> r::HeaderOps {
        let Some(ops) = ops else {
            return r::HeaderOps::default();
        };
        let mut out = r::HeaderOps::default();
        let check = |at: &mut Self, name: &str, value: Option<&str>, f: String| -> bool {
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                at.bad(f, format!("{name:?} is not a valid header name"));
                return false;
            }
            if let Some(v) = value
                && hyper::header::HeaderValue::from_str(v).is_err()
            {
                at.bad(f, format!("{v:?} is not a valid header value"));
                return false;
            }
            true
        };
        for (k, v) in &ops.set {
            if check(self, k, Some(v), format!("{field}.set[{k:?}]")) {
                out.set.push((k.to_ascii_lowercase(), v.clone()));
            }
        }
        for (k, v) in &ops.add {
            if check(self, k, Some(v), format!("{field}.add[{k:?}]")) {
                out.add.push((k.to_ascii_lowercase(), v.clone()));
            }
        }
        for (i, k) in ops.remove.iter().enumerate() {
            if check(self, k, None, format!("{field}.remove[{i}]")) {
                out.remove.push(k.to_ascii_lowercase());
            }
        }
        out
    }

    fn headers(&mut self, h: Option<&Headers>, field: &str) -> r::Headers {
        let Some(h) = h else {
            return r::Headers::default();
        };
        r::Headers {
            request: self.header_ops(h.request.as_ref(), &format!("{field}.request")),
            response: self.header_ops(h.response.as_ref(), &format!("{field}.response")),
        }
    }

    fn destinations(
        &mut self,
        route: &[RouteDestination],
        ns: &str,
        field: &str,
    ) -> Vec<r::WeightedDestination> {
        let mut out = Vec::new();
        for (i, rd) in route.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Some(d) = &rd.destination else {
                self.bad(format!("{f}.destination"), "missing");
                continue;
            };
            let Some(written) = d.host.as_deref().filter(|h| !h.is_empty()) else {
                self.bad(format!("{f}.destination.host"), "missing");
                continue;
            };
            let Some(host) = self.host(written, ns, &format!("{f}.destination.host")) else {
                continue;
            };
            if matches!(host, Host::Wildcard(_)) {
                self.bad(
                    format!("{f}.destination.host"),
                    "a destination cannot be a wildcard",
                );
                continue;
            }
            let port = self.port(
                d.port.as_ref().and_then(|p| p.number),
                &format!("{f}.destination.port.number"),
            );
            let weight = match rd.weight {
                None => None,
                Some(w) if (0..=i64::from(i32::MAX)).contains(&w) => Some(w as u32),
                Some(w) => {
                    self.bad(
                        format!("{f}.weight"),
                        format!("{w} is negative or too large"),
                    );
                    None
                }
            };
            if weight.is_none() && route.len() > 1 && rd.weight.is_none() {
                // Istio: with several destinations each needs a weight (0 is allowed).
                self.bad(
                    format!("{f}.weight"),
                    "missing; with several destinations every one needs a weight",
                );
            }
            out.push(r::WeightedDestination {
                destination: r::Destination {
                    host,
                    host_written: written.to_owned(),
                    subset: d.subset.clone().filter(|s| !s.is_empty()),
                    port,
                },
                weight: weight.unwrap_or(100),
                headers: self.headers(rd.headers.as_ref(), &format!("{f}.headers")),
            });
        }
        if !out.is_empty() && out.iter().all(|d| d.weight == 0) {
            self.bad(field, "all weights are 0: no destination would get traffic");
        }
        out
    }

    fn retries(&mut self, r: &Retries, field: &str) -> r::Retries {
        if r.backoff.is_some() {
            self.unsupported(format!("{field}.backoff"), "retries.backoff");
        }
        let _ = r.retry_remote_localities; // one locality here: nothing to choose between
        let attempts = match r.attempts {
            None => 2,
            Some(a) if (0..=100).contains(&a) => a as u32,
            Some(a) => {
                self.bad(format!("{field}.attempts"), format!("{a} is not in 0..100"));
                0
            }
        };
        let per_try_timeout = self.duration(
            r.per_try_timeout.as_deref(),
            &format!("{field}.perTryTimeout"),
        );
        let retry_on = match r.retry_on.as_deref() {
            None | Some("") => r::RetryOn::istio_default(),
            Some(list) => self.retry_on(list, &format!("{field}.retryOn")),
        };
        r::Retries {
            attempts,
            per_try_timeout,
            retry_on,
            ignore_previous_hosts: r.retry_ignore_previous_hosts.unwrap_or(false),
        }
    }

    fn retry_on(&mut self, list: &str, field: &str) -> r::RetryOn {
        let mut on = r::RetryOn::default();
        for item in list.split(',').map(str::trim) {
            match item {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" | "retriable-headers" | "envoy-ratelimited" | "http3-post-connect-failure" => {}
                "cancelled" => on.grpc_statuses.push(1),
                "deadline-exceeded" => on.grpc_statuses.push(4),
                "resource-exhausted" => on.grpc_statuses.push(8),
                "internal" => on.grpc_statuses.push(13),
                "unavailable" => on.grpc_statuses.push(14),
                code => match code.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => on.status_codes.push(c),
                    _ => self.bad(field, format!("{code:?} is not a retry condition Istio knows (5xx, gateway-error, reset, connect-failure, retriable-4xx, refused-stream, a gRPC status name or an HTTP status code)")),
                },
            }
        }
        on
    }

    fn fault(&mut self, f: &Fault, field: &str) -> r::Fault {
        let mut out = r::Fault::default();
        if let Some(d) = &f.delay {
            let df = format!("{field}.delay");
            if d.exponential_delay.is_some() {
                self.unsupported(format!("{df}.exponentialDelay"), "exponentialDelay");
            }
            match self.duration(d.fixed_delay.as_deref(), &format!("{df}.fixedDelay")) {
                Some(delay) => {
                    let percent = self.percent(
                        d.percentage.as_ref(),
                        d.percent,
                        &format!("{df}.percentage.value"),
                    );
                    out.delay = Some(r::FaultDelay { delay, percent });
                }
                None if d.fixed_delay.is_none() => self.bad(format!("{df}.fixedDelay"), "missing"),
                None => {}
            }
        }
        if let Some(a) = &f.abort {
            let af = format!("{field}.abort");
            if a.http2_error.is_some() {
                self.unsupported(format!("{af}.http2Error"), "http2Error");
            }
            let percent = self.percent(
                a.percentage.as_ref(),
                None,
                &format!("{af}.percentage.value"),
            );
            match (a.http_status, a.grpc_status.as_deref()) {
                (Some(s), None) if (200..=599).contains(&s) => {
                    out.abort = Some(r::FaultAbort {
                        http_status: s as u16,
                        grpc_status: None,
                        percent,
                    })
                }
                (Some(s), None) => self.bad(
                    format!("{af}.httpStatus"),
                    format!("{s} is not an HTTP status in 200..599"),
                ),
                (None, Some(g)) => match grpc_code(g) {
                    Some(code) => {
                        out.abort = Some(r::FaultAbort {
                            http_status: 200,
                            grpc_status: Some(code),
                            percent,
                        })
                    }
                    None => self.bad(
                        format!("{af}.grpcStatus"),
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    ),
                },
                (Some(_), Some(_)) => self.bad(&af, "set one of httpStatus, grpcStatus"),
                (None, None) => self.bad(&af, "needs httpStatus or grpcStatus"),
            }
        }
        out
    }

    fn http_match(&mut self, m: &HttpMatch, field: &str) -> r::HttpMatch {
        if m.stat_prefix.is_some() {
            // Only names Envoy stats; nothing to route on.
        }
        let ignore = m.ignore_uri_case.unwrap_or(false);
        let sm = |at: &mut Self, v: &Option<StringMatch>, name: &str, ic: bool| {
            v.as_ref()
                .and_then(|v| at.string_match(v, &format!("{field}.{name}"), ic, false))
        };
        r::HttpMatch {
            name: m.name.clone(),
            uri: sm(self, &m.uri, "uri", ignore),
            scheme: sm(self, &m.scheme, "scheme", false),
            method: sm(self, &m.method, "method", false),
            authority: sm(self, &m.authority, "authority", false),
            headers: self.header_matches(&m.headers, &format!("{field}.headers")),
            without_headers: self
                .header_matches(&m.without_headers, &format!("{field}.withoutHeaders")),
            query_params: {
                let mut out = Vec::new();
                for (k, v) in &m.query_params {
                    if let Some(v) =
                        self.string_match(v, &format!("{field}.queryParams[{k:?}]"), false, true)
                    {
                        out.push((k.clone(), v));
                    }
                }
                out
            },
            port: self.port(m.port, &format!("{field}.port")),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone().filter(|s| !s.is_empty()),
            ignore_uri_case: ignore,
            gateways: m.gateways.clone(),
        }
    }

    fn http_route(&mut self, h: &HttpRoute, ns: &str, field: &str) -> Option<r::HttpRoute> {
        if h.delegate.is_some() {
            self.unsupported(format!("{field}.delegate"), "delegate");
        }
        let matches = h
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| self.http_match(m, &format!("{field}.match[{i}]")))
            .collect();
        let set = [
            !h.route.is_empty(),
            h.redirect.is_some(),
            h.direct_response.is_some(),
        ];
        let action = match (
            set.iter().filter(|s| **s).count(),
            &h.redirect,
            &h.direct_response,
        ) {
            (0, ..) => {
                self.bad(field, "needs one of route, redirect, directResponse");
                return None;
            }
            (2.., ..) => {
                self.bad(field, "set only one of route, redirect, directResponse");
                return None;
            }
            (_, Some(rd), _) => {
                r::HttpAction::Redirect(self.redirect(rd, &format!("{field}.redirect"))?)
            }
            (_, _, Some(dr)) => r::HttpAction::DirectResponse(
                self.direct_response(dr, &format!("{field}.directResponse"))?,
            ),
            _ => r::HttpAction::Route(self.destinations(&h.route, ns, &format!("{field}.route"))),
        };
        let rewrite = h.rewrite.as_ref().map(|rw| {
            let f = format!("{field}.rewrite");
            if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
                self.bad(&f, "set only one of uri, uriRegexRewrite");
            }
            let uri_regex = rw.uri_regex_rewrite.as_ref().and_then(|rr| {
                let (Some(p), Some(rep)) = (&rr.pattern, &rr.rewrite) else {
                    self.bad(format!("{f}.uriRegexRewrite"), "needs match and rewrite");
                    return None;
                };
                let pattern = r::Pattern::find(p)
                    .map_err(|e| self.bad(format!("{f}.uriRegexRewrite.match"), e))
                    .ok()?;
                Some(r::UriRegexRewrite {
                    pattern,
                    replacement: re2_replacement(rep),
                })
            });
            r::Rewrite {
                uri: rw.uri.clone(),
                authority: rw.authority.clone(),
                uri_regex,
            }
        });
        Some(r::HttpRoute {
            name: h.name.clone(),
            matches,
            action,
            rewrite,
            headers: self.headers(h.headers.as_ref(), &format!("{field}.headers")),
            timeout: self
                .duration(h.timeout.as_deref(), &format!("{field}.timeout"))
                .filter(|d| !d.is_zero()),
            retries: h
                .retries
                .as_ref()
                .map(|rt| self.retries(rt, &format!("{field}.retries"))),
            fault: h
                .fault
                .as_ref()
                .map(|f| self.fault(f, &format!("{field}.fault"))),
            cors: h
                .cors_policy
                .as_ref()
                .map(|c| self.cors(c, &format!("{field}.corsPolicy"))),
            mirrors: self.mirrors(h, ns, field),
        })
    }

    fn cors(&mut self, c: &CorsPolicy, field: &str) -> r::CorsPolicy {
        let mut allow_origins: Vec<r::StringMatch> = c
            .allow_origins
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                self.string_match(m, &format!("{field}.allowOrigins[{i}]"), false, false)
            })
            .collect();
        allow_origins.extend(c.allow_origin.iter().map(|o| match o.as_str() {
            // The deprecated list's `*` means any origin.
            "*" => r::StringMatch::Present,
            o => r::StringMatch::Exact(o.to_owned()),
        }));
        let token = |at: &mut Self, list: &[String], name: &str| -> Vec<String> {
            for (i, v) in list.iter().enumerate() {
                if hyper::header::HeaderValue::from_str(v).is_err() || v.contains(',') {
                    let reason = format!("{v:?} is not a single header token");
                    at.bad(format!("{field}.{name}[{i}]"), reason);
                }
            }
            list.to_vec()
        };
        let ignore = match c.unmatched_preflights.as_deref() {
            None | Some("UNSPECIFIED" | "FORWARD") => false,
            Some("IGNORE") => true,
            Some(o) => {
                let reason = format!("{o:?} is not FORWARD or IGNORE");
                self.bad(format!("{field}.unmatchedPreflights"), reason);
                false
            }
        };
        r::CorsPolicy {
            allow_origins,
            allow_methods: token(self, &c.allow_methods, "allowMethods"),
            allow_headers: token(self, &c.allow_headers, "allowHeaders"),
            expose_headers: token(self, &c.expose_headers, "exposeHeaders"),
            max_age: self.duration(c.max_age.as_deref(), &format!("{field}.maxAge")),
            allow_credentials: c.allow_credentials.unwrap_or(false),
            ignore_unmatched_preflights: ignore,
        }
    }

    /// `mirror` with `mirrorPercentage` (or the deprecated `mirrorPercent`), and `mirrors`.
    fn mirrors(&mut self, h: &HttpRoute, ns: &str, field: &str) -> Vec<r::Mirror> {
        let mut out = Vec::new();
        if h.mirror.is_some() && !h.mirrors.is_empty() {
            self.bad(field, "set only one of mirror, mirrors");
        }
        let mut one = |at: &mut Self, d: &Destination, percent: f64, f: String| {
            let route = [RouteDestination {
                destination: Some(Destination {
                    host: d.host.clone(),
                    subset: d.subset.clone(),
                    port: d.port.as_ref().map(|p| PortSelector { number: p.number }),
                }),
                weight: None,
                headers: None,
            }];
            if let Some(wd) = at.destinations(&route, ns, &f).pop() {
                out.push(r::Mirror {
                    destination: wd.destination,
                    percent,
                });
            }
        };
        if let Some(m) = &h.mirror {
            let percent = self.percent(
                h.mirror_percentage.as_ref(),
                h.mirror_percent,
                &format!("{field}.mirrorPercentage.value"),
            );
            one(self, m, percent, format!("{field}.mirror"));
        }
        for (i, m) in h.mirrors.iter().enumerate() {
            let f = format!("{field}.mirrors[{i}]");
            let Some(d) = &m.destination else {
                self.bad(format!("{f}.destination"), "missing");
                continue;
            };
            let percent = self.percent(
                m.percentage.as_ref(),
                None,
                &format!("{f}.percentage.value"),
            );
            one(self, d, percent, format!("{f}.destination"));
        }
        out
    }

    fn redirect(&mut self, rd: &Redirect, field: &str) -> Option<r::Redirect> {
        let code = match rd.redirect_code {
            None => 301,
            Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
            Some(c) => {
                self.bad(
                    format!("{field}.redirectCode"),
                    format!("{c} is not a redirect status (301, 302, 303, 307, 308)"),
                );
                return None;
            }
        };
        let port_from_request = match rd.derive_port.as_deref() {
            None | Some("FROM_PROTOCOL_DEFAULT") => false,
            Some("FROM_REQUEST_PORT") => true,
            Some(o) => {
                self.bad(
                    format!("{field}.derivePort"),
                    format!("{o:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
                );
                false
            }
        };
        if rd.port.is_some() && rd.derive_port.is_some() {
            self.bad(field, "set only one of port, derivePort");
        }
        Some(r::Redirect {
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            port: self.port(rd.port, &format!("{field}.port")),
            port_from_request,
            scheme: rd.scheme.clone(),
            code,
        })
    }

    fn direct_response(&mut self, dr: &DirectResponse, field: &str) -> Option<r::DirectResponse> {
        let status = match dr.status {
            Some(s) if (200..=599).contains(&s) => s as u16,
            Some(s) => {
                self.bad(
                    format!("{field}.status"),
                    format!("{s} is not an HTTP status in 200..599"),
                );
                return None;
            }
            None => {
                self.bad(format!("{field}.status"), "missing");
                return None;
            }
        };
        let body = match dr.body.as_ref().map(|b| (&b.string, &b.bytes)) {
            None | Some((None, None)) => bytes::Bytes::new(),
            Some((Some(s), None)) => bytes::Bytes::from(s.clone()),
            Some((None, Some(b64))) => {
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(b) => bytes::Bytes::from(b),
                    Err(e) => {
                        self.bad(format!("{field}.body.bytes"), format!("not base64: {e}"));
                        return None;
                    }
                }
            }
            Some((Some(_), Some(_))) => {
                self.bad(format!("{field}.body"), "set one of string, bytes");
                return None;
            }
        };
        if body.len() > 1 << 20 {
            self.bad(format!("{field}.body"), "larger than 1 MiB");
            return None;
        }
        Some(r::DirectResponse { status, body })
    }
}

/// RE2's `\1` group references in the regex crate's `${1}` syntax.
fn re2_replacement(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

/// gRPC status names (as Istio's `grpcStatus` takes them) to codes.
fn grpc_code(name: &str) -> Option<u16> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u16)
}

fn created(meta: &ObjectMeta) -> Option<String> {
    meta.creation_timestamp
        .as_ref()
        .map(|t| format!("{:.0}", t.0))
}

fn export_to(list: &[String], field: &str, at: &mut At<'_>) -> r::ExportTo {
    for (i, e) in list.iter().enumerate() {
        let namespace = !e.is_empty()
            && e.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if e != "." && e != "*" && !namespace {
            at.bad(
                format!("{field}[{i}]"),
                format!("{e:?} is not `.`, `*` or a namespace"),
            );
        }
    }
    r::ExportTo(list.to_vec())
}

pub(super) fn convert_virtual_service(
    vs: &VirtualService,
) -> Result<r::VirtualService, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&vs.metadata, &mut problems);
    let default = VsSpec::default();
    let spec = vs.spec.as_ref().unwrap_or(&default);
    let mut at = At {
        problems: &mut problems,
    };
    if spec.hosts.is_empty() {
        at.bad(
            "spec.hosts",
            "missing; a VirtualService needs at least one host",
        );
    }
    let hosts = spec
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| at.host(h, &id.namespace, &format!("spec.hosts[{i}]")))
        .collect();
    if !spec.tls.is_empty() {
        at.unsupported("spec.tls", "TLS routes");
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, h)| at.http_route(h, &id.namespace, &format!("spec.http[{i}]")))
        .collect();
    let mut tcp = Vec::new();
    for (i, t) in spec.tcp.iter().enumerate() {
        let field = format!("spec.tcp[{i}]");
        let mut matches = Vec::new();
        for (j, m) in t.matches.iter().enumerate() {
            let mf = format!("{field}.match[{j}]");
            if !m.destination_subnets.is_empty() || m.source_subnet.is_some() {
                at.unsupported(&mf, "matching on subnets");
            }
            matches.push(r::TcpMatch {
                port: at.port(m.port, &format!("{mf}.port")),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
                gateways: m.gateways.clone(),
            });
        }
        if t.route.is_empty() {
            at.bad(format!("{field}.route"), "missing");
        }
        let route = at.destinations(&t.route, &id.namespace, &format!("{field}.route"));
        tcp.push(r::TcpRoute { matches, route });
    }
    let export_to = export_to(&spec.export_to, "spec.exportTo", &mut at);
    let vs = r::VirtualService {
        hosts,
        hosts_written: spec.hosts.clone(),
        gateways: spec.gateways.clone(),
        export_to,
        http,
        tcp,
        created: created(&vs.metadata),
        id,
    };
    done(vs, problems)
}

/// `kind: DestinationRule`.
pub type DestinationRule = IstioObject<DrSpec>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrSpec {
    host: Option<String>,
    traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    subsets: Vec<Subset>,
    #[serde(default)]
    export_to: Vec<String>,
    workload_selector: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrafficPolicy {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
    tls: Option<ClientTls>,
    #[serde(default)]
    port_level_settings: Vec<PortTrafficPolicy>,
    tunnel: Option<Value>,
    proxy_protocol: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortTrafficPolicy {
    port: Option<PortSelector>,
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
    tls: Option<ClientTls>,
}

#[derive(Debug, Default, Deserialize)]
struct ClientTls {
    mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancer {
    simple: Option<String>,
    consistent_hash: Option<ConsistentHash>,
    locality_lb_setting: Option<Value>,
    warmup_duration_secs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsistentHash {
    http_header_name: Option<String>,
    http_cookie: Option<HttpCookie>,
    use_source_ip: Option<bool>,
    http_query_parameter_name: Option<String>,
    ring_hash: Option<Value>,
    maglev: Option<Value>,
    minimum_ring_size: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct HttpCookie {
    name: Option<String>,
    path: Option<String>,
    ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConnectionPool {
    tcp: Option<TcpPool>,
    http: Option<HttpPool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpPool {
    max_connections: Option<i64>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<Value>,
    max_connection_duration: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpPool {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Option<String>,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutlierDetection {
    consecutive_errors: Option<i64>,
    consecutive_5xx_errors: Option<i64>,
    consecutive_gateway_errors: Option<i64>,
    consecutive_local_origin_failures: Option<i64>,
    split_external_local_origin_errors: Option<bool>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<i64>,
    min_health_percent: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Subset {
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<TrafficPolicy>,
}

impl At<'_> {
    fn count(&mut self, v: Option<i64>, field: &str) -> Option<u32> {
        let v = v?;
        match u32::try_from(v) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.bad(field, format!("{v} is not a positive number"));
                None
            }
        }
    }

    fn load_balancer(&mut self, lb: &LoadBalancer, field: &str) -> Option<r::LoadBalancer> {
        if lb.locality_lb_setting.is_some() || lb.warmup_duration_secs.is_some() {
            // One locality and no slow start here: accepted, nothing to do.
        }
        match (&lb.simple, &lb.consistent_hash) {
            (Some(_), Some(_)) => {
                self.bad(field, "set one of simple, consistentHash");
                None
            }
            (Some(s), None) => {
                match s.as_str() {
                    "ROUND_ROBIN" | "UNSPECIFIED" => Some(r::LoadBalancer::RoundRobin),
                    "LEAST_REQUEST" | "LEAST_CONN" => Some(r::LoadBalancer::LeastRequest),
                    "RANDOM" => Some(r::LoadBalancer::Random),
                    "PASSTHROUGH" => {
                        self.unsupported(format!("{field}.simple"), "PASSTHROUGH");
                        None
                    }
                    o => {
                        self.bad(format!("{field}.simple"), format!("{o:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH"));
                        None
                    }
                }
            }
            (None, Some(ch)) => {
                let f = format!("{field}.consistentHash");
                if ch.ring_hash.is_some() || ch.maglev.is_some() || ch.minimum_ring_size.is_some() {
                    // The hash's table layout; any consistent hash keeps the affinity asked for.
                }
                let cookie = ch.http_cookie.as_ref().and_then(|c| {
                    if c.ttl.is_some() || c.path.is_some() {
                        self.unsupported(
                            format!("{f}.httpCookie"),
                            "generating cookies (ttl, path)",
                        );
                    }
                    c.name.clone()
                });
                let keys = [
                    ch.http_header_name
                        .clone()
                        .map(|h| r::HashKey::Header(h.to_ascii_lowercase())),
                    cookie.map(r::HashKey::Cookie),
                    ch.use_source_ip
                        .filter(|b| *b)
                        .map(|_| r::HashKey::SourceIp),
                    ch.http_query_parameter_name
                        .clone()
                        .map(r::HashKey::QueryParameter),
                ];
                let mut keys = keys.into_iter().flatten();
                match (keys.next(), keys.next()) {
                    (Some(k), None) => Some(r::LoadBalancer::Hash(k)),
                    (None, _) => {
                        self.bad(&f, "needs one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName");
                        None
                    }
                    (Some(_), Some(_)) => {
                        self.bad(&f, "set only one hash key");
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    fn pool(&mut self, p: &ConnectionPool, field: &str) -> r::ConnectionPool {
        let mut out = r::ConnectionPool::default();
        if let Some(t) = &p.tcp {
            let f = format!("{field}.tcp");
            out.max_connections = self.count(t.max_connections, &format!("{f}.maxConnections"));
            out.connect_timeout =
                self.duration(t.connect_timeout.as_deref(), &format!("{f}.connectTimeout"));
            if t.max_connection_duration.is_some() {
                self.unsupported(
                    format!("{f}.maxConnectionDuration"),
                    "maxConnectionDuration",
                );
            }
            let _ = &t.tcp_keepalive; // the kernel's keepalive settings stay as they are
            out.tcp_idle_timeout =
                self.duration(t.idle_timeout.as_deref(), &format!("{f}.idleTimeout"));
        }
        if let Some(h) = &p.http {
            let f = format!("{field}.http");
            out.http1_max_pending_requests = self.count(
                h.http1_max_pending_requests,
                &format!("{f}.http1MaxPendingRequests"),
            );
            out.http2_max_requests =
                self.count(h.http2_max_requests, &format!("{f}.http2MaxRequests"));
            out.max_requests_per_connection = self.count(
                h.max_requests_per_connection,
                &format!("{f}.maxRequestsPerConnection"),
            );
            out.max_retries = self.count(h.max_retries, &format!("{f}.maxRetries"));
            out.idle_timeout =
                self.duration(h.idle_timeout.as_deref(), &format!("{f}.idleTimeout"));
            if h.h2_upgrade_policy
                .as_deref()
                .is_some_and(|p| p == "UPGRADE")
                || h.use_client_protocol == Some(true)
            {
                self.unsupported(&f, "h2UpgradePolicy UPGRADE / useClientProtocol");
            }
            let _ = h.max_concurrent_streams;
        }
        out
    }

    fn outlier(&mut self, o: &OutlierDetection, field: &str) -> r::OutlierDetection {
        if o.consecutive_local_origin_failures.is_some()
            || o.split_external_local_origin_errors.is_some()
            || o.min_health_percent.is_some()
        {
            self.unsupported(field, "local-origin failure counting and minHealthPercent");
        }
        let n = |at: &mut Self, v: Option<i64>, f: &str| -> Option<u32> {
            match v {
                Some(0) => None, // Istio: 0 disables the check
                v => at.count(v, &format!("{field}.{f}")),
            }
        };
        let five = n(
            self,
            o.consecutive_5xx_errors.or(o.consecutive_errors),
            "consecutive5xxErrors",
        );
        let gateway = n(
            self,
            o.consecutive_gateway_errors,
            "consecutiveGatewayErrors",
        );
        let interval = self.duration(o.interval.as_deref(), &format!("{field}.interval"));
        let base = self.duration(
            o.base_ejection_time.as_deref(),
            &format!("{field}.baseEjectionTime"),
        );
        let max = match o.max_ejection_percent {
            None => 10,
            Some(p) if (0..=100).contains(&p) => p as u32,
            Some(p) => {
                self.bad(
                    format!("{field}.maxEjectionPercent"),
                    format!("{p} is not in 0..100"),
                );
                10
            }
        };
        r::OutlierDetection {
            // Envoy's defaults: 5 consecutive 5xx, 10 s interval, 30 s base ejection time.
            consecutive_5xx: if o.consecutive_5xx_errors.is_none() && o.consecutive_errors.is_none()
            {
                Some(5)
            } else {
                five
            },
            consecutive_gateway_errors: gateway,
            interval: interval.unwrap_or(std::time::Duration::from_secs(10)),
            base_ejection_time: base.unwrap_or(std::time::Duration::from_secs(30)),
            max_ejection_percent: max,
        }
    }

    fn tls(&mut self, t: &Option<ClientTls>, field: &str) {
        match t.as_ref().and_then(|t| t.mode.as_deref()) {
            // The agents do mutual TLS between themselves whatever this says.
            None | Some("ISTIO_MUTUAL" | "DISABLE") => {}
            Some(o) => self.unsupported(format!("{field}.tls.mode"), &format!("tls.mode {o}")),
        }
    }

    fn traffic_policy(&mut self, tp: &TrafficPolicy, field: &str) -> r::TrafficPolicy {
        if tp.tunnel.is_some() || tp.proxy_protocol.is_some() {
            self.unsupported(field, "tunnel and proxyProtocol");
        }
        self.tls(&tp.tls, field);
        let mut ports = BTreeMap::new();
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            let f = format!("{field}.portLevelSettings[{i}]");
            self.tls(&p.tls, &f);
            let Some(port) = self.port(
                p.port.as_ref().and_then(|p| p.number),
                &format!("{f}.port.number"),
            ) else {
                if p.port.as_ref().and_then(|p| p.number).is_none() {
                    self.bad(format!("{f}.port.number"), "missing");
                }
                continue;
            };
            let policy = r::PortPolicy {
                load_balancer: p
                    .load_balancer
                    .as_ref()
                    .and_then(|lb| self.load_balancer(lb, &format!("{f}.loadBalancer"))),
                connection_pool: p
                    .connection_pool
                    .as_ref()
                    .map(|cp| self.pool(cp, &format!("{f}.connectionPool"))),
                outlier_detection: p
                    .outlier_detection
                    .as_ref()
                    .map(|o| self.outlier(o, &format!("{f}.outlierDetection"))),
            };
            if ports.insert(port, policy).is_some() {
                self.bad(format!("{f}.port.number"), format!("duplicate port {port}"));
            }
        }
        r::TrafficPolicy {
            load_balancer: tp
                .load_balancer
                .as_ref()
                .and_then(|lb| self.load_balancer(lb, &format!("{field}.loadBalancer"))),
            connection_pool: tp
                .connection_pool
                .as_ref()
                .map(|cp| self.pool(cp, &format!("{field}.connectionPool"))),
            outlier_detection: tp
                .outlier_detection
                .as_ref()
                .map(|o| self.outlier(o, &format!("{field}.outlierDetection"))),
            ports,
        }
    }
}

pub(super) fn convert_destination_rule(
    dr: &DestinationRule,
) -> Result<r::DestinationRule, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&dr.metadata, &mut problems);
    let default = DrSpec::default();
    let spec = dr.spec.as_ref().unwrap_or(&default);
    let mut at = At {
        problems: &mut problems,
    };
    if spec.workload_selector.is_some() {
        at.unsupported("spec.workloadSelector", "workloadSelector");
    }
    let written = spec.host.clone().unwrap_or_default();
    let host = if written.is_empty() {
        at.bad("spec.host", "missing");
        None
    } else {
        at.host(&written, &id.namespace, "spec.host")
    };
    let traffic_policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| at.traffic_policy(tp, "spec.trafficPolicy"))
        .unwrap_or_default();
    let mut subsets: Vec<r::Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        let Some(name) = s.name.clone().filter(|n| !n.is_empty()) else {
            at.bad(format!("{f}.name"), "missing");
            continue;
        };
        if subsets.iter().any(|o| o.name == name) {
            at.bad(format!("{f}.name"), format!("duplicate subset {name:?}"));
            continue;
        }
        let traffic_policy = s
            .traffic_policy
            .as_ref()
            .map(|tp| at.traffic_policy(tp, &format!("{f}.trafficPolicy")));
        subsets.push(r::Subset {
            name,
            labels: s.labels.clone(),
            traffic_policy,
        });
    }
    let export_to = export_to(&spec.export_to, "spec.exportTo", &mut at);
    let Some(host) = host else {
        return Err(problems);
    };
    let dr = r::DestinationRule {
        host,
        host_written: written,
        traffic_policy,
        subsets,
        export_to,
        created: created(&dr.metadata),
        id,
    };
    done(dr, problems)
}
