//! Admin API: readiness, config dump, workloads and counters, served over HTTP/1.1 on a unix
//! socket (for the CLI) and on 127.0.0.1:15000. Runs on the control-plane runtime.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::capture::enroll::WorkloadView;
use crate::capture::{EbpfStats, MapReader};
use crate::config::kube::ResourceStatus;
use crate::config::model::Snapshot;
use crate::proxy::{ProxyStats, RouteTable, ServiceStats};

/// What the control loop publishes for the admin API after every change.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ControlView {
    pub node: String,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    /// `manifests` or `kubernetes`.
    pub config_source: String,
    /// The first full config is in force.
    pub config_synced: bool,
    /// Kubernetes mode: sync state per watched kind.
    pub resources: Vec<ResourceStatus>,
    pub config_generation: u64,
    pub config_error: Option<String>,
    pub config_errors_total: u64,
    pub workloads: Vec<WorkloadView>,
}

type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The agent's log filter, changeable at runtime through `POST /logging?level=FILTER`.
pub struct LogControl {
    handle: LogHandle,
    /// The filter text in force (EnvFilter does not print back what it parsed).
    current: std::sync::Mutex<String>,
}

impl LogControl {
    pub fn new(handle: LogHandle, current: String) -> LogControl {
        LogControl {
            handle,
            current: std::sync::Mutex::new(current),
        }
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Replaces the filter; an invalid one is refused and the old one stays.
    pub fn set(&self, text: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::try_new(text)
            .map_err(|e| format!("invalid log filter {text:?}: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = text.to_string();
        Ok(())
    }
}

/// `/routes[?pod=NAMESPACE/NAME]`: the HTTP routes, as that pod sees them when named.
fn routes(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let table = state.routes.load();
    let pod = query
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("pod=")))
        .filter(|p| !p.is_empty());
    let Some(pod) = pod else {
        return json(StatusCode::OK, &table.routes_view(None));
    };
    let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
    let id = crate::config::model::ObjectRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    match table.pod_by_name(&id) {
        Some(p) => json(StatusCode::OK, &table.routes_view(Some(p))),
        None => text(
            StatusCode::NOT_FOUND,
            format!("no pod {id} in the configuration\n"),
        ),
    }
}

/// `POST /fast_path?enabled=true|false`: switches the eBPF fast path at runtime.
fn set_fast_path(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let value = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("enabled=")));
    let on = match value {
        Some("true" | "on" | "1") => true,
        Some("false" | "off" | "0") => false,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "POST /fast_path?enabled=true|false (got {})\n",
                    value.map_or("no enabled=".to_string(), |v| format!("enabled={v:?}"))
                ),
            );
        }
    };
    match state.fast_path.set(on) {
        Ok(s) => json(StatusCode::OK, &s),
        Err(e) => text(StatusCode::CONFLICT, format!("{e}\n")),
    }
}

/// `level=...` from a query string, percent-decoded.
fn query_level(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("level="))
        .map(|v| {
            let bytes = v.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'%' if i + 2 < bytes.len() => {
                        let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                            Some(b) => {
                                out.push(b);
                                i += 3;
                                continue;
                            }
                            None => out.push(b'%'),
                        }
                    }
                    b'+' => out.push(b' '),
                    b => out.push(b),
                }
                i += 1;
            }
            String::from_utf8_lossy(&out).into_owned()
        })
}

#[derive(Clone)]
pub struct AdminState {
    pub view: watch::Receiver<Arc<ControlView>>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub routes: Arc<arc_swap::ArcSwap<RouteTable>>,
    pub stats: Arc<ProxyStats>,
    pub maps: Arc<MapReader>,
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
    pub logging: Arc<LogControl>,
    pub inbound: Arc<crate::proxy::inbound::InboundStats>,
    /// Access log writer counters.
    pub access_log: Arc<crate::telemetry::access_log::AccessLogStats>,
    /// Span exporter counters.
    pub spans: Arc<crate::telemetry::trace::SpanStats>,
    /// The connections open now.
    pub connections: Arc<crate::proxy::connections::ConnectionTable>,
    /// Workload certificates, with mutual TLS on.
    pub certs: Option<crate::identity::CertManager>,
    /// The eBPF fast path's switch and state.
    pub fast_path: Arc<crate::capture::fast_path::FastPath>,
}

/// Workload certificates (empty with mutual TLS off).
fn certs(state: &AdminState) -> Vec<crate::identity::CertView> {
    state.certs.as_ref().map(|c| c.view()).unwrap_or_default()
}

