//! HTTP routing at the source agent: a Service port's VirtualService rules compiled against
//! the snapshot's Services and DestinationRules, so a request is matched and sent without
//! looking anything up by name.
//!
//! What flows here is one request's head: [`HttpRouter::route`] finds the first rule that
//! matches (Istio's first-match semantics; a VirtualService that matches nothing is a 404
//! `NR`), [`CompiledRule::pick`] draws a weighted destination, and [`Backend::pick`] an
//! endpoint by the DestinationRule's load balancer, skipping endpoints outlier detection has
//! ejected. Backends (a Service port and subset) are shared by every rule that names them and
//! keep their counters across config snapshots, like the Service counters.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use hyper::header::HeaderMap;
use serde::Serialize;

use crate::config::model::{Endpoint, ObjectRef, Pod, Service, Snapshot};
use crate::config::routing::{
    self as r, DestinationRule, EffectivePolicy, HashKey, Host, HttpMatch, LoadBalancer,
    StringMatch, VirtualService, service_fqdn,
};
use crate::telemetry::metrics::ServiceMeta;

/// Health and load of one endpoint, kept across snapshots (by backend and address).
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests in flight (LEAST_REQUEST).
    pub active: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Milliseconds since [`epoch`] until which the endpoint is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    /// Times ejected: the ejection time grows with each (Envoy's rule).
    ejections: AtomicU32,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl EndpointState {
    fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// How much longer outlier detection keeps the endpoint ejected, if it is.
    pub fn ejected_for(&self) -> Option<std::time::Duration> {
        let left = self
            .ejected_until
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms());
        (left > 0).then(|| std::time::Duration::from_millis(left))
    }
}

/// State of one backend kept across snapshots.
#[derive(Debug, Default)]
pub struct BackendState {
    next: AtomicUsize,
    /// Requests in flight to the backend (connection pool limits).
    pub in_flight: AtomicU32,
    /// Requests refused by the connection pool limits (`UO`).
    pub overflows: AtomicU64,
    /// Ejections by outlier detection.
    pub ejections: AtomicU64,
}

/// Where requests can be sent: a Service port, or the part of it a subset selects.
#[derive(Debug)]
pub struct Backend {
    pub service: ObjectRef,
    pub meta: Arc<ServiceMeta>,
    pub port: u16,
    /// How the Service port is spoken to (HTTP/2 for `http2` and `grpc` ports).
    pub protocol: super::protocol::AppProtocol,
    pub subset: Option<String>,
    pub endpoints: Vec<(Endpoint, Arc<EndpointState>)>,
    pub policy: EffectivePolicy,
    pub state: Arc<BackendState>,
}

/// Why a backend cannot be chosen; answered with 503 `NC` like Envoy's missing cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[expect(
    clippy::enum_variant_names,
    reason = "each names what is unknown; `Unroutable::Host` would read as a host"
)]
pub enum Unroutable {
    UnknownHost(String),
    UnknownPort { host: String, port: Option<u16> },
    UnknownSubset { host: String, subset: String },
}

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unroutable::UnknownHost(h) => write!(f, "no Service for host {h:?}"),
            Unroutable::UnknownPort {
                host,
                port: Some(p),
            } => {
                write!(f, "Service {host:?} has no port {p}")
            }
            Unroutable::UnknownPort { host, port: None } => write!(
                f,
                "Service {host:?} has several ports and the route names none"
            ),
            Unroutable::UnknownSubset { host, subset } => {
                write!(f, "no DestinationRule subset {subset:?} for host {host:?}")
            }
        }
    }
}

/// A pick from a backend and how the request should treat it.
pub struct Picked<'a> {
    pub endpoint: &'a Endpoint,
    pub state: &'a Arc<EndpointState>,
}

