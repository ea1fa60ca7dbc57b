//! The CA client: a fresh key and CSR, `POST /v1/sign` over TLS 1.3 to the mesh CA, and
//! validation of the returned chain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

use super::manager::{CertError, Shared, WorkloadCert};
use super::{Identity, pki};

/// Whole exchange with the CA: connect, handshake, request, reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply accepted from the CA.
const MAX_REPLY: usize = 1 << 20;
/// Path of the signing endpoint.
pub const SIGN_PATH: &str = "/v1/sign";

/// Where the CA is: `IP:PORT`, or `HOST:PORT` (a DNS name, e.g. the CA's Service
/// `nodemesh-ca.nodemesh-system.svc:15012`), resolved again for every connection so a moved
/// Service is followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaAddr {
    host: String,
    port: u16,
}

#[cfg_attr(
    not(test),
    expect(dead_code, reason = "read by the deploy/ tests (deploy_tests::ca)")
)]
impl CaAddr {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// The first address the name resolves to (an IP literal: itself).
    pub async fn resolve(&self) -> std::io::Result<SocketAddr> {
        let mut found = tokio::net::lookup_host((self.host.as_str(), self.port)).await?;
        found.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} resolves to no address", self.host),
            )
        })
    }
}

impl From<SocketAddr> for CaAddr {
    fn from(a: SocketAddr) -> CaAddr {
        CaAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::str::FromStr for CaAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<CaAddr, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || format!("{s:?} is not IP:PORT or HOST:PORT");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if host.is_empty() || !host.chars().all(valid) || port == 0 {
            return Err(bad());
        }
        Ok(CaAddr {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for CaAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Body of `POST /v1/sign`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    /// PKCS#10 CSR, PEM.
    pub csr: String,
    pub ttl_seconds: u64,
}

/// Reply of `POST /v1/sign` with status 200.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// Leaf first, then intermediates (not the root), one PEM certificate each.
    pub chain: Vec<String>,
}

/// Reply of `POST /v1/sign` with an error status.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// Obtains a new certificate for `id` with a new key.
pub(super) async fn issue(shared: &Shared, id: &Identity) -> Result<WorkloadCert, CertError> {
    let addr = &shared.cfg.ca_addr;
    let csr_err = |source| CertError::Csr {
        identity: id.to_string(),
        source,
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(csr_err)?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(csr_err)?;

    let bad_reply = |reason: String| CertError::BadReply {
        addr: addr.clone(),
        identity: id.to_string(),
        reason,
    };
    let body = serde_json::to_string(&SignRequest {
        csr,
        ttl_seconds: shared.cfg.ttl.as_secs(),
    })
    .map_err(|e| bad_reply(format!("encoding the request: {e}")))?;
    let (status, reply) = tokio::time::timeout(REQUEST_TIMEOUT, post(shared, id, body))
        .await
        .map_err(|_| CertError::Timeout {
            addr: addr.clone(),
            timeout: REQUEST_TIMEOUT,
        })??;
    if status != 200 {
        let reason = serde_json::from_slice::<ErrorResponse>(&reply)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&reply).trim().to_string());
        return Err(CertError::Refused {
            addr: addr.clone(),
            identity: id.to_string(),
            status,
            reason,
        });
    }
    let resp: SignResponse =
        serde_json::from_slice(&reply).map_err(|e| bad_reply(format!("invalid JSON: {e}")))?;
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for pem in &resp.chain {
        chain.extend(pki::certs_from_pem(pem.as_bytes()).map_err(bad_reply)?);
    }

    let bad_chain = |reason: String| CertError::BadChain {
        addr: addr.clone(),
        identity: id.to_string(),
        reason,
    };
    let leaf = chain
        .first()
        .ok_or_else(|| bad_chain("empty chain".into()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| bad_chain(format!("cannot parse the leaf: {e}")))?;
    let got = Identity::from_cert_der(leaf).map_err(|e| bad_chain(e.to_string()))?;
    if &got != id {
        return Err(bad_chain(format!("the leaf names {got}")));
    }
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad_chain("the leaf does not carry our public key".into()));
    }
    pki::verify_chain(&shared.roots, &shared.provider, &chain, SystemTime::now())
        .map_err(bad_chain)?;
    let serial = pki::serial_hex(&parsed);
    let (not_before, not_after) = pki::validity(&parsed);

    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = shared
        .provider
        .key_provider
        .load_private_key(der)
        .map_err(|source| CertError::Key {
            identity: id.to_string(),
            source,
        })?;
    Ok(WorkloadCert {
        identity: id.clone(),
        certified: Arc::new(CertifiedKey::new(chain, signer)),
        serial,
        not_before,
        not_after,
    })
}

/// A TCP socket carrying the agent's mark (`mesh_common::AGENT_MARK`) so that capture never
/// redirects it. Without CAP_NET_ADMIN (unit tests as a normal user) the mark cannot be set;
/// such a process is not captured either, so an unmarked socket is used then.
fn ca_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let domain = Domain::for_address(addr);
    match crate::capture::netns::agent_socket(domain) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            debug!(error = %e, "cannot mark the CA socket; using an unmarked one");
            let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            s.set_tcp_nodelay(true)?;
            Ok(s)
        }
        Err(e) => Err(e),
    }
}

/// Sends the request; returns the status and the body.
async fn post(shared: &Shared, id: &Identity, body: String) -> Result<(u16, Bytes), CertError> {
    let addr = &shared.cfg.ca_addr;
    let token_path = &shared.cfg.token_file;
    let token = tokio::fs::read_to_string(token_path)
        .await
        .map_err(|source| CertError::TokenRead {
            path: token_path.clone(),
            source,
        })?;
    let token = token.trim();
    let auth = HeaderValue::from_str(&format!("Bearer {token}"))
        .ok()
        .filter(|_| !token.is_empty())
        .ok_or_else(|| CertError::TokenInvalid {
            path: token_path.clone(),
        })?;
    let host =
        HeaderValue::from_str(&shared.cfg.ca_server_name).map_err(|_| CertError::ServerName {
            name: shared.cfg.ca_server_name.clone(),
        })?;

    let connect = |source| CertError::Connect {
        addr: addr.clone(),
        source,
    };
    let target = addr.resolve().await.map_err(connect)?;
    let sock = ca_socket(target).map_err(connect)?;
    let tcp = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(target)
        .await
        .map_err(connect)?;
    let tls = tokio_rustls::TlsConnector::from(shared.tls.clone())
        .connect(shared.server_name.clone(), tcp)
        .await
        .map_err(|source| CertError::Tls {
            addr: addr.clone(),
            source,
        })?;
    let http = |source| CertError::Http {
        addr: addr.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(http)?;
    let conn = tokio::spawn(conn);
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::from_static(SIGN_PATH);
    let headers = req.headers_mut();
    headers.insert(HOST, host);
    headers.insert(AUTHORIZATION, auth);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let result = async {
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| CertError::BadReply {
                addr: addr.clone(),
                identity: id.to_string(),
                reason: format!("reading the reply: {e}"),
            })?
            .to_bytes();
        Ok((status, bytes))
    }
    .await;
    conn.abort();
    result
}
