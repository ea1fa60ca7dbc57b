//! The connections open right now, for `/connections` and `mesh-agent connections`.
//!
//! A connection registers once its upstream is known and is removed when its guard drops.
//! The table is sharded by connection id: a connection takes one shard's lock twice in its
//! life (insert, remove), for O(1) work, so connections on different data-path threads
//! rarely meet on a lock and never hold one while moving bytes. Byte counts are the
//! connection's own atomics, which the relay bumps per chunk and the admin API reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::model::ObjectRef;
use crate::identity::Identity;

const SHARDS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From an enrolled pod, captured by the eBPF programs.
    Outbound,
    /// To an enrolled pod: over HBONE (15008) or plaintext (15006).
    Inbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// Inside a mutual-TLS HTTP/2 CONNECT tunnel between agents.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Plain TCP (a destination outside the mesh, or plaintext inbound).
    #[serde(rename = "TCP")]
    Tcp,
    /// Served as HTTP by the client's agent: each request routed on its own (the upstream
    /// shown is the Service address; bytes are request and response bodies).
    #[serde(rename = "HTTP")]
    Http,
}

/// Bytes moved so far, each way.
#[derive(Debug, Default)]
pub struct Progress {
    /// From the client towards the upstream (Istio's "received").
    pub received: AtomicU64,
    /// From the upstream back to the client.
    pub sent: AtomicU64,
}

/// One open connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub pod: Arc<ObjectRef>,
    pub direction: Direction,
    pub protocol: Protocol,
    pub client: SocketAddr,
    /// Where the client was going (the original destination; the pod's own address inbound).
    pub destination: SocketAddr,
    /// Where the agent sent it (the chosen endpoint; the app inbound).
    pub upstream: SocketAddr,
    /// The identity the other agent proved (inbound) or must prove (outbound), over HBONE.
    pub peer_identity: Option<Arc<Identity>>,
    pub started: SystemTime,
    pub progress: Progress,
    /// Inbound connections relayed as TCP, which AuthorizationPolicy admitted as a whole:
    /// notified when a configuration change refuses them now, to close them
    /// ([`ConnectionTable::revocable`]). `None` for the rest (outbound; HTTP, whose requests
    /// are each checked).
    pub revoke: Option<tokio::sync::Notify>,
    /// The request metrics this connection's last HTTP request reported into.
    pub last_series: crate::telemetry::metrics::LastSeries,
}

/// What `/connections` answers, one per open connection.
#[derive(Debug, Serialize)]
pub struct ConnView {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub client: String,
    pub destination: String,
    pub upstream: String,
    pub peer_identity: Option<String>,
    /// RFC 3339, seconds.
    pub started: String,
    pub age_seconds: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

#[derive(Debug)]
pub struct ConnectionTable {
    shards: [Mutex<HashMap<u64, Arc<ConnInfo>>>; SHARDS],
    next_id: AtomicU64,
}

impl Default for ConnectionTable {
    fn default() -> Self {
        ConnectionTable {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
        }
    }
}

/// Keeps a connection listed; dropping it removes the entry.
#[derive(Debug)]
pub struct Registered {
    table: Arc<ConnectionTable>,
    id: u64,
    pub info: Arc<ConnInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table
            .shard(self.id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl ConnectionTable {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<ConnInfo>>> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    pub fn register(self: &Arc<Self>, info: ConnInfo) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(info);
        self.shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, info.clone());
        Registered {
            table: self.clone(),
            id,
            info,
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// The connections that a policy change can close ([`ConnInfo::revoke`]).
    pub fn revocable(&self) -> Vec<Arc<ConnInfo>> {
        let mut out = Vec::new();
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(shard.values().filter(|c| c.revoke.is_some()).cloned());
        }
        out
    }

    /// How many connections are open, (outbound, inbound).
    pub fn counts(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(PoisonError::into_inner);
            for c in shard.values() {
                match c.direction {
                    Direction::Outbound => counts.0 += 1,
                    Direction::Inbound => counts.1 += 1,
                }
            }
        }
        counts
    }

    /// The open connections, oldest first.
    pub fn view(&self) -> Vec<ConnView> {
        let now = SystemTime::now();
        let mut all: Vec<(u64, Arc<ConnInfo>)> = Vec::new();
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.iter().map(|(id, c)| (*id, c.clone())));
        }
        all.sort_by_key(|(id, c)| (c.started, *id));
        all.into_iter()
            .map(|(id, c)| ConnView {
                id,
                pod: c.pod.to_string(),
                direction: c.direction,
                protocol: c.protocol,
                client: c.client.to_string(),
                destination: c.destination.to_string(),
                upstream: c.upstream.to_string(),
                peer_identity: c.peer_identity.as_ref().map(|i| i.to_string()),
                started: humantime::format_rfc3339_seconds(c.started).to_string(),
                age_seconds: now.duration_since(c.started).map_or(0, |d| d.as_secs()),
                bytes_received: c.progress.received.load(Ordering::Relaxed),
                bytes_sent: c.progress.sent.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16) -> ConnInfo {
        ConnInfo {
            pod: Arc::new(ObjectRef {
                namespace: "default".into(),
                name: "client".into(),
            }),
            direction: Direction::Outbound,
            protocol: Protocol::Hbone,
            client: SocketAddr::from(([10, 244, 1, 2], port)),
            destination: SocketAddr::from(([10, 96, 0, 10], 80)),
            upstream: SocketAddr::from(([10, 244, 2, 2], 8080)),
            peer_identity: None,
            started: SystemTime::now(),
            progress: Progress::default(),
            revoke: None,
            last_series: Default::default(),
        }
    }

    #[test]
    fn guards_list_and_unlist_connections() {
        let table = Arc::new(ConnectionTable::default());
        let guards: Vec<Registered> = (0..40).map(|i| table.register(info(40000 + i))).collect();
        assert_eq!(table.len(), 40);
        guards[3]
            .info
            .progress
            .sent
            .fetch_add(512, Ordering::Relaxed);
        let view = table.view();
        assert_eq!(view.len(), 40);
        let v = view
            .iter()
            .find(|v| v.client == "10.244.1.2:40003")
            .unwrap();
        assert_eq!((v.bytes_sent, v.bytes_received), (512, 0));
        drop(guards);
        assert_eq!(table.len(), 0);
        assert!(table.view().is_empty());
    }
}
