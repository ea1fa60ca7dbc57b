//! Pods that were running before the agent, enrolled without any CNI ADD (root): each pod's
//! network namespace is made by the cluster's CNI alone (Debian's bridge + host-local, no
//! nodemesh-cni in the chain) and holds a running process in a kubepods-style cgroup named
//! after the pod's UID; `mesh-agent run --kubernetes` starts afterwards against the fake API
//! server and must find the pods in the host's /proc, enroll them, and capture their traffic.
//! A namespace labelled after its pod started is found the same way, and a pod with no
//! namespace anywhere stays pending with the reason.
//!
//! The agent captures only processes under its own cgroup, so the test's pod processes live
//! there. Processes, cgroups, network namespaces, the agent and its pins are removed on drop,
//! also when the test fails.

#[expect(dead_code, reason = "cni.rs uses the rest of the shared runtime")]
mod cni_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cni_support::{Agent, DEBIAN_CNI, Runtime, Sandbox, namespace, text};
use mesh_testbed::fake_kube::FakeApiServer;
use serde_json::{Value, json};

const SUBNET: u8 = 43;

/// Processes started in pod namespaces, in cgroups under the agent's; killed and removed on
/// drop (before the agent's own cgroup is removed).
struct PodProcesses {
    top: PathBuf,
    children: Vec<Child>,
}

impl PodProcesses {
    fn new(agent_cgroup: &Path) -> PodProcesses {
        let top = agent_cgroup.join("kubepods");
        std::fs::create_dir_all(&top).expect("kubepods cgroup");
        PodProcesses {
            top,
            children: Vec::new(),
        }
    }

    /// The cgroup the kubelet (cgroupfs driver) would give the pod's sandbox container.
    fn sandbox_cgroup(&self, uid: &str, sandbox_id: &str) -> PathBuf {
        let dir = self.top.join(format!("besteffort/pod{uid}/{sandbox_id}"));
        std::fs::create_dir_all(&dir).expect("pod cgroup");
        dir
    }

    /// `args` run in cgroup `cgroup` and network namespace `netns` (the mount namespace stays
    /// the host's).
    fn spawn(&mut self, cgroup: &Path, netns: &str, args: &[&str]) -> u32 {
        let child = Command::new("sh")
            .args([
                "-c",
                "echo $$ > \"$1/cgroup.procs\" && ns=\"$2\" && shift 2 && exec nsenter --net=\"$ns\" \"$@\"",
                "sh",
            ])
            .arg(cgroup)
            .arg(netns)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in the pod");
        let pid = child.id();
        self.children.push(child);
        // Wait until it runs in the pod's namespace, or has already run there and exited (a
        // short command such as curl can finish before the first look).
        let want = std::fs::metadata(netns).expect("netns").ino();
        let until = Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| m.ino())
            .ok()
            != Some(want)
        {
            let exited = self
                .children
                .last_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten()
                .is_some();
            if exited {
                break;
            }
            assert!(
                Instant::now() < until,
                "process {pid} never entered {netns}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pid
    }

    /// Runs `args` in the pod to completion: (success, stdout + stderr).
    fn run(&mut self, cgroup: &Path, netns: &str, args: &[&str]) -> (bool, String) {
        self.spawn(cgroup, netns, args);
        let mut child = self.children.pop().expect("child");
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        let ok = child.wait().is_ok_and(|s| s.success());
        (ok, out)
    }
}

impl Drop for PodProcesses {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything left in the subtree, then the directories, deepest first.
        let mut dirs = Vec::new();
        collect(&self.top, &mut dirs);
        for d in &dirs {
            if let Ok(pids) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) of a pid in a cgroup this test created and filled.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(5);
        for d in &dirs {
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Directories of a tree, deepest first.
fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect(&e.path(), out);
            }
        }
    }
    if dir.is_dir() {
        out.push(dir.to_owned());
    }
}

