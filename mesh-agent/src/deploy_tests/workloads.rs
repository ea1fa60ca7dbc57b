//! An install (the base, or a rendered profile) against the code: the agent
//! ([`super::agent`]) and the CA ([`super::ca`]), namespaces, images, MeshConfig (read by the
//! agent's own conversion) and RBAC ([`super::rbac`]); and what both workloads use: a
//! container's command line parsed by the agent's own CLI, its volumes, quantities.

use std::path::Path;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec, Volume, VolumeMount};

use super::docs::{Doc, Object};
use super::rbac;
use crate::config::convert::mesh_config;
use crate::config::model::ROOT_NAMESPACE;
use crate::{Cli, Command};

pub const AGENT: &str = "nodemesh-agent";
pub const CA: &str = "nodemesh-ca";

/// Everything wrong with an install (the base, or a rendered profile).
pub fn check(docs: &[Doc]) -> Vec<String> {
    let mut p = Vec::new();
    namespaces(docs, &mut p);
    images(docs, &mut p);
    let agent = find(docs, "DaemonSet", AGENT).and_then(|d| match &d.object {
        Object::DaemonSet(ds) => Some((d, Some(&ds.spec.template))),
        _ => None,
    });
    let ca = find(docs, "Deployment", CA).and_then(|d| match &d.object {
        Object::Deployment(dep) => Some((d, Some(&dep.spec.template))),
        _ => None,
    });
    let (Some((agent_doc, Some(agent_tpl))), Some((ca_doc, Some(ca_tpl)))) = (agent, ca) else {
        p.push(format!("no DaemonSet {ROOT_NAMESPACE}/{AGENT} and Deployment {ROOT_NAMESPACE}/{CA} with a pod template"));
        return p;
    };
    let run = super::agent::check_agent(&agent_doc.origin, agent_tpl, &mut p);
    let serve = super::ca::check_ca(docs, &ca_doc.origin, ca_tpl, &mut p);
    if let (Some(run), Some(serve)) = (&run, &serve) {
        super::ca::check_link(&agent_doc.origin, agent_tpl, run, serve, &mut p);
    }
    let domains = [
        run.as_ref()
            .map(|r| ("the agent's --trust-domain", r.trust_domain.clone())),
        serve
            .as_ref()
            .map(|s| ("the CA's --trust-domain", s.trust_domain.clone())),
    ];
    check_mesh_config(
        docs,
        &domains.into_iter().flatten().collect::<Vec<_>>(),
        &mut p,
    );
    let account = |tpl: &PodTemplateSpec| {
        tpl.spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into())
    };
    let agent_access = crate::config::kube::agent_api_access();
    let expects = [
        rbac::Expect {
            who: "the agent (mesh-agent/src/config/kube/access.rs)",
            namespace: ROOT_NAMESPACE.into(),
            service_account: account(agent_tpl),
            access: &agent_access,
        },
        rbac::Expect {
            who: "the CA (mesh-agent/src/ca/mod.rs API_ACCESS)",
            namespace: ROOT_NAMESPACE.into(),
            service_account: account(ca_tpl),
            access: crate::ca::API_ACCESS,
        },
    ];
    p.extend(rbac::check(docs, &expects));
    p
}

pub fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| {
        let m = d.object.meta();
        d.origin.contains(&format!("({kind} "))
            && m.name.as_deref() == Some(name)
            && m.namespace.as_deref() == Some(ROOT_NAMESPACE)
    })
}

/// Every namespaced object lives in nodemesh-system, which deploy/ creates.
fn namespaces(docs: &[Doc], p: &mut Vec<String>) {
    if !docs.iter().any(|d| {
        matches!(d.object, Object::Namespace(_))
            && d.object.meta().name.as_deref() == Some(ROOT_NAMESPACE)
    }) {
        p.push(format!("no Namespace {ROOT_NAMESPACE}"));
    }
    for d in docs {
        let cluster_scoped = matches!(
            d.object,
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_)
        );
        let ns = d.object.meta().namespace.as_deref();
        if cluster_scoped != ns.is_none() || ns.is_some_and(|n| n != ROOT_NAMESPACE) {
            p.push(format!("{}: field metadata.namespace: must be {ROOT_NAMESPACE} (cluster-scoped kinds: none)", d.origin));
        }
    }
}

/// One image for every container, tagged with this crate's version.
fn images(docs: &[Doc], p: &mut Vec<String>) {
    let want = format!(
        "localhost/nodemesh/mesh-agent:{}",
        env!("CARGO_PKG_VERSION")
    );
    for d in docs {
        let tpl = match &d.object {
            Object::DaemonSet(o) => Some(&o.spec.template),
            Object::Deployment(o) => Some(&o.spec.template),
            _ => None,
        };
        for c in tpl
            .and_then(|t| t.spec.as_ref())
            .map(|s| s.containers.as_slice())
            .unwrap_or(&[])
        {
            if c.image.as_deref() != Some(want.as_str()) {
                p.push(format!(
                    "{}: container {}: image {:?}, want {want:?} (`cargo xtask image` builds it)",
                    d.origin, c.name, c.image
                ));
            }
        }
    }
}

