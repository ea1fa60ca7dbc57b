//! One kube-runtime watcher per kind, each feeding a reflector store and telling the rebuild
//! task what happened. The watcher does the protocol: a paginated list, then a watch from
//! the list's resourceVersion with bookmarks (so a resumed watch starts from a recent
//! version), resuming from the last seen version when a watch ends, a fresh list on
//! `410 Gone`, and exponential backoff with jitter on errors (`default_backoff`).
//!
//! # Pods: two watchers
//!
//! Enrollment needs this node's pods, and only them: a watch with the field selector
//! `spec.nodeName=<node>` keeps that set small and exact, and it is the only source of pods
//! on this node (so a pod is enrolled from the watch that is about this node).
//!
//! The agent also needs pod IP -> namespace, service account and labels for pods on every
//! node: the peer identity an HBONE connection must prove, `is_meshed` for the destination,
//! and telemetry labels. We chose a second, cluster-wide pod watcher whose objects are
//! trimmed in memory ([`trim_remote_pod`]) to the fields the model reads. The trade-off:
//! every agent receives every pod change in the cluster (API server and network cost grow
//! with nodes x pod churn, the bytes on the wire are not reduced since pods cannot be
//! projected server-side), but memory stays at a few hundred bytes per pod and lookups on the
//! data path stay local and synchronous. The alternatives — looking pods up on demand (a
//! round trip to the API server on the connection path) or a central control plane pushing
//! only what each node needs (ztunnel's xDS from istiod) — are better at very large scale
//! and can replace this watcher without touching the model.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodSpec, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::ResourceStatus;
use crate::config::convert::SERVICE_NAME_LABEL;
use crate::config::convert::mesh_config::CONFIG_MAP;
use crate::config::model::ROOT_NAMESPACE;

/// The watched kinds, in the order `/status` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    /// Pods on this node (field selector), full objects.
    NodePod,
    /// Pods on every node, trimmed.
    Pod,
    Service,
    EndpointSlice,
    PeerAuthentication,
    AuthorizationPolicy,
    VirtualService,
    DestinationRule,
    Gateway,
    /// MeshConfig: the ConfigMap `istio` of the root namespace (field selector on the name).
    MeshConfig,
    /// The Secrets Gateways name, one watch each ([`super::credentials`]). Never gates
    /// readiness: a Gateway's credential concerns ingress, not mesh traffic.
    Secret,
}

pub const KINDS: [Kind; 12] = [
    Kind::Namespace,
    Kind::NodePod,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::PeerAuthentication,
    Kind::AuthorizationPolicy,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::Gateway,
    Kind::MeshConfig,
    Kind::Secret,
];

/// An Istio kind: served only where Istio's CRDs are installed, in one of several versions,
/// found by discovery.
#[derive(Clone, Copy, Debug)]
pub struct IstioKind {
    pub group: &'static str,
    /// Served versions we read, preferred first.
    pub versions: &'static [&'static str],
    /// The plural resource name.
    pub plural: &'static str,
}

/// The Istio kinds the agent watches.
pub const ISTIO_KINDS: [Kind; 5] = [
    Kind::PeerAuthentication,
    Kind::AuthorizationPolicy,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::Gateway,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::NodePod | Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::MeshConfig => "ConfigMap",
            Kind::Secret => "Secret",
        }
    }

    /// Where an Istio kind is served; `None` for Kubernetes' own kinds.
    pub fn istio(self) -> Option<IstioKind> {
        let networking = |plural| IstioKind {
            group: NETWORKING_GROUP,
            versions: &NETWORKING_VERSIONS,
            plural,
        };
        match self {
            Kind::PeerAuthentication => Some(IstioKind {
                group: SECURITY_GROUP,
                versions: &SECURITY_VERSIONS,
                plural: "peerauthentications",
            }),
            Kind::AuthorizationPolicy => Some(IstioKind {
                group: SECURITY_GROUP,
                versions: &SECURITY_VERSIONS,
                plural: "authorizationpolicies",
            }),
            Kind::VirtualService => Some(networking("virtualservices")),
            Kind::DestinationRule => Some(networking("destinationrules")),
            Kind::Gateway => Some(networking("gateways")),
            _ => None,
        }
    }
}

