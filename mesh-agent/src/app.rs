//! `mesh-agent run`: wiring. The data path (accept loops and connections) runs on a
//! multi-threaded runtime of its own; config, enrollment and the admin API run on a
//! single-threaded control runtime on the main thread, away from the data path's tail latency.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState, ControlView, LogControl, Surface};
use crate::capture::enroll::{Enroller, Mtls};
use crate::capture::fast_path::{FastPath, FastPathConfig, FastPathMode};
use crate::capture::{Capture, CaptureConfig};
use crate::config::model::Snapshot;
use crate::config::watch as config_watch;
use crate::identity::{CertManager, CertManagerConfig};
use crate::proxy::connections::ConnectionTable;
use crate::proxy::hbone::PoolSettings;
use crate::proxy::{ProxyInputs, ProxyStats, RouteTable};
use crate::telemetry::access_log::{AccessLog, AccessLogStats};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::{SpanStats, Spans};

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["manifests", "kubernetes"])))]
pub struct RunArgs {
    /// Local mode: directory of Kubernetes YAML (Namespace, Pod, Service, PeerAuthentication;
    /// other kinds are ignored). Re-read on change; a bad file is reported and the last good
    /// config stays. Pods name their network namespace with the nodemesh.io/netns annotation.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// Kubernetes mode (preview): watch the API server (Namespaces, Pods, Services,
    /// EndpointSlices, PeerAuthentications, the MeshConfig ConfigMap) with the in-cluster
    /// service account or KUBECONFIG. Ready after the first full sync; invalid objects are
    /// skipped and logged. Pods are enrolled when the CNI plugin (nodemesh-cni) reports
    /// their network namespace on --cni-socket; pods that were running before the agent are
    /// found in --proc-dir.
    #[arg(long)]
    pub kubernetes: bool,

    /// Name of this node: only pods whose spec.nodeName equals it are enrolled here.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// cgroup v2 directory whose processes are captured. Defaults to the root of the cgroup2
    /// mount (found in /proc/self/mountinfo).
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// bpffs directory for this agent's pinned maps and links. Pins keep capture in place
    /// (failing closed) while the agent restarts. Defaults to /sys/fs/bpf/nodemesh.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/nodemesh")]
    pub bpffs_dir: PathBuf,

    /// Admin API unix socket (used by `mesh-agent workloads` and friends).
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,

    /// Unix socket the CNI plugin (nodemesh-cni) reaches the agent on, root only. Default:
    /// cni.sock beside --admin-socket (/var/run/nodemesh/cni.sock with the default).
    #[arg(long, value_name = "PATH")]
    pub cni_socket: Option<PathBuf>,

    /// The host's /proc (Kubernetes mode): pods that were running before the agent (restart,
    /// upgrade, a namespace labelled later) get no CNI ADD, so the agent finds their network
    /// namespaces here, by pod IP confirmed by the pod UID in their cgroup. In a container
    /// this needs hostPID. Only processes under --cgroup are considered (all at its root).
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// Keep the CNI plugin installed on the node: this binary copied to DIR as nodemesh-cni
    /// (with --cni-conf-dir), and its entry in the runtime's conflist re-appended whenever the
    /// cluster's CNI rewrites it.
    #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,

    /// The runtime's CNI config directory (with --cni-bin-dir).
    #[arg(long, value_name = "DIR", requires = "cni_bin_dir")]
    pub cni_conf_dir: Option<PathBuf>,

    /// Admin API TCP address, in the agent's network namespace. Keep it on loopback.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (`/stats/prometheus`, `/metrics`), on the node network like
    /// Istio's 15020.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`) for the kubelet, on the node network like Istio's 15021.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Timeout for connecting to an upstream; on expiry the client connection is reset.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM/SIGINT, how long established connections may drain before the agent exits.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Most bytes buffered per direction of each proxied connection. Buffers start at 16 KiB
    /// and double up to this only while reads fill them (bulk transfers), so
    /// request/response connections stay small; the worst case per connection is twice this.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub buffer_size: usize,

