//! The one conversion from Kubernetes and Istio objects (k8s-openapi types) to the model,
//! shared by both config sources: local mode's manifests directory and Kubernetes mode's
//! watchers. Both hand [`build`] the same typed objects and get the same [`Snapshot`] back,
//! with every problem tied to the object it came from; only what a source does with the
//! problems differs (local mode rejects the whole directory, Kubernetes mode skips the
//! object).
//!
//! Where the two modes must differ, [`Mode`] says so and the reason is written next to it:
//! where a pod's network namespace comes from, and where a Service's endpoints come from.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tracing::debug;

use super::model::{self, ContainerPort, Endpoint, NETNS_ANNOTATION, ObjectRef};
use super::model::{ServicePort, Snapshot, TargetPort};

pub mod authz;
pub mod gateway;
pub mod istio;
pub mod mesh_config;
pub mod routing;

/// Where bare names of the `nodemesh.io/netns` annotation live (`ip netns add NAME`).
pub const NETNS_DIR: &str = "/var/run/netns";
const DEFAULT_NAMESPACE: &str = "default";
/// Label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which source the objects come from; the few rules that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A manifests directory. Pods name their network namespace with the
    /// `nodemesh.io/netns` annotation (the testbed makes the namespaces, nobody else can
    /// write the files), and a Service's endpoints are derived from the pods its selector
    /// matches: there is no EndpointSlice controller.
    Local,
    /// The API server. Pod annotations are written by whoever may create pods, so a hostile
    /// pod could name another pod's namespace: the annotation is ignored and the netns stays
    /// unknown until the node tells us (CNI, `/proc` scan). Endpoints come from
    /// EndpointSlices, as the cluster's controllers computed them (selector-less Services
    /// included). Finished pods (`Succeeded`/`Failed`) are left out: their IP is free for
    /// reuse.
    Kubernetes,
}