/// The container's command line as the agent's CLI parses it, with each environment variable
/// given to the flag that reads it (clap `env`).
pub fn parse_cli(origin: &str, c: &Container, p: &mut Vec<String>) -> Option<Command> {
    if c.command.as_deref() != Some(&["mesh-agent".to_owned()][..]) {
        p.push(format!("{origin}: container {}: field command: must be [mesh-agent] (deploy/Dockerfile installs it on PATH)", c.name));
    }
    let args = c.args.clone().unwrap_or_default();
    let cli = Cli::command();
    let Some(sub) = args.first().and_then(|s| cli.find_subcommand(s)) else {
        p.push(format!(
            "{origin}: container {}: field args: must start with a mesh-agent subcommand",
            c.name
        ));
        return None;
    };
    let mut argv = vec!["mesh-agent".to_owned()];
    argv.extend(args.iter().cloned());
    for e in c.env.as_deref().unwrap_or(&[]) {
        let flag = sub
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|n| n == e.name.as_str()))
            .and_then(|a| a.get_long());
        let Some(flag) = flag else {
            p.push(format!(
                "{origin}: container {}: env {}: `mesh-agent {}` reads no such variable",
                c.name,
                e.name,
                sub.get_name()
            ));
            continue;
        };
        let field = e
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = match (&e.value, field) {
            (Some(v), None) => v.clone(),
            (None, Some(path)) => format!("downward-api-{}", path.replace('.', "-")),
            _ => {
                p.push(format!(
                    "{origin}: container {}: env {}: expected a value or a fieldRef",
                    c.name, e.name
                ));
                continue;
            }
        };
        argv.push(format!("--{flag}={value}"));
    }
    match Cli::try_parse_from(&argv) {
        Ok(cli) => Some(cli.command),
        Err(e) => {
            p.push(format!(
                "{origin}: container {}: the agent's CLI refuses `{}`: {}",
                c.name,
                argv.join(" "),
                e.render()
            ));
            None
        }
    }
}

pub fn first_container<'a>(
    origin: &str,
    tpl: &'a PodTemplateSpec,
    p: &mut Vec<String>,
) -> Option<(&'a PodSpec, &'a Container)> {
    let spec = tpl.spec.as_ref()?;
    if spec.containers.len() != 1 {
        p.push(format!(
            "{origin}: one container expected, found {}",
            spec.containers.len()
        ));
    }
    spec.containers.first().map(|c| (spec, c))
}

/// The volume mounted at the longest prefix of `path`.
pub fn mount_of<'a>(
    spec: &'a PodSpec,
    c: &'a Container,
    path: &Path,
) -> Option<(&'a VolumeMount, &'a Volume)> {
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())?;
    let v = spec.volumes.iter().flatten().find(|v| v.name == m.name)?;
    Some((m, v))
}

pub fn host_path(v: &Volume) -> Option<&str> {
    v.host_path.as_ref().map(|h| h.path.as_str())
}

/// Bytes of a Kubernetes quantity (`1Gi`, `512Mi`, `64M`, `1000`).
pub fn bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Millicores of a CPU quantity (`100m`, `2`).
pub fn millicores(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<u64>().ok()?.checked_mul(1000),
    }
}

fn check_mesh_config(docs: &[Doc], trust_domains: &[(&str, String)], p: &mut Vec<String>) {
    let cm = find(docs, "ConfigMap", mesh_config::CONFIG_MAP).and_then(|d| match &d.object {
        Object::ConfigMap(cm) => Some((d, cm)),
        _ => None,
    });
    let Some((doc, cm)) = cm else {
        p.push(format!(
            "no ConfigMap {ROOT_NAMESPACE}/{} (MeshConfig)",
            mesh_config::CONFIG_MAP
        ));
        return;
    };
    if let Err(problems) = mesh_config::convert_config_map(cm) {
        for problem in problems {
            p.push(format!("{}: {problem}", doc.origin));
        }
    }
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(mesh_config::CONFIG_MAP_KEY))
        .cloned()
        .unwrap_or_default();
    let mesh: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_default();
    let field = |k: &str| {
        mesh.get(k)
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned)
    };
    if field("rootNamespace").is_some_and(|ns| ns != ROOT_NAMESPACE) {
        p.push(format!(
            "{}: field data.mesh.rootNamespace: nodemesh's root namespace is {ROOT_NAMESPACE}",
            doc.origin
        ));
    }
    let td = field("trustDomain").unwrap_or_else(|| "cluster.local".into());
    for (who, domain) in trust_domains {
        if *domain != td {
            p.push(format!(
                "{}: field data.mesh.trustDomain {td} differs from {who} {domain}",
                doc.origin
            ));
        }
    }
}