#[derive(Serialize)]
struct ServiceCounters<'a> {
    service: String,
    #[serde(flatten)]
    counters: &'a ServiceStats,
}

#[derive(Serialize)]
struct StatsDoc<'a> {
    node: &'a str,
    /// Config generation the data path is routing with.
    routes_generation: u64,
    proxy: &'a ProxyStats,
    /// The HBONE side (15008): TLS handshakes and CONNECT streams.
    inbound: &'a crate::proxy::inbound::InboundStats,
    access_log: &'a crate::telemetry::access_log::AccessLogStats,
    spans: &'a crate::telemetry::trace::SpanStats,
    ebpf: &'a EbpfStats,
    services: Vec<ServiceCounters<'a>>,
}

#[derive(Serialize)]
struct StatusDoc<'a> {
    version: &'static str,
    node: &'a str,
    ready: bool,
    not_ready_reason: Option<&'a str>,
    config_source: &'a str,
    config_synced: bool,
    /// Kubernetes mode: per watched kind, synced or not, objects, last error and when.
    resources: &'a [ResourceStatus],
    config_generation: u64,
    config_error: Option<&'a str>,
    config_errors_total: u64,
    enrolled_pods: usize,
    failed_pods: usize,
    /// Meshed pods whose network namespace is not known yet (not failures).
    pending_pods: usize,
    active_connections: u64,
    /// Connections listed by `/connections` now, per direction.
    open_outbound: usize,
    open_inbound: usize,
    /// Mutual TLS between agents (HBONE): on when a CA is configured.
    mtls: bool,
    /// Workload certificates the agent holds or is fetching.
    certificates: usize,
    /// Certificates not in the `valid` state (pending, renewing after a failure, expired).
    certificates_unhealthy: usize,
    ebpf: &'a EbpfStats,
    /// The eBPF fast path for app-to-agent hops: on or off, and why.
    fast_path: crate::capture::fast_path::FastPathState,
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    node: &'a str,
    generation: u64,
    config_error: Option<&'a str>,
    /// Kubernetes mode: per watched kind, as in `/status`.
    resources: &'a [ResourceStatus],
    workloads: &'a [WorkloadView],
    certificates: Vec<crate::identity::CertView>,
    #[serde(flatten)]
    objects: ConfigObjects<'a>,
}

/// The configuration objects in force, as `/config_dump` shows them.
#[derive(Serialize)]
struct ConfigObjects<'a> {
    namespaces: Vec<&'a crate::config::model::Namespace>,
    services: Vec<&'a crate::config::model::Service>,
    pods: Vec<&'a crate::config::model::Pod>,
    peer_authentications: Vec<&'a crate::config::model::PeerAuthentication>,
    authorization_policies: Vec<&'a crate::config::authz::AuthorizationPolicy>,
    /// Invalid ones, with why: each closes its namespace (fail closed).
    invalid_authorization_policies: Vec<Named<'a, Reason<'a>>>,
    virtual_services: Vec<&'a crate::config::routing::VirtualService>,
    destination_rules: Vec<&'a crate::config::routing::DestinationRule>,
    gateways: Vec<&'a crate::config::gateway::Gateway>,
    /// The Secrets the Gateways name, and what each holds (never a key).
    gateway_credentials: Vec<Named<'a, &'a crate::config::gateway::CredentialState>>,
    /// What is taken from MeshConfig (access log), and from where.
    mesh: &'a crate::config::model::MeshSettings,
    /// The mTLS mode PeerAuthentication gives each meshed pod of this node (pod level, before
    /// port-level overrides): what the policies above add up to.
    effective_mtls: std::collections::BTreeMap<String, crate::config::model::MtlsMode>,
}

/// What is said of an object, as `{"object": {...}, ...}`: a map keyed by object would not
/// be JSON (keys must be strings).
#[derive(Serialize)]
struct Named<'a, T: Serialize> {
    object: &'a crate::config::model::ObjectRef,
    #[serde(flatten)]
    value: T,
}

#[derive(Serialize)]
struct Reason<'a> {
    reason: &'a str,
}

/// A map keyed by object as a list of [`Named`] entries.
fn named<'a, V, T: Serialize>(
    map: &'a std::collections::BTreeMap<crate::config::model::ObjectRef, V>,
    value: impl Fn(&'a V) -> T,
) -> Vec<Named<'a, T>> {
    map.iter()
        .map(|(object, v)| Named {
            object,
            value: value(v),
        })
        .collect()
}

