//! The bookinfo demo on a testbed: pods and servers, traffic from the sleep pod, the agents'
//! view, then teardown. Free of the xtask CLI (setup, flags) so an integration test can run it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_testbed::{PodProcess, Testbed, TestbedConfig};

use super::prom;
use super::report::{self, Traffic};
use crate::util::build_bin;

/// Istio's bookinfo as Pods, plus the sleep client.
pub const BOOKINFO_YAML: &str = include_str!("../../demo/bookinfo.yaml");
/// The routing rules: the reference guide's VirtualService bound to the mesh, reviews
/// subsets, jason to v2 and a v1/v3 split for everyone else.
pub const ROUTING_YAML: &str = include_str!("../../demo/routing.yaml");
/// MeshConfig (access log, tracing) and the OTLP collector's namespace, Service and pod.
pub const OBSERVABILITY_YAML: &str = include_str!("../../demo/observability.yaml");
/// Requests sent as end-user jason, after the anonymous ones.
pub const JASON_REQUESTS: usize = 4;
const PORT: u16 = 9080;
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One bookinfo pod's server: what it reports and which services it calls (name, path).
struct Server {
    pod: &'static str,
    service: &'static str,
    version: &'static str,
    calls: &'static [(&'static str, &'static str)],
}

const SERVERS: &[Server] = &[
    Server {
        pod: "productpage-v1",
        service: "productpage",
        version: "v1",
        calls: &[("details", "/details/0"), ("reviews", "/reviews/0")],
    },
    Server {
        pod: "details-v1",
        service: "details",
        version: "v1",
        calls: &[],
    },
    Server {
        pod: "reviews-v1",
        service: "reviews",
        version: "v1",
        calls: &[],
    },
    Server {
        pod: "reviews-v2",
        service: "reviews",
        version: "v2",
        calls: &[("ratings", "/ratings/0")],
    },
    Server {
        pod: "reviews-v3",
        service: "reviews",
        version: "v3",
        calls: &[("ratings", "/ratings/0")],
    },
    Server {
        pod: "ratings-v1",
        service: "ratings",
        version: "v1",
        calls: &[],
    },
];

/// What to run.
pub struct Options {
    pub agent_bin: PathBuf,
    pub testapp_bin: PathBuf,
    /// Requests the sleep pod sends to productpage.
    pub requests: usize,
    /// After the summary, wait for SIGINT/SIGTERM before tearing down.
    pub wait: bool,
}

