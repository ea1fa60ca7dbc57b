//! What `analyze` is given: files and directories read as local mode reads them, every
//! document decoded by its loader ([`manifests::parse_sources`]) and converted by the shared
//! conversion ([`convert::build`]); plus the kinds the agent does not handle but the checks
//! use: pod templates of workloads (decoded with k8s-openapi, unknown fields reported),
//! Gateways and ServiceEntries (names and hosts only).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1 as apps;
use k8s_openapi::api::batch::v1 as batch;
use k8s_openapi::api::core::v1 as core;
use serde_yaml::Value;

use super::Location;
use crate::config::convert::{self, Mode, Problem, routing::NETWORKING_API_VERSIONS};
use crate::config::manifests::{self, DocumentRef, ManifestError, Origin, Sources, decode};
use crate::config::model::{ObjectRef, Snapshot};
use crate::config::routing::Host;

/// Kinds without a namespace (the ones a user may plausibly pass along).
const CLUSTER_SCOPED: [&str; 9] = [
    "Namespace",
    "Node",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "PersistentVolume",
    "StorageClass",
];

/// The namespace of a document's object: `None` for cluster-scoped kinds, else as written
/// or `default`.
pub fn namespace_of(doc: &DocumentRef) -> Option<&str> {
    let kind = doc.kind.as_deref().unwrap_or_default();
    if CLUSTER_SCOPED.contains(&kind) {
        return None;
    }
    Some(doc.namespace.as_deref().unwrap_or("default"))
}

/// A pod, or a workload's pod template: what a selector can select.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything the checks look at.
pub struct Input {
    pub snapshot: Snapshot,
    /// Problems found decoding and converting, located.
    pub errors: Vec<ManifestError>,
    /// Non-empty documents read.
    pub documents: usize,
    /// Pods (converted) and pod templates.
    pub workloads: Vec<Workload>,
    /// Istio Gateways and the hosts of their servers, as written.
    pub gateways: BTreeMap<ObjectRef, Vec<String>>,
    /// Hosts declared by ServiceEntries.
    pub service_entry_hosts: Vec<Host>,
    /// Where each named object is: `(kind, namespace/name)`, namespace empty when
    /// cluster-scoped. Objects that failed conversion are here too.
    origins: HashMap<(String, ObjectRef), Origin>,
    /// The line each document starts on, per file (absent when it could not be told).
    lines: HashMap<PathBuf, Vec<usize>>,
}

impl Input {
    pub fn load(sources: &Sources, mode: Mode) -> Input {
        let parsed = manifests::parse_sources(sources);
        let inputs = parsed.objects.iter().map(|(o, t)| (o.clone(), t.input()));
        let (snapshot, problems) = convert::build(inputs, mode);
        let mut errors = parsed.errors;
        errors.extend(problems.into_iter().map(|(o, problem)| ManifestError {
            file: o.file,
            document: Some(o.doc),
            problem,
        }));
        let mut input = Input {
            snapshot,
            errors,
            documents: parsed.stats.documents,
            workloads: Vec::new(),
            gateways: BTreeMap::new(),
            service_entry_hosts: Vec::new(),
            origins: HashMap::new(),
            lines: HashMap::new(),
        };
        // Documents that did not decode count as declared too: their problem is reported
        // once, as IST0106, not again at every reference to them.
        let failed = input.errors.iter().filter_map(|e| {
            let doc = e.document.clone()?;
            let file = e.file.clone();
            Some(Origin { file, doc })
        });
        let failed: Vec<Origin> = failed.collect();
        let decoded = parsed.objects.iter().map(|(o, _)| o);
        let all = decoded.chain(parsed.ignored.iter().map(|(o, _)| o));
        for origin in all.chain(&failed) {
            if let (Some(kind), Some(name)) = (&origin.doc.kind, &origin.doc.name) {
                let namespace = namespace_of(&origin.doc).unwrap_or_default().to_owned();
                let id = ObjectRef {
                    namespace,
                    name: name.clone(),
                };
                input
                    .origins
                    .entry((kind.clone(), id))
                    .or_insert(origin.clone());
            }
        }
        for pod in input.snapshot.pods.values() {
            input.workloads.push(Workload {
                namespace: pod.id.namespace.clone(),
                labels: pod.labels.clone(),
            });
        }
        for gw in input.snapshot.gateways.values() {
            let hosts = gw.servers.iter().flat_map(|s| s.hosts.iter().cloned());
            input.gateways.insert(gw.id.clone(), hosts.collect());
        }
        for (origin, value) in parsed.ignored {
            input.other_kind(origin, value);
        }
        for (path, text) in &sources.files {
            if let Some(lines) = document_lines(text) {
                input.lines.insert(path.clone(), lines);
            }
        }
        input
    }

