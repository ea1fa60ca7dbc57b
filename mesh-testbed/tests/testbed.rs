//! Root-only tests of the testbed itself: connectivity between pods across and within nodes,
//! cgroup placement, manifest rendering on disk, runtime apply, persistence, and cleanup
//! (after `down`, on drop, and after a failed `up`).

#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use mesh_testbed::{Testbed, TestbedConfig, cgroup2_mount, require_root};

const TESTAPP: &str = env!("CARGO_BIN_EXE_mesh-testapp");

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: c, image: mesh-testapp}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {containers: [{name: s, image: mesh-testapp}]}
---
apiVersion: v1
kind: Pod
metadata: {name: neighbour, namespace: shop, labels: {app: neighbour}}
spec: {nodeName: node-1, containers: [{name: n, image: mesh-testapp}]}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{name: tcp-peer, port: 7000}]
"#;

fn output_ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {stdout:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `mesh-testapp read --connect addr` in `pod` and returns what the server sent.
fn read_from(tb: &Testbed, pod: &str, addr: &str) -> String {
    let out = tb
        .pod_command(pod, TESTAPP)
        .unwrap()
        .args(["read", "--connect", addr])
        .output()
        .unwrap();
    output_ok(&format!("read {addr} from {pod}"), out)
}

fn source_to(tb: &Testbed, pod: &str, addr: &str, bytes: u64) -> String {
    let out = tb
        .pod_command(pod, TESTAPP)
        .unwrap()
        .args(["source", "--connect", addr, "--bytes", &bytes.to_string()])
        .output()
        .unwrap();
    output_ok(&format!("source {addr} from {pod}"), out)
}

fn host_links() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing with this prefix is left: netns, cgroup, state dir, bpffs dir, host veth.
fn assert_gone(prefix: &str) {
    let dash = format!("{prefix}-");
    let netns: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&dash))
                .collect()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    let cg = cgroup2_mount().unwrap().join(prefix);
    assert!(!cg.exists(), "cgroup {} left", cg.display());
    let st = Path::new(mesh_testbed::STATE_ROOT).join(prefix);
    assert!(!st.exists(), "state dir {} left", st.display());
    let links = host_links();
    assert!(
        !links.lines().any(|l| l.contains(prefix)),
        "host links left: {links}"
    );
}

