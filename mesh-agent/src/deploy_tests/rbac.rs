//! RBAC of deploy/ against the code: what each workload's service account is granted must be
//! exactly what its code asks of the API server (the agent: `config::kube::access`, the CA:
//! `ca::API_ACCESS`): every missing and every extra (verb, group, resource, scope, object name)
//! is named, with the role that grants it. A grant narrowed by `resourceNames` covers only
//! those objects; one without covers every object, which is more than a code that names its
//! objects needs, and is named as such.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};

use super::docs::{Doc, Object};
use crate::config::kube::ApiAccess;

/// A service account's access as it should be: the workload's code's list.
pub struct Expect<'a> {
    /// `the agent (mesh-agent/src/config/kube/access.rs)`.
    pub who: &'a str,
    pub namespace: String,
    pub service_account: String,
    pub access: &'a [ApiAccess],
}

/// (verb, group, resource, namespace: `None` is cluster-wide, object name: `None` is any).
type Grant = (String, String, String, Option<String>, Option<String>);

fn describe((verb, group, resource, ns, name): &Grant) -> String {
    let group = if group.is_empty() { "core" } else { group };
    let named = match name {
        Some(n) => format!(" named {n}"),
        None => String::new(),
    };
    match ns {
        Some(ns) => format!("`{verb}` on {resource}{named} ({group} group) in namespace {ns}"),
        None => format!("`{verb}` on {resource}{named} ({group} group) cluster-wide"),
    }
}

/// The grant for any object of `g`'s kind.
fn any_name(g: &Grant) -> Grant {
    (g.0.clone(), g.1.clone(), g.2.clone(), g.3.clone(), None)
}

/// Verbs whose requests name no object, so RBAC's `resourceNames` cannot allow them.
const UNNAMED_VERBS: &[&str] = &["create", "deletecollection"];

struct Roles<'a> {
    /// (kind, namespace or "", name) -> (origin, rules).
    by_ref: BTreeMap<(&'static str, String, String), (&'a str, &'a [PolicyRule])>,
}

impl<'a> Roles<'a> {
    fn of(docs: &'a [Doc]) -> Self {
        let mut by_ref = BTreeMap::new();
        for d in docs {
            let (kind, rules) = match &d.object {
                Object::ClusterRole(r) => ("ClusterRole", r.rules.as_deref()),
                Object::Role(r) => ("Role", r.rules.as_deref()),
                _ => continue,
            };
            let meta = d.object.meta();
            let ns = meta.namespace.clone().unwrap_or_default();
            let name = meta.name.clone().unwrap_or_default();
            by_ref.insert((kind, ns, name), (d.origin.as_str(), rules.unwrap_or(&[])));
        }
        Roles { by_ref }
    }

    fn find(&self, r: &RoleRef, binding_ns: &str) -> Option<(&'static str, String, String)> {
        let key = match r.kind.as_str() {
            "ClusterRole" => ("ClusterRole", String::new(), r.name.clone()),
            "Role" => ("Role", binding_ns.to_owned(), r.name.clone()),
            _ => return None,
        };
        self.by_ref.contains_key(&key).then_some(key)
    }
}

