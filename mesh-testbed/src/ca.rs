//! The mesh CA (`mesh-agent ca`) on the testbed: a process in the fabric network namespace,
//! on 10.250.0.254:15012 (an address of br0, reachable from every node), with its root
//! generated into `<state>/ca` and one random bearer token per node.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::agent::tail;
use crate::process::{self, ProcId, enter_cgroup_and_netns};
use crate::testbed::Testbed;
use crate::{cgroup, ipam, netns};

/// The CA's address on the fabric bridge.
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);
pub const CA_PORT: u16 = 15012;
/// How long `start_ca` waits for the CA to accept connections.
pub const CA_READY_TIMEOUT: Duration = Duration::from_secs(20);
const CA_STOP_GRACE: Duration = Duration::from_secs(5);

fn random_token() -> Result<String> {
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &std::path::Path, data: &str) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

impl Testbed {
    /// `<state>/ca`: the CA's state directory (root.crt, root.key, tokens, log).
    pub fn ca_dir(&self) -> PathBuf {
        self.state.state_dir.join("ca")
    }

    /// Where agents reach the CA.
    pub fn ca_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(CA_IP, CA_PORT)
    }

    /// The mesh root certificate (exists once the CA has started).
    pub fn ca_root(&self) -> PathBuf {
        self.ca_dir().join("root.crt")
    }

    /// The node credentials file the CA reads (`node-N: token`).
    pub fn ca_credentials_path(&self) -> PathBuf {
        self.ca_dir().join("node-credentials.yaml")
    }

    /// The bearer token file of `node` (`<state>/ca/node-<i>.token`, mode 0600).
    pub fn node_token_path(&self, node: &str) -> Result<PathBuf> {
        let n = self.node(node)?;
        Ok(self.ca_dir().join(format!("node-{}.token", n.index)))
    }

    pub fn ca_log_path(&self) -> PathBuf {
        self.ca_dir().join("ca.log")
    }

    /// The CA's log so far.
    pub fn ca_log(&self) -> String {
        let p = self.ca_log_path();
        match std::fs::read(&p) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", p.display()),
        }
    }

    /// Whether this testbed runs a CA (`TestbedConfig::ca`).
    pub fn ca_enabled(&self) -> bool {
        self.state.ca_enabled
    }

    /// One-time setup during `up`: the CA's address on br0, its directory and cgroup, and a
    /// random token per node.
    pub(crate) fn setup_ca(&mut self) -> Result<()> {
        let fabric = self.state.fabric_netns.clone();
        netns::addr_add(
            &fabric,
            "br0",
            &format!("{CA_IP}/{}", ipam::FABRIC_PREFIX_LEN),
        )
        .context("assigning the CA address")?;
        netns::link_up(&fabric, "lo")?;
        let dir = self.ca_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let root = self
            .state
            .cgroup_root
            .clone()
            .ok_or_else(|| anyhow!("the testbed cgroup does not exist yet"))?;
        cgroup::create(&root.join("ca"))?;
        let mut creds = String::from("# node name: bearer token (written by the testbed)\n");
        for n in self.state.nodes.clone() {
            let token = random_token()?;
            write_private(&self.node_token_path(&n.name)?, &format!("{token}\n"))?;
            creds.push_str(&format!("{}: \"{token}\"\n", n.name));
        }
        write_private(&self.ca_credentials_path(), &creds)?;
        self.state.ca_enabled = true;
        Ok(())
    }

    /// The CA's command line (without starting it).
    pub fn ca_command(&self) -> Result<Command> {
        let bin = self.state.agent_bin.clone().ok_or_else(|| {
            anyhow!(
                "testbed {}: the CA needs the mesh-agent binary (agent_bin)",
                self.state.prefix
            )
        })?;
        let mut cmd = Command::new(bin);
        cmd.arg("ca")
            .arg("--listen")
            .arg(SocketAddr::V4(self.ca_addr()).to_string())
            .arg("--manifests")
            .arg(self.manifests_dir())
            .arg("--state-dir")
            .arg(self.ca_dir())
            .arg("--node-credentials")
            .arg(self.ca_credentials_path());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        Ok(cmd)
    }

    /// Starts the CA in the fabric network namespace and waits until its root exists and
    /// its port accepts connections.
    pub fn start_ca(&mut self) -> Result<()> {
        if !self.state.ca_enabled {
            bail!("testbed {} was built without a CA", self.state.prefix);
        }
        if self.ca_running() {
            bail!("the CA is already running");
        }
        let mut cmd = self.ca_command()?;
        let log_path = self.ca_log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "=== testbed {}: starting {cmd:?}", self.state.prefix)
            .with_context(|| format!("writing {}", log_path.display()))?;
        let err_log = log
            .try_clone()
            .with_context(|| format!("duplicating {}", log_path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        let cg = self
            .state
            .cgroup_root
            .clone()
            .ok_or_else(|| anyhow!("the testbed has no cgroup"))?
            .join("ca");
        enter_cgroup_and_netns(&mut cmd, &cg, &self.state.fabric_netns, self.state.detach)
            .context("preparing the CA")?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the CA: {cmd:?}"))?;
        let id = ProcId::of(child.id()).unwrap_or(ProcId {
            pid: child.id(),
            start_time: 0,
        });
        self.ca_child = Some(child);
        self.state.ca = Some(id);
        self.persist()?;
        self.wait_ca_ready(CA_READY_TIMEOUT)
    }

    fn wait_ca_ready(&mut self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        let addr = SocketAddr::V4(self.ca_addr());
        let fabric = self.state.fabric_netns.clone();
        let mut last = String::from("root.crt not written yet");
        loop {
            if let Some(child) = self.ca_child.as_mut()
                && let Some(status) = child.try_wait().context("polling the CA")?
            {
                self.ca_child = None;
                self.state.ca = None;
                bail!(
                    "the CA exited ({status}) before accepting connections; last lines of its log:\n{}",
                    tail(&self.ca_log(), 40)
                );
            }
            if self.ca_root().exists() {
                let probe = netns::in_netns(&fabric, move || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .map(drop)
                        .with_context(|| format!("connecting to {addr}"))
                });
                match probe {
                    Ok(()) => return Ok(()),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() >= until {
                bail!(
                    "the CA did not accept connections within {timeout:?} ({last}); last lines of its log:\n{}",
                    tail(&self.ca_log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the CA (SIGTERM, SIGKILL after 5 s). No-op if it is not running.
    pub fn stop_ca(&mut self) -> Result<()> {
        self.stop_ca_with(CA_STOP_GRACE)?;
        self.persist()
    }

    pub(crate) fn stop_ca_with(&mut self, grace: Duration) -> Result<()> {
        if let Some(mut child) = self.ca_child.take() {
            process::stop_child(&mut child, grace).context("stopping the CA")?;
        } else if let Some(id) = self.state.ca {
            process::stop_pid(id, grace);
            if id.alive() {
                bail!("the CA (pid {}) survived SIGKILL", id.pid);
            }
        }
        self.state.ca = None;
        Ok(())
    }

    /// Whether the CA process is running.
    pub fn ca_running(&mut self) -> bool {
        if let Some(child) = self.ca_child.as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        self.state.ca.is_some_and(|id| id.alive())
    }

    /// Signs a certificate offline with the testbed CA's root (`mesh-agent ca issue`):
    /// returns (chain PEM, key PEM) paths under `<state>/ca/issued/`. `ttl` as the CLI takes
    /// it (`1h`, `30s`); `expired` makes a certificate whose notAfter is in the past.
    pub fn issue_cert(
        &self,
        identity: &str,
        ttl: Option<&str>,
        expired: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let bin = self
            .state
            .agent_bin
            .clone()
            .ok_or_else(|| anyhow!("testbed {}: no mesh-agent binary", self.state.prefix))?;
        let dir = self.ca_dir().join("issued");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let n = std::fs::read_dir(&dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .count();
        let cert = dir.join(format!("cert-{n}.pem"));
        let key = dir.join(format!("cert-{n}.key"));
        let mut cmd = Command::new(bin);
        cmd.args(["ca", "issue", "--state-dir"])
            .arg(self.ca_dir())
            .arg("--identity")
            .arg(identity)
            .arg("--out-cert")
            .arg(&cert)
            .arg("--out-key")
            .arg(&key);
        if let Some(ttl) = ttl {
            cmd.arg("--ttl").arg(ttl);
        }
        if expired {
            cmd.arg("--expired");
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "`mesh-agent ca issue` for {identity} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((cert, key))
    }
}
