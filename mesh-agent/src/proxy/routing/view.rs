//! The effective HTTP routes as one pod sees them, for `/routes` and `mesh-agent routes`:
//! per Service port, the VirtualService in force for the pod's namespace and the rules that
//! can match the pod's requests (rules limited to other source labels or namespaces are left
//! out), each with its destinations and their endpoints.

use std::fmt::Write as _;

use serde::Serialize;

use super::{CompiledRule, HttpRouter, RouteTarget};
use crate::config::model::Pod;
use crate::config::routing::{self as r, HttpAction, HttpMatch, StringMatch};

#[derive(Debug, Serialize)]
pub struct PortRoutes {
    pub service: String,
    pub address: String,
    pub protocol: &'static str,
    /// `namespace/name`; `None`: no VirtualService, requests go to the Service itself.
    pub virtual_service: Option<String>,
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Serialize)]
pub struct RuleView {
    pub index: Option<usize>,
    pub name: Option<String>,
    /// One line per `match` entry (any may match); `*` matches every request.
    pub matches: Vec<String>,
    /// `route`, `redirect` or `direct_response`.
    pub action: &'static str,
    pub destinations: Vec<DestinationView>,
    /// The redirect's location parts or the direct response's status.
    pub detail: Option<String>,
    pub timeout: Option<String>,
    pub retries: Option<String>,
    pub fault: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DestinationView {
    pub service: Option<String>,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
    pub endpoints: usize,
    /// Endpoints outlier detection has not ejected.
    pub healthy: usize,
    /// Why requests for this destination get 503 `NC`.
    pub error: Option<String>,
}

fn destination(t: &RouteTarget) -> DestinationView {
    match &t.backend {
        Ok(b) => DestinationView {
            service: Some(b.service.to_string()),
            port: Some(b.port),
            subset: b.subset.clone(),
            weight: t.weight,
            endpoints: b.endpoints.len(),
            healthy: b.healthy(),
            error: None,
        },
        Err(e) => DestinationView {
            service: None,
            port: None,
            subset: None,
            weight: t.weight,
            endpoints: 0,
            healthy: 0,
            error: Some(e.to_string()),
        },
    }
}

fn string_match(out: &mut Vec<String>, what: &str, m: &StringMatch) {
    out.push(match m {
        StringMatch::Exact(v) => format!("{what}={v}"),
        StringMatch::Prefix(v) => format!("{what}^={v}"),
        StringMatch::Regex(p) => format!("{what}~={}", p.source),
        StringMatch::Present => format!("{what} present"),
    });
}

/// `uri^=/api && headers[end-user]=jason`: Istio's match in one line.
pub fn describe_match(m: &HttpMatch) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        let what = if m.ignore_uri_case {
            "uri(any case)"
        } else {
            "uri"
        };
        string_match(&mut parts, what, u);
    }
    for (name, v) in [
        ("method", &m.method),
        ("authority", &m.authority),
        ("scheme", &m.scheme),
    ] {
        if let Some(v) = v {
            string_match(&mut parts, name, v);
        }
    }
    for (h, v) in &m.headers {
        string_match(&mut parts, &format!("headers[{h}]"), v);
    }
    for (h, v) in &m.without_headers {
        let mut one = Vec::new();
        string_match(&mut one, &format!("headers[{h}]"), v);
        parts.push(format!("!({})", one.concat()));
    }
    for (q, v) in &m.query_params {
        string_match(&mut parts, &format!("query[{q}]"), v);
    }
    if let Some(p) = m.port {
        parts.push(format!("port={p}"));
    }
    for (k, v) in &m.source_labels {
        parts.push(format!("sourceLabels[{k}]={v}"));
    }
    if let Some(ns) = &m.source_namespace {
        parts.push(format!("sourceNamespace={ns}"));
    }
    if parts.is_empty() {
        "*".into()
    } else {
        parts.join(" && ")
    }
}

/// Whether a match can hold for requests from `pod` (its source conditions).
fn can_match(m: &HttpMatch, pod: Option<&Pod>) -> bool {
    let Some(pod) = pod else { return true };
    m.source_namespace
        .as_ref()
        .is_none_or(|ns| *ns == pod.id.namespace)
        && pod.has_labels(&m.source_labels)
        && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == r::MESH_GATEWAY))
}

fn rule_view(rule: &CompiledRule, pod: Option<&Pod>) -> Option<RuleView> {
    let r = &rule.rule;
    let matches: Vec<String> = if r.matches.is_empty() {
        vec!["*".into()]
    } else {
        r.matches
            .iter()
            .filter(|m| can_match(m, pod))
            .map(describe_match)
            .collect()
    };
    if matches.is_empty() {
        return None;
    }
    let (action, detail) = match &r.action {
        HttpAction::Route(_) => ("route", None),
        HttpAction::Redirect(rd) => {
            let mut d = format!("{}", rd.code);
            for (k, v) in [
                ("scheme", &rd.scheme),
                ("authority", &rd.authority),
                ("uri", &rd.uri),
            ] {
                if let Some(v) = v {
                    let _ = write!(d, " {k}={v}");
                }
            }
            if let Some(p) = rd.port {
                let _ = write!(d, " port={p}");
            }
            ("redirect", Some(d))
        }
        HttpAction::DirectResponse(dr) => (
            "direct_response",
            Some(format!("{} ({} bytes)", dr.status, dr.body.len())),
        ),
    };
    let retries = r.retries.as_ref().map(|rt| {
        let mut s = format!("{} attempts", rt.attempts);
        if let Some(t) = rt.per_try_timeout {
            let _ = write!(s, ", {t:?} per try");
        }
        s
    });
    let fault = r.fault.as_ref().map(|f| {
        let mut parts = Vec::new();
        if let Some(d) = &f.delay {
            parts.push(format!("delay {:?} {}%", d.delay, d.percent));
        }
        if let Some(a) = &f.abort {
            parts.push(format!(
                "abort {} {}%",
                a.grpc_status.map_or(a.http_status, |g| g),
                a.percent
            ));
        }
        parts.join(", ")
    });
    Some(RuleView {
        index: Some(rule.index),
        name: r.name.clone(),
        matches,
        action,
        destinations: rule.targets.iter().map(|t| destination(t)).collect(),
        detail,
        timeout: r.timeout.map(|t| format!("{t:?}")),
        retries,
        fault,
    })
}

/// The routes of one HTTP Service port as `pod` (if given) sees them.
pub fn port_routes(
    service: String,
    address: String,
    protocol: &'static str,
    router: &HttpRouter,
    pod: Option<&Pod>,
) -> PortRoutes {
    let ns = pod.map_or("", |p| p.id.namespace.as_str());
    let vs = router
        .virtual_services
        .iter()
        .find(|v| pod.is_none() || v.export_to.visible(&v.id.namespace, ns));
    let rules = match vs {
        Some(vs) => vs.rules.iter().filter_map(|r| rule_view(r, pod)).collect(),
        None => vec![RuleView {
            index: None,
            name: None,
            matches: vec!["*".into()],
            action: "route",
            destinations: vec![destination(&router.default)],
            detail: None,
            timeout: None,
            retries: None,
            fault: None,
        }],
    };
    PortRoutes {
        service,
        address,
        protocol,
        virtual_service: vs.map(|v| v.id.to_string()),
        rules,
    }
}
