//! Gateway (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`, same schema), decoded into
//! [`gateway::Gateway`] with Istio's validation, and the credential Secrets its servers name,
//! inspected into [`CredentialState`] the way an ingress would load them (with rustls).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1 as k8s;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::{IstioObject, Problem, Problems, done, object_ref};
use crate::config::gateway::{self, CredentialState, ServerTls, TlsMode};
use crate::config::model::dns_name;
use crate::config::routing::host_label;
use crate::identity::pki;

/// `kind: Gateway`, as written in manifests or served by the API server.
pub type Gateway = IstioObject<Spec>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    selector: Option<BTreeMap<String, String>>,
    servers: Option<Vec<ServerSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerSpec {
    port: Option<PortSpec>,
    hosts: Option<Vec<String>>,
    tls: Option<TlsSpec>,
    // Accepted as Istio has them; nothing here reads them.
    #[serde(rename = "bind")]
    _bind: Option<String>,
    #[serde(rename = "defaultEndpoint")]
    _default_endpoint: Option<String>,
    #[serde(rename = "name")]
    _name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortSpec {
    number: Option<i64>,
    protocol: Option<String>,
    name: Option<String>,
    #[serde(rename = "targetPort")]
    _target_port: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlsSpec {
    https_redirect: Option<bool>,
    mode: Option<String>,
    server_certificate: Option<String>,
    private_key: Option<String>,
    ca_certificates: Option<String>,
    credential_name: Option<String>,
    // Accepted as Istio has them; they matter to an ingress, which nodemesh does not run yet.
    #[serde(rename = "credentialNames")]
    _credential_names: Option<Vec<String>>,
    #[serde(rename = "caCrl")]
    _ca_crl: Option<String>,
    #[serde(rename = "subjectAltNames")]
    _subject_alt_names: Option<Vec<String>>,
    #[serde(rename = "verifyCertificateSpki")]
    _verify_certificate_spki: Option<Vec<String>>,
    #[serde(rename = "verifyCertificateHash")]
    _verify_certificate_hash: Option<Vec<String>>,
    #[serde(rename = "minProtocolVersion")]
    _min_protocol_version: Option<String>,
    #[serde(rename = "maxProtocolVersion")]
    _max_protocol_version: Option<String>,
    #[serde(rename = "cipherSuites")]
    _cipher_suites: Option<Vec<String>>,
}

const PROTOCOLS: [&str; 8] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "TCP", "TLS", "MONGO",
];

fn tls_mode(s: &str) -> Option<TlsMode> {
    Some(match s {
        "PASSTHROUGH" => TlsMode::Passthrough,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "AUTO_PASSTHROUGH" => TlsMode::AutoPassthrough,
        "ISTIO_MUTUAL" => TlsMode::IstioMutual,
        "OPTIONAL_MUTUAL" => TlsMode::OptionalMutual,
        _ => return None,
    })
}

/// A server host: `[namespace/]host`, the namespace `*`, `.`, `~` or a name, the host `*`,
/// `*.suffix` or a DNS name.
fn host_problem(h: &str) -> Option<String> {
    let (ns, host) = h.split_once('/').unwrap_or(("*", h));
    if !(matches!(ns, "*" | "." | "~") || host_label(ns)) {
        return Some(format!(
            "{h:?}: the namespace part must be *, ., ~ or a namespace name"
        ));
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host == "*" || (!name.is_empty() && name.split('.').all(host_label)) {
        None
    } else {
        Some(format!(
            "{h:?} is not a host (a DNS name, *.suffix or *, optionally after namespace/)"
        ))
    }
}

pub(super) fn convert_gateway(gw: &Gateway) -> Result<gateway::Gateway, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&gw.metadata, &mut problems);
    let default = Spec::default();
    let spec = gw.spec.as_ref().unwrap_or(&default);
    let selector = spec.selector.clone().unwrap_or_default();
    let specs = spec.servers.as_deref().unwrap_or_default();
    if specs.is_empty() {
        problems.invalid(
            "spec.servers",
            "missing; a Gateway needs at least one server",
        );
    }
    let mut servers = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let at = |f: &str| format!("spec.servers[{i}].{f}");
        let Some(port) = &s.port else {
            problems.invalid(at("port"), "missing");
            continue;
        };
        let number = match port.number.map(u16::try_from) {
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                let n = port.number.unwrap_or_default();
                problems.invalid(at("port.number"), format!("{n} is out of range 1..65535"));
                0
            }
            None => {
                problems.invalid(at("port.number"), "missing");
                0
            }
        };
        let protocol = port.protocol.as_deref().unwrap_or("").to_ascii_uppercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            let reason = format!(
                "{:?} is not one of {}",
                port.protocol.as_deref().unwrap_or(""),
                PROTOCOLS.join(", ")
            );
            problems.invalid(at("port.protocol"), reason);
        }
        let port_name = port.name.clone().unwrap_or_default();
        if port_name.is_empty() {
            problems.invalid(at("port.name"), "missing; Istio requires a port name");
        }
        let hosts = s.hosts.clone().unwrap_or_default();
        if hosts.is_empty() {
            problems.invalid(at("hosts"), "missing; a server needs at least one host");
        }
        for (j, h) in hosts.iter().enumerate() {
            if let Some(reason) = host_problem(h) {
                problems.invalid(at(&format!("hosts[{j}]")), reason);
            }
        }
        let tls = s.tls.as_ref().map(|t| server_tls(t, &at, &mut problems));
        let needs_tls = matches!(protocol.as_str(), "HTTPS" | "TLS");
        if needs_tls && tls.is_none() {
            problems.invalid(
                at("tls"),
                format!("missing; a {protocol} server needs TLS settings (mode and credential)"),
            );
        }
        servers.push(gateway::Server {
            port: number,
            port_name,
            protocol,
            hosts,
            tls,
        });
    }
    done(
        gateway::Gateway {
            id,
            selector,
            servers,
        },
        problems,
    )
}