/// What a watcher tells the rebuild task.
#[derive(Debug)]
pub enum Note {
    /// A full list completed (the first, or a relist): the store holds it now.
    Synced(Kind),
    /// An object was added, changed or deleted.
    Changed(Kind),
    /// The watch failed; the watcher retries after a backoff.
    Error(Kind, String),
    /// The watch expired (410 Gone); the watcher relists. Routine, not an error.
    Expired(Kind),
    /// Discovery: the API version served, or `None` when the kind is not served at all.
    Served(Kind, Option<String>),
}

/// Where the Istio security kinds live.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// Served versions we read, preferred first.
const SECURITY_VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// Where the Istio routing kinds live.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
const NETWORKING_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// How often to look again for an Istio kind when the API server does not serve it.
const REDISCOVER: Duration = Duration::from_secs(60);
/// Backoff between failed discoveries.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

/// The reflectors' read sides.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub node_pods: Store<Pod>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// The `istio` ConfigMap of the root namespace, if any.
    pub mesh_config: Store<ConfigMap>,
    /// The Istio kinds ([`ISTIO_KINDS`], same order), each set once discovery found the
    /// served version.
    pub istio: [Arc<Mutex<Option<Store<DynamicObject>>>>; ISTIO_KINDS.len()],
}

impl Stores {
    pub fn initial_status(&self, node: &str) -> Vec<ResourceStatus> {
        KINDS
            .iter()
            .map(|&k| ResourceStatus {
                kind: k.name(),
                api_version: match k {
                    Kind::EndpointSlice => Some("discovery.k8s.io/v1".into()),
                    k if k.istio().is_some() => None,
                    _ => Some("v1".into()),
                },
                selector: selector(k, node),
                // Watched on demand; nothing to wait for.
                synced: k == Kind::Secret,
                ..ResourceStatus::default()
            })
            .collect()
    }

    /// The objects of an Istio kind (none while it is not served).
    pub fn istio(&self, kind: Kind) -> Vec<Arc<DynamicObject>> {
        let Some(i) = ISTIO_KINDS.iter().position(|k| *k == kind) else {
            return Vec::new();
        };
        let slot = self.istio[i].lock();
        let slot = slot.unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref().map(Store::state).unwrap_or_default()
    }
}

fn selector(kind: Kind, node: &str) -> Option<String> {
    match kind {
        Kind::NodePod => Some(format!("spec.nodeName={node}")),
        // Only slices a Service owns; the others (custom controllers) mean nothing to us.
        Kind::EndpointSlice => Some(SERVICE_NAME_LABEL.into()),
        Kind::MeshConfig => Some(format!("metadata.name={CONFIG_MAP}")),
        Kind::Secret => Some(super::credentials::selector(
            "<each Gateway credentialName>",
        )),
        _ => None,
    }
}

/// Starts every watcher on the current runtime.
pub fn start(client: Client, node: &str, notes: mpsc::Sender<Note>) -> Stores {
    let cfg = watcher::Config::default();
    let node_pods = cfg
        .clone()
        .fields(&selector(Kind::NodePod, node).unwrap_or_default());
    let slices = cfg.clone().labels(SERVICE_NAME_LABEL);
    let mesh_config = cfg
        .clone()
        .fields(&selector(Kind::MeshConfig, node).unwrap_or_default());
    let stores = Stores {
        namespaces: spawn(
            Kind::Namespace,
            Api::all(client.clone()),
            cfg.clone(),
            trim_meta,
            &notes,
        ),
        node_pods: spawn(
            Kind::NodePod,
            Api::all(client.clone()),
            node_pods,
            trim_meta,
            &notes,
        ),
        pods: spawn(
            Kind::Pod,
            Api::all(client.clone()),
            cfg.clone(),
            trim_remote_pod,
            &notes,
        ),
        services: spawn(
            Kind::Service,
            Api::all(client.clone()),
            cfg.clone(),
            trim_meta,
            &notes,
        ),
        slices: spawn(
            Kind::EndpointSlice,
            Api::all(client.clone()),
            slices,
            trim_meta,
            &notes,
        ),
        // Only in the root namespace: the agent reads no other ConfigMap (and its RBAC is a
        // Role there, not a ClusterRole).
        mesh_config: spawn(
            Kind::MeshConfig,
            Api::namespaced(client.clone(), ROOT_NAMESPACE),
            mesh_config,
            trim_meta,
            &notes,
        ),
        istio: Default::default(),
    };
    for (kind, slot) in ISTIO_KINDS.into_iter().zip(&stores.istio) {
        let (client, cfg, slot, notes) = (client.clone(), cfg.clone(), slot.clone(), notes.clone());
        tokio::spawn(istio_kind(kind, client, cfg, slot, notes));
    }
    stores
}