impl Backend {
    /// An endpoint by the load balancer, skipping ejected ones and, when possible, those in
    /// `avoid` (endpoints a retry already tried). `hash` is the consistent-hash key's hash.
    pub fn pick(&self, hash: Option<u64>, avoid: &[SocketAddrV4]) -> Option<Picked<'_>> {
        let now = now_ms();
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let usable = |i: usize, strict: bool| {
            let (ep, st) = &self.endpoints[i];
            !(st.ejected(now) || (strict && avoid.contains(&ep.addr)))
        };
        let found = [true, false].into_iter().find_map(|strict| {
            if !(0..n).any(|i| usable(i, strict)) {
                return None;
            }
            Some(match (&self.policy.load_balancer, hash) {
                (LoadBalancer::Hash(_), Some(h)) => {
                    // Rendezvous hashing: the usable endpoint with the highest score; an
                    // endpoint leaving moves only its own keys.
                    (0..n)
                        .filter(|i| usable(*i, strict))
                        .max_by_key(|i| score(h, &self.endpoints[*i].0.addr))?
                }
                (LoadBalancer::Random, _) | (LoadBalancer::Hash(_), None) => {
                    let start = fastrand::usize(..n);
                    (0..n)
                        .map(|k| (start + k) % n)
                        .find(|i| usable(*i, strict))?
                }
                (LoadBalancer::LeastRequest, _) => {
                    // Power of two choices among the usable endpoints.
                    let all: Vec<usize> = (0..n).filter(|i| usable(*i, strict)).collect();
                    let a = all[fastrand::usize(..all.len())];
                    let b = all[fastrand::usize(..all.len())];
                    let load = |i: usize| self.endpoints[i].1.active.load(Ordering::Relaxed);
                    if load(b) < load(a) { b } else { a }
                }
                (LoadBalancer::RoundRobin, _) => {
                    let start = self.state.next.fetch_add(1, Ordering::Relaxed);
                    (0..n)
                        .map(|k| (start + k) % n)
                        .find(|i| usable(*i, strict))?
                }
            })
        })?;
        let (endpoint, state) = &self.endpoints[found];
        Some(Picked { endpoint, state })
    }

    /// The connection pool's limit on requests in flight: `http2MaxRequests`, and
    /// `maxConnections + http1MaxPendingRequests` (each upstream connection carries one
    /// HTTP/1.1 request at a time; beyond the connections, requests are pending).
    pub fn max_in_flight(&self) -> Option<u32> {
        let p = &self.policy.connection_pool;
        let h1 = p
            .max_connections
            .map(|c| c.saturating_add(p.http1_max_pending_requests.unwrap_or(u32::MAX)));
        [p.http2_max_requests, h1].into_iter().flatten().min()
    }

    /// Records an upstream answer (or failure) for outlier detection.
    pub fn observe(&self, state: &EndpointState, status: Option<u16>) {
        let Some(od) = &self.policy.outlier_detection else {
            return;
        };
        let gateway = matches!(status, None | Some(502..=504));
        let server = gateway || status.is_some_and(|s| s >= 500);
        let bump = |c: &AtomicU32, hit: bool| {
            if hit {
                c.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                c.store(0, Ordering::Relaxed);
                0
            }
        };
        let five = bump(&state.consecutive_5xx, server);
        let gw = bump(&state.consecutive_gateway, gateway);
        let tripped = od.consecutive_5xx.is_some_and(|t| five >= t)
            || od.consecutive_gateway_errors.is_some_and(|t| gw >= t);
        if !tripped {
            return;
        }
        let now = now_ms();
        if state.ejected(now) {
            return;
        }
        let ejected = self
            .endpoints
            .iter()
            .filter(|(_, s)| s.ejected(now))
            .count();
        // maxEjectionPercent, but at least one endpoint may go (Envoy's rule).
        let allowed = (self.endpoints.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return;
        }
        let times = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let base = od.base_ejection_time.as_millis() as u64;
        state
            .ejected_until
            .store(now + base * u64::from(times.min(10)), Ordering::Relaxed);
        state.consecutive_5xx.store(0, Ordering::Relaxed);
        state.consecutive_gateway.store(0, Ordering::Relaxed);
        self.state.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %self.service, port = self.port, subset = ?self.subset, times,
            ejected_ms = base * u64::from(times.min(10)), "outlier detection ejected an endpoint");
    }

    /// Endpoints not ejected now, for the CLI.
    pub fn healthy(&self) -> usize {
        let now = now_ms();
        self.endpoints
            .iter()
            .filter(|(_, s)| !s.ejected(now))
            .count()
    }
}

