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
//!
//! One request opens a missing connection; the requests that look for it meanwhile wait for
//! that one ([`Slot::Opening`]) instead of each opening its own tunnel, and fail with it if
//! it fails. If the opening request goes away first (its client left), the next waiter opens.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::debug;

use super::h2_upstream::{self, H2Sender};
use super::upstream::UpstreamError;
use crate::identity::Identity;
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
    sender: H2Sender,
    used: Instant,
    /// Unused this long, it is let go.
    idle: Duration,
}

impl Entry {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.used) < self.idle
    }
}

/// What the request opening a connection tells those waiting for it: the sender, or why
/// opening failed (shared, so each waiter reports it).
type Opened = Result<H2Sender, Arc<UpstreamError>>;

enum Slot {
    Ready(Entry),
    /// One request is opening the connection; `None` until it is done.
    Opening(watch::Receiver<Option<Opened>>),
}

/// What a lookup found.
enum Found {
    Ready(H2Sender),
    /// Wait for this opening.
    Wait(watch::Receiver<Option<Opened>>),
    /// Nothing usable: the caller opens, and tells the waiters through this.
    Open(watch::Sender<Option<Opened>>),
}

#[derive(Default)]
struct Shared {
    conns: HashMap<Key, Slot>,
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
) -> Result<H2Sender, UpstreamError> {
    let idle = idle_timeout.unwrap_or(IDLE);
    let key = Key {
        source,
        source_identity: hbone.identity.clone(),
        destination,
        destination_identity: identity.clone(),
    };
    loop {
        let mut opening = match SHARED.with(|s| s.borrow_mut().find(&key, idle)) {
            Found::Ready(sender) => return Ok(sender),
            Found::Open(done) => {
                // Boxed, here only: connecting is a future of kilobytes (the tunnel's TLS
                // handshake), which every request's future would otherwise carry and move.
                let opened = Box::pin(open(hbone, key, idle, connect_timeout)).await;
                return match opened {
                    Ok(sender) => {
                        done.send_replace(Some(Ok(sender.clone())));
                        Ok(sender)
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        done.send_replace(Some(Err(e.clone())));
                        Err(UpstreamError::Shared(e))
                    }
                };
            }
            Found::Wait(opening) => opening,
        };
        // Err: the opening request went away without an answer; look again (and open).
        if let Ok(opened) = opening.wait_for(Option::is_some).await
            && let Some(opened) = opened.as_ref()
        {
            return opened.clone().map_err(UpstreamError::Shared);
        }
    }
}

/// Opens the shared connection for `key` and adds it to this thread's map.
async fn open(
    hbone: &Hbone,
    key: Key,
    idle: Duration,
    connect_timeout: Duration,
) -> Result<H2Sender, UpstreamError> {
    let (source, destination) = (key.source, key.destination);
    let tunnel = super::upstream::hbone_connect(
        hbone,
        &key.destination_identity,
        destination,
        connect_timeout,
    )
    .await?;
    let sender = h2_upstream::handshake(tunnel, move |ended| {
        if let Err(e) = ended {
            debug!(%source, upstream = %destination, error = %e, "shared upstream HTTP/2 connection ended");
        }
    })
    .await
    .map_err(|source| UpstreamError::H2Handshake {
        addr: destination,
        source,
    })?;
    // After the awaits this may be another worker thread: the connection joins its map
    // (and the thread that began opening it takes it from the answer on its next lookup).
    let entry = Entry {
        sender: sender.clone(),
        used: Instant::now(),
        idle,
    };
    SHARED.with(|s| s.borrow_mut().conns.insert(key, Slot::Ready(entry)));
    Ok(sender)
}

/// No answer yet, and the request opening it is still there.
fn under_way(opening: &watch::Receiver<Option<Opened>>) -> bool {
    opening.borrow().is_none() && opening.has_changed().is_ok()
}

