//! The source side of HBONE: tunnels from one enrolled pod, pooled per (destination identity,
//! destination pod IP). The pool belongs to one pod, so its TLS connections all leave from
//! that pod's namespace and show its IP on the wire; the source identity is the pod's.
//!
//! A stream takes a pooled connection with room (fewer than `max_streams` streams), else
//! opens one; opening is serialised per key so a burst of new connections shares one
//! handshake instead of racing many. The map lock is held only to find or insert an entry.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::stream::H2Stream;
use super::{
    CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, PoolSettings, SEND_BUFFER,
    STREAM_WINDOW, tls,
};
use crate::capture::netns::SocketSource;
use crate::identity::{CertHandle, Identity};
use mesh_common::ports;

/// Why a tunnel could not be opened. Each names the destination it was for.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("TCP connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error(
        "mTLS handshake with {addr} (expecting {expected}) failed: {}",
        tls_reason(source)
    )]
    Tls {
        addr: SocketAddrV4,
        expected: Identity,
        source: io::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    H2 {
        addr: SocketAddrV4,
        source: h2::Error,
    },
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddrV4, after: Duration },
    #[error("CONNECT {target} via {addr} failed: {source}")]
    Request {
        addr: SocketAddrV4,
        target: SocketAddrV4,
        source: h2::Error,
    },
    #[error("CONNECT {target} refused by the destination agent: {status} {reason}")]
    Refused {
        target: SocketAddrV4,
        status: StatusCode,
        reason: String,
    },
    #[error("cannot build the TLS client config: {0}")]
    Config(#[from] rustls::Error),
}

/// rustls wraps our own verifier errors in Debug output; show their message instead.
fn tls_reason(e: &io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) = inner {
        return format!("invalid peer certificate: {}", o.0);
    }
    e.to_string()
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    identity: Arc<Identity>,
    ip: Ipv4Addr,
}

/// One TLS + HTTP/2 connection.
struct Conn {
    send: SendRequest<Bytes>,
    /// Set by the connection's task when it ends.
    closed: Arc<AtomicBool>,
    streams: AtomicUsize,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since: AtomicU64,
}

/// The connections to one (identity, IP).
struct KeyPool {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Serialises opening new connections for this key.
    opening: tokio::sync::Mutex<()>,
}

/// Counters of a pool, for the admin API and tests.
#[derive(Debug, Default, Serialize)]
pub struct PoolStats {
    /// TLS connections opened since the pod was enrolled.
    pub connections_opened: AtomicU64,
    /// TLS connections open now.
    pub connections_open: AtomicU64,
    /// CONNECT streams opened.
    pub streams_opened: AtomicU64,
    /// Handshake or tunnel failures.
    pub errors: AtomicU64,
}

/// Everything a pod's pool needs, passed explicitly.
pub struct PoolInputs {
    pub source: CertHandle,
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<CryptoProvider>,
    pub sockets: SocketSource,
    pub settings: PoolSettings,
}

pub struct Pool {
    inputs: PoolInputs,
    keys: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    epoch: Instant,
    pub stats: Arc<PoolStats>,
}

/// An open tunnel. Dropping it ends the stream and returns its slot to the connection.
pub struct Tunnel {
    pub io: H2Stream,
    _slot: StreamSlot,
}

