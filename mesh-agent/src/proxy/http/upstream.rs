//! Upstream HTTP connections of one client connection, kept per endpoint for the requests
//! that follow: at the source opened inside the client pod's namespace (directly, or as an
//! HBONE tunnel to a meshed pod's agent), at the destination to the app.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use super::body::Counted;
use super::h2_upstream::{H2Sender, UpResp};
use crate::capture::netns::SocketSource;
use crate::config::model::ObjectRef;
use crate::identity::Identity;
use crate::proxy::hbone::pool::Tunnel;
use crate::proxy::outbound::Hbone;

/// Idle HTTP/1.1 connections kept per endpoint and client connection at the source.
const MAX_IDLE_H1: usize = 8;
/// Idle HTTP/1.1 connections to the app kept per inbound tunnel at the destination. One
/// tunnel there may carry the shared HTTP/2 connection of a whole client pod, whose requests
/// in flight each need a connection to an HTTP/1.1 app: with too few kept, every request
/// beyond them opened and closed a connection of its own (a third of the requests/s at 32
/// concurrent requests, and the app's side piling up TIME_WAIT sockets). As Envoy, keep what
/// the peak concurrency opened, up to this many; they go when the tunnel does.
const MAX_IDLE_DELIVERED: usize = 128;

/// A request body: the client's (recorded for a retry, maybe), or one held in memory (a
/// retry's copy, or none).
pub type UpBody =
    Counted<http_body_util::Either<super::replay::Tee, http_body_util::Full<bytes::Bytes>>>;

pub enum Sender {
    /// With the requests sent on it so far (`maxRequestsPerConnection`).
    H1(http1::SendRequest<UpBody>, u32),
    H2(http2::SendRequest<UpBody>),
    /// On a connection to a meshed pod shared by every client connection ([`super::shared`]):
    /// HTTP/2 whatever the app speaks, never kept per client connection.
    Shared(H2Sender),
}

/// Why a request got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

impl Sender {
    /// Whether requests go as HTTP/2 on this connection.
    pub fn h2(&self) -> bool {
        !matches!(self, Sender::H1(..))
    }

    pub async fn send(&mut self, req: Request<UpBody>) -> Result<Response<UpResp>, SendError> {
        let resp = match self {
            Sender::H1(s, used) => {
                s.ready().await?;
                *used += 1;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::Shared(s) => return Ok(s.send(req).await?),
        };
        Ok(resp.map(UpResp::Hyper))
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s, _) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
            Sender::Shared(s) => s.is_closed(),
        }
    }
}

/// Why no upstream connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("TCP connect to {addr} failed: {source}")]
    Tcp {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error("HBONE tunnel to {addr} failed: {source}")]
    Hbone {
        addr: SocketAddrV4,
        source: crate::proxy::hbone::pool::HboneError,
    },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddrV4,
        source: hyper::Error,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    H2Handshake {
        addr: SocketAddrV4,
        source: h2::Error,
    },
    /// Opening a shared connection failed: what every request waiting for it reports.
    #[error(transparent)]
    Shared(Arc<UpstreamError>),
}

/// How upstream connections are opened.
pub enum Connector {
    /// At the source: from inside the client pod's namespace, as an HBONE tunnel to a meshed
    /// pod's agent (given its identity) or plain TCP.
    Source {
        sockets: SocketSource,
        hbone: Option<Hbone>,
        /// The client pod's IP.
        source: std::net::Ipv4Addr,
    },
    /// At the destination: to the app, from inside its pod's namespace with the client's IP
    /// as source. `first` is the connection opened before the client was answered, used
    /// before any new one.
    Deliver {
        sockets: SocketSource,
        client: std::net::Ipv4Addr,
        first: Mutex<Option<TcpStream>>,
    },
}

impl Connector {
    /// Idle HTTP/1.1 connections kept per endpoint.
    fn max_idle(&self) -> usize {
        match self {
            Connector::Source { .. } => MAX_IDLE_H1,
            Connector::Deliver { .. } => MAX_IDLE_DELIVERED,
        }
    }
}

