//! The rebuild task: collects the watchers' notes, waits for a burst to settle, then builds
//! one snapshot from every store with the shared conversion and publishes it if it changed.
//! Invalid objects are reported once each (and again if their problem changes), as
//! event-like log lines, and counted per kind in the status.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::ResourceStatus;
use super::credentials::CredentialWatches;
use super::watchers::{KINDS, Kind, Note, Stores};
use crate::config::convert::{self, Input, Mode, Problem, authz, gateway, istio, routing};
use crate::config::manifests::LoadStats;
use crate::config::model::{MeshSettings, ObjectRef, Snapshot};
use crate::config::watch::ConfigStatus;

/// Quiet time after a change before rebuilding: a rollout changes many objects at once.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Upper bound on the wait while changes keep coming.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(1);

/// Where a problem is: kind and `namespace/name` (or `name` for cluster-scoped kinds).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub object: String,
}

impl ObjectKey {
    fn of(kind: Kind, meta: &ObjectMeta) -> Self {
        let name = meta.name.as_deref().unwrap_or("");
        let object = match &meta.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_owned(),
        };
        ObjectKey {
            kind: kind.name(),
            object,
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.object)
    }
}

/// An object skipped as invalid: `Service default/web: field spec.ports[0].port: ...`.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InvalidObject {
    pub key: ObjectKey,
    pub problem: Problem,
}

