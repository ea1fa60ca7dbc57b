//! What the CA signs: a CSR with exactly one SAN, a SPIFFE URI in our trust domain, whose
//! namespace and service account have a pod on the calling node.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use std::sync::Arc;

use tokio::sync::watch;

use super::cluster::ClusterPods;
use crate::config::model::Snapshot;
use crate::identity::Identity;

/// Where the CA learns which pods run on which node.
pub enum Pods {
    /// Local mode: the manifests directory's snapshots.
    Manifests(watch::Receiver<Arc<Snapshot>>),
    /// Cluster mode: the API server's pods.
    Cluster(ClusterPods),
}

impl Pods {
    /// Whether the CA knows the pods well enough to sign.
    pub fn ready(&self) -> bool {
        match self {
            Pods::Manifests(_) => true,
            Pods::Cluster(c) => c.ready(),
        }
    }

    /// `node` may hold `identity` when a pod with that namespace and service account is
    /// scheduled on it; before the first list of the cluster's pods nothing is signed.
    pub fn authorize(&self, node: &str, identity: &Identity) -> Result<(), Refusal> {
        match self {
            Pods::Manifests(rx) => authorize(&rx.borrow(), node, identity),
            Pods::Cluster(c) if !c.ready() => Err(Refusal::NotSynced),
            Pods::Cluster(c) if c.on_node(node, identity) => Ok(()),
            Pods::Cluster(_) => Err(Refusal::NotOnNode {
                identity: identity.clone(),
                node: node.to_string(),
            }),
        }
    }
}

/// Why a signing request is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("invalid CSR: {reason}")]
    BadCsr { reason: String },
    #[error("{identity} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error(
        "identity {identity} is not allowed for node {node}: no pod with serviceAccount {} in namespace {} is scheduled on it",
        identity.service_account, identity.namespace
    )]
    NotOnNode { identity: Identity, node: String },
    #[error("the CA has not yet listed the cluster's pods from the API server; retry shortly")]
    NotSynced,
}

impl Refusal {
    /// HTTP status: 400 for a bad request, 403 for an identity the node may not have.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadCsr { .. } | Refusal::ForeignTrustDomain { .. } => 400,
            Refusal::NotOnNode { .. } => 403,
            Refusal::NotSynced => 503,
        }
    }
}

/// The parts of a CSR the CA uses; everything else in it is ignored.
#[derive(Debug)]
pub struct Csr {
    pub identity: Identity,
    pub public_key: SubjectPublicKeyInfo,
}

fn bad(reason: impl Into<String>) -> Refusal {
    Refusal::BadCsr {
        reason: reason.into(),
    }
}

/// Parses a PEM CSR, verifies its self-signature, and extracts its one SPIFFE ID and
/// public key.
pub fn parse_csr(pem: &str, trust_domain: &str) -> Result<Csr, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("cannot parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request"));
    }
    csr.verify_signature()
        .map_err(|_| bad("the self-signature does not verify"))?;
    let mut names: Vec<&GeneralName<'_>> = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter());
        }
    }
    let uri = match names.as_slice() {
        [] => return Err(bad("no subjectAltName; exactly one SPIFFE URI is required")),
        [GeneralName::URI(u)] => *u,
        [_] => return Err(bad("the subjectAltName is not a URI")),
        more => {
            return Err(bad(format!(
                "{} subjectAltNames; exactly one (a SPIFFE URI) is allowed",
                more.len()
            )));
        }
    };
    let identity = Identity::parse(uri).map_err(|e| bad(e.to_string()))?;
    if identity.trust_domain != trust_domain {
        return Err(Refusal::ForeignTrustDomain {
            identity: identity.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    let public_key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| bad(format!("unsupported public key: {e}")))?;
    Ok(Csr {
        identity,
        public_key,
    })
}

/// `node` may hold `identity` when a pod with that namespace and service account is
/// scheduled on it.
pub fn authorize(snapshot: &Snapshot, node: &str, identity: &Identity) -> Result<(), Refusal> {
    let allowed = snapshot.pods.values().any(|p| {
        p.id.namespace == identity.namespace
            && p.service_account == identity.service_account
            && p.node.as_deref() == Some(node)
    });
    if allowed {
        Ok(())
    } else {
        Err(Refusal::NotOnNode {
            identity: identity.clone(),
            node: node.to_string(),
        })
    }
}