pub struct Upstreams {
    connector: Connector,
    connect_timeout: Duration,
    /// This client connection's upstream connections, by endpoint and protocol (HTTP/2 or
    /// not), with when each was last used. Only its own requests take the lock (several at
    /// once only for an HTTP/2 client), never another connection's.
    idle: Mutex<HashMap<(SocketAddrV4, bool), Vec<Kept>>>,
}

/// A kept upstream connection and when it was last used.
type Kept = (Sender, Instant);

/// The DestinationRule's `connectionPool` settings that shape upstream connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolSettings {
    /// `http.idleTimeout`: a connection without a request for this long is not used again
    /// (and closes).
    pub idle_timeout: Option<Duration>,
    /// `tcp.connectTimeout`, instead of the agent's `--connect-timeout`.
    pub connect_timeout: Option<Duration>,
}

impl PoolSettings {
    pub fn of(pool: &crate::config::routing::ConnectionPool) -> Self {
        PoolSettings {
            idle_timeout: pool.idle_timeout.filter(|t| !t.is_zero()),
            connect_timeout: pool.connect_timeout,
        }
    }
}

impl Upstreams {
    pub fn new(connector: Connector, connect_timeout: Duration) -> Upstreams {
        Upstreams {
            connector,
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// A connection to `addr` ready for a request: for a meshed pod (`identity`) and a
    /// `shareable` request (not an upgrade), the shared HTTP/2 connection; else a kept one
    /// of this client connection, else a new one.
    pub async fn get(
        &self,
        pod: &ObjectRef,
        addr: SocketAddrV4,
        identity: Option<&Arc<Identity>>,
        h2: bool,
        shareable: bool,
        settings: PoolSettings,
    ) -> Result<Sender, UpstreamError> {
        let connect_timeout = settings.connect_timeout.unwrap_or(self.connect_timeout);
        if shareable
            && let (
                Connector::Source {
                    hbone: Some(hbone),
                    source,
                    ..
                },
                Some(id),
            ) = (&self.connector, identity)
        {
            let idle = settings.idle_timeout;
            return super::shared::get(hbone, *source, addr, id, idle, connect_timeout)
                .await
                .map(Sender::Shared);
        }
        if let Some(s) = self.take(addr, h2, settings.idle_timeout) {
            return Ok(s);
        }
        // Boxed, here only: connecting (an HBONE tunnel's TLS handshake) is a future of
        // kilobytes, which every request's future would otherwise carry and move.
        Box::pin(self.open(pod, addr, identity, h2, connect_timeout)).await
    }

    /// A new connection to `addr`, its HTTP handshake done and its task spawned.
    async fn open(
        &self,
        pod: &ObjectRef,
        addr: SocketAddrV4,
        identity: Option<&Arc<Identity>>,
        h2: bool,
        connect_timeout: Duration,
    ) -> Result<Sender, UpstreamError> {
        let io = self.connect(addr, identity, connect_timeout).await?;
        let handshake = |source| UpstreamError::Handshake { addr, source };
        let pod = pod.to_string();
        if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%pod, upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
                }
            });
            Ok(Sender::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(handshake)?;
            tokio::spawn(async move {
                // With upgrades: after a 101 the connection is handed to the relay.
                if let Err(e) = conn.with_upgrades().await {
                    debug!(%pod, upstream = %addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Sender::H1(sender, 0))
        }
    }

    /// A kept connection ready now; those unused for `idle_timeout` are dropped (which
    /// closes them) on the way.
    fn take(&self, addr: SocketAddrV4, h2: bool, idle_timeout: Option<Duration>) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&(addr, h2))?;
        let now = Instant::now();
        let fresh = |used: &Instant| idle_timeout.is_none_or(|t| now.duration_since(*used) < t);
        list.retain(|(s, used)| !s.is_closed() && fresh(used));
        match list.iter().position(|(s, _)| ready_now(s)) {
            // HTTP/2 multiplexes: share the connection.
            Some(i) => match &mut list[i] {
                (Sender::H2(s), used) => {
                    *used = now;
                    Some(Sender::H2(s.clone()))
                }
                (Sender::H1(..) | Sender::Shared(_), _) => Some(list.swap_remove(i).0),
            },
            None => None,
        }
    }

