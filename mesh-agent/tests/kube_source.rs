//! `mesh-agent run --kubernetes`, the real binary, against the fake API server (root: the
//! agent loads its eBPF programs). The agent runs on the host's loopback with a cgroup and a
//! bpffs directory of its own (so it captures nothing) and is checked through its CLI and
//! admin API, as a user would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_testbed::fake_kube::FakeApiServer;
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(20);

/// An agent in Kubernetes mode and everything it needs; all removed on drop.
struct Agent {
    child: Child,
    dir: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Agent {
    fn start(server: &FakeApiServer, tag: &str) -> Agent {
        let name = format!("nodemesh-kubetest-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cgroup = mesh_testbed::cgroup2_mount().expect("cgroup2").join(&name);
        std::fs::create_dir_all(&cgroup).expect("cgroup");
        let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let log = std::fs::File::create(dir.join("agent.log")).expect("log");
        let (admin, metrics, readiness) = (free_port(), free_port(), free_port());
        let socket = dir.join("admin.sock");
        let child = Command::new(AGENT)
            .args(["run", "--kubernetes", "--node", NODE, "--cgroup"])
            .arg(&cgroup)
            .arg("--bpffs-dir")
            .arg(&bpffs)
            .arg("--admin-socket")
            .arg(&socket)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        Agent {
            child,
            dir,
            cgroup,
            bpffs,
            socket,
            admin,
            metrics,
            readiness,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `mesh-agent ARGS --admin-socket ...`: stdout, failing the test on error.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(AGENT)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.socket)
            .output()
            .expect("run the CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let text = self.cli(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    fn config_dump(&self) -> Value {
        let (code, body) = http_get(self.admin, "/config_dump");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }

    /// Polls `f` until true; fails with `what` and the agent's log.
    fn wait(&mut self, what: &str, mut f: impl FnMut(&Agent) -> bool) {
        let until = Instant::now() + WAIT;
        while !f(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}; agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `namespace/name` of the workloads in `state`.
    fn workloads(&self, state: &str) -> Vec<String> {
        let list = self.cli_json(&["workloads", "-o", "json"]);
        let list = list.as_array().cloned().unwrap_or_default();
        let of_state = list.iter().filter(|w| w["state"] == state);
        let names = of_state.map(|w| format!("{}/{}", text(&w["namespace"]), text(&w["name"])));
        names.collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unpinning the links detaches the programs; the cgroup is empty.
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// A plain HTTP/1.1 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, "connection refused".into());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({"nodemesh.io/enabled": "true"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"nodeName": node, "serviceAccountName": name,
                    "containers": [{"name": "app", "image": "app"}]},
           "status": {"phase": "Running", "podIP": ip,
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

fn service(ns: &str, name: &str, ip: &str, port: i64) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "selector": {"app": name},
                    "ports": [{"name": "http", "port": port, "targetPort": 8080}]}})
}

fn slice(ns: &str, service: &str, ip: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                          "targetRef": {"kind": "Pod", "name": service, "namespace": ns}}]})
}

fn peer_auth(ns: &str, mode: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": "default", "namespace": ns}, "spec": {"mtls": {"mode": mode}}})
}

