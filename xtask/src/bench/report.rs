//! Results: samples, medians, the agents' resource use and the targets.

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

    /// (direct, mesh) medians.
    pub fn medians(&self) -> Option<(f64, f64)> {
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

/// A request load's results (wrk or h2load) at one concurrency.
#[derive(Debug, Default, Clone)]
pub struct LoadSamples {
    pub rps: Samples,
    pub p50_us: Samples,
    pub p99_us: Samples,
}

/// Connection counts of the wrk measurements.
pub const WRK_CONNS: [u32; 2] = [1, 32];
/// h2load's concurrency: (connections, streams per connection), 1 and 32 requests in flight.
pub const H2_STREAMS: [(u32, u32); 2] = [(1, 1), (4, 8)];
/// Measurements, in the order of [`AgentUse`]'s arrays.
pub const TESTS: [&str; 7] = [
    "iperf3",
    "wrk 1 conn",
    "wrk 32 conns",
    "HTTP/2 1 stream",
    "HTTP/2 32 streams",
    "gRPC 1 stream",
    "gRPC 32 streams",
];

/// An agent's resource use during a scenario's mesh measurements.
#[derive(Debug, Default, Clone)]
pub struct AgentUse {
    /// CPU seconds (user + system) per measurement kind ([`TESTS`]).
    pub cpu_s: [f64; TESTS.len()],
    /// Wall-clock seconds per measurement kind.
    pub wall_s: [f64; TESTS.len()],
    /// Work done per measurement kind: gigabytes received (iperf3), requests (the others).
    pub work: [f64; TESTS.len()],
    /// VmHWM at the end of the scenario (reset at its start), KiB.
    pub peak_rss_kib: u64,
}

impl AgentUse {
    pub fn cpu_total(&self) -> f64 {
        self.cpu_s.iter().sum()
    }

    pub fn wall_total(&self) -> f64 {
        self.wall_s.iter().sum()
    }

    pub fn peak_rss_mb(&self) -> f64 {
        self.peak_rss_kib as f64 * 1024.0 / 1e6
    }
}

pub struct Scenario {
    /// `same-node` or `cross-node`.
    pub title: &'static str,
    /// Mesh traffic went over mutual TLS (HBONE) rather than plaintext TCP.
    pub mtls: bool,
    /// wrk went through the agents' HTTP path (per-request balancing) rather than L4.
    pub http: bool,
    pub description: String,
    /// iperf3 receiver throughput, Gbit/s.
    pub gbps: Samples,
    /// wrk at [`WRK_CONNS`] connections.
    pub wrk: [LoadSamples; 2],
    /// h2load, HTTP/2 (h2c) to nginx, at [`H2_STREAMS`] (only with `--http`).
    pub h2: [LoadSamples; 2],
    /// h2load, gRPC unary calls to mesh-testapp grpc-echo, at [`H2_STREAMS`] (`--http`).
    pub grpc: [LoadSamples; 2],
    /// The agent of the clients' node (it proxies the mesh traffic).
    pub agent: AgentUse,
    /// The agent of the other node.
    pub other_agent: AgentUse,
    /// wrk's and h2load's errors (socket errors, failed requests, non-2xx), prefixed with the
    /// measurement.
    pub errors: Vec<String>,
}

/// What idle keep-alive connections cost the agents: their resident memory before and while
/// a client holds `connections` open (each after one request on the HTTP path).
#[derive(Clone, Debug, Default)]
pub struct IdleMemory {
    pub connections: usize,
    /// VmRSS in KiB: [client's agent, server's agent].
    pub before_kib: [u64; 2],
    pub holding_kib: [u64; 2],
}

impl IdleMemory {
    /// KiB per connection, for each agent.
    pub fn per_connection_kib(&self) -> [f64; 2] {
        let per = |i: usize| {
            (self.holding_kib[i] as f64 - self.before_kib[i] as f64)
                / self.connections.max(1) as f64
        };
        [per(0), per(1)]
    }
}

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
    /// Idle keep-alive connections to the cross-node server.
    pub idle: Option<IdleMemory>,
}

/// One of the targets, evaluated.
pub struct Target {
    pub name: &'static str,
    pub required: String,
    pub got: String,
    pub pass: bool,
}

