//! Istio AuthorizationPolicy (`security.istio.io/v1`, `v1beta1`), enforced per connection at
//! the destination's agent, with Istio's rules:
//!
//! - A policy applies to a pod if it is in the pod's namespace or in the root namespace
//!   ([`ROOT_NAMESPACE`]), and has no selector or a selector matching the pod's labels.
//! - A DENY policy with a matching rule denies. Otherwise, if ALLOW policies apply, one of
//!   them must have a matching rule; with none, the connection is allowed. AUDIT policies do
//!   not decide anything.
//! - A policy without rules matches nothing (an ALLOW one alone denies everything); an empty
//!   rule (`- {}`) matches everything.
//! - In a rule, `from` entries are alternatives and so are `to` entries; `when` conditions
//!   must all hold. Inside one source or operation every field given must match; a field
//!   matches if any of its values does, a `not` field if none does.
//!
//! The connection's attributes: the peer's proven SPIFFE identity (HBONE; none for
//! plaintext), its IP, the pod's IP and the target port. Request attributes (methods, paths,
//! hosts, headers) exist only where the destination's agent parses HTTP (ports a Service
//! declares HTTP); there each request is checked again with them ([`Stage::Request`]), and
//! the connection is refused up front only if no request on it could be allowed
//! ([`Stage::HttpConnection`]). On other ports, as Istio ambient's ztunnel does, an ALLOW rule
//! that needs them never matches and a DENY rule that has them is applied on its other fields
//! ([`Stage::Connection`]: failing closed both ways). There are no request principals (no
//! RequestAuthentication, so no validated JWT): `requestPrincipals` and `request.auth.*`
//! match as Istio matches a request without a token.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::Serialize;

use super::model::{ObjectRef, Pod, ROOT_NAMESPACE};
use crate::identity::Identity;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    /// Istio's AUDIT: marks requests for audit logging; never allows or denies.
    Audit,
}

/// One AuthorizationPolicy, validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub id: ObjectRef,
    /// `spec.selector.matchLabels`; `None` (also for empty labels): every pod of its
    /// namespace, or of the mesh in the root namespace.
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    fn applies_to(&self, pod: &Pod) -> bool {
        let in_scope = self.id.namespace == pod.id.namespace || self.id.namespace == ROOT_NAMESPACE;
        in_scope && self.selector.as_ref().is_none_or(|s| pod.has_labels(s))
    }
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    /// The request-level fields the rule uses (`to[0].operation.methods`, ...), which a
    /// connection cannot be checked against; empty for a rule of connection attributes only.
    pub request_fields: Vec<String>,
}

/// Values to match and values that must not match (`principals` / `notPrincipals`, ...).
/// Both empty: no constraint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not: Vec<T>,
}

impl<T> Default for Values<T> {
    fn default() -> Self {
        Values {
            values: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Values<T> {
    fn matches(&self, is: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&is)) && !self.not.iter().any(is)
    }
}

/// A string as Istio matches it: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StrMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StrMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StrMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.to_owned())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.to_owned())
        } else {
            StrMatch::Exact(s.to_owned())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Any => !v.is_empty(),
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        let starts = |p: &str| v.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        let ends = |s: &str| {
            v.len()
                .checked_sub(s.len())
                .and_then(|i| v.get(i..))
                .is_some_and(|h| h.eq_ignore_ascii_case(s))
        };
        match self {
            StrMatch::Any => !v.is_empty(),
            StrMatch::Exact(e) => v.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => starts(p),
            StrMatch::Suffix(s) => ends(s),
        }
    }
}

/// `from[].source`, the connection-level fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Source {
    /// SPIFFE identities without `spiffe://`: `cluster.local/ns/NS/sa/SA`.
    pub principals: Values<StrMatch>,
    pub namespaces: Values<StrMatch>,
    /// `NAMESPACE/SERVICE_ACCOUNT`.
    pub service_accounts: Values<(String, String)>,
    /// A request field: the principal of a validated JWT, which never exists here.
    pub request_principals: Values<StrMatch>,
    /// `ipBlocks` and `remoteIpBlocks` (the same address here: no proxy in between adds
    /// X-Forwarded-For at this layer).
    pub ip_blocks: Values<IpNet>,
    pub remote_ip_blocks: Values<IpNet>,
}

