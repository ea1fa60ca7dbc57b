//! Istio Gateways (`networking.istio.io`) and the TLS credentials their servers name.
//!
//! nodemesh does not serve ingress yet: a Gateway here binds VirtualService rules (those bound
//! only to a gateway do not apply to mesh traffic) and is checked, so that what an ingress
//! would serve is known to be servable before one exists. A server's `credentialName` names a
//! Secret in the namespace of the gateway workload (the pods the Gateway's selector selects),
//! as Istio reads it. Only those Secrets are ever read ([`Snapshot::wanted_credentials`]), and
//! only what they say is kept ([`CredentialState`]): never a private key.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::model::{ObjectRef, Snapshot};

/// One Gateway, validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gateway {
    pub id: ObjectRef,
    /// `spec.selector`: the gateway workload's pod labels.
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Server {
    pub port: u16,
    pub port_name: String,
    /// Upper case, as Istio compares it: HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, TCP, TLS, MONGO.
    pub protocol: String,
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerTls {
    pub mode: TlsMode,
    /// The Secret holding the certificate, key and (mutual TLS) CA.
    pub credential_name: Option<String>,
    /// `serverCertificate` / `privateKey` file paths inside the gateway pod (not read here).
    pub files: bool,
    pub https_redirect: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

impl TlsMode {
    /// The gateway terminates TLS with a certificate of its own (a credential to read).
    pub fn terminates(self) -> bool {
        matches!(
            self,
            TlsMode::Simple | TlsMode::Mutual | TlsMode::OptionalMutual
        )
    }

    /// Client certificates are checked against a CA the credential must carry.
    pub fn verifies_clients(self) -> bool {
        matches!(self, TlsMode::Mutual | TlsMode::OptionalMutual)
    }
}

/// What a credential Secret says, as an ingress would need it: the key matches the
/// certificate, the certificate is valid now. The key itself is never kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CredentialState {
    Valid {
        subject: String,
        dns_names: Vec<String>,
        not_after: String,
        /// A CA for client certificates (`ca.crt` or `cacert`) is in the Secret.
        client_ca: bool,
    },
    /// Present but unusable: `reason` names the key at fault (`tls.key: ...`).
    Invalid { reason: String },
    /// No such Secret.
    Missing,
}

/// A credential Secret's state, named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub id: ObjectRef,
    pub state: CredentialState,
}

impl Snapshot {
    /// The Secrets the Gateways name: each terminating server's `credentialName`, in every
    /// namespace where a pod the Gateway selects runs (Istio reads a gateway's credential
    /// from its workload's namespace). A Gateway selecting no pod names nothing.
    pub fn wanted_credentials(&self) -> BTreeSet<ObjectRef> {
        let mut wanted = BTreeSet::new();
        for gw in self.gateways.values() {
            let names: Vec<&str> = gw
                .servers
                .iter()
                .filter_map(|s| s.tls.as_ref())
                .filter(|t| t.mode.terminates())
                .filter_map(|t| t.credential_name.as_deref())
                .collect();
            if names.is_empty() || gw.selector.is_empty() {
                continue;
            }
            let namespaces: BTreeSet<&str> = self
                .pods
                .values()
                .filter(|p| p.has_labels(&gw.selector))
                .map(|p| p.id.namespace.as_str())
                .collect();
            for ns in namespaces {
                for name in &names {
                    wanted.insert(ObjectRef {
                        namespace: ns.to_owned(),
                        name: (*name).to_owned(),
                    });
                }
            }
        }
        wanted
    }
}

/// Credentials for tests: certificates and keys made with rcgen, as Secrets.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, SystemTime};

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use rcgen::{CertificateParams, KeyPair};

    /// (certificate PEM, key PEM) for `dns`; `expired`: its validity ended yesterday.
    pub fn cert(dns: &str, expired: bool) -> (String, String) {
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        if expired {
            cert_valid(dns, now - 30 * day, now - day)
        } else {
            cert_valid(dns, now - day, now + 30 * day)
        }
    }

    /// (certificate PEM, key PEM) for `dns`, valid from `from` to `to`.
    pub fn cert_valid(dns: &str, from: SystemTime, to: SystemTime) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params.not_before = crate::identity::pki::to_offset(from);
        params.not_after = crate::identity::pki::to_offset(to);
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    /// A Secret with these keys (as the API server serves it: `data`, base64 in JSON).
    pub fn secret(ns: &str, name: &str, entries: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some(ns.into());
        s.type_ = Some("kubernetes.io/tls".into());
        s.data = Some(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        s
    }
}
