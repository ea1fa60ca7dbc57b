//! The agent's CLI against real agents (root): `check`, `workloads`, `connections`, `--help`, and pod
//! removal seen through the CLI.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn help_explains_every_run_flag() {
    let out = Command::new(AGENT)
        .args(["run", "--help"])
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--manifests",
        "--node",
        "--cgroup",
        "--bpffs-dir",
        "--admin-socket",
        "--admin-addr",
        "--connect-timeout",
        "--drain-timeout",
        "--buffer-size",
        "--max-connections",
        "--metrics-addr",
        "--readiness-addr",
    ] {
        let line = help
            .lines()
            .position(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        // clap puts the explanation on the following line(s) in long help.
        let next = help.lines().nth(line + 1).unwrap_or_default();
        assert!(
            !next.trim().is_empty(),
            "{flag} has no explanation in --help:\n{help}"
        );
    }
}

#[test]
fn check_reports_every_prerequisite_ok_on_this_machine() {
    if !mesh_testbed::require_root("cli_check") {
        return;
    }
    let out = Command::new(AGENT)
        .args(["check", "--json"])
        .output()
        .expect("check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let checks: serde_json::Value = serde_json::from_str(&stdout).expect("check --json");
    let names: Vec<&str> = checks
        .as_array()
        .expect("array")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    for expected in [
        "privileges",
        "cgroup2 mount",
        "bpffs",
        "BTF",
        "program type cgroup_sock_addr",
        "program type sock_ops",
        "eBPF programs load",
    ] {
        assert!(
            names.contains(&expected),
            "check lacks {expected}: {names:?}"
        );
    }
    let failed: Vec<_> = checks
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["ok"] != true)
        .collect();
    assert!(failed.is_empty(), "prerequisites missing: {failed:?}");
    // The fast path's self-test ran for real and says what --fast-path=on would do, and why.
    let fast_path = checks
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["name"] == "fast path self-test (optional)")
        .unwrap_or_else(|| panic!("no fast path check: {names:?}"));
    let detail = fast_path["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("passes (") && detail.contains("--fast-path=on would turn it on")
            || detail.contains("--fast-path=on keeps it off"),
        "{detail}"
    );
    assert!(out.status.success());
}

#[test]
fn check_fails_without_privileges() {
    if !mesh_testbed::require_root("cli_check_unprivileged") {
        return;
    }
    // Drop every capability (setpriv from util-linux); check must say what is missing.
    let out = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            AGENT,
            "check",
        ])
        .output()
        .expect("setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check must fail without privileges:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("MISSING") && l.contains("privileges")),
        "{stdout}"
    );
    assert!(stdout.contains("hint:"), "{stdout}");
}

