//! Istio's routing API in the model: VirtualService and DestinationRule, validated (regexes
//! compiled, durations parsed, hosts checked) so the data path only ever evaluates them.
//!
//! Host names are kept as written; [`Host`] resolves them relative to the namespace of the
//! object that wrote them, as Istio does (`reviews` in namespace `default` is
//! `reviews.default.svc.cluster.local`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::model::ObjectRef;

/// The cluster's DNS domain (Kubernetes' default, Istio's `cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The gateway name meaning "sidecars/agents in the mesh" in `gateways` lists.
pub const MESH_GATEWAY: &str = "mesh";

/// A host as a rule names it, resolved relative to the rule's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Host {
    /// A fully qualified name (`reviews.default.svc.cluster.local`, `bookinfo.example.com`).
    Fqdn(String),
    /// `*.suffix` (the suffix keeps its leading dot) or `*` (empty suffix).
    Wildcard(String),
    /// A Service's cluster IP.
    Ip(Ipv4Addr),
}

/// One label of a host name as Istio accepts it: 1 to 63 letters, digits or `-`.
pub fn host_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Host {
    /// Istio's rules: a name without dots is a Service in `namespace`; `name.ns` and
    /// `name.ns.svc` are completed with the cluster domain; anything else is taken as written.
    pub fn resolve(written: &str, namespace: &str) -> Result<Host, String> {
        let h = written.trim_end_matches('.').to_ascii_lowercase();
        if h.is_empty() {
            return Err("empty host".into());
        }
        if let Ok(ip) = h.parse() {
            return Ok(Host::Ip(ip));
        }
        if let Some(suffix) = h.strip_prefix('*') {
            if !(suffix.is_empty() || suffix.starts_with('.')) || suffix.contains('*') {
                return Err(format!("{written:?}: a wildcard must be `*` or `*.domain`"));
            }
            return Ok(Host::Wildcard(suffix.to_owned()));
        }
        let valid = h.split('.').all(host_label);
        if !valid || h.len() > 253 {
            return Err(format!("{written:?} is not a valid DNS name"));
        }
        let dots = h.matches('.').count();
        Ok(Host::Fqdn(match dots {
            0 => format!("{h}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            1 => format!("{h}.svc.{CLUSTER_DOMAIN}"),
            _ if h.ends_with(".svc") => format!("{h}.{CLUSTER_DOMAIN}"),
            _ => h,
        }))
    }

    /// Whether this host names the Service with this FQDN and cluster IP.
    pub fn matches(&self, fqdn: &str, cluster_ip: Option<Ipv4Addr>) -> bool {
        match self {
            Host::Fqdn(h) => h == fqdn,
            Host::Wildcard(suffix) => fqdn.ends_with(suffix.as_str()),
            Host::Ip(ip) => Some(*ip) == cluster_ip,
        }
    }
}

/// A Service's FQDN.
pub fn service_fqdn(id: &ObjectRef) -> String {
    format!("{}.{}.svc.{CLUSTER_DOMAIN}", id.name, id.namespace)
}

/// A compiled regular expression with the text it came from (RE2 syntax, whole-string
/// match as Envoy's `safe_regex`).
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

impl Pattern {
    /// Compiles `source` anchored at both ends, with a size limit: patterns come from users.
    pub fn whole(source: &str, case_insensitive: bool) -> Result<Pattern, String> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .case_insensitive(case_insensitive)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("{source:?} is not a valid regular expression: {e}"))?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
        })
    }

    /// Compiles `source` unanchored (uriRegexRewrite replaces what it finds).
    pub fn find(source: &str) -> Result<Pattern, String> {
        let regex = regex::RegexBuilder::new(source)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("{source:?} is not a valid regular expression: {e}"))?;
        Ok(Pattern {
            source: source.to_owned(),
            regex,
        })
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    /// `{}` in a header match: the header is present, whatever its value.
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            StringMatch::Exact(e) if ignore_case => e.eq_ignore_ascii_case(value),
            StringMatch::Exact(e) => e == value,
            StringMatch::Prefix(p) if ignore_case => value
                .get(..p.len())
                .is_some_and(|v| v.eq_ignore_ascii_case(p)),
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.regex.is_match(value),
            StringMatch::Present => true,
        }
    }
}

/// One `match` entry of an HTTP rule; all its conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lower-case header names.
    pub headers: Vec<(String, StringMatch)>,
    pub without_headers: Vec<(String, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub ignore_uri_case: bool,
    /// Gateways this match is bound to; empty: the VirtualService's.
    pub gateways: Vec<String>,
}

