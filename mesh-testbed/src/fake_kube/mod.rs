//! A fake Kubernetes API server for tests: plain HTTP on 127.0.0.1, speaking the real
//! list/watch protocol so that kube-rs clients run against it unchanged.
//!
//! - `GET /api/v1/pods`, `/apis/GROUP/VERSION/PLURAL` (and the `namespaces/NS/` forms): a
//!   list with `metadata.resourceVersion`; `fieldSelector` (`a.b=v`, `a.b!=v`) and
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`, comma-joined) are honoured.
//! - `?watch=true&resourceVersion=N&allowWatchBookmarks=true`: a chunked stream of
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}` lines, replaying every
//!   change after N first. A selector that stops (starts) matching an object turns its
//!   MODIFIED into DELETED (ADDED), as the real server does. N older than the compaction
//!   point answers an `ERROR` with a 410 `Expired` Status.
//! - `GET` of one object (`.../namespaces/NS/PLURAL/NAME`, `.../PLURAL/NAME`).
//! - Discovery for the served versions (`/api`, `/apis`, `/apis/GROUP/VERSION`).
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered as programmed with
//!   [`FakeApiServer::review_token`] (see [`auth`]).
//! - `POST` to a collection (create: 201, or 409 AlreadyExists) and `PATCH` of one object
//!   (JSON merge patch), with the real server's Status objects (see [`write`]).
//!
//! The test drives it at runtime: [`FakeApiServer::apply`] / [`FakeApiServer::delete`]
//! objects (JSON), [`FakeApiServer::drop_watches`] (connections cut mid-stream),
//! [`FakeApiServer::expire_watches`] (410 Gone and compaction), [`FakeApiServer::bookmark`],
//! [`FakeApiServer::hold`] requests, [`FakeApiServer::fail`] a resource with an HTTP error,
//! make a create lose a race ([`FakeApiServer::race_create`]), [`FakeApiServer::get`] an
//! object, and reads the [`FakeApiServer::requests`] it got. [`FakeApiServer::write_kubeconfig`]
//! writes a kubeconfig pointing at it.

pub mod auth;
mod http;
mod select;
pub mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use select::Selector;

/// A resource type the server knows.
#[derive(Clone, Debug)]
pub struct TypeInfo {
    /// `""` for the core group.
    pub group: String,
    /// Served versions; the first is the preferred one.
    pub versions: Vec<String>,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
}

impl TypeInfo {
    fn new(group: &str, versions: &[&str], kind: &str, plural: &str, namespaced: bool) -> Self {
        TypeInfo {
            group: group.into(),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        }
    }

    fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

/// The kinds nodemesh reads, with the versions a current cluster with Istio serves.
fn default_types() -> Vec<TypeInfo> {
    vec![
        TypeInfo::new("", &["v1"], "Namespace", "namespaces", false),
        TypeInfo::new("", &["v1"], "Pod", "pods", true),
        TypeInfo::new("", &["v1"], "Service", "services", true),
        TypeInfo::new("", &["v1"], "ConfigMap", "configmaps", true),
        TypeInfo::new("", &["v1"], "Secret", "secrets", true),
        TypeInfo::new("", &["v1"], "ServiceAccount", "serviceaccounts", true),
        TypeInfo::new("", &["v1"], "Node", "nodes", false),
        TypeInfo::new(
            "discovery.k8s.io",
            &["v1"],
            "EndpointSlice",
            "endpointslices",
            true,
        ),
        TypeInfo::new(
            "security.istio.io",
            &["v1", "v1beta1"],
            "PeerAuthentication",
            "peerauthentications",
            true,
        ),
        TypeInfo::new(
            "security.istio.io",
            &["v1", "v1beta1"],
            "AuthorizationPolicy",
            "authorizationpolicies",
            true,
        ),
        TypeInfo::new(
            "networking.istio.io",
            &["v1", "v1beta1", "v1alpha3"],
            "VirtualService",
            "virtualservices",
            true,
        ),
        TypeInfo::new(
            "networking.istio.io",
            &["v1", "v1beta1", "v1alpha3"],
            "DestinationRule",
            "destinationrules",
            true,
        ),
        TypeInfo::new(
            "networking.istio.io",
            &["v1", "v1beta1", "v1alpha3"],
            "Gateway",
            "gateways",
            true,
        ),
    ]
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
type Key = (String, String);

/// One change, kept for watches that resume from an older resourceVersion.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: String,
    group: String,
    old: Option<Value>,
    /// The object after the change (for a deletion: its last state, with the new version).
    new: Value,
    deleted: bool,
}

/// What a watch stream carries to the client.
#[derive(Debug)]
enum Msg {
    Line(Bytes),
    /// Cut the connection without ending the chunked body (a dropped watch).
    Abort,
}

/// An open watch.
struct Watch {
    group: String,
    plural: String,
    api_version: String,
    kind: String,
    namespace: Option<String>,
    fields: Selector,
    labels: Selector,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Watch {
    fn matches(&self, obj: &Value) -> bool {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.fields.matches_fields(obj)
            && self.labels.matches_labels(obj)
    }

    /// The event this watch sees for a change, if any.
    fn event(&self, c: &Change) -> Option<&'static str> {
        if c.group != self.group || c.plural != self.plural {
            return None;
        }
        let was = c.old.as_ref().is_some_and(|o| self.matches(o));
        if c.deleted {
            return was.then_some("DELETED");
        }
        match (was, self.matches(&c.new)) {
            (false, true) => Some("ADDED"),
            (true, true) => Some("MODIFIED"),
            (true, false) => Some("DELETED"),
            (false, false) => None,
        }
    }

