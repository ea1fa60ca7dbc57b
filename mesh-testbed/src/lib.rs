//! nodemesh testbed: Kubernetes-like nodes and pods as network namespaces, veth links and
//! cgroup v2 groups on one machine, with the mesh agent running per node in local mode.
//!
//! ```text
//!   fabric netns: bridge br0 ── veth ── node-i netns (eth0 10.250.0.i/24, ip_forward=1)
//!                                          │  routes: 10.244.j.0/24 via 10.250.0.j
//!                                          └─ veth (proxy_arp) ── pod netns (eth0 10.244.i.n/32,
//!                                                                  default via 169.254.1.1)
//! ```
//!
//! Everything a testbed creates carries its prefix (`nm<4 hex>`, or `nmtb` for the CLI's
//! testbed) and is removed by [`Testbed::down`], on drop, and when [`Testbed::up`] fails
//! halfway. Integration tests guard themselves with [`require_root`].

mod access;
mod admin_client;
mod agent;
mod ca;
mod cgroup;
mod cmd;
pub mod fake_kube;
mod ipam;
mod netns;
mod process;
mod render;
mod teardown;
mod testbed;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use agent::tail;
pub use ca::{CA_IP, CA_PORT};
pub use cgroup::{cgroup2_mount, of_pid as cgroup_of_pid};
pub use ipam::{POD_GATEWAY, node_ip, node_name, pod_cidr};
pub use netns::{NETNS_DIR, netns_path, sysctl_get as netns_sysctl};
pub use process::{PodProcess, ProcId, status_kib};
pub use render::NETNS_ANNOTATION;
pub use teardown::{list_testbeds, orphan_prefixes, remove_leftovers};
pub use testbed::{NodeInfo, PodInfo, Testbed};

/// Where testbeds keep their state: `<STATE_ROOT>/<prefix>/`.
pub const STATE_ROOT: &str = "/run/nodemesh-testbed";
/// Prefix of the testbed the `cargo xtask testbed` CLI manages.
pub const CLI_PREFIX: &str = "nmtb";

/// What to build.
#[derive(Debug, Clone)]
pub struct TestbedConfig {
    /// Number of nodes (`node-1` .. `node-N`), default 2.
    pub nodes: usize,
    /// Manifest files as (file name, YAML). Rendered to `<state>/manifests/<file name>`.
    pub manifests: Vec<(String, String)>,
    /// The mesh-agent binary. When set (and `start_agents`), `up` starts one agent per node
    /// and waits until each is ready.
    pub agent_bin: Option<PathBuf>,
    /// Start the agents during `up` (default true; only matters with `agent_bin`).
    pub start_agents: bool,
    /// Extra arguments appended to every agent's command line.
    pub agent_args: Vec<String>,
    /// A human-readable label (e.g. the test name), recorded in `testbed.json`.
    pub name_hint: Option<String>,
    /// Fixed prefix instead of a generated unique one (the CLI uses [`CLI_PREFIX`]).
    pub prefix: Option<String>,
    /// Start agents in their own session so they outlive the invoking process (the CLI).
    pub detach: bool,
    /// Run the mesh CA (`<agent_bin> ca`) in the fabric namespace on 10.250.0.254:15012
    /// (root generated into `<state>/ca`, one random token per node) before the agents, and
    /// give every agent `--ca-addr`, `--ca-root` and `--ca-token-file`. Needs `agent_bin`.
    pub ca: bool,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            manifests: Vec::new(),
            agent_bin: None,
            start_agents: true,
            agent_args: Vec::new(),
            name_hint: None,
            prefix: None,
            detach: false,
            ca: false,
        }
    }
}

impl TestbedConfig {
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            ..Self::default()
        }
    }

    /// Adds one manifest file.
    pub fn manifest(mut self, file_name: impl Into<String>, yaml: impl Into<String>) -> Self {
        self.manifests.push((file_name.into(), yaml.into()));
        self
    }

    /// Adds every `*.yaml` / `*.yml` / `*.json` file of `dir` (sorted by name).
    pub fn manifests_dir(mut self, dir: &Path) -> Result<Self> {
        self.manifests.extend(read_manifest_dir(dir)?);
        Ok(self)
    }

    pub fn agent(mut self, bin: impl Into<PathBuf>) -> Self {
        self.agent_bin = Some(bin.into());
        self
    }

    pub fn name_hint(mut self, hint: impl Into<String>) -> Self {
        self.name_hint = Some(hint.into());
        self
    }
}

/// Reads the manifest files (`*.yaml`, `*.yml`, `*.json`) of a directory, sorted by name.
pub fn read_manifest_dir(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifests directory {}", dir.display()))?;
    for entry in rd {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_manifest = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
        if !is_manifest || name.starts_with('.') || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading manifest {}", path.display()))?;
        out.push((name.to_string(), text));
    }
    out.sort();
    Ok(out)
}

/// Whether this process may build a testbed. If not root: with `MESH_REQUIRE_PRIVILEGED=1`
/// panics (CI must not silently skip), else prints `SKIPPED <test>: needs root` to stderr and
/// returns false.
pub fn require_root(test_name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test_name}: needs root (MESH_REQUIRE_PRIVILEGED=1 forbids skipping)");
    }
    // Written to the stderr handle rather than with eprintln!, so that the test harness's
    // output capture does not hide the skip.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test_name}: needs root");
    false
}
