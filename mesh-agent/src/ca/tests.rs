use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::authority::{Authority, ROOT_CERT, ROOT_KEY, TLS_CERT, TLS_KEY};
use super::policy::{self, Refusal};
use super::testing::{TempDir, service, snapshot};
use crate::identity::{Identity, pki};

const PEER: &str = "127.0.0.1:40000";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn csr(sans: &[SanType]) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans.to_vec();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(rcgen::string::Ia5String::try_from(s).unwrap())
}

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

async fn sign(
    svc: &super::server::CaService,
    token: &str,
    csr: &str,
    ttl: u64,
) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "csr": csr, "ttl_seconds": ttl }).to_string();
    let peer: SocketAddr = PEER.parse().unwrap();
    let auth = format!("Bearer {token}");
    let resp = svc.sign(peer, Some(&auth), body.as_bytes()).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn leaf_of(reply: &serde_json::Value) -> Vec<u8> {
    let pem = reply["chain"][0].as_str().unwrap();
    pki::certs_from_pem(pem.as_bytes()).unwrap()[0].to_vec()
}

#[test]
fn csr_with_two_sans_is_refused() {
    let pem = csr(&[
        uri(WEB),
        SanType::DnsName("web.default".try_into().unwrap()),
    ]);
    let err = policy::parse_csr(&pem, "cluster.local").unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(err.to_string().contains("2 subjectAltNames"), "{err}");
    let pem = csr(&[uri(WEB), uri("spiffe://cluster.local/ns/default/sa/db")]);
    assert!(policy::parse_csr(&pem, "cluster.local").is_err());
}

#[test]
fn csr_without_spiffe_uri_is_refused() {
    let err = policy::parse_csr(&csr(&[]), "cluster.local").unwrap_err();
    assert!(err.to_string().contains("no subjectAltName"), "{err}");
    let dns = csr(&[SanType::DnsName("web".try_into().unwrap())]);
    assert!(policy::parse_csr(&dns, "cluster.local").is_err());
    let bad = csr(&[uri("spiffe://cluster.local/ns/default/sa/web/extra")]);
    assert!(policy::parse_csr(&bad, "cluster.local").is_err());
    assert!(policy::parse_csr("not a csr", "cluster.local").is_err());
}

#[test]
fn csr_with_a_broken_signature_is_refused() {
    let pem = csr(&[uri(WEB)]);
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
        .unwrap();
    let mut tampered = der.clone();
    // Flip a bit in the last byte (inside the signature).
    *tampered.last_mut().unwrap() ^= 1;
    let pem = pki::pem_block("CERTIFICATE REQUEST", &tampered);
    let err = policy::parse_csr(&pem, "cluster.local").unwrap_err();
    assert!(err.to_string().contains("signature"), "{err}");
}

#[test]
fn wrong_trust_domain_is_refused() {
    let pem = csr(&[uri("spiffe://other.domain/ns/default/sa/web")]);
    let err = policy::parse_csr(&pem, "cluster.local").unwrap_err();
    assert!(matches!(err, Refusal::ForeignTrustDomain { .. }), "{err}");
}

#[test]
fn identity_needs_a_pod_on_the_node() {
    let snap = snapshot(&[("default", "web", "node-2"), ("default", "db", "node-1")]);
    let web = Identity::parse(WEB).unwrap();
    let err = policy::authorize(&snap, "node-1", &web).unwrap_err();
    assert_eq!(err.status(), 403);
    let msg = err.to_string();
    assert!(msg.contains(WEB) && msg.contains("node-1"), "{msg}");
    policy::authorize(&snap, "node-2", &web).unwrap();
    // Same service account name in another namespace does not count.
    let other = Identity::parse("spiffe://cluster.local/ns/other/sa/web").unwrap();
    assert!(policy::authorize(&snap, "node-2", &other).is_err());
}