fn score(hash: u64, addr: &SocketAddrV4) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (hash, addr).hash(&mut h);
    h.finish()
}

/// A destination of a rule: a backend, or why there is none.
#[derive(Debug)]
pub struct RouteTarget {
    pub backend: Result<Arc<Backend>, Unroutable>,
    pub weight: u32,
    pub headers: r::Headers,
}

/// One `http[]` rule with its destinations resolved.
#[derive(Debug)]
pub struct CompiledRule {
    pub index: usize,
    pub rule: r::HttpRoute,
    pub targets: Vec<Arc<RouteTarget>>,
    total_weight: u32,
    /// Where copies of requests go, and for what percentage of them.
    pub mirrors: Vec<(Arc<RouteTarget>, r::Percent)>,
}

impl CompiledRule {
    /// A destination drawn by weight (Envoy's weighted clusters draw at random).
    pub fn pick(&self) -> Option<&Arc<RouteTarget>> {
        weighted(&self.targets, self.total_weight)
    }
}

fn weighted(targets: &[Arc<RouteTarget>], total: u32) -> Option<&Arc<RouteTarget>> {
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u32(..total);
    for t in targets {
        if x < t.weight {
            return Some(t);
        }
        x -= t.weight;
    }
    None
}

/// One `tcp[]` rule with its destinations resolved.
#[derive(Debug)]
pub struct TcpRule {
    pub matches: Vec<r::TcpMatch>,
    pub targets: Vec<Arc<RouteTarget>>,
    total_weight: u32,
}

/// The `tcp[]` routes of a TCP Service port (the first VirtualService for its host that has
/// any). A connection no rule matches goes to the Service itself.
#[derive(Debug)]
pub struct TcpRouter {
    pub virtual_service: Arc<ObjectRef>,
    pub export_to: r::ExportTo,
    pub rules: Vec<TcpRule>,
}

impl TcpRouter {
    /// The destination for a connection to `port` from `source`, drawn by weight; `None`:
    /// no rule applies, use the Service.
    pub fn route(&self, port: u16, source: Option<&Pod>) -> Option<&Arc<RouteTarget>> {
        let ns = source.map_or("", |p| p.id.namespace.as_str());
        if !self.export_to.visible(&self.virtual_service.namespace, ns) {
            return None;
        }
        let matches = |m: &r::TcpMatch| {
            m.port.is_none_or(|p| p == port)
                && m.source_namespace
                    .as_ref()
                    .is_none_or(|n| source.is_some_and(|p| &p.id.namespace == n))
                && (m.source_labels.is_empty()
                    || source.is_some_and(|p| p.has_labels(&m.source_labels)))
                && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == r::MESH_GATEWAY))
        };
        let rule = self
            .rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(matches))?;
        weighted(&rule.targets, rule.total_weight)
    }
}

/// The VirtualService governing one Service port, compiled.
#[derive(Debug)]
pub struct CompiledVs {
    pub id: Arc<ObjectRef>,
    pub export_to: r::ExportTo,
    pub rules: Vec<Arc<CompiledRule>>,
}

/// The routing of one HTTP Service port.
#[derive(Debug)]
pub struct HttpRouter {
    /// VirtualServices for the port's host, oldest first; the first visible to the client's
    /// namespace governs (Istio: one VirtualService per host for sidecars).
    pub virtual_services: Vec<CompiledVs>,
    /// Without a VirtualService: the Service port itself.
    pub default: Arc<RouteTarget>,
}

/// What the router needs to know about a request.
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The Service port the client connected to.
    pub port: u16,
    pub source: Option<&'a Pod>,
}