#[test]
fn pods_talk_across_and_within_nodes_and_everything_is_removed() {
    if !require_root("pods_talk_across_and_within_nodes_and_everything_is_removed") {
        return;
    }
    let cfg = TestbedConfig::new(2)
        .manifest("apps.yaml", APPS)
        .name_hint("pods_talk_across_and_within_nodes");
    let mut tb = Testbed::up(cfg).expect("testbed up");
    let prefix = tb.prefix().to_string();

    // Scheduling: round-robin for client/server, explicit node for neighbour.
    let client = tb.pod("shop/client").unwrap().clone();
    let server = tb.pod("server").unwrap().clone();
    let neighbour = tb.pod("shop/neighbour").unwrap().clone();
    assert_eq!(client.node, "node-1");
    assert_eq!(server.node, "node-2");
    assert_eq!(neighbour.node, "node-1");
    assert_eq!(client.ip, Ipv4Addr::new(10, 244, 1, 2));
    assert_eq!(server.ip, Ipv4Addr::new(10, 244, 2, 2));
    assert_eq!(neighbour.ip, Ipv4Addr::new(10, 244, 1, 3));
    assert_eq!(tb.pod_ip("shop", "server").unwrap(), server.ip);
    let svc = tb.service_ip("shop", "server").unwrap();
    assert_eq!(svc.octets()[..2], [10, 96]);
    assert_eq!(tb.node_names(), vec!["node-1", "node-2"]);

    // The rendered manifest carries node, IP and netns.
    let rendered = std::fs::read_to_string(tb.manifests_dir().join("apps.yaml")).unwrap();
    assert!(rendered.contains("podIP: 10.244.2.2"), "{rendered}");
    assert!(rendered.contains("nodeName: node-2"), "{rendered}");
    assert!(
        rendered.contains(&format!(
            "nodemesh.io/netns: {}",
            server.netns_path.display()
        )),
        "{rendered}"
    );
    assert!(
        rendered.contains(&format!("clusterIP: {svc}")),
        "{rendered}"
    );
    assert!(server.netns_path.exists());

    // Servers in the pods.
    let mut peer_srv = tb
        .spawn_in_pod("shop/server", TESTAPP, ["peer", "--listen", "0.0.0.0:7000"])
        .unwrap();
    peer_srv
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let mut sink_srv = tb
        .spawn_in_pod("shop/server", TESTAPP, ["sink", "--listen", ":7001"])
        .unwrap();
    sink_srv
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let mut near_srv = tb
        .spawn_in_pod("shop/neighbour", TESTAPP, ["peer", "--listen", "7000"])
        .unwrap();
    near_srv
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let mut near_sink = tb
        .spawn_in_pod("shop/neighbour", TESTAPP, ["sink", "--listen", "7001"])
        .unwrap();
    near_sink
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();

    // Across nodes: the peer sees the client pod's IP; bulk data with half-close is intact.
    let seen = read_from(&tb, "shop/client", &format!("{}:7000", server.ip));
    assert!(
        seen.starts_with(&format!("{}:", client.ip)),
        "peer saw {seen:?}"
    );
    let out = source_to(&tb, "shop/client", &format!("{}:7001", server.ip), 3 << 20);
    assert!(out.contains("sent 3145728 "), "{out}");
    // And back the other way.
    let seen = read_from(&tb, "shop/server", &format!("{}:7000", neighbour.ip));
    assert!(
        seen.starts_with(&format!("{}:", server.ip)),
        "peer saw {seen:?}"
    );

    // Same node.
    let seen = read_from(&tb, "shop/client", &format!("{}:7000", neighbour.ip));
    assert!(
        seen.starts_with(&format!("{}:", client.ip)),
        "peer saw {seen:?}"
    );
    source_to(
        &tb,
        "shop/client",
        &format!("{}:7001", neighbour.ip),
        1 << 20,
    );

    // Echo (with half-close) and HTTP, including a --call from one pod to another.
    let mut echo = tb
        .spawn_in_pod("shop/server", TESTAPP, ["echo", "--listen", ":7003"])
        .unwrap();
    echo.wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let out = tb
        .pod_command("shop/client", TESTAPP)
        .unwrap()
        .args([
            "read",
            "--connect",
            &format!("{}:7003", server.ip),
            "--send",
            "hello mesh",
        ])
        .output()
        .unwrap();
    assert_eq!(output_ok("echo", out), "hello mesh");
    let mut backend = tb
        .spawn_in_pod(
            "shop/server",
            TESTAPP,
            [
                "http",
                "--listen",
                ":8080",
                "--service",
                "ratings",
                "--version",
                "v2",
            ],
        )
        .unwrap();
    backend
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let call = "ratings=http://ratings:8080/r?x=1";
    let resolve = format!("ratings={}", server.ip);
    let mut front = tb
        .spawn_in_pod(
            "shop/neighbour",
            TESTAPP,
            [
                "http",
                "--listen",
                ":8080",
                "--service",
                "front",
                "--call",
                call,
                "--resolve",
                &resolve,
            ],
        )
        .unwrap();
    front
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let request =
        "GET /page HTTP/1.1\r\nHost: front\r\nx-request-id: r1\r\nConnection: close\r\n\r\n";
    let out = tb
        .pod_command("shop/client", TESTAPP)
        .unwrap()
        .args([
            "read",
            "--connect",
            &format!("{}:8080", neighbour.ip),
            "--send",
            request,
        ])
        .output()
        .unwrap();
    let resp = output_ok("http", out);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let json: serde_json::Value =
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["service"], "front");
    assert_eq!(json["path"], "/page");
    assert_eq!(json["pod_ip"], neighbour.ip.to_string());
    assert!(
        json["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", client.ip))
    );
    let c = &json["calls"][0];
    assert_eq!(c["status"], 200, "{json}");
    assert_eq!(c["body"]["service"], "ratings");
    assert_eq!(c["body"]["version"], "v2");
    assert_eq!(c["body"]["path"], "/r");
    assert_eq!(c["body"]["headers"]["x-request-id"], "r1");
    assert_eq!(c["body"]["headers"]["host"], "ratings:8080");
    drop((echo, backend, front));

    // Nothing routes ClusterIPs.
    let out = tb
        .pod_command("shop/client", TESTAPP)
        .unwrap()
        .args([
            "read",
            "--connect",
            &format!("{svc}:7000"),
            "--timeout",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "ClusterIP must not be reachable without the agent"
    );

    // Pod processes live in their pod's cgroup.
    let mount = cgroup2_mount().unwrap();
    let rel = |p: &Path| format!("/{}", p.strip_prefix(&mount).unwrap().display());
    assert_eq!(
        mesh_testbed::cgroup_of_pid(peer_srv.pid()).unwrap(),
        rel(&server.cgroup)
    );
    assert_eq!(
        mesh_testbed::cgroup_of_pid(near_srv.pid()).unwrap(),
        rel(&neighbour.cgroup)
    );
    assert!(
        server
            .cgroup
            .starts_with(mount.join(&prefix).join("node-2"))
    );
    let out = tb
        .pod_command("shop/client", "cat")
        .unwrap()
        .arg("/proc/self/cgroup")
        .output()
        .unwrap();
    let text = output_ok("cat /proc/self/cgroup", out);
    assert!(
        text.contains(&format!("0::{}", rel(&client.cgroup))),
        "{text}"
    );

    // Node plumbing.
    let node1 = tb.node("node-1").unwrap().clone();
    let veth = client.host_veth.clone().unwrap();
    assert_eq!(
        mesh_testbed::netns_sysctl(&node1.netns, &format!("net/ipv4/conf/{veth}/proxy_arp"))
            .unwrap(),
        "1"
    );
    assert_eq!(
        mesh_testbed::netns_sysctl(&node1.netns, "net/ipv4/ip_forward").unwrap(),
        "1"
    );

    // Runtime apply: existing pods keep their placement, new ones are created, and a new
    // file appears; the temp file never lands in the manifests directory.
    let more = r#"
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: shop}
spec: {nodeName: node-2}
---
apiVersion: v1
kind: Service
metadata: {name: late, namespace: shop}
spec: {ports: [{port: 80}]}
"#;
    tb.apply("more.yaml", more).unwrap();
    let late = tb.pod("late").unwrap().clone();
    assert_eq!(late.node, "node-2");
    assert_eq!(late.ip, Ipv4Addr::new(10, 244, 2, 3));
    tb.apply("apps.yaml", APPS).unwrap();
    assert_eq!(tb.pod("server").unwrap(), &server);
    assert_eq!(tb.service_ip("shop", "server").unwrap(), svc);
    let mut files: Vec<String> = std::fs::read_dir(tb.manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, vec!["apps.yaml", "more.yaml"]);
    let mut late_srv = tb
        .spawn_in_pod("late", TESTAPP, ["peer", "--listen", "7000"])
        .unwrap();
    late_srv
        .wait_for_line("listening", Duration::from_secs(10))
        .unwrap();
    let seen = read_from(&tb, "client", &format!("{}:7000", late.ip));
    assert!(
        seen.starts_with(&format!("{}:", client.ip)),
        "peer saw {seen:?}"
    );
    tb.remove_file("more.yaml").unwrap();
    assert!(!tb.manifests_dir().join("more.yaml").exists());
    // A pod may not be defined by two files.
    let err = tb.apply("dup.yaml", APPS).unwrap_err();
    assert!(format!("{err:#}").contains("apps.yaml"), "{err:#}");

    // Persistence: a re-opened testbed sees the same pods.
    tb.persist().unwrap();
    let loaded = Testbed::load(Some(&prefix)).unwrap();
    assert_eq!(loaded.pods(), tb.pods());
    assert_eq!(loaded.nodes(), tb.nodes());
    drop(loaded); // not armed: removes nothing
    assert!(server.netns_path.exists());

    // down() with processes still running in pods.
    let pids = [peer_srv.pid(), near_srv.pid(), late_srv.pid()];
    tb.down().unwrap();
    assert_gone(&prefix);
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let st = state.rsplit(')').next().unwrap_or("").trim_start();
        assert!(
            state.is_empty() || st.starts_with('Z'),
            "pod process {pid} survived: {state}"
        );
    }
}

