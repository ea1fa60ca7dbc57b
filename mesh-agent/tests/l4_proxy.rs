//! L4 proxying through real agents on the testbed (root): Service ClusterIPs balanced over
//! endpoints on both nodes, the client's IP preserved, passthrough, no loops, half-close and
//! integrity of a large transfer, prompt failure on refused upstreams.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use mesh_testbed::PodProcess;
use serde_json::Value;

fn web_manifests(backends: &[(&str, &str)]) -> String {
    let mut parts = vec![
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
    ];
    for (name, node) in backends {
        parts.push(pod("default", name, node, &[("app", "web")], 8080));
    }
    parts.push(service("default", "web", "web", 80));
    docs(&parts)
}

fn http_servers(tb: &mesh_testbed::Testbed, pods: &[&str]) -> Vec<PodProcess> {
    pods.iter()
        .map(|p| {
            serve(
                tb,
                p,
                &[
                    "http",
                    "--listen",
                    "0.0.0.0:8080",
                    "--service",
                    "web",
                    "--version",
                    p,
                ],
            )
        })
        .collect()
}

/// The JSON the testapp HTTP server answers: which pod served, and whom it saw.
fn get(tb: &mesh_testbed::Testbed, url: &str) -> Value {
    let body = curl(tb, "client", url).unwrap_or_else(|e| panic!("{e:#}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn clusterip_reaches_backends_on_both_nodes_and_server_sees_client_ip() {
    let yaml = web_manifests(&[("web-1", "node-1"), ("web-2", "node-2")]);
    let Some(tb) = up("l4_clusterip", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _servers = http_servers(&tb, &["web-1", "web-2"]);
    let svc = tb.service_ip("default", "web").expect("service ip");
    let client_ip = tb
        .pod_ip("default", "client")
        .expect("client ip")
        .to_string();
    let before = service_connections(&tb, "node-1", "default/web");

    let mut served = BTreeMap::new();
    for _ in 0..4 {
        let r = get(&tb, &format!("http://{svc}/"));
        let client = r["client"].as_str().expect("client field");
        assert_eq!(
            client.split(':').next(),
            Some(client_ip.as_str()),
            "the server must see the client pod's IP, got {client}"
        );
        *served
            .entry(r["pod_ip"].as_str().expect("pod_ip").to_string())
            .or_insert(0) += 1;
    }
    let web1 = tb.pod_ip("default", "web-1").expect("ip").to_string();
    let web2 = tb.pod_ip("default", "web-2").expect("ip").to_string();
    assert!(
        served.contains_key(&web1),
        "same-node backend never reached: {served:?}"
    );
    assert!(
        served.contains_key(&web2),
        "cross-node backend never reached: {served:?}"
    );
    // The agent carried them: a ClusterIP is not routable without it.
    assert_eq!(
        service_connections(&tb, "node-1", "default/web") - before,
        4
    );
    tb.down().expect("down");
}

#[test]
fn round_robin_spreads_connections_over_three_endpoints() {
    let yaml = web_manifests(&[
        ("web-1", "node-1"),
        ("web-2", "node-2"),
        ("web-3", "node-2"),
    ]);
    let Some(tb) = up("l4_round_robin", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _servers = http_servers(&tb, &["web-1", "web-2", "web-3"]);
    let svc = tb.service_ip("default", "web").expect("service ip");
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..9 {
        let r = get(&tb, &format!("http://{svc}/"));
        *served
            .entry(r["version"].as_str().expect("version").to_string())
            .or_insert(0) += 1;
    }
    let expected: BTreeMap<String, u32> = [("web-1", 3), ("web-2", 3), ("web-3", 3)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    assert_eq!(
        served, expected,
        "round-robin must spread 9 connections 3/3/3"
    );
    tb.down().expect("down");
}

#[test]
fn destination_outside_the_mesh_passes_through() {
    let yaml = web_manifests(&[("web-1", "node-1")]);
    let Some(tb) = up("l4_passthrough", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    // A server outside the mesh: in node-2's own namespace, on its fabric address.
    let node2 = tb.node("node-2").expect("node-2").ip.to_string();
    let mut cmd = tb.node_command("node-2", testapp()).expect("node command");
    cmd.args(["peer", "--listen", "0.0.0.0:9000"]);
    let mut server = PodProcess::spawn(cmd, "peer on node-2").expect("spawn");
    server
        .wait_for_line("listening", Duration::from_secs(10))
        .expect("listening");

    let accepted = counter(&tb, "node-1", "proxy", "accepted");
    let reply = read_from(&tb, "client", &format!("{node2}:9000")).expect("passthrough read");
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    assert!(
        reply.starts_with(&format!("{client_ip}:")),
        "the outside server must see the client pod's IP, got {reply:?}"
    );
    assert_eq!(
        counter(&tb, "node-1", "proxy", "accepted") - accepted,
        1,
        "the connection must have gone through the agent"
    );
    drop(server);
    tb.down().expect("down");
}

#[test]
fn agent_upstream_connections_are_never_redirected() {
    let yaml = web_manifests(&[("web-1", "node-1")]);
    let Some(tb) = up("l4_no_loop", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _servers = http_servers(&tb, &["web-1"]);
    let web1 = tb.pod_ip("default", "web-1").expect("ip");
    let accepted = counter(&tb, "node-1", "proxy", "accepted");
    let redirected = counter(&tb, "node-1", "ebpf", "redirected");
    let skipped = counter(&tb, "node-1", "ebpf", "skipped_agent_mark");

    let r = get(&tb, &format!("http://{web1}:8080/"));
    assert_eq!(r["version"], "web-1");
    // One client connection captured, one accept; the agent's own upstream connect (made in
    // the same, enrolled namespace) was seen by connect4 and skipped for its mark.
    assert_eq!(counter(&tb, "node-1", "ebpf", "redirected") - redirected, 1);
    assert_eq!(counter(&tb, "node-1", "proxy", "accepted") - accepted, 1);
    assert!(counter(&tb, "node-1", "ebpf", "skipped_agent_mark") > skipped);
    tb.down().expect("down");
}

#[test]
fn half_close_and_one_gib_cross_node_arrive_intact() {
    let yaml = web_manifests(&[("web-2", "node-2")]);
    let Some(tb) = up("l4_integrity", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    // The sink reads to EOF (the client's half-close), then answers with the byte count and
    // CRC32: the reply travels after the client has shut its write side.
    let _sink = serve(&tb, "web-2", &["sink", "--listen", "0.0.0.0:8080"]);
    let svc = tb.service_ip("default", "web").expect("service ip");
    let target = format!("{svc}:80");
    let out = testapp_in(
        &tb,
        "client",
        &[
            "source",
            "--connect",
            &target,
            "--bytes",
            &(1u64 << 30).to_string(),
        ],
        Duration::from_secs(180),
    )
    .expect("source");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "1 GiB transfer failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sent 1073741824 "), "{stdout}");
    // The agent counts a connection's bytes when its relay ends, just after the client has
    // its answer.
    wait_until("the agent counted the GiB", Duration::from_secs(10), || {
        counter(&tb, "node-1", "proxy", "bytes_sent") >= 1 << 30
    });
    tb.down().expect("down");
}

#[test]
fn refused_upstream_resets_the_client_promptly_and_is_logged() {
    let yaml = web_manifests(&[("web-1", "node-1")]);
    let Some(tb) = up("l4_refused", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    // Nothing listens on web-1:8081.
    let web1 = tb.pod_ip("default", "web-1").expect("ip");
    let target = format!("{web1}:8081");
    let started = Instant::now();
    let result = read_from(&tb, "client", &target);
    let took = started.elapsed();
    assert!(
        result.is_err(),
        "a refused upstream must fail the client: {result:?}"
    );
    assert!(took < Duration::from_secs(3), "the client waited {took:?}");
    assert!(counter(&tb, "node-1", "proxy", "connect_errors") >= 1);
    let log = tb.agent_log("node-1");
    let line = log
        .lines()
        .find(|l| l.contains("upstream connect failed"))
        .unwrap_or_else(|| panic!("no connect failure logged:\n{log}"));
    assert!(
        line.contains(&target),
        "log line must name the upstream: {line}"
    );
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    assert!(
        line.contains("default/client"),
        "log line must name the pod: {line}"
    );
    assert!(
        line.contains(&client_ip),
        "log line must name the client's address: {line}"
    );
    tb.down().expect("down");
}

#[test]
fn unanswered_upstream_times_out_resets_the_client_and_is_logged() {
    let yaml = web_manifests(&[("web-1", "node-1")]);
    let Some(tb) = up_with_args(
        "l4_connect_timeout",
        2,
        &[("app.yaml", &yaml)],
        &["--connect-timeout", "1s"],
    ) else {
        return;
    };
    // node-1 silently drops everything for this address: the SYN is never answered.
    let black = "10.244.9.9";
    let mut cmd = tb.node_command("node-1", "ip").expect("node command");
    cmd.args(["route", "add", "blackhole", &format!("{black}/32")]);
    let out = run_bounded(cmd, Duration::from_secs(5)).expect("ip route");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let target = format!("{black}:80");
    let started = Instant::now();
    let result = read_from(&tb, "client", &target);
    let took = started.elapsed();
    assert!(
        result.is_err(),
        "an unanswered upstream must fail the client: {result:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "the client must be reset right after the 1s connect timeout, took {took:?}"
    );
    let log = tb.agent_log("node-1");
    let line = log
        .lines()
        .find(|l| l.contains("upstream connect failed") && l.contains(&target))
        .unwrap_or_else(|| panic!("no connect timeout logged:\n{log}"));
    assert!(line.contains("timed out"), "{line}");
    assert!(
        line.contains(&tb.pod_ip("default", "client").expect("ip").to_string()),
        "{line}"
    );
    tb.down().expect("down");
}

#[test]
fn the_application_sees_the_original_destination_as_its_peer() {
    let yaml = web_manifests(&[("web-2", "node-2")]);
    let Some(tb) = up("l4_getpeername", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _echo = serve(&tb, "web-2", &["echo", "--listen", "0.0.0.0:8080"]);
    let svc = format!(
        "{}:80",
        tb.service_ip("default", "web").expect("service ip")
    );
    let before = counter(&tb, "node-1", "ebpf", "sock_orig_dst_entries");
    let mut chat = Chat::open(&tb, "client", &svc);
    assert_eq!(
        chat.peer, svc,
        "getpeername must return the Service, not the agent's listener"
    );
    assert!(chat.echo("hello"));
    assert_eq!(
        counter(&tb, "node-1", "ebpf", "sock_orig_dst_entries"),
        before + 1
    );
    drop(chat);
    // The entry goes with the socket.
    wait_until(
        "the closed socket's entry to go",
        Duration::from_secs(5),
        || counter(&tb, "node-1", "ebpf", "sock_orig_dst_entries") == before,
    );
    tb.down().expect("down");
}

#[test]
fn connection_limit_resets_new_connections_and_keeps_open_ones() {
    let yaml = web_manifests(&[("web-1", "node-1")]);
    let Some(tb) = up_with_args(
        "l4_max_connections",
        2,
        &[("app.yaml", &yaml)],
        &["--max-connections", "1"],
    ) else {
        return;
    };
    let _echo = serve(&tb, "web-1", &["echo", "--listen", "0.0.0.0:8080"]);
    let target = format!("{}:8080", tb.pod_ip("default", "web-1").expect("ip"));
    let mut first = Chat::open(&tb, "client", &target);
    assert!(first.echo("one"));
    let refused = read_from(&tb, "client", &target);
    assert!(
        refused.is_err(),
        "over the limit the connection must be reset: {refused:?}"
    );
    assert_eq!(counter(&tb, "node-1", "proxy", "over_limit"), 1);
    assert!(first.echo("the open connection is untouched"));
    drop(first);
    wait_until("the connection to close", Duration::from_secs(5), || {
        counter(&tb, "node-1", "proxy", "active") == 0
    });
    let mut again = Chat::open(&tb, "client", &target);
    assert!(again.echo("room again"));
    assert!(tb.agent_log("node-1").contains("connection limit reached"));
    drop(again);
    tb.down().expect("down");
}