impl<'a> ConfigObjects<'a> {
    fn of(snap: &'a crate::config::model::Snapshot, node: &str) -> Self {
        ConfigObjects {
            namespaces: snap.namespaces.values().collect(),
            services: snap.services.values().collect(),
            pods: snap.pods.values().collect(),
            peer_authentications: snap.peer_authentications.values().collect(),
            authorization_policies: snap.authorization_policies.values().collect(),
            invalid_authorization_policies: named(&snap.invalid_authorization_policies, |r| {
                Reason { reason: r }
            }),
            virtual_services: snap.virtual_services.values().map(|v| &**v).collect(),
            destination_rules: snap.destination_rules.values().map(|d| &**d).collect(),
            gateways: snap.gateways.values().collect(),
            gateway_credentials: named(&snap.gateway_credentials, |state| state),
            mesh: &snap.mesh,
            effective_mtls: snap
                .enrolled_pods(node)
                .map(|p| (p.id.to_string(), snap.inbound_mode(p, 0)))
                .collect(),
        }
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(mut body) => {
            body.push(b'\n');
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        ),
    }
}

fn fresh(list: &[WorkloadView]) -> Vec<WorkloadView> {
    list.iter().map(WorkloadView::fresh).collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Which listener a request came in on: the admin API serves everything on loopback and the
/// unix socket; the node-network ports serve only metrics or only readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    Admin,
    Metrics,
    Readiness,
}

fn allowed(surface: Surface, path: &str) -> bool {
    match surface {
        Surface::Admin => true,
        Surface::Metrics => matches!(path, "/stats/prometheus" | "/metrics"),
        Surface::Readiness => path == "/healthz/ready",
    }
}

fn prometheus(state: &AdminState) -> Response<Full<Bytes>> {
    let mut registry = state.metrics.registry();
    registry.register_collector(Box::new(crate::telemetry::health::Health(state.clone())));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(
                crate::telemetry::metrics::to_prometheus_text(&body),
            )))
            .unwrap_or_default(),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        ),
    }
}

pub fn handle(
    state: &AdminState,
    surface: Surface,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !allowed(surface, path) {
        return text(
            StatusCode::NOT_FOUND,
            format!("no such path here: {path}\n"),
        );
    }
    if path == "/logging" && req.method() == Method::POST {
        let Some(level) = query_level(req.uri().query()) else {
            return text(
                StatusCode::BAD_REQUEST,
                "POST /logging?level=FILTER (e.g. debug, or info,mesh_agent=debug)\n".into(),
            );
        };
        return match state.logging.set(&level) {
            Ok(()) => {
                info!(filter = %level, "log filter changed through the admin API");
                text(StatusCode::OK, format!("{level}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
    }
    if path == "/fast_path" && req.method() == Method::POST {
        return set_fast_path(state, req.uri().query());
    }
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET (and POST /logging, POST /fast_path)\n".into(),
        );
    }
    let view = state.view.borrow().clone();
    match path {
        "/stats/prometheus" | "/metrics" => prometheus(state),
        "/healthz/ready" => {
            if view.ready {
                text(StatusCode::OK, "ready\n".into())
            } else {
                let reason = view.not_ready_reason.as_deref().unwrap_or("starting");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                )
            }
        }
        "/workloads" => json(StatusCode::OK, &fresh(&view.workloads)),
        "/routes" => routes(state, req.uri().query()),
        "/services" => json(
            StatusCode::OK,
            &crate::proxy::routing::services_view::services(&state.routes.load()),
        ),
        "/certs" => json(StatusCode::OK, &certs(state)),
        "/connections" => json(StatusCode::OK, &state.connections.view()),
        "/logging" => text(StatusCode::OK, format!("{}\n", state.logging.current())),
        "/fast_path" => json(StatusCode::OK, &state.fast_path.state()),
        "/status" => {
            let count = |state: &str| view.workloads.iter().filter(|w| w.state == state).count();
            let enrolled = count("enrolled");
            let ebpf = state.maps.read();
            let certificates = certs(state);
            let (open_outbound, open_inbound) = state.connections.counts();
            let doc = StatusDoc {
                version: env!("CARGO_PKG_VERSION"),
                node: &view.node,
                ready: view.ready,
                not_ready_reason: view.not_ready_reason.as_deref(),
                config_source: &view.config_source,
                config_synced: view.config_synced,
                resources: &view.resources,
                config_generation: view.config_generation,
                config_error: view.config_error.as_deref(),
                config_errors_total: view.config_errors_total,
                enrolled_pods: enrolled,
                failed_pods: count("failed"),
                pending_pods: count("pending"),
                active_connections: state.stats.active.load(std::sync::atomic::Ordering::Relaxed),
                open_outbound,
                open_inbound,
                mtls: state.certs.is_some(),
                certificates: certificates.len(),
                certificates_unhealthy: certificates
                    .iter()
                    .filter(|c| c.state != crate::identity::CertState::Valid)
                    .count(),
                ebpf: &ebpf,
                fast_path: state.fast_path.state(),
            };
            json(StatusCode::OK, &doc)
        }
        "/stats" => {
            let routes = state.routes.load();
            let ebpf = state.maps.read();
            let services = routes.service_stats();
            let doc = StatsDoc {
                node: &view.node,
                routes_generation: routes.generation,
                proxy: &state.stats,
                inbound: &state.inbound,
                access_log: &state.access_log,
                spans: &state.spans,
                ebpf: &ebpf,
                services: services
                    .iter()
                    .map(|(id, s)| ServiceCounters {
                        service: id.to_string(),
                        counters: s,
                    })
                    .collect(),
            };
            json(StatusCode::OK, &doc)
        }
        "/config_dump" => {
            let snap = state.snapshot.borrow().clone();
            let workloads = fresh(&view.workloads);
            let doc = ConfigDump {
                node: &view.node,
                generation: snap.generation,
                config_error: view.config_error.as_deref(),
                resources: &view.resources,
                workloads: &workloads,
                certificates: certs(state),
                objects: ConfigObjects::of(&snap, &view.node),
            };
            json(StatusCode::OK, &doc)
        }
        "/" => text(
            StatusCode::OK,
            "nodemesh admin: /healthz/ready /status /config_dump /workloads /certs /connections /routes /services /stats /stats/prometheus /logging /fast_path\n"
                .into(),
        ),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such admin path: {other}\n"),
        ),
    }
}

