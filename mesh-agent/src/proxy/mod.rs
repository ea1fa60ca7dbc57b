//! The data path. What flows through it: captured outbound connections (`outbound`).
//!
//! The data path reads configuration only through [`RouteTable`], an immutable table rebuilt
//! by the control plane for each config snapshot and published with `ArcSwap`: a connection
//! loads it without taking a lock.

pub mod outbound;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::model::{Endpoint, ObjectRef, Snapshot};

/// Counters of one service, kept across config changes.
#[derive(Debug, Default, Serialize)]
pub struct ServiceStats {
    pub connections: AtomicU64,
    pub connect_errors: AtomicU64,
    pub no_endpoints: AtomicU64,
}

/// One Service port as the data path sees it.
#[derive(Debug)]
pub struct ServiceRoute {
    pub service: ObjectRef,
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    pub stats: Arc<ServiceStats>,
}

impl ServiceRoute {
    /// Round-robin over the ready endpoints.
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

/// Where a connection to an original destination goes.
#[derive(Debug)]
pub enum Target<'a> {
    /// A Service ClusterIP:port, balanced over its endpoints.
    Service(&'a ServiceRoute),
    /// A known pod's IP.
    Pod(&'a ObjectRef),
    /// Anything else: passed through unchanged.
    Passthrough,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    pub generation: u64,
    services: HashMap<SocketAddrV4, Arc<ServiceRoute>>,
    pods: HashMap<Ipv4Addr, ObjectRef>,
}

impl RouteTable {
    /// Builds the table for `snap`, carrying service counters over from `prev`.
    pub fn build(snap: &Snapshot, prev: &RouteTable) -> RouteTable {
        let mut services = HashMap::new();
        for svc in snap.services.values() {
            let Some(ip) = svc.cluster_ip else { continue };
            let stats = prev
                .services
                .values()
                .find(|r| r.service == svc.id)
                .map(|r| r.stats.clone())
                .unwrap_or_default();
            for (i, port) in svc.ports.iter().enumerate() {
                let endpoints = svc.endpoints.get(i).cloned().unwrap_or_default();
                services.insert(
                    SocketAddrV4::new(ip, port.port),
                    Arc::new(ServiceRoute {
                        service: svc.id.clone(),
                        endpoints,
                        next: AtomicUsize::new(0),
                        stats: stats.clone(),
                    }),
                );
            }
        }
        let pods = snap
            .pods
            .values()
            .filter_map(|p| p.ip.map(|ip| (ip, p.id.clone())))
            .collect();
        RouteTable {
            generation: snap.generation,
            services,
            pods,
        }
    }

    pub fn target(&self, dst: SocketAddrV4) -> Target<'_> {
        if let Some(route) = self.services.get(&dst) {
            return Target::Service(route);
        }
        if let Some(pod) = self.pods.get(dst.ip()) {
            return Target::Pod(pod);
        }
        Target::Passthrough
    }

    /// Per-service counters, for the admin API.
    pub fn service_stats(&self) -> Vec<(ObjectRef, Arc<ServiceStats>)> {
        let mut out: Vec<_> = self
            .services
            .values()
            .map(|r| (r.service.clone(), r.stats.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

/// Counters of the whole agent.
#[derive(Debug, Default, Serialize)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub connect_errors: AtomicU64,
    pub no_orig_dst: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// Counters of one enrolled workload.
#[derive(Debug, Default, Serialize)]
pub struct WorkloadStats {
    pub outbound_connections: AtomicU64,
    pub outbound_active: AtomicU64,
    pub outbound_errors: AtomicU64,
}

/// Everything the data path depends on, passed explicitly.
#[derive(Clone)]
pub struct ProxyInputs {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub stats: Arc<ProxyStats>,
    pub connect_timeout: Duration,
    /// Bytes buffered per direction of a proxied connection.
    pub buffer_size: usize,
}
