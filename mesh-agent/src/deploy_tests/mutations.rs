//! The checks fail, and say where, when deploy/ drifts from the code: each test breaks one
//! thing in a copy of the base and expects the problem that names it.

use super::docs::{Doc, Object};
use super::{base, workloads};

fn problems_after(change: impl FnOnce(&mut Vec<Doc>)) -> Vec<String> {
    let mut docs = base();
    change(&mut docs);
    workloads::check(&docs)
}

fn expect(problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "expected a problem containing {needle:?}, got:\n  {}",
        problems.join("\n  ")
    );
}

fn cluster_role(docs: &mut [Doc]) -> &mut k8s_openapi::api::rbac::v1::ClusterRole {
    docs.iter_mut()
        .find_map(|d| match &mut d.object {
            Object::ClusterRole(r) => Some(r),
            _ => None,
        })
        .expect("a ClusterRole")
}

fn agent(docs: &mut [Doc]) -> &mut k8s_openapi::api::core::v1::PodTemplateSpec {
    docs.iter_mut()
        .find_map(|d| match &mut d.object {
            Object::DaemonSet(ds) => Some(&mut ds.spec.template),
            _ => None,
        })
        .expect("the agent DaemonSet")
}

fn agent_container(docs: &mut [Doc]) -> &mut k8s_openapi::api::core::v1::Container {
    let spec = agent(docs).spec.as_mut().expect("pod spec");
    &mut spec.containers[0]
}

#[test]
fn a_verb_removed_from_the_cluster_role_is_named() {
    let p = problems_after(|docs| {
        let rules = cluster_role(docs).rules.as_mut().expect("rules");
        let pods = rules
            .iter_mut()
            .find(|r| r.resources.iter().flatten().any(|x| x == "pods"))
            .expect("a rule for pods");
        pods.resources = Some(vec!["pods".into()]);
        pods.verbs.retain(|v| v != "watch");
    });
    expect(
        &p,
        "ServiceAccount nodemesh-system/nodemesh-agent of the agent (mesh-agent/src/config/kube/access.rs) \
         lacks `watch` on pods (core group) cluster-wide",
    );
    expect(&p, "lacks `list` on namespaces (core group) cluster-wide");
}

#[test]
fn a_verb_added_to_the_cluster_role_is_named() {
    let p = problems_after(|docs| {
        let rules = cluster_role(docs).rules.as_mut().expect("rules");
        rules[0].verbs.push("delete".into());
    });
    expect(
        &p,
        "deploy/base/agent-rbac.yaml document 2 (ClusterRole nodemesh-agent): grants `delete` on \
         namespaces (core group) cluster-wide to ServiceAccount nodemesh-system/nodemesh-agent, \
         which the code of the agent",
    );
}

#[test]
fn rbac_bound_to_the_wrong_account_is_named() {
    let p = problems_after(|docs| {
        for d in docs.iter_mut() {
            if let Object::ClusterRoleBinding(b) = &mut d.object {
                b.subjects.as_mut().expect("subjects")[0].name = "nodemesh-ca".into();
            }
        }
    });
    expect(
        &p,
        "ServiceAccount nodemesh-system/nodemesh-agent of the agent",
    );
    expect(
        &p,
        "to ServiceAccount nodemesh-system/nodemesh-ca, which the code of the CA",
    );
}

#[test]
fn an_argument_the_agent_does_not_know_is_named() {
    let p = problems_after(|docs| {
        let args = agent_container(docs).args.as_mut().expect("args");
        args.push("--drain-timout=5s".into());
    });
    expect(&p, "the agent's CLI refuses `mesh-agent run --kubernetes");
    expect(&p, "--drain-timout");
}

#[test]
fn an_environment_variable_the_agent_does_not_read_is_named() {
    let p = problems_after(|docs| {
        let env = agent_container(docs).env.as_mut().expect("env");
        env[0].name = "NODENAME".into();
    });
    expect(&p, "env NODENAME: `mesh-agent run` reads no such variable");
}