    /// Proxied connections kept open at most; new ones beyond are reset and counted. Each
    /// holds at most two --buffer-size buffers, so this bounds the data path's memory.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_connections: u64,

    /// eBPF fast path for the loopback hops between apps and the agent inside each pod
    /// (sock_ops + sk_msg with a SOCKHASH: bytes go socket to socket, skipping the TCP/IP
    /// stack). `on` turns it on only if a self-test at start-up proves it works on this
    /// kernel; `status` says whether it is on and why; `mesh-agent fast-path on|off`
    /// switches it at runtime. Off by default: on the machines measured it did not lower
    /// latency (docs/benchmarks.md), and some kernels break blocking reads under it.
    #[arg(long, value_enum, value_name = "MODE", default_value = "off")]
    pub fast_path: FastPathMode,

    /// Bytes each accelerated socket may send through the fast path; past it, the rest of
    /// its connection goes over the TCP/IP stack. The kernel does not bound redirected bytes
    /// by the receiver's buffer, so this is what bounds the memory a stalled reader can
    /// make its peer queue (per socket, like TCP's own buffers).
    #[arg(long, value_name = "BYTES", default_value_t = crate::capture::fast_path::DEFAULT_BUDGET,
          value_parser = clap::value_parser!(u32).range(i64::from(crate::capture::fast_path::MIN_BUDGET)..))]
    pub fast_path_budget: u32,

    /// Testing: make the fast path's start-up self-test fail (its namespace is enrolled
    /// without the self-test flag, so no socket is accelerated), as on a kernel where the
    /// fast path does not work.
    #[arg(long, hide = true)]
    pub fast_path_inject_self_test_failure: bool,

    /// Worker threads of the data-path runtime; 0 picks a quarter of the CPUs (at least 1,
    /// at most 4), leaving the rest to the workloads whose traffic the agent carries. On a
    /// 2-CPU machine one thread measured better than two (docs/performance.md).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// The mesh CA (`mesh-agent ca`). With it, traffic between meshed pods goes over mutual
    /// TLS (HBONE) and every enrolled pod gets a certificate for its service account first.
    /// Without it the agent proxies plaintext TCP and says so at startup. IP:PORT, or
    /// HOST:PORT resolved at every connection (in a cluster: the CA's Service name).
    #[arg(long, value_name = "ADDR", requires_all = ["ca_root", "ca_token_file"])]
    pub ca_addr: Option<crate::identity::CaAddr>,

    /// PEM file with the mesh root certificate(s): trusted for the CA's own TLS and as the
    /// anchor of every workload certificate.
    #[arg(long, value_name = "FILE")]
    pub ca_root: Option<PathBuf>,

    /// The node credential presented to the CA (in a cluster: a projected service-account
    /// token).
    #[arg(long, value_name = "FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// DNS name in the CA's serving certificate.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "nodemesh-ca.nodemesh-system.svc"
    )]
    pub ca_server_name: String,

    /// SPIFFE trust domain of this mesh.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Lifetime asked for workload certificates; they are renewed at half-life.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// CONNECT streams one HBONE (mutual TLS) connection carries at most before another is
    /// opened to the same destination.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub hbone_max_streams: usize,

    /// An HBONE connection with no stream for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,

    /// Log filter (tracing EnvFilter syntax), overridden by RUST_LOG.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

impl RunArgs {
    /// The CNI socket: as given, or cni.sock beside the admin socket.
    pub fn cni_socket(&self) -> PathBuf {
        self.cni_socket.clone().unwrap_or_else(|| {
            let dir = self
                .admin_socket
                .parent()
                .unwrap_or(std::path::Path::new("/"));
            dir.join("cni.sock")
        })
    }
}

