//! Mutual TLS between agents on the testbed (root), with the mesh CA running: HBONE on the
//! wire and never the plaintext, identities checked at both ends, 15008 closed to anyone
//! without a mesh certificate, the client's IP delivered to the app, pooled tunnels,
//! certificate rotation under a live connection and a CA outage.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mesh_testbed::Testbed;

/// client (sa `client`) on node-1, server (sa `server`) on node-2, both meshed; an
/// unenrolled `outsider` on node-1.
fn manifests() -> String {
    docs(&[
        namespace("default", true),
        namespace("other", false),
        pod_sa("default", "client", "node-1", "client", 9999),
        pod_sa("default", "server", "node-2", "server", 7000),
        pod_sa("other", "outsider", "node-1", "default", 9999),
    ])
}

fn server_addr(tb: &Testbed) -> String {
    format!(
        "{}:7000",
        tb.pod_ip("default", "server").expect("server ip")
    )
}

fn workload<'a>(w: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    w.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no workload {name} in {w}"))
}

/// Captures on the node's eth0 (the link between nodes).
fn capture_between_nodes(tb: &Testbed, node: &str) -> PacketCapture {
    let file = tb.state_dir().join("tmp").join(format!("{node}.pcap"));
    let cmd = tb.node_command(node, "tshark").expect("node command");
    PacketCapture::start(cmd, "eth0", "tcp", file)
}

