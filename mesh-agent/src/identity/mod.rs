//! Workload identity: SPIFFE IDs, and the certificates the agent holds for the service
//! accounts with pods on its node.
//!
//! [`Identity`] is `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//! [`CertManager`] keeps one certificate per wanted identity: it generates an ECDSA P-256
//! key locally, sends a CSR to the mesh CA (`mesh-agent ca`), and renews at half-life with a
//! new key. A failed renewal keeps the still-valid certificate in use.

mod client;
mod manager;
pub mod pki;

use std::fmt;

use serde::Serialize;

pub use client::{CaAddr, SIGN_PATH};
pub use manager::{CertHandle, CertManager, CertManagerConfig, CertState, CertView};
#[cfg(test)]
pub use manager::{DEFAULT_TTL, WorkloadCert};

/// URI scheme of SPIFFE IDs.
pub const SPIFFE_SCHEME: &str = "spiffe://";
/// Longest trust domain accepted (SPIFFE: 255 bytes).
const MAX_TRUST_DOMAIN: usize = 255;
/// Kubernetes namespace names are DNS labels.
const MAX_NAMESPACE: usize = 63;
/// Kubernetes service account names are DNS subdomains.
const MAX_SERVICE_ACCOUNT: usize = 253;

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme { id: String },
    #[error("{id:?}: invalid trust domain {trust_domain:?} (1..=255 of a-z 0-9 . - _)")]
    TrustDomain { id: String, trust_domain: String },
    #[error("{id:?}: the path must be /ns/<namespace>/sa/<serviceaccount>")]
    Path { id: String },
    #[error("{id:?}: invalid namespace {namespace:?} (a DNS label: 1..=63 of a-z 0-9 -)")]
    Namespace { id: String, namespace: String },
    #[error(
        "{id:?}: invalid service account {service_account:?} (1..=253 of a-z 0-9 - ., starting and ending alphanumeric)"
    )]
    ServiceAccount { id: String, service_account: String },
    #[error("cannot parse the certificate: {reason}")]
    Certificate { reason: String },
    #[error("the certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("the certificate has {count} SPIFFE URI SANs; exactly one is allowed")]
    ManySpiffeIds { count: usize },
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Identity {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>` strictly: lowercase scheme and trust domain,
    /// exactly those four path segments, no empty segments, query, fragment, port or user.
    pub fn parse(s: &str) -> Result<Identity, IdentityError> {
        let id = || s.to_string();
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| IdentityError::Scheme { id: id() })?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain {
                id: id(),
                trust_domain: td.to_string(),
            });
        }
        let segs: Vec<&str> = path.split('/').collect();
        let [ns_key, ns, sa_key, sa] = segs.as_slice() else {
            return Err(IdentityError::Path { id: id() });
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(IdentityError::Path { id: id() });
        }
        if !valid_namespace(ns) {
            return Err(IdentityError::Namespace {
                id: id(),
                namespace: ns.to_string(),
            });
        }
        if !valid_service_account(sa) {
            return Err(IdentityError::ServiceAccount {
                id: id(),
                service_account: sa.to_string(),
            });
        }
        Ok(Identity::new(td, *ns, *sa))
    }

    /// The identity of a certificate: its single SPIFFE URI SAN.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Certificate {
                reason: e.to_string(),
            })?;
        let uris =
            pki::spiffe_uris(&cert).map_err(|reason| IdentityError::Certificate { reason })?;
        match uris.as_slice() {
            [] => Err(IdentityError::NoSpiffeId),
            [one] => Identity::parse(one),
            more => Err(IdentityError::ManySpiffeIds { count: more.len() }),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

/// SPIFFE trust domain: lowercase letters, digits, dots, dashes and underscores.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAMESPACE
        && b.iter().all(|&c| alnum(c) || c == b'-')
        && b.first().is_some_and(|&c| alnum(c))
        && b.last().is_some_and(|&c| alnum(c))
}

fn valid_service_account(sa: &str) -> bool {
    let b = sa.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_SERVICE_ACCOUNT
        && b.iter().all(|&c| alnum(c) || c == b'-' || c == b'.')
        && b.first().is_some_and(|&c| alnum(c))
        && b.last().is_some_and(|&c| alnum(c))
}

#[cfg(test)]
mod tests;