/// Data-path threads: as asked, or for 0 a quarter of the CPUs within [1, 4].
fn data_workers(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cpus / 4).clamp(1, 4)
}

/// Parses `500ms`, `5s`, `2m`, `24h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn init_logging(default: &str) -> Arc<LogControl> {
    use tracing_subscriber::prelude::*;
    let text = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&text).unwrap_or_else(|e| {
        eprintln!("mesh-agent: invalid log filter {text:?} ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    Arc::new(LogControl::new(handle, text))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let logging = init_logging(&args.log_level);
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => crate::sys::cgroup2_mount()
            .context("no cgroup2 mount found in /proc/self/mountinfo; pass --cgroup")?,
    };

    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let (source, snapshot) = match &args.manifests {
        Some(dir) => {
            // Startup is the one moment a bad config stops the agent: there is no last good one.
            let initial = config_watch::initial(dir)
                .map_err(|e| anyhow::anyhow!("invalid manifests in {}:\n{e}", dir.display()))?;
            let fingerprint = initial.fingerprint;
            let source = Source::Manifests {
                dir: dir.clone(),
                fingerprint,
            };
            (source, Arc::new(initial.snapshot))
        }
        // Nothing is known until the watchers' first lists: an empty generation 0, not acted
        // on (see `control`).
        None => {
            let client = control_rt
                .block_on(crate::config::kube::client())
                .context("Kubernetes mode")?;
            (Source::Kubernetes(client), Arc::new(Snapshot::default()))
        }
    };

    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(data_workers(args.workers))
        .thread_name("mesh-data")
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;

    let capture = Capture::start(&CaptureConfig {
        cgroup: cgroup.clone(),
        pin_dir: args.bpffs_dir.clone(),
        fast_path: args.fast_path != FastPathMode::Off,
    })
    .context("starting eBPF capture (see `mesh-agent check`)")?;
    if !crate::release_freed_memory() {
        debug!("jemalloc did not purge the memory freed at start-up");
    }
    // Before any pod is enrolled: the fast path is off until its self-test has passed.
    let fast_path = Arc::new(FastPath::start(
        &args.bpffs_dir,
        FastPathConfig {
            mode: args.fast_path,
            budget_bytes: args.fast_path_budget,
            inject_self_test_failure: args.fast_path_inject_self_test_failure,
        },
    ));

    let mtls = match mtls_config(&args)? {
        Some(cfg) => {
            info!(ca = %cfg.ca_addr, trust_domain = %cfg.trust_domain, "mutual TLS on: meshed pods talk over HBONE");
            // The manager's renewal tasks live on the control runtime.
            let _guard = control_rt.enter();
            Some(Mtls {
                certs: CertManager::new(cfg).context("setting up workload certificates")?,
                pool: PoolSettings {
                    max_streams: args.hbone_max_streams.max(1),
                    idle_timeout: args.hbone_idle_timeout,
                    connect_timeout: args.connect_timeout,
                },
            })
        }
        None => {
            warn!("no --ca-addr: mutual TLS is OFF, traffic between meshed pods is plaintext TCP");
            None
        }
    };
    let trust_domain = mtls.as_ref().map(|m| m.certs.trust_domain().to_string());

    let stats = Arc::new(ProxyStats::default());
    let inbound = Arc::new(crate::proxy::inbound::InboundStats::default());
    let metrics = Arc::new(Metrics::default());
    let access_log = AccessLog::start().context("starting the access log writer thread")?;
    let connections = Arc::new(ConnectionTable::default());
    let (spans, span_queue) = Spans::new();
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(
        &snapshot,
        &RouteTable::default(),
        trust_domain.as_deref(),
    )));
    let inputs = ProxyInputs {
        routes: routes.clone(),
        stats: stats.clone(),
        connect_timeout: args.connect_timeout,
        buffer_size: args.buffer_size.clamp(4096, 4 << 20),
        metrics: metrics.clone(),
        max_connections: args.max_connections.max(1),
        inbound: inbound.clone(),
        access_log: access_log.clone(),
        connections: connections.clone(),
        spans: spans.clone(),
        node_addresses: Arc::new(node_addresses()),
    };
    let certs = mtls.as_ref().map(|m| m.certs.clone());
    let enroller = Enroller::new(
        args.node.clone(),
        capture,
        data_rt.handle().clone(),
        inputs,
        mtls,
    );

    let result = control_rt.block_on(control(ControlInputs {
        args: args.clone(),
        snapshot,
        source,
        enroller,
        routes,
        stats: stats.clone(),
        metrics,
        logging,
        certs,
        trust_domain,
        inbound,
        access_log: access_log.stats.clone(),
        connections,
        spans: (span_queue, spans.stats.clone()),
        fast_path,
    }));

    // Drain: accept loops are stopped; give live connections until the deadline.
    let deadline = Instant::now() + args.drain_timeout;
    while stats.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = stats.active.load(Ordering::Relaxed);
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline reached, closing the remaining connections"
        );
    }
    data_rt.shutdown_timeout(Duration::from_millis(100));
    info!("agent stopped; capture stays pinned, enrolled pods fail closed until an agent returns");
    result
}

