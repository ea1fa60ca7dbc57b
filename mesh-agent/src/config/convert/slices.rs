//! Kubernetes mode's endpoints: EndpointSlices (`discovery.k8s.io/v1`) joined to their
//! Service by the `kubernetes.io/service-name` label and to its ports by port name, as
//! kube-proxy does. The slices carry the resolved target port and readiness, so named
//! `targetPort`s and selector-less Services need nothing from the pods.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::debug;

use super::super::model::{self, Endpoint, ObjectRef};
use super::{Problem, Problems, SERVICE_NAME_LABEL, done, object_ref, port_number, tcp};

/// One endpoint of a slice.
#[derive(Clone, Debug)]
pub(super) struct SliceEndpoint {
    ip: Ipv4Addr,
    ready: bool,
    pod: Option<ObjectRef>,
    node: Option<String>,
}

/// The parts of an EndpointSlice the model uses.
#[derive(Clone, Debug)]
pub(super) struct Slice {
    pub id: ObjectRef,
    service: ObjectRef,
    /// (port name, port number), TCP only.
    ports: Vec<(Option<String>, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

/// Converts a slice; `Ok(None)` for slices the mesh does not use: IPv6 or FQDN address
/// types, and slices no Service owns (no `kubernetes.io/service-name` label).
pub(super) fn convert(s: &EndpointSlice) -> Result<Option<Slice>, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&s.metadata, &mut problems);
    if s.address_type != "IPv4" {
        debug!(slice = %id, address_type = %s.address_type, "ignoring a non-IPv4 EndpointSlice");
        return Ok(None);
    }
    let labels = s.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        debug!(slice = %id, "ignoring an EndpointSlice without {SERVICE_NAME_LABEL}");
        return Ok(None);
    };
    let service = ObjectRef {
        namespace: id.namespace.clone(),
        name: service.clone(),
    };
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().flatten().enumerate() {
        // No port number means "all ports" (only for selector-less slices); nothing to map.
        let Some(n) = p.port else { continue };
        let port = port_number(n, || format!("ports[{i}].port"), &mut problems);
        if tcp(&p.protocol) {
            ports.push((p.name.clone().filter(|n| !n.is_empty()), port));
        }
    }
    let mut endpoints = Vec::new();
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        // Kubernetes: "nil should be interpreted as ready".
        let ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"));
        let pod = pod.and_then(|r| {
            let name = r.name.clone()?;
            let namespace = r.namespace.clone().unwrap_or_else(|| id.namespace.clone());
            Some(ObjectRef { namespace, name })
        });
        // Every address of an IPv4 slice is one IP of the same endpoint; the first is used.
        let Some(addr) = e.addresses.first() else {
            continue;
        };
        match addr.parse() {
            Ok(ip) => endpoints.push(SliceEndpoint {
                ip,
                ready,
                pod,
                node: e.node_name.clone().filter(|n| !n.is_empty()),
            }),
            Err(_) => problems.invalid(
                format!("endpoints[{i}].addresses[0]"),
                format!("{addr:?} is not an IPv4 address"),
            ),
        }
    }
    let slice = Slice {
        id,
        service,
        ports,
        endpoints,
    };
    done(Some(slice), problems)
}

/// Fills every Service's endpoints from its slices: per service port, the ready endpoints of
/// the slice port with the same name, each address once (an endpoint may briefly be in two
/// slices while the controller moves it), sorted by pod then address.
pub(super) fn apply(services: &mut BTreeMap<ObjectRef, model::Service>, slices: &[Slice]) {
    for slice in slices {
        if !services.contains_key(&slice.service) {
            debug!(slice = %slice.id, service = %slice.service, "EndpointSlice of an unknown Service");
        }
    }
    for svc in services.values_mut() {
        let mine: Vec<&Slice> = slices.iter().filter(|s| s.service == svc.id).collect();
        svc.endpoints = svc
            .ports
            .iter()
            .map(|port| {
                let mut seen = HashSet::new();
                let mut eps: Vec<Endpoint> = mine
                    .iter()
                    .flat_map(|s| {
                        let number = s.ports.iter().find(|(name, _)| *name == port.name);
                        number.into_iter().flat_map(|(_, n)| {
                            s.endpoints.iter().filter(|e| e.ready).map(|e| Endpoint {
                                pod: e.pod.clone(),
                                addr: SocketAddrV4::new(e.ip, *n),
                                node: e.node.clone(),
                            })
                        })
                    })
                    .filter(|e| seen.insert(e.addr))
                    .collect();
                eps.sort_by(|a, b| (&a.pod, a.addr).cmp(&(&b.pod, b.addr)));
                eps
            })
            .collect();
    }
}
