//! HTTP/2 connections to meshed pods shared by all client connections: requests from one pod
//! to one meshed pod travel as streams of one HTTP/2 connection inside one HBONE tunnel, and
//! the destination agent, which parses every request anyway, speaks to the app in the
//! protocol its port declares. A keep-alive client connection then holds no upstream
//! connection of its own while idle, and a burst of client connections opens no tunnels.
//!
//! The connections are kept per data-path worker thread (a thread-local map), so finding one
//! takes no lock: each worker opens its own, at most one per (source pod, destination pod,
//! port, identities) and thread. A connection unused for [`IDLE`] (or the DestinationRule's
//! `connectionPool.http.idleTimeout`) is let go (closed once its last stream ends): when a
//! later request looks for it, or when the thread's next lookup sweeps the map.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

use super::upstream::{UpBody, UpstreamError, UpstreamIo};
use crate::identity::Identity;
use crate::proxy::hbone::{CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::proxy::outbound::Hbone;

/// How long an unused shared connection is kept.
const IDLE: Duration = Duration::from_secs(60);
/// How often a thread looks for idle connections (on its next lookup).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Who talks to whom: a pod IP may be reused by another pod, so identities are part of it.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Ipv4Addr,
    source_identity: Arc<Identity>,
    destination: SocketAddrV4,
    destination_identity: Arc<Identity>,
}

struct Entry {
    sender: http2::SendRequest<UpBody>,
    used: Instant,
    /// Unused this long, it is let go.
    idle: Duration,
}

impl Entry {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.used) < self.idle
    }
}

#[derive(Default)]
struct Shared {
    conns: HashMap<Key, Entry>,
    swept: Option<Instant>,
}

thread_local! {
    static SHARED: RefCell<Shared> = RefCell::new(Shared::default());
}

/// A sender on the shared connection from `source` (through its pod's HBONE pool) to
/// `destination`, which must prove `identity`; opened if this thread has none.
pub async fn get(
    hbone: &Hbone,
    source: Ipv4Addr,
    destination: SocketAddrV4,
    identity: &Arc<Identity>,
    idle_timeout: Option<Duration>,
    connect_timeout: Duration,
) -> Result<http2::SendRequest<UpBody>, UpstreamError> {
    let idle = idle_timeout.unwrap_or(IDLE);
    let key = Key {
        source,
        source_identity: hbone.identity.clone(),
        destination,
        destination_identity: identity.clone(),
    };
    if let Some(s) = SHARED.with(|s| s.borrow_mut().find(&key, idle)) {
        return Ok(s);
    }
    // Boxed, here only: connecting is a future of kilobytes (the tunnel's TLS handshake),
    // which every request's future would otherwise carry and move.
    Box::pin(open(hbone, key, idle, connect_timeout)).await
}

/// Opens the shared connection for `key` and adds it to this thread's map.
async fn open(
    hbone: &Hbone,
    key: Key,
    idle: Duration,
    connect_timeout: Duration,
) -> Result<http2::SendRequest<UpBody>, UpstreamError> {
    let (source, destination) = (key.source, key.destination);
    let tunnel = super::upstream::hbone_connect(
        hbone,
        &key.destination_identity,
        destination,
        connect_timeout,
    )
    .await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .handshake(UpstreamIo::Hbone(Box::new(tunnel)))
        .await
        .map_err(|source| UpstreamError::Handshake {
            addr: destination,
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%source, upstream = %destination, error = %e, "shared upstream HTTP/2 connection ended");
        }
    });
    // After the awaits this may be another worker thread: the connection joins its map.
    SHARED.with(|s| {
        s.borrow_mut().conns.insert(
            key,
            Entry {
                sender: sender.clone(),
                used: Instant::now(),
                idle,
            },
        )
    });
    Ok(sender)
}

impl Shared {
    /// The connection for `key` if it is still usable; `idle` is the idle timeout in force
    /// for it now (the DestinationRule may have changed).
    fn find(&mut self, key: &Key, idle: Duration) -> Option<http2::SendRequest<UpBody>> {
        let now = Instant::now();
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            self.swept = Some(now);
            self.conns.retain(|_, e| e.usable(now));
        }
        let entry = self.conns.get_mut(key)?;
        entry.idle = idle;
        if !entry.usable(now) {
            self.conns.remove(key);
            return None;
        }
        entry.used = now;
        Some(entry.sender.clone())
    }
}