#[tokio::test(flavor = "current_thread")]
async fn signing_enforces_credentials_and_placement() {
    let dir = TempDir::new("ca-sign");
    let svc = service(dir.path(), &[("default", "web", "node-1")], DAY);
    let pem = csr(&[uri(WEB)]);

    let (status, body) = sign(&svc, "token-node-1", &pem, 3600).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["chain"].as_array().unwrap().len(), 1);

    let (status, body) = sign(&svc, "token-node-2", &pem, 3600).await;
    assert_eq!(status, 403, "{body}");
    let reason = body["error"].as_str().unwrap();
    assert!(
        reason.contains(WEB) && reason.contains("node-2"),
        "{reason}"
    );

    let (status, body) = sign(&svc, "wrong", &pem, 3600).await;
    assert_eq!(status, 401, "{body}");

    let peer: SocketAddr = PEER.parse().unwrap();
    let resp = svc.sign(peer, None, b"{}").await;
    assert_eq!(resp.status().as_u16(), 401);

    let (status, _) = sign(&svc, "token-node-1", "garbage", 3600).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "current_thread")]
async fn issued_leaf_is_a_clamped_spiffe_svid() {
    let dir = TempDir::new("ca-leaf");
    let max = Duration::from_secs(3600);
    let svc = service(dir.path(), &[("default", "web", "node-1")], max);
    // The CSR asks for extra things (a DNS SAN is refused, so: a subject); all ignored.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(WEB)];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let before = SystemTime::now();
    let (status, body) = sign(&svc, "token-node-1", &pem, 10 * 24 * 3600).await;
    assert_eq!(status, 200, "{body}");
    let der = leaf_of(&body);
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();

    assert_eq!(Identity::from_cert_der(&der).unwrap().to_string(), WEB);
    assert!(
        leaf.subject().iter_attributes().next().is_none(),
        "empty subject"
    );
    let mut sans = 0;
    let mut saw_eku = false;
    let mut saw_bc = false;
    let mut saw_ku = false;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert!(ext.critical, "SAN is critical with an empty subject");
                for n in &san.general_names {
                    sans += 1;
                    assert!(matches!(n, GeneralName::URI(u) if *u == WEB), "{n:?}");
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                saw_eku = true;
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
            }
            ParsedExtension::BasicConstraints(bc) => {
                saw_bc = true;
                assert!(!bc.ca);
            }
            ParsedExtension::KeyUsage(ku) => {
                saw_ku = true;
                assert!(ku.digital_signature() && ku.key_encipherment());
                assert!(!ku.key_cert_sign() && !ku.crl_sign());
            }
            _ => {}
        }
    }
    assert_eq!(sans, 1);
    assert!(saw_eku && saw_bc && saw_ku);
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let (nb, na) = pki::validity(&leaf);
    let life = na.duration_since(before).unwrap();
    assert!(
        life <= max + Duration::from_secs(1),
        "ttl clamped: {life:?}"
    );
    assert!(life >= max - Duration::from_secs(5), "{life:?}");
    assert!(nb < before - Duration::from_secs(30), "back-dated");

    // The chain verifies to the root.
    let roots = std::sync::Arc::new(pki::root_store(svc.authority.roots()).unwrap());
    let chain = vec![rustls_pki_types::CertificateDer::from(der)];
    pki::verify_chain(&roots, &pki::provider(), &chain, SystemTime::now()).unwrap();
}

#[test]
fn ttl_is_clamped_to_the_maximum() {
    let dir = TempDir::new("ca-ttl");
    let svc = service(dir.path(), &[], Duration::from_secs(600));
    assert_eq!(svc.clamp_ttl(60), Duration::from_secs(60));
    assert_eq!(svc.clamp_ttl(6000), Duration::from_secs(600));
    assert_eq!(svc.clamp_ttl(0), Duration::from_secs(600));
}