pub struct Rebuild {
    node: String,
    stores: Stores,
    credentials: CredentialWatches,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<ConfigStatus>,
    resources: BTreeMap<Kind, ResourceStatus>,
    /// Problems already logged, by object, so a rebuild does not log them again.
    reported: BTreeMap<ObjectKey, String>,
    /// Set once the first full snapshot is out.
    published: bool,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Rebuild {
    pub fn new(
        node: String,
        stores: Stores,
        credentials: CredentialWatches,
        snapshots: watch::Sender<Arc<Snapshot>>,
        status: watch::Sender<ConfigStatus>,
    ) -> Self {
        let initial = stores.initial_status(&node);
        let resources = KINDS.iter().copied().zip(initial).collect();
        Rebuild {
            node,
            stores,
            credentials,
            snapshots,
            status,
            resources,
            reported: BTreeMap::new(),
            published: false,
        }
    }

    /// Runs until the watchers or every snapshot receiver are gone.
    pub async fn run(mut self, mut notes: mpsc::Receiver<Note>) {
        loop {
            let first = tokio::select! {
                _ = self.snapshots.closed() => return,
                note = notes.recv() => note,
            };
            let Some(first) = first else { return };
            let mut dirty = self.note(first);
            let deadline = Instant::now() + MAX_DEBOUNCE;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    note = notes.recv() => match note {
                        Some(n) => dirty |= self.note(n),
                        None => return,
                    },
                }
            }
            let synced = self.resources.values().all(|r| r.synced);
            if synced && (dirty || !self.published) {
                self.rebuild();
            }
            self.publish_status();
        }
    }

    /// Records a note; true if the stores changed.
    fn note(&mut self, note: Note) -> bool {
        match note {
            Note::Synced(k) => {
                let r = self.resource(k);
                if !r.synced {
                    info!(kind = k.name(), selector = ?r.selector, "initial list synced");
                }
                r.synced = true;
                true
            }
            Note::Changed(k) => {
                debug!(kind = k.name(), "changed");
                true
            }
            Note::Expired(k) => {
                info!(kind = k.name(), "watch expired (410 Gone); relisting");
                false
            }
            Note::Error(k, error) => {
                warn!(kind = k.name(), %error, "watch failed; retrying with backoff");
                let r = self.resource(k);
                r.last_error = Some(error);
                r.last_error_at = Some(now_rfc3339());
                r.errors_total += 1;
                false
            }
            Note::Served(k, version) => {
                let r = self.resource(k);
                let not_served = version.is_none();
                if not_served && r.note.is_none() {
                    info!(
                        kind = k.name(),
                        "not served by the API server (Istio CRDs not installed?); treated as empty"
                    );
                }
                r.note = not_served.then(|| "not served by the API server".to_owned());
                r.api_version = version;
                // Nothing to list: as synced as it gets, and looked for again later.
                r.synced |= not_served;
                not_served
            }
        }
    }

    fn resource(&mut self, kind: Kind) -> &mut ResourceStatus {
        self.resources.entry(kind).or_default()
    }

    /// Builds a snapshot from every store; publishes it if it differs from the one in force.
    fn rebuild(&mut self) {
        let namespaces = self.stores.namespaces.state();
        let node_pods = self.stores.node_pods.state();
        let pods = self.stores.pods.state();
        let services = self.stores.services.state();
        let slices = self.stores.slices.state();
        let mesh_config = self.stores.mesh_config.state();
        let dynamic = self.stores.istio(Kind::PeerAuthentication);
        let dynamic_ap = self.stores.istio(Kind::AuthorizationPolicy);
        let dynamic_vs = self.stores.istio(Kind::VirtualService);
        let dynamic_dr = self.stores.istio(Kind::DestinationRule);
        let dynamic_gw = self.stores.istio(Kind::Gateway);
        let credentials = self.credentials.states();
        let mut invalid: Vec<InvalidObject> = Vec::new();
        let peer_auths: Vec<(ObjectKey, istio::PeerAuthentication)> =
            decode_all(Kind::PeerAuthentication, &dynamic, &mut invalid);
        let authorization_policies: Vec<(ObjectKey, authz::AuthorizationPolicy)> =
            decode_all(Kind::AuthorizationPolicy, &dynamic_ap, &mut invalid);
        let virtual_services: Vec<(ObjectKey, routing::VirtualService)> =
            decode_all(Kind::VirtualService, &dynamic_vs, &mut invalid);
        let destination_rules: Vec<(ObjectKey, routing::DestinationRule)> =
            decode_all(Kind::DestinationRule, &dynamic_dr, &mut invalid);
        let gateways: Vec<(ObjectKey, gateway::Gateway)> =
            decode_all(Kind::Gateway, &dynamic_gw, &mut invalid);
        // This node's pods come only from the node's own watch (see `watchers`).
        let node = self.node.as_str();
        let elsewhere = |p: &&Arc<k8s_openapi::api::core::v1::Pod>| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node)
        };
        let inputs = namespaces
            .iter()
            .map(|o| {
                (
                    ObjectKey::of(Kind::Namespace, &o.metadata),
                    Input::Namespace(o),
                )
            })
            .chain(
                node_pods
                    .iter()
                    .map(|o| (ObjectKey::of(Kind::Pod, &o.metadata), Input::Pod(o))),
            )
            .chain(
                pods.iter()
                    .filter(elsewhere)
                    .map(|o| (ObjectKey::of(Kind::Pod, &o.metadata), Input::Pod(o))),
            )
            .chain(
                services
                    .iter()
                    .map(|o| (ObjectKey::of(Kind::Service, &o.metadata), Input::Service(o))),
            )
            .chain(slices.iter().map(|o| {
                (
                    ObjectKey::of(Kind::EndpointSlice, &o.metadata),
                    Input::EndpointSlice(o),
                )
            }))
            .chain(
                peer_auths
                    .iter()
                    .map(|(k, pa)| (k.clone(), Input::PeerAuthentication(pa))),
            )
            .chain(
                authorization_policies
                    .iter()
                    .map(|(k, ap)| (k.clone(), Input::AuthorizationPolicy(ap))),
            )
            .chain(
                virtual_services
                    .iter()
                    .map(|(k, vs)| (k.clone(), Input::VirtualService(vs))),
            )
            .chain(
                destination_rules
                    .iter()
                    .map(|(k, dr)| (k.clone(), Input::DestinationRule(dr))),
            )
            .chain(
                gateways
                    .iter()
                    .map(|(k, gw)| (k.clone(), Input::Gateway(gw))),
            )
            .chain(credentials.iter().map(|c| {
                let key = ObjectKey {
                    kind: Kind::Secret.name(),
                    object: c.id.to_string(),
                };
                (key, Input::Credential(c))
            }))
            .chain(mesh_config.iter().map(|o| {
                (
                    ObjectKey::of(Kind::MeshConfig, &o.metadata),
                    Input::ConfigMap(o),
                )
            }));
        let (mut snapshot, problems) = convert::build(inputs, Mode::Kubernetes);
        invalid.extend(
            problems
                .into_iter()
                .map(|(key, problem)| InvalidObject { key, problem }),
        );
        // An AuthorizationPolicy that cannot be read must not open what it may have closed:
        // the pods of its namespace (every pod, in the root namespace) are refused until it
        // is fixed or deleted.
        for o in &dynamic_ap {
            let key = ObjectKey::of(Kind::AuthorizationPolicy, &o.metadata);
            if let Some(bad) = invalid.iter().find(|i| i.key == key) {
                let id = ObjectRef {
                    namespace: o.metadata.namespace.clone().unwrap_or_default(),
                    name: o.metadata.name.clone().unwrap_or_default(),
                };
                let reason = bad.problem.to_string();
                snapshot.invalid_authorization_policies.insert(id, reason);
            }
        }
        self.report(&invalid);
        // Watch the Secrets the Gateways name now (the build listed them); a new watch's first
        // list brings another rebuild, which puts its state in.
        self.credentials
            .want(&snapshot.gateway_credentials.keys().collect());

        let counts = [
            (Kind::Namespace, namespaces.len()),
            (Kind::NodePod, node_pods.len()),
            (Kind::Pod, pods.len()),
            (Kind::Service, services.len()),
            (Kind::EndpointSlice, slices.len()),
            (Kind::PeerAuthentication, dynamic.len()),
            (Kind::AuthorizationPolicy, dynamic_ap.len()),
            (Kind::VirtualService, dynamic_vs.len()),
            (Kind::DestinationRule, dynamic_dr.len()),
            (Kind::Gateway, dynamic_gw.len()),
            (Kind::MeshConfig, mesh_config.len()),
            (Kind::Secret, self.credentials.watched()),
        ];
        for (kind, n) in counts {
            let bad: HashSet<&str> = invalid
                .iter()
                .filter(|i| i.key.kind == kind.name())
                .map(|i| i.key.object.as_str())
                .collect();
            let r = self.resource(kind);
            r.objects = n;
            // Both pod watchers show the pods found invalid (the same object, two views).
            r.invalid = bad.len();
        }

        let current = self.snapshots.borrow().clone();
        if self.published && same_config(&current, &snapshot) {
            return;
        }
        snapshot.generation = current.generation + 1;
        let stats = LoadStats::of(&snapshot);
        info!(
            generation = snapshot.generation,
            namespaces = stats.namespaces,
            pods = stats.pods,
            services = stats.services,
            endpoints = stats.endpoints,
            peer_authentications = stats.peer_authentications,
            invalid = self.reported.len(),
            "kubernetes config applied"
        );
        self.status.send_modify(|st| {
            st.generation = snapshot.generation;
            st.last_loaded = SystemTime::now();
            st.stats = stats;
            if self.published {
                st.reloads_total += 1;
            }
        });
        self.snapshots.send_replace(Arc::new(snapshot));
        self.published = true;
    }

    /// Logs objects newly invalid (or invalid differently), and those valid again or gone.
    fn report(&mut self, invalid: &[InvalidObject]) {
        let mut now: BTreeMap<ObjectKey, Vec<&InvalidObject>> = BTreeMap::new();
        for i in invalid {
            now.entry(i.key.clone()).or_default().push(i);
        }
        let gone: Vec<ObjectKey> = self
            .reported
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.reported.remove(&key);
            info!(kind = key.kind, object = %key.object, "object no longer skipped (fixed or deleted)");
        }
        for (key, problems) in now {
            let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let text = text.join("; ");
            if self.reported.get(&key) == Some(&text) {
                continue;
            }
            for p in &problems {
                warn!(
                    kind = key.kind, object = %key.object,
                    field = p.problem.field().unwrap_or("-"), reason = %p.problem,
                    "invalid object skipped; the others still apply"
                );
            }
            // Both pod watchers show a pod found invalid (one object, two views).
            let kinds: Vec<Kind> = KINDS.into_iter().filter(|k| k.name() == key.kind).collect();
            let at = now_rfc3339();
            for k in kinds {
                let r = self.resource(k);
                r.last_error = Some(text.clone());
                r.last_error_at = Some(at.clone());
                r.errors_total += 1;
            }
            self.reported.insert(key, text);
        }
    }

    fn publish_status(&self) {
        let resources: Vec<ResourceStatus> = self.resources.values().cloned().collect();
        let synced = self.published;
        self.status.send_if_modified(|st| {
            let changed = st.resources != resources || st.synced != synced;
            st.resources = resources;
            st.synced = synced;
            st.errors_total = st.resources.iter().map(|r| r.errors_total).sum();
            changed
        });
    }
}

