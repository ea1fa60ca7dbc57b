//! Local mode: a directory of Kubernetes YAML (`mesh-agent run --manifests DIR`) turned into
//! one validated [`Snapshot`].
//!
//! Every `*.yaml`/`*.yml` file of the directory (not recursive, sorted by name, hidden and
//! editor temp files skipped) is a multi-document stream. `v1` Namespace, Pod and Service are
//! decoded with k8s-openapi, Istio's PeerAuthentication by [`istio`] (unknown fields are
//! errors); other kinds are ignored. A load yields either a whole snapshot or a
//! [`ConfigError`] listing every problem found.

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use super::model::{self, ContainerPort, Endpoint, NETNS_ANNOTATION, ObjectRef};
use super::model::{ServicePort, Snapshot, TargetPort};

/// Where bare names of the `nodemesh.io/netns` annotation live (`ip netns add NAME`).
pub const NETNS_DIR: &str = "/var/run/netns";
const DEFAULT_NAMESPACE: &str = "default";

/// The manifest files of a directory, read but not parsed.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `(DIR/NAME, text)`, sorted by name.
    pub files: Vec<(PathBuf, String)>,
    /// Files that could not be read as text, with the reason; [`load_sources`] reports them.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Hash of all of the above: equal fingerprints mean nothing changed.
    pub fingerprint: u64,
}

impl Sources {
    pub fn new(files: Vec<(PathBuf, String)>, unreadable: Vec<(PathBuf, String)>) -> Self {
        let mut h = DefaultHasher::new();
        (&files, &unreadable).hash(&mut h);
        let fingerprint = h.finish();
        Sources {
            files,
            unreadable,
            fingerprint,
        }
    }

    /// In-memory sources (tests, tools): `(path, yaml)` pairs, kept in the given order.
    #[cfg(test)]
    pub fn from_texts<P: Into<PathBuf>, S: Into<String>>(
        files: impl IntoIterator<Item = (P, S)>,
    ) -> Self {
        let files = files.into_iter().map(|(p, s)| (p.into(), s.into()));
        Sources::new(files.collect(), Vec::new())
    }
}

/// A successfully loaded directory.
#[derive(Clone, Debug)]
pub struct LoadedManifests {
    /// `generation` is 0; the caller numbers the snapshots it applies.
    pub snapshot: Snapshot,
    /// [`Sources::fingerprint`] of what was loaded.
    pub fingerprint: u64,
    pub stats: LoadStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadStats {
    pub files: usize,
    /// Non-empty documents, ignored ones included.
    pub documents: usize,
    /// Documents of kinds local mode does not handle.
    pub ignored: usize,
    pub namespaces: usize,
    pub pods: usize,
    pub services: usize,
    pub peer_authentications: usize,
    /// Sum over all service ports.
    pub endpoints: usize,
}

impl LoadStats {
    /// Object counts of a snapshot (files and documents left at 0).
    pub fn of(snap: &Snapshot) -> Self {
        let ports = snap.services.values().flat_map(|s| &s.endpoints);
        LoadStats {
            namespaces: snap.namespaces.len(),
            pods: snap.pods.len(),
            services: snap.services.len(),
            peer_authentications: snap.peer_authentications.len(),
            endpoints: ports.map(Vec::len).sum(),
            ..LoadStats::default()
        }
    }
}

/// Everything wrong with one load; Display prints one problem per line.
#[derive(Debug, thiserror::Error)]
#[error("{}", lines(.errors))]
pub struct ConfigError {
    pub errors: Vec<ManifestError>,
}

fn lines(errors: &[ManifestError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// One problem, located: `FILE: document N (Kind ns/name): field PATH: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {problem}", .file.display(), doc_suffix(.document))]
pub struct ManifestError {
    pub file: PathBuf,
    /// `None` for problems with a whole file or the directory.
    pub document: Option<DocumentRef>,
    pub problem: Problem,
}

fn doc_suffix(doc: &Option<DocumentRef>) -> String {
    doc.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

/// A document of a file: 1-based index, plus kind and name when known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocumentRef {
    pub index: usize,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.index)?;
        match (&self.kind, &self.namespace, &self.name) {
            (Some(k), Some(ns), Some(n)) => write!(f, " ({k} {ns}/{n})"),
            (Some(k), None, Some(n)) => write!(f, " ({k} {n})"),
            (Some(k), _, None) => write!(f, " ({k})"),
            _ => Ok(()),
        }
    }
}

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
    #[error("duplicate {kind} {name}: already defined in {} {first_document}", .first.display())]
    Duplicate {
        kind: &'static str,
        name: String,
        first: PathBuf,
        first_document: DocumentRef,
    },
    #[error(
        "enrolled pod {pod} has no {NETNS_ANNOTATION} annotation: \
         local mode needs it to find the pod's network namespace"
    )]
    MissingNetns { pod: ObjectRef },
}