/// A tunnel as a byte stream (its slot goes with it): what an HTTP connection inside it
/// reads and writes.
impl tokio::io::AsyncRead for Tunnel {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tunnel {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

struct StreamSlot {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn
            .idle_since
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The first 256 bytes of a refusal's body, as text.
async fn refusal_reason(recv: &mut h2::RecvStream) -> String {
    let mut body = Vec::new();
    while body.len() < 256 {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let _ = recv.flow_control().release_capacity(chunk.len());
                body.extend_from_slice(&chunk);
            }
            _ => break,
        }
    }
    body.truncate(256);
    String::from_utf8_lossy(&body).into_owned()
}

impl Pool {
    /// A pool and its reaper task (on the current runtime), which closes idle connections
    /// and ends when the pool is dropped.
    pub fn start(inputs: PoolInputs) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            inputs,
            keys: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            stats: Arc::new(PoolStats::default()),
        });
        let period = (pool.inputs.settings.idle_timeout / 2).max(Duration::from_millis(250));
        tokio::spawn(reap(Arc::downgrade(&pool), period));
        pool
    }

    /// Opens a CONNECT stream to `target` (a pod IP and port) at the agent of the pod,
    /// which must prove `identity`.
    /// [`connect`](Self::connect) bounded by `within` (a DestinationRule's `connectTimeout`):
    /// past it, [`HboneError::Timeout`].
    pub async fn connect_within(
        &self,
        identity: &Arc<Identity>,
        target: SocketAddrV4,
        within: Duration,
    ) -> Result<Tunnel, HboneError> {
        tokio::time::timeout(within, self.connect(identity, target))
            .await
            .unwrap_or(Err(HboneError::Timeout {
                addr: target,
                after: within,
            }))
    }

    pub async fn connect(
        &self,
        identity: &Arc<Identity>,
        target: SocketAddrV4,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            identity: identity.clone(),
            ip: *target.ip(),
        };
        let keypool = {
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(KeyPool {
                        conns: Mutex::new(Vec::new()),
                        opening: tokio::sync::Mutex::new(()),
                    })
                })
                .clone()
        };
        let conn = match self.checkout(&keypool) {
            Some(c) => c,
            None => {
                let _opening = keypool.opening.lock().await;
                match self.checkout(&keypool) {
                    Some(c) => c,
                    None => {
                        let conn = self.open(&key).await.inspect_err(|_| {
                            self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        })?;
                        conn.streams.fetch_add(1, Ordering::AcqRel);
                        keypool
                            .conns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(conn.clone());
                        conn
                    }
                }
            }
        };
        let slot = StreamSlot {
            conn: conn.clone(),
            epoch: self.epoch,
        };
        let result = self.request(&conn, target).await;
        if result.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let io = result?;
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Tunnel { io, _slot: slot })
    }

    /// A live connection of `keypool` with room for one more stream, which it reserves.
    fn checkout(&self, keypool: &KeyPool) -> Option<Arc<Conn>> {
        let max = self.inputs.settings.max_streams.max(1);
        let mut conns = keypool.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.is_closed());
        for c in conns.iter() {
            let n = c.streams.load(Ordering::Acquire);
            if n < max
                && c.streams
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(c.clone());
            }
        }
        None
    }

    async fn open(&self, key: &PoolKey) -> Result<Arc<Conn>, HboneError> {
        let addr = SocketAddrV4::new(key.ip, ports::INBOUND_HBONE);
        let timeout = self.inputs.settings.connect_timeout;
        match tokio::time::timeout(timeout, self.handshake(key, addr)).await {
            Ok(r) => r,
            Err(_) => Err(HboneError::Timeout {
                addr,
                after: timeout,
            }),
        }
    }

    async fn handshake(&self, key: &PoolKey, addr: SocketAddrV4) -> Result<Arc<Conn>, HboneError> {
        let socket = self
            .inputs
            .sockets
            .socket()
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let tcp = socket
            .connect(addr.into())
            .await
            .map_err(|source| HboneError::Connect { addr, source })?;
        let cfg = tls::client_config(
            self.inputs.source.clone(),
            (*key.identity).clone(),
            self.inputs.roots.clone(),
            self.inputs.provider.clone(),
        )?;
        let tls = TlsConnector::from(cfg)
            .connect(
                ServerName::IpAddress(std::net::IpAddr::V4(key.ip).into()),
                tcp,
            )
            .await
            .map_err(|source| HboneError::Tls {
                addr,
                expected: (*key.identity).clone(),
                source,
            })?;
        // hyper's client defaults where they matter (server push off, 16 KiB of headers),
        // with the HBONE windows and send buffer.
        let (send, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(SEND_BUFFER)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| HboneError::H2 { addr, source })?;
        let stats = self.stats.clone();
        stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let identity = key.identity.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(super::after_ready(async move {
            if let Err(e) = conn.await {
                debug!(%addr, %identity, error = %e, "HBONE connection ended with an error");
            }
            ended.store(true, Ordering::Release);
            stats.connections_open.fetch_sub(1, Ordering::Relaxed);
        }));
        info!(%addr, identity = %key.identity, "HBONE connection opened");
        Ok(Arc::new(Conn {
            send,
            closed,
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
        }))
    }

    async fn request(&self, conn: &Conn, target: SocketAddrV4) -> Result<H2Stream, HboneError> {
        let addr = SocketAddrV4::new(*target.ip(), ports::INBOUND_HBONE);
        let failed = |source| HboneError::Request {
            addr,
            target,
            source,
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| HboneError::Refused {
                target,
                status: StatusCode::BAD_REQUEST,
                reason: e.to_string(),
            })?;
        // `ready` waits while the peer's limit of concurrent streams is reached.
        let mut send = conn.send.clone().ready().await.map_err(failed)?;
        let (resp, send) = send.send_request(req, false).map_err(failed)?;
        let resp = resp.await.map_err(failed)?;
        let status = resp.status();
        let mut recv = resp.into_body();
        if status != StatusCode::OK {
            // The reason is a short text body; read at most a little of it.
            let reason = tokio::time::timeout(Duration::from_secs(1), refusal_reason(&mut recv))
                .await
                .unwrap_or_default();
            return Err(HboneError::Refused {
                target,
                status,
                reason,
            });
        }
        Ok(H2Stream::new(send, recv))
    }

    /// Closes connections idle past the timeout and forgets dead ones.
    fn reap_once(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let idle = self.inputs.settings.idle_timeout.as_millis() as u64;
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, kp| {
            let mut conns = kp.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|c| {
                !c.is_closed()
                    && (c.streams.load(Ordering::Acquire) > 0
                        || now.saturating_sub(c.idle_since.load(Ordering::Relaxed)) < idle)
            });
            !conns.is_empty()
        });
    }
}

async fn reap(pool: Weak<Pool>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.reap_once();
    }
}
