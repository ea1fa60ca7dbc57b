//! The agent DaemonSet against the agent: `mesh-agent run` arguments, ports, probes, paths,
//! capabilities, shutdown timing and memory budget, compared with what its CLI parsed.

use std::path::Path;

use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::workloads::{bytes, first_container, host_path, mount_of, parse_cli};
use crate::Command;
use crate::app::RunArgs;

/// What an agent needs besides its connection buffers (measured idle: about 20 MB).
const AGENT_HEADROOM: u64 = 128 << 20;

pub fn check_agent(origin: &str, tpl: &PodTemplateSpec, p: &mut Vec<String>) -> Option<RunArgs> {
    let (spec, c) = first_container(origin, tpl, p)?;
    let at = |what: &str| format!("{origin}: container {}: {what}", c.name);
    let Some(Command::Run(run)) = parse_cli(origin, c, p) else {
        p.push(at("args: expected `run`"));
        return None;
    };
    if !run.kubernetes || run.manifests.is_some() {
        p.push(at("args: the DaemonSet runs the agent with --kubernetes"));
    }
    // One spec for every node: the node name comes from the downward API.
    let node_env = c.env.iter().flatten().find(|e| e.name == "NODE_NAME");
    let from_node = node_env
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .is_some_and(|f| f.field_path == "spec.nodeName");
    if !from_node || c.args.iter().flatten().any(|a| a.starts_with("--node")) {
        p.push(at(
            "env NODE_NAME must come from fieldRef spec.nodeName (and args must not set --node)",
        ));
    }
    if spec.host_network != Some(true) {
        p.push(format!("{origin}: field spec.template.spec.hostNetwork: the agent's ports are on the node's network"));
    }
    // Pods that predate the agent are found in the host's /proc (--proc-dir): without
    // hostPID the container's /proc shows only its own processes.
    if spec.host_pid != Some(true) && run.proc_dir == Path::new("/proc") {
        p.push(format!(
            "{origin}: field spec.template.spec.hostPID must be true: the agent finds pods that \
             were running before it in the host's /proc (--proc-dir {})",
            run.proc_dir.display()
        ));
    }
    capabilities(c, &at, p);
    probes_and_ports(tpl, c, &run, &at, p);
    paths(spec, c, &run, &at, p);
    shutdown(spec, c, &run, &at, p);
    let limit = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| bytes(&q.0));
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    if !requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")) {
        p.push(at("resources.requests: cpu and memory must be requested"));
    }
    let worst = run.max_connections * 2 * run.buffer_size as u64 + AGENT_HEADROOM;
    if limit.is_none_or(|l| l < worst) {
        p.push(at(&format!(
            "resources.limits.memory {limit:?} is below the agent's worst case {worst} bytes \
             (--max-connections {} x 2 x --buffer-size {} + {AGENT_HEADROOM})",
            run.max_connections, run.buffer_size
        )));
    }
    Some(*run)
}

