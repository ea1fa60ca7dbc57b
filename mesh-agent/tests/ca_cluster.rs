//! `mesh-agent ca --kubernetes`, the real binary, against the fake API server: pods come from
//! a list and watch of the cluster's pods, agents are authenticated by TokenReviews the test
//! answers, and with `--root-secret` the root comes from (or is generated into) a Secret and
//! is published to the agents' ConfigMap. Needs no privileges: the CA listens on 127.0.0.1
//! and is spoken to with curl, as an agent speaks to it (TLS 1.3, the CA's name,
//! `Authorization: Bearer`, a CSR).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mesh_testbed::fake_kube::FakeApiServer;
use mesh_testbed::fake_kube::auth::{authenticated, unauthenticated};
use serde_json::{Value, json};

const MESH_AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
const SERVER_NAME: &str = "nodemesh-ca.nodemesh-system.svc";
const AGENT_SA: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";
const NODE_KEY: &str = "authentication.kubernetes.io/node-name";
const POD_KEY: &str = "authentication.kubernetes.io/pod-name";
const UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
const AUDIENCE: &str = "nodemesh-ca";
const WAIT: Duration = Duration::from_secs(20);
const NS: &str = "nodemesh-system";
const ROOT_SECRET: &str = "nodemesh-ca-root";
const ROOT_CONFIGMAP: &str = "nodemesh-ca-root-cert";

/// A CA process with its own directory; both removed on drop.
struct Ca {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    /// The root curl trusts: the state directory's, or one the test wrote ([`Ca::trust`]).
    root: PathBuf,
}

impl Ca {
    /// With its root generated into a state directory.
    fn start(server: &FakeApiServer, tag: &str) -> Ca {
        Ca::spawn(server, tag, &["--state-dir"], true)
    }

    /// With its root in the Secret nodemesh-system/nodemesh-ca-root (`--root-secret`).
    fn start_with_secret(server: &FakeApiServer, tag: &str) -> Ca {
        let secret = format!("--root-secret={NS}/{ROOT_SECRET}");
        Ca::spawn(server, tag, &[secret.as_str()], false)
    }

    /// `root_args`, followed by the state directory when `state_dir`.
    fn spawn(server: &FakeApiServer, tag: &str, root_args: &[&str], state_dir: bool) -> Ca {
        let dir =
            std::env::temp_dir().join(format!("nodemesh-ca-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let log = std::fs::File::create(dir.join("ca.log")).expect("log");
        let mut cmd = Command::new(MESH_AGENT);
        cmd.args(["ca", "--kubernetes", "--listen", &addr.to_string()])
            .args(root_args);
        if state_dir {
            cmd.arg(dir.join("state"));
        }
        let child = cmd
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn mesh-agent ca");
        let root = dir.join("state/root.crt");
        Ca {
            child,
            dir,
            addr,
            root,
        }
    }

    /// Makes curl trust `pem` (what an agent reads from the ConfigMap).
    fn trust(&mut self, pem: &str) {
        self.root = self.dir.join("trusted-root.pem");
        std::fs::write(&self.root, pem).expect("write the trusted root");
    }

    /// The exit status, once the process ended (within [`WAIT`]).
    fn exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the CA did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.log")).unwrap_or_default()
    }

    /// curl to the CA as an agent does: returns (HTTP status, body).
    fn curl(&self, path: &str, token: Option<&str>, body: Option<&Value>) -> (u16, String) {
        let root = &self.root;
        let url = format!("https://{SERVER_NAME}:{}{path}", self.addr.port());
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "15",
            "--tlsv1.3",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(root)
        .args([
            "--resolve",
            &format!("{SERVER_NAME}:{}:127.0.0.1", self.addr.port()),
        ]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &b.to_string(),
            ]);
        }
        let out = cmd.arg(url).output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn ready(&self) -> u16 {
        self.curl("/healthz/ready", None, None).0
    }

    /// Asks for `spiffe://cluster.local/ns/<ns>/sa/<sa>` with `token`: (status, body).
    fn sign(&self, token: &str, ns: &str, sa: &str) -> (u16, String) {
        let body = json!({"csr": csr(ns, sa), "ttl_seconds": 3600});
        self.curl("/v1/sign", Some(token), Some(&body))
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- CA log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn csr(ns: &str, sa: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("ia5"))];
    params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .expect("csr")
}

