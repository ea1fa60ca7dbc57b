//! The data path. What flows through it: captured outbound connections (`outbound`).
//!
//! The data path reads configuration only through [`RouteTable`], an immutable table rebuilt
//! by the control plane for each config snapshot and published with `ArcSwap`: a connection
//! loads it without taking a lock.

pub mod connections;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod protocol;
pub mod relay;
pub mod routing;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::model::MtlsMode;
use crate::config::model::{ObjectRef, Snapshot};
use crate::identity::Identity;
use crate::telemetry::access_log::{AccessLog, AccessLogConfig, TcpRecord};
use crate::telemetry::metrics::{Metrics, ServiceMeta, TcpLabels, WorkloadMeta};

/// Counters of one service, kept across config changes.
#[derive(Debug, Default, Serialize)]
pub struct ServiceStats {
    pub connections: AtomicU64,
    pub connect_errors: AtomicU64,
    pub no_endpoints: AtomicU64,
}

/// One Service port as the data path sees it.
#[derive(Debug)]
pub struct ServiceRoute {
    pub service: ObjectRef,
    /// How the port's traffic is proxied: per request (HTTP) or per connection.
    pub protocol: protocol::AppProtocol,
    pub meta: Arc<ServiceMeta>,
    pub stats: Arc<ServiceStats>,
    /// HTTP ports: the VirtualService rules and DestinationRule policies in force.
    pub http: Option<routing::HttpRouter>,
    /// TCP ports: a VirtualService's `tcp[]` routes, if any.
    pub tcp: Option<routing::TcpRouter>,
    /// TCP ports: the Service's endpoints with its DestinationRule's policy, for connections
    /// no `tcp[]` route takes.
    pub tcp_backend: Option<Arc<routing::Backend>>,
}

/// Where a connection to an original destination goes.
#[derive(Debug)]
pub enum Target<'a> {
    /// A Service ClusterIP:port, balanced over its endpoints.
    Service(&'a ServiceRoute),
    /// A pod IP or anything else: connected to unchanged.
    Passthrough,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    pub generation: u64,
    services: HashMap<SocketAddrV4, Arc<ServiceRoute>>,
    pods: HashMap<Ipv4Addr, Arc<WorkloadMeta>>,
    /// Meshed pods (reached through their agent over HBONE) and the identity each must prove.
    /// Empty when mutual TLS is off.
    identities: HashMap<Ipv4Addr, Arc<Identity>>,
    /// Endpoint (pod IP, target port) -> the Service ports that send to it, for the
    /// destination side, which does not see the ClusterIP the client used.
    endpoint_services: HashMap<SocketAddrV4, Vec<EndpointService>>,
    /// The snapshot the table was built from, for inbound policy (PeerAuthentication).
    snapshot: Arc<Snapshot>,
    /// Every backend (Service port and subset) the HTTP routers send to.
    pub backends: HashMap<routing::BackendKey, Arc<routing::Backend>>,
}