/// Validation problems of one document.
trait Problems {
    fn invalid(&mut self, field: impl Into<String>, reason: impl Into<String>);
}

impl Problems for Vec<Problem> {
    fn invalid(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.push(invalid(field, reason));
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Problem {
    let (field, reason) = (field.into(), reason.into());
    Problem::Invalid { field, reason }
}

fn file_error(file: &Path, reason: String) -> ManifestError {
    let problem = Problem::Unreadable { reason };
    ManifestError {
        file: file.to_path_buf(),
        document: None,
        problem,
    }
}

/// Read and load a manifests directory.
pub fn load_dir(dir: &Path) -> Result<LoadedManifests, ConfigError> {
    load_sources(&read_sources(dir)?)
}

fn manifest_name(name: &str) -> bool {
    let ext = Path::new(name).extension().and_then(|e| e.to_str());
    let yaml = ext.is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    // Hidden files cover vim's `.x.swp`, emacs' `.#x` and atomic-save temporaries; `#x#`,
    // `x~` and `x.yaml.tmp` fail the extension test.
    yaml && !name.starts_with(['.', '#', '~'])
}

/// Read the manifest files of `dir`, sorted by name. Only a directory that cannot be listed
/// is an error here; unreadable files are reported by [`load_sources`].
pub fn read_sources(dir: &Path) -> Result<Sources, ConfigError> {
    let dir_err = |e: std::io::Error| ConfigError {
        errors: vec![file_error(dir, e.to_string())],
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_err)? {
        match entry.map_err(dir_err)?.file_name().into_string() {
            Ok(name) if manifest_name(&name) => names.push(name),
            Ok(_) => {}
            Err(name) => debug!(file = ?name, "skipping file with a non-UTF-8 name"),
        }
    }
    names.sort();
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    for name in names {
        let path = dir.join(&name);
        // Follows symlinks (ConfigMap volumes); directories named *.yaml are skipped.
        if std::fs::metadata(&path).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        match std::fs::read(&path).map(String::from_utf8) {
            Ok(Ok(text)) => files.push((path, text)),
            Ok(Err(_)) => unreadable.push((path, "not valid UTF-8 text".to_owned())),
            Err(e) => unreadable.push((path, e.to_string())),
        }
    }
    Ok(Sources::new(files, unreadable))
}

/// Where an object was defined.
#[derive(Clone, Debug)]
struct Origin {
    file: PathBuf,
    doc: DocumentRef,
}

impl Origin {
    fn error(&self, problem: Problem) -> ManifestError {
        let (file, document) = (self.file.clone(), Some(self.doc.clone()));
        ManifestError {
            file,
            document,
            problem,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.file.display(), self.doc)
    }
}

enum Object {
    Namespace(model::Namespace),
    Pod(model::Pod),
    Service(model::Service),
    PeerAuthentication(model::PeerAuthentication),
    Mesh(mesh_config::Found),
}

/// Parse, validate and build a snapshot from already read sources.
pub fn load_sources(sources: &Sources) -> Result<LoadedManifests, ConfigError> {
    let unreadable = sources.unreadable.iter();
    let mut errors: Vec<_> = unreadable.map(|(p, r)| file_error(p, r.clone())).collect();
    let mut objects = Vec::new();
    let mut stats = LoadStats::default();
    for (path, text) in &sources.files {
        parse_file(path, text, &mut objects, &mut errors, &mut stats);
    }
    let snapshot = build(objects, &mut errors);
    let (documents, ignored) = (stats.documents, stats.ignored);
    let files = sources.files.len() + sources.unreadable.len();
    let stats = LoadStats {
        files,
        documents,
        ignored,
        ..LoadStats::of(&snapshot)
    };
    if !errors.is_empty() {
        return Err(ConfigError { errors });
    }
    let fingerprint = sources.fingerprint;
    Ok(LoadedManifests {
        snapshot,
        fingerprint,
        stats,
    })
}

fn parse_file(
    path: &Path,
    text: &str,
    objects: &mut Vec<(Origin, Object)>,
    errors: &mut Vec<ManifestError>,
    stats: &mut LoadStats,
) {
    // Two iterators in lockstep: one gives a `Value` to learn the kind, the other a fresh
    // deserializer of the same document for the typed decode (keeps line numbers).
    let typed = serde_yaml::Deserializer::from_str(text);
    let docs = serde_yaml::Deserializer::from_str(text).zip(typed);
    let mut last_syntax = None;
    for (i, (value_de, typed_de)) in docs.enumerate() {
        let doc = DocumentRef {
            index: i + 1,
            ..DocumentRef::default()
        };
        let mut origin = Origin {
            file: path.to_path_buf(),
            doc,
        };
        let value = match serde_yaml::Value::deserialize(value_de) {
            Ok(v) => v,
            Err(e) => {
                // After a syntax error the parser repeats it forever: stop at the repeat.
                let mut message = e.to_string();
                let (line, column) = e.location().map(|l| (l.line(), l.column())).unzip();
                if last_syntax.as_ref() == Some(&(line, column, message.clone())) {
                    break;
                }
                last_syntax = Some((line, column, message.clone()));
                if let (Some(l), Some(c), false) = (line, column, message.contains(" at line ")) {
                    message = format!("{message} at line {l} column {c}");
                }
                errors.push(origin.error(Problem::Syntax {
                    line,
                    column,
                    message,
                }));
                continue;
            }
        };
        if value.is_null() {
            continue; // empty document (`---` separators, comments only)
        }
        stats.documents += 1;
        match parse_document(&value, typed_de, &mut origin.doc) {
            Ok(Some(obj)) => objects.push((origin, obj)),
            Ok(None) => {
                stats.ignored += 1;
                let (doc, file) = (&origin.doc, path.display());
                let kind = doc.kind.as_deref().unwrap_or("");
                let name = doc.name.as_deref().unwrap_or("");
                debug!(%file, document = doc.index, kind, name, "ignoring unhandled kind");
            }
            Err(problems) => errors.extend(problems.into_iter().map(|p| origin.error(p))),
        }
    }
}

fn parse_document(
    value: &serde_yaml::Value,
    typed: serde_yaml::Deserializer<'_>,
    doc: &mut DocumentRef,
) -> Result<Option<Object>, Vec<Problem>> {
    if !value.is_mapping() {
        return Err(vec![Problem::NotAnObject]);
    }
    let text = |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_owned);
    let meta = value.get("metadata");
    doc.kind = text(value.get("kind"));
    doc.name = text(meta.and_then(|m| m.get("name")));
    doc.namespace = text(meta.and_then(|m| m.get("namespace")));
    let mut problems = Vec::new();
    for field in ["apiVersion", "kind"] {
        match value.get(field) {
            None | Some(serde_yaml::Value::Null) => {
                problems.push(Problem::MissingTypeMeta { field })
            }
            Some(v) if !v.is_string() => problems.invalid(field, "must be a string"),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let api_version = text(value.get("apiVersion")).unwrap_or_default();
    let kind = doc.kind.clone().unwrap_or_default();
    let peer_authentication = kind == "PeerAuthentication"
        && istio::SECURITY_API_VERSIONS.contains(&api_version.as_str());
    if peer_authentication || api_version == "v1" && matches!(kind.as_str(), "Pod" | "Service") {
        doc.namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
    }
    Ok(Some(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(decode(typed, "Namespace", convert_namespace)?),
        ("v1", "Pod") => Object::Pod(decode(typed, "Pod", convert_pod)?),
        ("v1", "Service") => Object::Service(decode(typed, "Service", convert_service)?),
        _ if peer_authentication => Object::PeerAuthentication(decode(
            typed,
            "PeerAuthentication",
            istio::convert_peer_authentication,
        )?),
        ("v1", "ConfigMap")
            if doc.name.as_deref() == Some(mesh_config::CONFIG_MAP)
                && doc.namespace.as_deref() == Some(model::ROOT_NAMESPACE) =>
        {
            Object::Mesh(decode(typed, "ConfigMap", mesh_config::convert_config_map)?)
        }
        (mesh_config::OPERATOR_API_VERSION, "IstioOperator") => Object::Mesh(decode(
            typed,
            "IstioOperator",
            mesh_config::convert_operator,
        )?),
        _ => return Ok(None),
    }))
}

/// `serde_ignored`'s path in the `a.b[0].c` style of `serde_path_to_error`.
fn ignored_path(path: &serde_ignored::Path<'_>, out: &mut String) {
    use serde_ignored::Path as P;
    match path {
        P::Root => {}
        P::Seq { parent, index } => {
            ignored_path(parent, out);
            out.push_str(&format!("[{index}]"));
        }
        P::Map { parent, key } => {
            ignored_path(parent, out);
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            ignored_path(parent, out)
        }
    }
}

/// Decode a document as `T` (unknown fields are problems) and convert it to the model.
fn decode<T: DeserializeOwned, M>(
    de: serde_yaml::Deserializer<'_>,
    kind: &'static str,
    convert: impl FnOnce(T) -> Result<M, Vec<Problem>>,
) -> Result<M, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| {
        let mut field = String::new();
        ignored_path(&path, &mut field);
        problems.push(Problem::UnknownField { field, kind });
    };
    let de = serde_ignored::Deserializer::new(de, &mut on_ignored);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => match convert(v) {
            Ok(m) if problems.is_empty() => return Ok(m),
            Ok(_) => {}
            Err(more) => problems.extend(more),
        },
        Err(e) => {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            // serde_yaml prefixes its own copy of the path.
            let reason = message
                .strip_prefix(&format!("{path}: "))
                .unwrap_or(&message);
            let reason = reason.to_owned();
            let field = if path == "." {
                "(document)".into()
            } else {
                path
            };
            problems.push(Problem::Decode { field, reason });
        }
    }
    Err(problems)
}

