//! Gateways and the credential Secrets they name, through the manifests loader (local mode):
//! Istio's validation, which Secrets are read (only those named, in the gateway workload's
//! namespace) and what they are found to hold.
use super::super::gateway::testing::cert;
use super::super::gateway::{CredentialState, TlsMode};
use super::super::model::{ObjectRef, Snapshot};
use super::{ConfigError, LoadedManifests, Sources, load_sources};

/// The reference guide's Gateway, verbatim.
const GUIDE_GATEWAY: &str = r#"# Istio Gateway - entry point for external traffic
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway  # Use Istio's default ingress gateway
  servers:
    - port:
        number: 80
        name: http
        protocol: HTTP
      hosts:
        - "bookinfo.example.com"
    - port:
        number: 443
        name: https
        protocol: HTTPS
      tls:
        mode: SIMPLE
        credentialName: bookinfo-tls-cert  # Kubernetes TLS secret
      hosts:
        - "bookinfo.example.com"
"#;

/// The gateway workload: a pod labelled as the guide's selector wants, in `ns`.
fn ingress_pod(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ingress, namespace: {ns}, \
         labels: {{istio: ingressgateway}}}}\nspec: {{containers: [{{name: c}}]}}\n"
    )
}

/// A Secret document as a user writes it (`stringData`), with these keys.
fn secret_yaml(ns: &str, name: &str, entries: &[(&str, &str)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         type: kubernetes.io/tls\nstringData:\n"
    );
    for (k, v) in entries {
        text.push_str(&format!("  {k}: |\n"));
        for line in v.lines() {
            text.push_str(&format!("    {line}\n"));
        }
    }
    text
}

fn load(docs: &[String]) -> Result<LoadedManifests, ConfigError> {
    load_sources(&Sources::from_texts([("a.yaml", docs.join("---\n"))]))
}

fn snap(docs: &[String]) -> Snapshot {
    load(docs).expect("loads").snapshot
}