/// The issues' targets, for the cross-node scenario: with mutual TLS (HBONE, issue 4, set
/// against Istio ztunnel's figures on this kind of machine), or plaintext L4 (issue 3).
pub fn targets(s: &Scenario) -> Vec<Target> {
    if s.http {
        return http_targets(s);
    }
    let (gbps, rps, p50) = if s.mtls {
        (0.45, 0.50, 35.0)
    } else {
        (0.50, 0.60, 30.0)
    };
    let mut out = Vec::new();
    let mut add = |name, required, got, pass| {
        out.push(Target {
            name,
            required,
            got,
            pass,
        });
    };
    if let Some((d, m)) = s.gbps.medians() {
        let r = m / d;
        add(
            "iperf3 throughput, mesh/direct",
            format!("≥ {gbps:.2}"),
            format!("{r:.2}"),
            r >= gbps,
        );
    }
    if let Some((d, m)) = s.wrk[1].rps.medians() {
        let r = m / d;
        let name = "wrk 32 conns, requests/s mesh/direct";
        add(name, format!("≥ {rps:.2}"), format!("{r:.2}"), r >= rps);
    }
    if let Some((d, m)) = s.wrk[0].p50_us.medians() {
        let added = m - d;
        let got = format!("{added:+.1} µs");
        add(
            "wrk 1 conn, added p50",
            format!("≤ {p50:.0} µs"),
            got,
            added <= p50,
        );
    }
    let rss = s.agent.peak_rss_mb();
    let name = "agent peak RSS under that load";
    add(name, "≤ 20 MB".into(), format!("{rss:.1} MB"), rss <= 20.0);
    out
}

/// The L7 issue's targets: HTTP/1.1 through both agents, cross-node.
fn http_targets(s: &Scenario) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some((d, m)) = s.wrk[1].rps.medians() {
        let r = m / d;
        out.push(Target {
            name: "wrk 32 conns (HTTP), requests/s mesh/direct",
            required: "≥ 0.50".into(),
            got: format!("{r:.2}"),
            pass: r >= 0.50,
        });
    }
    if let Some((d, m)) = s.wrk[0].p50_us.medians() {
        let added = m - d;
        out.push(Target {
            name: "wrk 1 conn (HTTP), added p50",
            required: "≤ 35 µs".into(),
            got: format!("{added:+.1} µs"),
            pass: added <= 35.0,
        });
    }
    // Both agents' CPU per request at 32 connections (index 2 of TESTS).
    let per_request = |a: &AgentUse| {
        if a.work[2] > 0.0 {
            a.cpu_s[2] / a.work[2] * 1e6
        } else {
            0.0
        }
    };
    let cpu = per_request(&s.agent) + per_request(&s.other_agent);
    if cpu > 0.0 {
        out.push(Target {
            name: "agent CPU per request, both agents (wrk 32 conns)",
            required: "≤ 30 µs".into(),
            got: format!("{cpu:.1} µs"),
            pass: cpu <= 30.0,
        });
    }
    out
}

/// The L7 issue's memory target: at most 16 KB per idle keep-alive connection in either agent.
pub fn idle_target(idle: &IdleMemory) -> Target {
    let [client, server] = idle.per_connection_kib();
    let worst = client.max(server) * 1.024; // KiB to kB
    Target {
        name: "agent memory per idle keep-alive connection (the larger of the two agents)",
        required: "≤ 16 KB".into(),
        got: format!("{worst:.1} KB"),
        pass: worst <= 16.0,
    }
}

/// Whether every target holds (false if there is no cross-node scenario).
pub fn all_targets_pass(r: &Report) -> bool {
    let http = r.scenarios.first().is_some_and(|s| s.http);
    let idle_ok = match (&r.idle, http) {
        (Some(i), true) => idle_target(i).pass,
        _ => true,
    };
    idle_ok
        && r.scenarios
            .iter()
            .find(|s| s.title == "cross-node")
            .is_some_and(|s| targets(s).iter().all(|t| t.pass))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn scenario() -> Scenario {
        let mut s = Scenario {
            title: "cross-node",
            mtls: false,
            http: false,
            description: String::new(),
            gbps: Samples {
                direct: vec![18.0],
                mesh: vec![9.5],
            },
            wrk: Default::default(),
            h2: Default::default(),
            grpc: Default::default(),
            agent: AgentUse {
                cpu_s: [1.0, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0],
                wall_s: [5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0],
                work: [6.0, 50_000.0, 150_000.0, 0.0, 0.0, 0.0, 0.0],
                peak_rss_kib: 12_000,
            },
            other_agent: AgentUse::default(),
            errors: Vec::new(),
        };
        s.wrk[0].p50_us = Samples {
            direct: vec![40.0],
            mesh: vec![65.0],
        };
        s.wrk[1].rps = Samples {
            direct: vec![60_000.0],
            mesh: vec![30_000.0],
        };
        s
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn targets_pass_and_fail() {
        let t = targets(&scenario());
        let pass: Vec<bool> = t.iter().map(|t| t.pass).collect();
        assert_eq!(pass, [true, false, true, true]);
        assert_eq!(t[2].got, "+25.0 µs");
        assert_eq!(t[3].got, "12.3 MB");
    }
}