fn pod(ns: &str, name: &str, sa: &str, node: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"serviceAccountName": sa, "nodeName": node,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A token of a random value (so it cannot appear in the log by accident).
fn token(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("tok-{tag}-{n:x}-{}", fastrand::u64(..))
}

fn agent_token(server: &FakeApiServer, tag: &str, node: &str) -> String {
    let t = token(tag);
    let extra = [
        (NODE_KEY, node),
        (POD_KEY, "nodemesh-agent-x"),
        (UID_KEY, "uid-x"),
    ];
    server.review_token(&t, authenticated(AGENT_SA, &extra, &[AUDIENCE]));
    t
}

fn assert_refused(reply: &(u16, String), status: u16, reason: &str) {
    assert_eq!(reply.0, status, "{reply:?}");
    let body: Value = serde_json::from_str(&reply.1).expect("JSON error body");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "expected {reason:?} in {error:?}");
}

fn assert_signed(reply: &(u16, String), ns: &str, sa: &str) {
    assert_eq!(reply.0, 200, "{reply:?}");
    let body: Value = serde_json::from_str(&reply.1).expect("JSON");
    let pem = body["chain"][0].as_str().expect("a chain");
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateDer<'static>| d.to_vec())
        .expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    let san = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("a SAN");
    let want = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let names = &san.value.general_names;
    let found = names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == want));
    assert!(found, "{names:?}");
}

/// Every request the CA sent is one `ca::API_ACCESS` (and so deploy/'s RBAC) grants.
fn assert_granted(server: &FakeApiServer) {
    let secret = format!("/api/v1/namespaces/{NS}/secrets");
    let configmap = format!("/api/v1/namespaces/{NS}/configmaps");
    let granted = [
        (
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews".to_owned(),
        ),
        ("GET", "/api/v1/pods".to_owned()),
        ("GET", format!("/api/v1/namespaces/{NS}/pods/*")),
        ("GET", format!("{secret}/{ROOT_SECRET}")),
        ("POST", secret),
        ("GET", format!("{configmap}/{ROOT_CONFIGMAP}")),
        ("PATCH", format!("{configmap}/{ROOT_CONFIGMAP}")),
        ("POST", configmap),
    ];
    for r in server.requests() {
        let (method, url) = r.split_once(' ').expect("METHOD URL");
        let path = url.split('?').next().unwrap_or(url);
        let ok = granted.iter().any(|(m, p)| {
            *m == method
                && match p.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix) && !path[prefix.len()..].contains('/'),
                    None => path == p,
                }
        });
        assert!(
            ok,
            "the CA sent {r:?}, which ca::API_ACCESS (and its RBAC) does not cover"
        );
    }
}

fn cluster() -> FakeApiServer {
    let server = FakeApiServer::start().expect("fake API server");
    for obj in [
        pod("shop", "web-1", "web", "node-1", "uid-web-1"),
        pod("shop", "db-1", "db", "node-2", "uid-db-1"),
        pod(
            "nodemesh-system",
            "nodemesh-agent-b",
            "nodemesh-agent",
            "node-2",
            "uid-b",
        ),
    ] {
        server.apply(obj).expect("apply");
    }
    server
}

