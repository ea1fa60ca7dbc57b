//! Rendering results: the tables printed to stdout and the whole of docs/benchmarks.md.

use std::fmt::Write as _;

use super::bed::{CLIENT, CLIENT_NODE, DIRECT_NS, HttpServer, MESH_NS};
use super::report::{
    AgentUse, H2_STREAMS, LoadSamples, Report, Samples, Scenario, TESTS, WRK_CONNS, targets,
};
use super::tools;

fn lat(us: f64) -> String {
    if us.abs() < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn gbit(v: f64) -> String {
    format!("{v:.2}")
}

fn rate(v: f64) -> String {
    format!("{v:.0}")
}

fn list(v: &[f64], f: fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

/// One line of a scenario's tables.
struct Row<'a> {
    name: String,
    samples: &'a Samples,
    fmt: fn(f64) -> String,
    /// Latencies are compared by difference, the rest by ratio.
    latency: bool,
}

fn rows<'a>(s: &'a Scenario) -> Vec<Row<'a>> {
    let row = |name: String, samples, fmt, latency| Row {
        name,
        samples,
        fmt,
        latency,
    };
    let mut out = vec![row("iperf3, 1 stream, Gbit/s".into(), &s.gbps, gbit, false)];
    let mut load = |what: String, w: &'a LoadSamples| {
        out.push(row(format!("{what}, requests/s"), &w.rps, rate, false));
        out.push(row(format!("{what}, p50 latency"), &w.p50_us, lat, true));
        out.push(row(format!("{what}, p99 latency"), &w.p99_us, lat, true));
    };
    for (w, c) in s.wrk.iter().zip(WRK_CONNS) {
        let conns = if c == 1 { "1 conn" } else { "32 conns" };
        load(format!("wrk {conns}"), w);
    }
    for (kind, samples) in [("HTTP/2", &s.h2), ("gRPC", &s.grpc)] {
        for (w, (c, m)) in samples.iter().zip(H2_STREAMS) {
            let streams = if c * m == 1 {
                "1 stream".to_string()
            } else {
                format!("{} streams ({c} conns)", c * m)
            };
            load(format!("h2load {kind} {streams}"), w);
        }
    }
    // Loads that did not run (h2load without `--http`) have no rows.
    out.retain(|r| !(r.samples.direct.is_empty() && r.samples.mesh.is_empty()));
    out
}

/// CPU, cores, CPU per unit of work and peak RSS of an agent.
fn agent_use(a: &AgentUse) -> String {
    let (cpu, wall) = (a.cpu_total(), a.wall_total());
    let mut per = Vec::new();
    for (i, name) in TESTS.iter().enumerate() {
        // Per-unit figures only where the agent did measurable work.
        if a.work[i] <= 0.0 || a.cpu_s[i] < 0.05 {
            continue;
        }
        let v = a.cpu_s[i] / a.work[i];
        per.push(if i == 0 {
            format!("{v:.2} CPU s per GB ({name})")
        } else {
            format!("{:.1} CPU µs per request ({name})", v * 1e6)
        });
    }
    let per = if per.is_empty() {
        String::new()
    } else {
        format!("; {}", per.join(", "))
    };
    format!(
        "{cpu:.1} CPU s over {wall:.1} s of mesh load ({:.2} cores){per}; peak RSS {:.1} MB",
        cpu / wall.max(1e-9),
        a.peak_rss_mb()
    )
}

/// The medians table of a scenario, and its agent's resource use.
fn scenario_table(s: &Scenario) -> String {
    let mut t = String::from(
        "| measurement | direct | mesh | mesh/direct (latency: added) |\n|---|---:|---:|---:|\n",
    );
    for r in rows(s) {
        let Some((d, m)) = r.samples.medians() else {
            continue;
        };
        let cmp = if r.latency {
            let added = lat(m - d);
            if m >= d { format!("+{added}") } else { added }
        } else {
            format!("{:.2}", m / d)
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {cmp} |",
            r.name,
            (r.fmt)(d),
            (r.fmt)(m)
        );
    }
    let _ = writeln!(
        t,
        "\nAgent of node-1 (proxies the mesh client): {}.",
        agent_use(&s.agent)
    );
    t
}

fn samples_table(s: &Scenario) -> String {
    let mut t =
        String::from("| measurement | direct, each run | mesh, each run |\n|---|---|---|\n");
    for r in rows(s) {
        let (d, m) = (&r.samples.direct, &r.samples.mesh);
        let _ = writeln!(
            t,
            "| {} | {} | {} |",
            r.name,
            list(d, r.fmt),
            list(m, r.fmt)
        );
    }
    t
}

fn targets_table(s: &Scenario) -> String {
    let mut t =
        String::from("| target (cross-node, medians) | required | got | |\n|---|---|---:|---|\n");
    for x in targets(s) {
        let verdict = if x.pass { "pass" } else { "**FAIL**" };
        let _ = writeln!(t, "| {} | {} | {} | {verdict} |", x.name, x.required, x.got);
    }
    t
}

