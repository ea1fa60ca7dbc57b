//! The Services as the data path sees them, for `/services` and `mesh-agent services`: per
//! port, the protocol the agent selected, the DestinationRule's subsets, and every ready
//! endpoint with its pod, node, the subsets it belongs to and its outlier-detection health.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddrV4;
use std::sync::Arc;

use serde::Serialize;

use super::{Backend, Compiler, EndpointState};
use crate::config::model::{Pod, Service, TargetPort};
use crate::config::routing::{DestinationRule, service_fqdn};
use crate::proxy::RouteTable;
use crate::proxy::protocol::AppProtocol;

#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// `namespace/name`.
    pub service: String,
    pub cluster_ip: Option<String>,
    /// `namespace/name` of the DestinationRule in force for the Service's host.
    pub destination_rule: Option<String>,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Serialize)]
pub struct PortView {
    pub name: Option<String>,
    pub port: u16,
    /// A number, or the container port's name.
    pub target_port: String,
    /// How the agent proxies the port: `http`, `http2`, `grpc` per request, `tcp` per
    /// connection, `auto` by sniffing (see `proxy::protocol`).
    pub protocol: &'static str,
    pub subsets: Vec<SubsetView>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Serialize)]
pub struct SubsetView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Ready endpoints whose pod has the subset's labels.
    pub endpoints: usize,
    /// Those of them outlier detection has not ejected.
    pub healthy: usize,
}

#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub address: String,
    /// `namespace/name`; none for endpoints that are not pods.
    pub pod: Option<String>,
    pub node: Option<String>,
    /// The subsets (of the port's DestinationRule) the pod's labels select it for.
    pub subsets: Vec<String>,
    /// `healthy`, or `ejected` by outlier detection (for any subset the endpoint serves).
    pub health: &'static str,
    /// Milliseconds the ejection still lasts.
    pub ejected_for_ms: Option<u64>,
    /// Requests in flight to it from this agent.
    pub in_flight: u32,
}

/// Every Service of the table's snapshot, sorted by namespace and name.
pub fn services(table: &RouteTable) -> Vec<ServiceView> {
    let snap = &table.snapshot;
    let compiler = Compiler::new(snap, &table.backends);
    // The states the data path keeps per (Service, port): an endpoint appears once per
    // backend (the Service's and each subset's) that requests were routed to.
    let mut states: HashMap<(&crate::config::model::ObjectRef, u16), Vec<&Arc<Backend>>> =
        HashMap::new();
    for ((svc, port, _), backend) in &table.backends {
        states.entry((svc, *port)).or_default().push(backend);
    }
    snap.services
        .values()
        .map(|svc| {
            let dr = compiler.destination_rule(svc, &service_fqdn(&svc.id));
            let ports = svc
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let backends = states
                        .get(&(&svc.id, p.port))
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    port_view(
                        svc,
                        i,
                        AppProtocol::of(p).name(),
                        dr.map(Arc::as_ref),
                        backends,
                        &|ep| ep.pod.as_ref().and_then(|id| snap.pods.get(id)),
                    )
                })
                .collect();
            ServiceView {
                service: svc.id.to_string(),
                cluster_ip: svc.cluster_ip.map(|ip| ip.to_string()),
                destination_rule: dr.map(|d| d.id.to_string()),
                ports,
            }
        })
        .collect()
}

fn port_view<'p>(
    svc: &Service,
    index: usize,
    protocol: &'static str,
    dr: Option<&DestinationRule>,
    backends: &[&Arc<Backend>],
    pod_of: &dyn Fn(&crate::config::model::Endpoint) -> Option<&'p Pod>,
) -> PortView {
    let p = &svc.ports[index];
    let subsets = dr.map(|d| d.subsets.as_slice()).unwrap_or_default();
    let state_of = |addr: SocketAddrV4| -> Vec<&Arc<EndpointState>> {
        backends
            .iter()
            .flat_map(|b| b.endpoints.iter())
            .filter(|(e, _)| e.addr == addr)
            .map(|(_, s)| s)
            .collect()
    };
    let endpoints: Vec<EndpointView> = svc
        .endpoints
        .get(index)
        .into_iter()
        .flatten()
        .map(|ep| {
            let pod = pod_of(ep);
            let member: Vec<String> = subsets
                .iter()
                .filter(|s| pod.is_some_and(|p| p.has_labels(&s.labels)))
                .map(|s| s.name.clone())
                .collect();
            let states = state_of(ep.addr);
            let ejected_for = states.iter().filter_map(|s| s.ejected_for()).max();
            EndpointView {
                address: ep.addr.to_string(),
                pod: ep.pod.as_ref().map(ToString::to_string),
                node: ep.node.clone(),
                subsets: member,
                health: if ejected_for.is_some() {
                    "ejected"
                } else {
                    "healthy"
                },
                ejected_for_ms: ejected_for.map(|d| d.as_millis() as u64),
                in_flight: states
                    .iter()
                    .map(|s| s.active.load(std::sync::atomic::Ordering::Relaxed))
                    .sum(),
            }
        })
        .collect();
    let subsets = subsets
        .iter()
        .map(|s| {
            let members = endpoints.iter().filter(|e| e.subsets.contains(&s.name));
            SubsetView {
                name: s.name.clone(),
                labels: s.labels.clone(),
                endpoints: members.clone().count(),
                healthy: members.filter(|e| e.health == "healthy").count(),
            }
        })
        .collect();
    PortView {
        name: p.name.clone(),
        port: p.port,
        target_port: match &p.target_port {
            TargetPort::Number(n) => n.to_string(),
            TargetPort::Name(n) => n.clone(),
        },
        protocol,
        subsets,
        endpoints,
    }
}