pub enum Routed<'a> {
    /// No VirtualService: straight to the Service.
    Default(&'a Arc<RouteTarget>),
    Rule(&'a Arc<CompiledRule>),
    /// A VirtualService governs the host and none of its rules matched: 404 `NR`.
    NoRoute,
}

impl HttpRouter {
    pub fn route<'a>(&'a self, req: &RequestHead<'_>) -> Routed<'a> {
        let client_ns = req.source.map_or("", |p| p.id.namespace.as_str());
        let Some(vs) = self
            .virtual_services
            .iter()
            .find(|v| v.export_to.visible(&v.id.namespace, client_ns))
        else {
            return Routed::Default(&self.default);
        };
        for rule in &vs.rules {
            let m = &rule.rule.matches;
            if m.is_empty() || m.iter().any(|m| matches(m, req)) {
                return Routed::Rule(rule);
            }
        }
        Routed::NoRoute
    }
}

fn matches(m: &HttpMatch, req: &RequestHead<'_>) -> bool {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    m.uri
        .as_ref()
        .is_none_or(|u| u.matches(req.path, m.ignore_uri_case))
        && m.method.as_ref().is_none_or(|x| x.matches(req.method, false))
        && m.scheme.as_ref().is_none_or(|x| x.matches("http", false))
        && m
            .authority
            .as_ref()
            .is_none_or(|x| req.authority.is_some_and(|a| x.matches(a, false)))
        && m.port.is_none_or(|p| p == req.port)
        && m
            .headers
            .iter()
            .all(|(n, sm)| header(n).is_some_and(|v| sm.matches(v, false)))
        && m
            .without_headers
            .iter()
            .all(|(n, sm)| !header(n).is_some_and(|v| sm.matches(v, false)))
        && m.query_params.iter().all(|(k, sm)| {
            query_param(req.query, k).is_some_and(|v| match sm {
                // Istio: an empty value matches a parameter given without one.
                StringMatch::Present => true,
                sm => sm.matches(v, false),
            })
        })
        && m.source_namespace.as_ref().is_none_or(|ns| {
            req.source.is_some_and(|p| &p.id.namespace == ns)
        })
        && (m.source_labels.is_empty()
            || req.source.is_some_and(|p| p.has_labels(&m.source_labels)))
        // Rules bound to gateways only never match mesh traffic.
        && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == r::MESH_GATEWAY))
}

pub fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// The consistent-hash key's hash for a request, if the policy hashes and the key is there.
pub fn hash_key(policy: &EffectivePolicy, req: &RequestHead<'_>, src: Ipv4Addr) -> Option<u64> {
    let LoadBalancer::Hash(key) = &policy.load_balancer else {
        return None;
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match key {
        HashKey::Header(name) => req.headers.get(name)?.as_bytes().hash(&mut h),
        HashKey::SourceIp => src.hash(&mut h),
        HashKey::QueryParameter(p) => query_param(req.query, p)?.hash(&mut h),
        HashKey::Cookie(name) => req
            .headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then_some(v)
            })?
            .hash(&mut h),
    }
    Some(h.finish())
}

/// The hash for a TCP connection: only `useSourceIp` applies (no request to read).
pub fn source_ip_hash(policy: &EffectivePolicy, src: Ipv4Addr) -> Option<u64> {
    match &policy.load_balancer {
        LoadBalancer::Hash(HashKey::SourceIp) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            src.hash(&mut h);
            Some(h.finish())
        }
        _ => None,
    }
}

/// Builds the backends and routers for a snapshot; carries backend state over from the
/// previous table's backends.
pub struct Compiler<'a> {
    snap: &'a Snapshot,
    prev: &'a HashMap<BackendKey, Arc<Backend>>,
    pub backends: HashMap<BackendKey, Arc<Backend>>,
    /// VirtualServices that apply in the mesh, oldest first.
    mesh_vs: Vec<&'a Arc<VirtualService>>,
    /// Service FQDN -> Service.
    by_fqdn: HashMap<String, &'a Service>,
}

pub type BackendKey = (ObjectRef, u16, Option<String>);

