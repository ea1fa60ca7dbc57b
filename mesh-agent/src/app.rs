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
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, ControlView, LogControl, Surface};
use crate::capture::enroll::Enroller;
use crate::capture::{Capture, CaptureConfig};
use crate::config::model::Snapshot;
use crate::config::watch as config_watch;
use crate::proxy::{ProxyInputs, ProxyStats, RouteTable};
use crate::telemetry::metrics::Metrics;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Local mode: directory of Kubernetes YAML (Namespace, Pod, Service; other kinds are
    /// ignored). Re-read on change; a bad file is reported and the last good config stays.
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,

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

    /// Bytes buffered per direction of each proxied connection (memory per connection is
    /// about twice this).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub buffer_size: usize,

    /// Proxied connections kept open at most; new ones beyond are reset and counted. Each
    /// holds two --buffer-size buffers, so this bounds the data path's memory.
    #[arg(long, value_name = "N", default_value_t = 16384)]
    pub max_connections: u64,

    /// Worker threads of the data-path runtime; 0 picks a quarter of the CPUs (at least 1,
    /// at most 4), leaving the rest to the workloads whose traffic the agent carries. On a
    /// 2-CPU machine one thread measured better than two (docs/performance.md).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// Log filter (tracing EnvFilter syntax), overridden by RUST_LOG.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

/// Data-path threads: as asked, or for 0 a quarter of the CPUs within [1, 4].
fn data_workers(asked: usize) -> usize {
    if asked > 0 {
        return asked;
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cpus / 4).clamp(1, 4)
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
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
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
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

    // Startup is the one moment a bad config stops the agent: there is no last good one.
    let initial = config_watch::initial(&args.manifests)
        .map_err(|e| anyhow::anyhow!("invalid manifests in {}:\n{e}", args.manifests.display()))?;
    let fingerprint = initial.fingerprint;
    let snapshot = Arc::new(initial.snapshot);

    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(data_workers(args.workers))
        .thread_name("mesh-data")
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;
    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;

    let capture = Capture::start(&CaptureConfig {
        cgroup: cgroup.clone(),
        pin_dir: args.bpffs_dir.clone(),
    })
    .context("starting eBPF capture (see `mesh-agent check`)")?;

    let stats = Arc::new(ProxyStats::default());
    let metrics = Arc::new(Metrics::default());
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(
        &snapshot,
        &RouteTable::default(),
    )));
    let inputs = ProxyInputs {
        routes: routes.clone(),
        stats: stats.clone(),
        connect_timeout: args.connect_timeout,
        buffer_size: args.buffer_size.clamp(4096, 4 << 20),
        metrics: metrics.clone(),
        max_connections: args.max_connections.max(1),
    };
    let enroller = Enroller::new(args.node.clone(), capture, data_rt.handle().clone(), inputs);

    let result = control_rt.block_on(control(ControlInputs {
        args: args.clone(),
        snapshot,
        fingerprint,
        enroller,
        routes,
        stats: stats.clone(),
        metrics,
        logging,
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

/// What the control plane runs with, passed explicitly.
struct ControlInputs {
    args: RunArgs,
    /// The startup snapshot and the fingerprint of the content it was loaded from.
    snapshot: Arc<Snapshot>,
    fingerprint: u64,
    enroller: Enroller,
    routes: Arc<ArcSwap<RouteTable>>,
    stats: Arc<ProxyStats>,
    metrics: Arc<Metrics>,
    logging: Arc<LogControl>,
}

async fn control(inputs: ControlInputs) -> anyhow::Result<()> {
    let ControlInputs {
        args,
        snapshot,
        fingerprint,
        mut enroller,
        routes,
        stats,
        metrics,
        logging,
    } = inputs;
    let (view_tx, view_rx) = watch::channel(Arc::new(ControlView {
        node: args.node.clone(),
        not_ready_reason: Some("starting".into()),
        ..Default::default()
    }));
    let (snap_tx, mut snap_rx) = watch::channel(snapshot.clone());
    let mut status_rx = config_watch::spawn_from(args.manifests.clone(), snap_tx, fingerprint);

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

    enroller.reconcile(&snapshot);
    publish(&view_tx, &enroller, &args.node, &status_rx.borrow(), true);
    info!(node = %args.node, generation = snapshot.generation, "agent ready");

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
                routes.store(Arc::new(RouteTable::build(&snap, &routes.load())));
                enroller.reconcile(&snap);
            }
            _ = status_rx.changed(), if config_alive => {}
            _ = tick.tick() => {
                // Only failed enrollments need the tick; counters are read live by the
                // admin API, so an unchanged view is not published again.
                if !enroller.has_failures() {
                    continue;
                }
                let snap = snap_rx.borrow().clone();
                enroller.reconcile(&snap);
            }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
        }
        publish(&view_tx, &enroller, &args.node, &status_rx.borrow(), true);
    }
    enroller.stop_accepting();
    publish(&view_tx, &enroller, &args.node, &status_rx.borrow(), false);
    Ok(())
}

fn publish(
    tx: &watch::Sender<Arc<ControlView>>,
    enroller: &Enroller,
    node: &str,
    status: &config_watch::ConfigStatus,
    ready: bool,
) {
    let view = ControlView {
        node: node.to_string(),
        ready,
        not_ready_reason: (!ready).then(|| "shutting down".to_string()),
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
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
