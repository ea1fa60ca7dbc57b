//! deploy/'s files: kustomizations (the fields the kustomize of kubectl 1.20 reads, strictly),
//! what they reference, and a role for every YAML file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The deploy/ directory of this checkout.
pub fn deploy_dir() -> PathBuf {
    normalize(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("deploy"),
    )
}

/// `deploy/base/agent.yaml`, for messages.
pub fn show(path: &Path) -> String {
    let root = deploy_dir();
    match path.strip_prefix(&root) {
        Ok(rel) => format!("deploy/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Kustomization {
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub bases: Vec<String>,
    #[serde(default)]
    pub patches_strategic_merge: Vec<String>,
    #[serde(default)]
    pub patches_json6902: Vec<JsonPatchTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPatchTarget {
    pub target: Target,
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub group: Option<String>,
    pub version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

/// One operation of a JSON patch file (RFC 6902).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPatchOp {
    pub op: String,
    pub path: String,
    pub value: Option<serde_yaml::Value>,
    pub from: Option<String>,
}

/// What a YAML file under deploy/ is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Kustomization,
    /// Objects: a kustomization's `resources`, strategic-merge patches (whole objects), and
    /// the local-mode manifests of deploy/local.
    Objects,
    JsonPatch,
}

/// Every YAML file under deploy/ with its role, or the problems: a kustomization that does
/// not parse or names a missing file, and a YAML file no kustomization uses.
pub fn inventory() -> Result<BTreeMap<PathBuf, Role>, Vec<String>> {
    let root = deploy_dir();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut roles: BTreeMap<PathBuf, Role> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in &files {
        if file.file_name().and_then(|n| n.to_str()) != Some("kustomization.yaml") {
            continue;
        }
        roles.insert(file.clone(), Role::Kustomization);
        let dir = file.parent().unwrap_or(&root);
        let k = match read_kustomization(file) {
            Ok(k) => k,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let objects = k.resources.iter().chain(&k.patches_strategic_merge);
        let listed = objects.map(|f| (f, Role::Objects)).chain(
            k.patches_json6902
                .iter()
                .map(|p| (&p.path, Role::JsonPatch)),
        );
        for (name, role) in listed {
            let path = dir.join(name);
            if path.is_file() {
                roles.insert(normalize(&path), role);
            } else {
                problems.push(format!("{}: {name} is not a file", show(file)));
            }
        }
        for base in &k.bases {
            if !dir.join(base).join("kustomization.yaml").is_file() {
                problems.push(format!(
                    "{}: base {base} has no kustomization.yaml",
                    show(file)
                ));
            }
        }
    }
    let local = root.join("local");
    for file in files {
        if file.starts_with(&local) {
            roles.insert(file, Role::Objects);
        } else if !roles.contains_key(&file) {
            problems.push(format!(
                "{}: no kustomization uses this file (list it, or remove it)",
                show(&file)
            ));
        }
    }
    if problems.is_empty() {
        Ok(roles)
    } else {
        Err(problems)
    }
}

pub fn read_kustomization(file: &Path) -> Result<Kustomization, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", show(file)))?;
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
        .map_err(|e| format!("{}: field {}: {}", show(file), e.path(), e.inner()))
}

/// A JSON patch file: operations RFC 6902 knows, on absolute paths.
pub fn check_json_patch(file: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return vec![format!("{}: {e}", show(file))],
    };
    let ops: Vec<JsonPatchOp> =
        match serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text)) {
            Ok(ops) => ops,
            Err(e) => return vec![format!("{}: field {}: {}", show(file), e.path(), e.inner())],
        };
    let mut problems = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let known = ["add", "remove", "replace", "move", "copy", "test"];
        if !known.contains(&op.op.as_str()) {
            problems.push(format!("{} [{i}]: unknown op {:?}", show(file), op.op));
        }
        if !op.path.starts_with('/') {
            problems.push(format!(
                "{} [{i}]: path {:?} is not absolute",
                show(file),
                op.path
            ));
        }
        let needs_from = ["move", "copy"].contains(&op.op.as_str());
        if needs_from != op.from.is_some() {
            problems.push(format!(
                "{} [{i}]: op {} and from disagree",
                show(file),
                op.op
            ));
        }
        let needs_value = ["add", "replace", "test"].contains(&op.op.as_str());
        if needs_value != op.value.is_some() {
            problems.push(format!(
                "{} [{i}]: op {} and value disagree",
                show(file),
                op.op
            ));
        }
    }
    problems
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(normalize(&path));
        }
    }
}

/// `a/b/../c` -> `a/c` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