fn object_ref(meta: &ObjectMeta, problems: &mut Vec<Problem>) -> ObjectRef {
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let namespace = non_empty(&meta.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let name = non_empty(&meta.name).unwrap_or_else(|| {
        problems.invalid("metadata.name", "missing");
        String::new()
    });
    ObjectRef { namespace, name }
}

fn done<T>(value: T, problems: Vec<Problem>) -> Result<T, Vec<Problem>> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(problems)
    }
}

fn convert_namespace(ns: k8s::Namespace) -> Result<model::Namespace, Vec<Problem>> {
    let mut problems = Vec::new();
    let name = object_ref(&ns.metadata, &mut problems).name;
    let labels = ns.metadata.labels.unwrap_or_default();
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

fn convert_pod(pod: k8s::Pod) -> Result<model::Pod, Vec<Problem>> {
    let mut problems = Vec::new();
    let meta = pod.metadata;
    let id = object_ref(&meta, &mut problems);
    let annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(NETNS_ANNOTATION));
    let netns = annotation.and_then(|v| {
        let field = format!("metadata.annotations[{NETNS_ANNOTATION:?}]");
        parse_netns(v).map_err(|r| problems.invalid(field, r)).ok()
    });
    let Some(spec) = pod.spec else {
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
    let status = pod.status.unwrap_or_default();
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
        labels: meta.labels.unwrap_or_default(),
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

fn convert_service(svc: k8s::Service) -> Result<model::Service, Vec<Problem>> {
    let mut problems = Vec::new();
    let id = object_ref(&svc.metadata, &mut problems);
    let spec = svc.spec.unwrap_or_default();
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
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

/// Origin of an earlier object with this key, recording `origin` if it is the first.
fn first_seen<K: Hash + Eq>(
    seen: &mut HashMap<K, Origin>,
    key: K,
    origin: &Origin,
) -> Option<Origin> {
    match seen.entry(key) {
        Entry::Occupied(e) => Some(e.get().clone()),
        Entry::Vacant(e) => {
            e.insert(origin.clone());
            None
        }
    }
}

fn build(objects: Vec<(Origin, Object)>, errors: &mut Vec<ManifestError>) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut seen: HashMap<(&'static str, String), Origin> = HashMap::new();
    let (mut pod_origin, mut pod_ips, mut cluster_ips) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    for (origin, obj) in objects {
        let (kind, name) = match &obj {
            Object::Namespace(n) => ("Namespace", n.name.clone()),
            Object::Pod(p) => ("Pod", p.id.to_string()),
            Object::Service(s) => ("Service", s.id.to_string()),
            Object::PeerAuthentication(p) => ("PeerAuthentication", p.id.to_string()),
            Object::Mesh(m) => ("MeshConfig", m.source.clone()),
        };
        if let Some(first) = first_seen(&mut seen, (kind, name.clone()), &origin) {
            let (first, first_document) = (first.file, first.doc);
            errors.push(origin.error(Problem::Duplicate {
                kind,
                name,
                first,
                first_document,
            }));
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
                        errors.push(origin.error(invalid("status.podIP", reason)));
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
                        errors.push(origin.error(invalid("spec.clusterIP", reason)));
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
            Object::PeerAuthentication(p) => {
                snap.peer_authentications.insert(p.id.clone(), p);
            }
            Object::Mesh(m) => match &snap.mesh.source {
                Some(first) => {
                    let reason =
                        format!("MeshConfig is already given by {first}; keep it in one place");
                    errors.push(origin.error(invalid("(document)", reason)));
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
    for pod in snap.pods.values() {
        let ns = snap.namespaces.get(&pod.id.namespace);
        let enrolled = ns.is_some_and(model::Namespace::enrolled);
        let needs_netns = enrolled && pod.node.is_some() && !pod.host_network && !pod.opted_out();
        if let (true, None, Some(origin)) = (needs_netns, &pod.netns, pod_origin.get(&pod.id)) {
            let pod = pod.id.clone();
            errors.push(origin.error(Problem::MissingNetns { pod }));
        }
    }
    for svc in snap.services.values_mut() {
        let pods = &snap.pods;
        svc.endpoints = svc.ports.iter().map(|p| endpoints(pods, svc, p)).collect();
    }
    snap
}

/// Ready pods selected by `svc`, with an IP and the target port, sorted by pod.
fn endpoints(
    pods: &BTreeMap<ObjectRef, model::Pod>,
    svc: &model::Service,
    port: &ServicePort,
) -> Vec<Endpoint> {
    let selects = |p: &model::Pod| svc.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v));
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
            let (pod, addr, node) = (p.id.clone(), SocketAddrV4::new(p.ip?, port), p.node.clone());
            Some(Endpoint { pod, addr, node })
        })
        .collect();
    eps.sort_by(|a, b| a.pod.cmp(&b.pod));
    eps
}

mod istio;
mod mesh_config;
#[cfg(test)]
mod tests;