    /// Where the object of `kind` named `id` was defined.
    pub fn origin(&self, kind: &str, id: &ObjectRef) -> Option<&Origin> {
        self.origins.get(&(kind.to_owned(), id.clone()))
    }

    /// Whether the input has an object of `kind` named `id` (converted or not).
    pub fn declares(&self, kind: &str, id: &ObjectRef) -> bool {
        self.origin(kind, id).is_some()
    }

    pub fn location(&self, origin: &Origin) -> Location {
        let line = self.lines.get(&origin.file);
        Location {
            file: origin.file.display().to_string(),
            document: origin.doc.index,
            line: line.and_then(|l| l.get(origin.doc.index.checked_sub(1)?).copied()),
        }
    }

    /// A document of a kind the agent does not handle: keep what the checks use.
    fn other_kind(&mut self, origin: Origin, value: Value) {
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = origin.doc.kind.clone().unwrap_or_default();
        let namespace = namespace_of(&origin.doc).unwrap_or_default().to_owned();
        let networking = NETWORKING_API_VERSIONS.contains(&api);
        let o = &origin;
        let template = match (api, kind.as_str()) {
            ("apps/v1", "Deployment") => {
                self.decoded(o, value, "Deployment", |d: apps::Deployment| {
                    Some(d.spec.template)
                })
            }
            ("apps/v1", "StatefulSet") => {
                self.decoded(o, value, "StatefulSet", |d: apps::StatefulSet| {
                    Some(d.spec.template)
                })
            }
            ("apps/v1", "DaemonSet") => {
                self.decoded(o, value, "DaemonSet", |d: apps::DaemonSet| {
                    Some(d.spec.template)
                })
            }
            ("apps/v1", "ReplicaSet") => {
                self.decoded(o, value, "ReplicaSet", |d: apps::ReplicaSet| {
                    d.spec.template
                })
            }
            ("v1", "ReplicationController") => self.decoded(
                o,
                value,
                "ReplicationController",
                |d: core::ReplicationController| d.spec.and_then(|s| s.template),
            ),
            ("batch/v1", "Job") => {
                self.decoded(o, value, "Job", |d: batch::Job| d.spec.map(|s| s.template))
            }
            ("batch/v1", "CronJob") => self.decoded(o, value, "CronJob", |d: batch::CronJob| {
                d.spec.job_template.spec.map(|s| s.template)
            }),
            (_, "ServiceEntry") if networking => {
                let hosts = value.get("spec").and_then(|s| s.get("hosts"));
                let hosts = hosts.and_then(Value::as_sequence).into_iter().flatten();
                let hosts = hosts.filter_map(Value::as_str);
                let resolved = hosts.filter_map(|h| Host::resolve(h, &namespace).ok());
                self.service_entry_hosts.extend(resolved);
                None
            }
            _ => None,
        };
        if let Some(t) = template {
            let labels = t.metadata.and_then(|m| m.labels).unwrap_or_default();
            self.workloads.push(Workload { namespace, labels });
        }
    }