#[test]
fn an_extra_capability_is_named() {
    let p = problems_after(|docs| {
        let sc = agent_container(docs)
            .security_context
            .as_mut()
            .expect("securityContext");
        let caps = sc.capabilities.as_mut().expect("capabilities");
        caps.add.as_mut().expect("add").push("NET_RAW".into());
    });
    expect(
        &p,
        "add exactly [\"BPF\", \"NET_ADMIN\", \"SYS_ADMIN\", \"SYS_PTRACE\"]",
    );
}

#[test]
fn an_agent_without_the_hosts_pids_is_named() {
    let p = problems_after(|docs| {
        agent(docs).spec.as_mut().expect("pod spec").host_pid = None;
    });
    expect(&p, "hostPID must be true");
    // Unless it is pointed at a /proc of the host mounted elsewhere.
    let p = problems_after(|docs| {
        agent(docs).spec.as_mut().expect("pod spec").host_pid = None;
        let c = agent_container(docs);
        c.args
            .as_mut()
            .expect("args")
            .push("--proc-dir=/host/proc".into());
    });
    assert!(!p.iter().any(|p| p.contains("hostPID")), "{p:?}");
}

#[test]
fn a_probe_or_scrape_port_that_is_not_the_agents_is_named() {
    let p = problems_after(|docs| {
        let tpl = agent(docs);
        let annotations = tpl.metadata.as_mut().and_then(|m| m.annotations.as_mut());
        annotations
            .expect("annotations")
            .insert("prometheus.io/port".into(), "15090".into());
        let c = &mut tpl.spec.as_mut().expect("spec").containers[0];
        c.args
            .as_mut()
            .expect("args")
            .push("--readiness-addr=0.0.0.0:15022".into());
    });
    expect(&p, "pod annotation prometheus.io/port must be \"15020\"");
    expect(&p, "readinessProbe: httpGet /healthz/ready on 15022");
}

#[test]
fn a_memory_limit_below_the_connection_budget_is_named() {
    let p = problems_after(|docs| {
        let args = agent_container(docs).args.as_mut().expect("args");
        args.retain(|a| !a.starts_with("--max-connections"));
    });
    expect(&p, "is below the agent's worst case");
}

#[test]
fn a_mesh_config_typo_is_named_by_the_agents_conversion() {
    let p = problems_after(|docs| {
        for d in docs.iter_mut() {
            if let Object::ConfigMap(cm) = &mut d.object {
                let data = cm.data.as_mut().expect("data");
                data.insert("mesh".into(), "accesLogFile: /dev/stdout\n".into());
            }
        }
    });
    expect(
        &p,
        "deploy/base/mesh-config.yaml document 1 (ConfigMap nodemesh-system/istio)",
    );
    expect(&p, "accesLogFile");
}

#[test]
fn a_ca_service_that_misses_the_ca_is_named() {
    let p = problems_after(|docs| {
        for d in docs.iter_mut() {
            if let Object::Service(s) = &mut d.object {
                let ports = s
                    .spec
                    .as_mut()
                    .and_then(|s| s.ports.as_mut())
                    .expect("ports");
                ports[0].target_port =
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15013));
            }
        }
    });
    expect(
        &p,
        "Service nodemesh-system/nodemesh-ca must select the CA's pods and target its port 15012",
    );
}

#[test]
fn a_namespaced_grant_without_its_binding_is_named() {
    let p = problems_after(|docs| docs.retain(|d| !matches!(d.object, Object::RoleBinding(_))));
    expect(
        &p,
        "lacks `watch` on configmaps (core group) in namespace nodemesh-system, which its code \
         requests",
    );
    expect(
        &p,
        "deploy/base/agent-rbac.yaml document 4 (Role nodemesh-system/nodemesh-agent): bound to \
         nobody",
    );
}