#[test]
fn state_dir_root_is_generated_once_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("ca-state");
    let a = Authority::load_or_generate(dir.path()).unwrap();
    let mode = std::fs::metadata(dir.path().join(ROOT_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let b = Authority::load_or_generate(dir.path()).unwrap();
    assert_eq!(a.roots(), b.roots());
    let (_, root) = x509_parser::parse_x509_certificate(&a.roots()[0]).unwrap();
    assert!(root.is_ca());
    assert!(root.subject().to_string().contains("nodemesh root CA"));
    let (_, na) = pki::validity(&root);
    assert!(na > SystemTime::now() + Duration::from_secs(9 * 365 * 24 * 3600));

    // Half a state is an error naming what is missing.
    std::fs::remove_file(dir.path().join(ROOT_CERT)).unwrap();
    let err = Authority::load_or_generate(dir.path()).unwrap_err();
    assert!(err.to_string().contains(ROOT_CERT), "{err}");
}

#[test]
fn root_dir_in_tls_secret_layout_is_loaded() {
    let state = TempDir::new("ca-gen");
    let a = Authority::load_or_generate(state.path()).unwrap();
    let secret = TempDir::new("ca-secret");
    std::fs::copy(state.path().join(ROOT_CERT), secret.path().join(TLS_CERT)).unwrap();
    std::fs::copy(state.path().join(ROOT_KEY), secret.path().join(TLS_KEY)).unwrap();
    let b = Authority::load_root_dir(secret.path()).unwrap();
    assert_eq!(a.roots(), b.roots());

    // A missing key names the file.
    std::fs::remove_file(secret.path().join(TLS_KEY)).unwrap();
    let err = Authority::load_root_dir(secret.path()).unwrap_err();
    assert!(err.to_string().contains(TLS_KEY), "{err}");
}

#[test]
fn offline_issue_can_make_expired_certificates() {
    let dir = TempDir::new("ca-offline");
    let a = Authority::load_or_generate(dir.path()).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let id = Identity::parse(WEB).unwrap();
    let now = SystemTime::now();
    let chain = a
        .issue_between(
            &id,
            &key,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    let roots = std::sync::Arc::new(pki::root_store(a.roots()).unwrap());
    let err = pki::verify_chain(&roots, &pki::provider(), &chain, now).unwrap_err();
    assert!(err.contains("xpired"), "{err}");
}

/// `mesh-agent ca ARGS` as the CLI parses it: the serve arguments, or clap's error.
fn parse_serve(args: &[&str]) -> Result<super::ServeArgs, String> {
    use clap::Parser as _;
    let argv = ["mesh-agent", "ca"].iter().chain(args);
    match crate::Cli::try_parse_from(argv) {
        Ok(crate::Cli {
            command: crate::Command::Ca(ca),
            ..
        }) => Ok(ca.serve),
        Ok(_) => Err("not ca".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn root_secret_is_a_cluster_mode_root_source_of_its_own() {
    let a = parse_serve(&[
        "--kubernetes",
        "--root-secret",
        "nodemesh-system/nodemesh-ca-root",
    ])
    .unwrap();
    let secret = a.root_secret.unwrap();
    assert_eq!(
        (secret.namespace.as_str(), secret.name.as_str()),
        ("nodemesh-system", "nodemesh-ca-root")
    );
    assert_eq!(a.root_configmap, "nodemesh-ca-root-cert");
    let a = parse_serve(&[
        "--kubernetes",
        "--root-secret=ns/s",
        "--root-configmap=my-roots",
    ])
    .unwrap();
    assert_eq!(a.root_configmap, "my-roots");

    let e = parse_serve(&["--kubernetes", "--root-secret=ns/s", "--state-dir=/tmp/x"]).unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
    let e = parse_serve(&["--kubernetes", "--root-secret=ns/s", "--root-dir=/tmp/x"]).unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
    let e = parse_serve(&[
        "--manifests=/m",
        "--node-credentials=/c",
        "--root-secret=ns/s",
    ])
    .unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
    let e = parse_serve(&["--kubernetes", "--root-secret=nodemesh-ca-root"]).unwrap_err();
    assert!(e.contains("not NAMESPACE/NAME"), "{e}");
    // The ConfigMap is the Secret's companion; its default asks for nothing.
    let e = parse_serve(&["--kubernetes", "--state-dir=/s", "--root-configmap=x"]).unwrap_err();
    assert!(e.contains("cannot be used with"), "{e}");
    assert!(parse_serve(&["--kubernetes", "--state-dir=/s"]).is_ok());
}

#[test]
fn keys_that_are_not_pkcs8_are_named_as_such() {
    let state = TempDir::new("ca-gen");
    Authority::load_or_generate(state.path()).unwrap();
    let secret = TempDir::new("ca-secret");
    std::fs::copy(state.path().join(ROOT_CERT), secret.path().join(TLS_CERT)).unwrap();
    std::fs::write(
        secret.path().join(TLS_KEY),
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Authority::load_root_dir(secret.path())
        .unwrap_err()
        .to_string();
    let want = format!("{}: not PKCS#8", secret.path().join(TLS_KEY).display());
    assert!(err.starts_with(&want), "{err}");
}