impl RouteTable {
    /// Builds the table for `snap`, carrying service counters over from `prev`. With a
    /// `trust_domain` (mutual TLS on), meshed pods are reached over HBONE.
    pub fn build(
        snap: &Arc<Snapshot>,
        prev: &RouteTable,
        trust_domain: Option<&str>,
    ) -> RouteTable {
        let prev_stats: HashMap<&ObjectRef, &Arc<ServiceStats>> = prev
            .services
            .values()
            .map(|r| (&r.service, &r.stats))
            .collect();
        let mut services = HashMap::new();
        let mut compiler = routing::Compiler::new(snap, &prev.backends);
        let mut endpoint_services: HashMap<SocketAddrV4, Vec<EndpointService>> = HashMap::new();
        for svc in snap.services.values() {
            let Some(ip) = svc.cluster_ip else { continue };
            let meta = Arc::new(ServiceMeta::of(svc));
            let stats = prev_stats
                .get(&svc.id)
                .map(|s| Arc::clone(s))
                .unwrap_or_default();
            for (i, port) in svc.ports.iter().enumerate() {
                let endpoints = svc.endpoints.get(i).map(Vec::as_slice).unwrap_or_default();
                let protocol = protocol::AppProtocol::of(port);
                for ep in endpoints {
                    endpoint_services
                        .entry(ep.addr)
                        .or_default()
                        .push(EndpointService {
                            meta: meta.clone(),
                            address: SocketAddrV4::new(ip, port.port),
                            protocol,
                        });
                }
                // Undeclared ports get both: each connection's first bytes choose.
                let http = (protocol != protocol::AppProtocol::Tcp)
                    .then(|| compiler.router(svc, port.port));
                let (tcp, tcp_backend) = if protocol.is_http() {
                    (None, None)
                } else {
                    (
                        compiler.tcp_router(svc, port.port),
                        compiler.tcp_backend(svc, port.port),
                    )
                };
                services.insert(
                    SocketAddrV4::new(ip, port.port),
                    Arc::new(ServiceRoute {
                        service: svc.id.clone(),
                        protocol,
                        http,
                        tcp,
                        tcp_backend,
                        meta: meta.clone(),
                        stats: stats.clone(),
                    }),
                );
            }
        }
        let pods = snap
            .pods
            .values()
            .filter(|p| !p.host_network)
            .filter_map(|p| p.ip.map(|ip| (ip, Arc::new(WorkloadMeta::of(p)))))
            .collect();
        let identities = match trust_domain {
            None => HashMap::new(),
            Some(td) => snap
                .pods
                .values()
                .filter(|p| snap.is_meshed(p))
                .filter_map(|p| {
                    let id = Identity {
                        trust_domain: td.to_string(),
                        namespace: p.id.namespace.clone(),
                        service_account: p.service_account.clone(),
                    };
                    p.ip.map(|ip| (ip, Arc::new(id)))
                })
                .collect(),
        };
        RouteTable {
            generation: snap.generation,
            services,
            pods,
            identities,
            endpoint_services,
            snapshot: snap.clone(),
            backends: compiler.backends,
        }
    }

    /// The HTTP routes of every Service port, as `pod` sees them when given.
    pub fn routes_view(
        &self,
        pod: Option<&crate::config::model::Pod>,
    ) -> Vec<routing::view::PortRoutes> {
        let mut ports: Vec<_> = self
            .services
            .iter()
            .filter_map(|(addr, r)| r.http.as_ref().map(|h| (addr, r, h)))
            .collect();
        ports.sort_by(|a, b| (&a.1.service, a.0.port()).cmp(&(&b.1.service, b.0.port())));
        ports
            .into_iter()
            .map(|(addr, r, h)| {
                let protocol = r.protocol.name();
                routing::view::port_routes(
                    r.service.to_string(),
                    addr.to_string(),
                    protocol,
                    h,
                    pod,
                )
            })
            .collect()
    }

    /// A pod by name, for `/routes?pod=`.
    pub fn pod_by_name(&self, id: &ObjectRef) -> Option<&crate::config::model::Pod> {
        self.snapshot.pods.get(id)
    }

    /// A pod by IP, for matching `sourceLabels` and `sourceNamespace`.
    pub fn pod(&self, ip: &Ipv4Addr) -> Option<&crate::config::model::Pod> {
        let id = self.snapshot.by_pod_ip.get(ip)?;
        self.snapshot.pods.get(id)
    }

