//! AuthorizationPolicy (`security.istio.io/v1` and `v1beta1`, same schema), decoded into
//! [`authz::AuthorizationPolicy`]. What cannot be enforced as written is refused with the
//! field at fault rather than enforced differently: CUSTOM actions (external authorizers),
//! `targetRef(s)` (policies for gateways and waypoints), path templates, unknown `when` keys
//! (`experimental.*` included).

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;

use super::{IstioObject, Problem, Problems, done, object_ref};
use crate::config::authz::{self, Action, Condition, StrMatch, Values};

/// `kind: AuthorizationPolicy`, as written in manifests or served by the API server.
pub type AuthorizationPolicy = IstioObject<Spec>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    selector: Option<WorkloadSelector>,
    target_ref: Option<serde_yaml::Value>,
    target_refs: Option<Vec<serde_yaml::Value>>,
    action: Option<String>,
    provider: Option<serde_yaml::Value>,
    rules: Option<Vec<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadSelector {
    match_labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleSpec {
    from: Option<Vec<From>>,
    to: Option<Vec<To>>,
    when: Option<Vec<When>>,
}

#[derive(Debug, Deserialize)]
struct From {
    source: Option<SourceSpec>,
}

#[derive(Debug, Deserialize)]
struct To {
    operation: Option<OperationSpec>,
}

type List = Option<Vec<String>>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceSpec {
    principals: List,
    not_principals: List,
    request_principals: List,
    not_request_principals: List,
    namespaces: List,
    not_namespaces: List,
    service_accounts: List,
    not_service_accounts: List,
    ip_blocks: List,
    not_ip_blocks: List,
    remote_ip_blocks: List,
    not_remote_ip_blocks: List,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationSpec {
    hosts: List,
    not_hosts: List,
    ports: List,
    not_ports: List,
    methods: List,
    not_methods: List,
    paths: List,
    not_paths: List,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct When {
    key: Option<String>,
    values: List,
    not_values: List,
}

/// Converts each value of `values` / `not` (at `field` / `notField`) with `parse`; a value
/// that does not convert is a problem naming its index.
fn values<T>(
    field: &str,
    (values, not): (&List, &List),
    parse: impl Fn(&str) -> Result<T, String>,
    problems: &mut Vec<Problem>,
) -> Values<T> {
    let not_field = not_name(field);
    let mut convert = |list: &List, name: &str| {
        let mut out = Vec::new();
        for (i, v) in list.iter().flatten().enumerate() {
            if v.is_empty() {
                problems.invalid(format!("{name}[{i}]"), "empty value");
                continue;
            }
            match parse(v) {
                Ok(t) => out.push(t),
                Err(reason) => problems.invalid(format!("{name}[{i}]"), reason),
            }
        }
        out
    };
    let values = convert(values, field);
    let not = convert(not, &not_field);
    Values { values, not }
}

/// `spec.rules[0].from[0].source.principals` -> `...source.notPrincipals`.
fn not_name(field: &str) -> String {
    match field.rsplit_once('.') {
        Some((path, last)) => {
            let mut chars = last.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            format!(
                "{path}.not{}{}",
                first.into_iter().collect::<String>(),
                chars.as_str()
            )
        }
        None => format!("not_{field}"),
    }
}

fn strings(v: &str) -> Result<StrMatch, String> {
    Ok(StrMatch::parse(v))
}

/// A path as Istio matches it; its path templates (`{*}`, `{**}`) are not supported.
fn path(v: &str) -> Result<StrMatch, String> {
    if v.contains('{') {
        return Err(format!(
            "{v:?}: path templates ({{*}}, {{**}}) are not supported; use a prefix (`/api/*`)"
        ));
    }
    Ok(StrMatch::parse(v))
}

/// An IP (a /32 or /128 block) or a CIDR block.
fn ip_block(v: &str) -> Result<IpNet, String> {
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(net);
    }
    v.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{v:?} is not an IP address or CIDR block"))
}

fn port(v: &str) -> Result<u16, String> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{v:?} is not a port number in 1..65535")),
    }
}

fn service_account(v: &str) -> Result<(String, String), String> {
    match v.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!("{v:?} is not NAMESPACE/SERVICE_ACCOUNT")),
    }
}

fn given(list: &List) -> bool {
    list.as_ref().is_some_and(|l| !l.is_empty())
}

fn convert_source(
    s: &SourceSpec,
    at: &str,
    rule: &mut authz::Rule,
    p: &mut Vec<Problem>,
) -> authz::Source {
    if given(&s.request_principals) || given(&s.not_request_principals) {
        rule.request_fields.push(format!("{at}.requestPrincipals"));
    }
    let f = |name: &str| format!("{at}.{name}");
    authz::Source {
        principals: values(
            &f("principals"),
            (&s.principals, &s.not_principals),
            strings,
            p,
        ),
        namespaces: values(
            &f("namespaces"),
            (&s.namespaces, &s.not_namespaces),
            strings,
            p,
        ),
        service_accounts: values(
            &f("serviceAccounts"),
            (&s.service_accounts, &s.not_service_accounts),
            service_account,
            p,
        ),
        request_principals: values(
            &f("requestPrincipals"),
            (&s.request_principals, &s.not_request_principals),
            strings,
            p,
        ),
        ip_blocks: values(
            &f("ipBlocks"),
            (&s.ip_blocks, &s.not_ip_blocks),
            ip_block,
            p,
        ),
        remote_ip_blocks: values(
            &f("remoteIpBlocks"),
            (&s.remote_ip_blocks, &s.not_remote_ip_blocks),
            ip_block,
            p,
        ),
    }
}