fn capabilities(c: &Container, at: &dyn Fn(&str) -> String, p: &mut Vec<String>) {
    let sc = c.security_context.as_ref();
    if sc.and_then(|s| s.privileged) == Some(true) {
        p.push(at(
            "securityContext.privileged: the agent needs capabilities, not privileged",
        ));
    }
    if sc.and_then(|s| s.read_only_root_filesystem) != Some(true) {
        p.push(at("securityContext.readOnlyRootFilesystem must be true"));
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let drop: Vec<&str> = caps
        .and_then(|c| c.drop.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut add: Vec<&str> = caps
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut want: Vec<&str> = crate::check::REQUIRED_CAPS
        .iter()
        .map(|(_, n)| n.trim_start_matches("CAP_"))
        .collect();
    add.sort_unstable();
    want.sort_unstable();
    if drop != ["ALL"] || add != want {
        p.push(at(&format!(
            "securityContext.capabilities: drop [ALL] and add exactly {want:?} (what `mesh-agent \
             check` requires, check::REQUIRED_CAPS); found drop {drop:?} add {add:?}"
        )));
    }
}

fn probes_and_ports(
    tpl: &PodTemplateSpec,
    c: &Container,
    run: &RunArgs,
    at: &dyn Fn(&str) -> String,
    p: &mut Vec<String>,
) {
    let probe = c.readiness_probe.as_ref().and_then(|r| r.http_get.as_ref());
    let ready_port = IntOrString::Int(i32::from(run.readiness_addr.port()));
    if !probe.is_some_and(|g| g.port == ready_port && g.path.as_deref() == Some("/healthz/ready")) {
        p.push(at(&format!(
            "readinessProbe: httpGet /healthz/ready on {} (--readiness-addr {})",
            run.readiness_addr.port(),
            run.readiness_addr
        )));
    }
    let annotations = tpl
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let metrics_port = run.metrics_addr.port().to_string();
    let want = [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", metrics_port.as_str()),
        ("prometheus.io/path", "/stats/prometheus"),
    ];
    for (k, v) in want {
        if annotations.get(k).map(String::as_str) != Some(v) {
            p.push(at(&format!(
                "pod annotation {k} must be {v:?} (--metrics-addr {})",
                run.metrics_addr
            )));
        }
    }
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    for port in [run.metrics_addr.port(), run.readiness_addr.port()] {
        if !ports.contains(&i32::from(port)) {
            p.push(at(&format!("ports: {port} is not declared")));
        }
    }
}

fn paths(
    spec: &PodSpec,
    c: &Container,
    run: &RunArgs,
    at: &dyn Fn(&str) -> String,
    p: &mut Vec<String>,
) {
    let cgroup = run
        .cgroup
        .as_deref()
        .unwrap_or(Path::new("(the container's own cgroup2 mount)"));
    let want = [
        (run.bpffs_dir.as_path(), "--bpffs-dir", Some("/sys/fs/bpf")),
        (cgroup, "--cgroup", Some("/sys/fs/cgroup")),
        (
            run.admin_socket.parent().unwrap_or(Path::new("/")),
            "--admin-socket's directory",
            None,
        ),
    ];
    for (path, flag, host) in want {
        match mount_of(spec, c, path) {
            Some((m, v))
                if host.is_none_or(|h| host_path(v) == Some(h))
                    && (host.is_some() || m.read_only != Some(true)) => {}
            _ => p.push(at(&format!(
                "{flag} {} must be on a volume ({}): the root filesystem is read-only",
                path.display(),
                host.map_or("writable".to_owned(), |h| format!("hostPath {h}"))
            ))),
        }
    }
    cni_paths(spec, c, run, at, p);
}

/// The CNI plugin runs on the host: the runtime finds it and its conflist at the host's CNI
/// paths, and it reaches the agent's socket at the path the agent wrote into the conflist.
/// So each is a writable hostPath volume, the socket's at the same path on both sides.
fn cni_paths(
    spec: &PodSpec,
    c: &Container,
    run: &RunArgs,
    at: &dyn Fn(&str) -> String,
    p: &mut Vec<String>,
) {
    let (Some(bin), Some(conf)) = (&run.cni_bin_dir, &run.cni_conf_dir) else {
        p.push(at(
            "args: --cni-bin-dir and --cni-conf-dir must be set: the agent installs its CNI \
             plugin there, and without it no pod is enrolled",
        ));
        return;
    };
    let socket = run.cni_socket();
    let socket_dir = socket.parent().unwrap_or(Path::new("/"));
    let want = [
        (bin.as_path(), "--cni-bin-dir", Path::new("/opt/cni/bin")),
        (
            conf.as_path(),
            "--cni-conf-dir",
            Path::new("/etc/cni/net.d"),
        ),
        (socket_dir, "--cni-socket's directory", socket_dir),
    ];
    for (path, flag, host) in want {
        let on_host = mount_of(spec, c, path).and_then(|(m, v)| {
            let rest = path.strip_prefix(&m.mount_path).ok()?;
            let writable = m.read_only != Some(true);
            let host = host_path(v).filter(|_| writable)?;
            Some(Path::new(host).join(rest))
        });
        if on_host.as_deref() != Some(host) {
            p.push(at(&format!(
                "{flag} {} must be a writable hostPath volume at the host's {} (found {:?})",
                path.display(),
                host.display(),
                on_host
            )));
        }
    }
}

fn shutdown(
    spec: &PodSpec,
    c: &Container,
    run: &RunArgs,
    at: &dyn Fn(&str) -> String,
    p: &mut Vec<String>,
) {
    let pre_stop = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref());
    let pause = pre_stop.and_then(|h| h.sleep.as_ref()).map(|s| s.seconds);
    let Some(pause) = pause else {
        p.push(at(
            "lifecycle.preStop: a sleep before SIGTERM starts the drain",
        ));
        return;
    };
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    let need = pause + run.drain_timeout.as_secs() as i64 + 5;
    if grace < need {
        p.push(at(&format!(
            "terminationGracePeriodSeconds {grace} < preStop {pause} s + --drain-timeout {} s + 5 s",
            run.drain_timeout.as_secs()
        )));
    }
}