/// A typed object for [`build`], borrowed from wherever the source keeps it.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Namespace(&'a k8s::Namespace),
    Pod(&'a k8s::Pod),
    Service(&'a k8s::Service),
    EndpointSlice(&'a EndpointSlice),
    PeerAuthentication(&'a istio::PeerAuthentication),
    AuthorizationPolicy(&'a authz::AuthorizationPolicy),
    VirtualService(&'a routing::VirtualService),
    DestinationRule(&'a routing::DestinationRule),
    Gateway(&'a gateway::Gateway),
    /// A Secret of the manifests (local mode): inspected as a gateway credential, kept only
    /// if a Gateway names it.
    Secret(&'a k8s::Secret),
    /// A credential Secret already inspected (Kubernetes mode reads only the Secrets Gateways
    /// name, and keeps only what they say).
    Credential(&'a crate::config::gateway::Credential),
    /// Only the `istio` ConfigMap of the root namespace matters (MeshConfig).
    ConfigMap(&'a k8s::ConfigMap),
    IstioOperator(&'a mesh_config::IstioOperator),
}

/// One problem with one object (or, in local mode, one file or document).
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("cannot read: {reason}")]
    Unreadable { reason: String },
    /// `message` includes the line and column.
    #[error("YAML syntax error: {message}")]
    Syntax {
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("not a Kubernetes object (expected a mapping with apiVersion and kind)")]
    NotAnObject,
    #[error("field {field}: missing; every Kubernetes object needs apiVersion and kind")]
    MissingTypeMeta { field: &'static str },
    /// The document does not decode as its kind (wrong type, missing required field, ...).
    #[error("field {field}: {reason}")]
    Decode { field: String, reason: String },
    #[error("field {field}: unknown field of {kind} (misspelled or misplaced?)")]
    UnknownField { field: String, kind: &'static str },
    #[error("field {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// `first` names where the first definition is (`FILE document N (...)` in local mode).
    #[error("duplicate {kind} {name}: already defined in {first}")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: String,
    },
    #[error(
        "enrolled pod {pod} has no {NETNS_ANNOTATION} annotation: \
         local mode needs it to find the pod's network namespace"
    )]
    MissingNetns { pod: ObjectRef },
}

impl Problem {
    /// The field the problem is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Problem::Decode { field, .. }
            | Problem::UnknownField { field, .. }
            | Problem::Invalid { field, .. } => Some(field),
            Problem::MissingTypeMeta { field } => Some(field),
            _ => None,
        }
    }
}

/// Validation problems of one object.
pub(super) trait Problems {
    fn invalid(&mut self, field: impl Into<String>, reason: impl Into<String>);
}

impl Problems for Vec<Problem> {
    fn invalid(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.push(invalid(field, reason));
    }
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Problem {
    let (field, reason) = (field.into(), reason.into());
    Problem::Invalid { field, reason }
}

/// An Istio object as written in manifests or served by the API server: the header every
/// Istio kind shares, around its own `spec`.
#[derive(Debug, serde::Deserialize)]
#[serde(bound(deserialize = "S: serde::Deserialize<'de>"))]
pub struct IstioObject<S> {
    // Checked by the dispatch in `parse_document`; declared so they are not unknown fields.
    // Optional: list items from the API server carry neither.
    #[serde(rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(rename = "kind")]
    _kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: Option<S>,
    /// Written by istiod (`kubectl get -o yaml` output); not used.
    #[serde(rename = "status")]
    _status: Option<serde_yaml::Value>,
}

pub(super) fn object_ref(meta: &ObjectMeta, problems: &mut Vec<Problem>) -> ObjectRef {
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let namespace = non_empty(&meta.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let name = non_empty(&meta.name).unwrap_or_else(|| {
        problems.invalid("metadata.name", "missing");
        String::new()
    });
    ObjectRef { namespace, name }
}

pub(super) fn done<T>(value: T, problems: Vec<Problem>) -> Result<T, Vec<Problem>> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(problems)
    }
}

fn convert_namespace(ns: &k8s::Namespace) -> Result<model::Namespace, Vec<Problem>> {
    let mut problems = Vec::new();
    let name = object_ref(&ns.metadata, &mut problems).name;
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    done(model::Namespace { name, labels }, problems)
}

fn port_number(n: i32, field: impl FnOnce() -> String, problems: &mut Vec<Problem>) -> u16 {
    match u16::try_from(n) {
        Ok(p) if p > 0 => p,
        _ => {
            problems.invalid(field(), format!("port {n} is out of range 1..65535"));
            0
        }
    }
}

fn ipv4(value: Option<&str>, field: &str, problems: &mut Vec<Problem>) -> Option<Ipv4Addr> {
    let s = value.filter(|s| !s.is_empty())?;
    let parsed = s.parse().ok();
    if parsed.is_none() {
        problems.invalid(field, format!("{s:?} is not an IPv4 address"));
    }
    parsed
}

/// The `nodemesh.io/netns` annotation: a name under [`NETNS_DIR`] or an absolute path.
pub fn parse_netns(value: &str) -> Result<PathBuf, String> {
    let path = Path::new(value);
    let dots = |c| matches!(c, Component::ParentDir | Component::CurDir);
    if value.is_empty() {
        Err(format!(
            "empty; expected a name under {NETNS_DIR} or an absolute path"
        ))
    } else if value == "." || path.components().any(dots) {
        Err(format!("{value:?} must not contain `..` or `.` components"))
    } else if path.is_absolute() {
        Ok(path.to_path_buf())
    } else if value.contains('/') {
        Err(format!(
            "{value:?} is relative; use a name under {NETNS_DIR} or an absolute path"
        ))
    } else {
        Ok(Path::new(NETNS_DIR).join(value))
    }
}

fn tcp(protocol: &Option<String>) -> bool {
    protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// A pod whose containers have all stopped for good: it keeps `status.podIP`, but the IP
/// may already belong to a new pod.
pub fn finished(pod: &k8s::Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

fn convert_pod(pod: &k8s::Pod, mode: Mode) -> Result<model::Pod, Vec<Problem>> {
    let mut problems = Vec::new();
    let meta = &pod.metadata;
    let id = object_ref(meta, &mut problems);
    let annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(NETNS_ANNOTATION))
        .filter(|_| mode == Mode::Local);
    let netns = annotation.and_then(|v| {
        let field = format!("metadata.annotations[{NETNS_ANNOTATION:?}]");
        parse_netns(v).map_err(|r| problems.invalid(field, r)).ok()
    });
    let Some(spec) = &pod.spec else {
        problems.invalid("spec", "missing; a Pod needs spec.containers");
        return Err(problems);
    };
    // Container ports for named targetPorts: app containers and native sidecars, TCP only.
    let mut ports = Vec::new();
    let sidecars = spec.init_containers.iter().flatten().enumerate();
    let sidecars = sidecars.filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"));
    let sidecars = sidecars.map(|(i, c)| ("initContainers", i, c));
    let containers = spec.containers.iter().enumerate();
    for (list, ci, c) in containers
        .map(|(i, c)| ("containers", i, c))
        .chain(sidecars)
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = || format!("spec.{list}[{ci}].ports[{pi}].containerPort");
            let port = port_number(p.container_port, field, &mut problems);
            let name = p.name.clone().filter(|n| !n.is_empty());
            if tcp(&p.protocol) {
                ports.push(ContainerPort { name, port });
            }
        }
    }
    let status = pod.status.clone().unwrap_or_default();
    let ip = ipv4(status.pod_ip.as_deref(), "status.podIP", &mut problems);
    let ready = match (&status.conditions, &status.phase) {
        (Some(c), _) if !c.is_empty() => c.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        (_, Some(phase)) => phase == "Running",
        // No status at all: local mode, the pod is as ready as its manifest says.
        _ => true,
    };
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    #[allow(deprecated)] // `serviceAccount` is the deprecated alias, still honored by k8s
    let service_account = non_empty(&spec.service_account_name)
        .or_else(|| non_empty(&spec.service_account))
        .unwrap_or_else(|| "default".to_owned());
    let pod = model::Pod {
        id,
        uid: non_empty(&meta.uid),
        labels: meta.labels.clone().unwrap_or_default(),
        node: non_empty(&spec.node_name),
        ip,
        host_network: spec.host_network.unwrap_or(false),
        ready,
        service_account,
        netns,
        ports,
    };
    done(pod, problems)
}

fn convert_service(svc: &k8s::Service, mode: Mode) -> Result<model::Service, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&svc.metadata, &mut problems);
    let spec = svc.spec.clone().unwrap_or_default();
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() && mode == Mode::Local {
        let reason = "missing; local mode derives endpoints from the pods a service selects, \
                      services without a selector are not supported";
        problems.invalid("spec.selector", reason);
    }
    let k8s_ports = spec.ports.unwrap_or_default();
    if k8s_ports.is_empty() {
        problems.invalid("spec.ports", "missing; a service needs at least one port");
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in k8s_ports.into_iter().enumerate() {
        let port = port_number(p.port, || format!("spec.ports[{i}].port"), &mut problems);
        let field = || format!("spec.ports[{i}].targetPort");
        let target_port = match p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(n, field, &mut problems)),
            Some(IntOrString::String(s))
                if s.is_empty() || s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                let reason = format!("{s:?} is neither a port number nor a container port name");
                problems.invalid(field(), reason + " (write numbers without quotes)");
                TargetPort::Number(port)
            }
            Some(IntOrString::String(s)) => TargetPort::Name(s),
        };
        if !tcp(&p.protocol) {
            debug!(service = %id, port, protocol = ?p.protocol, "skipping non-TCP service port");
            continue;
        }
        if port != 0 && ports.iter().any(|q| q.port == port) {
            let reason = format!("duplicate port {port}");
            problems.invalid(format!("spec.ports[{i}].port"), reason);
        }
        let name = p.name.filter(|n| !n.is_empty());
        let app_protocol = p.app_protocol;
        ports.push(ServicePort {
            name,
            port,
            target_port,
            app_protocol,
        });
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => None, // headless
        ip => ipv4(ip, "spec.clusterIP", &mut problems),
    };
    let endpoints = vec![Vec::new(); ports.len()];
    let svc = model::Service {
        id,
        cluster_ip,
        selector,
        ports,
        endpoints,
    };
    done(svc, problems)
}

mod slices;
use slices::Slice;

/// An object converted to the model.
enum Object {
    Namespace(model::Namespace),
    Pod(model::Pod),
    Service(model::Service),
    Slice(Slice),
    PeerAuthentication(model::PeerAuthentication),
    AuthorizationPolicy(crate::config::authz::AuthorizationPolicy),
    VirtualService(crate::config::routing::VirtualService),
    DestinationRule(crate::config::routing::DestinationRule),
    Gateway(crate::config::gateway::Gateway),
    Credential(crate::config::gateway::Credential),
    Mesh(mesh_config::Found),
}

impl Object {
    fn key(&self) -> (&'static str, String) {
        match self {
            Object::Namespace(n) => ("Namespace", n.name.clone()),
            Object::Pod(p) => ("Pod", p.id.to_string()),
            Object::Service(s) => ("Service", s.id.to_string()),
            Object::Slice(s) => ("EndpointSlice", s.id.to_string()),
            Object::PeerAuthentication(p) => ("PeerAuthentication", p.id.to_string()),
            Object::AuthorizationPolicy(p) => ("AuthorizationPolicy", p.id.to_string()),
            Object::VirtualService(v) => ("VirtualService", v.id.to_string()),
            Object::DestinationRule(d) => ("DestinationRule", d.id.to_string()),
            Object::Gateway(g) => ("Gateway", g.id.to_string()),
            Object::Credential(c) => ("Secret", c.id.to_string()),
            Object::Mesh(m) => ("MeshConfig", m.source.clone()),
        }
    }
}

/// Converts one typed object; `Ok(None)` for objects the mode leaves out on purpose.
fn convert(input: Input<'_>, mode: Mode) -> Result<Option<Object>, Vec<Problem>> {
    Ok(Some(match input {
        Input::Namespace(n) => Object::Namespace(convert_namespace(n)?),
        Input::Pod(p) if mode == Mode::Kubernetes && finished(p) => return Ok(None),
        Input::Pod(p) => Object::Pod(convert_pod(p, mode)?),
        Input::Service(s) => Object::Service(convert_service(s, mode)?),
        // Local mode derives endpoints from selectors; slices would be a second truth.
        Input::EndpointSlice(_) if mode == Mode::Local => return Ok(None),
        Input::EndpointSlice(s) => match slices::convert(s)? {
            Some(slice) => Object::Slice(slice),
            None => return Ok(None),
        },
        Input::PeerAuthentication(p) => {
            Object::PeerAuthentication(istio::convert_peer_authentication(p)?)
        }
        Input::AuthorizationPolicy(p) => {
            Object::AuthorizationPolicy(authz::convert_authorization_policy(p)?)
        }
        Input::VirtualService(v) => Object::VirtualService(routing::convert_virtual_service(v)?),
        Input::DestinationRule(d) => Object::DestinationRule(routing::convert_destination_rule(d)?),
        Input::Gateway(g) => Object::Gateway(gateway::convert_gateway(g)?),
        Input::Secret(s) => Object::Credential(gateway::convert_secret(s)?),
        Input::Credential(c) => Object::Credential(c.clone()),
        Input::ConfigMap(cm) if mesh_config::is_mesh_config(cm) => {
            Object::Mesh(mesh_config::convert_config_map(cm)?)
        }
        Input::ConfigMap(_) => return Ok(None),
        Input::IstioOperator(op) => Object::Mesh(mesh_config::convert_operator(op)?),
    }))
}

/// Origin of an earlier object with this key, recording `origin` if it is the first.
fn first_seen<K: Hash + Eq, O: Clone>(seen: &mut HashMap<K, O>, key: K, origin: &O) -> Option<O> {
    match seen.entry(key) {
        Entry::Occupied(e) => Some(e.get().clone()),
        Entry::Vacant(e) => {
            e.insert(origin.clone());
            None
        }
    }
}

/// Converts and validates `inputs` into one snapshot (generation 0). Every problem comes
/// back with the origin of its object (`O`: a file and document, or a kind and name). An
/// object that does not convert is left out; problems between objects (a pod IP or cluster
/// IP used twice, a missing netns in local mode) are reported and the first object wins.
pub fn build<'a, O: Clone + fmt::Display>(
    inputs: impl IntoIterator<Item = (O, Input<'a>)>,
    mode: Mode,
) -> (Snapshot, Vec<(O, Problem)>) {
    let mut errors = Vec::new();
    let mut snap = Snapshot::default();
    let mut seen: HashMap<(&'static str, String), O> = HashMap::new();
    let (mut pod_origin, mut pod_ips, mut cluster_ips) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    let mut slices = Vec::new();
    let mut credentials = HashMap::new();
    for (origin, input) in inputs {
        let obj = match convert(input, mode) {
            Ok(Some(obj)) => obj,
            Ok(None) => continue,
            Err(problems) => {
                errors.extend(problems.into_iter().map(|p| (origin.clone(), p)));
                continue;
            }
        };
        let (kind, name) = obj.key();
        if let Some(first) = first_seen(&mut seen, (kind, name.clone()), &origin) {
            let first = first.to_string();
            errors.push((origin, Problem::Duplicate { kind, name, first }));
            continue;
        }
        match obj {
            Object::Namespace(n) => {
                snap.namespaces.insert(n.name.clone(), n);
            }
            Object::Pod(p) => {
                if let (Some(ip), false) = (p.ip, p.host_network) {
                    if let Some(first) = first_seen(&mut pod_ips, ip, &origin) {
                        let reason = format!("{ip} is also the IP of the pod in {first}");
                        errors.push((origin.clone(), invalid("status.podIP", reason)));
                    }
                    snap.by_pod_ip.entry(ip).or_insert_with(|| p.id.clone());
                }
                pod_origin.insert(p.id.clone(), origin);
                snap.pods.insert(p.id.clone(), p);
            }
            Object::Service(s) => {
                if let Some(ip) = s.cluster_ip {
                    if let Some(first) = first_seen(&mut cluster_ips, ip, &origin) {
                        let reason =
                            format!("{ip} is also the cluster IP of the service in {first}");
                        errors.push((origin.clone(), invalid("spec.clusterIP", reason)));
                    }
                    for (i, port) in s.ports.iter().enumerate() {
                        let addr = SocketAddrV4::new(ip, port.port);
                        snap.by_cluster_ip
                            .entry(addr)
                            .or_insert_with(|| (s.id.clone(), i));
                    }
                }
                snap.services.insert(s.id.clone(), s);
            }
            Object::Slice(s) => slices.push(s),
            Object::PeerAuthentication(p) => {
                snap.peer_authentications.insert(p.id.clone(), p);
            }
            Object::AuthorizationPolicy(p) => {
                snap.authorization_policies.insert(p.id.clone(), p);
            }
            Object::VirtualService(v) => {
                snap.virtual_services
                    .insert(v.id.clone(), std::sync::Arc::new(v));
            }
            Object::DestinationRule(d) => {
                snap.destination_rules
                    .insert(d.id.clone(), std::sync::Arc::new(d));
            }
            Object::Gateway(g) => {
                snap.gateways.insert(g.id.clone(), g);
            }
            Object::Credential(c) => {
                credentials.insert(c.id, c.state);
            }
            Object::Mesh(m) => match &snap.mesh.source {
                Some(first) => {
                    let reason =
                        format!("MeshConfig is already given by {first}; keep it in one place");
                    errors.push((origin, invalid("(document)", reason)));
                }
                None => snap.mesh = m.settings,
            },
        }
    }
    // Namespaces only referenced by pods or services exist, unlabeled (so not enrolled).
    let referenced = snap.pods.keys().chain(snap.services.keys());
    for name in referenced
        .map(|id| id.namespace.clone())
        .collect::<Vec<_>>()
    {
        let labels = BTreeMap::new();
        snap.namespaces
            .entry(name.clone())
            .or_insert(model::Namespace { name, labels });
    }
    if mode == Mode::Local {
        for pod in snap.pods.values() {
            let ns = snap.namespaces.get(&pod.id.namespace);
            let enrolled = ns.is_some_and(model::Namespace::enrolled);
            let needs_netns =
                enrolled && pod.node.is_some() && !pod.host_network && !pod.opted_out();
            if let (true, None, Some(origin)) = (needs_netns, &pod.netns, pod_origin.get(&pod.id)) {
                let pod = pod.id.clone();
                errors.push((origin.clone(), Problem::MissingNetns { pod }));
            }
        }
    }
    // Only the Secrets a Gateway names are kept; a named one not given is missing.
    snap.gateway_credentials = snap
        .wanted_credentials()
        .into_iter()
        .map(|id| {
            let state = credentials
                .remove(&id)
                .unwrap_or(crate::config::gateway::CredentialState::Missing);
            (id, state)
        })
        .collect();
    match mode {
        Mode::Local => {
            for svc in snap.services.values_mut() {
                let pods = &snap.pods;
                svc.endpoints = svc.ports.iter().map(|p| endpoints(pods, svc, p)).collect();
            }
        }
        Mode::Kubernetes => slices::apply(&mut snap.services, &slices),
    }
    (snap, errors)
}

/// Local mode: ready pods selected by `svc`, with an IP and the target port, sorted by pod.
fn endpoints(
    pods: &BTreeMap<ObjectRef, model::Pod>,
    svc: &model::Service,
    port: &ServicePort,
) -> Vec<Endpoint> {
    let selects = |p: &model::Pod| p.has_labels(&svc.selector);
    let selected = pods
        .values()
        .filter(|p| p.id.namespace == svc.id.namespace && p.ready && selects(p));
    let mut eps: Vec<Endpoint> = selected
        .filter_map(|p| {
            let port = match &port.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => {
                    p.ports.iter().find(|c| c.name.as_ref() == Some(name))?.port
                }
            };
            let (pod, addr, node) = (
                Some(p.id.clone()),
                SocketAddrV4::new(p.ip?, port),
                p.node.clone(),
            );
            Some(Endpoint { pod, addr, node })
        })
        .collect();
    eps.sort_by(|a, b| a.pod.cmp(&b.pod));
    eps
}

#[cfg(test)]
mod tests;
