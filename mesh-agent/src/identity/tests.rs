use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;
use crate::ca::testing::{SERVER_NAME, TempDir, TestCa};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

#[test]
fn parse_and_format_round_trip() {
    let id = Identity::parse(WEB).unwrap();
    assert_eq!(id, Identity::new("cluster.local", "default", "web"));
    assert_eq!(id.to_string(), WEB);
    let id = Identity::parse("spiffe://my_td-1.example/ns/kube-system/sa/svc.acct-2").unwrap();
    assert_eq!(id.trust_domain, "my_td-1.example");
    assert_eq!(id.namespace, "kube-system");
    assert_eq!(id.service_account, "svc.acct-2");
    assert_eq!(
        Identity::parse(&id.to_string()).unwrap(),
        id,
        "Display output parses back"
    );
    assert_eq!(WEB.parse::<Identity>().unwrap().service_account, "web");
}

#[test]
fn parse_is_strict() {
    let bad = [
        "",
        "cluster.local/ns/default/sa/web",
        "http://cluster.local/ns/default/sa/web",
        "SPIFFE://cluster.local/ns/default/sa/web",
        "spiffe://",
        "spiffe:///ns/default/sa/web",
        "spiffe://Cluster.local/ns/default/sa/web",
        "spiffe://cluster.local:443/ns/default/sa/web",
        "spiffe://user@cluster.local/ns/default/sa/web",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns/default/sa",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns//sa/web",
        "spiffe://cluster.local/ns/default/sa/web/",
        "spiffe://cluster.local/ns/default/sa/web/x",
        "spiffe://cluster.local//ns/default/sa/web",
        "spiffe://cluster.local/ns/default/sa//web",
        "spiffe://cluster.local/sa/web/ns/default",
        "spiffe://cluster.local/NS/default/sa/web",
        "spiffe://cluster.local/ns/Default/sa/web",
        "spiffe://cluster.local/ns/-default/sa/web",
        "spiffe://cluster.local/ns/de.fault/sa/web",
        "spiffe://cluster.local/ns/default/sa/web-",
        "spiffe://cluster.local/ns/default/sa/we_b",
        "spiffe://cluster.local/ns/default/sa/web?x=1",
        "spiffe://cluster.local/ns/default/sa/web#f",
        "spiffe://cluster.local/ns/default/sa/w%65b",
    ];
    for s in bad {
        assert!(Identity::parse(s).is_err(), "{s:?} must not parse");
    }
    let long_ns = format!("spiffe://td/ns/{}/sa/web", "a".repeat(64));
    assert!(matches!(
        Identity::parse(&long_ns),
        Err(IdentityError::Namespace { .. })
    ));
    assert!(matches!(
        Identity::parse("spiffe://td/ns/a/sa/b/c"),
        Err(IdentityError::Path { .. })
    ));
    let err = Identity::parse("http://x").unwrap_err().to_string();
    assert!(err.contains("spiffe://"), "{err}");
}

#[test]
fn identities_sort_and_hash_by_fields() {
    let mut set = BTreeSet::new();
    set.insert(Identity::new("td", "b", "a"));
    set.insert(Identity::new("td", "a", "z"));
    set.insert(Identity::new("td", "a", "z"));
    let v: Vec<String> = set.iter().map(ToString::to_string).collect();
    assert_eq!(v, ["spiffe://td/ns/a/sa/z", "spiffe://td/ns/b/sa/a"]);
}

fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.self_signed(&key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(rcgen::string::Ia5String::try_from(s).unwrap())
}

#[test]
fn identity_from_certificate() {
    let one = cert_with(vec![
        SanType::DnsName("web.default.svc".try_into().unwrap()),
        uri(WEB),
        uri("https://example.com/"),
    ]);
    assert_eq!(Identity::from_cert_der(&one).unwrap().to_string(), WEB);

    let none = cert_with(vec![SanType::DnsName("web".try_into().unwrap())]);
    assert_eq!(
        Identity::from_cert_der(&none),
        Err(IdentityError::NoSpiffeId)
    );
    assert_eq!(
        Identity::from_cert_der(&cert_with(vec![])),
        Err(IdentityError::NoSpiffeId)
    );

    let two = cert_with(vec![
        uri(WEB),
        uri("spiffe://cluster.local/ns/default/sa/db"),
    ]);
    assert_eq!(
        Identity::from_cert_der(&two),
        Err(IdentityError::ManySpiffeIds { count: 2 })
    );

    let malformed = cert_with(vec![uri("spiffe://cluster.local/ns/default")]);
    assert!(matches!(
        Identity::from_cert_der(&malformed),
        Err(IdentityError::Path { .. })
    ));
    assert!(matches!(
        Identity::from_cert_der(b"not der"),
        Err(IdentityError::Certificate { .. })
    ));
}

