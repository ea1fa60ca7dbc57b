//! `cargo xtask bench`: the mesh against direct connections on a two-node testbed, same-node
//! and cross-node: iperf3 single-stream throughput and wrk HTTP/1.1 at 1 and 32 connections
//! (with `--http`, also h2load: HTTP/2 and gRPC unary calls at 1 and 32 streams), alternating
//! runs, medians and ratios, the agent's CPU time and peak RSS. Writes docs/benchmarks.md and
//! prints the tables.
//!
//! Pods: `bench/client` (enrolled namespace) and `bench-direct/client` (unlabelled) on
//! node-1; `bench/server-local` on node-1 and `bench/server-remote` on node-2, each running
//! iperf3 -s and an HTTP server (nginx, or mesh-testapp http without nginx). Direct: the
//! unlabelled client to the server pod's IP. Mesh: the enrolled client to the server's
//! Service ClusterIP, captured and proxied by node-1's agent.

mod bed;
mod markdown;
mod report;
mod tools;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_testbed::{Testbed, TestbedConfig};

use crate::setup::{self, SetupArgs};
use crate::util::{build_bin, release_agent, workspace_root};
use bed::{CLIENT, CLIENT_NODE, DIRECT_NS, MESH_NS, SERVERS, ServerPod};
use report::{AgentUse, H2_STREAMS, Mode, Report, Scenario, WRK_CONNS};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs per measurement and mode (direct and mesh alternate; medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Seconds per iperf3 / wrk measurement.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=120))]
    duration: u32,
    /// Smoke test: 1 run of 2 s.
    #[arg(long, conflicts_with_all = ["runs", "duration"])]
    quick: bool,
    /// Where to write the report (a relative path is taken from the workspace root).
    /// Defaults to docs/benchmarks.md; with --plaintext and --http, docs/benchmarks-plaintext.md,
    /// docs/benchmarks-http.md or docs/benchmarks-plaintext-http.md.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run the agents without the mesh CA: plaintext L4 proxying instead of mutual TLS
    /// (HBONE), to see what TLS and HTTP/2 framing cost.
    #[arg(long)]
    plaintext: bool,
    /// Send wrk through the agents' HTTP path (a Service port named `http`: the client's
    /// agent parses each request and balances it) instead of L4 (a port named `tcp-web`),
    /// and add h2load runs of HTTP/2 (h2c, port `http2`) and gRPC unary calls (port `grpc`);
    /// the targets are then the L7 ones.
    #[arg(long)]
    http: bool,
    /// Extra argument for every agent (repeatable), e.g. `--agent-arg=--workers=1`, to
    /// compare agent settings.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Only the cross-node scenario, without the idle-connection memory measurement: half the
    /// time, for comparing two agent builds run after run (the targets are cross-node ones).
    #[arg(long)]
    cross_node_only: bool,
    /// Measure this agent binary instead of building the release one (e.g. the
    /// profile-guided build of `cargo xtask pgo`, target/pgo/mesh-agent).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    #[command(flatten)]
    setup: SetupArgs,
}

impl BenchArgs {
    /// One short pass (`--quick`) with `agent`, written to `output`: `cargo xtask pgo`'s
    /// training load, with pgo's own setup options (so its `--skip-apt` holds here too).
    pub fn training(agent: PathBuf, http: bool, output: PathBuf, setup: SetupArgs) -> Self {
        BenchArgs {
            runs: 1,
            duration: 2,
            quick: true,
            output: Some(output),
            plaintext: false,
            http,
            agent_args: Vec::new(),
            cross_node_only: false,
            agent: Some(agent),
            setup,
        }
    }
}

/// Extra time a load generator gets beyond its nominal duration before it is killed.
const SLACK: Duration = Duration::from_secs(30);
const WARMUP_S: u32 = 1;
/// Idle keep-alive connections held to measure their memory.
const IDLE_CONNECTIONS: usize = 1000;

