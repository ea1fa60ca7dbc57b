//! What tests/cni.rs needs: a container runtime's CNI side (libcni's list operations, done by
//! hand: each plugin found in CNI_PATH by its `type`, run with the CNI_* environment and its
//! config on stdin, the previous result injected as `prevResult`), network namespaces, and an
//! agent in Kubernetes mode against the fake API server. Everything is removed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_testbed::fake_kube::FakeApiServer;
use serde_json::{Value, json};

pub const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
/// Where Debian's containernetworking-plugins puts bridge and host-local.
pub const DEBIAN_CNI: &str = "/usr/lib/cni";
pub const NODE: &str = "node-1";

/// The result of running one plugin.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// A node's CNI setup: bin and conf directories, a node network namespace the plugins run in
/// (so the bridge and its routes never touch the host's network), and the pods' namespaces.
pub struct Runtime {
    pub dir: PathBuf,
    pub node_ns: String,
    pub tag: String,
    pods: Vec<String>,
}

/// One pod sandbox as the runtime knows it.
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: String,
    /// The chain's ADD result (what the runtime caches for DEL and CHECK).
    pub result: Option<Value>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Runtime {
    /// `subnet_octet` makes the pod subnet 10.99.<octet>.0/24, unique per test.
    pub fn new(tag: &str, subnet_octet: u8) -> Runtime {
        let tag = format!("{tag}{:x}", std::process::id() & 0xffff);
        let dir = std::env::temp_dir().join(format!("nodemesh-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["bin", "net.d", "ipam"] {
            std::fs::create_dir_all(dir.join(d)).expect("runtime dirs");
        }
        let rt = Runtime {
            node_ns: format!("{tag}-node"),
            dir,
            tag,
            pods: Vec::new(),
        };
        ip(&["netns", "add", &rt.node_ns]);
        ip(&["-n", &rt.node_ns, "link", "set", "lo", "up"]);
        // The cluster's network: a bridge with host-local IPAM, as a kubeadm node might have.
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": format!("{}-net", rt.tag),
            "plugins": [{
                "type": "bridge",
                "bridge": format!("{}br", rt.tag),
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": format!("10.99.{subnet_octet}.0/24"),
                    "dataDir": rt.dir.join("ipam"),
                },
            }],
        });
        let text = serde_json::to_string_pretty(&conflist).expect("json");
        std::fs::write(rt.conf_dir().join("10-bridge.conflist"), text).expect("conflist");
        rt
    }

    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }

    /// The plugin types of the conflist, in order.
    pub fn chain(&self) -> Vec<String> {
        let list = self.conflist();
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The config the runtime uses: the first file by name, as a conflist.
    pub fn conflist(&self) -> Value {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.conf_dir())
            .expect("conf dir")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        let text = std::fs::read_to_string(&files[0]).expect("read conflist");
        serde_json::from_str(&text).expect("conflist JSON")
    }

    /// A new pod sandbox: its network namespace, as the runtime creates it before ADD.
    pub fn sandbox(&mut self, namespace: &str, name: &str) -> Sandbox {
        let ns = format!("{}-{}", self.tag, self.pods.len());
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        Sandbox {
            namespace: namespace.into(),
            name: name.into(),
            container_id: format!("{}{:08x}", self.tag, self.pods.len()),
            netns: format!("/var/run/netns/{ns}"),
            result: None,
        }
    }

    fn plugin_path(&self, kind: &str) -> PathBuf {
        [self.bin_dir(), PathBuf::from(DEBIAN_CNI)]
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "no CNI plugin {kind} in {} or {DEBIAN_CNI}",
                    self.bin_dir().display()
                )
            })
    }

    /// Runs one plugin of the conflist the way libcni does.
    pub fn exec(&self, plugin: &Value, command: &str, sb: &Sandbox, prev: Option<&Value>) -> Run {
        let list = self.conflist();
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let kind = plugin["type"].as_str().expect("type");
        let path = self.plugin_path(kind);
        let cni_path = format!("{}:{DEBIAN_CNI}", self.bin_dir().display());
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            sb.namespace, sb.name, sb.container_id
        );
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(&path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", &sb.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run a CNI plugin");
        let stdin = conf.to_string();
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write config");
        let (mut out, mut err) = (String::new(), String::new());
        let mut so = child.stdout.take().expect("stdout");
        let mut se = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            let mut e = String::new();
            let _ = se.read_to_string(&mut e);
            e
        });
        let _ = so.read_to_string(&mut out);
        err.push_str(&reader.join().unwrap_or_default());
        let status = child.wait().expect("wait for the plugin");
        Run {
            ok: status.success(),
            stdout: out,
            stderr: err,
            took: started.elapsed(),
        }
    }

    /// ADD through the whole list; stops at the first failure, which it returns. First, as
    /// containerd and CRI-O do for every sandbox, the loopback plugin brings `lo` up.
    pub fn add(&self, sb: &mut Sandbox) -> Result<Run, Run> {
        let lo = json!({"type": "loopback"});
        let run = self.exec(&lo, "ADD", sb, None);
        assert!(run.ok, "loopback ADD: {run:?}");
        let plugins = self.conflist()["plugins"]
            .as_array()
            .cloned()
            .expect("plugins");
        let mut prev: Option<Value> = None;
        let mut last = None;
        for p in &plugins {
            let run = self.exec(p, "ADD", sb, prev.as_ref());
            if !run.ok {
                return Err(run);
            }
            prev =
                Some(serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
                    panic!("{} ADD printed no result ({e}): {run:?}", p["type"])
                }));
            last = Some(run);
        }
        sb.result = prev;
        Ok(last.expect("at least one plugin"))
    }

    /// DEL through the list in reverse, with the cached result; every plugin must succeed.
    pub fn del(&self, sb: &Sandbox) -> Vec<(String, Run)> {
        let plugins = self.conflist()["plugins"]
            .as_array()
            .cloned()
            .expect("plugins");
        plugins
            .iter()
            .rev()
            .map(|p| {
                let kind = p["type"].as_str().unwrap_or_default().to_owned();
                (kind, self.exec(p, "DEL", sb, sb.result.as_ref()))
            })
            .collect()
    }

    /// CHECK through the list with the cached result.
    pub fn check(&self, sb: &Sandbox) -> Vec<(String, Run)> {
        let plugins = self.conflist()["plugins"]
            .as_array()
            .cloned()
            .expect("plugins");
        plugins
            .iter()
            .map(|p| {
                let kind = p["type"].as_str().unwrap_or_default().to_owned();
                (kind, self.exec(p, "CHECK", sb, sb.result.as_ref()))
            })
            .collect()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain([&self.node_ns]) {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `mesh-agent run --kubernetes` with a cgroup and bpffs directory of its own (it captures
/// nothing outside the pods it enrolls), its CNI socket in the runtime's directory.
pub struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    cgroup: PathBuf,
    bpffs: PathBuf,
    pub socket: PathBuf,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    cni_socket: PathBuf,
    kubeconfig: PathBuf,
    /// Appended to `run`'s arguments.
    pub extra_args: Vec<String>,
}

impl Agent {
    pub fn new(server: &FakeApiServer, tag: &str, cni_socket: &Path) -> Agent {
        let name = format!("nodemesh-cnitest-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cgroup = mesh_testbed::cgroup2_mount().expect("cgroup2").join(&name);
        std::fs::create_dir_all(&cgroup).expect("cgroup");
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        Agent {
            child: None,
            socket: dir.join("admin.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            dir,
            cgroup,
            admin: free_port(),
            readiness: free_port(),
            cni_socket: cni_socket.to_owned(),
            kubeconfig,
            extra_args: Vec::new(),
        }
    }

    /// Starts the agent and waits until it is ready (first full sync done).
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let child = Command::new(AGENT)
            .args(["run", "--kubernetes", "--node", NODE, "--cgroup"])
            .arg(&self.cgroup)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .arg("--admin-socket")
            .arg(&self.socket)
            .arg("--cni-socket")
            .arg(&self.cni_socket)
            .args(["--admin-addr", &self.admin.to_string()])
            .args(["--metrics-addr", &free_port().to_string()])
            .args(["--readiness-addr", &self.readiness.to_string()])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        self.child = Some(child);
        self.wait("readiness", |a| {
            http_get(a.readiness, "/healthz/ready").0 == 200
        });
    }

    /// SIGTERM, then SIGKILL after 10 s; by pid, our own child.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The cgroup the agent captures (`--cgroup`): only processes under it are redirected.
    // `expect` cannot work here: tests/proc_scan.rs uses it, tests/cni.rs does not.
    #[allow(
        dead_code,
        reason = "used by some of the test binaries sharing this module"
    )]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn wait(&mut self, what: &str, mut f: impl FnMut(&Agent) -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
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

    /// The agent's `/workloads`, right now.
    pub fn workloads(&self) -> Vec<Value> {
        let (code, body) = http_get(self.admin, "/workloads");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .expect("JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `state` of pod `namespace/name` in `/workloads`, with its netns.
    pub fn state_of(&self, namespace: &str, name: &str) -> Option<(String, String)> {
        self.workloads()
            .into_iter()
            .find(|w| w["namespace"] == namespace && w["name"] == name)
            .map(|w| (text(&w["state"]), text(&w["netns"])))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Unpinning the links detaches the programs; the cgroup is empty.
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// A plain HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
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

pub fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({"nodemesh.io/enabled": "true"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A pod just scheduled to this node: no IP yet (the kubelet reports it after CNI ADD).
pub fn pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
           "status": {"phase": "Pending"}})
}