impl<'a> Compiler<'a> {
    pub fn new(snap: &'a Snapshot, prev: &'a HashMap<BackendKey, Arc<Backend>>) -> Compiler<'a> {
        let mut mesh_vs: Vec<_> = snap
            .virtual_services
            .values()
            .filter(|v| v.applies_to_mesh())
            .collect();
        mesh_vs.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        let by_fqdn = snap
            .services
            .values()
            .map(|s| (service_fqdn(&s.id), s))
            .collect();
        Compiler {
            snap,
            prev,
            backends: HashMap::new(),
            mesh_vs,
            by_fqdn,
        }
    }

    /// The router of a Service port.
    pub fn router(&mut self, svc: &Service, port: u16) -> HttpRouter {
        let fqdn = service_fqdn(&svc.id);
        let default = Arc::new(RouteTarget {
            backend: self.backend(svc, Some(port), None, &fqdn),
            weight: 100,
            headers: r::Headers::default(),
        });
        let mut virtual_services = Vec::new();
        for vs in self.mesh_vs.clone() {
            if !vs.hosts.iter().any(|h| h.matches(&fqdn, svc.cluster_ip)) {
                continue;
            }
            let id = Arc::new(vs.id.clone());
            let rules = vs
                .http
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    let targets: Vec<Arc<RouteTarget>> = match &rule.action {
                        r::HttpAction::Route(dests) => dests
                            .iter()
                            .map(|d| {
                                Arc::new(RouteTarget {
                                    backend: self.destination(&d.destination, svc, port),
                                    weight: d.weight,
                                    headers: d.headers.clone(),
                                })
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let total_weight = targets.iter().map(|t| t.weight).sum();
                    let mirrors = rule
                        .mirrors
                        .iter()
                        .map(|m| {
                            let target = Arc::new(RouteTarget {
                                backend: self.destination(&m.destination, svc, port),
                                weight: 100,
                                headers: r::Headers::default(),
                            });
                            (target, m.percent)
                        })
                        .collect();
                    Arc::new(CompiledRule {
                        index,
                        rule: rule.clone(),
                        targets,
                        total_weight,
                        mirrors,
                    })
                })
                .collect();
            virtual_services.push(CompiledVs {
                id,
                export_to: vs.export_to.clone(),
                rules,
            });
        }
        HttpRouter {
            virtual_services,
            default,
        }
    }

    /// A TCP Service port's own endpoints with its DestinationRule's policy (load balancer,
    /// connection pool, outlier detection): where connections go when no `tcp[]` route
    /// applies.
    pub fn tcp_backend(&mut self, svc: &Service, port: u16) -> Option<Arc<Backend>> {
        let fqdn = service_fqdn(&svc.id);
        self.backend(svc, Some(port), None, &fqdn).ok()
    }

    /// The `tcp[]` routes of a TCP Service port, if a VirtualService for its host has any.
    pub fn tcp_router(&mut self, svc: &Service, port: u16) -> Option<TcpRouter> {
        let fqdn = service_fqdn(&svc.id);
        let vs = self.mesh_vs.clone().into_iter().find(|vs| {
            !vs.tcp.is_empty() && vs.hosts.iter().any(|h| h.matches(&fqdn, svc.cluster_ip))
        })?;
        let rules = vs
            .tcp
            .iter()
            .map(|rule| {
                let targets: Vec<Arc<RouteTarget>> = rule
                    .route
                    .iter()
                    .map(|d| {
                        Arc::new(RouteTarget {
                            backend: self.destination(&d.destination, svc, port),
                            weight: d.weight,
                            headers: r::Headers::default(),
                        })
                    })
                    .collect();
                let total_weight = targets.iter().map(|t| t.weight).sum();
                TcpRule {
                    matches: rule.matches.clone(),
                    targets,
                    total_weight,
                }
            })
            .collect();
        Some(TcpRouter {
            virtual_service: Arc::new(vs.id.clone()),
            export_to: vs.export_to.clone(),
            rules,
        })
    }

    fn destination(
        &mut self,
        d: &r::Destination,
        called: &Service,
        called_port: u16,
    ) -> Result<Arc<Backend>, Unroutable> {
        let svc = match &d.host {
            Host::Fqdn(f) => self.by_fqdn.get(f).copied(),
            Host::Ip(ip) => self
                .snap
                .services
                .values()
                .find(|s| s.cluster_ip == Some(*ip)),
            Host::Wildcard(_) => None,
        }
        .ok_or_else(|| Unroutable::UnknownHost(d.host_written.clone()))?;
        // No port named: the called port if this is the called Service, else its only port.
        let port = d.port.or_else(|| {
            if svc.id == called.id {
                Some(called_port)
            } else if svc.ports.len() == 1 {
                svc.ports.first().map(|p| p.port)
            } else {
                svc.ports
                    .iter()
                    .find(|p| p.port == called_port)
                    .map(|p| p.port)
            }
        });
        let fqdn = service_fqdn(&svc.id);
        self.backend(svc, port, d.subset.as_deref(), &fqdn)
            .map_err(|e| match e {
                Unroutable::UnknownHost(_) => Unroutable::UnknownHost(d.host_written.clone()),
                other => other,
            })
    }

    /// The DestinationRule for a host: the oldest whose host matches (exact before
    /// wildcard), visible from the Service's namespace.
    pub fn destination_rule(&self, svc: &Service, fqdn: &str) -> Option<&'a Arc<DestinationRule>> {
        let mut rules: Vec<_> = self
            .snap
            .destination_rules
            .values()
            .filter(|d| d.host.matches(fqdn, svc.cluster_ip))
            .filter(|d| d.export_to.visible(&d.id.namespace, &svc.id.namespace))
            .collect();
        rules.sort_by_key(|d| (matches!(d.host, Host::Wildcard(_)), &d.created, &d.id));
        rules.into_iter().next()
    }

    fn backend(
        &mut self,
        svc: &Service,
        port: Option<u16>,
        subset: Option<&str>,
        fqdn: &str,
    ) -> Result<Arc<Backend>, Unroutable> {
        let unknown_port = || Unroutable::UnknownPort {
            host: fqdn.to_owned(),
            port,
        };
        let port = port.ok_or_else(unknown_port)?;
        let idx = svc
            .ports
            .iter()
            .position(|p| p.port == port)
            .ok_or_else(unknown_port)?;
        let key: BackendKey = (svc.id.clone(), port, subset.map(str::to_owned));
        if let Some(b) = self.backends.get(&key) {
            return Ok(b.clone());
        }
        let dr = self.destination_rule(svc, fqdn);
        let subset_def =
            match subset {
                None => None,
                Some(name) => Some(dr.and_then(|d| d.subset(name)).ok_or_else(|| {
                    Unroutable::UnknownSubset {
                        host: fqdn.to_owned(),
                        subset: name.to_owned(),
                    }
                })?),
            };
        let policy = dr.map(|d| d.policy(subset_def, port)).unwrap_or_default();
        let prev = self.prev.get(&key);
        let state = prev.map(|b| b.state.clone()).unwrap_or_default();
        // Endpoint health carries over by address; endpoints gone are forgotten.
        let kept: HashMap<SocketAddrV4, &Arc<EndpointState>> = prev
            .map(|b| b.endpoints.iter().map(|(e, s)| (e.addr, s)).collect())
            .unwrap_or_default();
        let prev_endpoint =
            |addr: SocketAddrV4| kept.get(&addr).map(|s| Arc::clone(s)).unwrap_or_default();
        let pods = &self.snap.pods;
        let endpoints = svc
            .endpoints
            .get(idx)
            .into_iter()
            .flatten()
            .filter(|ep| {
                subset_def.is_none_or(|s| {
                    let pod = ep.pod.as_ref().and_then(|p| pods.get(p));
                    pod.is_some_and(|p| p.has_labels(&s.labels))
                })
            })
            .map(|ep| (ep.clone(), prev_endpoint(ep.addr)))
            .collect();
        let backend = Arc::new(Backend {
            service: svc.id.clone(),
            meta: Arc::new(ServiceMeta::of(svc)),
            port,
            protocol: super::protocol::AppProtocol::of(&svc.ports[idx]),
            subset: subset.map(str::to_owned),
            endpoints,
            policy,
            state,
        });
        self.backends.insert(key, backend.clone());
        Ok(backend)
    }
}

pub mod services_view;
pub mod view;

#[cfg(test)]
mod tests;