// ---- CertManager against a real CA on 127.0.0.1 ----

fn manager(ca: &TestCa, node: &str, ttl: Duration) -> CertManager {
    CertManager::new(CertManagerConfig {
        ca_addr: ca.addr.into(),
        ca_server_name: SERVER_NAME.into(),
        ca_root: ca.root(),
        token_file: ca.token_file(node),
        trust_domain: "cluster.local".into(),
        ttl,
    })
    .unwrap()
}

/// Polls `f` (every 50 ms, yielding to the runtime) until it returns Some, or panics.
async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of(m: &CertManager, id: &str) -> CertView {
    m.view()
        .into_iter()
        .find(|v| v.identity == id)
        .expect("identity in view")
}

#[tokio::test(flavor = "current_thread")]
async fn manager_issues_validates_and_renews_at_half_life() {
    let ca = TestCa::start(&[("default", "web", "node-1")]).await;
    let m = manager(&ca, "node-1", Duration::from_secs(2));
    let id = Identity::parse(WEB).unwrap();
    let mut changed = m.changed();
    m.want(BTreeSet::from([id.clone()]));
    assert_eq!(state_of(&m, WEB).state, CertState::Pending);

    // `changed` fires on issuance.
    tokio::time::timeout(Duration::from_secs(10), changed.changed())
        .await
        .expect("changed within 10 s")
        .unwrap();
    let handle = m.handle(&id).expect("issued");
    let first = handle.current();
    assert_eq!(first.identity, id);
    let chain = &first.certified.cert;
    assert_eq!(chain.len(), 1, "leaf only: the root is not sent");
    assert_eq!(Identity::from_cert_der(&chain[0]).unwrap(), id);
    assert!(first.certified.keys_match().is_ok());
    assert!(first.not_after > SystemTime::now());
    let v = state_of(&m, WEB);
    assert_eq!(v.state, CertState::Valid);
    assert_eq!(v.serial.as_deref(), Some(first.serial.as_str()));
    assert!(v.not_after.as_deref().is_some_and(|s| s.ends_with('Z')));
    assert!(v.next_renewal.is_some() && v.last_error.is_none());

    // Renewal at half-life (~1 s for a 2 s certificate), seen through the same handle,
    // with a new key.
    let second = eventually("renewal", Duration::from_secs(8), || {
        let c = handle.current();
        (c.serial != first.serial).then_some(c)
    })
    .await;
    assert_ne!(
        second.certified.cert[0].as_ref(),
        first.certified.cert[0].as_ref()
    );
    let spki = |c: &WorkloadCert| {
        let (_, p) = x509_parser::parse_x509_certificate(&c.certified.cert[0]).unwrap();
        p.public_key().raw.to_vec()
    };
    assert_ne!(
        spki(&first),
        spki(&second),
        "a new key for each certificate"
    );

    // Dropping the identity drops the certificate.
    m.want(BTreeSet::new());
    assert!(m.handle(&id).is_none());
    assert!(m.view().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn manager_keeps_the_valid_certificate_while_the_ca_is_down() {
    let mut ca = TestCa::start(&[("default", "web", "node-1")]).await;
    let m = manager(&ca, "node-1", Duration::from_secs(4));
    let id = Identity::parse(WEB).unwrap();
    m.want(BTreeSet::from([id.clone()]));
    let handle = eventually("first certificate", Duration::from_secs(10), || {
        m.handle(&id)
    })
    .await;
    let serial = handle.current().serial.clone();

    ca.stop().await;
    // The renewal at half-life (~2 s) fails; the certificate stays in use.
    let v = eventually("a failed renewal", Duration::from_secs(8), || {
        let v = state_of(&m, WEB);
        v.last_error.is_some().then_some(v)
    })
    .await;
    let cur = handle.current();
    assert_eq!(cur.serial, serial, "still the same certificate");
    if SystemTime::now() < cur.not_after {
        assert_eq!(v.state, CertState::Renewing, "{v:?}");
    }
    let err = v.last_error.unwrap_or_default();
    assert!(
        err.contains(&ca.addr.to_string()),
        "error names the CA: {err}"
    );
    assert_eq!(v.serial.as_deref(), Some(serial.as_str()));

    // It expires: the state says so.
    eventually("expiry", Duration::from_secs(8), || {
        (state_of(&m, WEB).state == CertState::Expired).then_some(())
    })
    .await;

    // The CA comes back: a new certificate, state valid, error cleared.
    ca.restart().await;
    let v = eventually("recovery", Duration::from_secs(20), || {
        let v = state_of(&m, WEB);
        (v.state == CertState::Valid).then_some(v)
    })
    .await;
    assert!(v.last_error.is_none(), "{v:?}");
    assert_ne!(handle.current().serial, serial);
}

#[tokio::test(flavor = "current_thread")]
async fn manager_reports_refusals() {
    let ca = TestCa::start(&[("default", "web", "node-2")]).await;
    let m = manager(&ca, "node-1", Duration::from_secs(3600));
    let id = Identity::parse(WEB).unwrap();
    let mut changed = m.changed();
    m.want(BTreeSet::from([id.clone()]));
    tokio::time::timeout(Duration::from_secs(10), changed.changed())
        .await
        .expect("changed on failure")
        .unwrap();
    let v = state_of(&m, WEB);
    assert_eq!(v.state, CertState::Pending);
    let err = v.last_error.unwrap_or_default();
    assert!(err.contains("403") && err.contains("node-1"), "{err}");
    assert!(m.handle(&id).is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn manager_rejects_a_ca_it_does_not_trust() {
    let ca = TestCa::start(&[("default", "web", "node-1")]).await;
    let foreign = TempDir::new("foreign");
    crate::ca::authority::Authority::load_or_generate(foreign.path()).unwrap();
    let m = CertManager::new(CertManagerConfig {
        ca_root: foreign.path().join("root.crt"),
        ..config_of(&ca)
    })
    .unwrap();
    let id = Identity::parse(WEB).unwrap();
    m.want(BTreeSet::from([id.clone()]));
    let err = eventually("an error", Duration::from_secs(10), || {
        state_of(&m, WEB).last_error
    })
    .await;
    assert!(err.contains("TLS"), "{err}");
    assert!(m.handle(&id).is_none());
}

fn config_of(ca: &TestCa) -> CertManagerConfig {
    CertManagerConfig {
        ca_addr: ca.addr.into(),
        ca_server_name: SERVER_NAME.into(),
        ca_root: ca.root(),
        token_file: ca.token_file("node-1"),
        trust_domain: "cluster.local".into(),
        ttl: DEFAULT_TTL,
    }
}

#[test]
fn manager_config_errors_name_the_file() {
    let dir = TempDir::new("cfg");
    let missing = dir.path().join("nope.pem");
    let cfg = CertManagerConfig {
        ca_addr: "127.0.0.1:1".parse().unwrap(),
        ca_server_name: SERVER_NAME.into(),
        ca_root: missing.clone(),
        token_file: dir.path().join("token"),
        trust_domain: "cluster.local".into(),
        ttl: DEFAULT_TTL,
    };
    let err = CertManager::new(cfg.clone()).unwrap_err().to_string();
    assert!(err.contains("nope.pem"), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no pem here").unwrap();
    let err = CertManager::new(CertManagerConfig {
        ca_root: empty,
        ..cfg
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty.pem"), "{err}");
}

#[test]
fn ca_addresses_are_ip_or_host_and_port() {
    use super::CaAddr;
    let ip: CaAddr = "10.0.0.1:15012".parse().unwrap();
    assert_eq!(ip.to_string(), "10.0.0.1:15012");
    let v6: CaAddr = "[fd00::1]:15012".parse().unwrap();
    assert_eq!(v6.to_string(), "[fd00::1]:15012");
    let name: CaAddr = "nodemesh-ca.nodemesh-system.svc:15012".parse().unwrap();
    assert_eq!(name.to_string(), "nodemesh-ca.nodemesh-system.svc:15012");
    for bad in [
        "nodemesh-ca",
        "host:0",
        ":15012",
        "host:port",
        "a b:1",
        "host:70000",
    ] {
        assert!(bad.parse::<CaAddr>().is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_ca_name_resolves_at_connect_time() {
    let local: super::CaAddr = "localhost:15012".parse().unwrap();
    let addr = local.resolve().await.unwrap();
    assert!(addr.ip().is_loopback() && addr.port() == 15012, "{addr}");
}