#[test]
fn the_ca_signs_only_for_the_node_its_agents_token_is_bound_to() {
    let server = cluster();
    // Not ready, and signing nothing, until the pods are listed.
    server.hold("list:pods");
    let ca = Ca::start(&server, "sign");
    wait_until("the CA to serve", || ca.ready() != 0);
    assert_eq!(ca.ready(), 503);
    let node1 = agent_token(&server, "node1", "node-1");
    assert_refused(
        &ca.sign(&node1, "shop", "web"),
        503,
        "not yet listed the cluster's pods",
    );
    server.release("list:pods");
    wait_until("the CA to be ready", || ca.ready() == 200);

    // The right agent gets its node's identities, and no other node's.
    assert_signed(&ca.sign(&node1, "shop", "web"), "shop", "web");
    assert_refused(
        &ca.sign(&node1, "shop", "db"),
        403,
        "not allowed for node node-1",
    );
    let node2 = agent_token(&server, "node2", "node-2");
    assert_signed(&ca.sign(&node2, "shop", "db"), "shop", "db");
    assert_refused(
        &ca.sign(&node2, "shop", "web"),
        403,
        "not allowed for node node-2",
    );

    // Tokens that are not an agent's.
    let workload = token("workload");
    let extra = [(NODE_KEY, "node-1")];
    server.review_token(
        &workload,
        authenticated("system:serviceaccount:shop:web", &extra, &[AUDIENCE]),
    );
    assert_refused(
        &ca.sign(&workload, "shop", "web"),
        401,
        "not to the agent's service account",
    );
    let api_audience = token("api-audience");
    let extra = [(NODE_KEY, "node-1")];
    let kube = ["https://kubernetes.default.svc.cluster.local"];
    server.review_token(&api_audience, authenticated(AGENT_SA, &extra, &kube));
    assert_refused(
        &ca.sign(&api_audience, "shop", "web"),
        401,
        "not for audience \"nodemesh-ca\"",
    );
    let expired = token("expired");
    server.review_token(&expired, unauthenticated("token has expired"));
    assert_refused(
        &ca.sign(&expired, "shop", "web"),
        401,
        "not authenticated by the Kubernetes API server: token has expired",
    );
    assert_refused(
        &ca.sign(&token("unknown"), "shop", "web"),
        401,
        "invalid bearer token",
    );
    let unbound = token("unbound");
    server.review_token(&unbound, authenticated(AGENT_SA, &[], &[AUDIENCE]));
    assert_refused(
        &ca.sign(&unbound, "shop", "web"),
        401,
        "not a pod-bound projected service-account token",
    );
    let (status, _) = ca.curl("/v1/sign", None, Some(&json!({"csr": csr("shop", "web")})));
    assert_eq!(status, 401);

    // A token naming only its pod (Kubernetes before 1.30): the pod's node, if the uid holds.
    let pod_only = token("pod-only");
    let extra = [(POD_KEY, "nodemesh-agent-b"), (UID_KEY, "uid-b")];
    server.review_token(&pod_only, authenticated(AGENT_SA, &extra, &[AUDIENCE]));
    assert_signed(&ca.sign(&pod_only, "shop", "db"), "shop", "db");
    assert_refused(
        &ca.sign(&pod_only, "shop", "web"),
        403,
        "not allowed for node node-2",
    );
    let stale = token("stale");
    let extra = [(POD_KEY, "nodemesh-agent-b"), (UID_KEY, "uid-old")];
    server.review_token(&stale, authenticated(AGENT_SA, &extra, &[AUDIENCE]));
    assert_refused(
        &ca.sign(&stale, "shop", "db"),
        401,
        "differs from the token's \"uid-old\"",
    );
    let gone = token("gone");
    let extra = [(POD_KEY, "nodemesh-agent-gone"), (UID_KEY, "uid-g")];
    server.review_token(&gone, authenticated(AGENT_SA, &extra, &[AUDIENCE]));
    assert_refused(
        &ca.sign(&gone, "shop", "db"),
        401,
        "nodemesh-system/nodemesh-agent-gone: not found",
    );

    // A pod scheduled later becomes signable after the watch event; a finished one stops.
    assert_refused(
        &ca.sign(&node1, "shop", "cart"),
        403,
        "not allowed for node node-1",
    );
    server
        .apply(pod("shop", "cart-1", "cart", "node-1", "uid-cart-1"))
        .expect("apply");
    wait_until("cart to be signable on node-1", || {
        ca.sign(&node1, "shop", "cart").0 == 200
    });
    let mut done = pod("shop", "cart-1", "cart", "node-1", "uid-cart-1");
    done["status"]["phase"] = "Succeeded".into();
    server.apply(done).expect("apply");
    wait_until("finished cart to be refused", || {
        ca.sign(&node1, "shop", "cart").0 == 403
    });

    // The API server fails: refused, never signed (a token reviewed before stays cached).
    server.fail("tokenreviews", Some(500));
    let fresh = agent_token(&server, "fresh", "node-1");
    assert_refused(
        &ca.sign(&fresh, "shop", "web"),
        503,
        "cannot authenticate the caller now",
    );
    server.fail("pods", Some(500));
    // Reviewed a moment ago: answered from the cache, no API request.
    assert_signed(&ca.sign(&pod_only, "shop", "db"), "shop", "db");
    server.fail("tokenreviews", None);
    let fresh_pod_only = token("fresh-pod-only");
    let extra = [(POD_KEY, "nodemesh-agent-b"), (UID_KEY, "uid-b")];
    server.review_token(
        &fresh_pod_only,
        authenticated(AGENT_SA, &extra, &[AUDIENCE]),
    );
    assert_refused(
        &ca.sign(&fresh_pod_only, "shop", "db"),
        503,
        "reading the token's pod nodemesh-system/nodemesh-agent-b",
    );
    server.fail("pods", None);
    assert_signed(&ca.sign(&fresh, "shop", "web"), "shop", "web");

    // Every review asked for the CA's audience; every request is one API_ACCESS grants.
    let audiences = server.token_review_audiences();
    assert!(
        !audiences.is_empty() && audiences.iter().all(|a| *a == json!([AUDIENCE])),
        "{audiences:?}"
    );
    assert_granted(&server);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("status.phase!=Succeeded"))
    );

    // Every refusal is logged with its reason; no token is.
    let log = ca.log();
    for reason in [
        "not to the agent's service account",
        "not for audience",
        "token has expired",
        "cannot authenticate the caller now",
        "not allowed for node node-1",
    ] {
        assert!(
            log.contains(reason),
            "{reason:?} not in the CA's log:\n{log}"
        );
    }
    for t in [&node1, &node2, &workload, &expired, &pod_only, &fresh] {
        assert!(!log.contains(t.as_str()), "the CA logged a token");
    }
}

