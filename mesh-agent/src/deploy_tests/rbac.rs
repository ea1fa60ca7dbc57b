//! RBAC of deploy/ against the code: what each workload's service account is granted must be
//! exactly what its code asks of the API server (the agent: `config::kube::access`, the CA:
//! `ca::API_ACCESS`): every missing and every extra (verb, group, resource, scope) is named,
//! with the role that grants it.

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

/// (verb, group, resource, namespace: `None` is cluster-wide).
type Grant = (String, String, String, Option<String>);

fn describe((verb, group, resource, ns): &Grant) -> String {
    let group = if group.is_empty() { "core" } else { group };
    match ns {
        Some(ns) => format!("`{verb}` on {resource} ({group} group) in namespace {ns}"),
        None => format!("`{verb}` on {resource} ({group} group) cluster-wide"),
    }
}

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
        let want: BTreeSet<Grant> = e
            .access
            .iter()
            .flat_map(|a| {
                a.verbs.iter().map(|v| {
                    (
                        v.to_string(),
                        a.group.to_owned(),
                        a.resource.to_owned(),
                        a.namespace.map(str::to_owned),
                    )
                })
            })
            .collect();
        let have = granted.get(&sa).cloned().unwrap_or_default();
        for g in want.iter().filter(|g| !have.contains_key(*g)) {
            problems.push(format!(
                "ServiceAccount {}/{} of {} lacks {}, which its code requests",
                sa.0,
                sa.1,
                e.who,
                describe(g)
            ));
        }
        for (g, origin) in have.iter().filter(|(g, _)| !want.contains(*g)) {
            problems.push(format!(
                "{origin}: grants {} to ServiceAccount {}/{}, which the code of {} never \
                 requests",
                describe(g),
                sa.0,
                sa.1,
                e.who
            ));
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

/// A role's rules as single grants; wildcards, resourceNames and non-resource URLs are
/// problems (nothing in the code needs them).
fn expand(
    rules: &[PolicyRule],
    scope: &Option<String>,
    origin: &str,
    problems: &mut Vec<String>,
) -> Vec<Grant> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if rule.non_resource_urls.is_some() || rule.resource_names.is_some() {
            problems.push(format!(
                "{origin}: field rules[{i}]: nonResourceURLs and resourceNames are not used"
            ));
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
                    out.push((verb.clone(), group.clone(), resource.clone(), scope.clone()));
                }
            }
        }
    }
    out
}