async fn serve_conn<S>(state: AdminState, surface: Surface, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = handle(&state, surface, &req);
        async move { Ok::<_, Infallible>(resp) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "admin connection ended with an error");
    }
}

/// Binds the admin unix socket, replacing a stale socket file of a previous agent.
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    // The admin API exposes config and can change state later: root only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve_unix(state: AdminState, listener: UnixListener, path: PathBuf) {
    info!(path = %path.display(), "admin API listening on unix socket");
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(state.clone(), Surface::Admin, s));
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn serve_tcp(
    state: AdminState,
    surface: Surface,
    listener: TcpListener,
    addr: SocketAddr,
) {
    info!(%addr, ?surface, "HTTP listening");
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(state.clone(), surface, s));
            }
            Err(e) => {
                warn!(error = %e, ?surface, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ConfigObjects, query_level};
    use crate::config::gateway::CredentialState;
    use crate::config::model::{ObjectRef, Snapshot};

    /// Objects keyed by name (invalid policies, credentials) are JSON lists naming them.
    #[test]
    fn config_dump_names_invalid_policies_and_credentials() {
        let id = |ns: &str, name: &str| ObjectRef {
            namespace: ns.into(),
            name: name.into(),
        };
        let mut snap = Snapshot::default();
        snap.invalid_authorization_policies
            .insert(id("shop", "web"), "field spec.action: CUSTOM".into());
        snap.gateway_credentials
            .insert(id("istio-system", "cert"), CredentialState::Missing);
        let doc = serde_json::to_value(ConfigObjects::of(&snap, "node-1")).expect("JSON");
        assert_eq!(
            doc["invalid_authorization_policies"],
            serde_json::json!([{"object": {"namespace": "shop", "name": "web"},
                                "reason": "field spec.action: CUSTOM"}])
        );
        assert_eq!(
            doc["gateway_credentials"],
            serde_json::json!([{"object": {"namespace": "istio-system", "name": "cert"},
                                "state": "missing"}])
        );
    }

    #[test]
    fn level_from_query() {
        assert_eq!(query_level(Some("level=debug")), Some("debug".into()));
        assert_eq!(
            query_level(Some("x=1&level=info%2Cmesh_agent%3Ddebug")),
            Some("info,mesh_agent=debug".into())
        );
        assert_eq!(query_level(Some("level=%zz%")), Some("%zz%".into()));
        assert_eq!(query_level(Some("other=1")), None);
        assert_eq!(query_level(None), None);
    }
}