pub fn run(args: &BenchArgs) -> Result<()> {
    // /proc/self belongs to our effective uid.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        bail!("cargo xtask bench needs root (it builds a testbed of network namespaces)");
    }
    let (runs, duration_s) = if args.quick {
        (1, 2)
    } else {
        (args.runs, args.duration)
    };
    let output = args.output.clone().unwrap_or_else(|| {
        let name = match (args.plaintext, args.http) {
            (false, false) => "docs/benchmarks.md",
            (true, false) => "docs/benchmarks-plaintext.md",
            (false, true) => "docs/benchmarks-http.md",
            (true, true) => "docs/benchmarks-plaintext-http.md",
        };
        PathBuf::from(name)
    });
    let output = if output.is_absolute() {
        output
    } else {
        workspace_root().join(output)
    };
    setup::run(&args.setup)?;
    let agent_bin = release_agent(args.agent.as_deref())?;
    let testapp = build_bin("mesh-testbed", "mesh-testapp", true)?;
    let tools: &[&str] = if args.http {
        &["iperf3", "wrk", "h2load"]
    } else {
        &["iperf3", "wrk"]
    };
    for &tool in tools {
        if !on_path(tool) {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let http = bed::HttpServer::pick(testapp.clone());
    let load_before = bed::loadavg()?;
    let date = date();
    let started = Instant::now();

    eprintln!("bench: building the testbed (2 nodes, release agent)");
    let mut cfg = TestbedConfig::new(2)
        .agent(&agent_bin)
        .name_hint("cargo xtask bench")
        .manifest("bench.yaml", bed::manifest());
    cfg.agent_args.clone_from(&args.agent_args);
    cfg.ca = !args.plaintext;
    let tb = Testbed::up(cfg)?;
    bed::wait_enrolled(&tb)?;
    let servers = bed::start_servers(&tb, &http, &testapp, args.http)?;
    let bench = Bench {
        tb: &tb,
        duration_s,
        runs,
        ticks: bed::clock_ticks(),
        agent_pid: agent_pid(&tb, CLIENT_NODE)?,
        other_pid: agent_pid(&tb, "node-2")?,
        mtls: !args.plaintext,
        http: args.http,
        testapp: &testapp,
    };
    let mut scenarios = Vec::with_capacity(2);
    if !args.cross_node_only {
        scenarios.push(bench.scenario("same-node", &SERVERS[0])?);
    }
    scenarios.push(bench.scenario("cross-node", &SERVERS[1])?);
    let idle = if args.cross_node_only {
        None
    } else {
        Some(
            bench
                .idle(&SERVERS[1], IDLE_CONNECTIONS)
                .context("idle keep-alive connections")?,
        )
    };
    eprintln!("bench: stopping the servers and taking the testbed down");
    drop(servers);
    tb.down().context("taking the testbed down")?;
    let load_after = bed::loadavg()?;

    let report = Report {
        machine: bed::Machine::read(),
        date,
        command: command_line(),
        load_before,
        load_after,
        runs,
        duration_s,
        elapsed_s: started.elapsed().as_secs_f64(),
        notes: markdown::notes(&http, load_before, args.quick, !args.plaintext, args.http),
        scenarios,
        idle,
    };
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&output, markdown::document(&report))
        .with_context(|| format!("writing {}", output.display()))?;
    println!("\n{}", markdown::summary(&report));
    let verdict = if report::all_targets_pass(&report) {
        "all targets met"
    } else {
        "some targets missed"
    };
    println!("{verdict}; wrote {}", output.display());
    Ok(())
}

fn agent_pid(tb: &Testbed, node: &str) -> Result<u32> {
    tb.agent_pid(node)
        .with_context(|| format!("the agent of {node} is not running"))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// `cargo xtask bench` plus the arguments we were given.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let rest = args
        .iter()
        .position(|a| a == "bench")
        .map_or(&[][..], |i| &args[i + 1..]);
    std::iter::once("cargo xtask bench".to_string())
        .chain(rest.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, Copy)]
enum Test {
    Iperf,
    /// wrk with WRK_CONNS[i] connections.
    Wrk(usize),
    /// h2load, HTTP/2 GET, at H2_STREAMS[i].
    H2(usize),
    /// h2load, gRPC unary calls, at H2_STREAMS[i].
    Grpc(usize),
}

impl Test {
    /// Index into [`report::TESTS`] and [`AgentUse`]'s arrays.
    fn index(self) -> usize {
        match self {
            Test::Iperf => 0,
            Test::Wrk(i) => 1 + i,
            Test::H2(i) => 3 + i,
            Test::Grpc(i) => 5 + i,
        }
    }
}