fn server_tls(t: &TlsSpec, at: &dyn Fn(&str) -> String, problems: &mut Vec<Problem>) -> ServerTls {
    let mode = match t.mode.as_deref() {
        None => TlsMode::Passthrough,
        Some(m) => tls_mode(m).unwrap_or_else(|| {
            let reason = format!(
                "{m:?} is not one of PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, \
                 OPTIONAL_MUTUAL"
            );
            problems.invalid(at("tls.mode"), reason);
            TlsMode::Passthrough
        }),
    };
    let credential_name = t.credential_name.clone().filter(|c| !c.is_empty());
    if let Some(c) = &credential_name
        && !dns_name(c, true, 253)
    {
        let reason = format!(
            "{c:?} is not a Secret name (lower-case letters, digits, - and ., at most 253)"
        );
        problems.invalid(at("tls.credentialName"), reason);
    }
    let files = t.server_certificate.is_some() || t.private_key.is_some();
    if mode.terminates() && credential_name.is_none() {
        match (&t.server_certificate, &t.private_key) {
            (Some(_), Some(_)) => {}
            (None, None) => problems.invalid(
                at("tls.credentialName"),
                format!("missing; mode {mode:?} needs credentialName (or serverCertificate and privateKey)"),
            ),
            (Some(_), None) => problems.invalid(at("tls.privateKey"), "missing; serverCertificate needs it"),
            (None, Some(_)) => problems.invalid(at("tls.serverCertificate"), "missing; privateKey needs it"),
        }
        if mode.verifies_clients() && t.ca_certificates.is_none() {
            problems.invalid(
                at("tls.caCertificates"),
                "missing; MUTUAL without credentialName needs the CA file",
            );
        }
    }
    ServerTls {
        mode,
        credential_name,
        files,
        https_redirect: t.https_redirect.unwrap_or(false),
    }
}

/// A Secret's `namespace/name` and what it holds for a gateway (local mode reads every Secret
/// of the manifests this way; only those a Gateway names are kept).
pub(super) fn convert_secret(secret: &k8s::Secret) -> Result<gateway::Credential, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&secret.metadata, &mut problems);
    let state = inspect(secret, SystemTime::now());
    done(gateway::Credential { id, state }, problems)
}

/// What a credential Secret holds, checked as an ingress would load it: `tls.crt` / `tls.key`
/// (a `kubernetes.io/tls` Secret; `cert` / `key` in a generic one, as Istio also reads), the
/// key matching the first certificate (rustls' `CertifiedKey`), that certificate valid at `now`,
/// and the client CA (`ca.crt` / `cacert`) parsed when present.
pub fn inspect(secret: &k8s::Secret, now: SystemTime) -> CredentialState {
    let get = |key: &str| -> Option<Vec<u8>> {
        let data = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone());
        let text = || {
            secret
                .string_data
                .as_ref()?
                .get(key)
                .map(|s| s.clone().into_bytes())
        };
        data.or_else(text)
            .filter(|b| !b.iter().all(u8::is_ascii_whitespace))
    };
    let invalid = |reason: String| CredentialState::Invalid { reason };
    let pick = |a: &'static str, b: &'static str| {
        get(a).map(|v| (a, v)).or_else(|| get(b).map(|v| (b, v)))
    };
    let Some((cert_key, cert)) = pick("tls.crt", "cert") else {
        return invalid("no tls.crt (or cert): the certificate is missing".into());
    };
    let Some((key_key, key)) = pick("tls.key", "key") else {
        return invalid("no tls.key (or key): the private key is missing".into());
    };
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_slice_iter(&cert).collect()
    {
        Ok(c) => c,
        Err(e) => return invalid(format!("{cert_key}: not PEM certificates ({e})")),
    };
    if chain.is_empty() {
        return invalid(format!("{cert_key}: no PEM certificate in it"));
    }
    let private = match PrivateKeyDer::from_pem_slice(&key) {
        Ok(k) => k,
        Err(e) => {
            return invalid(format!(
                "{key_key}: no PEM private key (PKCS#1, PKCS#8 or SEC1) ({e})"
            ));
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    if let Err(e) = rustls::sign::CertifiedKey::from_der(chain.clone(), private, &provider) {
        return invalid(format!("{key_key}: unusable with {cert_key}: {e}"));
    }
    let parsed = match x509_parser::parse_x509_certificate(&chain[0]) {
        Ok((_, c)) => c,
        Err(e) => return invalid(format!("{cert_key}: cannot parse the certificate: {e}")),
    };
    let (not_before, not_after) = pki::validity(&parsed);
    if now < not_before {
        let at = pki::rfc3339(not_before);
        return invalid(format!("{cert_key}: not valid before {at}"));
    }
    if now >= not_after {
        return invalid(format!(
            "{cert_key}: expired at {}",
            pki::rfc3339(not_after)
        ));
    }
    let client_ca = match pick("ca.crt", "cacert") {
        None => false,
        Some((ca_key, ca)) => {
            let certs: Result<Vec<CertificateDer<'_>>, _> =
                CertificateDer::pem_slice_iter(&ca).collect();
            match certs {
                Ok(c) if !c.is_empty() => true,
                Ok(_) => return invalid(format!("{ca_key}: no PEM certificate in it")),
                Err(e) => return invalid(format!("{ca_key}: not PEM certificates ({e})")),
            }
        }
    };
    let dns_names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    CredentialState::Valid {
        subject: parsed.subject().to_string(),
        dns_names,
        not_after: pki::rfc3339(not_after),
        client_ca,
    }
}
