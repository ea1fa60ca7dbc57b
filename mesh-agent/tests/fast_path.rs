//! The eBPF fast path (sock_ops + sk_msg + SOCKHASH) on the app-to-agent loopback hops, on the
//! testbed (root): every byte intact both ways for the ways apps send (small, large and split
//! writes, sendfile, splice, half-close), proof that the redirect carried them (counters, and
//! no payload on the pod's `lo`), no map entry left after 10 000 connections, a stalled reader
//! pushing back, switching off at runtime or by flag, and a failed self-test leaving it off
//! with the mesh working.
//!
//! The agents run with `--fast-path force`: this machine's kernel fails the self-test's
//! blocking-read check (a blocking read on an accelerated socket returns EAGAIN when the ACK
//! of its own half-close wakes it), so `on` would leave it off here. The clients read the way
//! event-loop applications do (poll, then a non-blocking recv), which that flaw does not
//! touch; every data check of the self-test still has to pass for `force` to turn it on.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_testbed::Testbed;
use serde_json::Value;

const FORCE: &[&str] = &["--fast-path", "force"];

fn manifests() -> String {
    docs(&[
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod(
            "default",
            "echo-near",
            "node-1",
            &[("app", "echo-near")],
            7000,
        ),
        pod(
            "default",
            "echo-far",
            "node-2",
            &[("app", "echo-far")],
            7000,
        ),
        pod(
            "default",
            "sink-far",
            "node-2",
            &[("app", "sink-far")],
            7001,
        ),
        pod(
            "default",
            "blob-far",
            "node-2",
            &[("app", "blob-far")],
            7003,
        ),
    ])
}

fn addr(tb: &Testbed, pod: &str, port: u16) -> String {
    format!("{}:{port}", tb.pod_ip("default", pod).expect("pod ip"))
}

fn servers(tb: &Testbed) -> Vec<mesh_testbed::PodProcess> {
    vec![
        serve(tb, "echo-near", &["echo", "--listen", "0.0.0.0:7000"]),
        serve(tb, "echo-far", &["echo", "--listen", "0.0.0.0:7000"]),
        serve(tb, "sink-far", &["sink", "--listen", "0.0.0.0:7001"]),
    ]
}