/// The gRPC message h2load sends: a 100-byte message in gRPC's length-prefixed framing
/// (uncompressed flag, big-endian length); grpc-echo answers `v1:` and the same bytes.
fn grpc_frame() -> Vec<u8> {
    let msg = [b'x'; 100];
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

struct Bench<'a> {
    tb: &'a Testbed,
    duration_s: u32,
    runs: u32,
    ticks: f64,
    agent_pid: u32,
    other_pid: u32,
    mtls: bool,
    /// wrk through the HTTP path (the `http` port) rather than L4 (`tcp-web`).
    http: bool,
    testapp: &'a std::path::Path,
}

impl Bench<'_> {
    /// Both agents' memory before and while the mesh client holds `n` idle connections to
    /// `server`'s Service (after one request each on the HTTP path).
    fn idle(&self, server: &ServerPod, n: usize) -> Result<report::IdleMemory> {
        let (_, cluster_ip) = bed::targets(self.tb, server.name)?;
        let port = if self.http {
            bed::MESH_HTTP_PORT
        } else {
            bed::HTTP_PORT
        };
        let before_kib = [bed::rss_kib(self.agent_pid)?, bed::rss_kib(self.other_pid)?];
        let connect = format!("{cluster_ip}:{port}");
        let count = n.to_string();
        let mut args = vec![
            "hold",
            "--connect",
            &connect,
            "--connections",
            &count,
            "--seconds",
            "300",
        ];
        if self.http {
            args.push("--http");
        }
        let mut holder = self
            .tb
            .spawn_in_pod(&Self::client(Mode::Mesh), self.testapp, &args)
            .context("starting mesh-testapp hold")?;
        holder
            .wait_for_line("holding", Duration::from_secs(120))
            .context("waiting for the connections to be open")?;
        // Let the agents settle (connections registered, buffers shrunk after the request).
        std::thread::sleep(Duration::from_secs(2));
        let holding_kib = [bed::rss_kib(self.agent_pid)?, bed::rss_kib(self.other_pid)?];
        drop(holder);
        let idle = report::IdleMemory {
            connections: n,
            before_kib,
            holding_kib,
        };
        let per = idle.per_connection_kib();
        eprintln!(
            "bench: {n} idle connections: client's agent {:.1} KiB each, server's agent {:.1} KiB each",
            per[0], per[1]
        );
        Ok(idle)
    }

    fn scenario(&self, title: &'static str, server: &ServerPod) -> Result<Scenario> {
        let (pod_ip, cluster_ip) = bed::targets(self.tb, server.name)?;
        let description = format!(
            "client on {CLIENT_NODE}, server `{MESH_NS}/{}` on {}",
            server.name, server.node
        );
        let mut sc = Scenario {
            title,
            mtls: self.mtls,
            http: self.http,
            description,
            gbps: Default::default(),
            wrk: Default::default(),
            h2: Default::default(),
            grpc: Default::default(),
            agent: AgentUse::default(),
            other_agent: AgentUse::default(),
            errors: Vec::new(),
        };
        let dst = |mode| match mode {
            Mode::Direct => pod_ip,
            Mode::Mesh => cluster_ip,
        };
        bed::reset_peak_rss(self.agent_pid)?;
        bed::reset_peak_rss(self.other_pid)?;
        for mode in [Mode::Direct, Mode::Mesh] {
            self.wrk(mode, dst(mode), 32, WARMUP_S)
                .with_context(|| format!("{title}: warm-up, {}", mode.name()))?;
            if self.http {
                // h2load checks only the HTTP status; a real gRPC client checks the answers
                // and grpc-status once per path before the load.
                self.grpc_check(mode, dst(mode))
                    .with_context(|| format!("{title}: gRPC check, {}", mode.name()))?;
            }
        }
        let mut tests = vec![Test::Iperf, Test::Wrk(0), Test::Wrk(1)];
        if self.http {
            tests.extend([Test::H2(0), Test::H2(1), Test::Grpc(0), Test::Grpc(1)]);
        }
        for run in 1..=self.runs {
            let order = if run % 2 == 1 {
                [Mode::Direct, Mode::Mesh]
            } else {
                [Mode::Mesh, Mode::Direct]
            };
            for &test in &tests {
                for mode in order {
                    let what = format!("{title}, run {run}/{}, {}", self.runs, mode.name());
                    self.measure(&mut sc, test, mode, dst(mode), &what)
                        .with_context(|| what.clone())?;
                }
            }
        }
        sc.agent.peak_rss_kib = bed::peak_rss_kib(self.agent_pid)?;
        sc.other_agent.peak_rss_kib = bed::peak_rss_kib(self.other_pid)?;
        Ok(sc)
    }

    /// One measurement, with the agents' CPU time around it and a check that the agent
    /// proxied it (mesh) or did not see it (direct).
    fn measure(
        &self,
        sc: &mut Scenario,
        test: Test,
        mode: Mode,
        dst: Ipv4Addr,
        what: &str,
    ) -> Result<()> {
        let accepted_before = bed::accepted(self.tb, CLIENT_NODE)?;
        let cpu_before = self.cpu()?;
        let started = Instant::now();
        let secs = f64::from(self.duration_s);
        let (line, work) = match test {
            Test::Iperf => {
                let gbps = self.iperf3(mode, dst)? / 1e9;
                sc.gbps.push(mode, gbps);
                (format!("iperf3 {gbps:.2} Gbit/s"), gbps * secs / 8.0)
            }
            Test::Wrk(i) => {
                let conns = WRK_CONNS[i];
                let r = self.wrk(mode, dst, conns, self.duration_s)?;
                let w = &mut sc.wrk[i];
                w.rps.push(mode, r.rps);
                w.p50_us.push(mode, r.p50_us);
                w.p99_us.push(mode, r.p99_us);
                for e in &r.errors {
                    sc.errors.push(format!("{what}, {conns} conn(s): {e}"));
                }
                let line = format!(
                    "wrk -c{conns} {:.0} req/s, p50 {:.1} us, p99 {:.1} us",
                    r.rps, r.p50_us, r.p99_us
                );
                (line, r.rps * secs)
            }
            Test::H2(i) | Test::Grpc(i) => {
                let grpc = matches!(test, Test::Grpc(_));
                let (conns, streams) = H2_STREAMS[i];
                let r = self.h2load(mode, dst, grpc, conns, streams)?;
                let w = if grpc { &mut sc.grpc[i] } else { &mut sc.h2[i] };
                w.rps.push(mode, r.rps);
                w.p50_us.push(mode, r.p50_us);
                w.p99_us.push(mode, r.p99_us);
                let kind = if grpc { "gRPC" } else { "HTTP/2" };
                for e in &r.errors {
                    sc.errors
                        .push(format!("{what}, {kind} {conns}x{streams} streams: {e}"));
                }
                let line = format!(
                    "h2load {kind} -c{conns} -m{streams} {:.0} req/s, p50 {:.1} us, p99 {:.1} us",
                    r.rps, r.p50_us, r.p99_us
                );
                (line, r.rps * secs)
            }
        };
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = self.cpu()?;
        let accepted = bed::accepted(self.tb, CLIENT_NODE)? - accepted_before;
        match mode {
            Mode::Mesh if accepted == 0 => {
                bail!(
                    "the agent of {CLIENT_NODE} proxied no connection: mesh traffic was not captured"
                )
            }
            Mode::Direct if accepted > 0 => bail!(
                "the agent of {CLIENT_NODE} accepted {accepted} connection(s) of the direct client"
            ),
            Mode::Mesh => {
                let i = test.index();
                for (a, k) in [(&mut sc.agent, 0), (&mut sc.other_agent, 1)] {
                    a.cpu_s[i] += cpu_after[k] - cpu_before[k];
                    a.wall_s[i] += wall;
                    a.work[i] += work;
                }
            }
            Mode::Direct => {}
        }
        let agent_cpu = cpu_after[0] - cpu_before[0];
        eprintln!("bench: {what}: {line} (agent CPU {agent_cpu:.2} s in {wall:.1} s)");
        Ok(())
    }

    fn cpu(&self) -> Result<[f64; 2]> {
        Ok([
            bed::cpu_seconds(self.agent_pid, self.ticks)?,
            bed::cpu_seconds(self.other_pid, self.ticks)?,
        ])
    }

    fn client(mode: Mode) -> String {
        match mode {
            Mode::Direct => format!("{DIRECT_NS}/{CLIENT}"),
            Mode::Mesh => format!("{MESH_NS}/{CLIENT}"),
        }
    }

    /// Receiver throughput in bit/s.
    fn iperf3(&self, mode: Mode, dst: Ipv4Addr) -> Result<f64> {
        let mut cmd = self.tb.pod_command(&Self::client(mode), "iperf3")?;
        let (ip, port, secs) = (
            dst.to_string(),
            bed::IPERF_PORT.to_string(),
            self.duration_s.to_string(),
        );
        cmd.args(["-c", &ip, "-p", &port, "-t", &secs, "-J"]);
        cmd.args(["--connect-timeout", "5000"]);
        let limit = Duration::from_secs(self.duration_s.into()) + SLACK;
        // On failure iperf3 -J exits 1 with {"error": ...} at the end of its JSON; the error
        // of run_bounded shows that tail.
        let out = tools::run_bounded(cmd, &format!("iperf3 -c {ip}"), limit)?;
        tools::parse_iperf3(&out.stdout)
    }

    /// h2load with `conns` connections of `streams` concurrent streams each: HTTP/2 GETs of
    /// nginx's page, or (`grpc`) unary calls to grpc-echo.
    fn h2load(
        &self,
        mode: Mode,
        dst: Ipv4Addr,
        grpc: bool,
        conns: u32,
        streams: u32,
    ) -> Result<tools::LoadResult> {
        let dir = self.tb.state_dir().join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("h2load.log");
        // A log left by an earlier run must not be read as this one's.
        match std::fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", log.display()));
            }
            _ => {}
        }
        let mut cmd = self.tb.pod_command(&Self::client(mode), "h2load")?;
        let url = if grpc {
            let body = dir.join("grpc-request.bin");
            std::fs::write(&body, grpc_frame())
                .with_context(|| format!("writing {}", body.display()))?;
            cmd.arg("-d").arg(&body).args([
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
            ]);
            format!("http://{dst}:{}/nodemesh.test.Echo/Unary", bed::GRPC_PORT)
        } else {
            format!("http://{dst}:{}/", bed::H2C_PORT)
        };
        cmd.args(["-t1", &format!("-c{conns}"), &format!("-m{streams}")])
            .arg(format!("-D{}", self.duration_s))
            .arg(format!("--log-file={}", log.display()))
            .arg(&url);
        let limit = Duration::from_secs(self.duration_s.into()) + SLACK;
        let what = format!("h2load -c{conns} -m{streams} {url}");
        let out = tools::run_bounded(cmd, &what, limit)?;
        let log_text = std::fs::read_to_string(&log)
            .with_context(|| format!("reading {} (h2load --log-file)", log.display()))?;
        tools::parse_h2load(&out.stdout, &log_text).with_context(|| what.clone())
    }

    /// A real gRPC client (tonic, `mesh-testapp grpc`) makes unary calls and a bidirectional
    /// stream on the path h2load will load, and checks every answer.
    fn grpc_check(&self, mode: Mode, dst: Ipv4Addr) -> Result<()> {
        let mut cmd = self.tb.pod_command(&Self::client(mode), self.testapp)?;
        let connect = format!("{dst}:{}", bed::GRPC_PORT);
        cmd.args(["grpc", "--connect", &connect, "--unary", "3", "--chat", "3"]);
        let out = tools::run_bounded(cmd, &format!("mesh-testapp grpc {connect}"), SLACK)?;
        if !(out.stdout.contains("unary 3 ok") && out.stdout.contains("chat 3 ok")) {
            bail!("mesh-testapp grpc {connect}: {}", out.stdout.trim());
        }
        Ok(())
    }

    fn wrk(&self, mode: Mode, dst: Ipv4Addr, conns: u32, secs: u32) -> Result<tools::LoadResult> {
        let mut cmd = self.tb.pod_command(&Self::client(mode), "wrk")?;
        let threads = if conns > 1 { 2 } else { 1 };
        let port = match mode {
            Mode::Mesh if self.http => bed::MESH_HTTP_PORT,
            _ => bed::HTTP_PORT,
        };
        let url = format!("http://{dst}:{port}/");
        cmd.arg(format!("-t{threads}"))
            .arg(format!("-c{conns}"))
            .arg(format!("-d{secs}s"))
            .args(["--latency", &url]);
        let limit = Duration::from_secs(secs.into()) + SLACK;
        let out = tools::run_bounded(cmd, &format!("wrk -c{conns} {url}"), limit)?;
        tools::parse_wrk(&out.stdout)
    }
}
