//! `mesh-agent analyze FILES|DIRS...`: checks Kubernetes and Istio YAML offline, without an
//! agent, and reports problems in the format of Istio's analyzer (`istioctl analyze`), one
//! per line: `Error [IST0101] (VirtualService default/bookinfo routing.yaml:12) Referenced
//! host not found: "productpage"`.
//!
//! Objects are decoded and converted by the same code the agent runs ([`crate::config`]), so
//! everything the agent would reject is reported (as IST0106, Istio's schema validation
//! error); the checks between objects ([`routing`], [`workloads`]) follow Istio's analyzers
//! of the same codes, on the objects given (there is no cluster to look things up in).

mod input;
mod routing;
mod rules;
mod workloads;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;

use super::Output;
use crate::config::convert::{Mode, Problem};
use crate::config::manifests::{DocumentRef, Origin};
use input::Input;

/// `--help` of the command.
pub const LONG_ABOUT: &str = "\
Analyze Kubernetes and Istio YAML offline, as `istioctl analyze` does; no agent or cluster needed.

Reads the given files (`-` for standard input), and the *.yaml/*.yml files of the given \
directories (not recursive; kustomize's kustomization.yaml is skipped), each a multi-document \
stream. Every object nodemesh handles (Namespace, Pod, Service, VirtualService, \
DestinationRule, PeerAuthentication, MeshConfig) goes through the agent's own conversion, so what \
the agent would reject is reported as IST0106. Other kinds are accepted and used where they \
matter: the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and \
CronJobs count as pods, Gateways as gateways, ServiceEntry hosts as hosts.

Checks, with Istio's codes and texts: IST0101 a VirtualService's destination host, host:port, \
subset (no DestinationRule defines it) or gateway not found; IST0102 a Namespace not enabled \
for nodemesh; IST0106 schema validation (unknown or misspelled fields, invalid values, \
features nodemesh does not support); IST0112 a destination without a port on a multi-port \
Service; IST0118 a Service port whose name and appProtocol declare no protocol; IST0130 a rule \
never reached (after a rule without matches, or all its matches used before); IST0131 a match \
that duplicates (or a prefix that is covered by) an earlier one; IST0132 a VirtualService host \
its Gateway does not serve; IST0173 a DestinationRule subset that selects no pod of its \
Service; IST0174 a DestinationRule host that is no Service.

Only the objects given are known: pass the Services, workloads and Gateways your routing \
refers to. Output is sorted by code, then resource. Exit status: 0 no errors (warnings and \
info allowed), 1 errors found, 2 input unreadable (missing file, YAML syntax error, a \
directory without YAML files).";

/// Severity, as Istio names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    Error,
    Warning,
    Info,
}

/// An analyzer message type: Istio's code and level.
#[derive(Clone, Copy, Debug)]
pub struct Code(pub &'static str, pub Level);

pub const REFERENCED_RESOURCE_NOT_FOUND: Code = Code("IST0101", Level::Error);
pub const NAMESPACE_NOT_ENABLED: Code = Code("IST0102", Level::Info);
pub const SCHEMA_VALIDATION_ERROR: Code = Code("IST0106", Level::Error);
pub const PORT_SELECTOR_REQUIRED: Code = Code("IST0112", Level::Error);
pub const PORT_NAME_NOT_UNDER_CONVENTION: Code = Code("IST0118", Level::Info);
pub const UNREACHABLE_RULE: Code = Code("IST0130", Level::Warning);
pub const INEFFECTIVE_MATCH: Code = Code("IST0131", Level::Info);
pub const HOST_NOT_IN_GATEWAY: Code = Code("IST0132", Level::Warning);
pub const SUBSET_SELECTS_NO_PODS: Code = Code("IST0173", Level::Error);
pub const UNKNOWN_DESTINATION_RULE_HOST: Code = Code("IST0174", Level::Warning);

/// Where a resource was defined.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Location {
    pub file: String,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// Line the document starts on, when it could be told.
    pub line: Option<usize>,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub code: &'static str,
    pub level: Level,
    /// `Kind namespace/name` (`Kind name` for cluster-scoped kinds).
    pub resource: String,
    pub message: String,
    pub origin: Option<Location>,
}

impl Message {
    fn sort_key(&self) -> (&str, &str, &str, &Option<Location>) {
        (self.code, &self.resource, &self.message, &self.origin)
    }
}

/// Istio's line: `Level [CODE] (Kind ns/name file:line) text`.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} [{}] ({}", self.level, self.code, self.resource)?;
        match &self.origin {
            Some(Location {
                file,
                line: Some(line),
                ..
            }) => write!(f, " {file}:{line}")?,
            Some(Location { file, .. }) => write!(f, " {file}")?,
            None => {}
        }
        write!(f, ") {}", self.message)
    }
}

/// The outcome of one analysis.
#[derive(Debug, Default)]
pub struct Report {
    /// Sorted by code, then resource; no duplicates.
    pub messages: Vec<Message>,
    /// Input that could not be read (files, YAML syntax), one line each.
    pub unreadable: Vec<String>,
    pub files: usize,
    pub documents: usize,
}

impl Report {
    pub fn exit_code(&self) -> u8 {
        if !self.unreadable.is_empty() {
            2
        } else if self.messages.iter().any(|m| m.level == Level::Error) {
            1
        } else {
            0
        }
    }
}

/// Collects messages about the input's objects.
pub struct Sink<'a> {
    input: &'a Input,
    messages: Vec<Message>,
}

impl Sink<'_> {
    /// A message about the object of `kind` named `id` (its origin looked up).
    pub fn report(
        &mut self,
        kind: &str,
        id: &crate::config::model::ObjectRef,
        code: Code,
        text: String,
    ) {
        let origin = self.input.origin(kind, id);
        let resource = match origin {
            Some(o) => resource_name(&o.doc),
            None if id.namespace.is_empty() => format!("{kind} {}", id.name),
            None => format!("{kind} {id}"),
        };
        let location = origin.map(|o| self.input.location(o));
        self.push(code, resource, text, location);
    }

    /// A message about the document at `origin`.
    fn report_at(&mut self, origin: &Origin, code: Code, text: String) {
        let location = self.input.location(origin);
        self.push(code, resource_name(&origin.doc), text, Some(location));
    }

    fn push(
        &mut self,
        Code(code, level): Code,
        resource: String,
        message: String,
        origin: Option<Location>,
    ) {
        self.messages.push(Message {
            code,
            level,
            resource,
            message,
            origin,
        });
    }
}

/// `Kind ns/name`, as far as the document tells.
fn resource_name(doc: &DocumentRef) -> String {
    let name = match (&doc.name, input::namespace_of(doc)) {
        (Some(name), Some(ns)) => format!("{ns}/{name}"),
        (Some(name), None) => name.clone(),
        (None, _) => "(unnamed)".to_owned(),
    };
    match (&doc.kind, &doc.name) {
        (Some(kind), _) => format!("{kind} {name}"),
        (None, Some(_)) => name,
        (None, None) => format!("document {}", doc.index),
    }
}

/// Analyzes already read sources; `mode` says which conversion rules apply (Kubernetes for
/// YAML meant for a cluster, Local for a `--manifests` directory).
pub fn analyze(sources: &crate::config::manifests::Sources, mode: Mode) -> Report {
    let input = Input::load(sources, mode);
    let mut sink = Sink {
        input: &input,
        messages: Vec::new(),
    };
    let mut unreadable = Vec::new();
    for e in &input.errors {
        match &e.problem {
            Problem::Unreadable { .. } | Problem::Syntax { .. } => unreadable.push(e.to_string()),
            problem => match &e.document {
                Some(doc) => {
                    let origin = Origin {
                        file: e.file.clone(),
                        doc: doc.clone(),
                    };
                    sink.report_at(&origin, SCHEMA_VALIDATION_ERROR, schema_text(problem));
                }
                None => unreadable.push(e.to_string()),
            },
        }
    }
    routing::check(&mut sink);
    workloads::check(&mut sink);
    let mut messages = sink.messages;
    messages.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    messages.dedup();
    Report {
        messages,
        unreadable,
        files: sources.files.len() + sources.unreadable.len(),
        documents: input.documents,
    }
}

fn schema_text(problem: &Problem) -> String {
    format!("Schema validation error: {problem}")
}

/// The command: analyze `paths`, print, and return the exit status.
pub fn run(paths: &[PathBuf], output: Output, local: bool) -> ExitCode {
    let sources = input::read_paths(paths);
    let mode = if local { Mode::Local } else { Mode::Kubernetes };
    let report = analyze(&sources, mode);
    for line in &report.unreadable {
        eprintln!("error: {line}");
    }
    let printed = match output {
        Output::Table => Ok(report.messages.iter().map(|m| format!("{m}\n")).collect()),
        Output::Json => serde_json::to_string_pretty(&report.messages)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
        Output::Yaml => serde_yaml::to_string(&report.messages).map_err(|e| e.to_string()),
    };
    match printed {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("mesh-agent analyze: cannot format the report: {e}");
            return ExitCode::from(2);
        }
    }
    eprintln!("{}", summary(&report));
    ExitCode::from(report.exit_code())
}

fn summary(r: &Report) -> String {
    let count = |level| r.messages.iter().filter(|m| m.level == level).count();
    let scope = format!("{} file(s), {} document(s)", r.files, r.documents);
    if !r.unreadable.is_empty() {
        format!("Error: some input could not be read (analyzed {scope}).")
    } else if r.messages.is_empty() {
        format!("\u{2714} No validation issues found when analyzing {scope}.")
    } else {
        let (e, w, i) = (
            count(Level::Error),
            count(Level::Warning),
            count(Level::Info),
        );
        format!("Found {e} error(s), {w} warning(s), {i} info in {scope}.")
    }
}

#[cfg(test)]
mod tests;