/// `to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Operation {
    pub ports: Values<u16>,
    /// Request fields: matched against the authority without its port, case-insensitively.
    pub hosts: Values<StrMatch>,
    pub methods: Values<StrMatch>,
    /// Matched against the path without the query.
    pub paths: Values<StrMatch>,
}

/// `when[]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Condition {
    /// `source.ip`, `remote.ip`.
    SourceIp(Values<IpNet>),
    SourceNamespace(Values<StrMatch>),
    SourcePrincipal(Values<StrMatch>),
    DestinationIp(Values<IpNet>),
    DestinationPort(Values<u16>),
    /// `request.headers[NAME]` (the name lower-cased); several values of the header are
    /// joined with `,` as Envoy does.
    RequestHeader(String, Values<StrMatch>),
    /// `request.auth.*`: attributes of a validated JWT, which never exists here.
    RequestAuth(Values<StrMatch>),
}

/// The request attributes of one HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    /// The authority (`:authority` or `Host`), port included if given.
    pub host: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

/// When the decision is taken.
#[derive(Clone, Copy, Debug)]
pub enum Stage<'a> {
    /// A connection whose requests are never seen (a TCP port): request fields fail closed.
    Connection,
    /// A connection whose requests will each be checked: refused only if no request could be
    /// allowed (a DENY rule with request fields waits for the request).
    HttpConnection,
    /// One request.
    Request(&'a HttpRequest<'a>),
}

/// The connection being authorized.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub source_ip: Ipv4Addr,
    /// The peer's proven identity (HBONE); `None` for plaintext.
    pub peer: Option<&'a Identity>,
    pub destination_ip: Ipv4Addr,
    /// The port the app listens on.
    pub destination_port: u16,
}

impl Connection<'_> {
    fn principal(&self) -> Option<String> {
        self.peer.map(|p| {
            format!(
                "{}/ns/{}/sa/{}",
                p.trust_domain, p.namespace, p.service_account
            )
        })
    }

    fn in_blocks(&self, blocks: &Values<IpNet>, ip: Ipv4Addr) -> bool {
        blocks.matches(|b| b.contains(&IpAddr::V4(ip)))
    }
}

/// Why a connection was denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// A DENY policy's rule matched.
    DenyPolicy(ObjectRef),
    /// ALLOW policies apply and none matched.
    NoAllowMatch { policies: Vec<ObjectRef> },
    /// An AuthorizationPolicy of the pod's namespace or the root namespace is invalid
    /// ([`super::model::Snapshot::invalid_authorization_policies`]).
    InvalidPolicy(ObjectRef),
    /// The configuration does not know the destination pod (it was just removed).
    UnknownPod(Ipv4Addr),
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::DenyPolicy(p) => write!(f, "denied by AuthorizationPolicy {p} (DENY)"),
            Denied::NoAllowMatch { policies } => {
                let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "no ALLOW AuthorizationPolicy matched (applying: {})",
                    names.join(", ")
                )
            }
            Denied::InvalidPolicy(p) => write!(
                f,
                "AuthorizationPolicy {p} is invalid: its namespace is closed until it is fixed \
                 (mesh-agent status shows why)"
            ),
            Denied::UnknownPod(ip) => write!(f, "no pod with IP {ip} in the configuration"),
        }
    }
}

