//! Running the mesh agent per node: in the node's network namespace and cgroup, but in the
//! host mount namespace (so cgroup2 and bpffs are visible), with readiness over the admin
//! unix socket.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::admin_client;
use crate::process::{self, ProcId, enter_cgroup_and_netns};
use crate::testbed::Testbed;

/// How long `up` / `start_agent` wait for `/healthz/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Testbed {
    /// The agent command line for a node (without starting it).
    pub fn agent_command(&self, node: &str) -> Result<Command> {
        let bin = self.state.agent_bin.clone().ok_or_else(|| {
            anyhow!(
                "testbed {} has no agent binary configured",
                self.state.prefix
            )
        })?;
        let n = self.node(node)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--manifests")
            .arg(self.manifests_dir())
            .arg("--node")
            .arg(&n.name)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpffs-dir")
            .arg(&n.bpffs_dir)
            .arg("--admin-socket")
            .arg(&n.admin_socket);
        if self.state.ca_enabled {
            cmd.arg("--ca-addr")
                .arg(self.ca_addr().to_string())
                .arg("--ca-root")
                .arg(self.ca_root())
                .arg("--ca-token-file")
                .arg(self.node_token_path(&n.name)?);
        }
        cmd.args(&self.state.agent_args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        Ok(cmd)
    }

    /// Starts the agent of `node` without waiting for readiness.
    pub(crate) fn spawn_agent(&mut self, node: &str) -> Result<()> {
        if self.agent_running(node) {
            bail!("the agent of {node} is already running");
        }
        let mut cmd = self.agent_command(node)?;
        let n = self.node(node)?.clone();
        if let Some(dir) = n.admin_socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if n.admin_socket.exists() {
            std::fs::remove_file(&n.admin_socket).with_context(|| {
                format!("removing stale admin socket {}", n.admin_socket.display())
            })?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.agent_log)
            .with_context(|| format!("opening agent log {}", n.agent_log.display()))?;
        writeln!(log, "=== testbed {}: starting {cmd:?}", self.state.prefix)
            .with_context(|| format!("writing {}", n.agent_log.display()))?;
        let err_log = log
            .try_clone()
            .with_context(|| format!("duplicating {}", n.agent_log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        enter_cgroup_and_netns(&mut cmd, &n.cgroup, &n.netns, self.state.detach)
            .with_context(|| format!("preparing the agent of {node}"))?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent of {node}: {cmd:?}"))?;
        let id = ProcId::of(child.id()).unwrap_or(ProcId {
            pid: child.id(),
            start_time: 0,
        });
        self.children.insert(node.to_string(), child);
        self.state.agents.insert(node.to_string(), id);
        self.persist()
    }

    /// Waits until the agent of `node` answers `GET /healthz/ready` with 200. Fails early if
    /// the agent exits, and with the tail of its log on timeout.
    pub fn wait_agent_ready(&mut self, node: &str, timeout: Duration) -> Result<()> {
        let socket = self.node(node)?.admin_socket.clone();
        let until = Instant::now() + timeout;
        let mut last = String::from("admin socket not created yet");
        loop {
            if let Some(child) = self.children.get_mut(node) {
                if let Some(status) = child.try_wait().context("polling the agent")? {
                    self.children.remove(node);
                    self.state.agents.remove(node);
                    bail!(
                        "the agent of {node} exited ({status}) before becoming ready; last lines of its log:\n{}",
                        tail(&self.agent_log(node), 40)
                    );
                }
            } else if !self.agent_running(node) {
                bail!("the agent of {node} is not running");
            }
            if socket.exists() {
                match admin_client::get(&socket, "/healthz/ready", Duration::from_secs(2)) {
                    Ok((200, _)) => return Ok(()),
                    Ok((code, body)) => last = format!("/healthz/ready answered {code}: {body}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= until {
                bail!(
                    "the agent of {node} was not ready within {timeout:?} ({last}); last lines of its log:\n{}",
                    tail(&self.agent_log(node), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the agent of `node` and waits (up to 20 s) until it is ready.
    pub fn start_agent(&mut self, node: &str) -> Result<()> {
        self.spawn_agent(node)?;
        self.wait_agent_ready(node, READY_TIMEOUT)
    }

    /// Stops the agent of `node`: SIGTERM, wait up to 5 s, then SIGKILL. No-op if not running.
    pub fn stop_agent(&mut self, node: &str) -> Result<()> {
        self.node(node)?;
        self.stop_agent_with(node, STOP_GRACE)?;
        self.persist()
    }

    pub(crate) fn stop_agent_with(&mut self, node: &str, grace: Duration) -> Result<()> {
        if let Some(mut child) = self.children.remove(node) {
            process::stop_child(&mut child, grace)
                .with_context(|| format!("stopping the agent of {node}"))?;
        } else if let Some(id) = self.state.agents.get(node) {
            process::stop_pid(*id, grace);
            if id.alive() {
                bail!("the agent of {node} (pid {}) survived SIGKILL", id.pid);
            }
        }
        self.state.agents.remove(node);
        Ok(())
    }

    /// SIGKILLs the agent of `node` (a crash, as far as the agent can tell).
    pub fn kill_agent(&mut self, node: &str) -> Result<()> {
        self.node(node)?;
        self.stop_agent_with(node, Duration::ZERO)?;
        self.persist()
    }

    /// Whether the agent of `node` is running.
    pub fn agent_running(&mut self, node: &str) -> bool {
        if let Some(child) = self.children.get_mut(node) {
            return matches!(child.try_wait(), Ok(None));
        }
        self.state.agents.get(node).is_some_and(ProcId::alive)
    }

    /// Pid of the agent of `node`, if one was started and is still recorded.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.state.agents.get(node).map(|id| id.pid)
    }

    /// `GET <path>` on the agent's admin unix socket; returns (status, body).
    pub fn admin_get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        let n = self.node(node)?;
        admin_client::get(&n.admin_socket, path, ADMIN_TIMEOUT)
            .with_context(|| format!("admin API of the agent of {node}"))
    }

    /// The agent's log so far (stdout and stderr of every run on this node).
    pub fn agent_log(&self, node: &str) -> String {
        let Ok(n) = self.node(node) else {
            return format!("<no node {node}>");
        };
        match std::fs::read(&n.agent_log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", n.agent_log.display()),
        }
    }
}
