//! Local mode: a directory of Kubernetes YAML (`mesh-agent run --manifests DIR`) turned into
//! one validated [`Snapshot`].
//!
//! Every `*.yaml`/`*.yml` file of the directory (not recursive, sorted by name, hidden and
//! editor temp files skipped) is a multi-document stream. `v1` Namespace, Pod and Service are
//! decoded with k8s-openapi, Istio's PeerAuthentication by [`istio`], AuthorizationPolicy by
//! [`authz`](super::convert::authz), MeshConfig from the
//! `istio` ConfigMap of the root namespace or an IstioOperator by [`mesh_config`] (unknown
//! fields are errors); other kinds are ignored. The typed objects then go through [`convert::build`],
//! the conversion Kubernetes mode uses too. A load yields either a whole snapshot or a
//! [`ConfigError`] listing every problem found: local mode never applies half a directory.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as k8s;
use serde::Deserialize;
use tracing::debug;

use super::convert::{self, Input, Mode, Problems, authz, gateway, istio, mesh_config, routing};
use super::model::ROOT_NAMESPACE;
use super::model::Snapshot;

pub use super::convert::Problem;

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
pub struct Origin {
    pub file: PathBuf,
    pub doc: DocumentRef,
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

/// A decoded document, before conversion.
pub enum Typed {
    Namespace(k8s::Namespace),
    Pod(Box<k8s::Pod>),
    Service(Box<k8s::Service>),
    PeerAuthentication(istio::PeerAuthentication),
    AuthorizationPolicy(Box<authz::AuthorizationPolicy>),
    VirtualService(Box<routing::VirtualService>),
    DestinationRule(Box<routing::DestinationRule>),
    Gateway(Box<gateway::Gateway>),
    Secret(Box<k8s::Secret>),
    ConfigMap(Box<k8s::ConfigMap>),
    IstioOperator(Box<mesh_config::IstioOperator>),
}

impl Typed {
    pub fn input(&self) -> Input<'_> {
        match self {
            Typed::Namespace(n) => Input::Namespace(n),
            Typed::Pod(p) => Input::Pod(p),
            Typed::Service(s) => Input::Service(s),
            Typed::PeerAuthentication(p) => Input::PeerAuthentication(p),
            Typed::AuthorizationPolicy(p) => Input::AuthorizationPolicy(p),
            Typed::VirtualService(v) => Input::VirtualService(v),
            Typed::DestinationRule(d) => Input::DestinationRule(d),
            Typed::Gateway(g) => Input::Gateway(g),
            Typed::Secret(s) => Input::Secret(s),
            Typed::ConfigMap(c) => Input::ConfigMap(c),
            Typed::IstioOperator(o) => Input::IstioOperator(o),
        }
    }
}

/// The documents of some sources, decoded but not converted.
pub struct Parsed {
    /// Documents of the kinds local mode handles, in file and document order.
    pub objects: Vec<(Origin, Typed)>,
    /// Documents of other kinds (Deployment, ServiceEntry, ...), as YAML: local mode ignores
    /// them, `mesh-agent analyze` looks at some.
    pub ignored: Vec<(Origin, serde_yaml::Value)>,
    /// Unreadable files, syntax errors and documents that do not decode.
    pub errors: Vec<ManifestError>,
    /// Files, documents and ignored documents counted.
    pub stats: LoadStats,
}

/// Parse every document of already read sources, without converting them.
pub fn parse_sources(sources: &Sources) -> Parsed {
    let unreadable = sources.unreadable.iter();
    let mut parsed = Parsed {
        objects: Vec::new(),
        ignored: Vec::new(),
        errors: unreadable.map(|(p, r)| file_error(p, r.clone())).collect(),
        stats: LoadStats::default(),
    };
    for (path, text) in &sources.files {
        parse_file(path, text, &mut parsed);
    }
    parsed
}

