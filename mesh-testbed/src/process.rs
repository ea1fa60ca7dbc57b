//! Starting processes inside a cgroup and network namespace, and stopping the processes the
//! testbed started (by pid only; SIGTERM, then SIGKILL after a deadline).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::netns::netns_path;

/// Configures `cmd` so that, in the child between fork and exec, it first moves itself into
/// cgroup `cgroup_dir` (writes "0" to its cgroup.procs) and then joins network namespace
/// `netns`. The mount namespace stays the host's (unlike `ip netns exec`, which remounts
/// /sys and would hide cgroup2 and bpffs). With `new_session`, the child also calls setsid()
/// so it outlives the terminal job that started it.
pub fn enter_cgroup_and_netns(
    cmd: &mut Command,
    cgroup_dir: &Path,
    netns: &str,
    new_session: bool,
) -> Result<()> {
    let procs_path = cgroup_dir.join("cgroup.procs");
    // Opened here (O_CLOEXEC) so that the child only needs async-signal-safe write/setns.
    let procs: File = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {} for writing", procs_path.display()))?;
    let ns_path = netns_path(netns);
    let ns: File = File::open(&ns_path)
        .with_context(|| format!("opening network namespace {}", ns_path.display()))?;
    let hook = move || -> std::io::Result<()> {
        // SAFETY: only async-signal-safe syscalls on fds owned by this closure.
        unsafe {
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook performs only async-signal-safe operations (no allocation, no locks).
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

/// Identity of a process that survives re-opening a persisted testbed: the pid plus its start
/// time (field 22 of /proc/<pid>/stat), so a recycled pid is never signalled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcId {
    pub fn of(pid: u32) -> Result<Self> {
        let start_time = start_time(pid).ok_or_else(|| anyhow!("process {pid} is not running"))?;
        Ok(Self { pid, start_time })
    }

    /// Still the same process, and not a zombie.
    pub fn alive(&self) -> bool {
        match stat_fields(self.pid) {
            Some((state, st)) => st == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    pub fn signal(&self, sig: i32) {
        if self.alive() {
            // SAFETY: kill(2) on a pid verified (by start time) to be the process we started.
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }
}

fn stat_fields(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    // `rest` starts at field 3 (state); start time is field 22.
    let st = it.nth(18)?.parse().ok()?;
    Some((state, st))
}

fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|(_, st)| st)
}

/// Stops a child we own: SIGTERM, wait up to `grace`, then SIGKILL and reap.
pub fn stop_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(st) = child.try_wait().context("polling child")? {
        return Ok(st);
    }
    // SAFETY: kill(2) on our own, not yet reaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Some(st) = child.try_wait().context("polling child")? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_child(child)
}

/// SIGKILLs and reaps a child we own.
pub fn kill_child(child: &mut Child) -> Result<ExitStatus> {
    if let Some(st) = child.try_wait().context("polling child")? {
        return Ok(st);
    }
    child
        .kill()
        .with_context(|| format!("killing pid {}", child.id()))?;
    child
        .wait()
        .with_context(|| format!("waiting for pid {}", child.id()))
}

/// Stops a process we started but do not own as a child (a persisted testbed re-opened by
/// another invocation): SIGTERM, wait up to `grace`, SIGKILL, wait briefly.
pub fn stop_pid(id: ProcId, grace: Duration) {
    id.signal(libc::SIGTERM);
    let until = Instant::now() + grace;
    while id.alive() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    id.signal(libc::SIGKILL);
    let until = Instant::now() + Duration::from_secs(2);
    while id.alive() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process running inside a pod; it is stopped (SIGTERM, then SIGKILL after 2 s) when the
/// guard is dropped. Its stdout is piped and can be read line by line with
/// [`PodProcess::wait_for_line`]; stderr is inherited.
pub struct PodProcess {
    child: Child,
    lines: Option<mpsc::Receiver<String>>,
    seen: Vec<String>,
}

impl PodProcess {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until the process prints a stdout line starting with `prefix` (for the test
    /// servers: `listening`) and returns it. Fails if the process exits first or on timeout.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let until = Instant::now() + timeout;
        let rx = self
            .lines
            .as_ref()
            .ok_or_else(|| anyhow!("stdout of pid {} is not captured", self.child.id()))?;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "pid {} printed no line starting with {prefix:?} within {timeout:?} (stdout so far: {:?})",
                    self.child.id(),
                    self.seen
                );
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!(
                            "pid {} exited ({st}) before printing {prefix:?} (stdout: {:?})",
                            self.child.id(),
                            self.seen
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait()?;
                    bail!(
                        "pid {} closed stdout ({st}) before printing {prefix:?} (stdout: {:?})",
                        self.child.id(),
                        self.seen
                    );
                }
            }
        }
    }

    /// Stops the process now (SIGTERM, SIGKILL after 2 s).
    pub fn stop(mut self) -> Result<ExitStatus> {
        stop_child(&mut self.child, Duration::from_secs(2))
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = stop_child(&mut self.child, Duration::from_secs(2));
    }
}

/// A memory figure of `/proc/<pid>/status` in KiB (`field` without its colon: `VmRSS`,
/// `VmHWM`, `RssAnon`, ...); `pid` "self" for this process.
pub fn status_kib(pid: &str, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} line in kB in {path}"))
}