/// The IPv4 addresses of the agent's network namespace (the node's), from
/// `/proc/self/net/fib_trie`; none if it cannot be read (then probes are not exempted).
fn node_addresses() -> std::collections::BTreeSet<std::net::Ipv4Addr> {
    match std::fs::read_to_string("/proc/self/net/fib_trie") {
        Ok(text) => {
            let ips = crate::cni::scan::local_ipv4s(&text);
            info!(addresses = ?ips, "plaintext from these node addresses (kubelet probes) passes STRICT");
            ips
        }
        Err(e) => {
            warn!(error = %e, "cannot read /proc/self/net/fib_trie: kubelet probes to STRICT pods will be refused");
            Default::default()
        }
    }
}

/// Where the config comes from.
enum Source {
    /// Local mode: the directory and the fingerprint of the content of the startup snapshot.
    Manifests {
        dir: PathBuf,
        fingerprint: u64,
    },
    Kubernetes(kube::Client),
}

/// What the control plane runs with, passed explicitly.
struct ControlInputs {
    args: RunArgs,
    /// The startup snapshot (empty in Kubernetes mode).
    snapshot: Arc<Snapshot>,
    source: Source,
    enroller: Enroller,
    routes: Arc<ArcSwap<RouteTable>>,
    stats: Arc<ProxyStats>,
    metrics: Arc<Metrics>,
    logging: Arc<LogControl>,
    certs: Option<CertManager>,
    trust_domain: Option<String>,
    inbound: Arc<crate::proxy::inbound::InboundStats>,
    access_log: Arc<AccessLogStats>,
    connections: Arc<ConnectionTable>,
    /// The span queue's receiving end, for the exporter, and its counters.
    spans: (
        tokio::sync::mpsc::Receiver<crate::telemetry::trace::SpanRecord>,
        Arc<SpanStats>,
    ),
    fast_path: Arc<FastPath>,
}

/// The CA client settings, if mutual TLS is configured.
fn mtls_config(args: &RunArgs) -> anyhow::Result<Option<CertManagerConfig>> {
    let Some(ca_addr) = args.ca_addr.clone() else {
        return Ok(None);
    };
    let (Some(ca_root), Some(token_file)) = (&args.ca_root, &args.ca_token_file) else {
        anyhow::bail!("--ca-addr needs --ca-root and --ca-token-file");
    };
    Ok(Some(CertManagerConfig {
        ca_addr,
        ca_server_name: args.ca_server_name.clone(),
        ca_root: ca_root.clone(),
        token_file: token_file.clone(),
        trust_domain: args.trust_domain.clone(),
        ttl: args.cert_ttl,
    }))
}