impl Shared {
    /// The connection for `key` if it is still usable, or the opening to wait for; else an
    /// opening is recorded for the caller to carry out. `idle` is the idle timeout in force
    /// for it now (the DestinationRule may have changed).
    fn find(&mut self, key: &Key, idle: Duration) -> Found {
        let now = Instant::now();
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY)
        {
            self.swept = Some(now);
            self.conns.retain(|_, slot| match slot {
                Slot::Ready(e) => e.usable(now),
                Slot::Opening(rx) => under_way(rx),
            });
        }
        if let Some(slot) = self.conns.get_mut(key) {
            if let Slot::Opening(rx) = slot {
                if under_way(rx) {
                    return Found::Wait(rx.clone());
                }
                // Opened, maybe on another thread: take it. Failed, or its request went away
                // without an answer: this lookup opens anew.
                let opened = rx.borrow().as_ref().and_then(|a| a.as_ref().ok().cloned());
                if let Some(sender) = opened {
                    *slot = Slot::Ready(Entry {
                        sender,
                        used: now,
                        idle,
                    });
                }
            }
            if let Slot::Ready(entry) = slot {
                entry.idle = idle;
                if entry.usable(now) {
                    entry.used = now;
                    return Found::Ready(entry.sender.clone());
                }
            }
        }
        let (done, rx) = watch::channel(None);
        self.conns.insert(key.clone(), Slot::Opening(rx));
        Found::Open(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        let id =
            |sa: &str| Arc::new(Identity::parse(&format!("spiffe://td/ns/ns/sa/{sa}")).unwrap());
        Key {
            source: Ipv4Addr::new(10, 0, 0, 1),
            source_identity: id("client"),
            destination: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80),
            destination_identity: id("server"),
        }
    }

    fn failed() -> Arc<UpstreamError> {
        Arc::new(UpstreamError::Tcp {
            addr: key().destination,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        })
    }

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn one_lookup_opens_and_the_others_wait_for_it() {
        let mut s = Shared::default();
        let Found::Open(_done) = s.find(&key(), IDLE) else {
            panic!("the first lookup opens");
        };
        for _ in 0..3 {
            assert!(
                matches!(s.find(&key(), IDLE), Found::Wait(_)),
                "later lookups wait"
            );
        }
    }

    #[test]
    fn a_failed_opening_is_reported_to_its_waiters_and_tried_again_later() {
        let mut s = Shared::default();
        let Found::Open(done) = s.find(&key(), IDLE) else {
            panic!("opens");
        };
        let Found::Wait(waiter) = s.find(&key(), IDLE) else {
            panic!("waits");
        };
        done.send_replace(Some(Err(failed())));
        let answer = waiter.borrow().clone();
        assert!(
            matches!(answer, Some(Err(_))),
            "the waiter gets the failure"
        );
        assert!(
            matches!(s.find(&key(), IDLE), Found::Open(_)),
            "the next lookup opens again"
        );
    }

    #[tokio::test]
    async fn an_opener_that_goes_away_hands_the_opening_to_a_waiter() {
        let mut s = Shared::default();
        let Found::Open(done) = s.find(&key(), IDLE) else {
            panic!("opens");
        };
        let Found::Wait(mut waiter) = s.find(&key(), IDLE) else {
            panic!("waits");
        };
        drop(done); // the opening request's client left
        assert!(
            waiter.wait_for(Option::is_some).await.is_err(),
            "woken, no answer"
        );
        let Found::Open(_reopening) = s.find(&key(), IDLE) else {
            panic!("the woken waiter opens");
        };
        assert!(
            matches!(s.find(&key(), IDLE), Found::Wait(_)),
            "and others wait for it"
        );
    }

    #[test]
    fn the_sweep_drops_abandoned_openings() {
        let mut s = Shared::default();
        let Found::Open(done) = s.find(&key(), IDLE) else {
            panic!("opens");
        };
        drop(done);
        s.swept = Some(Instant::now() - SWEEP_EVERY);
        let mut other = key();
        other.destination.set_port(81);
        let _ = s.find(&other, IDLE);
        assert!(!s.conns.contains_key(&key()), "abandoned opening swept");
    }
}