#[test]
fn failed_up_removes_what_it_created() {
    if !require_root("failed_up_removes_what_it_created") {
        return;
    }
    let prefix = format!("nmf{:04x}", std::process::id() & 0xffff);
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\n---\n\
                apiVersion: v1\nkind: Pod\nmetadata: {name: lost}\nspec: {nodeName: node-7}\n";
    let mut cfg = TestbedConfig::new(2).manifest("pods.yaml", yaml);
    cfg.prefix = Some(prefix.clone());
    let err = match Testbed::up(cfg) {
        Ok(_) => panic!("up must fail for a pod on an unknown node"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("node-7") && err.contains("default/lost"),
        "{err}"
    );
    assert_gone(&prefix);

    // A failing agent: up fails with the agent's log in the error, and cleans up.
    let mut cfg = TestbedConfig::new(1).agent(TESTAPP);
    cfg.prefix = Some(prefix.clone());
    cfg.agent_args = vec!["--fail".into()];
    let err = match Testbed::up(cfg) {
        Ok(_) => panic!("up must fail when the agent fails"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("fake agent failing on purpose"), "{err}");
    assert_gone(&prefix);
}

#[test]
fn drop_removes_everything() {
    if !require_root("drop_removes_everything") {
        return;
    }
    let tb = Testbed::up(
        TestbedConfig::new(1)
            .manifest("a.yaml", "kind: Pod\napiVersion: v1\nmetadata: {name: a}\n"),
    )
    .unwrap();
    let prefix = tb.prefix().to_string();
    // A process nobody stops: only the testbed's cgroup cleanup can.
    let child = tb
        .pod_command("a", "sleep")
        .unwrap()
        .arg("600")
        .spawn()
        .unwrap();
    let pid = child.id();
    drop(child);
    drop(tb);
    assert_gone(&prefix);
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let st = state.rsplit(')').next().unwrap_or("").trim_start();
    assert!(
        state.is_empty() || st.starts_with('Z'),
        "sleep survived: {state}"
    );
}
