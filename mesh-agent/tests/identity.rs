//! The mesh CA on the testbed (root): real TLS with curl from a node, CSRs made by openssl,
//! certificates inspected by openssl. No agents needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use mesh_testbed::{Testbed, TestbedConfig};

const SERVER_NAME: &str = "nodemesh-ca.nodemesh-system.svc";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

fn pod_sa(ns: &str, name: &str, node: &str, sa: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {name}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: app\n"
    )
}

fn ca_testbed(test: &str) -> Option<Testbed> {
    if !mesh_testbed::require_root(test) {
        return None;
    }
    let yaml = docs(&[
        namespace("default", true),
        pod_sa("default", "web", "node-1", "web"),
        pod_sa("default", "db", "node-2", "db"),
    ]);
    let cfg = TestbedConfig {
        agent_bin: Some(AGENT.into()),
        start_agents: false,
        ca: true,
        ..TestbedConfig::new(2)
    }
    .manifest("app.yaml", yaml)
    .name_hint(test);
    Some(Testbed::up(cfg).expect("testbed up"))
}

fn run_ok(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A P-256 key and CSR with one URI SAN, made by openssl; returns the CSR's PEM.
fn openssl_csr(dir: &Path, name: &str, san: &str) -> String {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/O=x",
        "-addext",
        &format!("subjectAltName={san}"),
        "-keyout",
    ])
    .arg(&key)
    .arg("-out")
    .arg(&csr);
    run_ok(cmd);
    std::fs::read_to_string(&csr).expect("csr")
}

/// POST /v1/sign with curl from `node`'s network namespace over real TLS (verifying the CA
/// with the testbed root and the CA's DNS name). Returns (HTTP status, JSON body).
fn post_sign(tb: &Testbed, node: &str, token: &str, csr: &str) -> (u16, serde_json::Value) {
    let dir = work_dir(tb);
    let body = dir.join("body.json");
    let resp = dir.join("resp.json");
    let _ = std::fs::remove_file(&resp);
    std::fs::write(
        &body,
        serde_json::json!({ "csr": csr, "ttl_seconds": 3600 }).to_string(),
    )
    .expect("body");
    let addr = tb.ca_addr();
    let mut cmd = tb.node_command(node, "curl").expect("node command");
    cmd.args(["-sS", "-m", "10", "--cacert"])
        .arg(tb.ca_root())
        .arg("--resolve")
        .arg(format!("{SERVER_NAME}:{}:{}", addr.port(), addr.ip()))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/json"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg("-o")
        .arg(&resp)
        .args(["-w", "%{http_code}"])
        .arg(format!("https://{SERVER_NAME}:{}/v1/sign", addr.port()));
    let out = run_bounded(cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        out.status.success(),
        "curl failed: {}\nCA log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        tb.ca_log()
    );
    let status: u16 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("status code");
    let text = std::fs::read_to_string(&resp).expect("response");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn work_dir(tb: &Testbed) -> PathBuf {
    let d = tb.state_dir().join("tmp").join("identity");
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

fn token(tb: &Testbed, node: &str) -> String {
    std::fs::read_to_string(tb.node_token_path(node).expect("token path"))
        .expect("token")
        .trim()
        .to_string()
}

fn openssl_san(cert: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(cert);
    run_ok(cmd)
}

fn openssl_verify(tb: &Testbed, cert: &Path) -> std::process::Output {
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-CAfile"]).arg(tb.ca_root()).arg(cert);
    run_bounded(cmd, Duration::from_secs(10)).expect("openssl verify")
}

#[test]
fn ca_signs_only_identities_with_a_pod_on_the_callers_node() {
    let Some(tb) = ca_testbed("ca_node_policy") else {
        return;
    };
    let dir = work_dir(&tb);
    let web_csr = openssl_csr(&dir, "web", &format!("URI:{WEB}"));
    let db_csr = openssl_csr(&dir, "db", &format!("URI:{DB}"));
    let t1 = token(&tb, "node-1");

    // db's only pod is on node-2: node-1 may not have it.
    let (status, body) = post_sign(&tb, "node-1", &t1, &db_csr);
    assert_eq!(status, 403, "{body}");
    let reason = body["error"].as_str().expect("error");
    assert!(reason.contains(DB) && reason.contains("node-1"), "{reason}");
    assert!(
        tb.ca_log().contains("certificate request refused"),
        "the refusal is logged:\n{}",
        tb.ca_log()
    );

    // web has a pod on node-1.
    let (status, body) = post_sign(&tb, "node-1", &t1, &web_csr);
    assert_eq!(status, 200, "{body}");
    let chain = body["chain"].as_array().expect("chain");
    assert_eq!(chain.len(), 1, "leaf only under a self-made root");
    let leaf = dir.join("web-leaf.pem");
    std::fs::write(&leaf, chain[0].as_str().expect("pem")).expect("leaf");
    let san = openssl_san(&leaf);
    assert!(san.contains(&format!("URI:{WEB}")), "{san}");
    assert!(!san.contains("DNS:"), "{san}");
    let v = openssl_verify(&tb, &leaf);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // node-2 may have db.
    let (status, body) = post_sign(&tb, "node-2", &token(&tb, "node-2"), &db_csr);
    assert_eq!(status, 200, "{body}");

    // A wrong token: 401.
    let (status, body) = post_sign(&tb, "node-1", "not-a-token", &web_csr);
    assert_eq!(status, 401, "{body}");

    // Two SANs or a foreign trust domain: 400.
    let two = openssl_csr(&dir, "two", &format!("URI:{WEB},DNS:web.default.svc"));
    let (status, body) = post_sign(&tb, "node-1", &t1, &two);
    assert_eq!(status, 400, "{body}");
    let foreign = openssl_csr(
        &dir,
        "foreign",
        "URI:spiffe://evil.example/ns/default/sa/web",
    );
    let (status, body) = post_sign(&tb, "node-1", &t1, &foreign);
    assert_eq!(status, 400, "{body}");
}

#[test]
fn ca_restarts_with_the_same_root_and_issues_offline() {
    let Some(mut tb) = ca_testbed("ca_restart_offline") else {
        return;
    };
    let root = std::fs::read_to_string(tb.ca_root()).expect("root");
    tb.stop_ca().expect("stop");
    assert!(!tb.ca_running());
    tb.start_ca().expect("start again");
    assert_eq!(
        std::fs::read_to_string(tb.ca_root()).expect("root"),
        root,
        "the root is generated once and reused"
    );
    let dir = work_dir(&tb);
    let csr = openssl_csr(&dir, "web", &format!("URI:{WEB}"));
    let (status, body) = post_sign(&tb, "node-1", &token(&tb, "node-1"), &csr);
    assert_eq!(status, 200, "{body}");

    // Offline issuing with the same root.
    let (cert, key) = tb.issue_cert(DB, Some("10m"), false).expect("issue");
    assert!(key.exists());
    assert!(openssl_san(&cert).contains(&format!("URI:{DB}")));
    assert!(openssl_verify(&tb, &cert).status.success());
    let (expired, _) = tb.issue_cert(DB, None, true).expect("issue expired");
    let v = openssl_verify(&tb, &expired);
    assert!(!v.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(text.contains("expired"), "{text}");
}