/// What `cargo xtask bench` prints: the medians tables and the targets.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    for s in &r.scenarios {
        let _ = writeln!(
            out,
            "{} ({})\n\n{}",
            s.title,
            s.description,
            scenario_table(s)
        );
        if s.title == "cross-node" {
            let _ = writeln!(out, "{}", targets_table(s));
        }
    }
    out
}

fn load(l: [f64; 3]) -> String {
    format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])
}

/// The whole of docs/benchmarks.md.
pub fn document(r: &Report) -> String {
    let m = &r.machine;
    let mut out = String::from("# Benchmarks\n\n");
    out.push_str(
        "Generated by `cargo xtask bench` (xtask/src/bench.rs); do not edit by hand, run it \
         again. Direct connections and connections through the mesh are measured in the same \
         run, alternating, and compared by their medians. The ratios matter more than the \
         absolute figures, which depend on the machine and on what else it was doing.\n\n",
    );
    let _ = writeln!(out, "- date: {}", r.date);
    let _ = writeln!(out, "- command: `{}`", r.command);
    let mtls = r.scenarios.first().is_some_and(|s| s.mtls);
    let http = r.scenarios.first().is_some_and(|s| s.http);
    let _ = writeln!(
        out,
        "- wrk path: {}",
        if http {
            "HTTP (the client's agent parses and balances each request; `--http`)"
        } else {
            "L4 (a `tcp-web` Service port)"
        }
    );
    let _ = writeln!(
        out,
        "- mesh traffic: {}",
        if mtls {
            "mutual TLS 1.3 between the agents (HBONE: HTTP/2 CONNECT on 15008, rustls with ring, AES-GCM)"
        } else {
            "plaintext TCP between the agents (`--plaintext`: no CA)"
        }
    );
    let _ = writeln!(
        out,
        "- machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}",
        m.cpus, m.cpu_model, m.mem_gib, m.kernel
    );
    let _ = writeln!(
        out,
        "- load average (1/5/15 min): {} before, {} after",
        load(r.load_before),
        load(r.load_after)
    );
    let _ = writeln!(
        out,
        "- {} run(s) of {} s per measurement and mode; {:.0} s in all\n",
        r.runs, r.duration_s, r.elapsed_s
    );
    for s in &r.scenarios {
        let _ = writeln!(
            out,
            "## {} ({})\n\n{}",
            s.title,
            s.description,
            scenario_table(s)
        );
        if s.title == "cross-node" {
            let _ = writeln!(out, "### Targets\n\n{}", targets_table(s));
        }
    }
    if let Some(idle) = &r.idle {
        let _ = writeln!(
            out,
            "{}",
            idle_section(idle, r.scenarios.first().is_some_and(|s| s.http))
        );
    }
    out.push_str("## Notes\n\n");
    for n in &r.notes {
        let _ = writeln!(out, "- {n}");
    }
    for s in &r.scenarios {
        let _ = writeln!(
            out,
            "- {}: agent of node-2: {}.",
            s.title,
            agent_use(&s.other_agent)
        );
        for e in &s.errors {
            let _ = writeln!(out, "- {}: the load generator reported {e}", s.title);
        }
    }
    out.push_str("\n## Every run\n\n");
    for s in &r.scenarios {
        let _ = writeln!(out, "### {}\n\n{}", s.title, samples_table(s));
    }
    out
}

/// What idle keep-alive connections cost each agent.
fn idle_section(idle: &super::report::IdleMemory, http: bool) -> String {
    let per = idle.per_connection_kib();
    let mut out = format!(
        "## Idle keep-alive connections\n\n`mesh-testapp hold` in the mesh client pod opens {} \
         connections to the cross-node server's Service{}, then keeps them idle; each agent's \
         resident memory (VmRSS) before and while they are held:\n\n\
         | agent | RSS before | RSS holding | per connection |\n|---|---|---|---|\n",
        idle.connections,
        if http {
            " (one HTTP/1.1 request each, on the HTTP port)"
        } else {
            " (L4 port, no request)"
        }
    );
    for (i, name) in ["client's (node-1)", "server's (node-2)"]
        .iter()
        .enumerate()
    {
        let _ = writeln!(
            out,
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
            idle.before_kib[i] as f64 / 1024.0,
            idle.holding_kib[i] as f64 / 1024.0,
            per[i]
        );
    }
    if http {
        let t = super::report::idle_target(idle);
        let _ = writeln!(
            out,
            "\nTarget (L7 issue): {} {}: {} — {}\n",
            t.name,
            t.required,
            t.got,
            if t.pass { "pass" } else { "FAIL" }
        );
    }
    out
}