#[test]
fn local_mode_flags_and_cluster_mode_flags_do_not_mix() {
    let out = Command::new(MESH_AGENT)
        .args([
            "ca",
            "--kubernetes",
            "--manifests",
            "/nonexistent",
            "--state-dir",
            "/nonexistent",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(Path::new(MESH_AGENT).exists());
}

/// A self-signed root CA as cert-manager or openssl make one: (certificate PEM, PKCS#8 key PEM).
fn make_root(cn: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).expect("root");
    (cert.pem(), key.serialize_pem())
}

/// The Secret nodemesh-system/nodemesh-ca-root of this type and data.
fn root_secret(type_: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), BASE64.encode(v).into()))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
           "metadata": {"name": ROOT_SECRET, "namespace": NS}, "data": data})
}

fn get_secret(server: &FakeApiServer) -> Option<Value> {
    server.get("v1", "Secret", NS, ROOT_SECRET)
}

fn get_configmap(server: &FakeApiServer) -> Option<Value> {
    server.get("v1", "ConfigMap", NS, ROOT_CONFIGMAP)
}

/// A key of the root Secret's data, decoded.
fn secret_data(secret: &Value, key: &str) -> Vec<u8> {
    let b64 = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {secret}"));
    BASE64.decode(b64).expect("base64")
}

/// What the agents would read: the ConfigMap's root-cert.pem.
fn published_root(server: &FakeApiServer) -> Option<String> {
    get_configmap(server)?["data"]["root-cert.pem"]
        .as_str()
        .map(str::to_owned)
}

/// Every certificate of a PEM text, DER.
fn ders(pem: &[u8]) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.expect("PEM certificate").to_vec())
        .collect()
}

/// A signed reply whose leaf the root in `root_pem` signed.
fn assert_signed_by(reply: &(u16, String), ns: &str, sa: &str, root_pem: &[u8]) {
    assert_signed(reply, ns, sa);
    let body: Value = serde_json::from_str(&reply.1).expect("JSON");
    let chain: String = body["chain"]
        .as_array()
        .expect("a chain")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let chain = ders(chain.as_bytes());
    let roots = ders(root_pem);
    let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).expect("root");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
    assert_eq!(chain.len(), 1, "a root signs the leaves directly");
    assert_eq!(leaf.issuer(), root.subject());
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf is signed by the Secret's root");
}

/// The CA's writes (creates and patches) of the root objects, as `METHOD path`.
fn writes(requests: &[String]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.starts_with("POST /api/") || r.starts_with("PATCH "))
        .map(|r| r.split('?').next().unwrap_or(r).to_owned())
        .collect()
}