/// How the demo went.
#[derive(Debug)]
pub struct Outcome {
    pub prefix: String,
    pub traffic: Traffic,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag the demo polls (so it can tear down) instead of
/// killing the process. One-shot: a second signal has its default effect.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe; children get default dispositions back on exec.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("installing the handler for signal {sig}"));
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted(during: &str) -> Result<()> {
    if interrupted() {
        bail!("interrupted while {during}");
    }
    Ok(())
}

/// Builds mesh-agent and mesh-testapp (debug profile) and returns (mesh-agent, mesh-testapp)
/// as cargo reports them.
pub fn build_bins() -> Result<(PathBuf, PathBuf)> {
    Ok((
        build_bin("mesh-agent", "mesh-agent", false)?,
        build_bin("mesh-testbed", "mesh-testapp", false)?,
    ))
}

/// Runs the whole demo; the testbed and every process it started are gone when this returns.
pub fn run(opts: &Options) -> Result<Outcome> {
    println!(
        "==> bringing up a 2-node testbed with bookinfo (agents: {})",
        opts.agent_bin.display()
    );
    let mut cfg = TestbedConfig::new(2)
        .agent(&opts.agent_bin)
        .manifest("bookinfo.yaml", BOOKINFO_YAML)
        .manifest("routing.yaml", ROUTING_YAML)
        .manifest("observability.yaml", OBSERVABILITY_YAML)
        .name_hint("cargo xtask demo");
    // The mesh CA runs beside the nodes: every hop between bookinfo pods is mutual TLS.
    cfg.ca = true;
    let tb = Testbed::up(cfg).context("bringing up the demo testbed")?;
    let prefix = tb.prefix().to_string();
    // The servers live inside `demo` and are stopped when it returns, before the testbed goes.
    let result = demo(&tb, opts);
    if interrupted() {
        println!(
            "\n==> signal received: tearing down (a second Ctrl-C aborts; then run `cargo xtask testbed down --all`)"
        );
    } else {
        println!("\n==> tearing down");
    }
    let down = tb.down();
    if down.is_ok() {
        println!(
            "testbed {prefix} removed: agents, servers, network namespaces, cgroups, bpffs pins"
        );
    }
    let traffic = match (result, down) {
        (Ok(t), Ok(())) => t,
        (Err(e), Ok(())) => return Err(e),
        (Ok(_), Err(d)) => return Err(d.context("tearing down the demo testbed")),
        (Err(e), Err(d)) => {
            bail!("{e:#}\nalso, tearing down the demo testbed failed: {d:#}");
        }
    };
    Ok(Outcome { prefix, traffic })
}

fn demo(tb: &Testbed, opts: &Options) -> Result<Traffic> {
    let services = service_ips(tb)?;
    print_topology(tb, &services);
    check_interrupted("starting the servers")?;
    let _servers = start_servers(tb, &opts.testapp_bin, &services)?;
    let mut collector = super::traces::start(tb, &opts.testapp_bin)?;
    let productpage = services
        .get("productpage")
        .copied()
        .context("the bookinfo manifest has no productpage service")?;
    let url = format!("http://productpage:{PORT}/productpage");
    let curl_args = format!("-sS -m 5 --resolve productpage:{PORT}:{productpage} {url}");
    // Prometheus scrapes before, during and after the traffic; it keeps running while the
    // demo waits, so it can be queried by hand.
    let prometheus = prom::start(tb)?;
    println!();
    println!(
        "==> {} requests from the sleep pod: curl {curl_args}",
        opts.requests
    );
    println!(
        "    then {JASON_REQUESTS} more with -H 'end-user: jason' (routing rules: demo/routing.yaml)"
    );
    let traffic = send_traffic(tb, &url, productpage, opts.requests)?;
    let other = format!("http://productpage:{PORT}/other");
    let status = curl_status(tb, &other, productpage)?;
    println!(
        "    and {other}: HTTP {status} (the guide's rules route only /productpage and /api/v1)"
    );
    if status != 404 {
        bail!("{other} answered {status}; the guide's VirtualService leaves it unrouted (404)");
    }
    report::print_traffic(tb, &traffic);
    println!();
    report::print_routes(tb, &opts.agent_bin);
    println!();
    report::print_agents(tb)?;
    println!();
    if prometheus.is_some() {
        // Two more scrapes (1 s apart) so the last requests are in.
        std::thread::sleep(std::time::Duration::from_millis(2500));
        prom::print_answers(tb)?;
    }
    println!();
    let mut traffic = traffic;
    traffic.longest_trace = Some(super::traces::print(&mut collector));
    report::print_access_log(tb);
    println!();
    report::print_inspect(tb, &opts.agent_bin, &curl_args, opts.wait);
    if opts.wait {
        println!();
        match traffic.check() {
            Ok(()) => println!("==> the mesh is up. Ctrl-C (or SIGTERM) tears everything down."),
            Err(e) => println!(
                "==> PROBLEM: {e:#}\n    the testbed stays up for inspection; Ctrl-C tears it down."
            ),
        }
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(traffic)
}

/// Service name -> ClusterIP, for the services of the manifest's default namespace.
fn service_ips(tb: &Testbed) -> Result<BTreeMap<String, Ipv4Addr>> {
    let mut out = BTreeMap::new();
    for name in ["productpage", "details", "reviews", "ratings"] {
        out.insert(name.to_string(), tb.service_ip("default", name)?);
    }
    Ok(out)
}

fn print_topology(tb: &Testbed, services: &BTreeMap<String, Ipv4Addr>) {
    println!(
        "testbed {} (state {})",
        tb.prefix(),
        tb.state_dir().display()
    );
    for node in tb.nodes() {
        let pods: Vec<String> = tb
            .pods()
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        let pid = tb
            .agent_pid(&node.name)
            .map_or("?".into(), |p| p.to_string());
        println!(
            "  {} {} (agent pid {pid}): {}",
            node.name,
            node.ip,
            pods.join(", ")
        );
    }
    let list: Vec<String> = services
        .iter()
        .map(|(name, ip)| format!("{name} {ip}:{PORT}"))
        .collect();
    println!("  services (ClusterIPs): {}", list.join(", "));
    println!(
        "  no DNS here: servers call http://NAME:{PORT}/... with `mesh-testapp --resolve NAME=ClusterIP`"
    );
}

/// Starts `mesh-testapp http` in every bookinfo pod and waits until each listens.
fn start_servers(
    tb: &Testbed,
    testapp: &Path,
    services: &BTreeMap<String, Ipv4Addr>,
) -> Result<Vec<PodProcess>> {
    let mut procs = Vec::new();
    for s in SERVERS {
        let mut args = vec![
            "http".to_string(),
            "--listen".into(),
            format!("0.0.0.0:{PORT}"),
            "--service".into(),
            s.service.into(),
            "--version".into(),
            s.version.into(),
        ];
        for (name, path) in s.calls {
            let ip = services
                .get(*name)
                .with_context(|| format!("{} calls unknown service {name}", s.pod))?;
            args.push("--call".into());
            args.push(format!("{name}=http://{name}:{PORT}{path}"));
            args.push("--resolve".into());
            args.push(format!("{name}={ip}"));
        }
        let p = tb
            .spawn_in_pod(s.pod, testapp, &args)
            .with_context(|| format!("starting the {} server in pod {}", s.service, s.pod))?;
        procs.push(p);
    }
    for (s, p) in SERVERS.iter().zip(procs.iter_mut()) {
        p.wait_for_line("listening", LISTEN_TIMEOUT)
            .with_context(|| format!("waiting for the server in pod {} to listen", s.pod))?;
    }
    println!(
        "  servers listening on :{PORT} in {}",
        SERVERS.iter().map(|s| s.pod).collect::<Vec<_>>().join(", ")
    );
    Ok(procs)
}

/// Sends `n` requests with curl from the sleep pod, one connection each, then
/// [`JASON_REQUESTS`] as end-user jason.
fn send_traffic(tb: &Testbed, url: &str, productpage: Ipv4Addr, n: usize) -> Result<Traffic> {
    let mut traffic = Traffic::default();
    for i in 1..=n + JASON_REQUESTS {
        check_interrupted("sending requests")?;
        let user = (i > n).then_some("jason");
        let mut cmd = tb.pod_command("sleep", "curl")?;
        cmd.args(["-sS", "-m", "5", "--resolve"])
            .arg(format!("productpage:{PORT}:{productpage}"));
        if let Some(u) = user {
            cmd.args(["-H", &format!("end-user: {u}")]);
        }
        let out = cmd
            .args(["-w", "\n%{http_code}", url])
            .stdin(Stdio::null())
            .output()
            .context("running curl in pod sleep")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            traffic.fail(i, format!("curl failed ({}): {}", out.status, err.trim()));
            continue;
        }
        traffic.record(i, code.trim().parse().unwrap_or(0), body, user);
    }
    Ok(traffic)
}

/// The status of one GET from the sleep pod.
fn curl_status(tb: &Testbed, url: &str, productpage: Ipv4Addr) -> Result<u16> {
    let out = tb
        .pod_command("sleep", "curl")?
        .args([
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
        ])
        .arg(format!("productpage:{PORT}:{productpage}"))
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running curl in pod sleep")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}
