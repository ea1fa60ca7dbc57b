//! Root-only tests of agent management, with `mesh-testapp run` standing in for
//! `mesh-agent run` (same command line): the agent runs in its node's network namespace and
//! cgroup but the host mount namespace, readiness over the admin socket, stop/kill/restart,
//! persistence across "invocations", cleanup.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use mesh_testbed::{Testbed, TestbedConfig, cgroup2_mount, require_root};

const FAKE_AGENT: &str = env!("CARGO_BIN_EXE_mesh-testapp");

fn ns_inode(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn agents_run_in_their_node_and_are_managed() {
    if !require_root("agents_run_in_their_node_and_are_managed") {
        return;
    }
    let cfg = TestbedConfig::new(2)
        .agent(FAKE_AGENT)
        .manifest("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n");
    let mut tb = Testbed::up(cfg).expect("testbed up");
    let prefix = tb.prefix().to_string();
    let mount = cgroup2_mount().unwrap();
    for node in tb.node_names() {
        let info = tb.node(&node).unwrap().clone();
        let pid = tb.agent_pid(&node).expect("agent pid");
        assert!(tb.agent_running(&node));
        // Network namespace: the node's. Mount namespace: ours (cgroup2/bpffs visible).
        let netns_ino = std::fs::metadata(mesh_testbed::netns_path(&info.netns))
            .unwrap()
            .ino();
        assert_eq!(ns_inode(pid, "net"), format!("net:[{netns_ino}]"));
        assert_eq!(ns_inode(pid, "mnt"), ns_inode(std::process::id(), "mnt"));
        // cgroup: the node's.
        let rel = format!("/{}", info.cgroup.strip_prefix(&mount).unwrap().display());
        assert_eq!(mesh_testbed::cgroup_of_pid(pid).unwrap(), rel);
        assert!(rel.ends_with(&format!("{prefix}/{node}")), "{rel}");
        // Admin API over the unix socket.
        assert_eq!(
            tb.admin_get(&node, "/healthz/ready").unwrap(),
            (200, "ready\n".to_string())
        );
        assert_eq!(tb.admin_get(&node, "/node").unwrap().1.trim(), node);
        assert_eq!(tb.admin_get(&node, "/nope").unwrap().0, 404);
        // Command line and log.
        let log = tb.agent_log(&node);
        assert!(log.contains(&format!("fake agent on {node}")), "{log}");
        assert!(
            log.contains(&format!("manifests={}", tb.manifests_dir().display())),
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "bpffs=/sys/fs/bpf/nodemesh-{prefix}-node{}",
                info.index
            )),
            "{log}"
        );
        if std::env::var_os("RUST_LOG").is_none() {
            assert!(log.contains("RUST_LOG=info"), "{log}");
        }
    }

    // stop, start, kill, start.
    let old = tb.agent_pid("node-1").unwrap();
    tb.stop_agent("node-1").unwrap();
    assert!(!tb.agent_running("node-1"));
    assert!(!alive(old));
    assert!(tb.admin_get("node-1", "/healthz/ready").is_err());
    tb.start_agent("node-1").unwrap();
    let pid = tb.agent_pid("node-1").unwrap();
    assert_ne!(pid, old);
    tb.kill_agent("node-1").unwrap();
    assert!(!alive(pid));
    tb.start_agent("node-1").unwrap();
    assert!(
        tb.start_agent("node-1").is_err(),
        "a second agent on one node"
    );
    assert_eq!(tb.admin_get("node-1", "/healthz/ready").unwrap().0, 200);
    assert_eq!(tb.agent_log("node-1").matches("=== testbed").count(), 3);

    // Hand over (like the CLI's `up`), re-open, and take down from the re-opened value.
    let pids: Vec<u32> = tb
        .node_names()
        .iter()
        .map(|n| tb.agent_pid(n).unwrap())
        .collect();
    tb.keep().unwrap();
    let mut loaded = Testbed::load(Some(&prefix)).unwrap();
    assert!(loaded.agent_running("node-2"));
    assert_eq!(loaded.admin_get("node-2", "/healthz/ready").unwrap().0, 200);
    loaded.down().unwrap();
    for pid in pids {
        assert!(!alive(pid), "agent {pid} survived down");
    }
    assert!(!cgroup2_mount().unwrap().join(&prefix).exists());
    assert!(!Path::new(mesh_testbed::STATE_ROOT).join(&prefix).exists());
    assert!(!mesh_testbed::netns_path(&format!("{prefix}-node1")).exists());
}