#[test]
fn cni_mounts_that_do_not_reach_the_host_are_named() {
    let p = problems_after(|docs| {
        let spec = agent(docs).spec.as_mut().expect("pod spec");
        for v in spec.volumes.iter_mut().flatten() {
            if v.name == "run" {
                v.host_path = None;
                v.empty_dir = Some(Default::default());
            }
        }
        let c = &mut spec.containers[0];
        let conf = c
            .volume_mounts
            .iter_mut()
            .flatten()
            .find(|m| m.name == "cni-conf")
            .expect("cni-conf mount");
        conf.read_only = Some(true);
    });
    expect(
        &p,
        "--cni-socket's directory /var/run/nodemesh must be a writable hostPath volume at the \
         host's /var/run/nodemesh",
    );
    expect(
        &p,
        "--cni-conf-dir /host/etc/cni/net.d must be a writable hostPath volume",
    );
    let p = problems_after(|docs| {
        let args = agent_container(docs).args.as_mut().expect("args");
        args.retain(|a| !a.starts_with("--cni-"));
    });
    expect(&p, "args: --cni-bin-dir and --cni-conf-dir must be set");
}

#[test]
fn a_ca_token_for_another_audience_is_named() {
    let p = problems_after(|docs| {
        let spec = agent(docs).spec.as_mut().expect("pod spec");
        let volume = spec
            .volumes
            .iter_mut()
            .flatten()
            .find(|v| v.name == "ca-token")
            .expect("the ca-token volume");
        let sources = volume.projected.as_mut().and_then(|p| p.sources.as_mut());
        let token = sources.expect("sources")[0]
            .service_account_token
            .as_mut()
            .expect("a serviceAccountToken");
        token.audience = None;
    });
    expect(
        &p,
        "--ca-token-file: the projected token's audience None is not the CA's --audience nodemesh-ca",
    );
}

#[test]
fn a_ca_in_local_mode_or_without_its_token_is_named() {
    let p = problems_after(|docs| {
        for d in docs.iter_mut() {
            if let Object::Deployment(dep) = &mut d.object {
                let spec = dep.spec.template.spec.as_mut();
                let spec = spec.expect("pod spec");
                spec.automount_service_account_token = Some(false);
                let args = spec.containers[0].args.as_mut().expect("args");
                args.retain(|a| a != "--kubernetes" && !a.starts_with("--root-secret"));
                args.push("--state-dir=/var/lib/nodemesh-ca".into());
                args.push("--manifests=/var/run/nodemesh/ca-manifests".into());
                args.push("--node-credentials=/var/run/nodemesh/creds.yaml".into());
            }
        }
    });
    expect(&p, "in a cluster the CA runs with --kubernetes");
    expect(&p, "the CA needs its service account's token");
}

#[test]
fn a_ca_that_accepts_another_service_account_is_named() {
    let p = problems_after(|docs| {
        let spec = agent(docs).spec.as_mut().expect("pod spec");
        spec.service_account_name = Some("other".into());
    });
    expect(
        &p,
        "the CA's --agent-service-account system:serviceaccount:nodemesh-system:nodemesh-agent is \
         not the agent's service account system:serviceaccount:nodemesh-system:other",
    );
}

fn ca_role(docs: &mut [Doc]) -> &mut k8s_openapi::api::rbac::v1::Role {
    docs.iter_mut()
        .find_map(|d| match &mut d.object {
            Object::Role(r) if r.metadata.name.as_deref() == Some("nodemesh-ca") => Some(r),
            _ => None,
        })
        .expect("the CA's Role")
}

fn ca_args(docs: &mut [Doc]) -> &mut Vec<String> {
    docs.iter_mut()
        .find_map(|d| match &mut d.object {
            Object::Deployment(dep) => dep.spec.template.spec.as_mut(),
            _ => None,
        })
        .and_then(|s| s.containers[0].args.as_mut())
        .expect("the CA's args")
}