fn convert_operation(
    o: &OperationSpec,
    at: &str,
    rule: &mut authz::Rule,
    p: &mut Vec<Problem>,
) -> authz::Operation {
    let request = [
        ("hosts", (&o.hosts, &o.not_hosts)),
        ("methods", (&o.methods, &o.not_methods)),
        ("paths", (&o.paths, &o.not_paths)),
    ];
    for (name, (v, n)) in request {
        if given(v) || given(n) {
            rule.request_fields.push(format!("{at}.{name}"));
        }
    }
    let f = |name: &str| format!("{at}.{name}");
    authz::Operation {
        ports: values(&f("ports"), (&o.ports, &o.not_ports), port, p),
        hosts: values(&f("hosts"), (&o.hosts, &o.not_hosts), strings, p),
        methods: values(&f("methods"), (&o.methods, &o.not_methods), strings, p),
        paths: values(&f("paths"), (&o.paths, &o.not_paths), path, p),
    }
}

/// `when[i]`, or `None` for an invalid one (recorded as a problem). Request keys are
/// recorded in the rule's `request_fields`.
fn convert_when(
    w: &When,
    at: &str,
    rule: &mut authz::Rule,
    p: &mut Vec<Problem>,
) -> Option<Condition> {
    let Some(key) = w.key.as_deref().filter(|k| !k.is_empty()) else {
        p.invalid(format!("{at}.key"), "missing");
        return None;
    };
    if !given(&w.values) && !given(&w.not_values) {
        p.invalid(
            format!("{at}.values"),
            "one of values or notValues must be set",
        );
        return None;
    }
    let vals = (&w.values, &w.not_values);
    let field = format!("{at}.values");
    Some(match key {
        "source.ip" | "remote.ip" => Condition::SourceIp(values(&field, vals, ip_block, p)),
        "source.namespace" => Condition::SourceNamespace(values(&field, vals, strings, p)),
        "source.principal" => Condition::SourcePrincipal(values(&field, vals, strings, p)),
        "destination.ip" => Condition::DestinationIp(values(&field, vals, ip_block, p)),
        "destination.port" => Condition::DestinationPort(values(&field, vals, port, p)),
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            let name = &k["request.headers[".len()..k.len() - 1];
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.invalid(
                    format!("{at}.key"),
                    format!("{name:?} is not a header name"),
                );
                return None;
            }
            rule.request_fields.push(format!("{at}.key ({k})"));
            let name = name.to_ascii_lowercase();
            Condition::RequestHeader(name, values(&field, vals, strings, p))
        }
        k if k.starts_with("request.auth.") => {
            rule.request_fields.push(format!("{at}.key ({k})"));
            Condition::RequestAuth(values(&field, vals, strings, p))
        }
        other => {
            let reason = format!(
                "{other:?} is not a supported key (source.ip, remote.ip, source.namespace, \
                 source.principal, destination.ip, destination.port, request.headers[NAME], \
                 request.auth.*)"
            );
            p.invalid(format!("{at}.key"), reason);
            return None;
        }
    })
}

pub(super) fn convert_authorization_policy(
    ap: &AuthorizationPolicy,
) -> Result<authz::AuthorizationPolicy, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&ap.metadata, &mut problems);
    let default = Spec::default();
    let spec = ap.spec.as_ref().unwrap_or(&default);
    let selector = spec.selector.as_ref().and_then(|s| s.match_labels.clone());
    let selector = selector.filter(|labels| !labels.is_empty());
    if spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
        problems.invalid(
            "spec.targetRefs",
            "policies attached to gateways or waypoints are not supported: nodemesh enforces \
             policies at the destination workload (use spec.selector)",
        );
    }
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => {
            problems.invalid(
                "spec.action",
                "CUSTOM (an external authorizer) is not supported",
            );
            Action::Deny
        }
        Some(other) => {
            problems.invalid(
                "spec.action",
                format!("{other:?} is not one of ALLOW, DENY, AUDIT"),
            );
            Action::Deny
        }
    };
    if spec.provider.is_some() && spec.action.as_deref() != Some("CUSTOM") {
        problems.invalid("spec.provider", "only for action CUSTOM");
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut rule = authz::Rule::default();
        for (j, from) in r.from.iter().flatten().enumerate() {
            let at = format!("{at}.from[{j}].source");
            let Some(source) = &from.source else {
                problems.invalid(at, "missing");
                continue;
            };
            let source = convert_source(source, &at, &mut rule, &mut problems);
            rule.from.push(source);
        }
        for (j, to) in r.to.iter().flatten().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            let Some(op) = &to.operation else {
                problems.invalid(at, "missing");
                continue;
            };
            let op = convert_operation(op, &at, &mut rule, &mut problems);
            rule.to.push(op);
        }
        for (j, w) in r.when.iter().flatten().enumerate() {
            let at = format!("{at}.when[{j}]");
            if let Some(c) = convert_when(w, &at, &mut rule, &mut problems) {
                rule.when.push(c);
            }
        }
        rules.push(rule);
    }
    let policy = authz::AuthorizationPolicy {
        id,
        selector,
        action,
        rules,
    };
    done(policy, problems)
}
