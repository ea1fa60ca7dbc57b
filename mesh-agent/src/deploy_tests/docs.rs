//! Kubernetes YAML read strictly into k8s-openapi types. k8s-openapi ignores unknown fields,
//! so each object is serialized back and compared with what was read: a field that does not
//! survive the round trip is one the type does not have (a typo, or a field in the wrong
//! place), reported with its path.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// One object of deploy/ and where it came from.
#[derive(Clone, Debug)]
pub struct Doc {
    /// `deploy/base/agent.yaml document 2 (DaemonSet nodemesh-system/nodemesh-agent)`.
    pub origin: String,
    pub object: Object,
}

/// The kinds deploy/ may hold.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Service),
    Pod(Pod),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
}

impl Object {
    pub fn api_version(&self) -> &'static str {
        match self {
            Object::Namespace(_)
            | Object::ServiceAccount(_)
            | Object::ConfigMap(_)
            | Object::Secret(_)
            | Object::Service(_)
            | Object::Pod(_) => "v1",
            Object::DaemonSet(_) | Object::Deployment(_) => "apps/v1",
            Object::ClusterRole(_)
            | Object::ClusterRoleBinding(_)
            | Object::Role(_)
            | Object::RoleBinding(_) => "rbac.authorization.k8s.io/v1",
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::Role(o) => &o.metadata,
            Object::RoleBinding(o) => &o.metadata,
        }
    }
}

/// Reads a type strictly: a decode error names its field; so does a field the type lacks.
pub fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| format!("field {}: {}", e.path(), e.inner()))?;
    let back = serde_yaml::to_value(&typed).map_err(|e| format!("re-encoding: {e}"))?;
    match difference(value, &back, "") {
        Some(d) => Err(d),
        None => Ok(typed),
    }
}

/// The first place where `read` has something `back` (the round trip) lost or changed.
fn difference(read: &Value, back: &Value, path: &str) -> Option<String> {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (read, back) {
        (Value::Mapping(r), Value::Mapping(b)) => r.iter().find_map(|(k, v)| {
            let key = match k {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            match b.get(k) {
                Some(bv) => difference(v, bv, &at(&key)),
                None if v.is_null() => None,
                None => Some(format!(
                    "field {}: unknown field (misspelled, or in the wrong place)",
                    at(&key)
                )),
            }
        }),
        (Value::Sequence(r), Value::Sequence(b)) if r.len() == b.len() => r
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (rv, bv))| difference(rv, bv, &format!("{path}[{i}]"))),
        (Value::Tagged(_), _) => Some(format!("field {path}: YAML tags are not Kubernetes YAML")),
        (r, b) if r == b => None,
        (r, b) => Some(format!(
            "field {path}: {} reads back as {}",
            inline(r),
            inline(b)
        )),
    }
}

fn inline(v: &Value) -> String {
    serde_yaml::to_string(v).map_or_else(|_| format!("{v:?}"), |s| s.trim_end().to_owned())
}

fn typed<T: DeserializeOwned + Serialize>(
    value: &Value,
    wrap: fn(T) -> Object,
) -> Result<Object, String> {
    strict::<T>(value).map(wrap)
}

/// The object of one YAML document, by its apiVersion and kind.
pub fn object(value: &Value) -> Result<Object, String> {
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or("");
    match (field("apiVersion"), field("kind")) {
        ("v1", "Namespace") => typed(value, Object::Namespace),
        ("v1", "ServiceAccount") => typed(value, Object::ServiceAccount),
        ("v1", "ConfigMap") => typed(value, Object::ConfigMap),
        ("v1", "Secret") => typed(value, Object::Secret),
        ("v1", "Service") => typed(value, Object::Service),
        ("v1", "Pod") => typed(value, Object::Pod),
        ("apps/v1", "DaemonSet") => typed(value, Object::DaemonSet),
        ("apps/v1", "Deployment") => typed(value, Object::Deployment),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed(value, Object::ClusterRole),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            typed(value, Object::ClusterRoleBinding)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => typed(value, Object::Role),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => typed(value, Object::RoleBinding),
        (api_version, kind) => Err(format!(
            "apiVersion {api_version:?} kind {kind:?} is not a kind deploy/ ships \
             (add it to deploy_tests::docs::object if it should be)"
        )),
    }
}

/// Every document of a YAML text (empty ones skipped), or every problem, each naming the
/// file, the document (1-based) and the field.
pub fn parse(file: &str, text: &str) -> Result<Vec<Doc>, Vec<String>> {
    let mut docs = Vec::new();
    let mut problems = octal_looking_numbers(file, text);
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = match <Value as serde::Deserialize>::deserialize(de) {
            Ok(v) if v.is_null() => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{file} document {n}: not YAML: {e}"));
                continue;
            }
        };
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("?");
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str);
        let what = match (ns, name) {
            (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
            (None, Some(name)) => format!("{kind} {name}"),
            _ => kind.to_owned(),
        };
        let origin = format!("{file} document {n} ({what})");
        match object(&value) {
            Ok(object) => docs.push(Doc { origin, object }),
            Err(e) => problems.push(format!("{origin}: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(docs)
    } else {
        Err(problems)
    }
}

/// `mode: 0644`: kubectl (YAML 1.1) reads an octal 420, YAML 1.2 readers a decimal 644.
/// Write such numbers in decimal, with the octal in a comment.
fn octal_looking_numbers(file: &str, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let code = line.split(" #").next().unwrap_or(line);
            let value = code.split_once(": ").map(|(_, v)| v.trim())?;
            let octal = value.len() > 1
                && value.starts_with('0')
                && value.bytes().all(|b| b.is_ascii_digit());
            octal.then(|| {
                format!(
                    "{file} line {}: {value} is octal to kubectl and decimal to YAML 1.2 \
                     readers; write it in decimal",
                    i + 1
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SA: &str = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: b\n";

    #[test]
    fn reads_a_known_kind() {
        let docs = parse("x.yaml", SA).unwrap();
        assert_eq!(docs[0].origin, "x.yaml document 1 (ServiceAccount b/a)");
        assert!(matches!(docs[0].object, Object::ServiceAccount(_)));
    }

    #[test]
    fn a_misspelled_field_is_named() {
        let yaml = format!("---\n{SA}automountServiceAcountToken: false\n");
        let e = parse("x.yaml", &yaml).unwrap_err();
        assert_eq!(
            e,
            [
                "x.yaml document 1 (ServiceAccount b/a): field automountServiceAcountToken: \
              unknown field (misspelled, or in the wrong place)"
            ]
        );
        let nested = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  \
                      - port: 80\n    targetport: 8080\n";
        let e = parse("s.yaml", nested).unwrap_err();
        assert!(
            e[0].ends_with(
                "field spec.ports[0].targetport: unknown field (misspelled, or in the wrong place)"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_wrong_type_is_named() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  n: 1\n";
        let e = parse("c.yaml", yaml).unwrap_err();
        assert!(
            e[0].starts_with("c.yaml document 1 (ConfigMap c): field data.n:"),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_kinds_and_octal_numbers_are_refused() {
        let e = parse(
            "k.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n",
        )
        .unwrap_err();
        assert!(
            e[0].contains("kind \"Node\" is not a kind deploy/ ships"),
            "{e:?}"
        );
        let secret = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: []\n  \
                      volumes:\n  - name: s\n    secret:\n      defaultMode: 0440\n";
        let e = parse("p.yaml", secret).unwrap_err();
        assert!(e[0].starts_with("p.yaml line 9: 0440 is octal"), "{e:?}");
    }
}
