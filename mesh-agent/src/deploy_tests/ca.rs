//! The CA Deployment and its Service against `mesh-agent ca`: arguments, probe, the root
//! (a Secret read through the API server, whose names RBAC grants, or a mounted one), service
//! account token, and the Service agents will dial, the name they verify and the ConfigMap
//! they read the root from.

use std::path::Path;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::docs::{Doc, Object};
use super::workloads::{CA, find, first_container, mount_of, parse_cli};
use crate::Command;
use crate::app::RunArgs;
use crate::ca::ServeArgs;
use crate::ca::root_secret::{DEFAULT_ROOT_CONFIGMAP, DEFAULT_ROOT_SECRET, ROOT_CERT_KEY};
use crate::ca::token_review::ServiceAccountUser;
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
    match (&serve.root_secret, serve.root_dir.as_deref()) {
        // The names ca::API_ACCESS (and so the RBAC) grants.
        (Some(secret), _) => {
            if secret.namespace != ROOT_NAMESPACE
                || secret.name != DEFAULT_ROOT_SECRET
                || serve.root_configmap != DEFAULT_ROOT_CONFIGMAP
            {
                p.push(at(&format!(
                    "--root-secret {secret} and --root-configmap {}: the CA's RBAC \
                     (ca::API_ACCESS) grants {ROOT_NAMESPACE}/{DEFAULT_ROOT_SECRET} and \
                     {DEFAULT_ROOT_CONFIGMAP} only",
                    serve.root_configmap
                )));
            }
        }
        (None, Some(root)) => {
            if mount_of(spec, c, root).is_none_or(|(_, v)| v.secret.is_none()) {
                p.push(at(&format!(
                    "--root-dir {} is not on a Secret volume",
                    root.display()
                )));
            }
        }
        (None, None) => p.push(at(
            "args: the root comes from a kubernetes.io/tls Secret (--root-secret, or \
             --root-dir on a mounted one)",
        )),
    }
    if !serve.kubernetes || serve.manifests.is_some() || serve.node_credentials.is_some() {
        p.push(at(
            "args: in a cluster the CA runs with --kubernetes (pods from the API server, agents \
             by TokenReview), without --manifests and --node-credentials",
        ));
    }
    // In-cluster configuration reads the service account's token: it must be mounted.
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    let sa_automount = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ServiceAccount(sa) if sa.metadata.name.as_deref() == Some(account) => {
                Some(sa.automount_service_account_token)
            }
            _ => None,
        })
        .flatten();
    let automount = spec.automount_service_account_token.or(sa_automount);
    if automount == Some(false) && !crate::ca::API_ACCESS.is_empty() {
        p.push(format!(
            "{origin}: field spec.template.spec.automountServiceAccountToken: the CA needs its \
             service account's token for the API requests of ca::API_ACCESS"
        ));
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

/// The agent's CA flags against the CA: the Service's name and port, the name the CA proves,
/// a projected token for the CA's audience, the service account the CA accepts, the root.
pub fn check_link(
    agent_origin: &str,
    agent: &PodTemplateSpec,
    run: &RunArgs,
    serve: &ServeArgs,
    p: &mut Vec<String>,
) {
    let at = |what: &str| format!("{agent_origin}: container agent: {what}");
    let service = format!("{CA}.{ROOT_NAMESPACE}.svc");
    let (Some(addr), Some(root), Some(token)) = (&run.ca_addr, &run.ca_root, &run.ca_token_file)
    else {
        p.push(at(
            "args: --ca-addr, --ca-root and --ca-token-file: without the CA the agents carry \
             plaintext",
        ));
        return;
    };
    if addr.host() != service || addr.port() != serve.listen.port() {
        p.push(at(&format!(
            "--ca-addr {addr} is not the CA's Service {service}:{}",
            serve.listen.port()
        )));
    }
    if run.ca_server_name != serve.server_name {
        p.push(at(&format!(
            "--ca-server-name {} differs from the CA's --server-name {}",
            run.ca_server_name, serve.server_name
        )));
    }
    let Some(spec) = agent.spec.as_ref() else {
        return;
    };
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    let want = ServiceAccountUser {
        namespace: ROOT_NAMESPACE.into(),
        name: account.into(),
    };
    if serve.agent_service_account != want {
        p.push(format!(
            "the CA's --agent-service-account {} is not the agent's service account {}",
            serve.agent_service_account.username(),
            want.username()
        ));
    }
    let Some(c) = spec.containers.first() else {
        return;
    };
    let mount = mount_of(spec, c, root);
    match mount.and_then(|(m, v)| Some((m, v.config_map.as_ref()?))) {
        None => p.push(at(&format!(
            "--ca-root {} is not on a ConfigMap volume (the root certificate, not the Secret \
             with its key)",
            root.display()
        ))),
        // The ConfigMap, and its key, the CA publishes the root to.
        Some((m, cm)) if serve.root_secret.is_some() => {
            if cm.name != serve.root_configmap {
                p.push(at(&format!(
                    "--ca-root {} is on the ConfigMap {}, not the CA's --root-configmap {}",
                    root.display(),
                    cm.name,
                    serve.root_configmap
                )));
            }
            let file = root.strip_prefix(&m.mount_path).ok();
            let key = match cm.items.as_deref() {
                Some(items) => items
                    .iter()
                    .find(|i| file == Some(Path::new(&i.path)))
                    .map(|i| i.key.as_str()),
                None => file.and_then(|f| f.to_str()),
            };
            if key != Some(ROOT_CERT_KEY) {
                p.push(at(&format!(
                    "--ca-root {} is not the ConfigMap's key {ROOT_CERT_KEY}, where the CA \
                     publishes the root",
                    root.display()
                )));
            }
        }
        Some(_) => {}
    }
    let projected = mount_of(spec, c, token).and_then(|(m, v)| {
        let file = token.strip_prefix(&m.mount_path).ok()?;
        let sources = v.projected.as_ref()?.sources.as_ref()?;
        sources.iter().find_map(|s| {
            let t = s.service_account_token.as_ref()?;
            (Path::new(&t.path) == file).then_some(t)
        })
    });
    match projected {
        Some(t) if t.audience.as_deref() == Some(serve.audience.as_str()) => {}
        Some(t) => p.push(at(&format!(
            "--ca-token-file: the projected token's audience {:?} is not the CA's --audience {}",
            t.audience, serve.audience
        ))),
        None => p.push(at(&format!(
            "--ca-token-file {} is not a projected serviceAccountToken volume's file",
            token.display()
        ))),
    }
}
