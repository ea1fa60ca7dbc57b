//! Local mode: a directory of Kubernetes YAML (`mesh-agent run --manifests DIR`) turned into
//! one validated [`Snapshot`].
//!
//! Every `*.yaml`/`*.yml` file of the directory (not recursive, sorted by name, hidden and
//! editor temp files skipped) is a multi-document stream. `v1` Namespace, Pod and Service are
//! decoded with k8s-openapi (unknown fields are errors); other kinds are ignored. A load
//! yields either a whole snapshot or a [`ConfigError`] listing every problem found.

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
    if api_version == "v1" && matches!(kind.as_str(), "Pod" | "Service") {
        doc.namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
    }
    Ok(Some(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(decode(typed, "Namespace", convert_namespace)?),
        ("v1", "Pod") => Object::Pod(decode(typed, "Pod", convert_pod)?),
        ("v1", "Service") => Object::Service(decode(typed, "Service", convert_service)?),
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

#[cfg(test)]
mod tests {
    use super::super::model::ENROLL_LABEL;
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\n\
        metadata: {name: bookinfo, labels: {nodemesh.io/enabled: \"true\"}}\n";
    const SVC: &str = "apiVersion: v1\nkind: Service\n\
        metadata: {name: reviews, namespace: bookinfo}\n\
        spec:\n  clusterIP: 10.96.0.10\n  selector: {app: reviews}\n\
        \x20 ports: [{name: http, port: 80, targetPort: http}]\n";

    /// A pod of `app: reviews` on node1 with a container port named http; `spec` and
    /// `status` lines (indented by 2) are appended to those blocks.
    fn pod(name: &str, ip: &str, spec: &str, status: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: bookinfo\n\
             \x20 labels: {{app: reviews}}\n  annotations: {{nodemesh.io/netns: {name}}}\n\
             spec:\n  nodeName: node1\n  containers:\n  - name: app\n    image: reviews\n\
             \x20   ports: [{{name: http, containerPort: 9080}}]\n\
             {spec}status:\n  podIP: {ip}\n{status}"
        )
    }

    fn load(files: &[(&str, &str)]) -> Result<LoadedManifests, ConfigError> {
        load_sources(&Sources::from_texts(files.iter().copied()))
    }

    fn err(files: &[(&str, &str)]) -> String {
        let result = load(files).map(|_| ());
        result.expect_err("expected an error").to_string()
    }

    fn has(text: &str, needle: &str) {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }

    fn id(name: &str) -> ObjectRef {
        let (namespace, name) = ("bookinfo".into(), name.into());
        ObjectRef { namespace, name }
    }

    fn stream(docs: &[&str]) -> String {
        docs.join("---\n")
    }

    #[test]
    fn happy_path_named_target_port() {
        let sa = "  serviceAccountName: bookinfo-reviews\n";
        let (r3, r1) = (
            pod("r3", "10.1.0.13", "", ""),
            pod("r1", "10.1.0.11", "", ""),
        );
        let yaml = stream(&[NS, &r3, &r1, &pod("r2", "10.1.0.12", sa, ""), SVC]);
        let loaded = load(&[("m/app.yaml", &yaml)]).expect("loads");
        let snap = &loaded.snapshot;
        let svc = &snap.services[&id("reviews")];
        assert_eq!(svc.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
        let eps = svc.endpoints[0]
            .iter()
            .map(|e| format!("{} {}", e.pod, e.addr));
        let want = ["bookinfo/r1 10.1.0.11:9080", "bookinfo/r2 10.1.0.12:9080"];
        assert_eq!(
            eps.collect::<Vec<_>>(),
            [want[0], want[1], "bookinfo/r3 10.1.0.13:9080"]
        );
        assert_eq!(svc.endpoints[0][0].node.as_deref(), Some("node1"));
        let dst = "10.96.0.10:80".parse().expect("addr");
        let (found, idx) = snap.service_for(dst).expect("indexed");
        assert_eq!((found.id.name.as_str(), idx), ("reviews", 0));
        let r2 = snap.pod_by_ip(Ipv4Addr::new(10, 1, 0, 12)).expect("by ip");
        assert_eq!(r2.service_account, "bookinfo-reviews");
        assert_eq!(r2.netns.as_deref(), Some(Path::new("/var/run/netns/r2")));
        let r1 = &snap.pods[&id("r1")];
        assert_eq!(
            (r1.service_account.as_str(), r1.ports[0].port),
            ("default", 9080)
        );
        assert!(snap.namespaces["bookinfo"].enrolled());
        assert_eq!(snap.enrolled_pods("node1").count(), 3);
        let s = loaded.stats;
        let counts = [
            s.files,
            s.documents,
            s.ignored,
            s.pods,
            s.services,
            s.endpoints,
        ];
        assert_eq!(counts, [1, 5, 0, 3, 1, 3]);
        assert_eq!(snap.generation, 0);
    }

    #[test]
    fn readiness_numeric_ports_and_implicit_namespace() {
        let ready = |s| format!("  conditions: [{{type: Ready, status: \"{s}\"}}]\n");
        let running = format!("  phase: Running\n{}", ready("True"));
        let no_status = "apiVersion: v1\nkind: Pod\n\
            metadata: {name: e, namespace: bookinfo, labels: {app: reviews}}\n\
            spec: {containers: [{name: x}]}\n";
        let ports = "[{name: a, port: 80, targetPort: 8080}, {name: b, port: 9080}, \
            {port: 53, protocol: UDP}]";
        let svc = SVC.replace("10.96.0.10", "None");
        let svc = svc.replace("[{name: http, port: 80, targetPort: http}]", ports);
        let yaml = stream(&[
            &pod("a", "10.1.0.1", "", &ready("False")),
            &pod("b", "10.1.0.2", "", "  phase: Pending\n"),
            &pod("c", "10.1.0.3", "", &running),
            &pod("d", "10.1.0.4", "", "  phase: Running\n"),
            no_status,
            &svc,
        ]);
        let snap = load(&[("x.yaml", &yaml)]).expect("loads").snapshot;
        let ready = ["a", "b", "c", "d", "e"].map(|p| snap.pods[&id(p)].ready);
        assert_eq!(ready, [false, false, true, true, true]);
        let e = &snap.pods[&id("e")];
        assert_eq!((e.ip, e.node.as_deref()), (None, None));
        let svc = &snap.services[&id("reviews")];
        assert_eq!(
            (svc.cluster_ip, svc.ports.len()),
            (None, 2),
            "headless, UDP skipped"
        );
        assert_eq!(svc.ports[1].target_port, TargetPort::Number(9080));
        let addrs: Vec<String> = svc.endpoints[0]
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.1.0.3:8080", "10.1.0.4:8080"]);
        assert!(snap.by_cluster_ip.is_empty());
        assert!(
            !snap.namespaces["bookinfo"].enrolled(),
            "implicit namespace"
        );
        assert_eq!(snap.enrolled_pods("node1").count(), 0);
    }

    #[test]
    fn pods_without_the_named_port_are_skipped() {
        let web = pod("b", "10.1.0.2", "", "").replace("name: http", "name: web");
        let yaml = stream(&[&pod("a", "10.1.0.1", "", ""), &web, SVC]);
        let snap = load(&[("x.yaml", &yaml)]).expect("loads").snapshot;
        let eps = &snap.services[&id("reviews")].endpoints[0];
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].pod, id("a"));
    }

    #[test]
    fn yaml_syntax_error_names_file_document_line() {
        let yaml = format!("{NS}---\nkind: Pod\nmetadata: {{name: [x}}\n---\n{SVC}");
        let e = err(&[("m/bad.yaml", &yaml)]);
        assert!(
            e.starts_with("m/bad.yaml: document 2: YAML syntax error: "),
            "{e}"
        );
        has(&e, "line 6");
        assert_eq!(e.lines().count(), 1, "{e}");
        let e = err(&[("d.yaml", "a: 1\na: 2\n---\na: 1\na: 2\n")]);
        assert_eq!(e.lines().count(), 2, "{e}");
        has(
            &e,
            "d.yaml: document 1: YAML syntax error: duplicate entry with key \"a\"",
        );
        has(&e, "at line 1 column 1");
    }

    #[test]
    fn unknown_fields_named_by_path() {
        let yaml = pod("x", "10.1.0.1", "", "").replace("image:", "imagee:");
        let e = err(&[("a.yaml", &yaml.replace("labels:", "lables:"))]);
        let at = "a.yaml: document 1 (Pod bookinfo/x): field";
        has(&e, &format!("{at} metadata.lables: unknown field of Pod"));
        has(
            &e,
            &format!("{at} spec.containers[0].imagee: unknown field of Pod"),
        );
        assert_eq!(e.lines().count(), 2, "{e}");
    }

    #[test]
    fn all_errors_collected_with_field_paths() {
        let svc = SVC.replace("targetPort: http", "targetPort: [1]");
        let svc = svc.replace("namespace: bookinfo", "namespace: default");
        let bad_port = pod("p", "10.1.0.1", "", "").replace("9080", "abc");
        let e = err(&[("a.yaml", &stream(&[NS, &svc])), ("b.yaml", &bad_port)]);
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        has(lines[0], "a.yaml: document 2 (Service default/reviews): ");
        has(
            lines[0],
            "field spec.ports[0].targetPort: invalid type: sequence",
        );
        has(lines[1], "b.yaml: document 1 (Pod bookinfo/p): ");
        has(
            lines[1],
            "field spec.containers[0].ports[0].containerPort: invalid type",
        );
    }

    #[test]
    fn service_validation() {
        let e = err(&[("s.yaml", &SVC.replace("  selector: {app: reviews}\n", ""))]);
        has(
            &e,
            "s.yaml: document 1 (Service bookinfo/reviews): field spec.selector: missing",
        );
        let no_ports =
            "apiVersion: v1\nkind: Service\nmetadata: {name: r}\nspec: {selector: {a: r}}";
        let e = err(&[("s.yaml", no_ports)]);
        let want = "s.yaml: document 1 (Service default/r): field spec.ports: missing; \
            a service needs at least one port";
        assert_eq!(e, want);
        let bad = SVC.replace(
            "port: 80, targetPort: http",
            "port: 70000, targetPort: \"80\"",
        );
        let e = err(&[("s.yaml", &bad.replace("10.96.0.10", "10.96.0"))]);
        has(
            &e,
            "field spec.ports[0].port: port 70000 is out of range 1..65535",
        );
        has(
            &e,
            "field spec.ports[0].targetPort: \"80\" is neither a port number nor a",
        );
        has(
            &e,
            "field spec.clusterIP: \"10.96.0\" is not an IPv4 address",
        );
    }

    #[test]
    fn enrolled_pod_needs_netns_annotation() {
        let bare = pod("x", "10.1.0.1", "", "");
        let bare = bare.replace("  annotations: {nodemesh.io/netns: x}\n", "");
        let e = err(&[("a.yaml", &stream(&[NS, &bare]))]);
        let want = "a.yaml: document 2 (Pod bookinfo/x): enrolled pod bookinfo/x has no \
            nodemesh.io/netns annotation: local mode needs it to find the pod's network namespace";
        assert_eq!(e, want);
        load(&[("a.yaml", &bare)]).expect("unenrolled namespace: no annotation needed");
        let node = "  nodeName: node1\n";
        let host = bare.replace(node, "  nodeName: node1\n  hostNetwork: true\n");
        let opt_out = format!("{{app: reviews, {ENROLL_LABEL}: \"false\"}}");
        let out = bare.replace("{app: reviews}", &opt_out);
        for ok in [host, out, bare.replace(node, "")] {
            load(&[("a.yaml", &stream(&[NS, &ok]))]).expect("no annotation needed");
        }
    }

    #[test]
    fn netns_annotation_and_pod_ip_values() {
        let netns = |s| parse_netns(s).map(|p| p.display().to_string());
        assert_eq!(netns("pod1"), Ok("/var/run/netns/pod1".to_owned()));
        assert_eq!(netns("/proc/42/ns/net"), Ok("/proc/42/ns/net".to_owned()));
        for bad in ["", "a/b", "..", ".", "/var/run/netns/../x"] {
            assert!(parse_netns(bad).is_err(), "{bad:?}");
        }
        let yaml = pod("x", "10.1.0.1", "", "").replace("netns: x", "netns: ../x");
        let e = err(&[("a.yaml", &yaml)]);
        has(
            &e,
            "field metadata.annotations[\"nodemesh.io/netns\"]: \"../x\" must not",
        );
        let e = err(&[("a.yaml", &pod("x", "fd00::1", "", ""))]);
        has(&e, "field status.podIP: \"fd00::1\" is not an IPv4 address");
    }

    #[test]
    fn other_kinds_and_empty_documents_ignored() {
        let yaml = "---\n# comment only\n---\n\
            apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {x: 1}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\n---\n\
            apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\n---\n";
        let loaded = load(&[("a.yaml", yaml)]).expect("loads");
        assert_eq!((loaded.stats.documents, loaded.stats.ignored), (3, 3));
        assert!(loaded.snapshot.pods.is_empty() && loaded.snapshot.namespaces.is_empty());
    }

    #[test]
    fn missing_type_meta_and_non_objects() {
        let e = err(&[("a.yaml", "metadata: {name: x}\n---\n- 1\n")]);
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        has(
            lines[0],
            "a.yaml: document 1: field apiVersion: missing; every Kubernetes object",
        );
        has(lines[1], "a.yaml: document 1: field kind: missing");
        has(lines[2], "a.yaml: document 2: not a Kubernetes object");
    }

    #[test]
    fn duplicates_across_files() {
        let (x, y) = (pod("x", "10.1.0.1", "", ""), pod("y", "10.1.0.1", "", ""));
        let files = [("a.yaml", stream(&[NS, &x])), ("b.yaml", stream(&[&x, &y]))];
        let e = err(&files.each_ref().map(|(n, t)| (*n, t.as_str())));
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        let want = "b.yaml: document 1 (Pod bookinfo/x): duplicate Pod bookinfo/x: \
            already defined in a.yaml document 2 (Pod bookinfo/x)";
        assert_eq!(lines[0], want);
        has(
            lines[1],
            "b.yaml: document 2 (Pod bookinfo/y): field status.podIP: ",
        );
        has(
            lines[1],
            "10.1.0.1 is also the IP of the pod in a.yaml document 2",
        );
    }

    #[test]
    fn enrolled_pods_filtering() {
        let opt_out = "{app: reviews, nodemesh.io/enabled: \"false\"}";
        let yaml = stream(&[
            NS,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n",
            &pod("here", "10.1.0.1", "", ""),
            &pod("there", "10.1.0.2", "", "").replace("node1", "node2"),
            &pod("host", "10.0.0.1", "  hostNetwork: true\n", ""),
            &pod("out", "10.1.0.3", "", "").replace("{app: reviews}", opt_out),
            &pod("other", "10.1.0.4", "", "").replace("bookinfo", "plain"),
        ]);
        let snap = load(&[("a.yaml", &yaml)]).expect("loads").snapshot;
        let pods = |node| snap.enrolled_pods(node).map(|p| p.id.name.as_str());
        assert_eq!(pods("node1").collect::<Vec<_>>(), ["here"]);
        assert_eq!(pods("node2").collect::<Vec<_>>(), ["there"]);
        let host_ip = Ipv4Addr::new(10, 0, 0, 1);
        assert!(
            snap.pod_by_ip(host_ip).is_none(),
            "hostNetwork IPs are not pod IPs"
        );
    }

    #[test]
    fn load_dir_reads_sorted_manifests_only() {
        let dir = std::env::temp_dir().join(format!("nodemesh-manifests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub.yaml")).expect("mkdir");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write("b.yml", &pod("x", "10.1.0.1", "", ""));
        write("a.yaml", NS);
        let junk = [
            ".a.yaml.swp",
            ".#a.yaml",
            "a.yaml~",
            "#a.yaml#",
            "x.txt",
            ".h.yaml",
        ];
        junk.iter().for_each(|name| write(name, "{{{ not yaml"));
        let sources = read_sources(&dir).expect("read");
        let names = sources.files.iter().map(|(p, _)| p.strip_prefix(&dir).ok());
        let want = [Some(Path::new("a.yaml")), Some(Path::new("b.yml"))];
        assert_eq!(names.collect::<Vec<_>>(), want);
        let first = load_dir(&dir).expect("loads");
        assert_eq!(first.snapshot.pods.len(), 1);
        assert_eq!(
            load_dir(&dir).expect("loads").fingerprint,
            first.fingerprint
        );
        let typo =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{imagee: b}]}";
        write("b.yml", typo);
        let e = load_dir(&dir).expect_err("unknown field").to_string();
        let at = format!(
            "{}: document 1 (Pod default/x)",
            dir.join("b.yml").display()
        );
        assert!(e.starts_with(&at), "{e}");
        assert_ne!(
            read_sources(&dir).expect("read").fingerprint,
            first.fingerprint
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
        let e = load_dir(&dir).expect_err("missing directory").to_string();
        has(&e, "cannot read");
    }
}
