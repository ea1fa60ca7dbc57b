//! Persistence (`testbed.json`) and teardown: `down`, Drop, and cleaning up leftovers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::testbed::{State, Testbed};
use crate::{CLI_PREFIX, STATE_ROOT, cgroup, netns, process};

const STATE_FILE: &str = "testbed.json";
const AGENT_GRACE: Duration = Duration::from_secs(5);
const CGROUP_DEADLINE: Duration = Duration::from_secs(5);

impl Testbed {
    /// Writes `<state>/testbed.json` (names, pids, IPs, paths) atomically.
    pub fn persist(&self) -> Result<()> {
        let path = self.state.state_dir.join(STATE_FILE);
        let tmp = self.state.state_dir.join(format!(".{STATE_FILE}.tmp"));
        let text =
            serde_json::to_string_pretty(&self.state).context("serializing testbed state")?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Re-opens a persisted testbed (default prefix: the CLI's `nmtb`). The returned value
    /// does not tear the testbed down on drop; call [`Testbed::down`] for that.
    pub fn load(prefix: Option<&str>) -> Result<Testbed> {
        let prefix = prefix.unwrap_or(CLI_PREFIX);
        let path = Path::new(STATE_ROOT).join(prefix).join(STATE_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no testbed {prefix}: cannot read {}", path.display()))?;
        let state: State =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Testbed {
            state,
            children: HashMap::new(),
            ca_child: None,
            armed: false,
        })
    }

    /// Persists the testbed and hands it over: dropping the value no longer tears it down
    /// (the CLI's `testbed up`; agents keep running).
    pub fn keep(mut self) -> Result<()> {
        self.persist()?;
        self.armed = false;
        // Children are left running; their handles are dropped without waiting.
        self.children.clear();
        self.ca_child = None;
        Ok(())
    }

    /// Removes everything: stops the agents (SIGTERM, SIGKILL after 5 s), kills what remains
    /// in the testbed's cgroups, removes the cgroups, bpffs directories, network namespaces
    /// (and with them all veths) and the state directory. Continues past errors and reports
    /// them all.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    pub(crate) fn teardown(&mut self) -> Result<()> {
        self.armed = false;
        let mut errors: Vec<String> = Vec::new();
        let nodes: Vec<String> = self.state.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &nodes {
            if let Err(e) = self.stop_agent_with(node, AGENT_GRACE) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = self.stop_ca_with(AGENT_GRACE) {
            errors.push(format!("{e:#}"));
        }
        // Agents recorded for nodes that no longer exist in the state (should not happen).
        for (_, id) in std::mem::take(&mut self.state.agents) {
            process::stop_pid(id, AGENT_GRACE);
        }
        if let Some(root) = self.state.cgroup_root.clone()
            && let Err(e) = cgroup::remove_tree(&root, CGROUP_DEADLINE)
        {
            errors.push(format!("{e:#}"));
        }
        for n in &self.state.nodes {
            if n.bpffs_dir.exists()
                && let Err(e) = std::fs::remove_dir_all(&n.bpffs_dir)
            {
                errors.push(format!("removing {}: {e}", n.bpffs_dir.display()));
            }
        }
        let mut all_ns: Vec<String> = self.state.created_netns.iter().rev().cloned().collect();
        for stray in netns::list_with_prefix(&format!("{}-", self.state.prefix)) {
            if !all_ns.contains(&stray) {
                all_ns.push(stray);
            }
        }
        for ns in &all_ns {
            if let Err(e) = netns::delete(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        self.state.created_netns.clear();
        let dir = self.state.state_dir.clone();
        if dir.starts_with(STATE_ROOT)
            && dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "tearing down testbed {}:\n  {}",
                self.state.prefix,
                errors.join("\n  ")
            )
        }
    }

    fn dump_agent_logs(&self) {
        if self.state.ca_enabled {
            eprintln!(
                "----- testbed {}: last lines of {} (CA) -----\n{}",
                self.state.prefix,
                self.ca_log_path().display(),
                crate::agent::tail(&self.ca_log(), 60)
            );
        }
        for n in &self.state.nodes {
            if let Ok(text) = std::fs::read_to_string(&n.agent_log) {
                eprintln!(
                    "----- testbed {}: last lines of {} ({}) -----\n{}",
                    self.state.prefix,
                    n.agent_log.display(),
                    n.name,
                    crate::agent::tail(&text, 60)
                );
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if std::thread::panicking() {
            self.dump_agent_logs();
        }
        if let Err(e) = self.teardown() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Prefixes of all testbeds that have a state directory, with their recorded owner pid and
/// name hint (when `testbed.json` exists).
pub fn list_testbeds() -> Vec<(String, Option<u32>, Option<String>)> {
    let Ok(rd) = std::fs::read_dir(STATE_ROOT) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(prefix) = e.file_name().into_string() else {
            continue;
        };
        match Testbed::load(Some(&prefix)) {
            Ok(tb) => out.push((prefix, Some(tb.state.owner_pid), tb.state.name_hint.clone())),
            Err(_) => out.push((prefix, None, None)),
        }
    }
    out.sort();
    out
}

/// Removes what a testbed with `prefix` left behind even without a usable `testbed.json`
/// (e.g. its process was killed during `up`): network namespaces named `<prefix>-*`, the
/// cgroup `<cgroup2>/<prefix>`, bpffs directories `nodemesh-<prefix>-*` and the state
/// directory. Uses the recorded state when there is one.
pub fn remove_leftovers(prefix: &str) -> Result<()> {
    if prefix.is_empty() || prefix.contains('/') || prefix.contains("..") {
        bail!("invalid testbed prefix {prefix:?}");
    }
    if let Ok(tb) = Testbed::load(Some(prefix)) {
        return tb.down();
    }
    let mut errors = Vec::new();
    if let Ok(mount) = cgroup::cgroup2_mount()
        && let Err(e) = cgroup::remove_tree(&mount.join(prefix), CGROUP_DEADLINE)
    {
        errors.push(format!("{e:#}"));
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        let want = format!("nodemesh-{prefix}-");
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&want)
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                errors.push(format!("removing {}: {err}", e.path().display()));
            }
        }
    }
    for ns in netns::list_with_prefix(&format!("{prefix}-")) {
        if let Err(e) = netns::delete(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    let dir: PathBuf = Path::new(STATE_ROOT).join(prefix);
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        errors.push(format!("removing {}: {e}", dir.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "removing leftovers of testbed {prefix}:\n  {}",
            errors.join("\n  ")
        ))
    }
}

/// Whether `s` looks like a testbed prefix: `nm` + 4 hex digits, or the CLI's `nmtb`.
fn is_testbed_prefix(s: &str) -> bool {
    s == CLI_PREFIX
        || (s.len() == 6 && s.starts_with("nm") && s[2..].bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Prefixes of testbeds that left network namespaces or cgroups behind but have no state
/// directory (their process died before recording anything).
pub fn orphan_prefixes() -> Vec<String> {
    let mut found: Vec<String> = netns::list_with_prefix("nm")
        .into_iter()
        .filter_map(|n| n.split_once('-').map(|(p, _)| p.to_string()))
        .collect();
    if let Ok(mount) = cgroup::cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(mount)
    {
        found.extend(rd.filter_map(|e| e.ok()?.file_name().into_string().ok()));
    }
    found.retain(|p| is_testbed_prefix(p) && !Path::new(STATE_ROOT).join(p).exists());
    found.sort();
    found.dedup();
    found
}