/// Parse, validate and build a snapshot from already read sources.
pub fn load_sources(sources: &Sources) -> Result<LoadedManifests, ConfigError> {
    let Parsed {
        objects,
        mut errors,
        stats,
        ..
    } = parse_sources(sources);
    let inputs = objects.iter().map(|(o, t)| (o.clone(), t.input()));
    let (snapshot, problems) = convert::build(inputs, Mode::Local);
    errors.extend(problems.into_iter().map(|(o, p)| o.error(p)));
    // Grouped by file and document, in the order they were found within each.
    errors.sort_by(|a, b| {
        let index = |e: &ManifestError| e.document.as_ref().map(|d| d.index);
        (&a.file, index(a)).cmp(&(&b.file, index(b)))
    });
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

fn parse_file(path: &Path, text: &str, parsed: &mut Parsed) {
    let Parsed {
        objects,
        ignored,
        errors,
        stats,
    } = parsed;
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
            Ok((Some(obj), problems)) => {
                errors.extend(problems.into_iter().map(|p| origin.error(p)));
                objects.push((origin, obj));
            }
            Ok((None, _)) => {
                stats.ignored += 1;
                let (doc, file) = (&origin.doc, path.display());
                let kind = doc.kind.as_deref().unwrap_or("");
                let name = doc.name.as_deref().unwrap_or("");
                debug!(%file, document = doc.index, kind, name, "ignoring unhandled kind");
                ignored.push((origin, value));
            }
            Err(problems) => errors.extend(problems.into_iter().map(|p| origin.error(p))),
        }
    }
}

/// A decoded document (`None`: a kind local mode ignores) and its unknown fields.
type Decoded = (Option<Typed>, Vec<Problem>);

fn parse_document(
    value: &serde_yaml::Value,
    typed: serde_yaml::Deserializer<'_>,
    doc: &mut DocumentRef,
) -> Result<Decoded, Vec<Problem>> {
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
    let security = istio::SECURITY_API_VERSIONS.contains(&api_version.as_str());
    let peer_authentication = security && kind == "PeerAuthentication";
    let authorization_policy = security && kind == "AuthorizationPolicy";
    let networking = routing::NETWORKING_API_VERSIONS.contains(&api_version.as_str());
    let routing_kind = networking && matches!(kind.as_str(), "VirtualService" | "DestinationRule");
    let gateway = networking && kind == "Gateway";
    if peer_authentication
        || authorization_policy
        || routing_kind
        || gateway
        || api_version == "v1" && matches!(kind.as_str(), "Pod" | "Service" | "Secret")
    {
        doc.namespace
            .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
    }
    let (obj, unknown) = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => map(decode(typed, "Namespace")?, Typed::Namespace),
        ("v1", "Pod") => map(decode(typed, "Pod")?, |p| Typed::Pod(Box::new(p))),
        ("v1", "Service") => map(decode(typed, "Service")?, |s| Typed::Service(Box::new(s))),
        _ if peer_authentication => map(
            decode(typed, "PeerAuthentication")?,
            Typed::PeerAuthentication,
        ),
        _ if authorization_policy => map(decode(typed, "AuthorizationPolicy")?, |a| {
            Typed::AuthorizationPolicy(Box::new(a))
        }),
        _ if routing_kind && kind == "VirtualService" => {
            map(decode(typed, "VirtualService")?, |v| {
                Typed::VirtualService(Box::new(v))
            })
        }
        _ if routing_kind => map(decode(typed, "DestinationRule")?, |d| {
            Typed::DestinationRule(Box::new(d))
        }),
        _ if gateway => map(decode(typed, "Gateway")?, |g| Typed::Gateway(Box::new(g))),
        ("v1", "Secret") => map(decode(typed, "Secret")?, |s| Typed::Secret(Box::new(s))),
        // MeshConfig: the `istio` ConfigMap of the root namespace, or an IstioOperator.
        ("v1", "ConfigMap")
            if doc.name.as_deref() == Some(mesh_config::CONFIG_MAP)
                && doc.namespace.as_deref() == Some(ROOT_NAMESPACE) =>
        {
            map(decode(typed, "ConfigMap")?, |c| {
                Typed::ConfigMap(Box::new(c))
            })
        }
        (mesh_config::OPERATOR_API_VERSION, "IstioOperator") => {
            map(decode(typed, "IstioOperator")?, |o| {
                Typed::IstioOperator(Box::new(o))
            })
        }
        _ => return Ok((None, Vec::new())),
    };
    Ok((Some(obj), unknown))
}

fn map<T>((v, problems): (T, Vec<Problem>), f: impl FnOnce(T) -> Typed) -> (Typed, Vec<Problem>) {
    (f(v), problems)
}

mod decode;
pub(crate) use decode::decode;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_authz;
#[cfg(test)]
mod tests_gateway;
#[cfg(test)]
mod tests_istio;
#[cfg(test)]
mod tests_routing;