    /// Keeps a connection for later requests (HTTP/1.1: once its response is done, it is
    /// ready again; until then `take` passes it over).
    /// An HTTP/1.1 connection that carried `max_requests` (the DestinationRule's
    /// `maxRequestsPerConnection`) is closed instead.
    pub fn put_back(&self, addr: SocketAddrV4, sender: Sender, max_requests: Option<u32>) {
        if let (Sender::H1(_, used), Some(max)) = (&sender, max_requests)
            && *used >= max
        {
            return;
        }
        if let Sender::Shared(_) = sender {
            return; // kept by the thread's shared map, not by this client connection
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry((addr, sender.h2())).or_default();
        match sender {
            Sender::H2(_) if list.iter().any(|(s, _)| !s.is_closed()) => {}
            s => {
                list.retain(|(s, _)| !s.is_closed());
                if list.len() < self.connector.max_idle() {
                    list.push((s, Instant::now()));
                }
            }
        }
    }

    async fn connect(
        &self,
        addr: SocketAddrV4,
        identity: Option<&Arc<Identity>>,
        connect_timeout: Duration,
    ) -> Result<UpstreamIo, UpstreamError> {
        let tcp = |source| UpstreamError::Tcp { addr, source };
        let sockets = match &self.connector {
            Connector::Source { sockets, hbone, .. } => {
                if let (Some(h), Some(id)) = (hbone, identity) {
                    let tunnel = hbone_connect(h, id, addr, connect_timeout).await?;
                    return Ok(UpstreamIo::Hbone(Box::new(tunnel)));
                }
                sockets
            }
            Connector::Deliver {
                sockets,
                client,
                first,
            } => {
                let kept = first.lock().unwrap_or_else(PoisonError::into_inner).take();
                let stream = match kept {
                    Some(s) => s,
                    None => {
                        crate::proxy::inbound::deliver(sockets, *client, addr, self.connect_timeout)
                            .await
                            .map_err(tcp)?
                    }
                };
                return Ok(UpstreamIo::Tcp(TokioIo::new(stream)));
            }
        };
        let socket = sockets.socket().await.map_err(tcp)?;
        let stream = tokio::time::timeout(connect_timeout, socket.connect(addr.into()))
            .await
            .map_err(|_| {
                tcp(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {connect_timeout:?}"),
                ))
            })?
            .map_err(tcp)?;
        Ok(UpstreamIo::Tcp(TokioIo::new(stream)))
    }
}

/// An HBONE tunnel to `addr` through the pod's pool, within `connect_timeout`.
pub(super) async fn hbone_connect(
    hbone: &Hbone,
    identity: &Arc<Identity>,
    addr: SocketAddrV4,
    connect_timeout: Duration,
) -> Result<Tunnel, UpstreamError> {
    hbone
        .pool
        .connect_within(identity, addr, connect_timeout)
        .await
        .map_err(|source| UpstreamError::Hbone { addr, source })
}

/// Whether a kept connection can take a request right now.
fn ready_now(s: &Sender) -> bool {
    match s {
        Sender::H1(s, _) => s.is_ready(),
        Sender::H2(s) => s.is_ready(),
        Sender::Shared(s) => !s.is_closed(),
    }
}

/// The byte stream under an upstream HTTP connection.
pub enum UpstreamIo {
    Tcp(TokioIo<TcpStream>),
    Hbone(Box<Tunnel>),
}

impl Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Hbone(t) => Read::poll_read(Pin::new(&mut t.io), cx, buf),
        }
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Hbone(t) => Write::poll_write(Pin::new(&mut t.io), cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Hbone(t) => Write::poll_flush(Pin::new(&mut t.io), cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Hbone(t) => Write::poll_shutdown(Pin::new(&mut t.io), cx),
        }
    }
}