#[test]
fn a_root_secret_grant_widened_to_every_secret_is_named() {
    let p = problems_after(|docs| {
        let rules = ca_role(docs).rules.as_mut().expect("rules");
        for r in rules.iter_mut() {
            if r.resources.iter().flatten().any(|x| x == "secrets") {
                r.resource_names = None;
            }
        }
    });
    expect(
        &p,
        "deploy/base/ca-rbac.yaml document 3 (Role nodemesh-system/nodemesh-ca): grants `get` on \
         secrets (core group) in namespace nodemesh-system on every object to ServiceAccount \
         nodemesh-system/nodemesh-ca; the code of the CA (mesh-agent/src/ca/mod.rs API_ACCESS) \
         requests it only for nodemesh-ca-root (resourceNames)",
    );
}

#[test]
fn a_missing_or_misnamed_root_grant_is_named() {
    let p = problems_after(|docs| {
        let rules = ca_role(docs).rules.as_mut().expect("rules");
        for r in rules.iter_mut() {
            if r.resources.iter().flatten().any(|x| x == "configmaps") {
                if r.resource_names.is_some() {
                    r.resource_names = Some(vec!["nodemesh-root".into()]);
                } else {
                    // `create` narrowed to a name: never allowed.
                    r.resource_names = Some(vec!["nodemesh-ca-root-cert".into()]);
                }
            }
        }
    });
    expect(
        &p,
        "lacks `patch` on configmaps named nodemesh-ca-root-cert (core group) in namespace \
         nodemesh-system, which its code requests",
    );
    expect(
        &p,
        "grants `get` on configmaps named nodemesh-root (core group) in namespace nodemesh-system \
         to ServiceAccount nodemesh-system/nodemesh-ca, which the code of the CA",
    );
    expect(
        &p,
        "resourceNames cannot allow `create` (its requests name no object)",
    );
    expect(
        &p,
        "lacks `create` on configmaps (core group) in namespace nodemesh-system",
    );
}

#[test]
fn a_root_secret_or_config_map_the_rbac_does_not_grant_is_named() {
    let p = problems_after(|docs| {
        let args = ca_args(docs);
        for a in args.iter_mut() {
            if a.starts_with("--root-secret") {
                *a = "--root-secret=nodemesh-system/my-root".into();
            }
        }
    });
    expect(
        &p,
        "--root-secret nodemesh-system/my-root and --root-configmap nodemesh-ca-root-cert: the \
         CA's RBAC (ca::API_ACCESS) grants nodemesh-system/nodemesh-ca-root and \
         nodemesh-ca-root-cert only",
    );
    let p = problems_after(|docs| {
        let spec = agent(docs).spec.as_mut().expect("pod spec");
        for v in spec.volumes.iter_mut().flatten() {
            if let Some(cm) = v.config_map.as_mut().filter(|_| v.name == "ca-root-cert") {
                cm.name = "my-root-cert".into();
            }
        }
    });
    expect(
        &p,
        "is on the ConfigMap my-root-cert, not the CA's --root-configmap nodemesh-ca-root-cert",
    );
    // A mounted Secret (cert-manager's, --root-dir) is still accepted.
    let p = problems_after(|docs| {
        let dep = docs
            .iter_mut()
            .find_map(|d| match &mut d.object {
                Object::Deployment(dep) => Some(dep),
                _ => None,
            })
            .expect("the CA");
        let spec = dep.spec.template.spec.as_mut().expect("pod spec");
        let c = &mut spec.containers[0];
        for a in c.args.iter_mut().flatten() {
            if a.starts_with("--root-secret") {
                *a = "--root-dir=/var/run/nodemesh/ca-root".into();
            }
        }
        c.volume_mounts = Some(vec![k8s_openapi::api::core::v1::VolumeMount {
            name: "root".into(),
            mount_path: "/var/run/nodemesh/ca-root".into(),
            read_only: Some(true),
            ..Default::default()
        }]);
        spec.volumes = Some(vec![k8s_openapi::api::core::v1::Volume {
            name: "root".into(),
            secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                secret_name: Some("nodemesh-ca-root".into()),
                ..Default::default()
            }),
            ..Default::default()
        }]);
    });
    assert!(p.is_empty(), "{p:?}");
}