/// The notes the report carries, besides each scenario's agent figures and wrk errors.
pub fn notes(
    http: &HttpServer,
    load: [f64; 3],
    quick: bool,
    mtls: bool,
    http_path: bool,
) -> Vec<String> {
    let mut n = Vec::new();
    if quick {
        n.push("`--quick` smoke run (1 run of 2 s): not meant for comparison.".to_string());
    }
    if load[0] >= 0.5 {
        n.push(format!(
            "The machine was not quiet: 1-minute load average {:.2} before the run (other \
             builds and tests were running on this shared VM). Absolute figures are noisy; \
             the alternating runs keep the ratios more trustworthy than the absolute values.",
            load[0]
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    n.push(format!(
        "Load generators, servers and agents all share this machine's {cpus} CPUs: the \
         agent's CPU time is taken from the client and the server, so the mesh/direct ratios \
         reflect the mesh's CPU cost as well as its extra hop."
    ));
    n.push(format!("HTTP server: {}.", http.describe()));
    n.push(format!(
        "Load generators: {} (`iperf3 -c <ip> -t <s> -J`, the receiver's bits_per_second); \
         {} (`wrk -t1 -c1` and `wrk -t2 -c32`, `-d <s>s --latency`, GET /).",
        tools::version("iperf3", "--version"),
        tools::version("wrk", "-v")
    ));
    n.push(format!(
        "Direct: pod `{DIRECT_NS}/{CLIENT}` (unlabelled namespace, not captured) to the server \
         pod's IP. Mesh: pod `{MESH_NS}/{CLIENT}` (namespace labelled nodemesh.io/enabled=true) \
         to the server's Service ClusterIP; eBPF redirects the connection to the agent of \
         {CLIENT_NODE}, which connects to the pod IP from inside the client's network namespace. \
         Every measurement checks through the agent's /stats that mesh connections were \
         proxied and direct ones were not."
    ));
    n.push(if mtls {
        "The mesh servers are pods in the enrolled namespace, so a mesh connection passes \
         through both agents: the client's (outbound, over loopback in the client's namespace) \
         and the server's (HBONE on 15008, then over loopback in the server's namespace), with \
         mutual TLS between them. The direct baseline's servers are outside the mesh."
            .to_string()
    } else {
        "Without the CA there is no inbound capture: the only proxy on a mesh connection is \
         the client node's agent (one extra hop over loopback in the client's namespace)."
            .to_string()
    });
    n.push(if http_path {
        format!(
            "wrk goes to the Service port named `http` ({}): the client's agent parses HTTP/1.1, \
             balances each request and sends it as a stream of an HTTP/2 connection inside HBONE \
             shared by the client pod's connections; the server's agent parses each request again \
             (metrics, access log, span) and sends it to the app in HTTP/1.1. iperf3 stays L4.",
            super::bed::MESH_HTTP_PORT
        )
    } else {
        format!(
            "wrk goes to the Service port named `tcp-web` ({}): L4 at both agents (`--http` \
             measures the HTTP path).",
            super::bed::HTTP_PORT
        )
    });
    if http_path {
        n.push(format!(
            "h2load ({}, `-t1 -c<conns> -m<streams> -D <s> --log-file`; p50/p99 from the log \
             file's per-request times, successful requests only): HTTP/2 GET / to the Service \
             port named `http2` ({}; h2c with prior knowledge, nginx's `listen ... http2`), and \
             gRPC unary calls (POST /nodemesh.test.Echo/Unary, a 100-byte message, \
             `content-type: application/grpc`) to the port named `grpc` ({}; `mesh-testapp \
             grpc-echo`, tonic). Both agents parse each request as HTTP/2; before the load a \
             tonic client checks unary answers, a bidirectional stream and trailers on each path. \
             The 32-stream figures are 4 connections of 8 concurrent streams.",
            tools::version("h2load", "--version"),
            super::bed::H2C_PORT,
            super::bed::GRPC_PORT
        ));
    }
    n.push(
        "Each run measures direct and mesh back to back, the order flipping every run; a 1 s \
         wrk warm-up per scenario and mode comes first. The agent is a release build with \
         default flags (buffers per direction start at 16 KiB and grow to 64 KiB for bulk \
         transfers)."
            .to_string(),
    );
    n.push(
        "Agent CPU: utime + stime from /proc/<pid>/stat, summed over the mesh measurements \
         only. Peak RSS: VmHWM from /proc/<pid>/status, reset (clear_refs 5) at the start of \
         each scenario. MB = 10^6 bytes."
            .to_string(),
    );
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::scenario;

    #[test]
    fn tables() {
        let s = scenario();
        let table = scenario_table(&s);
        assert!(
            table.contains("| iperf3, 1 stream, Gbit/s | 18.00 | 9.50 | 0.53 |"),
            "{table}"
        );
        assert!(
            table.contains("| wrk 1 conn, p50 latency | 40.0 µs | 65.0 µs | +25.0 µs |"),
            "{table}"
        );
        assert!(
            table.contains("3.0 CPU s over 15.0 s of mesh load (0.20 cores)"),
            "{table}"
        );
        assert!(
            table.contains("0.17 CPU s per GB (iperf3), 10.0 CPU µs per request (wrk 1 conn)"),
            "{table}"
        );
        assert!(
            targets_table(&s).contains("| wrk 1 conn, added p50 | ≤ 30 µs | +25.0 µs | pass |")
        );
        assert_eq!(lat(-1880.0), "-1.88 ms");
    }
}
