//! The CNI plugin driven exactly as a container runtime drives it (root): Debian's reference
//! plugins (bridge + host-local) and nodemesh-cni chained in a conflist that
//! `mesh-agent cni install` edited, each plugin found in CNI_PATH by its type and run with the
//! CNI_* environment and its config (with `prevResult`) on stdin, against `mesh-agent run
//! --kubernetes` and the fake API server.
//!
//! The plugins run in a network namespace standing for the node, so the bridge, its veths
//! and routes never touch the host's network; the pods' namespaces are named ones, as
//! containerd pins them. Everything is removed on drop, also when the test fails.

mod cni_support;

use std::path::Path;
use std::time::{Duration, Instant};

use cni_support::{AGENT, Agent, DEBIAN_CNI, Runtime, namespace, pod};
use mesh_testbed::fake_kube::FakeApiServer;
use serde_json::Value;

/// The Debian plugins must be there (`cargo xtask setup` installs them); a missing one fails
/// the test under MESH_REQUIRE_PRIVILEGED=1 and skips it otherwise.
fn plugins_present(test: &str) -> bool {
    let missing: Vec<&str> = ["bridge", "host-local"]
        .into_iter()
        .filter(|p| !Path::new(DEBIAN_CNI).join(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: CNI plugins {missing:?} not in {DEBIAN_CNI} (Debian's containernetworking-plugins; \
         `cargo xtask setup` installs it)"
    );
    if std::env::var("MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{why}");
    }
    eprintln!("SKIPPED {why}");
    false
}

fn error_doc(stdout: &str) -> Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("not a CNI error document ({e}): {stdout}"))
}