#[test]
fn workloads_lists_enrolled_pods_and_follows_pod_removal() {
    let pods = docs(&[
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod("default", "worker", "node-1", &[("app", "worker")], 9999),
    ]);
    let Some(mut tb) = up(
        "cli_workloads",
        2,
        &[
            ("ns.yaml", &namespace("default", true)),
            ("pods.yaml", &pods),
            ("svc.yaml", &service("default", "worker", "worker", 80)),
        ],
    ) else {
        return;
    };
    let socket = tb.node("node-1").expect("node").admin_socket.clone();
    // `mesh-agent <command> -o <format>` against node-1's agent; must succeed.
    let cli = |command: &str, format: &str| {
        let out = Command::new(AGENT)
            .args([command, "-o", format, "--admin-socket"])
            .arg(&socket)
            .output()
            .expect(command);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let workloads = |format: &str| cli("workloads", format);
    let status = |format: &str| cli("status", format);
    let services = cli("services", "table");
    let worker_ep = format!(
        "{}:9999 (node-1)",
        tb.pod_ip("default", "worker").expect("ip")
    );
    assert!(
        services.lines().any(|l| l.starts_with("default    worker")
            && l.contains("tcp")
            && l.contains(&worker_ep)),
        "{services}"
    );
    let table = workloads("table");
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap_or_default().starts_with("NAMESPACE"),
        "{table}"
    );
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    assert!(
        table
            .lines()
            .any(|l| l.contains("client") && l.contains(&client_ip) && l.contains("enrolled")),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&workloads("json")).expect("json");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");

    let table = status("table");
    assert!(table.contains("on node node-1"), "{table}");
    assert!(table.contains("ready:        yes"), "{table}");
    assert!(table.contains("2 enrolled, 0 failing"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&status("json")).expect("status json");
    assert_eq!(json["ebpf"]["enrolled_entries"], 2, "{json}");
    let out = Command::new(AGENT)
        .args(["version", "--admin-socket"])
        .arg(&socket)
        .output()
        .expect("version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains("agent:  mesh-agent 0.1.0 (node node-1)"),
        "{version}"
    );

    // The log filter changes at runtime, and a bad one is refused.
    let logging = |level: Option<&str>| {
        let mut cmd = Command::new(AGENT);
        cmd.args(["logging", "--admin-socket"]).arg(&socket);
        if let Some(l) = level {
            cmd.args(["--level", l]);
        }
        cmd.output().expect("logging")
    };
    assert_eq!(String::from_utf8_lossy(&logging(None).stdout), "info\n");
    assert!(logging(Some("info,mesh_agent=debug")).status.success());
    assert_eq!(
        String::from_utf8_lossy(&logging(None).stdout),
        "info,mesh_agent=debug\n"
    );
    // Any captured connection logs at debug; nothing listens on the worker's port 9.
    let worker = tb.pod_ip("default", "worker").expect("ip");
    let _ = read_from(&tb, "client", &format!("{worker}:9"));
    wait_until(
        "a debug line in the agent log",
        Duration::from_secs(5),
        || tb.agent_log("node-1").contains("DEBUG"),
    );
    let bad = logging(Some("info,=[bad"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid log filter"));
    assert_eq!(
        String::from_utf8_lossy(&logging(None).stdout),
        "info,mesh_agent=debug\n"
    );

    // Removing the pod from the manifests unenrolls it.
    tb.apply(
        "pods.yaml",
        &pod("default", "client", "node-1", &[("app", "client")], 9999),
    )
    .expect("apply");
    wait_until("worker unenrolled", Duration::from_secs(10), || {
        !workloads("table").contains("worker")
    });
    assert!(cli("services", "table").contains("none ready"));

    // No agent at that socket: a clear error naming the socket.
    let out = Command::new(AGENT)
        .args(["workloads", "--admin-socket", "/nonexistent/admin.sock"])
        .output()
        .expect("workloads");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/admin.sock"));
    tb.down().expect("down");
}

/// `mesh-agent connections` on both agents while a connection crosses nodes over HBONE:
/// each side lists it with the peer's identity and live byte counts, in table, JSON and
/// YAML, and the list empties when the connection closes.
#[test]
fn connections_lists_open_connections_at_both_ends() {
    let Some(tb) = up(
        "cli_connections",
        2,
        &[(
            "app.yaml",
            &docs(&[
                namespace("default", true),
                pod_sa("default", "client", "node-1", "client", 9999),
                pod_sa("default", "server", "node-2", "server", 7000),
                service("default", "server", "server", 7000),
            ]),
        )],
    ) else {
        return;
    };
    let _echo = serve(&tb, "server", &["echo", "--listen", "0.0.0.0:7000"]);
    let connections = |node: &str, format: &str, extra: &[&str]| {
        let socket = tb.node(node).expect("node").admin_socket.clone();
        let out = Command::new(AGENT)
            .args(["connections", "-o", format, "--admin-socket"])
            .arg(&socket)
            .args(extra)
            .output()
            .expect("connections");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let svc = tb.service_ip("default", "server").expect("svc");
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    let server = format!("{}:7000", tb.pod_ip("default", "server").expect("ip"));
    let mut chat = Chat::open(&tb, "client", &format!("{svc}:7000"));
    assert!(chat.echo("hello"));

    let out: serde_json::Value =
        serde_json::from_str(&connections("node-1", "json", &[])).expect("json");
    let list = out.as_array().expect("array");
    assert_eq!(list.len(), 1, "{out}");
    let c = &list[0];
    assert_eq!(c["pod"], "default/client");
    assert_eq!(c["direction"], "outbound");
    assert_eq!(c["protocol"], "HBONE");
    assert_eq!(c["destination"], format!("{svc}:7000"));
    assert_eq!(c["upstream"], server);
    assert_eq!(
        c["peer_identity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert!(
        c["client"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{client_ip}:")))
    );
    // "hello\n" each way, counted while the connection is open.
    assert_eq!(
        (c["bytes_received"].as_u64(), c["bytes_sent"].as_u64()),
        (Some(6), Some(6))
    );

    let yaml: serde_json::Value =
        serde_yaml::from_str(&connections("node-2", "yaml", &[])).expect("yaml");
    let c = &yaml[0];
    assert_eq!(c["pod"], "default/server");
    assert_eq!(c["direction"], "inbound");
    assert_eq!(
        c["peer_identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    let table = connections("node-2", "table", &["--pod", "server"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("POD") && lines[0].contains("PEER IDENTITY"),
        "{table}"
    );
    assert!(
        lines.len() == 2 && lines[1].contains("default/server") && lines[1].contains("inbound"),
        "{table}"
    );
    assert_eq!(
        connections("node-2", "table", &["--pod", "other/server"]).trim(),
        "no open connections"
    );

    drop(chat);
    wait_until("the connections to close", Duration::from_secs(10), || {
        connections("node-1", "json", &[]).trim() == "[]"
            && connections("node-2", "json", &[]).trim() == "[]"
    });
}
