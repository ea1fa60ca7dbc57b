//! Mutual TLS 1.3 for HBONE: both ends present the workload certificate of their pod's
//! service account; each end verifies the other's chain against the mesh roots. The source
//! also requires the exact SPIFFE identity it expects for the destination pod; the
//! destination requires the source to be in its trust domain.
//!
//! Certificates are read through a [`CertHandle`] at every handshake, so rotation takes
//! effect for new connections while established ones keep their session.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::identity::{CertHandle, Identity};

/// The ALPN both ends require.
pub const ALPN_H2: &[u8] = b"h2";

/// Serves (and presents as a client) whatever certificate the handle holds now.
#[derive(Clone)]
struct CurrentCert(CertHandle);

impl std::fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CurrentCert({})", self.0.current().identity)
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The destination side (15008): requires a client certificate chaining to `roots`.
pub fn server_config(
    cert: CertHandle,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Tunnels are long-lived and pooled; no resumption to keep state (and keys) small.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The source side: presents `cert` and accepts only a server proving `expected`.
pub fn client_config(
    cert: CertHandle,
    expected: Identity,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        expected,
        roots,
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(cert)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The identity a verified peer certificate proves.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    let leaf = certs?.first()?;
    Identity::from_cert_der(leaf).ok()
}

/// Verifies the server's chain against the mesh roots and its SPIFFE identity against the one
/// expected for the destination pod. The TLS server name (the pod IP) is not in mesh
/// certificates and is not checked: the identity is what names a workload.
#[derive(Debug)]
struct SpiffeServerVerifier {
    expected: Identity,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = Identity::from_cert_der(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        if got != self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    expected: self.expected.clone(),
                    got,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configs allow TLS 1.3 only.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The destination presented a valid mesh certificate, but for another workload.
#[derive(Debug, thiserror::Error)]
#[error("the destination proved {got}, expected {expected}")]
pub struct WrongIdentity {
    pub expected: Identity,
    pub got: Identity,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::WorkloadCert;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let key = KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("root");
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn roots(cas: &[&Ca]) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        for c in cas {
            r.add(c.der.clone()).expect("root");
        }
        Arc::new(r)
    }

    fn id(td: &str, sa: &str) -> Identity {
        Identity {
            trust_domain: td.into(),
            namespace: "default".into(),
            service_account: sa.into(),
        }
    }

    fn leaf(ca: &Ca, identity: &Identity, expired: bool) -> CertHandle {
        CertHandle::new(leaf_cert(ca, identity, expired))
    }

    fn leaf_cert(ca: &Ca, identity: &Identity, expired: bool) -> WorkloadCert {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().expect("uri"))];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 2);
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca.issuer).expect("leaf");
        let provider = rustls::crypto::ring::default_provider();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider
            .key_provider
            .load_private_key(der)
            .expect("signing key");
        WorkloadCert {
            identity: identity.clone(),
            certified: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)),
            serial: String::new(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now(),
        }
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Runs one handshake over an in-memory pipe; returns what the server saw as the client.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> (Result<(), String>, Result<Option<Identity>, String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 1]).into());
        let c = async {
            let mut s = tokio_rustls::TlsConnector::from(client)
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"ping").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok(())
        };
        let s = async {
            let mut s = tokio_rustls::TlsAcceptor::from(server)
                .accept(b)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(peer_identity(s.get_ref().1.peer_certificates()))
        };
        tokio::join!(c, s)
    }

    #[tokio::test]
    async fn both_ends_prove_their_identity() {
        let mesh = ca("mesh");
        let (a, b) = (id("cluster.local", "a"), id("cluster.local", "b"));
        let client = client_config(
            leaf(&mesh, &a, false),
            b.clone(),
            roots(&[&mesh]),
            provider(),
        )
        .expect("client");
        let server =
            server_config(leaf(&mesh, &b, false), roots(&[&mesh]), provider()).expect("server");
        let (c, s) = handshake(client, server).await;
        c.expect("client side");
        assert_eq!(s.expect("server side"), Some(a));
    }

    #[tokio::test]
    async fn the_source_refuses_a_valid_certificate_for_another_identity() {
        let mesh = ca("mesh");
        let (a, b, evil) = (
            id("cluster.local", "a"),
            id("cluster.local", "b"),
            id("cluster.local", "evil"),
        );
        let client = client_config(
            leaf(&mesh, &a, false),
            b.clone(),
            roots(&[&mesh]),
            provider(),
        )
        .expect("client");
        let server =
            server_config(leaf(&mesh, &evil, false), roots(&[&mesh]), provider()).expect("server");
        let (c, s) = handshake(client, server).await;
        let err = c.expect_err("must refuse");
        assert!(err.contains("evil"), "{err}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn a_chain_from_another_root_is_refused_both_ways() {
        let (mesh, other) = (ca("mesh"), ca("other"));
        let (a, b) = (id("cluster.local", "a"), id("cluster.local", "b"));
        // Client certificate from a foreign root: the destination refuses it.
        let client = client_config(
            leaf(&other, &a, false),
            b.clone(),
            roots(&[&mesh]),
            provider(),
        )
        .expect("client");
        let server =
            server_config(leaf(&mesh, &b, false), roots(&[&mesh]), provider()).expect("server");
        let (_, s) = handshake(client, server).await;
        assert!(s.expect_err("server must refuse").contains("UnknownIssuer"));
        // Server certificate from a foreign root: the source refuses it.
        let client = client_config(
            leaf(&mesh, &a, false),
            b.clone(),
            roots(&[&mesh]),
            provider(),
        )
        .expect("client");
        let server = server_config(leaf(&other, &b, false), roots(&[&other, &mesh]), provider())
            .expect("server");
        let (c, _) = handshake(client, server).await;
        assert!(c.expect_err("client must refuse").contains("UnknownIssuer"));
    }

    #[tokio::test]
    async fn expired_certificates_are_refused() {
        let mesh = ca("mesh");
        let (a, b) = (id("cluster.local", "a"), id("cluster.local", "b"));
        let client = client_config(
            leaf(&mesh, &a, true),
            b.clone(),
            roots(&[&mesh]),
            provider(),
        )
        .expect("client");
        let server =
            server_config(leaf(&mesh, &b, false), roots(&[&mesh]), provider()).expect("server");
        let (_, s) = handshake(client, server).await;
        let err = s.expect_err("expired client");
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn rotation_applies_to_the_next_handshake() {
        let mesh = ca("mesh");
        let (a, b, a2) = (
            id("cluster.local", "a"),
            id("cluster.local", "b"),
            id("cluster.local", "a2"),
        );
        let handle = leaf(&mesh, &a, false);
        let server =
            server_config(leaf(&mesh, &b, false), roots(&[&mesh]), provider()).expect("server");
        let client =
            client_config(handle.clone(), b.clone(), roots(&[&mesh]), provider()).expect("client");
        let (_, s) = handshake(client.clone(), server.clone()).await;
        assert_eq!(s.expect("first"), Some(a));
        handle.store(leaf_cert(&mesh, &a2, false));
        let (_, s) = handshake(client, server).await;
        assert_eq!(s.expect("second"), Some(a2));
    }
}