    pub fn target(&self, dst: SocketAddrV4) -> Target<'_> {
        if let Some(route) = self.services.get(&dst) {
            return Target::Service(route);
        }
        Target::Passthrough
    }

    /// The workload with this pod IP, for telemetry.
    pub fn workload(&self, ip: &Ipv4Addr) -> Option<&Arc<WorkloadMeta>> {
        self.pods.get(ip)
    }

    /// The identity a meshed pod must prove; None if the pod is outside the mesh (or mutual
    /// TLS is off), in which case it is reached directly.
    pub fn identity(&self, ip: &Ipv4Addr) -> Option<&Arc<Identity>> {
        self.identities.get(ip)
    }

    /// The Service a connection to this endpoint was for, if exactly one Service sends to
    /// it on that port (the destination side does not see the ClusterIP the client used).
    pub fn service_of_endpoint(&self, ep: &SocketAddrV4) -> Option<&Arc<ServiceMeta>> {
        self.endpoint_service(ep).map(|s| &s.meta)
    }

    /// The one Service port sending to this endpoint, if there is exactly one Service (its
    /// first port targeting the endpoint, when several do).
    pub fn endpoint_service(&self, ep: &SocketAddrV4) -> Option<&EndpointService> {
        let all = self.endpoint_services.get(ep)?;
        let first = all.first()?;
        all.iter().all(|s| s.meta == first.meta).then_some(first)
    }

    /// The protocol the Services sending to this endpoint declare for its port: whether the
    /// destination side parses HTTP (see [`protocol::AppProtocol::shared_with`]). Undeclared
    /// or unknown ports, and ports one Service declares HTTP and another not, are relayed as
    /// bytes.
    pub fn endpoint_protocol(&self, ep: &SocketAddrV4) -> protocol::AppProtocol {
        self.endpoint_services
            .get(ep)
            .and_then(|all| {
                let first = all.first()?.protocol;
                Some(all.iter().fold(first, |p, s| p.shared_with(s.protocol)))
            })
            .unwrap_or(protocol::AppProtocol::Tcp)
    }

    /// Of the Service ports sending to this endpoint, the one an HTTP request's authority
    /// names: its ClusterIP, or the Service's short, `name.namespace` or cluster-local name
    /// (with or without the port).
    pub fn endpoint_service_by_authority(
        &self,
        ep: &SocketAddrV4,
        authority: &str,
    ) -> Option<&EndpointService> {
        let all = self.endpoint_services.get(ep)?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse::<u16>().ok()),
            _ => (authority, None),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let port_ok = |s: &EndpointService| port.is_none_or(|p| p == s.address.port());
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return all.iter().find(|s| *s.address.ip() == ip && port_ok(s));
        }
        all.iter()
            .find(|s| names_service(&host, &s.meta, true) && port_ok(s))
    }

    /// The tracing configuration in force (MeshConfig), if spans are exported.
    pub fn tracing(&self) -> Option<&Arc<crate::telemetry::trace::TracingConfig>> {
        self.snapshot.mesh.tracing.as_ref()
    }

    /// An address for `host:port` outside the data path (the tracing collector): an IP as
    /// is, else a Service named `name.namespace[.svc[.cluster.local]]`, reached at its first
    /// ready endpoint for that port (the agent runs outside the cluster's DNS and kube-proxy).
    pub fn resolve(&self, host: &str, port: u16) -> Option<SocketAddrV4> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Some(SocketAddrV4::new(ip, port));
        }
        self.snapshot.services.values().find_map(|svc| {
            let meta = ServiceMeta::of(svc);
            if !names_service(&host, &meta, false) {
                return None;
            }
            let i = svc.ports.iter().position(|p| p.port == port)?;
            svc.endpoints.get(i)?.first().map(|e| e.addr)
        })
    }

    /// The PeerAuthentication mode for a plaintext connection to `port` of the pod with this
    /// IP. A pod the config does not know is STRICT: fail closed.
    pub fn inbound_mode(&self, pod_ip: &Ipv4Addr, port: u16) -> MtlsMode {
        match self
            .snapshot
            .by_pod_ip
            .get(pod_ip)
            .and_then(|id| self.snapshot.pods.get(id))
        {
            Some(pod) => self.snapshot.inbound_mode(pod, port),
            None => MtlsMode::Strict,
        }
    }

    /// Whether any AuthorizationPolicy exists (without one there is nothing to check).
    pub fn has_authorization(&self) -> bool {
        self.snapshot.has_authorization()
    }

    /// Whether AuthorizationPolicy lets `conn` reach the pod with this IP at `stage`. A pod
    /// the config does not know is refused: fail closed.
    pub fn authorize(
        &self,
        pod_ip: &Ipv4Addr,
        conn: &crate::config::authz::Connection<'_>,
        stage: crate::config::authz::Stage<'_>,
    ) -> Result<(), crate::config::authz::Denied> {
        match self
            .snapshot
            .by_pod_ip
            .get(pod_ip)
            .and_then(|id| self.snapshot.pods.get(id))
        {
            Some(pod) => self.snapshot.authorize(pod, conn, stage),
            None => Err(crate::config::authz::Denied::UnknownPod(*pod_ip)),
        }
    }

    /// The access log in force (MeshConfig), if any.
    pub fn access_log(&self) -> Option<&Arc<AccessLogConfig>> {
        self.snapshot.mesh.access_log.as_ref()
    }

    /// Per-service counters, for the admin API.
    pub fn service_stats(&self) -> Vec<(ObjectRef, Arc<ServiceStats>)> {
        let mut out: Vec<_> = self
            .services
            .values()
            .map(|r| (r.service.clone(), r.stats.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

/// Whether `host` (lower case, no trailing dot) is one of the Service's names: `name.ns`,
/// `name.ns.svc`, its FQDN, and with `short` the bare `name` (which only means this Service
/// from inside its namespace).
fn names_service(host: &str, m: &ServiceMeta, short: bool) -> bool {
    (short && host == m.name)
        || host == m.fqdn
        || host
            .strip_prefix(m.name.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_prefix(m.namespace.as_str()))
            .is_some_and(|r| r.is_empty() || r == ".svc")
}

/// A Service port that sends to an endpoint.
#[derive(Debug)]
pub struct EndpointService {
    pub meta: Arc<ServiceMeta>,
    /// The ClusterIP and Service port.
    pub address: SocketAddrV4,
    pub protocol: protocol::AppProtocol,
}

/// Counters of the whole agent.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub connect_errors: AtomicU64,
    pub no_orig_dst: AtomicU64,
    /// Connections refused because `--max-connections` were already open.
    pub over_limit: AtomicU64,
    /// Bytes from clients to upstreams.
    pub bytes_sent: AtomicU64,
    /// Bytes from upstreams to clients.
    pub bytes_received: AtomicU64,
}

/// Counters of one enrolled workload.
#[derive(Debug, Default, Serialize)]
pub struct WorkloadStats {
    pub outbound_connections: AtomicU64,
    pub outbound_active: AtomicU64,
    pub outbound_errors: AtomicU64,
    /// Of the outbound connections, those carried over HBONE.
    pub outbound_hbone: AtomicU64,
    pub inbound_connections: AtomicU64,
    pub inbound_active: AtomicU64,
}

/// Everything the data path depends on, passed explicitly.
#[derive(Clone)]
pub struct ProxyInputs {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub stats: Arc<ProxyStats>,
    pub connect_timeout: Duration,
    /// Bytes buffered per direction of a proxied connection.
    pub buffer_size: usize,
    pub metrics: Arc<Metrics>,
    /// Proxied connections the agent keeps open at most; each holds two buffers, so this
    /// bounds the data path's memory.
    pub max_connections: u64,
    /// Inbound (15008) counters.
    pub inbound: Arc<inbound::InboundStats>,
    /// Where finished connections go when MeshConfig turns access logs on.
    pub access_log: AccessLog,
    /// The connections open now, for `/connections`.
    pub connections: Arc<connections::ConnectionTable>,
    /// Where sampled requests' spans go when tracing is on.
    pub spans: crate::telemetry::trace::Spans,
    /// The node's own IPv4 addresses: plaintext from them (kubelet probes) passes STRICT.
    pub node_addresses: Arc<std::collections::BTreeSet<Ipv4Addr>>,
}

/// A connection's access log entry in the making; only exists while access logs are on, so
/// the data path pays nothing for them otherwise.
pub struct LogEntry {
    config: Arc<AccessLogConfig>,
    start: SystemTime,
    started: Instant,
    downstream_remote: SocketAddr,
    downstream_local: SocketAddr,
}

/// How a connection ended, for its access log entry.
pub struct Ended<'a> {
    pub labels: &'a TcpLabels,
    pub received: u64,
    pub sent: u64,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_local: Option<SocketAddr>,
    pub failure: Option<String>,
    /// An HTTP request's details.
    pub http: Option<Box<crate::telemetry::access_log::HttpInfo>>,
}

impl LogEntry {
    /// Starts an entry if the configuration in force logs connections.
    pub fn begin(
        routes: &RouteTable,
        downstream_remote: SocketAddrV4,
        downstream_local: SocketAddrV4,
    ) -> Option<LogEntry> {
        routes.access_log().map(|config| LogEntry {
            config: config.clone(),
            start: SystemTime::now(),
            started: Instant::now(),
            downstream_remote: downstream_remote.into(),
            downstream_local: downstream_local.into(),
        })
    }

    pub fn finish(self, log: &AccessLog, end: Ended<'_>) {
        log.log(TcpRecord {
            config: self.config,
            start: self.start,
            duration: self.started.elapsed(),
            labels: end.labels.clone(),
            bytes_received: end.received,
            bytes_sent: end.sent,
            downstream_remote: self.downstream_remote,
            downstream_local: self.downstream_local,
            upstream_host: end.upstream_host,
            upstream_local: end.upstream_local,
            failure_reason: end.failure,
            connection_id: log.next_id(),
            http: end.http,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    use crate::config::model::{Endpoint, Service, ServicePort, TargetPort};

    fn id(name: &str) -> ObjectRef {
        ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn snapshot(endpoints: usize) -> Snapshot {
        let eps = (0..endpoints)
            .map(|i| Endpoint {
                pod: Some(id(&format!("web-{i}"))),
                addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10 + i as u8), 8080),
                node: Some("node-1".into()),
            })
            .collect();
        let mut snap = Snapshot {
            generation: 7,
            ..Default::default()
        };
        snap.services.insert(
            id("web"),
            Service {
                id: id("web"),
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
                selector: Default::default(),
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    app_protocol: None,
                }],
                endpoints: vec![eps],
            },
        );
        snap
    }

    /// `snapshot(n)` with its port declared TCP.
    fn tcp_snapshot(endpoints: usize) -> Snapshot {
        let mut snap = snapshot(endpoints);
        for svc in snap.services.values_mut() {
            svc.ports[0].name = Some("tcp-web".into());
        }
        snap
    }

    fn tcp_pick(route: &ServiceRoute) -> Option<SocketAddrV4> {
        let backend = route.tcp_backend.as_ref().expect("a TCP port's backend");
        backend.pick(None, &[]).map(|p| p.endpoint.addr)
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let table = RouteTable::build(&Arc::new(tcp_snapshot(3)), &RouteTable::default(), None);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        let Target::Service(route) = table.target(dst) else {
            panic!("ClusterIP:port must route to the service");
        };
        let picks: Vec<u8> = (0..6)
            .map(|_| tcp_pick(route).expect("endpoint").ip().octets()[3])
            .collect();
        assert_eq!(picks, [10, 11, 12, 10, 11, 12]);
        assert_eq!(table.generation, 7);
    }

    #[test]
    fn service_without_endpoints_picks_none() {
        let table = RouteTable::build(&Arc::new(tcp_snapshot(0)), &RouteTable::default(), None);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        let Target::Service(route) = table.target(dst) else {
            panic!("still a service");
        };
        assert!(tcp_pick(route).is_none());
    }

    #[test]
    fn other_ports_and_addresses_pass_through() {
        let table = RouteTable::build(&Arc::new(snapshot(1)), &RouteTable::default(), None);
        let other_port = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 81);
        assert!(matches!(table.target(other_port), Target::Passthrough));
        let outside = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
        assert!(matches!(table.target(outside), Target::Passthrough));
    }

    #[test]
    fn service_counters_survive_a_rebuild() {
        let first = RouteTable::build(&Arc::new(snapshot(1)), &RouteTable::default(), None);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        if let Target::Service(r) = first.target(dst) {
            r.stats.connections.fetch_add(5, Ordering::Relaxed);
        }
        let second = RouteTable::build(&Arc::new(snapshot(2)), &first, None);
        let stats = second.service_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].1.connections.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn an_endpoint_names_its_service_unless_two_share_it() {
        let ep = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080);
        let table = RouteTable::build(&Arc::new(snapshot(1)), &RouteTable::default(), None);
        let meta = table.service_of_endpoint(&ep).expect("one service");
        assert_eq!(meta.fqdn, "web.default.svc.cluster.local");

        let mut snap = snapshot(1);
        let mut other = snap.services[&id("web")].clone();
        // The canary's port declares gRPC: the port is still parsed as HTTP inbound.
        other.ports[0].name = Some("grpc".into());
        other.id = id("web-canary");
        other.cluster_ip = Some(Ipv4Addr::new(10, 96, 0, 11));
        snap.services.insert(other.id.clone(), other);
        let table = RouteTable::build(&Arc::new(snap.clone()), &RouteTable::default(), None);
        assert!(table.service_of_endpoint(&ep).is_none(), "ambiguous");
        assert_eq!(table.endpoint_protocol(&ep), protocol::AppProtocol::Http);
        // A request's authority says which Service it was for.
        let by = |a: &str| {
            table
                .endpoint_service_by_authority(&ep, a)
                .map(|s| (s.meta.name.as_str(), s.protocol))
        };
        let canary = Some(("web-canary", protocol::AppProtocol::Grpc));
        let web = Some(("web", protocol::AppProtocol::Http));
        for a in [
            "web-canary",
            "web-canary:80",
            "web-canary.default",
            "web-canary.default.svc",
            "WEB-CANARY.default.svc.cluster.local.:80",
            "10.96.0.11",
            "10.96.0.11:80",
        ] {
            assert_eq!(by(a), canary, "{a}");
        }
        assert_eq!(by("web"), web);
        assert_eq!(by("10.96.0.10:80"), web);
        for a in [
            "web:81",
            "10.96.0.11:81",
            "web.other",
            "webx",
            "web.default.svc.x",
            "",
        ] {
            assert_eq!(by(a), None, "{a}");
        }
        // A port one Service declares TCP is relayed as bytes.
        let mut tcp = snap.services[&id("web")].clone();
        tcp.ports[0].name = Some("tcp".into());
        tcp.id = id("web-tcp");
        tcp.cluster_ip = Some(Ipv4Addr::new(10, 96, 0, 12));
        snap.services.insert(tcp.id.clone(), tcp);
        let table = RouteTable::build(&Arc::new(snap), &RouteTable::default(), None);
        assert_eq!(table.endpoint_protocol(&ep), protocol::AppProtocol::Tcp);
        let unknown = SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 9), 8080);
        assert_eq!(
            table.endpoint_protocol(&unknown),
            protocol::AppProtocol::Tcp
        );
    }

    #[test]
    fn meshed_pods_get_an_identity_only_with_mutual_tls() {
        use crate::config::model::{Namespace, Pod};
        let mut snap = snapshot(0);
        let labels = |v: &str| {
            [(
                crate::config::model::ENROLL_LABEL.to_string(),
                v.to_string(),
            )]
            .into()
        };
        snap.namespaces.insert(
            "default".into(),
            Namespace {
                name: "default".into(),
                labels: labels("true"),
            },
        );
        snap.namespaces.insert(
            "plain".into(),
            Namespace {
                name: "plain".into(),
                labels: Default::default(),
            },
        );
        let pod = |ns: &str, name: &str, ip: u8, opt_out: bool| Pod {
            id: ObjectRef {
                namespace: ns.into(),
                name: name.into(),
            },
            labels: if opt_out {
                labels("false")
            } else {
                Default::default()
            },
            node: Some("node-2".into()),
            ip: Some(Ipv4Addr::new(10, 244, 2, ip)),
            uid: None,
            host_network: false,
            ready: true,
            service_account: "web".into(),
            netns: None,
            ports: vec![],
        };
        for p in [
            pod("default", "a", 1, false),
            pod("plain", "b", 2, false),
            pod("default", "c", 3, true),
        ] {
            snap.pods.insert(p.id.clone(), p);
        }
        let snap = Arc::new(snap);
        let table = RouteTable::build(&snap, &RouteTable::default(), Some("example.org"));
        let a = table
            .identity(&Ipv4Addr::new(10, 244, 2, 1))
            .expect("meshed pod");
        assert_eq!(a.to_string(), "spiffe://example.org/ns/default/sa/web");
        assert!(
            table.identity(&Ipv4Addr::new(10, 244, 2, 2)).is_none(),
            "namespace not enrolled"
        );
        assert!(
            table.identity(&Ipv4Addr::new(10, 244, 2, 3)).is_none(),
            "pod opted out"
        );
        let plain = RouteTable::build(&snap, &RouteTable::default(), None);
        assert!(
            plain.identity(&Ipv4Addr::new(10, 244, 2, 1)).is_none(),
            "mTLS off"
        );
    }
}
