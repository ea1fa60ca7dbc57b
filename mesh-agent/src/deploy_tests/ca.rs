//! The CA Deployment and its Service against `mesh-agent ca`: arguments, probe, volumes,
//! service account token, and the Service agents will dial and the name they verify.

use std::path::Path;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::docs::{Doc, Object};
use super::workloads::{CA, find, first_container, mount_of, parse_cli};
use crate::Command;
use crate::ca::ServeArgs;
use crate::config::model::ROOT_NAMESPACE;

pub fn check_ca(
    docs: &[Doc],
    origin: &str,
    tpl: &PodTemplateSpec,
    p: &mut Vec<String>,
) -> Option<ServeArgs> {
    let (spec, c) = first_container(origin, tpl, p)?;
    let at = |what: &str| format!("{origin}: container {}: {what}", c.name);
    let serve = match parse_cli(origin, c, p) {
        Some(Command::Ca(ca)) if ca.command.is_none() => ca.serve,
        _ => {
            p.push(at("args: expected `ca` serving"));
            return None;
        }
    };
    let port = serve.listen.port();
    let probe = c.readiness_probe.as_ref().and_then(|r| r.http_get.as_ref());
    if !probe.is_some_and(|g| {
        g.port == IntOrString::Int(i32::from(port))
            && g.scheme.as_deref() == Some("HTTPS")
            && g.path.as_deref() == Some("/healthz/ready")
    }) {
        p.push(at(&format!(
            "readinessProbe: HTTPS /healthz/ready on {port} (--listen {})",
            serve.listen
        )));
    }
    let Some(root) = serve.root_dir.as_deref() else {
        p.push(at(
            "args: the root comes from a kubernetes.io/tls Secret (--root-dir)",
        ));
        return Some(serve);
    };
    let files = [
        (root, "--root-dir", true),
        (
            serve.manifests.as_deref().unwrap_or(Path::new("")),
            "--manifests",
            false,
        ),
        (
            serve.node_credentials.as_deref().unwrap_or(Path::new("")),
            "--node-credentials",
            true,
        ),
    ];
    for (path, flag, secret) in files {
        let ok = mount_of(spec, c, path).is_some_and(|(_, v)| !secret || v.secret.is_some());
        if !ok {
            p.push(at(&format!(
                "{flag} {} is not on a {}volume",
                path.display(),
                if secret { "Secret " } else { "" }
            )));
        }
    }
    if spec.automount_service_account_token != Some(false) && crate::ca::API_ACCESS.is_empty() {
        p.push(format!("{origin}: field spec.template.spec.automountServiceAccountToken: false while the CA makes no API request"));
    }
    // The Service agents will dial, and the name they verify.
    let svc = find(docs, "Service", CA).and_then(|d| match &d.object {
        Object::Service(s) => Some(s),
        _ => None,
    });
    let svc_spec = svc.and_then(|s| s.spec.as_ref());
    let labels = tpl
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selects = svc_spec
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let container_port = |t: &IntOrString| match t {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    };
    let reaches = svc_spec
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ports| {
            ports
                .iter()
                .any(|sp| sp.target_port.as_ref().and_then(container_port) == Some(i32::from(port)))
        });
    if !selects || !reaches {
        p.push(format!(
            "Service {ROOT_NAMESPACE}/{CA} must select the CA's pods and target its port {port}"
        ));
    }
    let name = format!("{CA}.{ROOT_NAMESPACE}.svc");
    if serve.server_name != name {
        p.push(at(&format!(
            "--server-name {} is not the Service's name {name}",
            serve.server_name
        )));
    }
    Some(serve)
}