fn spawn<K>(
    kind: Kind,
    api: Api<K>,
    cfg: watcher::Config,
    trim: fn(&mut K),
    notes: &mpsc::Sender<Note>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let writer = Writer::default();
    let store = writer.as_reader();
    tokio::spawn(drive(kind, api, cfg, writer, trim, notes.clone()));
    store
}

/// Runs one watcher into its store until the rebuild task is gone.
async fn drive<K>(
    kind: Kind,
    api: Api<K>,
    cfg: watcher::Config,
    writer: Writer<K>,
    trim: fn(&mut K),
    notes: mpsc::Sender<Note>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = watcher(api, cfg)
        .default_backoff()
        .modify(trim)
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        let note = match item {
            Ok(watcher::Event::InitDone) => Note::Synced(kind),
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Note::Changed(kind),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Err(watcher::Error::WatchError(status)) if status.code == 410 => Note::Expired(kind),
            Err(e) => Note::Error(kind, super::access::explain(kind, error_chain(&e))),
        };
        if notes.send(note).await.is_err() {
            debug!(
                kind = kind.name(),
                "config rebuild task gone; watcher stops"
            );
            return;
        }
    }
}

/// An error and its sources on one line.
/// An error with its sources, each once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Finds the version of an Istio kind served (the first of its versions), then watches it.
/// A cluster without Istio's CRDs is normal: the kind counts as synced and empty, and is
/// looked for again every [`REDISCOVER`].
async fn istio_kind(
    kind: Kind,
    client: Client,
    cfg: watcher::Config,
    slot: Arc<Mutex<Option<Store<DynamicObject>>>>,
    notes: mpsc::Sender<Note>,
) {
    let Some(istio) = kind.istio() else { return };
    loop {
        let (note, wait) = match served_version(&client, istio).await {
            Ok(Some(version)) => {
                let api_version = format!("{}/{version}", istio.group);
                info!(kind = kind.name(), %api_version, "watching");
                if notes
                    .send(Note::Served(kind, Some(api_version)))
                    .await
                    .is_err()
                {
                    return;
                }
                let gvk = GroupVersionKind::gvk(istio.group, version, kind.name());
                let ar = ApiResource::from_gvk(&gvk);
                let writer = Writer::new(ar.clone());
                *slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(writer.as_reader());
                let api = Api::all_with(client, &ar);
                drive(kind, api, cfg, writer, trim_meta, notes).await;
                return;
            }
            Ok(None) => (Note::Served(kind, None), REDISCOVER),
            Err(e) => (
                Note::Error(kind, format!("discovery: {}", error_chain(&e))),
                DISCOVERY_RETRY,
            ),
        };
        if notes.send(note).await.is_err() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// The first of the kind's versions that serves it; `None` if none does (404: the group or
/// version is not there).
async fn served_version(
    client: &Client,
    istio: IstioKind,
) -> Result<Option<&'static str>, kube::Error> {
    for &version in istio.versions {
        match client
            .list_api_group_resources(&format!("{}/{version}", istio.group))
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == istio.plural) => {
                return Ok(Some(version));
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// What no conversion reads and every object carries: server-side apply bookkeeping.
fn trim_meta<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// Pods on other nodes: only what the model reads (identity, labels, placement, IP,
/// readiness), so a large cluster costs little memory. See the module doc.
#[allow(deprecated)] // `serviceAccount`, the deprecated alias the conversion still honours
pub fn trim_remote_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            service_account_name: spec.service_account_name,
            service_account: spec.service_account,
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        let ready = status.conditions.into_iter().flatten();
        let ready: Vec<_> = ready.filter(|c| c.type_ == "Ready").collect();
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            conditions: Some(ready).filter(|c| !c.is_empty()),
            ..PodStatus::default()
        });
    }
}