fn tshark_count(file: &Path, filter: &str) -> usize {
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(file)
        // 15008 is not a port tshark knows as TLS.
        .args(["-d", "tcp.port==15008,tls", "-Y", filter])
        .output()
        .expect("tshark -r");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn traffic_between_nodes_is_mutual_tls_and_never_plaintext() {
    let Some(tb) = up("mtls_wire", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _echo = serve(&tb, "server", &["echo", "--listen", "0.0.0.0:7000"]);

    let cap = capture_between_nodes(&tb, "node-1");
    let marker = "NODEMESH-PLAINTEXT-MARKER-7f3a9c";
    let mut chat = Chat::open(&tb, "client", &server_addr(&tb));
    for i in 0..20 {
        assert!(
            chat.echo(&format!("{marker}-{i}")),
            "echo {i} through HBONE"
        );
    }
    drop(chat);
    let file = cap.finish();

    let pcap = std::fs::read(&file).expect("read pcap");
    assert!(
        !pcap.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the plaintext marker crossed the wire"
    );
    let to_15008 = tshark_count(&file, "tcp.dstport == 15008");
    let records = tshark_count(&file, "tls.app_data && tcp.port == 15008");
    let to_7000 = tshark_count(&file, "tcp.port == 7000");
    assert!(
        to_15008 > 0 && records > 0,
        "no TLS to 15008 on the wire ({to_15008} packets, {records} records)"
    );
    assert_eq!(
        to_7000, 0,
        "plaintext connection to the app's port on the wire"
    );

    let w1 = admin_json(&tb, "node-1", "/workloads");
    let client = workload(&w1, "client");
    assert_eq!(client["protocol"], "HBONE", "{client}");
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert!(
        client["outbound_hbone"].as_u64().unwrap_or(0) >= 1,
        "{client}"
    );
    let w2 = admin_json(&tb, "node-2", "/workloads");
    let server = workload(&w2, "server");
    assert!(
        server["inbound_connections"].as_u64().unwrap_or(0) >= 1,
        "{server}"
    );

    // Destination-reported metrics: mutual TLS with both principals.
    let (_, metrics) = tb
        .admin_get("node-2", "/stats/prometheus")
        .expect("metrics");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
        })
        .unwrap_or_else(|| panic!("no destination-reported connection in\n{metrics}"));
    assert!(
        line.contains("connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    assert!(
        line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
    assert!(
        line.contains("destination_principal=\"spiffe://cluster.local/ns/default/sa/server\""),
        "{line}"
    );
    assert!(line.contains("source_workload=\"client\""), "{line}");
}

#[test]
fn the_app_sees_the_client_pod_ip_through_hbone() {
    let Some(tb) = up("mtls_srcip", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let got = read_from(&tb, "client", &server_addr(&tb)).expect("read through HBONE");
    let client_ip = tb
        .pod_ip("default", "client")
        .expect("client ip")
        .to_string();
    assert!(
        got.starts_with(&format!("{client_ip}:")),
        "the app saw {got:?}, not {client_ip}"
    );
    let w1 = admin_json(&tb, "node-1", "/workloads");
    assert!(
        workload(&w1, "client")["outbound_hbone"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );
}

/// `openssl s_client` to `addr` from `pod`, optionally with a certificate; returns its
/// combined output.
fn s_client(tb: &Testbed, pod: &str, addr: &str, cert: Option<(&Path, &Path)>) -> String {
    let mut cmd = tb.pod_command(pod, "openssl").expect("pod command");
    cmd.args([
        "s_client", "-connect", addr, "-alpn", "h2", "-tls1_3", "-ign_eof",
    ]);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    // The HTTP/2 preface: a served client would get the server's SETTINGS back.
    cmd.stdin(Stdio::piped());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("openssl");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        std::thread::sleep(Duration::from_secs(1));
    }
    let until = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("openssl output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn inbound(tb: &Testbed, node: &str, name: &str) -> u64 {
    counter(tb, node, "inbound", name)
}

#[test]
fn port_15008_serves_only_peers_with_a_valid_mesh_certificate() {
    let Some(tb) = up("mtls_15008", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let hbone = format!("{}:15008", tb.pod_ip("default", "server").expect("ip"));
    let refused = |tb: &Testbed| inbound(tb, "node-2", "tls_refused");
    let accepted = |tb: &Testbed| inbound(tb, "node-2", "tls_accepted");

    // No client certificate.
    let before = refused(&tb);
    let out = s_client(&tb, "outsider", &hbone, None);
    wait_until(
        "refusal counted (no certificate)",
        Duration::from_secs(5),
        || refused(&tb) == before + 1,
    );
    assert!(out.contains("alert") || out.contains("error"), "{out}");

    // A certificate from another trust root.
    let foreign = tb.state_dir().join("tmp").join("foreign-ca");
    let (fc, fk) = issue(&foreign, "spiffe://cluster.local/ns/default/sa/client", &[]);
    s_client(&tb, "outsider", &hbone, Some((&fc, &fk)));
    wait_until(
        "refusal counted (foreign root)",
        Duration::from_secs(5),
        || refused(&tb) == before + 2,
    );

    // An expired certificate from the mesh CA itself.
    let (ec, ek) = tb
        .issue_cert("spiffe://cluster.local/ns/default/sa/client", None, true)
        .expect("expired cert");
    s_client(&tb, "outsider", &hbone, Some((&ec, &ek)));
    wait_until("refusal counted (expired)", Duration::from_secs(5), || {
        refused(&tb) == before + 3
    });

    // Control: a valid mesh certificate is accepted, so the refusals above are real.
    let ok_before = accepted(&tb);
    let (vc, vk) = tb
        .issue_cert("spiffe://cluster.local/ns/default/sa/client", None, false)
        .expect("valid cert");
    s_client(&tb, "outsider", &hbone, Some((&vc, &vk)));
    wait_until("acceptance counted", Duration::from_secs(5), || {
        accepted(&tb) == ok_before + 1
    });
    assert_eq!(refused(&tb), before + 3);
    let log = tb.agent_log("node-2");
    let outsider = tb.pod_ip("other", "outsider").expect("ip").to_string();
    assert!(
        log.contains("refused an mTLS connection") && log.contains(&outsider),
        "{}",
        mesh_testbed::tail(&log, 30)
    );
}

/// `mesh-agent ca issue` against its own state directory (a root is made there if absent).
fn issue(state: &Path, identity: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(state).expect("state dir");
    let cert = state.join("leaf.crt");
    let key = state.join("leaf.key");
    let out = Command::new(AGENT)
        .args(["ca", "issue", "--state-dir"])
        .arg(state)
        .args(["--identity", identity, "--out-cert"])
        .arg(&cert)
        .arg("--out-key")
        .arg(&key)
        .args(extra)
        .output()
        .expect("mesh-agent ca issue");
    assert!(
        out.status.success(),
        "ca issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[test]
fn the_source_refuses_a_destination_proving_another_identity() {
    let Some(mut tb) = up("mtls_wrongid", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    // The server's agent is gone; an impostor with a valid mesh certificate for another
    // service account answers on the server pod's 15008.
    tb.stop_agent("node-2").expect("stop agent");
    let (c, k) = tb
        .issue_cert("spiffe://cluster.local/ns/default/sa/impostor", None, false)
        .expect("impostor cert");
    let root = tb.ca_dir().join("root.crt");
    let mut impostor = tb
        .spawn_in_pod(
            "server",
            "openssl",
            [
                "s_server",
                "-www",
                "-accept",
                "15008",
                "-tls1_3",
                "-alpn",
                "h2",
                "-cert",
                c.to_str().expect("path"),
                "-key",
                k.to_str().expect("path"),
                "-CAfile",
                root.to_str().expect("path"),
                "-Verify",
                "1",
            ],
        )
        .expect("openssl s_server");
    impostor
        .wait_for_line("ACCEPT", Duration::from_secs(10))
        .expect("s_server listening");

    let err = read_from(&tb, "client", &server_addr(&tb)).expect_err("must not connect");
    let log = tb.agent_log("node-1");
    assert!(
        log.contains("expected spiffe://cluster.local/ns/default/sa/server")
            && log.contains("sa/impostor"),
        "{err:#}\n{}",
        mesh_testbed::tail(&log, 20)
    );
}

#[test]
fn tunnels_are_pooled_and_the_stream_limit_opens_another() {
    let Some(tb) = up_with_args(
        "mtls_pool",
        2,
        &[("app.yaml", &manifests())],
        &["--hbone-max-streams", "4"],
    ) else {
        return;
    };
    let _echo = serve(&tb, "server", &["echo", "--listen", "0.0.0.0:7000"]);
    let addr = server_addr(&tb);
    let mut chats: Vec<Chat> = (0..10).map(|_| Chat::open(&tb, "client", &addr)).collect();
    for (i, c) in chats.iter_mut().enumerate() {
        assert!(c.echo(&format!("hello {i}")));
    }
    // Ten connections at four streams per tunnel: three TLS connections, counted on the
    // wire side (sockets in the client pod's namespace) and by the agent.
    let mut ss = tb.pod_command("client", "ss").expect("ss");
    ss.args(["-Htn", "state", "established", "( dport = :15008 )"]);
    let out = run_bounded(ss, Duration::from_secs(5)).expect("ss");
    let tunnels = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(tunnels, 3, "{}", String::from_utf8_lossy(&out.stdout));
    let w = admin_json(&tb, "node-1", "/workloads");
    assert_eq!(workload(&w, "client")["hbone_connections_open"], 3);
    drop(chats);
}

#[test]
fn certificates_rotate_under_a_live_connection_and_survive_a_ca_outage() {
    let Some(mut tb) = up_with_args(
        "mtls_rotate",
        2,
        &[("app.yaml", &manifests())],
        &["--cert-ttl", "6s"],
    ) else {
        return;
    };
    let _echo = serve(&tb, "server", &["echo", "--listen", "0.0.0.0:7000"]);
    let serial = |tb: &Testbed| -> String {
        let certs = admin_json(tb, "node-1", "/certs");
        certs
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/client")
            })
            .and_then(|c| c["serial"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let first = serial(&tb);
    assert!(!first.is_empty());
    let mut chat = Chat::open(&tb, "client", &server_addr(&tb));
    // Two rotations (half-life 3 s) while the connection keeps talking.
    let until = Instant::now() + Duration::from_secs(8);
    let mut n = 0;
    while Instant::now() < until {
        assert!(
            chat.echo(&format!("still here {n}")),
            "connection broke during rotation"
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let second = serial(&tb);
    assert_ne!(first, second, "the certificate was not renewed");
    // New connections still work with the new certificate.
    let mut again = Chat::open(&tb, "client", &server_addr(&tb));
    assert!(again.echo("new connection"));

    // CA down: the valid certificate stays in use; renewal fails visibly, then resumes.
    tb.stop_ca().expect("stop ca");
    std::thread::sleep(Duration::from_secs(4));
    assert!(chat.echo("during the outage"));
    let mut during = Chat::open(&tb, "client", &server_addr(&tb));
    assert!(during.echo("new connection during the outage"));
    tb.start_ca().expect("start ca");
    let before = serial(&tb);
    wait_until(
        "renewal after the CA returns",
        Duration::from_secs(30),
        || serial(&tb) != before,
    );
    assert!(chat.echo("after the outage"));
}

/// A PeerAuthentication document.
fn peer_auth(ns: &str, name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{body}"
    )
}

/// The outsider (not meshed) connects to `port` of the server pod in plaintext.
fn outsider_reads(tb: &Testbed, port: u16) -> anyhow::Result<String> {
    let ip = tb.pod_ip("default", "server").expect("server ip");
    read_from(tb, "outsider", &format!("{ip}:{port}"))
}

#[test]
fn strict_refuses_plaintext_on_every_port_and_mesh_traffic_still_flows() {
    let yaml = docs(&[
        manifests(),
        peer_auth("default", "strict", "  mtls:\n    mode: STRICT\n"),
    ]);
    let Some(tb) = up("mtls_strict", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let _peer2 = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7001"]);
    let before = inbound(&tb, "node-2", "plaintext_refused");
    // The app's ports, the agent's inbound port, and a port nobody listens on.
    for port in [7000, 7001, 15006, 9] {
        let r = outsider_reads(&tb, port);
        assert!(r.is_err(), "plaintext to {port} got through: {r:?}");
    }
    assert_eq!(inbound(&tb, "node-2", "plaintext_refused"), before + 4);
    let outsider = tb.pod_ip("other", "outsider").expect("ip").to_string();
    let log = tb.agent_log("node-2");
    assert!(
        log.lines()
            .any(|l| l.contains("STRICT") && l.contains(&outsider)),
        "{}",
        mesh_testbed::tail(&log, 20)
    );
    // The kubelet probes from the node: the node's own address passes STRICT (as Istio
    // ambient exempts probes), counted.
    let mut cmd = tb
        .node_command("node-2", testapp().to_str().expect("utf-8"))
        .expect("node command");
    cmd.args(["read", "--connect", &server_addr(&tb), "--timeout", "5"]);
    let out = run_bounded(cmd, Duration::from_secs(15)).expect("read from node-2");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "a probe from node-2 was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(inbound(&tb, "node-2", "node_probes"), 1);
    assert_eq!(inbound(&tb, "node-2", "plaintext_refused"), before + 4);
    // A meshed client still gets through, over HBONE, with its own IP.
    let got = read_from(&tb, "client", &server_addr(&tb)).expect("mesh client");
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    assert!(got.starts_with(&format!("{client_ip}:")), "{got}");
    assert!(counter(&tb, "node-2", "ebpf", "inbound_captured") >= 4);
}

/// A CNI that does not name the pod's interface `eth0` (here `net0`): inbound capture goes on
/// the interface holding the pod's IP, so STRICT still holds and mesh traffic still flows.
#[test]
fn inbound_capture_follows_the_pods_interface_whatever_its_name() {
    let server = pod_sa("default", "server", "node-2", "server", 7000).replacen(
        "metadata:\n",
        "metadata:\n  annotations:\n    testbed.nodemesh.io/interface: net0\n",
        1,
    );
    let yaml = docs(&[
        namespace("default", true),
        namespace("other", false),
        pod_sa("default", "client", "node-1", "client", 9999),
        server,
        pod_sa("other", "outsider", "node-1", "default", 9999),
        peer_auth("default", "strict", "  mtls:\n    mode: STRICT\n"),
    ]);
    let Some(tb) = up("mtls_ifname", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let captured = counter(&tb, "node-2", "ebpf", "inbound_captured");
    let r = outsider_reads(&tb, 7000);
    assert!(r.is_err(), "plaintext got through: {r:?}");
    let got = read_from(&tb, "client", &server_addr(&tb)).expect("mesh client");
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    assert!(got.starts_with(&format!("{client_ip}:")), "{got}");
    // The outsider's SYN went to the agent (HBONE arrives on 15008, not through capture).
    assert!(counter(&tb, "node-2", "ebpf", "inbound_captured") > captured);
}

#[test]
fn permissive_accepts_plaintext_keeps_the_client_ip_and_records_it() {
    // No PeerAuthentication at all: PERMISSIVE.
    let Some(tb) = up("mtls_permissive", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let before = inbound(&tb, "node-2", "plaintext_accepted");
    let got = outsider_reads(&tb, 7000).expect("plaintext under PERMISSIVE");
    let outsider = tb.pod_ip("other", "outsider").expect("ip").to_string();
    assert!(
        got.starts_with(&format!("{outsider}:")),
        "the app saw {got:?}"
    );
    assert_eq!(inbound(&tb, "node-2", "plaintext_accepted"), before + 1);
    let (_, metrics) = tb
        .admin_get("node-2", "/stats/prometheus")
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("connection_security_policy=\"none\"")
                && l.contains("destination_workload=\"server\"")),
        "plaintext inbound not recorded as such:\n{metrics}"
    );
}

#[test]
fn a_port_level_override_opens_one_port_of_a_strict_workload() {
    let yaml = docs(&[
        manifests(),
        peer_auth(
            "default",
            "server-strict",
            "  selector:\n    matchLabels:\n      app: server\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    7001:\n      mode: PERMISSIVE\n",
        ),
    ]);
    let Some(tb) = up("mtls_portlevel", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let _peer2 = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7001"]);
    assert!(outsider_reads(&tb, 7000).is_err(), "7000 is STRICT");
    let got = outsider_reads(&tb, 7001).expect("7001 is PERMISSIVE");
    assert!(!got.is_empty());
}

#[test]
fn inbound_fails_closed_while_the_agent_is_away() {
    let Some(mut tb) = up("mtls_inbound_closed", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _peer = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    outsider_reads(&tb, 7000).expect("PERMISSIVE with the agent up");
    tb.stop_agent("node-2").expect("stop");
    // The pinned tc program stays: no listener on 15006, so the SYN is dropped rather than
    // delivered to the app around the agent.
    assert!(
        outsider_reads(&tb, 7000).is_err(),
        "reached the app without its agent"
    );
    tb.start_agent("node-2").expect("start");
    outsider_reads(&tb, 7000).expect("back once the agent is");
    assert!(counter(&tb, "node-2", "ebpf", "inbound_no_listener") >= 1);
}