    fn send(&self, kind: &str, obj: &Value) -> bool {
        let obj = with_types(obj, &self.api_version, &self.kind);
        let line = json!({"type": kind, "object": obj}).to_string() + "\n";
        self.tx.send(Msg::Line(Bytes::from(line))).is_ok()
    }
}

fn with_types(obj: &Value, api_version: &str, kind: &str) -> Value {
    let mut obj = obj.clone();
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
    }
    obj
}

#[derive(Default)]
struct State {
    rv: u64,
    types: Vec<TypeInfo>,
    objects: HashMap<(String, String), BTreeMap<Key, Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
    requests: Vec<String>,
    /// Plurals whose requests answer this HTTP status.
    failing: HashMap<String, u16>,
    /// Token -> the TokenReview status to answer.
    token_reviews: HashMap<String, Value>,
    /// `spec.audiences` of every TokenReview received.
    token_reviews_seen: Vec<Value>,
    /// (plural, namespace, name, object): stored just before the next create of that object,
    /// which so answers 409 AlreadyExists (another client won the race).
    races: Vec<(String, String, String, Value)>,
}

impl State {
    fn type_of(&self, api_version: &str, kind: &str) -> Option<TypeInfo> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
            .cloned()
    }

    /// Stores `obj` (no apiVersion and kind; namespace set for a namespaced kind) as an object
    /// of `t`, with a new resourceVersion (and uid and creationTimestamp if it has none);
    /// watches see ADDED or MODIFIED. Returns the object as stored.
    fn store(&mut self, t: &TypeInfo, mut obj: Value) -> Result<Value> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            bail!("{} without metadata.name", t.kind);
        }
        let namespace = if t.namespaced {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned();
            obj["metadata"]["namespace"] = ns.clone().into();
            ns
        } else {
            String::new()
        };
        self.rv += 1;
        let rv = self.rv;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = rv.to_string().into();
        if meta["uid"].is_null() {
            meta["uid"] = format!("fake-uid-{rv}").into();
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = "2025-01-01T00:00:00Z".into();
        }
        let collection = self
            .objects
            .entry((t.group.clone(), t.plural.clone()))
            .or_default();
        let old = collection.insert((namespace, name), obj.clone());
        self.record(Change {
            rv,
            plural: t.plural.clone(),
            group: t.group.clone(),
            old,
            new: obj.clone(),
            deleted: false,
        });
        Ok(obj)
    }

    fn record(&mut self, change: Change) {
        self.watches.retain(|w| match w.event(&change) {
            Some(kind) => w.send(kind, &change.new),
            None => !w.tx.is_closed(),
        });
        self.history.push(change);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Held request classes (`list:PLURAL`, `watch:PLURAL`, `watch:*`, `list:*`).
    holds: tokio::sync::watch::Sender<HashSet<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The server; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1 (a free port) on a thread of its own.
    pub fn start() -> Result<FakeApiServer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                types: default_types(),
                ..State::default()
            }),
            holds: tokio::sync::watch::channel(HashSet::new()).0,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("fake API server runtime")?;
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || rt.block_on(http::serve(listener, serving, stopped)))
            .context("fake API server thread")?;
        Ok(FakeApiServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server (with a dummy
    /// bearer token, which the server ignores).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  \
             context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// The versions of a group's kind that are served (e.g. only `v1beta1` of
    /// PeerAuthentication, as an older Istio); an empty list stops serving the kind.
    pub fn serve_versions(&self, group: &str, kind: &str, versions: &[&str]) {
        let mut st = self.shared.lock();
        for t in st
            .types
            .iter_mut()
            .filter(|t| t.group == group && t.kind == kind)
        {
            t.versions = versions.iter().map(|v| v.to_string()).collect();
        }
    }

    /// Creates or replaces an object (JSON with apiVersion, kind and metadata.name); returns
    /// its new resourceVersion. Watches see ADDED or MODIFIED.
    pub fn apply(&self, obj: Value) -> Result<u64> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        let mut st = self.shared.lock();
        let t = st
            .type_of(&api_version, &kind)
            .ok_or_else(|| anyhow!("the fake API server does not serve {api_version} {kind}"))?;
        let mut obj = obj;
        let Some(map) = obj.as_object_mut() else {
            bail!("not a JSON object");
        };
        map.remove("apiVersion");
        map.remove("kind");
        st.store(&t, obj)?;
        Ok(st.rv)
    }

    /// The object as a GET returns it (with apiVersion and kind), or None.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        let t = st.type_of(api_version, kind)?;
        let ns = if t.namespaced { namespace } else { "" };
        let obj = st
            .objects
            .get(&(t.group.clone(), t.plural.clone()))?
            .get(&(ns.to_owned(), name.to_owned()))?;
        let version = api_version.rsplit('/').next().unwrap_or(api_version);
        Some(with_types(obj, &t.api_version(version), &t.kind))
    }

    /// Makes the next create of `obj`'s kind, namespace and name lose a race: just before it
    /// is handled, `obj` is stored (as if another client had created it after this one's
    /// read), so the create answers 409 AlreadyExists and a read finds `obj`.
    pub fn race_create(&self, obj: Value) -> Result<()> {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
        let mut st = self.shared.lock();
        let t = st
            .type_of(&api_version, &kind)
            .ok_or_else(|| anyhow!("the fake API server does not serve {api_version} {kind}"))?;
        let ns = if t.namespaced {
            obj["metadata"]["namespace"].as_str().unwrap_or("default")
        } else {
            ""
        };
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let mut stored = obj.clone();
        if let Some(map) = stored.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
        if t.namespaced {
            stored["metadata"]["namespace"] = ns.into();
        }
        st.races
            .push((t.plural.clone(), ns.to_owned(), name.to_owned(), stored));
        Ok(())
    }

    /// Deletes an object; watches see DELETED. False if there was none.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(t) = st.type_of(api_version, kind) else {
            return false;
        };
        let ns = if t.namespaced { namespace } else { "" };
        let key = (ns.to_owned(), name.to_owned());
        let collection = st
            .objects
            .entry((t.group.clone(), t.plural.clone()))
            .or_default();
        let Some(old) = collection.remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = rv.to_string().into();
        st.record(Change {
            rv,
            plural: t.plural,
            group: t.group,
            old: Some(old),
            new: last,
            deleted: true,
        });
        true
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Cuts every open watch mid-stream (no chunked terminator); clients resume from the
    /// last resourceVersion they saw and get the changes made since replayed.
    pub fn drop_watches(&self) -> usize {
        let mut st = self.shared.lock();
        let n = st.watches.len();
        for w in st.watches.drain(..) {
            let _ = w.tx.send(Msg::Abort);
        }
        n
    }

    /// Compacts the history (every version before now is gone) and answers every open watch
    /// with an `ERROR` event carrying a 410 Expired Status, as etcd compaction does: clients
    /// must list again.
    pub fn expire_watches(&self) -> usize {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        st.history.clear();
        let gone = Bytes::from(gone_event(st.compacted) + "\n");
        let n = st.watches.len();
        for w in st.watches.drain(..) {
            let _ = w.tx.send(Msg::Line(gone.clone()));
        }
        n
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&self) -> usize {
        let st = self.shared.lock();
        let rv = st.rv.to_string();
        let mut n = 0;
        for w in st.watches.iter().filter(|w| w.bookmarks) {
            let obj = json!({"metadata": {"resourceVersion": rv}});
            n += usize::from(w.send("BOOKMARK", &obj));
        }
        n
    }

    /// Open watches.
    pub fn watches(&self) -> usize {
        let mut st = self.shared.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    /// Holds requests of a class until [`FakeApiServer::release`]: `list:PLURAL`,
    /// `watch:PLURAL` (or `list:*`, `watch:*`).
    pub fn hold(&self, class: &str) {
        self.shared.holds.send_modify(|h| {
            h.insert(class.to_owned());
        });
    }

    pub fn release(&self, class: &str) {
        self.shared.holds.send_modify(|h| {
            h.remove(class);
        });
    }

    /// Makes requests for `plural` answer `code` (with a Status), or normal again for None.
    pub fn fail(&self, plural: &str, code: Option<u16>) {
        let mut st = self.shared.lock();
        match code {
            Some(c) => st.failing.insert(plural.to_owned(), c),
            None => st.failing.remove(plural),
        };
    }

    /// Answers TokenReviews of `token` with this status (see [`auth::authenticated`] and
    /// [`auth::unauthenticated`]); other tokens are not authenticated.
    pub fn review_token(&self, token: &str, status: Value) {
        self.shared
            .lock()
            .token_reviews
            .insert(token.to_owned(), status);
    }

    /// `spec.audiences` of every TokenReview received so far.
    pub fn token_review_audiences(&self) -> Vec<Value> {
        self.shared.lock().token_reviews_seen.clone()
    }

    /// Every request so far, as `GET /path?query`, percent-decoded.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

/// The watch event etcd compaction produces.
fn gone_event(oldest: u64) -> String {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version (oldest is {oldest})"),
        "reason": "Expired", "code": 410
    }})
    .to_string()
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.drop_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