#[test]
fn cni_add_enrolls_before_returning_and_fails_closed_without_the_agent() {
    let test = "cni::cni_add_enrolls_before_returning_and_fails_closed_without_the_agent";
    if !mesh_testbed::require_root(test) || !plugins_present(test) {
        return;
    }
    let mut rt = Runtime::new("nmcni", 41);
    let server = FakeApiServer::start().expect("fake API server");
    for obj in [
        namespace("shop", true),
        namespace("plain", false),
        namespace("kube-system", false),
        pod("shop", "web"),
        pod("plain", "db"),
    ] {
        server.apply(obj).expect("seed");
    }
    let mut agent = Agent::new(&server, "main", &rt.socket());
    agent.start();

    // Installed by hand (`mesh-agent cni install`): the binary as nodemesh-cni, chained after
    // the bridge.
    let bridge_only = std::fs::read(rt.conf_dir().join("10-bridge.conflist")).expect("conflist");
    let out = std::process::Command::new(AGENT)
        .args(["cni", "install", "--timeout", "10s", "--bin-dir"])
        .arg(rt.bin_dir())
        .arg("--conf-dir")
        .arg(rt.conf_dir())
        .arg("--agent-socket")
        .arg(rt.socket())
        .output()
        .expect("cni install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rt.chain(), ["bridge", "nodemesh-cni"]);

    // ADD of a meshed pod returns only once the agent shows it enrolled in its netns.
    let mut web = rt.sandbox("shop", "web");
    let add = rt
        .add(&mut web)
        .unwrap_or_else(|r| panic!("ADD shop/web: {r:?}\n{}", agent.log()));
    let state = agent.state_of("shop", "web");
    assert_eq!(
        state,
        Some(("enrolled".into(), web.netns.clone())),
        "right after ADD returned"
    );
    // The bridge's result, passed through unchanged: what the runtime gets from the chain.
    let bridge_result: Value = serde_json::from_str(&add.stdout).expect("result");
    assert!(
        bridge_result["ips"][0]["address"]
            .as_str()
            .unwrap_or("")
            .starts_with("10.99.41."),
        "{bridge_result}"
    );
    let w = agent
        .workloads()
        .into_iter()
        .find(|w| w["name"] == "web")
        .expect("web");
    assert!(w["netns_cookie"].as_u64().unwrap_or(0) > 0, "{w}");
    let ip = bridge_result["ips"][0]["address"]
        .as_str()
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        w["ip"],
        ip.as_str(),
        "the pod IP from the bridge's result, before the API has one"
    );
    assert!(add.stderr.contains("pod shop/web enrolled"), "{add:?}");

    // A pod of a namespace that is not enrolled: ADD passes, nothing is enrolled.
    let mut db = rt.sandbox("plain", "db");
    let add = rt
        .add(&mut db)
        .unwrap_or_else(|r| panic!("ADD plain/db: {r:?}"));
    assert!(
        add.stderr
            .contains("not meshed: namespace plain is not labelled"),
        "{add:?}"
    );
    assert!(
        add.took < Duration::from_secs(5),
        "no wait for a pod not meshed: {add:?}"
    );
    assert_eq!(agent.state_of("plain", "db"), None);

    // The API watch behind the kubelet: ADD waits for the pod to appear, then enrolls it.
    let mut late = rt.sandbox("shop", "late");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::scope(|s| {
        let rt = &rt;
        let late = &mut late;
        let tx = done_tx.clone();
        s.spawn(move || {
            let r = rt.add(late);
            let _ = tx.send(());
            r
        });
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            done_rx.try_recv().is_err(),
            "ADD returned before the pod was known"
        );
        server.apply(pod("shop", "late")).expect("late pod");
    });
    let waited = started.elapsed();
    assert!(
        late.result.is_some(),
        "ADD shop/late failed:\n{}",
        agent.log()
    );
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert_eq!(
        agent.state_of("shop", "late"),
        Some(("enrolled".into(), late.netns.clone()))
    );

    // CHECK through the chain: all as ADD left it.
    for (kind, run) in rt.check(&web) {
        assert!(run.ok, "CHECK {kind}: {run:?}");
    }

    // DEL unenrolls: right after it returns the pod is no longer enrolled (it waits, meshed,
    // for its next sandbox).
    for (kind, run) in rt.del(&web) {
        assert!(run.ok, "DEL {kind}: {run:?}");
    }
    assert_eq!(
        agent.state_of("shop", "web").map(|s| s.0),
        Some("pending".into())
    );

    // A restarted agent re-enrolls the pods it had from its record, without the CNI. This
    // one keeps the plugin chained itself, as the DaemonSet's does: the cluster's CNI
    // rewriting its conflist (without our entry) does not unchain it for long.
    agent.stop();
    std::fs::write(rt.conf_dir().join("10-bridge.conflist"), &bridge_only).expect("rewrite");
    let (bin, conf) = (rt.bin_dir(), rt.conf_dir());
    agent.extra_args = vec![
        format!("--cni-bin-dir={}", bin.display()),
        format!("--cni-conf-dir={}", conf.display()),
    ];
    agent.start();
    agent.wait("shop/late re-enrolled after a restart", |a| {
        a.state_of("shop", "late") == Some(("enrolled".into(), late.netns.clone()))
    });
    agent.wait("the plugin chained by the agent", |_| {
        rt.chain() == ["bridge", "nodemesh-cni"]
    });
    std::fs::write(rt.conf_dir().join("10-bridge.conflist"), &bridge_only).expect("rewrite");
    agent.wait("the plugin chained again", |_| {
        rt.chain() == ["bridge", "nodemesh-cni"]
    });
    // The agent logs after it wrote the file: wait for the line rather than race it.
    agent.wait("the re-append logged", |a| {
        a.log().contains("appended again")
    });

    // The agent gone: ADD fails for a pod of an enrolled namespace with a CNI error naming
    // the socket, passes for a namespace the agent's list says is not enrolled; DEL succeeds.
    agent.stop();
    server.apply(pod("shop", "web2")).expect("pod");
    let mut web2 = rt.sandbox("shop", "web2");
    let failed = rt
        .add(&mut web2)
        .expect_err("ADD without the agent must fail");
    let doc = error_doc(&failed.stdout);
    assert_eq!(doc["code"], 11, "{doc}");
    assert_eq!(doc["cniVersion"], "1.0.0", "{doc}");
    let msg = doc["msg"].as_str().unwrap_or_default();
    for part in [
        rt.socket().display().to_string().as_str(),
        "namespace shop, enrolled",
        "fail closed",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    // The runtime cleans up after a failed ADD with DEL: it succeeds without the agent.
    for (kind, run) in rt.del(&web2) {
        assert!(run.ok, "DEL {kind} without the agent: {run:?}");
    }
    let mut db2 = rt.sandbox("plain", "db2");
    let add = rt
        .add(&mut db2)
        .unwrap_or_else(|r| panic!("ADD plain/db2 without the agent: {r:?}"));
    assert!(add.stderr.contains("starts unmeshed"), "{add:?}");
    let mut dns = rt.sandbox("kube-system", "coredns");
    assert!(rt.add(&mut dns).is_ok(), "kube-system is not enrolled");
    for sb in [&late, &db, &db2, &dns] {
        for (kind, run) in rt.del(sb) {
            assert!(
                run.ok,
                "DEL {kind} of {} without the agent: {run:?}",
                sb.name
            );
        }
    }
}