/// Istio's decision for `conn` to `pod` under `policies` (all of the snapshot's, or at least
/// those of the pod's and the root namespace), at `stage`.
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
    pod: &Pod,
    conn: &Connection<'_>,
    stage: Stage<'_>,
) -> Result<(), Denied> {
    let principal = conn.principal();
    let mut allow = Vec::new();
    let mut allowed = false;
    for p in policies.into_iter().filter(|p| p.applies_to(pod)) {
        match p.action {
            Action::Deny => {
                let matched = p
                    .rules
                    .iter()
                    .any(|r| rule_matches(r, conn, &principal, true, stage));
                if matched {
                    return Err(Denied::DenyPolicy(p.id.clone()));
                }
            }
            Action::Allow => {
                allowed = allowed
                    || p.rules
                        .iter()
                        .any(|r| rule_matches(r, conn, &principal, false, stage));
                allow.push(p.id.clone());
            }
            Action::Audit => {}
        }
    }
    if allow.is_empty() || allowed {
        Ok(())
    } else {
        Err(Denied::NoAllowMatch { policies: allow })
    }
}

/// Whether `rule` matches at `stage` (see [`Stage`] for request fields before the request).
fn rule_matches(
    rule: &Rule,
    conn: &Connection<'_>,
    principal: &Option<String>,
    deny: bool,
    stage: Stage<'_>,
) -> bool {
    let needs_request = !rule.request_fields.is_empty();
    let req = match stage {
        Stage::Request(r) => Some(r),
        // Without the request, its fields count as matching, except where that would let
        // something through: an ALLOW on a connection never parsed, a DENY on one whose
        // requests will be checked (the request decides).
        Stage::Connection if needs_request && !deny => return false,
        Stage::HttpConnection if needs_request && deny => return false,
        Stage::Connection | Stage::HttpConnection => None,
    };
    let principal = principal.as_deref();
    // No validated JWT: a request principal or claim never matches a value.
    let no_token = |v: &Values<StrMatch>| v.matches(|_| false);
    let source = |s: &Source| {
        let peer = conn.peer;
        s.principals
            .matches(|m| principal.is_some_and(|p| m.matches(p)))
            && s.namespaces
                .matches(|m| peer.is_some_and(|p| m.matches(&p.namespace)))
            && s.service_accounts.matches(|(ns, sa)| {
                peer.is_some_and(|p| p.namespace == *ns && p.service_account == *sa)
            })
            && conn.in_blocks(&s.ip_blocks, conn.source_ip)
            && conn.in_blocks(&s.remote_ip_blocks, conn.source_ip)
            && (req.is_none() || no_token(&s.request_principals))
    };
    let operation = |o: &Operation| {
        o.ports.matches(|p| *p == conn.destination_port)
            && req.is_none_or(|r| {
                let host = strip_port(r.host);
                o.hosts.matches(|m| m.matches_ignore_case(host))
                    && o.methods.matches(|m| m.matches(r.method))
                    && o.paths.matches(|m| m.matches(r.path))
            })
    };
    let condition = |c: &Condition| match c {
        Condition::SourceIp(v) => conn.in_blocks(v, conn.source_ip),
        Condition::DestinationIp(v) => conn.in_blocks(v, conn.destination_ip),
        Condition::SourceNamespace(v) => {
            v.matches(|m| conn.peer.is_some_and(|p| m.matches(&p.namespace)))
        }
        Condition::SourcePrincipal(v) => v.matches(|m| principal.is_some_and(|p| m.matches(p))),
        Condition::DestinationPort(v) => v.matches(|p| *p == conn.destination_port),
        Condition::RequestHeader(name, v) => req.is_none_or(|r| {
            let joined = header_value(r.headers, name);
            v.matches(|m| joined.as_deref().is_some_and(|h| m.matches(h)))
        }),
        Condition::RequestAuth(v) => req.is_none() || no_token(v),
    };
    (rule.from.is_empty() || rule.from.iter().any(source))
        && (rule.to.is_empty() || rule.to.iter().any(operation))
        && rule.when.iter().all(condition)
}

/// `host[:port]` without the port; an IPv6 literal (`[::1]:80`, `[::1]`) keeps its brackets.
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

/// A header's values joined with `,`, as Envoy presents a repeated header; `None` if absent.
fn header_value(headers: &hyper::HeaderMap, name: &str) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    let first = values.next()?;
    Some(values.fold(first.into_owned(), |mut all, v| {
        all.push(',');
        all.push_str(&v);
        all
    }))
}