/// `mesh-testapp xfer ARGS` from the client pod; panics with its output unless it passed.
/// Returns its `ok ...` line.
fn xfer(tb: &Testbed, args: &[&str]) -> String {
    let mut all = vec!["xfer"];
    all.extend_from_slice(args);
    let out = testapp_in(tb, "client", &all, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("xfer {args:?}: {e:#}"));
    let ok = out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok ");
    assert!(
        ok,
        "xfer {args:?}: stdout {:?} stderr {:?}\nnode-1 ebpf {}\nnode-2 ebpf {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join(" / "),
        admin_json(tb, "node-1", "/stats")["ebpf"],
        admin_json(tb, "node-2", "/stats")["ebpf"],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn ebpf(tb: &Testbed, node: &str, name: &str) -> u64 {
    counter(tb, node, "ebpf", name)
}

fn fast_path_state(tb: &Testbed, node: &str) -> Value {
    admin_json(tb, node, "/status")["fast_path"].clone()
}

/// `mesh-agent fast-path [on|off]` against a node's agent: (success, stdout + stderr).
fn switch(tb: &Testbed, node: &str, set: &str) -> (bool, String) {
    let socket = tb.node(node).expect("node").admin_socket.clone();
    let out = Command::new(AGENT)
        .args(["fast-path", set, "--admin-socket"])
        .arg(&socket)
        .output()
        .expect("mesh-agent fast-path");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every transfer the issue lists, against the echo on the same node and the one across, and
/// the sink (whose answer comes only after the half-close).
fn transfers(tb: &Testbed) {
    let near = addr(tb, "echo-near", 7000);
    let far = addr(tb, "echo-far", 7000);
    let sink = addr(tb, "sink-far", 7001);
    for target in [&near, &far] {
        // small writes: one 5-byte message
        xfer(tb, &["--connect", target, "--bytes", "5"]);
        // split writes: 200 KB in 7-byte writes
        xfer(
            tb,
            &["--connect", target, "--bytes", "200000", "--chunk", "7"],
        );
        // large writes: 8 MiB in 1 MiB writes
        xfer(
            tb,
            &[
                "--connect",
                target,
                "--bytes",
                "8388608",
                "--chunk",
                "1048576",
            ],
        );
        for mode in ["sendfile", "splice"] {
            xfer(
                tb,
                &["--connect", target, "--bytes", "4194304", "--mode", mode],
            );
        }
    }
    xfer(
        tb,
        &[
            "--connect",
            &sink,
            "--bytes",
            "3000000",
            "--reply",
            "sink",
            "--mode",
            "splice",
        ],
    );
}

/// tshark on a pod's `lo`, port 15001 (the app-to-agent hop of captured connections).
fn capture_lo(tb: &Testbed, pod: &str) -> PacketCapture {
    let file = tb.state_dir().join("tmp").join(format!("{pod}-lo.pcap"));
    let cmd = tb.pod_command(pod, "tshark").expect("pod command");
    PacketCapture::start(cmd, "lo", "tcp port 15001", file)
}

/// Stops the capture; returns the TCP payload bytes it saw.
fn payload_bytes(cap: PacketCapture) -> u64 {
    let file = cap.finish();
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&file)
        .args(["-T", "fields", "-e", "tcp.len"])
        .output()
        .expect("tshark -r");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// Bytes echoed in [`lo_payload_of_a_transfer`]: under the default budget (4 MiB per socket).
const LO_TRANSFER: u64 = 2 << 20;

/// Payload bytes on the client's `lo` while 2 MiB are echoed through the mesh.
fn lo_payload_of_a_transfer(tb: &Testbed) -> u64 {
    let far = addr(tb, "echo-far", 7000);
    let cap = capture_lo(tb, "client");
    xfer(
        tb,
        &["--connect", &far, "--bytes", &LO_TRANSFER.to_string()],
    );
    payload_bytes(cap)
}

#[test]
fn every_byte_arrives_both_ways_through_the_fast_path() {
    let Some(tb) = up_with_args("fast_path_bytes", 2, &[("app.yaml", &manifests())], FORCE) else {
        return;
    };
    let _servers = servers(&tb);
    for node in ["node-1", "node-2"] {
        let fp = fast_path_state(&tb, node);
        assert_eq!(fp["on"], true, "fast path on {node}: {fp}");
    }
    let before: Vec<u64> = ["node-1", "node-2"]
        .iter()
        .map(|n| ebpf(&tb, n, "fast_path_redirected"))
        .collect();
    transfers(&tb);
    // Both agents' hops were redirected: the client's outbound hop on node-1 (and the near
    // echo's delivery hop), the far servers' delivery hops on node-2.
    for (node, before) in ["node-1", "node-2"].iter().zip(before) {
        let redirected = ebpf(&tb, node, "fast_path_redirected") - before;
        assert!(
            redirected >= 1000,
            "{node}: only {redirected} messages went through the fast path"
        );
    }
    // The 8 MiB transfers went past the 4 MiB budget: the rest of each went over the stack.
    assert!(
        ebpf(&tb, "node-1", "fast_path_stack") > 0,
        "no socket was moved to the stack after its budget"
    );
    // And the bytes did not cross the client's loopback: 2 MiB each way, (almost) nothing
    // on lo but handshakes. A message sent before the agent's end was in the map takes the
    // stack, so allow a little.
    let on_lo = lo_payload_of_a_transfer(&tb);
    assert!(
        on_lo < 64 * 1024,
        "{on_lo} payload bytes crossed the client's lo with the fast path on"
    );
    tb.down().expect("down");
}

#[test]
fn ten_thousand_short_connections_leave_the_maps_as_they_were() {
    let Some(tb) = up_with_args("fast_path_churn", 2, &[("app.yaml", &manifests())], FORCE) else {
        return;
    };
    let _servers = servers(&tb);
    let near = addr(&tb, "echo-near", 7000);
    // One connection first, so the agent's own long-lived state (HBONE pools) exists.
    xfer(&tb, &["--connect", &near, "--bytes", "16"]);
    let start = map_sizes(&tb);
    let inserted = ebpf(&tb, "node-1", "fast_path_inserted");
    xfer(
        &tb,
        &[
            "--connect",
            &near,
            "--bytes",
            "16",
            "--connections",
            "10000",
        ],
    );
    // Four sockets per connection on node-1: the client's hop and the echo's delivery hop.
    let added = ebpf(&tb, "node-1", "fast_path_inserted") - inserted;
    assert!(added >= 40_000, "only {added} sockets entered the SOCKHASH");
    wait_for_map_sizes(&tb, start);
    tb.down().expect("down");
}

/// The node-1 maps whose size must come back after connections end.
fn map_sizes(tb: &Testbed) -> [(&'static str, u64); 4] {
    let e = &admin_json(tb, "node-1", "/stats")["ebpf"];
    [
        "fast_path_entries",
        "fast_path_sent_entries",
        "orig_dst_entries",
        "sock_orig_dst_entries",
    ]
    .map(|k| (k, e[k].as_u64().expect(k)))
}

fn wait_for_map_sizes(tb: &Testbed, start: [(&'static str, u64); 4]) {
    // Sockets close asynchronously (the last close happens after the client exits).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let now = map_sizes(tb);
        if now == start {
            return;
        }
        assert!(
            Instant::now() < until,
            "maps did not return to their size: before {start:?}, after {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn closing_or_resetting_with_bytes_queued_loses_nothing_and_leaks_nothing() {
    let Some(tb) = up_with_args("fast_path_close", 2, &[("app.yaml", &manifests())], FORCE) else {
        return;
    };
    let mut sink = serve(
        &tb,
        "sink-far",
        &["sink", "--listen", "0.0.0.0:7001", "--report"],
    );
    let _blob = serve(
        &tb,
        "blob-far",
        &["blob", "--listen", "0.0.0.0:7003", "--bytes", "3145728"],
    );
    let sink_addr = addr(&tb, "sink-far", 7001);
    xfer(
        &tb,
        &["--connect", &sink_addr, "--bytes", "16", "--reply", "sink"],
    );
    let _ = sink.wait_for_line("received", Duration::from_secs(5));
    let start = map_sizes(&tb);
    let redirected =
        |tb: &Testbed| ["node-1", "node-2"].map(|n| ebpf(tb, n, "fast_path_redirected"));
    let before = redirected(&tb);

    // The app writes 1 MiB and closes at once: the bytes still queued (in the agent's
    // socket, put there by the redirect) must all reach the server, then its EOF.
    let sent = xfer(
        &tb,
        &[
            "--connect",
            &sink_addr,
            "--bytes",
            "1048576",
            "--end",
            "close",
        ],
    );
    let crc = sent.rsplit(' ').next().expect("crc").to_string();
    let line = sink
        .wait_for_line("received", Duration::from_secs(10))
        .expect("the sink's report");
    assert!(
        line.ends_with(&format!(" 1048576 {crc}")),
        "the server got {line:?}, the client sent 1048576 bytes with crc {crc}"
    );

    // The server sends 3 MiB and closes at once while the client does not read yet: the
    // bytes queued for the client survive the close of every socket behind them.
    xfer(
        &tb,
        &[
            "--connect",
            &addr(&tb, "blob-far", 7003),
            "--bytes",
            "0",
            "--reply",
            "blob",
            "--blob-bytes",
            "3145728",
            "--read-delay-ms",
            "500",
        ],
    );

    // Both agents' hops carried these through the fast path.
    let after = redirected(&tb);
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "the fast path was not used: {before:?} -> {after:?}"
    );

    // Resets with bytes in flight: nothing breaks, nothing leaks.
    for _ in 0..20 {
        xfer(
            &tb,
            &[
                "--connect",
                &sink_addr,
                "--bytes",
                "262144",
                "--end",
                "reset",
            ],
        );
    }
    xfer(
        &tb,
        &[
            "--connect",
            &sink_addr,
            "--bytes",
            "65536",
            "--reply",
            "sink",
        ],
    );
    wait_for_map_sizes(&tb, start);
    tb.down().expect("down");
}

#[test]
fn a_stalled_reader_pushes_back_on_the_writer() {
    let yaml = docs(&[
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod("default", "stall", "node-2", &[("app", "stall")], 7002),
    ]);
    let Some(tb) = up_with_args("fast_path_stall", 2, &[("app.yaml", &yaml)], FORCE) else {
        return;
    };
    let _stall = serve(&tb, "stall", &["stall", "--listen", "0.0.0.0:7002"]);
    let target = addr(&tb, "stall", 7002);
    let out = testapp_in(
        &tb,
        "client",
        &["fill", "--connect", &target, "--max-bytes", "268435456"],
        Duration::from_secs(60),
    )
    .expect("fill");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fill: {text} {:?}", out.stderr);
    let taken: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("taken "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no taken line: {text}"));
    // The kernel does not bound redirected bytes by the reader's buffer; the budget (4 MiB
    // per socket) does, then TCP's own buffers on both hops and the agents' bounded relay
    // buffers: the app's writes stop being taken.
    assert!(
        text.contains("full yes"),
        "the connection kept taking bytes: {text}"
    );
    assert!(
        taken < 64 << 20,
        "{taken} bytes were taken by a connection whose reader never reads"
    );
    assert!(
        ebpf(&tb, "node-1", "fast_path_redirected") > 0,
        "the fast path was not used"
    );
    tb.down().expect("down");
}

#[test]
fn switching_off_at_runtime_keeps_live_and_new_connections_flowing() {
    let Some(tb) = up_with_args("fast_path_switch", 2, &[("app.yaml", &manifests())], FORCE) else {
        return;
    };
    let _servers = servers(&tb);
    let far = addr(&tb, "echo-far", 7000);
    // A connection that lives across both switches: 48 writes of 4 KiB, 100 ms apart.
    let live = |tb: &Testbed| {
        let mut cmd = tb.pod_command("client", testapp()).expect("pod command");
        cmd.args([
            "xfer",
            "--connect",
            &far,
            "--bytes",
            "196608",
            "--chunk",
            "4096",
            "--delay-ms",
            "100",
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("xfer")
    };
    let finish = |child: Child| {
        let out = child.wait_with_output().expect("xfer");
        assert!(
            out.status.success(),
            "the live connection broke: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let running = live(&tb);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = switch(&tb, "node-1", "off");
    assert!(ok && out.starts_with("off"), "{out}");
    assert_eq!(fast_path_state(&tb, "node-1")["on"], false);
    let redirected = ebpf(&tb, "node-1", "fast_path_redirected");
    // New connections go over the stack; the live one goes on, in order.
    transfers(&tb);
    finish(running);
    assert_eq!(
        ebpf(&tb, "node-1", "fast_path_redirected"),
        redirected,
        "messages were redirected on node-1 with the fast path off"
    );
    // With it off the bytes cross lo: what the "on" test's lo check would catch.
    let on_lo = lo_payload_of_a_transfer(&tb);
    // (2 MiB each way; tshark may drop a few packets, so ask for one direction's worth.)
    assert!(
        on_lo >= LO_TRANSFER,
        "only {on_lo} payload bytes on lo with the fast path off"
    );

    let running = live(&tb);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = switch(&tb, "node-1", "on");
    assert!(ok && out.starts_with("on"), "{out}");
    transfers(&tb);
    finish(running);
    assert!(
        ebpf(&tb, "node-1", "fast_path_redirected") > redirected,
        "turned on again, new connections were not redirected"
    );
    tb.down().expect("down");
}

#[test]
fn fast_path_off_by_default_keeps_the_mesh_working() {
    let Some(tb) = up("fast_path_off", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _servers = servers(&tb);
    let fp = fast_path_state(&tb, "node-1");
    assert_eq!(fp["on"], false, "{fp}");
    assert_eq!(fp["reason"], "turned off with --fast-path=off", "{fp}");
    transfers(&tb);
    for node in ["node-1", "node-2"] {
        assert_eq!(ebpf(&tb, node, "fast_path_inserted"), 0, "{node}");
        assert_eq!(ebpf(&tb, node, "fast_path_redirected"), 0, "{node}");
    }
    // Off by flag means no self-test ran: it cannot be turned on at runtime.
    let (ok, out) = switch(&tb, "node-1", "on");
    assert!(!ok && out.contains("cannot be turned on"), "{out}");
    tb.down().expect("down");
}

#[test]
fn a_failed_self_test_leaves_the_fast_path_off_and_the_mesh_working() {
    let Some(tb) = up_with_args(
        "fast_path_selftest",
        2,
        &[("app.yaml", &manifests())],
        &["--fast-path", "on", "--fast-path-inject-self-test-failure"],
    ) else {
        return;
    };
    let _servers = servers(&tb);
    let fp = fast_path_state(&tb, "node-1");
    assert_eq!(fp["on"], false, "{fp}");
    assert_eq!(fp["self_test"], "failed", "{fp}");
    assert!(
        fp["self_test_error"]
            .as_str()
            .is_some_and(|e| e.contains("never entered the SOCKHASH")),
        "{fp}"
    );
    let status = Command::new(AGENT)
        .args(["status", "--admin-socket"])
        .arg(&tb.node("node-1").expect("node").admin_socket)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("fast path:    off (self-test failed: the loopback connection never entered"),
        "{text}"
    );
    // It cannot be forced on.
    let (ok, out) = switch(&tb, "node-1", "on");
    assert!(!ok && out.contains("cannot be turned on"), "{out}");
    transfers(&tb);
    assert_eq!(ebpf(&tb, "node-1", "fast_path_redirected"), 0);
    assert_eq!(ebpf(&tb, "node-1", "fast_path_inserted"), 0);
    tb.down().expect("down");
}