#[test]
fn without_a_root_secret_the_ca_creates_it_and_the_agents_config_map_and_reuses_them() {
    let server = cluster();
    let mut ca = Ca::start_with_secret(&server, "root-new");
    wait_until("the root ConfigMap", || published_root(&server).is_some());
    let secret = get_secret(&server).expect("the Secret created");
    assert_eq!(secret["type"], "kubernetes.io/tls", "{secret}");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "nodemesh"
    );
    let crt = secret_data(&secret, "tls.crt");
    let key = String::from_utf8(secret_data(&secret, "tls.key")).expect("PEM");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
    let cert = ders(&crt);
    let (_, root) = x509_parser::parse_x509_certificate(&cert[0]).expect("root");
    assert!(root.is_ca());
    assert!(root.subject().to_string().contains("nodemesh root CA"));
    // The agents' ConfigMap: the certificate, never the key.
    let published = published_root(&server).expect("published");
    assert_eq!(ders(published.as_bytes()), cert);
    assert!(!published.contains("PRIVATE KEY"));
    let cm = get_configmap(&server).expect("ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "nodemesh"
    );

    // The CA serves with that root (curl trusts the ConfigMap's) and signs under it.
    ca.trust(&published);
    wait_until("the CA to be ready", || ca.ready() == 200);
    let node1 = agent_token(&server, "node1", "node-1");
    assert_signed_by(&ca.sign(&node1, "shop", "web"), "shop", "web", &crt);
    assert_eq!(
        writes(&server.requests()),
        [
            format!("POST /api/v1/namespaces/{NS}/secrets"),
            format!("POST /api/v1/namespaces/{NS}/configmaps"),
        ]
    );
    assert_granted(&server);
    assert!(ca.log().contains("generated a new mesh root CA"));
    drop(ca);

    // Started again: the same root, read from the Secret; nothing is written.
    let seen = server.requests().len();
    let mut again = Ca::start_with_secret(&server, "root-again");
    again.trust(&published);
    wait_until("the restarted CA to be ready", || again.ready() == 200);
    assert_signed_by(&again.sign(&node1, "shop", "web"), "shop", "web", &crt);
    let after = get_secret(&server).expect("the Secret");
    assert_eq!(secret_data(&after, "tls.crt"), crt, "the same root");
    assert_eq!(
        after["metadata"]["resourceVersion"],
        secret["metadata"]["resourceVersion"]
    );
    assert_eq!(
        get_configmap(&server).expect("ConfigMap")["metadata"]["resourceVersion"],
        cm["metadata"]["resourceVersion"],
        "an equal ConfigMap is left alone"
    );
    let requests = server.requests();
    assert!(
        writes(&requests[seen..]).is_empty(),
        "{:?}",
        &requests[seen..]
    );
    assert!(again.log().contains("mesh root read from the Secret"));
    assert_granted(&server);
}

#[test]
fn a_root_secret_created_concurrently_by_another_replica_is_the_one_used() {
    let server = cluster();
    let (crt, key) = make_root("the other replica's root");
    // Absent when the CA reads it; there by the time it creates it (409 AlreadyExists).
    let theirs = root_secret("kubernetes.io/tls", &[("tls.crt", &crt), ("tls.key", &key)]);
    server.race_create(theirs).expect("race");
    let mut ca = Ca::start_with_secret(&server, "root-race");
    wait_until("the root ConfigMap", || published_root(&server).is_some());
    let published = published_root(&server).expect("published");
    assert_eq!(ders(published.as_bytes()), ders(crt.as_bytes()));
    // Theirs, untouched.
    let secret = get_secret(&server).expect("the Secret");
    assert_eq!(secret_data(&secret, "tls.crt"), crt.as_bytes());
    assert_eq!(secret_data(&secret, "tls.key"), key.as_bytes());
    let secret_requests: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.contains("/secrets"))
        .map(|r| r.split('?').next().unwrap_or(r).to_owned())
        .collect();
    let path = format!("/api/v1/namespaces/{NS}/secrets");
    assert_eq!(
        secret_requests,
        [
            format!("GET {path}/{ROOT_SECRET}"),
            format!("POST {path}"),
            format!("GET {path}/{ROOT_SECRET}"),
        ]
    );
    ca.trust(&published);
    wait_until("the CA to be ready", || ca.ready() == 200);
    let node1 = agent_token(&server, "node1", "node-1");
    assert_signed_by(
        &ca.sign(&node1, "shop", "web"),
        "shop",
        "web",
        crt.as_bytes(),
    );
    assert!(ca.log().contains("created concurrently"), "{}", ca.log());
    assert_granted(&server);
}