/// Problems with the RBAC of `docs` for the workloads of `expects`.
pub fn check(docs: &[Doc], expects: &[Expect]) -> Vec<String> {
    let mut problems = Vec::new();
    let roles = Roles::of(docs);
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::ServiceAccount(_)))
        .map(|d| {
            let m = d.object.meta();
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Service account -> grant -> the role (origin) that gives it.
    let mut granted: BTreeMap<(String, String), BTreeMap<Grant, String>> = BTreeMap::new();
    let mut bound = BTreeSet::new();
    for d in docs {
        let (role_ref, subjects, scope) = match &d.object {
            Object::ClusterRoleBinding(b) => (&b.role_ref, b.subjects.as_deref(), None),
            Object::RoleBinding(b) => (
                &b.role_ref,
                b.subjects.as_deref(),
                Some(b.metadata.namespace.clone().unwrap_or_default()),
            ),
            _ => continue,
        };
        let binding_ns = scope.clone().unwrap_or_default();
        let Some(key) = roles.find(role_ref, &binding_ns) else {
            problems.push(format!(
                "{}: roleRef {} {} is not in deploy/",
                d.origin, role_ref.kind, role_ref.name
            ));
            continue;
        };
        bound.insert(key.clone());
        let (role_origin, rules) = roles.by_ref[&key];
        for subject in subjects.unwrap_or(&[]) {
            let Some(sa) = service_account(subject, &binding_ns) else {
                problems.push(format!(
                    "{}: binds {} {}; deploy/ binds only its own service accounts",
                    d.origin, subject.kind, subject.name
                ));
                continue;
            };
            if !accounts.contains(&sa) {
                problems.push(format!(
                    "{}: binds ServiceAccount {}/{}, which deploy/ does not create",
                    d.origin, sa.0, sa.1
                ));
            }
            let grants = granted.entry(sa).or_default();
            for g in expand(rules, &scope, role_origin, &mut problems) {
                grants.entry(g).or_insert_with(|| role_origin.to_owned());
            }
        }
    }
    for (key, (origin, _)) in &roles.by_ref {
        if !bound.contains(key) {
            problems.push(format!("{origin}: bound to nobody (remove it)"));
        }
    }
    let mut expected_accounts = BTreeSet::new();
    for e in expects {
        let sa = (e.namespace.clone(), e.service_account.clone());
        expected_accounts.insert(sa.clone());
        for a in e.access.iter().filter(|a| !a.names.is_empty()) {
            for verb in a.verbs.iter().filter(|v| UNNAMED_VERBS.contains(v)) {
                problems.push(format!(
                    "the access list of {} names objects for `{verb}` on {}, which RBAC \
                     cannot narrow to names",
                    e.who, a.resource
                ));
            }
        }
        let want: BTreeSet<Grant> = e
            .access
            .iter()
            .flat_map(|a| {
                let names: Vec<Option<String>> = if a.names.is_empty() {
                    vec![None]
                } else {
                    a.names.iter().map(|n| Some(n.to_string())).collect()
                };
                a.verbs.iter().flat_map(move |v| {
                    names.clone().into_iter().map(move |name| {
                        (
                            v.to_string(),
                            a.group.to_owned(),
                            a.resource.to_owned(),
                            a.namespace.map(str::to_owned),
                            name,
                        )
                    })
                })
            })
            .collect();
        let have = granted.get(&sa).cloned().unwrap_or_default();
        // A grant for any name covers a named one (and is reported below as too broad).
        let covered = |g: &Grant| have.contains_key(g) || have.contains_key(&any_name(g));
        for g in want.iter().filter(|g| !covered(g)) {
            problems.push(format!(
                "ServiceAccount {}/{} of {} lacks {}, which its code requests",
                sa.0,
                sa.1,
                e.who,
                describe(g)
            ));
        }
        for (g, origin) in have.iter().filter(|(g, _)| !want.contains(*g)) {
            let only: Vec<&str> = want
                .iter()
                .filter(|w| g.4.is_none() && any_name(w) == *g)
                .filter_map(|w| w.4.as_deref())
                .collect();
            if only.is_empty() {
                problems.push(format!(
                    "{origin}: grants {} to ServiceAccount {}/{}, which the code of {} never \
                     requests",
                    describe(g),
                    sa.0,
                    sa.1,
                    e.who
                ));
            } else {
                problems.push(format!(
                    "{origin}: grants {} on every object to ServiceAccount {}/{}; the code of \
                     {} requests it only for {} (resourceNames)",
                    describe(g),
                    sa.0,
                    sa.1,
                    e.who,
                    only.join(", ")
                ));
            }
        }
    }
    for (sa, grants) in &granted {
        if !expected_accounts.contains(sa) && !grants.is_empty() {
            problems.push(format!(
                "ServiceAccount {}/{} is granted access but runs no workload of deploy/",
                sa.0, sa.1
            ));
        }
    }
    problems
}

fn service_account(s: &Subject, binding_ns: &str) -> Option<(String, String)> {
    (s.kind == "ServiceAccount").then(|| {
        let ns = s.namespace.clone().unwrap_or_else(|| binding_ns.to_owned());
        (ns, s.name.clone())
    })
}

/// A role's rules as single grants, one per object name when the rule has `resourceNames`;
/// wildcards and non-resource URLs are problems (nothing in the code needs them), and so are
/// `resourceNames` on a verb whose requests name no object (the rule never allows it).
fn expand(
    rules: &[PolicyRule],
    scope: &Option<String>,
    origin: &str,
    problems: &mut Vec<String>,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if rule.non_resource_urls.is_some() {
            problems.push(format!(
                "{origin}: field rules[{i}]: nonResourceURLs are not used"
            ));
        }
        // Kubernetes reads an empty resourceNames as "any".
        let names: Vec<Option<String>> = match rule.resource_names.as_deref() {
            Some(n) if !n.is_empty() => n.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        if names.iter().any(Option::is_some) {
            for verb in rule
                .verbs
                .iter()
                .filter(|v| UNNAMED_VERBS.contains(&v.as_str()))
            {
                problems.push(format!(
                    "{origin}: field rules[{i}]: resourceNames cannot allow `{verb}` (its \
                     requests name no object): grant it in a rule without resourceNames"
                ));
            }
        }
        let groups = rule.api_groups.as_deref().unwrap_or(&[]);
        let resources = rule.resources.as_deref().unwrap_or(&[]);
        for list in [groups, resources, &rule.verbs] {
            if list.iter().any(|x| x.contains('*')) {
                problems.push(format!(
                    "{origin}: field rules[{i}]: wildcard `*` grants more than the code uses"
                ));
            }
        }
        for group in groups {
            for resource in resources {
                for verb in &rule.verbs {
                    for name in &names {
                        out.push((
                            verb.clone(),
                            group.clone(),
                            resource.clone(),
                            scope.clone(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
    }
    out
}
