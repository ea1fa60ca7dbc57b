//! Results: samples, medians, the targets, and the markdown report.

use std::fmt::Write as _;

use super::bed::Machine;

/// Direct connection or through the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    Mesh,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
        }
    }
}

/// One value per run and mode.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub direct: Vec<f64>,
    pub mesh: Vec<f64>,
}

impl Samples {
    pub fn push(&mut self, mode: Mode, v: f64) {
        match mode {
            Mode::Direct => self.direct.push(v),
            Mode::Mesh => self.mesh.push(v),
        }
    }

    fn medians(&self) -> Option<(f64, f64)> {
        Some((median(&self.direct)?, median(&self.mesh)?))
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// wrk results at one connection count.
#[derive(Debug, Default, Clone)]
pub struct WrkSamples {
    pub rps: Samples,
    pub p50_us: Samples,
    pub p99_us: Samples,
}

/// An agent's resource use over a scenario.
#[derive(Debug, Default, Clone)]
pub struct AgentUse {
    /// CPU seconds (user + system) consumed during the mesh measurements.
    pub cpu_s: f64,
    /// Wall-clock seconds of those measurements.
    pub wall_s: f64,
    /// VmHWM at the end of the scenario (reset at its start), KiB.
    pub peak_rss_kib: u64,
}

impl AgentUse {
    fn describe(&self) -> String {
        format!(
            "{:.1} CPU s over {:.1} s of mesh load ({:.2} cores), peak RSS {:.1} MB",
            self.cpu_s,
            self.wall_s,
            self.cpu_s / self.wall_s.max(1e-9),
            mb(self.peak_rss_kib)
        )
    }
}

pub struct Scenario {
    /// `same-node` or `cross-node`.
    pub title: &'static str,
    pub description: String,
    /// iperf3 receiver throughput, Gbit/s.
    pub gbps: Samples,
    /// wrk at 1 and at 32 connections.
    pub wrk: [WrkSamples; 2],
    /// The agent of the clients' node (it proxies the mesh traffic).
    pub agent: AgentUse,
    /// The agent of the other node.
    pub other_agent: AgentUse,
    /// wrk's socket errors / non-2xx lines, prefixed with the measurement.
    pub errors: Vec<String>,
}

pub const WRK_CONNS: [u32; 2] = [1, 32];

pub struct Report {
    pub machine: Machine,
    pub date: String,
    pub command: String,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    pub runs: u32,
    pub duration_s: u32,
    pub elapsed_s: f64,
    pub notes: Vec<String>,
    pub scenarios: Vec<Scenario>,
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn lat(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn list(v: &[f64], f: fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

fn gbit(v: f64) -> String {
    format!("{v:.2}")
}

fn rate(v: f64) -> String {
    format!("{v:.0}")
}

/// Rows: (measurement, samples, value formatter, latency?).
fn rows(s: &Scenario) -> Vec<(String, &Samples, fn(f64) -> String, bool)> {
    let mut out: Vec<(String, &Samples, fn(f64) -> String, bool)> = vec![(
        "iperf3, 1 stream, Gbit/s".to_string(),
        &s.gbps,
        gbit,
        false,
    )];
    for (w, c) in s.wrk.iter().zip(WRK_CONNS) {
        let conns = if c == 1 { "1 conn" } else { "32 conns" };
        out.push((format!("wrk {conns}, requests/s"), &w.rps, rate, false));
        out.push((format!("wrk {conns}, p50 latency"), &w.p50_us, lat, true));
        out.push((format!("wrk {conns}, p99 latency"), &w.p99_us, lat, true));
    }
    out
}

/// The medians table of a scenario.
fn scenario_table(s: &Scenario) -> String {
    let mut t = String::from(
        "| measurement | direct | mesh | mesh/direct (latency: added) |\n|---|---:|---:|---:|\n",
    );
    for (name, samples, f, is_lat) in rows(s) {
        let Some((d, m)) = samples.medians() else {
            continue;
        };
        let cmp = if is_lat {
            format!("{:+.1} µs", m - d)
        } else {
            format!("{:.2}", m / d)
        };
        let _ = writeln!(t, "| {name} | {} | {} | {cmp} |", f(d), f(m));
    }
    let _ = writeln!(
        t,
        "\nAgent of node-1 (proxies the mesh client): {}.",
        s.agent.describe()
    );
    t
}

fn samples_table(s: &Scenario) -> String {
    let mut t = String::from("| measurement | direct, each run | mesh, each run |\n|---|---|---|\n");
    for (name, samples, f, _) in rows(s) {
        let _ = writeln!(
            t,
            "| {name} | {} | {} |",
            list(&samples.direct, f),
            list(&samples.mesh, f)
        );
    }
    t
}

/// (target, required, got, pass) for the cross-node scenario.
fn targets(s: &Scenario) -> Vec<(&'static str, &'static str, String, bool)> {
    let mut out = Vec::new();
    if let Some((d, m)) = s.gbps.medians() {
        let r = m / d;
        out.push(("iperf3 throughput, mesh/direct", "≥ 0.50", format!("{r:.2}"), r >= 0.5));
    }
    if let Some((d, m)) = s.wrk[1].rps.medians() {
        let r = m / d;
        out.push(("wrk 32 conns, requests/s mesh/direct", "≥ 0.60", format!("{r:.2}"), r >= 0.6));
    }
    if let Some((d, m)) = s.wrk[0].p50_us.medians() {
        let added = m - d;
        let got = format!("{added:+.1} µs");
        out.push(("wrk 1 conn, added p50", "≤ 30 µs", got, added <= 30.0));
    }
    let rss = mb(s.agent.peak_rss_kib);
    out.push(("agent peak RSS under that load", "≤ 20 MB", format!("{rss:.1} MB"), rss <= 20.0));
    out
}

fn targets_table(s: &Scenario) -> String {
    let mut t = String::from("| target (cross-node, medians) | required | got | |\n|---|---|---:|---|\n");
    for (name, req, got, pass) in targets(s) {
        let verdict = if pass { "pass" } else { "**FAIL**" };
        let _ = writeln!(t, "| {name} | {req} | {got} | {verdict} |");
    }
    t
}

/// Whether every target holds (false if there is no cross-node scenario).
pub fn all_targets_pass(r: &Report) -> bool {
    r.scenarios
        .iter()
        .find(|s| s.title == "cross-node")
        .is_some_and(|s| targets(s).iter().all(|t| t.3))
}

/// What `cargo xtask bench` prints: the medians tables and the targets.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    for s in &r.scenarios {
        let _ = writeln!(out, "{} ({})\n\n{}", s.title, s.description, scenario_table(s));
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
pub fn markdown(r: &Report) -> String {
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
        "- {} run(s) of {} s per measurement and mode; total {:.0} s\n",
        r.runs, r.duration_s, r.elapsed_s
    );
    for s in &r.scenarios {
        let _ = writeln!(out, "## {} ({})\n\n{}", s.title, s.description, scenario_table(s));
        if s.title == "cross-node" {
            let _ = writeln!(out, "### Targets\n\n{}", targets_table(s));
        }
    }
    out.push_str("## Notes\n\n");
    for n in &r.notes {
        let _ = writeln!(out, "- {n}");
    }
    for s in &r.scenarios {
        let _ = writeln!(out, "- {}: agent of node-2: {}.", s.title, s.other_agent.describe());
        for e in &s.errors {
            let _ = writeln!(out, "- {}: wrk reported {e}", s.title);
        }
    }
    out.push_str("\n## Every run\n\n");
    for s in &r.scenarios {
        let _ = writeln!(out, "### {}\n\n{}", s.title, samples_table(s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn targets_pass_and_fail() {
        let mut s = Scenario {
            title: "cross-node",
            description: String::new(),
            gbps: Samples { direct: vec![18.0], mesh: vec![9.5] },
            wrk: Default::default(),
            agent: AgentUse { cpu_s: 1.0, wall_s: 10.0, peak_rss_kib: 12_000 },
            other_agent: AgentUse::default(),
            errors: Vec::new(),
        };
        s.wrk[0].p50_us = Samples { direct: vec![40.0], mesh: vec![65.0] };
        s.wrk[1].rps = Samples { direct: vec![60_000.0], mesh: vec![30_000.0] };
        let t = targets(&s);
        let pass: Vec<bool> = t.iter().map(|t| t.3).collect();
        assert_eq!(pass, [true, false, true, true]);
        assert_eq!(t[2].2, "+25.0 µs");
        let table = scenario_table(&s);
        assert!(table.contains("| iperf3, 1 stream, Gbit/s | 18.00 | 9.50 | 0.53 |"), "{table}");
    }
}
