//! deploy/ against the code (no root, no cluster): every manifest parses strictly into its
//! k8s-openapi type; the base and each rendered profile agree with the agent's CLI, its
//! capability list, its MeshConfig conversion and its Kubernetes API access (RBAC: exactly
//! that, no more, no less); every profile renders with `kubectl kustomize`.

mod agent;
mod ca;
mod docs;
mod kustomize;
mod layout;
mod rbac;
mod workloads;

use docs::{Doc, Object};
use layout::{Role, deploy_dir, show};

/// The objects of deploy/base, as its kustomization lists them.
fn base() -> Vec<Doc> {
    let dir = deploy_dir().join("base");
    let k =
        layout::read_kustomization(&dir.join("kustomization.yaml")).expect("base kustomization");
    k.resources
        .iter()
        .flat_map(|f| {
            let path = dir.join(f);
            let text = std::fs::read_to_string(&path).expect("read");
            docs::parse(&show(&path), &text).unwrap_or_else(|e| panic!("{}", e.join("\n")))
        })
        .collect()
}

fn assert_none(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

#[test]
fn every_yaml_file_under_deploy_is_used_and_parses_strictly() {
    let roles =
        layout::inventory().unwrap_or_else(|p| panic!("deploy/ layout:\n  {}", p.join("\n  ")));
    let mut problems = Vec::new();
    let mut objects = 0;
    for (path, role) in &roles {
        match role {
            Role::Kustomization => {}
            Role::JsonPatch => problems.extend(layout::check_json_patch(path)),
            Role::Objects => {
                let text = std::fs::read_to_string(path).expect("read");
                match docs::parse(&show(path), &text) {
                    Ok(d) => objects += d.len(),
                    Err(e) => problems.extend(e),
                }
            }
        }
    }
    // A JSON patch's target is an object of the base, by group, version, kind and name.
    let base = base();
    for file in roles
        .iter()
        .filter(|(_, r)| **r == Role::Kustomization)
        .map(|(f, _)| f)
    {
        let k = layout::read_kustomization(file).expect("checked by inventory");
        for p in &k.patches_json6902 {
            let t = &p.target;
            let api_version = match &t.group {
                Some(g) if !g.is_empty() => format!("{g}/{}", t.version),
                _ => t.version.clone(),
            };
            let what = format!(
                "({} {}/{})",
                t.kind,
                t.namespace.as_deref().unwrap_or(""),
                t.name
            );
            let found = base
                .iter()
                .any(|d| d.origin.ends_with(&what) && d.object.api_version() == api_version);
            if !found {
                problems.push(format!(
                    "{}: patch {} targets {api_version} {what}, not in deploy/base",
                    show(file),
                    p.path
                ));
            }
        }
    }
    assert_none("deploy/ manifests", &problems);
    assert!(objects >= 10, "only {objects} objects under deploy/");
}

#[test]
fn the_base_agrees_with_the_code() {
    assert_none("deploy/base against the code", &workloads::check(&base()));
}

#[test]
fn every_profile_renders_with_kubectl_kustomize_and_agrees_with_the_code() {
    let test = "every_profile_renders_with_kubectl_kustomize_and_agrees_with_the_code";
    let Some(kubectl) = kustomize::kubectl_or_skip(test) else {
        return;
    };
    let profiles_dir = deploy_dir().join("profiles");
    let mut found: Vec<String> = std::fs::read_dir(&profiles_dir)
        .expect("deploy/profiles")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    found.sort();
    assert_eq!(
        found,
        ["default", "demo", "minimal"],
        "profiles in deploy/profiles"
    );
    let mut facts = Vec::new();
    for profile in &found {
        let dir = profiles_dir.join(profile);
        let text = kustomize::render(&kubectl, &dir).unwrap_or_else(|e| panic!("{e}"));
        let origin = format!("`kubectl kustomize deploy/profiles/{profile}`");
        let docs = docs::parse(&origin, &text).unwrap_or_else(|e| panic!("{}", e.join("\n")));
        assert_eq!(docs.len(), base().len(), "{origin}: objects rendered");
        assert_none(&origin, &workloads::check(&docs));
        facts.push(Facts::of(&docs));
    }
    let [default, demo, minimal] = [&facts[0], &facts[1], &facts[2]];
    // Istio's default: no access log, 1% traced; demo: access log on stdout, 100% traced.
    assert_eq!(
        (default.access_log.as_deref(), default.sampling),
        (None, Some(1.0))
    );
    assert_eq!(
        (demo.access_log.as_deref(), demo.sampling),
        (Some("/dev/stdout"), Some(100.0))
    );
    assert!(demo.tracing && default.tracing);
    // Minimal: nothing logged or traced, and the least reserved.
    assert_eq!(
        (minimal.access_log.as_deref(), minimal.tracing),
        (None, false)
    );
    assert!(
        minimal.agent_memory < default.agent_memory,
        "{minimal:?} vs {default:?}"
    );
    assert!(
        minimal.agent_cpu < default.agent_cpu,
        "{minimal:?} vs {default:?}"
    );
}

/// What distinguishes one profile from another.
#[derive(Debug)]
struct Facts {
    access_log: Option<String>,
    tracing: bool,
    sampling: Option<f64>,
    agent_memory: u64,
    agent_cpu: u64,
}

impl Facts {
    fn of(docs: &[Doc]) -> Facts {
        let cm = match workloads::find(docs, "ConfigMap", "istio").map(|d| &d.object) {
            Some(Object::ConfigMap(cm)) => cm,
            _ => panic!("no MeshConfig"),
        };
        let found = crate::config::convert::mesh_config::convert_config_map(cm).expect("valid");
        let agent = match workloads::find(docs, "DaemonSet", workloads::AGENT).map(|d| &d.object) {
            Some(Object::DaemonSet(ds)) => ds.spec.template.spec.clone(),
            _ => panic!("no agent"),
        };
        let resources = agent.expect("pod spec").containers[0]
            .resources
            .clone()
            .expect("resources");
        let limits = resources.limits.expect("limits");
        Facts {
            access_log: found.settings.access_log.map(|l| l.file.clone()),
            tracing: found.settings.tracing.is_some(),
            sampling: found.settings.tracing.as_ref().map(|t| t.sampling),
            agent_memory: workloads::bytes(&limits["memory"].0).expect("memory"),
            agent_cpu: workloads::millicores(&resources.requests.expect("requests")["cpu"].0)
                .expect("cpu"),
        }
    }
}
#[test]
fn the_dockerfile_puts_mesh_agent_on_path() {
    let path = deploy_dir().join("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("deploy/Dockerfile");
    let copies = text.lines().any(|l| {
        l.trim_start().starts_with("COPY") && l.trim_end().ends_with(" /usr/local/bin/mesh-agent")
    });
    assert!(
        copies,
        "deploy/Dockerfile must COPY the binary to /usr/local/bin/mesh-agent (the manifests run `mesh-agent`)"
    );
}

mod mutations;
