//! The CA's HTTPS API: `POST /v1/sign`, `GET /v1/roots`, `GET /healthz/ready`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::auth::NodeAuthenticator;
use super::authority::{Authority, AuthorityError};
use super::policy::{self, Pods, Refusal};
use crate::identity::pki;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (all its requests) may last this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a request needs.
pub struct CaService {
    pub authority: Arc<Authority>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub pods: Pods,
    pub trust_domain: String,
    pub max_ttl: Duration,
}

#[derive(Deserialize)]
struct SignBody {
    csr: String,
    /// 0 or absent: the maximum.
    #[serde(default)]
    ttl_seconds: u64,
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": reason }))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

impl CaService {
    /// The requested lifetime, clamped to [1 s, max_ttl].
    pub fn clamp_ttl(&self, asked_secs: u64) -> Duration {
        if asked_secs == 0 {
            return self.max_ttl;
        }
        Duration::from_secs(asked_secs).clamp(Duration::from_secs(1), self.max_ttl)
    }

    /// `POST /v1/sign` after transport: authenticate, parse, authorize, issue.
    pub async fn sign(
        &self,
        peer: SocketAddr,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        let bearer = authorization.and_then(|h| {
            let (scheme, rest) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        let node = match bearer {
            None => {
                warn!(%peer, reason = "missing bearer credential", "certificate request refused");
                return error(StatusCode::UNAUTHORIZED, "missing bearer credential");
            }
            Some(b) => match self.auth.authenticate(b).await {
                Ok(node) => node,
                Err(e) => {
                    warn!(%peer, reason = %e, "certificate request refused");
                    let status =
                        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
                    return error(status, &e.to_string());
                }
            },
        };
        let req: SignBody = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("invalid request body: {e}");
                warn!(%peer, %node, %reason, "certificate request refused");
                return error(StatusCode::BAD_REQUEST, &reason);
            }
        };
        let csr = match policy::parse_csr(&req.csr, &self.trust_domain) {
            Ok(c) => c,
            Err(refusal) => return self.refuse(peer, &node, None, &refusal),
        };
        if let Err(refusal) = self.pods.authorize(&node, &csr.identity) {
            return self.refuse(peer, &node, Some(&csr.identity.to_string()), &refusal);
        }
        let ttl = self.clamp_ttl(req.ttl_seconds);
        match self.authority.issue(&csr.identity, &csr.public_key, ttl) {
            Ok(chain) => {
                if let Some(Ok((_, leaf))) = chain
                    .first()
                    .map(|c| x509_parser::parse_x509_certificate(c))
                {
                    let (_, not_after) = pki::validity(&leaf);
                    info!(%node, identity = %csr.identity, serial = %pki::serial_hex(&leaf),
                        not_after = %pki::rfc3339(not_after), "certificate issued");
                }
                let pems: Vec<String> = chain.iter().map(|c| pki::cert_to_pem(c)).collect();
                json(StatusCode::OK, &serde_json::json!({ "chain": pems }))
            }
            Err(e) => {
                warn!(%node, identity = %csr.identity, error = %e, "signing failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
        }
    }

    fn refuse(
        &self,
        peer: SocketAddr,
        node: &str,
        identity: Option<&str>,
        refusal: &Refusal,
    ) -> Response<Full<Bytes>> {
        let reason = refusal.to_string();
        warn!(%peer, node, identity = identity.unwrap_or("-"), %reason, "certificate request refused");
        let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
        error(status, &reason)
    }

    async fn route(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, crate::identity::SIGN_PATH) => {
                let auth = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &format!("cannot read the request body: {e}"),
                        );
                    }
                };
                self.sign(peer, auth.as_deref(), &body).await
            }
            (&Method::GET, "/v1/roots") => text(StatusCode::OK, self.authority.roots_pem()),
            (&Method::GET, "/healthz/ready") if self.pods.ready() => {
                text(StatusCode::OK, "ok\n".into())
            }
            (&Method::GET, "/healthz/ready") => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the cluster's pods are not listed yet\n".into(),
            ),
            (_, crate::identity::SIGN_PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

/// TLS 1.3 server configuration with the CA's serving certificate.
pub fn tls_config(
    authority: &Authority,
    server_name: &str,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let (chain, key) = authority.serving_cert(server_name)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let mut cfg = rustls::ServerConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|source| ServeError::Tls { source })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("TLS setup failed: {source}")]
    Tls { source: rustls::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Accepts connections forever (errors on single connections are logged).
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, svc: Arc<CaService>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let svc = svc.clone();
                async move { Ok::<_, Infallible>(svc.route(peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "connection error"),
                Err(_) => debug!(%peer, "connection closed after {CONNECTION_TIMEOUT:?}"),
            }
        });
    }
}