async fn control(inputs: ControlInputs) -> anyhow::Result<()> {
    let ControlInputs {
        args,
        snapshot,
        source,
        mut enroller,
        routes,
        stats,
        metrics,
        logging,
        certs,
        trust_domain,
        inbound,
        access_log,
        connections,
        spans: (span_queue, span_stats),
        fast_path,
    } = inputs;
    // Spans are sent from here, the control runtime, never from the data path.
    tokio::spawn(crate::telemetry::trace::export::run(
        span_queue,
        routes.clone(),
        span_stats.clone(),
    ));
    let mut certs_rx = certs.as_ref().map(CertManager::changed);
    let (view_tx, view_rx) = watch::channel(Arc::new(ControlView {
        node: args.node.clone(),
        not_ready_reason: Some("starting".into()),
        ..Default::default()
    }));
    let (snap_tx, mut snap_rx) = watch::channel(snapshot.clone());
    let mut status_rx = match source {
        Source::Manifests { dir, fingerprint } => {
            config_watch::spawn_from(dir, snap_tx, fingerprint)
        }
        Source::Kubernetes(client) => {
            info!(node = %args.node, "Kubernetes mode: watching the API server");
            crate::config::kube::spawn(client, args.node.clone(), snap_tx)
        }
    };

    let state = AdminState {
        view: view_rx,
        snapshot: snap_rx.clone(),
        routes: routes.clone(),
        stats,
        maps: Arc::new(
            enroller
                .capture()
                .reader()
                .context("opening the pinned maps for the admin API")?,
        ),
        metrics,
        logging,
        inbound: inbound.clone(),
        access_log,
        spans: span_stats,
        connections: connections.clone(),
        certs: certs.clone(),
        fast_path,
    };
    let unix = admin::bind_unix(&args.admin_socket)
        .with_context(|| format!("binding the admin socket {}", args.admin_socket.display()))?;
    for (addr, surface, what) in [
        (args.admin_addr, Surface::Admin, "admin"),
        (args.metrics_addr, Surface::Metrics, "metrics"),
        (args.readiness_addr, Surface::Readiness, "readiness"),
    ] {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} address {addr} (--{what}-addr)"))?;
        tokio::spawn(admin::serve_tcp(state.clone(), surface, l, addr));
    }
    tokio::spawn(admin::serve_unix(
        state.clone(),
        unix,
        args.admin_socket.clone(),
    ));
    // Pod sandboxes the CNI plugin reports: where each pod's network namespace is.
    let crate::cni::Started {
        sandboxes: mut cni_rx,
        misses: mut misses_rx,
    } = crate::cni::start(&args, snap_rx.clone(), state.view.clone())?;
    enroller.set_node_netns(cni_rx.clone());
    enroller.set_scan_misses(misses_rx.clone());

    // Before the first full sync the config says nothing: reconciling would unenroll the
    // pods a previous agent left enrolled (and fail them open).
    if status_rx.borrow().synced {
        enroller.reconcile(&snapshot);
    }
    let mut readiness = Readiness {
        initialised: false,
        stopping: false,
    };
    publish(
        &view_tx,
        &enroller,
        &args.node,
        &status_rx.borrow(),
        &mut readiness,
    );
    if readiness.initialised {
        info!(node = %args.node, generation = snapshot.generation, "agent ready");
    } else {
        info!(node = %args.node, generation = snapshot.generation, "agent started; ready once the pods' certificates arrive");
    }

    let mut config_alive = true;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            changed = snap_rx.changed(), if config_alive => {
                if changed.is_err() {
                    error!("the config watcher stopped; keeping the last config");
                    config_alive = false;
                    continue;
                }
                let snap = snap_rx.borrow_and_update().clone();
                let before = routes.load_full();
                let table = Arc::new(RouteTable::build(&snap, &before, trust_domain.as_deref()));
                routes.store(table.clone());
                // Policies apply to live connections too: those refused now are closed.
                if before.has_authorization() || snap.has_authorization() {
                    let closed = crate::proxy::inbound::recheck(&connections, &table, &inbound);
                    if closed > 0 {
                        info!(closed, generation = snap.generation,
                            "closed connections the new AuthorizationPolicy refuses");
                    }
                }
                enroller.reconcile(&snap);
            }
            // A certificate arrived or changed: pods waiting for theirs can be enrolled.
            Ok(()) = async { match certs_rx.as_mut() {
                Some(rx) => rx.changed().await,
                None => std::future::pending().await,
            } } => {
                if status_rx.borrow().synced {
                    let snap = snap_rx.borrow().clone();
                    enroller.reconcile(&snap);
                }
            }
            // The CNI plugin reported a pod sandbox, or one was forgotten.
            Ok(()) = cni_rx.changed() => {
                if status_rx.borrow().synced {
                    let snap = snap_rx.borrow().clone();
                    enroller.reconcile(&snap);
                }
            }
            // A /proc scan missed pods (or found them again): only the view changes.
            Ok(()) = misses_rx.changed() => {}
            _ = status_rx.changed(), if config_alive => {}
            _ = tick.tick() => {
                // Only failed enrollments need the tick; counters are read live by the
                // admin API, so an unchanged view is not published again.
                if !enroller.has_failures() || !status_rx.borrow().synced {
                    continue;
                }
                let snap = snap_rx.borrow().clone();
                enroller.reconcile(&snap);
            }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
        }
        let was_ready = readiness.initialised;
        publish(
            &view_tx,
            &enroller,
            &args.node,
            &status_rx.borrow(),
            &mut readiness,
        );
        if readiness.initialised && !was_ready {
            info!(node = %args.node, "agent ready: the pods' certificates arrived");
        }
    }
    enroller.stop_accepting();
    readiness.stopping = true;
    publish(
        &view_tx,
        &enroller,
        &args.node,
        &status_rx.borrow(),
        &mut readiness,
    );
    Ok(())
}