/// Where a routed request goes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Destination {
    pub host: Host,
    /// As written, for messages and the CLI.
    pub host_written: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

/// Header edits (`set` replaces, `add` appends, `remove` deletes).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Headers {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedDestination {
    pub destination: Destination,
    pub weight: u32,
    pub headers: Headers,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// `derivePort: FROM_REQUEST_PORT`.
    pub port_from_request: bool,
    pub scheme: Option<String>,
    pub code: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(skip)]
    pub body: bytes::Bytes,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    Route(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UriRegexRewrite {
    pub pattern: Pattern,
    /// With `\1`-style group references turned into the regex crate's `${1}`.
    pub replacement: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex: Option<UriRegexRewrite>,
}

/// What `retryOn` lists (Envoy's retry policies and gRPC status names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    pub server_error: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    /// Status codes named in the list (Istio allows bare codes such as `503`).
    pub status_codes: Vec<u16>,
    /// gRPC statuses (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8,
    /// `internal` 13, `unavailable` 14).
    pub grpc_statuses: Vec<u16>,
}

impl RetryOn {
    /// Istio's default: `connect-failure,refused-stream,unavailable,cancelled,503`.
    pub fn istio_default() -> RetryOn {
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            status_codes: vec![503],
            grpc_statuses: vec![14, 1],
            ..RetryOn::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retries {
    /// Retries after the first try (Istio's `attempts`).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Istio retries on another endpoint when there is one (`previous_hosts`), unless this.
    pub ignore_previous_hosts: bool,
}

impl Retries {
    /// Istio's default retry policy, used when a rule says nothing: 2 retries.
    pub fn istio_default() -> Retries {
        Retries {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            ignore_previous_hosts: false,
        }
    }
}

/// A fraction in percent, 0..=100.
pub type Percent = f64;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    pub delay: Duration,
    pub percent: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultAbort {
    /// HTTP status, or for `grpcStatus` 200 with that `grpc-status`.
    pub http_status: u16,
    pub grpc_status: Option<u16>,
    pub percent: Percent,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// `corsPolicy`: Envoy's CORS filter for one rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CorsPolicy {
    /// Origins allowed (`allowOrigins`, and the deprecated exact `allowOrigin`).
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
    /// `unmatchedPreflights: IGNORE`: a preflight from an origin not allowed is answered
    /// without CORS headers instead of being forwarded (`FORWARD`, the default).
    pub ignore_unmatched_preflights: bool,
}

impl CorsPolicy {
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins.iter().any(|m| m.matches(origin, false))
    }
}

/// A copy of each request (of `percent` of them) sent to another destination, its answer
/// ignored (`mirror` / `mirrors`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mirror {
    pub destination: Destination,
    pub percent: Percent,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Empty: every request.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub rewrite: Option<Rewrite>,
    pub headers: Headers,
    pub timeout: Option<Duration>,
    /// `None`: Istio's default policy applies.
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    pub cors: Option<CorsPolicy>,
    pub mirrors: Vec<Mirror>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpMatch {
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpRoute {
    pub matches: Vec<TcpMatch>,
    pub route: Vec<WeightedDestination>,
}

/// Namespaces an object is visible to (`exportTo`); empty means all.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExportTo(pub Vec<String>);

impl ExportTo {
    /// `.` is the object's own namespace, `*` every namespace.
    pub fn visible(&self, own: &str, client: &str) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|e| e == "*" || e == client || (e == "." && own == client))
    }
}

/// A VirtualService (networking.istio.io v1, v1beta1, v1alpha3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    pub id: ObjectRef,
    pub hosts: Vec<Host>,
    pub hosts_written: Vec<String>,
    /// As written; empty means `mesh` only.
    pub gateways: Vec<String>,
    pub export_to: ExportTo,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    /// `metadata.creationTimestamp` (RFC 3339, sorts as text): the oldest wins a host.
    pub created: Option<String>,
}

impl VirtualService {
    /// Whether the rules apply to traffic inside the mesh (not only at gateways).
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

/// `trafficPolicy.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    /// Consistent hash of a header, cookie, source IP or query parameter.
    Hash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// Lower-case header name.
    Header(String),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

/// `trafficPolicy.connectionPool`; `None` fields are unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: upstream HTTP connections without a request for this long close.
    pub idle_timeout: Option<Duration>,
    /// `tcp.idleTimeout`: TCP connections with no byte either way for this long close.
    pub tcp_idle_timeout: Option<Duration>,
}