    /// Decodes a workload strictly (its unknown fields reported) and takes its pod template.
    fn decoded<T: serde::de::DeserializeOwned>(
        &mut self,
        origin: &Origin,
        value: Value,
        kind: &'static str,
        template: impl FnOnce(T) -> Option<core::PodTemplateSpec>,
    ) -> Option<core::PodTemplateSpec> {
        let (object, problems) = match decode::<T>(value, kind) {
            Ok((object, unknown)) => (Some(object), unknown),
            Err(problems) => (None, problems),
        };
        self.errors
            .extend(problems.into_iter().map(|problem| ManifestError {
                file: origin.file.clone(),
                document: Some(origin.doc.clone()),
                problem,
            }));
        object.and_then(template)
    }
}

/// `spec.servers[].hosts[]` of an Istio Gateway.
/// Reads the paths given: `-` is standard input, files are read as they are (any name),
/// directories as local mode reads them (`*.yaml`/`*.yml`, not recursive), less kustomize's
/// `kustomization.yaml` (not an object). A path given twice is read once.
pub fn read_paths(paths: &[PathBuf]) -> Sources {
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            let stdin = PathBuf::from(STDIN);
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
                Ok(_) => files.push((stdin, text)),
                Err(e) => unreadable.push((stdin, e.to_string())),
            }
            continue;
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => match manifests::read_sources(path) {
                Ok(s) if s.files.is_empty() && s.unreadable.is_empty() => {
                    let reason = "a directory without *.yaml or *.yml files".to_owned();
                    unreadable.push((path.clone(), reason));
                }
                Ok(s) => {
                    files.extend(s.files.into_iter().filter(|(p, _)| !kustomization(p)));
                    unreadable.extend(s.unreadable);
                }
                Err(e) => unreadable.extend(e.errors.into_iter().map(|e| {
                    let reason = match e.problem {
                        Problem::Unreadable { reason } => reason,
                        other => other.to_string(),
                    };
                    (e.file, reason)
                })),
            },
            Ok(_) => match std::fs::read(path).map(String::from_utf8) {
                Ok(Ok(text)) => files.push((path.clone(), text)),
                Ok(Err(_)) => unreadable.push((path.clone(), "not valid UTF-8 text".to_owned())),
                Err(e) => unreadable.push((path.clone(), e.to_string())),
            },
            Err(e) => unreadable.push((path.clone(), e.to_string())),
        }
    }
    let mut seen = HashSet::new();
    files.retain(|(p, _)| seen.insert(canonical(p)));
    Sources::new(files, unreadable)
}

/// The name standard input goes by in messages.
const STDIN: &str = "stdin";

fn kustomization(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    matches!(name, "kustomization.yaml" | "kustomization.yml")
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The line (1-based) each document of a YAML stream starts on, in the order the YAML
/// parser yields them; `None` when that cannot be told with certainty (the count differs
/// from the parser's, e.g. after a syntax error).
pub fn document_lines(text: &str) -> Option<Vec<usize>> {
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let content = |s: &str| {
        let t = s.trim();
        !t.is_empty() && !t.starts_with('#')
    };
    let (mut starts, mut open, mut awaiting) = (Vec::new(), false, false);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if marker(line, "---") {
            // An explicit start: the document begins here, or at its first content line.
            starts.push(n);
            open = true;
            awaiting = !content(&line[3..]);
        } else if marker(line, "...") {
            open = false;
        } else if content(line) {
            if !open && line.starts_with('%') {
                continue; // a directive, before its document's `---`
            }
            if !open {
                starts.push(n);
                open = true;
            } else if awaiting && let Some(last) = starts.last_mut() {
                *last = n;
            }
            awaiting = false;
        }
    }
    if starts.is_empty() {
        return Some(starts); // no content: nothing to locate (the parser yields one null)
    }
    (parser_documents(text)? == starts.len()).then_some(starts)
}

/// How many documents the YAML parser yields; `None` on a syntax error.
fn parser_documents(text: &str) -> Option<usize> {
    let mut count = 0;
    for doc in serde_yaml::Deserializer::from_str(text) {
        <Value as serde::Deserialize>::deserialize(doc).ok()?;
        count += 1;
    }
    Some(count)
}