fn id(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn credential(s: &Snapshot) -> Option<&CredentialState> {
    s.gateway_credentials
        .get(&id("istio-system", "bookinfo-tls-cert"))
}

#[test]
fn the_guides_gateway_loads_and_its_credential_is_read_where_its_workload_runs() {
    let (crt, key) = cert("bookinfo.example.com", false);
    let (other_crt, other_key) = cert("other.example.com", false);
    let s = snap(&[
        GUIDE_GATEWAY.into(),
        ingress_pod("istio-system"),
        secret_yaml(
            "istio-system",
            "bookinfo-tls-cert",
            &[("tls.crt", &crt), ("tls.key", &key)],
        ),
        // Not named by any Gateway: never kept.
        secret_yaml(
            "istio-system",
            "unrelated",
            &[("tls.crt", &other_crt), ("tls.key", &other_key)],
        ),
        // Named, but not where the gateway workload runs.
        secret_yaml(
            "default",
            "bookinfo-tls-cert",
            &[("tls.crt", &other_crt), ("tls.key", &other_key)],
        ),
    ]);
    let gw = &s.gateways[&id("default", "bookinfo-gateway")];
    assert_eq!(gw.servers.len(), 2);
    assert_eq!(gw.servers[1].protocol, "HTTPS");
    let tls = gw.servers[1].tls.as_ref().expect("tls");
    assert_eq!(tls.mode, TlsMode::Simple);
    assert_eq!(tls.credential_name.as_deref(), Some("bookinfo-tls-cert"));
    assert_eq!(
        s.gateway_credentials.len(),
        1,
        "{:?}",
        s.gateway_credentials
    );
    match credential(&s) {
        Some(CredentialState::Valid {
            dns_names,
            client_ca,
            ..
        }) => {
            assert_eq!(dns_names, &["bookinfo.example.com"]);
            assert!(!client_ca);
        }
        other => panic!("{other:?}"),
    }

    // No gateway workload: nothing is read. A workload and no Secret: missing.
    let s = snap(&[GUIDE_GATEWAY.into()]);
    assert!(s.gateway_credentials.is_empty());
    let s = snap(&[GUIDE_GATEWAY.into(), ingress_pod("istio-system")]);
    assert_eq!(credential(&s), Some(&CredentialState::Missing));
}

#[test]
fn unusable_credentials_say_which_key_is_at_fault() {
    let (crt, key) = cert("bookinfo.example.com", false);
    let (_, other_key) = cert("bookinfo.example.com", false);
    let (old_crt, old_key) = cert("bookinfo.example.com", true);
    // (the Secret's keys, what the state must say: None for valid)
    type Case<'a> = (&'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: [Case<'_>; 7] = [
        (&[("tls.crt", &crt), ("tls.key", &key)], None),
        // Istio's generic layout.
        (&[("cert", &crt), ("key", &key), ("cacert", &crt)], None),
        (
            &[("tls.crt", &crt), ("tls.key", &other_key)],
            Some("tls.key: unusable with tls.crt"),
        ),
        (
            &[("tls.crt", &old_crt), ("tls.key", &old_key)],
            Some("tls.crt: expired at"),
        ),
        (&[("tls.crt", &crt)], Some("no tls.key (or key)")),
        (
            &[("tls.crt", "garbage"), ("tls.key", &key)],
            Some("tls.crt: no PEM certificate"),
        ),
        (
            &[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", "x")],
            Some("ca.crt: no PEM certificate"),
        ),
    ];
    for (entries, want) in cases {
        let s = snap(&[
            GUIDE_GATEWAY.into(),
            ingress_pod("istio-system"),
            secret_yaml("istio-system", "bookinfo-tls-cert", entries),
        ]);
        match (credential(&s), want) {
            (Some(CredentialState::Valid { client_ca, .. }), None) => {
                assert_eq!(*client_ca, entries.iter().any(|(k, _)| *k == "cacert"));
            }
            (Some(CredentialState::Invalid { reason }), Some(want)) => {
                assert!(reason.contains(want), "{reason:?} should say {want:?}");
            }
            (other, want) => panic!("{entries:?}: got {other:?}, want {want:?}"),
        }
    }
}

#[test]
fn invalid_gateways_name_the_field() {
    let gateway = |server: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\n\
             spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - {server}\n"
        )
    };
    let cases = [
        (
            "{port: {number: 80, protocol: HTTP}, hosts: [a.example.com]}",
            "spec.servers[0].port.name",
            "missing",
        ),
        (
            "{port: {number: 70000, name: p, protocol: HTTP}, hosts: [a.example.com]}",
            "spec.servers[0].port.number",
            "70000 is out of range",
        ),
        (
            "{port: {number: 80, name: p, protocol: QUIC}, hosts: [a.example.com]}",
            "spec.servers[0].port.protocol",
            "\"QUIC\" is not one of",
        ),
        (
            "{port: {number: 443, name: p, protocol: HTTPS}, hosts: [a.example.com]}",
            "spec.servers[0].tls",
            "needs TLS settings",
        ),
        (
            "{port: {number: 443, name: p, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE}}",
            "spec.servers[0].tls.credentialName",
            "missing; mode Simple needs credentialName",
        ),
        (
            "{port: {number: 443, name: p, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: SIMPLE, credentialName: Bad_Name}}",
            "spec.servers[0].tls.credentialName",
            "\"Bad_Name\" is not a Secret name",
        ),
        (
            "{port: {number: 443, name: p, protocol: HTTPS}, hosts: [a.example.com], tls: {mode: STRICT}}",
            "spec.servers[0].tls.mode",
            "\"STRICT\" is not one of",
        ),
        (
            "{port: {number: 80, name: p, protocol: HTTP}, hosts: [\"bad host\"]}",
            "spec.servers[0].hosts[0]",
            "is not a host",
        ),
        (
            "{port: {number: 80, name: p, protocol: HTTP}}",
            "spec.servers[0].hosts",
            "missing",
        ),
        (
            "{port: {number: 80, name: p, protocol: HTTP}, hosts: [a.example.com], tls: {credentialName: x, sni: y}}",
            "spec.servers[0].tls.sni",
            "unknown field",
        ),
    ];
    for (server, field, reason) in cases {
        let err = load(&[gateway(server)]).expect_err(server).to_string();
        assert!(
            err.contains(field) && err.contains(reason),
            "{server}: {err} should name {field} and say {reason:?}"
        );
    }
    // Istio's host forms all pass.
    let ok = gateway(
        "{port: {number: 80, name: p, protocol: http}, hosts: [\"*\", \"*.example.com\", \"ns/a.example.com\", \"./b\", \"*/c.example.com\"]}",
    );
    load(&[ok]).expect("valid hosts");
}