#[test]
fn a_root_secret_the_ca_cannot_use_stops_it_and_nothing_is_written() {
    let (crt, key) = make_root("root");
    let (_, other_key) = make_root("other");
    let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBVd\n-----END EC PRIVATE KEY-----\n";
    let tls = "kubernetes.io/tls";
    let cases = [
        (
            "opaque",
            root_secret("Opaque", &[("tls.crt", &crt), ("tls.key", &key)]),
            "secret nodemesh-system/nodemesh-ca-root: type \"Opaque\", not kubernetes.io/tls",
        ),
        (
            "sec1",
            root_secret(tls, &[("tls.crt", &crt), ("tls.key", sec1)]),
            "secret nodemesh-system/nodemesh-ca-root: tls.key: not PKCS#8",
        ),
        (
            "other-key",
            root_secret(tls, &[("tls.crt", &crt), ("tls.key", &other_key)]),
            "secret nodemesh-system/nodemesh-ca-root: tls.key: the key does not match the \
             certificate in secret nodemesh-system/nodemesh-ca-root: tls.crt",
        ),
        (
            "empty-key",
            root_secret(tls, &[("tls.crt", &crt), ("tls.key", "")]),
            "secret nodemesh-system/nodemesh-ca-root: tls.key: missing",
        ),
        (
            "bad-cert",
            root_secret(tls, &[("tls.crt", "not a certificate"), ("tls.key", &key)]),
            "secret nodemesh-system/nodemesh-ca-root: tls.crt: no PEM CERTIFICATE",
        ),
    ];
    for (tag, secret, want) in cases {
        let server = cluster();
        let rv = server.apply(secret).expect("apply");
        let mut ca = Ca::start_with_secret(&server, &format!("root-bad-{tag}"));
        let status = ca.exit();
        let log = ca.log();
        assert!(!status.success(), "{tag}: {status}\n{log}");
        assert!(log.contains(want), "{tag}: expected {want:?} in:\n{log}");
        let requests = server.requests();
        assert!(writes(&requests).is_empty(), "{tag}: {requests:?}");
        assert!(get_configmap(&server).is_none(), "{tag}");
        let kept = get_secret(&server).expect("the Secret");
        assert_eq!(
            kept["metadata"]["resourceVersion"],
            rv.to_string(),
            "{tag}: the Secret was changed"
        );
    }
}

#[test]
fn a_config_map_with_a_stale_root_is_patched_to_the_secrets() {
    let server = cluster();
    let (crt, key) = make_root("current root");
    let (stale, _) = make_root("stale root");
    server
        .apply(root_secret(
            "kubernetes.io/tls",
            &[("tls.crt", &crt), ("tls.key", &key)],
        ))
        .expect("apply");
    server
        .apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CONFIGMAP, "namespace": NS},
            "data": {"root-cert.pem": stale, "note": "kept"}}))
        .expect("apply");
    let mut ca = Ca::start_with_secret(&server, "root-stale");
    wait_until("the ConfigMap to hold the Secret's root", || {
        published_root(&server).is_some_and(|p| ders(p.as_bytes()) == ders(crt.as_bytes()))
    });
    let cm = get_configmap(&server).expect("ConfigMap");
    assert_eq!(
        cm["data"]["note"], "kept",
        "other keys are left as they are"
    );
    assert_eq!(
        writes(&server.requests()),
        [format!(
            "PATCH /api/v1/namespaces/{NS}/configmaps/{ROOT_CONFIGMAP}"
        )]
    );
    ca.trust(&crt);
    wait_until("the CA to be ready", || ca.ready() == 200);
    let node1 = agent_token(&server, "node1", "node-1");
    assert_signed_by(
        &ca.sign(&node1, "shop", "web"),
        "shop",
        "web",
        crt.as_bytes(),
    );
    assert_granted(&server);
}