/// `trafficPolicy.outlierDetection`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// A traffic policy (the rule's, a subset's or a port's).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// `portLevelSettings` by Service port.
    pub ports: BTreeMap<u16, PortPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PortPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// A DestinationRule (networking.istio.io v1, v1beta1, v1alpha3).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    pub id: ObjectRef,
    pub host: Host,
    pub host_written: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
    pub export_to: ExportTo,
    pub created: Option<String>,
}

/// The effective policy for one Service port and subset: the subset's settings over the
/// rule's, port-level settings over both (Istio's precedence).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EffectivePolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    pub outlier_detection: Option<OutlierDetection>,
}

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    pub fn policy(&self, subset: Option<&Subset>, port: u16) -> EffectivePolicy {
        let mut out = EffectivePolicy::default();
        let levels = [
            Some(&self.traffic_policy),
            subset.and_then(|s| s.traffic_policy.as_ref()),
        ];
        for tp in levels.into_iter().flatten() {
            let port_level = tp.ports.get(&port);
            let lb = port_level.and_then(|p| p.load_balancer.as_ref());
            if let Some(lb) = lb.or(tp.load_balancer.as_ref()) {
                out.load_balancer = lb.clone();
            }
            let pool = port_level.and_then(|p| p.connection_pool.as_ref());
            if let Some(pool) = pool.or(tp.connection_pool.as_ref()) {
                out.connection_pool = pool.clone();
            }
            let od = port_level.and_then(|p| p.outlier_detection.as_ref());
            if let Some(od) = od.or(tp.outlier_detection.as_ref()) {
                out.outlier_detection = Some(od.clone());
            }
        }
        out
    }
}

/// Go's `time.ParseDuration` grammar (`1.5s`, `500ms`, `1h30m`), which Istio's durations
/// follow. Hand-written: humantime rejects fractions and accepts spaces Istio does not.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (examples: 10s, 1.5s, 250ms, 1m30s)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if !(0.0..=1e9).contains(&total) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve_as_istio_does() {
        let r = |h| Host::resolve(h, "default").expect(h);
        assert_eq!(
            r("reviews"),
            Host::Fqdn("reviews.default.svc.cluster.local".into())
        );
        assert_eq!(
            r("reviews.prod"),
            Host::Fqdn("reviews.prod.svc.cluster.local".into())
        );
        assert_eq!(
            r("reviews.prod.svc"),
            Host::Fqdn("reviews.prod.svc.cluster.local".into())
        );
        let fqdn = "reviews.prod.svc.cluster.local";
        assert_eq!(
            r("Reviews.Prod.svc.cluster.local."),
            Host::Fqdn(fqdn.into())
        );
        assert_eq!(
            r("bookinfo.example.com"),
            Host::Fqdn("bookinfo.example.com".into())
        );
        assert_eq!(r("10.96.0.10"), Host::Ip("10.96.0.10".parse().unwrap()));
        assert!(r("*.prod.svc.cluster.local").matches(fqdn, None));
        assert!(r("*").matches(fqdn, None));
        assert!(!r("*.example.com").matches(fqdn, None));
        for bad in ["", "a_b", "x.*.com", "*x.com", "a..b"] {
            assert!(Host::resolve(bad, "default").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_follow_go() {
        let d = |s| parse_duration(s).expect(s);
        assert_eq!(d("10s"), Duration::from_secs(10));
        assert_eq!(d("0.5s"), Duration::from_millis(500));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("0"), Duration::ZERO);
        for bad in ["", "10", "s", "1.2.3s", "10 s", "5d", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn string_matches() {
        let re = StringMatch::Regex(Pattern::whole("/api/v[0-9]+", false).unwrap());
        assert!(re.matches("/api/v12", false));
        assert!(
            !re.matches("/api/v12/x", false),
            "regex matches the whole value"
        );
        assert!(StringMatch::Prefix("/API".into()).matches("/api/x", true));
        assert!(!StringMatch::Prefix("/API".into()).matches("/api/x", false));
        assert!(StringMatch::Exact("GET".into()).matches("GET", false));
        assert!(!StringMatch::Prefix("/abc".into()).matches("/a", true));
    }

    #[test]
    fn export_to() {
        assert!(ExportTo::default().visible("a", "b"));
        assert!(ExportTo(vec![".".into()]).visible("a", "a"));
        assert!(!ExportTo(vec![".".into()]).visible("a", "b"));
        assert!(ExportTo(vec!["b".into()]).visible("a", "b"));
    }
}
