//! Shared helpers of the privileged integration tests: a testbed with real agents, real
//! servers and clients in pod namespaces, and the agents' admin API.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_testbed::{PodProcess, Testbed, TestbedConfig};
use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");

/// `mesh-testapp`, built next to the test binaries (`cargo build` builds all default
/// members; `cargo xtask test` does that first).
pub fn testapp() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/mesh-testapp
    let path = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("mesh-testapp"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p mesh-testbed --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// A testbed with one agent per node, or `None` when the test must skip (not root and
/// MESH_REQUIRE_PRIVILEGED unset; with it set, a missing privilege fails the test).
pub fn up(test: &str, nodes: usize, manifests: &[(&str, &str)]) -> Option<Testbed> {
    up_with_args(test, nodes, manifests, &[])
}

/// [`up`] with extra arguments for every agent.
pub fn up_with_args(
    test: &str,
    nodes: usize,
    manifests: &[(&str, &str)],
    agent_args: &[&str],
) -> Option<Testbed> {
    if !mesh_testbed::require_root(test) {
        return None;
    }
    let mut cfg = TestbedConfig::new(nodes).agent(AGENT).name_hint(test);
    // The mesh as users run it: with its CA, so meshed pods talk over mutual TLS.
    cfg.ca = true;
    cfg.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    for (name, yaml) in manifests {
        cfg = cfg.manifest(*name, *yaml);
    }
    Some(Testbed::up(cfg).expect("testbed up"))
}

/// Starts `mesh-testapp ARGS` in `pod` and waits until it listens.
pub fn serve(tb: &Testbed, pod: &str, args: &[&str]) -> PodProcess {
    let mut p = tb
        .spawn_in_pod(pod, testapp(), args)
        .unwrap_or_else(|e| panic!("starting {args:?} in {pod}: {e:#}"));
    p.wait_for_line("listening", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{args:?} in {pod} did not start: {e:#}"));
    p
}

/// Runs `mesh-testapp ARGS` in `pod` to completion (bounded by `timeout`).
pub fn testapp_in(tb: &Testbed, pod: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = tb.pod_command(pod, testapp())?;
    cmd.args(args);
    run_bounded(cmd, timeout)
}

/// Runs a command, killing it if it outlives `timeout`. Its output is collected while it
/// runs, so a large output cannot fill the pipe and stall it.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("spawning")?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.context("collecting output"),
        Err(_) => {
            // SAFETY: signalling the child we spawned; it has not been reaped (its waiter
            // thread is still blocked on it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let out = rx
                .recv_timeout(Duration::from_secs(5))
                .context("waiting for the killed command")??;
            bail!(
                "timed out after {timeout:?}; stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// `mesh-testapp read --connect ADDR` from `pod`: what the server sent, or the error.
pub fn read_from(tb: &Testbed, pod: &str, addr: &str) -> Result<String> {
    let out = testapp_in(
        tb,
        pod,
        &["read", "--connect", addr, "--timeout", "5"],
        Duration::from_secs(15),
    )?;
    if !out.status.success() {
        bail!(
            "read from {addr} in {pod} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Real curl from `pod`; returns the body (fails on HTTP or connection errors).
pub fn curl(tb: &Testbed, pod: &str, url: &str) -> Result<String> {
    let mut cmd = tb.pod_command(pod, "curl")?;
    cmd.args(["-sS", "--fail", "-m", "5", url]);
    let out = run_bounded(cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "curl {url} from {pod}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GET an admin path of a node's agent as JSON.
pub fn admin_json(tb: &Testbed, node: &str, path: &str) -> Value {
    let (status, body) = tb
        .admin_get(node, path)
        .unwrap_or_else(|e| panic!("admin {path} on {node}: {e:#}"));
    assert_eq!(status, 200, "admin {path} on {node}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {path}: {e}: {body}"))
}

/// A counter from `/stats`, e.g. `("proxy", "accepted")` or `("ebpf", "redirected")`.
pub fn counter(tb: &Testbed, node: &str, section: &str, name: &str) -> u64 {
    admin_json(tb, node, "/stats")[section][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {section}.{name} on {node}"))
}

/// Connections the agent of `node` carried to `service` ("ns/name").
pub fn service_connections(tb: &Testbed, node: &str, service: &str) -> u64 {
    admin_json(tb, node, "/stats")["services"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| s["service"] == service)
                .and_then(|s| s["connections"].as_u64())
        })
        .unwrap_or(0)
}

/// Names (`ns/name`) of the workloads the agent of `node` has enrolled.
pub fn enrolled(tb: &Testbed, node: &str) -> Vec<String> {
    admin_json(tb, node, "/workloads")
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|w| w["state"] == "enrolled")
                .map(|w| {
                    format!(
                        "{}/{}",
                        w["namespace"].as_str().unwrap_or(""),
                        w["name"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` until it returns true, failing with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A long-lived connection from a pod to an echo server, driven line by line.
pub struct Chat {
    /// What `getpeername()` returned in the client after connecting.
    pub peer: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Chat {
    pub fn open(tb: &Testbed, pod: &str, addr: &str) -> Chat {
        let mut cmd = tb.pod_command(pod, testapp()).expect("pod command");
        cmd.args(["chat", "--connect", addr, "--timeout", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn chat");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut chat = Chat {
            peer: String::new(),
            child,
            stdin,
            stdout,
        };
        let line = chat.line();
        assert!(line.starts_with("connected "), "chat to {addr}: {line:?}");
        chat.peer = line
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        chat
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read chat output");
        line
    }

    /// Sends `msg` and returns true if it came back intact.
    pub fn echo(&mut self, msg: &str) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        if writeln!(stdin, "{msg}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return false;
        }
        self.line() == format!("echo {msg}\n")
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace, labelled enrolled or not.
pub fn namespace(name: &str, enrolled: bool) -> String {
    let label = if enrolled {
        "\n  labels:\n    nodemesh.io/enabled: \"true\""
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{label}\n")
}

/// A pod on `node` with `labels` (`k: v` pairs) and one named container port.
pub fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)], port: u16) -> String {
    let mut l = String::new();
    for (k, v) in labels {
        l.push_str(&format!("\n    {k}: \"{v}\""));
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:{l}\nspec:\n  nodeName: {node}\n  containers:\n  - name: app\n    image: app\n    ports:\n    - name: tcp-app\n      containerPort: {port}\n"
    )
}

/// A pod like [`pod`] running as service account `sa`.
pub fn pod_sa(ns: &str, name: &str, node: &str, sa: &str, port: u16) -> String {
    pod(ns, name, node, &[("app", name)], port)
        .replace("spec:\n", &format!("spec:\n  serviceAccountName: {sa}\n"))
}

/// A Service selecting `app=<selector>` on `port`, targeting the named port `tcp-app`.
pub fn service(ns: &str, name: &str, selector: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector:\n    app: {selector}\n  ports:\n  - name: tcp-app\n    port: {port}\n    targetPort: tcp-app\n"
    )
}

/// Joins YAML documents.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// `promtool check metrics` on an exposition. Istio's `istio_request_duration_milliseconds`
/// keeps its unit in its name (dashboards query it by that name), which promtool's naming lint
/// flags; that finding is the only one allowed, any other fails the test.
pub fn promtool_check(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let istio_name =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let other: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(istio_name))
        .collect();
    assert!(
        other.is_empty() && (out.status.success() || report.contains(istio_name)),
        "promtool check metrics: {report}"
    );
}

/// The Prometheus exposition of `node`'s agent (its metrics port, from the node's network).
pub fn node_metrics(tb: &Testbed, node: &str) -> String {
    let mut cmd = tb.node_command(node, "curl").expect("node command");
    cmd.args([
        "-sS",
        "--fail",
        "-m",
        "5",
        "http://127.0.0.1:15020/stats/prometheus",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(10)).expect("curl metrics");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sum of a metric's samples whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A pod labelled app=web, version=VERSION, serving HTTP on the named port `http`.
pub fn web(name: &str, node: &str, version: &str) -> String {
    pod(
        "default",
        name,
        node,
        &[("app", "web"), ("version", version)],
        8080,
    )
    .replace("name: tcp-app", "name: http")
}

/// A Service `name` selecting `app=<selector>`, port 80 named `port_name`, to `target`.
pub fn http_service(name: &str, selector: &str, port_name: &str, target: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         selector:\n    app: {selector}\n  ports:\n  - name: {port_name}\n    port: 80\n    \
         targetPort: {target}\n"
    )
}

/// tshark capturing into a file, started from `cmd` (a `tshark` command already placed in a
/// node's or pod's namespace), until [`PacketCapture::finish`] or drop.
pub struct PacketCapture {
    child: Child,
    file: PathBuf,
}

impl PacketCapture {
    /// Captures on `iface` with the capture `filter` into `file`; returns once tshark has the
    /// interface open. `-a duration` bounds it even if the test dies before stopping it.
    pub fn start(mut cmd: Command, iface: &str, filter: &str, file: PathBuf) -> PacketCapture {
        let duration = "duration:120";
        cmd.args(["-q", "-i", iface, "-f", filter, "-a", duration, "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("tshark (installed by cargo xtask setup)");
        let mut cap = PacketCapture { child, file };
        let until = Instant::now() + Duration::from_secs(15);
        // tshark writes the pcap header once the interface is open.
        while std::fs::metadata(&cap.file).map_or(0, |m| m.len()) == 0 {
            assert!(Instant::now() < until, "tshark did not start capturing");
            assert!(
                cap.child.try_wait().expect("poll").is_none(),
                "tshark exited"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        cap
    }

    /// Stops the capture (letting the last packets in first) and returns the file.
    pub fn finish(mut self) -> PathBuf {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        self.file.clone()
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