#[test]
fn agent_in_kubernetes_mode_follows_the_cluster() {
    if !mesh_testbed::require_root("kube_source::agent_in_kubernetes_mode_follows_the_cluster") {
        return;
    }
    let server = FakeApiServer::start().expect("fake API server");
    for obj in [
        namespace("shop", true),
        namespace("plain", false),
        pod("shop", "web", NODE, "10.244.1.5"),
        pod("plain", "db", NODE, "10.244.1.6"),
        pod("shop", "far", "node-2", "10.244.2.5"),
        service("shop", "web", "10.96.0.10", 80),
        slice("shop", "web", "10.244.1.5"),
        service("shop", "bad", "10.96.0.11", 70000),
        peer_auth("shop", "STRICT"),
    ] {
        server.apply(obj).expect("seed");
    }
    server.hold("list:endpointslices");
    let mut agent = Agent::start(&server, "follow");

    // Not ready until every kind has listed; the reason names the one missing.
    agent.wait("the admin API", |a| http_get(a.admin, "/status").0 == 200);
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = http_get(agent.readiness, "/healthz/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("EndpointSlice"), "{body}");
    let status = agent.cli_json(&["status", "-o", "json"]);
    assert_eq!(
        (
            status["config_source"].as_str(),
            status["config_synced"].as_bool()
        ),
        (Some("kubernetes"), Some(false))
    );
    server.release("list:endpointslices");
    agent.wait("readiness", |a| {
        http_get(a.readiness, "/healthz/ready").0 == 200
    });

    // The labelled namespace's pod is meshed (pending: its netns is not known yet), the
    // unlabelled one's is not; the pod on another node is not this agent's.
    assert_eq!(agent.workloads("pending"), ["shop/web"]);
    let table = agent.cli(&["workloads"]);
    assert!(
        table.contains("pending (waiting for the pod's network namespace"),
        "{table}"
    );
    let services = agent.cli(&["services"]);
    assert!(
        services.contains("shop/web") || services.contains("web"),
        "{services}"
    );
    assert!(services.contains("10.244.1.5:8080"), "{services}");
    assert!(
        !services.contains("bad"),
        "the invalid Service is skipped:\n{services}"
    );

    // The invalid Service: logged with kind, name, field and reason; counted in status and
    // metrics; the others apply.
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("invalid object skipped"))
        .unwrap_or_else(|| panic!("no invalid-object line:\n{log}"));
    for part in [
        "kind=\"Service\"",
        "shop/bad",
        "spec.ports[0].port",
        "70000",
    ] {
        assert!(line.contains(part), "{part} not in {line}");
    }
    let status = agent.cli_json(&["status", "-o", "json"]);
    let resources = status["resources"].as_array().cloned().unwrap_or_default();
    let svc = resources
        .iter()
        .find(|r| r["kind"] == "Service")
        .expect("Service status");
    assert_eq!(
        (
            svc["synced"].as_bool(),
            svc["objects"].as_u64(),
            svc["invalid"].as_u64()
        ),
        (Some(true), Some(2), Some(1))
    );
    assert!(
        text(&svc["last_error"]).contains("Service shop/bad: field spec.ports[0].port"),
        "{svc}"
    );
    assert!(
        resources.iter().all(|r| r["synced"] == true),
        "{resources:?}"
    );
    let human = agent.cli(&["status"]);
    assert!(
        human.contains("EndpointSlice") && human.contains("(kubernetes)"),
        "{human}"
    );
    let (_, metrics) = http_get(agent.metrics, "/stats/prometheus");
    assert!(
        metrics.contains("nodemesh_config_invalid_objects{kind=\"Service\",scope=\"all\"} 1"),
        "{metrics}"
    );
    assert_eq!(agent.config_dump()["effective_mtls"]["shop/web"], "STRICT");

    // Runtime changes: relabel, PeerAuthentication edit.
    server.apply(namespace("plain", true)).expect("relabel");
    server.apply(peer_auth("shop", "PERMISSIVE")).expect("edit");
    agent.wait("the relabelled namespace", |a| {
        a.workloads("pending") == ["plain/db", "shop/web"]
    });
    agent.wait("the PeerAuthentication edit", |a| {
        a.config_dump()["effective_mtls"]["shop/web"] == "PERMISSIVE"
    });

    // A watch cut mid-stream and a 410 Gone: changes made in between arrive.
    server.hold("watch:*");
    assert!(server.drop_watches() > 0);
    server
        .apply(pod("shop", "api", NODE, "10.244.1.7"))
        .expect("pod");
    server.release("watch:*");
    agent.wait("the pod added while the watch was down", |a| {
        a.workloads("pending").contains(&"shop/api".to_owned())
    });
    assert!(server.expire_watches() > 0);
    server.apply(namespace("plain", false)).expect("unlabel");
    agent.wait("the change after 410 Gone", |a| {
        a.workloads("pending") == ["shop/api", "shop/web"]
    });
    assert_eq!(
        http_get(agent.readiness, "/healthz/ready").0,
        200,
        "still ready"
    );
}

#[test]
fn kubernetes_and_manifests_are_exclusive() {
    let out = Command::new(AGENT)
        .args(["run", "--kubernetes", "--manifests", "/tmp", "--node", NODE])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
    let out = Command::new(AGENT)
        .args(["run", "--node", NODE])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--manifests") && err.contains("--kubernetes"),
        "{err}"
    );
    let help = Command::new(AGENT)
        .args(["run", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--kubernetes") && help.contains("KUBECONFIG"),
        "{help}"
    );
}