/// Same objects: a relist that found nothing new must not bump the generation.
fn same_config(a: &Snapshot, b: &Snapshot) -> bool {
    a.namespaces == b.namespaces
        && a.pods == b.pods
        && a.services == b.services
        && a.peer_authentications == b.peer_authentications
        && a.authorization_policies == b.authorization_policies
        && a.invalid_authorization_policies == b.invalid_authorization_policies
        && a.virtual_services == b.virtual_services
        && a.destination_rules == b.destination_rules
        && a.gateways == b.gateways
        && a.gateway_credentials == b.gateway_credentials
        && same_mesh(&a.mesh, &b.mesh)
}

/// MeshSettings compared by what they say (as `/config_dump` shows them).
fn same_mesh(a: &MeshSettings, b: &MeshSettings) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Decodes every object of an Istio kind, like a manifest (unknown fields aside: a wrong type
/// is a problem at its field path); the ones that do not decode are set aside, named.
fn decode_all<T: serde::de::DeserializeOwned>(
    kind: Kind,
    objects: &[Arc<DynamicObject>],
    invalid: &mut Vec<InvalidObject>,
) -> Vec<(ObjectKey, T)> {
    objects
        .iter()
        .filter_map(|o| {
            let key = ObjectKey::of(kind, &o.metadata);
            match decode_dynamic(o) {
                Ok(v) => Some((key, v)),
                Err(problem) => {
                    invalid.push(InvalidObject { key, problem });
                    None
                }
            }
        })
        .collect()
}

fn decode_dynamic<T: serde::de::DeserializeOwned>(obj: &DynamicObject) -> Result<T, Problem> {
    let value = serde_json::to_value(obj).map_err(|e| Problem::Decode {
        field: "(object)".into(),
        reason: e.to_string(),
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| Problem::Decode {
        field: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}