/// A TCP server on `addr` inside network namespace `netns` (the node's), answering one HTTP
/// response per connection, until the test ends.
fn http_server_in(netns: &str, addr: SocketAddrV4) {
    let ns = std::fs::File::open(netns).expect("node netns");
    let listener = std::thread::spawn(move || {
        // SAFETY: setns on this (short-lived) thread only; the fd is valid.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        TcpListener::bind(addr).expect("bind in the node's namespace")
    })
    .join()
    .expect("listener thread");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nnode!\n",
            );
        }
    });
}

fn plugins_present(test: &str) -> bool {
    let missing: Vec<&str> = ["bridge", "host-local", "loopback"]
        .into_iter()
        .filter(|p| !Path::new(DEBIAN_CNI).join(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: CNI plugins {missing:?} not in {DEBIAN_CNI} (`cargo xtask setup`)");
    assert!(
        std::env::var("MESH_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("SKIPPED {why}");
    false
}

/// A pod that has run for a while: scheduled here, with its IP and UID.
fn running_pod(ns: &str, name: &str, uid: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": {"app": name}},
           "spec": {"nodeName": cni_support::NODE, "containers": [{"name": "app", "image": "app"}]},
           "status": {"phase": "Running", "podIP": ip,
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// The sandbox's IP from the bridge's ADD result.
fn ip_of(sb: &Sandbox) -> String {
    let result = sb.result.as_ref().expect("ADD result");
    let addr = text(&result["ips"][0]["address"]);
    addr.split('/').next().unwrap_or_default().to_owned()
}

fn workload(agent: &Agent, ns: &str, name: &str) -> Value {
    agent
        .workloads()
        .into_iter()
        .find(|w| w["namespace"] == ns && w["name"] == name)
        .unwrap_or(Value::Null)
}

#[test]
fn pods_running_before_the_agent_are_found_in_proc_and_captured() {
    let test = "proc_scan::pods_running_before_the_agent_are_found_in_proc_and_captured";
    if !mesh_testbed::require_root(test) || !plugins_present(test) {
        return;
    }
    // Declared in this order so they drop in reverse: processes and their cgroups first,
    // then the agent, then the namespaces.
    let mut rt = Runtime::new("nmscan", SUBNET);
    let server = FakeApiServer::start().expect("fake API server");
    let mut agent = Agent::new(&server, "scan", &rt.socket());
    let mut procs = PodProcesses::new(agent.cgroup());

    // The cluster's CNI made the pods' namespaces long ago: bridge only, no nodemesh-cni.
    assert_eq!(rt.chain(), ["bridge"]);
    let web_uid = "3f2c8a10-5d4e-4b6a-9c1f-0a1b2c3d4e5f";
    let api_uid = "7e6d5c4b-3a29-4187-8f6e-5d4c3b2a1908";
    let mut web = rt.sandbox("shop", "web");
    rt.add(&mut web).expect("bridge ADD of shop/web");
    let mut api = rt.sandbox("late", "api");
    rt.add(&mut api).expect("bridge ADD of late/api");
    let (web_ip, api_ip) = (ip_of(&web), ip_of(&api));
    let web_sandbox = "a1".repeat(32);
    let web_cgroup = procs.sandbox_cgroup(web_uid, &web_sandbox);
    let web_pid = procs.spawn(&web_cgroup, &web.netns, &["sleep", "600"]);
    let api_cgroup = procs.sandbox_cgroup(api_uid, &"b2".repeat(32));
    let api_pid = procs.spawn(&api_cgroup, &api.netns, &["sleep", "600"]);
    let web_ino = std::fs::metadata(&web.netns).expect("netns").ino();

    for obj in [
        namespace("shop", true),
        namespace("late", false),
        namespace("kube-system", false),
        running_pod("shop", "web", web_uid, &web_ip),
        running_pod("late", "api", api_uid, &api_ip),
        // Meshed, with an IP no namespace has: stays pending, with the reason.
        running_pod(
            "shop",
            "ghost",
            "0badc0de-0000-4000-8000-000000000000",
            &format!("10.99.{SUBNET}.250"),
        ),
    ] {
        server.apply(obj).expect("seed");
    }
    agent.start();

    // Found in /proc, by IP confirmed by the UID in the cgroup: enrolled in the namespace of
    // the sandbox's process, with no CNI ADD at all.
    let web_path = format!("/proc/{web_pid}/ns/net");
    agent.wait("shop/web enrolled from /proc", |a| {
        a.state_of("shop", "web") == Some(("enrolled".into(), web_path.clone()))
    });
    let log = agent.log();
    let line =
        format!("enrolled existing pod shop/web from /proc (netns inode {web_ino}, pid {web_pid})");
    assert!(log.contains(&line), "{line:?} not in the log:\n{log}");
    assert!(log.contains("matched_by=IpAndCgroup"), "{log}");
    // Recorded like a CNI ADD, under the sandbox ID from the cgroup (a later DEL names it).
    let record = std::fs::read_to_string(rt.dir.join("cni-pods.json")).expect("pod record");
    let record: Value = serde_json::from_str(&record).expect("record JSON");
    let entry = record["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "web").cloned())
        .unwrap_or_else(|| panic!("shop/web not recorded: {record}"));
    assert_eq!(entry["containerId"], web_sandbox.as_str(), "{entry}");
    assert_eq!(entry["netns"], web_path.as_str(), "{entry}");

    // Its traffic is captured: a connection from the pod to the node goes through the agent.
    let gateway = Ipv4Addr::new(10, 99, SUBNET, 1);
    let node_ns = format!("/var/run/netns/{}", rt.node_ns);
    http_server_in(&node_ns, SocketAddrV4::new(gateway, 18080));
    let before = workload(&agent, "shop", "web")["outbound_connections"]
        .as_u64()
        .unwrap_or(0);
    let url = format!("http://{gateway}:18080/");
    let (ok, out) = procs.run(
        &web_cgroup,
        &web.netns,
        &["curl", "-sS", "--max-time", "5", &url],
    );
    assert!(
        ok && out.contains("node!"),
        "curl from shop/web: {out}\n{}",
        agent.log()
    );
    let w = workload(&agent, "shop", "web");
    assert!(
        w["outbound_connections"].as_u64().unwrap_or(0) > before,
        "the connection did not go through the agent: {w}"
    );

    // The pod nobody has: pending, the reason says it was looked for and why it was not found.
    agent.wait("shop/ghost pending with the scan's reason", |a| {
        text(&workload(a, "shop", "ghost")["reason"]).contains("not found in /proc")
    });
    let ghost = workload(&agent, "shop", "ghost");
    assert_eq!(ghost["state"], "pending", "{ghost}");
    let reason = text(&ghost["reason"]);
    assert!(
        reason.starts_with("waiting for the pod's network namespace")
            && reason.contains(&format!(
                "no process's network namespace has IP 10.99.{SUBNET}.250"
            )),
        "{reason}"
    );
    assert!(
        agent
            .log()
            .contains("existing pod shop/ghost not found in /proc"),
        "{}",
        agent.log()
    );
    // late/api is not meshed yet: not looked for, not enrolled.
    assert_eq!(agent.state_of("late", "api"), None);

    // Its namespace labelled after the pod started: found on that config change.
    server.apply(namespace("late", true)).expect("label");
    let api_path = format!("/proc/{api_pid}/ns/net");
    agent.wait("late/api enrolled from /proc after the label", |a| {
        a.state_of("late", "api") == Some(("enrolled".into(), api_path.clone()))
    });
    assert!(
        agent
            .log()
            .contains("enrolled existing pod late/api from /proc"),
        "{}",
        agent.log()
    );
    // Unlabelled again: unenrolled like any pod.
    server.apply(namespace("late", false)).expect("unlabel");
    agent.wait("late/api unenrolled", |a| {
        a.state_of("late", "api").is_none()
    });
    drop(procs);
    agent.stop();
}