/// Readiness: not before the first full config (Kubernetes mode: every watched kind listed)
/// and every pod of it has its certificate (so "ready" means the node's pods are really
/// meshed), then latched until shutdown.
struct Readiness {
    initialised: bool,
    stopping: bool,
}

impl Readiness {
    fn check(
        &mut self,
        enroller: &Enroller,
        config: &config_watch::ConfigStatus,
    ) -> Result<(), String> {
        if self.stopping {
            return Err("shutting down".into());
        }
        if !self.initialised && !config.synced {
            let waiting: Vec<String> = config
                .resources
                .iter()
                .filter(|r| !r.synced)
                .map(|r| match &r.selector {
                    Some(s) => format!("{} ({s})", r.kind),
                    None => r.kind.to_string(),
                })
                .collect();
            return Err(format!(
                "waiting for the first full sync of: {}",
                waiting.join(", ")
            ));
        }
        if !self.initialised {
            let waiting = enroller.waiting_for_certificates();
            if waiting > 0 {
                return Err(format!("waiting for the certificates of {waiting} pod(s)"));
            }
            self.initialised = true;
        }
        Ok(())
    }
}

fn publish(
    tx: &watch::Sender<Arc<ControlView>>,
    enroller: &Enroller,
    node: &str,
    status: &config_watch::ConfigStatus,
    readiness: &mut Readiness,
) {
    let ready = readiness.check(enroller, status);
    let view = ControlView {
        node: node.to_string(),
        ready: ready.is_ok(),
        not_ready_reason: ready.err(),
        config_source: status.source.clone(),
        config_synced: status.synced,
        resources: status.resources.clone(),
        config_generation: status.generation,
        config_error: status.last_error.clone(),
        config_errors_total: status.errors_total,
        workloads: enroller.view(),
    };
    tx.send_replace(Arc::new(view));
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
