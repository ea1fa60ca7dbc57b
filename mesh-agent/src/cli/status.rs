//! `mesh-agent status` and `mesh-agent version`.

use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

use super::Output;

pub async fn status(socket: &Path, output: Output) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/status").await?;
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let v: Value =
        serde_json::from_str(&body).context("the agent's /status answer is not valid JSON")?;
    print!("{}", render(&v));
    Ok(())
}

fn render(v: &Value) -> String {
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let e = |k: &str| v["ebpf"][k].to_string();
    let ready = if v["ready"] == true {
        "yes".to_string()
    } else {
        format!("no ({})", s("not_ready_reason"))
    };
    let config = match &v["config_error"] {
        Value::String(err) => format!(
            "generation {} in force; newest config REJECTED ({} rejected so far):\n  {}",
            s("config_generation"),
            s("config_errors_total"),
            err.replace('\n', "\n  ")
        ),
        _ => format!("generation {}, ok", s("config_generation")),
    };
    let source = match v["config_source"].as_str() {
        Some("kubernetes") if v["config_synced"] != true => {
            " (kubernetes, first sync not complete)".to_string()
        }
        Some(source) => format!(" ({source})"),
        None => String::new(),
    };
    let certificates = match (v["mtls"].as_bool(), v["certificates_unhealthy"].as_u64()) {
        (Some(false), _) => "mutual TLS off (no CA configured)".to_string(),
        (_, Some(0)) => format!("{}, all valid", s("certificates")),
        (_, Some(n)) => format!(
            "{}, {n} NOT VALID (pending, failing renewal or expired; see `mesh-agent certs`)",
            s("certificates")
        ),
        _ => "-".to_string(),
    };
    let pending = match v["pending_pods"].as_u64() {
        Some(n) if n > 0 => format!(", {n} pending (network namespace not known yet)"),
        _ => String::new(),
    };
    format!(
        "agent:        {} on node {}\nready:        {ready}\nconfig:       {config}{source}\n{}workloads:    {} enrolled, {} failing{pending}\ncertificates: {certificates}\nconnections:  {} outbound, {} inbound open\neBPF:         {} redirected, {} recorded, {} map errors; maps: {} enrolled, {} in flight\nfast path:    {}\n",
        s("version"),
        s("node"),
        resources(v),
        s("enrolled_pods"),
        s("failed_pods"),
        s("open_outbound"),
        s("open_inbound"),
        e("redirected"),
        e("recorded"),
        e("map_errors"),
        e("enrolled_entries"),
        e("orig_dst_entries"),
        fast_path(v),
    )
}

/// `on (self-test passed); N messages redirected, M sockets` or `off (why)`.
fn fast_path(v: &Value) -> String {
    let fp = &v["fast_path"];
    if fp.is_null() {
        return "-".to_owned();
    }
    let state = fast_path_state(fp);
    if fp["on"] == true {
        format!(
            "{state}; {} messages redirected, {} took the stack; {} sockets",
            v["ebpf"]["fast_path_redirected"],
            v["ebpf"]["fast_path_stack"],
            v["ebpf"]["fast_path_entries"],
        )
    } else {
        state
    }
}

/// `on (why)` or `off (why)` from a `/fast_path` document.
fn fast_path_state(fp: &Value) -> String {
    let reason = fp["reason"].as_str().unwrap_or("-");
    let detail = match fp["self_test_error"].as_str() {
        Some(err) => format!("{reason}: {err}"),
        None => reason.to_owned(),
    };
    let on = if fp["on"] == true { "on" } else { "off" };
    format!("{on} ({detail})")
}

/// `mesh-agent fast-path [on|off]`: shows or switches the running agent's fast path.
pub async fn fast_path_command(socket: &Path, set: Option<bool>) -> anyhow::Result<()> {
    let body = match set {
        Some(on) => super::client::post_ok(socket, &format!("/fast_path?enabled={on}")).await?,
        None => super::client::get_ok(socket, "/fast_path").await?,
    };
    let v: Value =
        serde_json::from_str(&body).context("the agent's /fast_path answer is not valid JSON")?;
    println!("{}", fast_path_state(&v));
    Ok(())
}

/// Kubernetes mode: one line per watched kind, indented under `config:`.
fn resources(v: &Value) -> String {
    let Some(list) = v["resources"].as_array().filter(|l| !l.is_empty()) else {
        return String::new();
    };
    let text = |v: &Value| v.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let mut rows = vec![
        [
            "KIND",
            "API VERSION",
            "SELECTOR",
            "SYNCED",
            "OBJECTS",
            "INVALID",
            "LAST ERROR",
        ]
        .map(String::from),
    ];
    for r in list {
        let error = match (r["last_error"].as_str(), r["last_error_at"].as_str()) {
            (Some(e), Some(at)) => format!("{at} {e}"),
            (Some(e), None) => e.to_owned(),
            _ => r["note"].as_str().unwrap_or("-").to_owned(),
        };
        let synced = if r["synced"] == true { "yes" } else { "no" };
        rows.push([
            text(&r["kind"]),
            text(&r["api_version"]),
            text(&r["selector"]),
            synced.to_owned(),
            r["objects"].to_string(),
            r["invalid"].to_string(),
            error,
        ]);
    }
    let table = super::render_table(&rows);
    table.lines().map(|l| format!("  {l}\n")).collect()
}

/// Prints the agent's log filter, or sets it (`level`), e.g. `debug` or
/// `info,mesh_agent::proxy=debug`.
pub async fn logging(socket: &Path, level: Option<&str>) -> anyhow::Result<()> {
    let body = match level {
        Some(level) => {
            let encoded: String = level
                .bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            super::client::post_ok(socket, &format!("/logging?level={encoded}")).await?
        }
        None => super::client::get_ok(socket, "/logging").await?,
    };
    print!("{body}");
    Ok(())
}

/// Prints this binary's version, and the running agent's when it answers.
pub async fn version(socket: &Path) -> anyhow::Result<()> {
    println!("client: mesh-agent {}", env!("CARGO_PKG_VERSION"));
    match super::client::get_ok(socket, "/status").await {
        Ok(body) => {
            let v: Value = serde_json::from_str(&body).context("invalid /status JSON")?;
            println!(
                "agent:  mesh-agent {} (node {})",
                v["version"].as_str().unwrap_or("unknown"),
                v["node"].as_str().unwrap_or("unknown")
            );
        }
        Err(e) => println!("agent:  not reachable ({e:#})"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_rejected_config_prominently() {
        let v: Value = serde_json::json!({
            "version": "0.1.0", "node": "node-1", "ready": true, "not_ready_reason": null,
            "config_generation": 3, "config_error": "m/app.yaml: document 1: bad\nsecond",
            "config_errors_total": 2, "enrolled_pods": 4, "failed_pods": 0,
            "active_connections": 1,
            "ebpf": {"redirected": 10, "recorded": 10, "map_errors": 0,
                     "enrolled_entries": 4, "orig_dst_entries": 0}
        });
        let out = render(&v);
        assert!(out.contains("agent:        0.1.0 on node node-1"), "{out}");
        assert!(out.contains("generation 3 in force; newest config REJECTED (2 rejected so far):\n  m/app.yaml: document 1: bad\n  second"), "{out}");
        assert!(out.contains("workloads:    4 enrolled, 0 failing"), "{out}");
    }

    #[test]
    fn renders_the_fast_path_state_and_why() {
        let on = serde_json::json!({
            "fast_path": {"on": true, "reason": "self-test passed", "self_test": "passed"},
            "ebpf": {"fast_path_redirected": 12, "fast_path_stack": 1, "fast_path_entries": 2}
        });
        assert_eq!(
            fast_path(&on),
            "on (self-test passed); 12 messages redirected, 1 took the stack; 2 sockets"
        );
        let failed = serde_json::json!({
            "fast_path": {"on": false, "reason": "self-test failed", "self_test": "failed",
                          "self_test_error": "the loopback connection never entered the SOCKHASH"}
        });
        assert_eq!(
            fast_path(&failed),
            "off (self-test failed: the loopback connection never entered the SOCKHASH)"
        );
    }

    #[test]
    fn renders_certificate_health() {
        let status = |mtls: bool, total: u64, unhealthy: u64| {
            render(&serde_json::json!({
                "mtls": mtls, "certificates": total, "certificates_unhealthy": unhealthy,
                "config_source": "manifests", "ebpf": {}
            }))
        };
        let line = |out: String| {
            out.lines()
                .find(|l| l.starts_with("certificates:"))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("no certificates line: {out}"))
        };
        assert_eq!(line(status(true, 4, 0)), "certificates: 4, all valid");
        assert!(line(status(true, 4, 1)).starts_with("certificates: 4, 1 NOT VALID"));
        assert_eq!(
            line(status(false, 0, 0)),
            "certificates: mutual TLS off (no CA configured)"
        );
        assert!(status(true, 4, 0).contains("(manifests)"));
    }

    #[test]
    fn renders_kubernetes_resources() {
        let v: Value = serde_json::json!({
            "version": "0.1.0", "node": "node-1", "ready": false,
            "not_ready_reason": "waiting for the first full sync of: Service",
            "config_source": "kubernetes", "config_synced": false,
            "config_generation": 0, "config_error": null, "config_errors_total": 1,
            "enrolled_pods": 0, "failed_pods": 0, "pending_pods": 2, "active_connections": 0,
            "resources": [
                {"kind": "Namespace", "api_version": "v1", "selector": null, "synced": true,
                 "objects": 3, "invalid": 0, "last_error": null, "last_error_at": null},
                {"kind": "Service", "api_version": "v1", "selector": null, "synced": false,
                 "objects": 0, "invalid": 1, "last_error": "Service a/b: field spec.ports[0].port: bad",
                 "last_error_at": "2025-01-01T00:00:00Z"}
            ],
            "ebpf": {"redirected": 0, "recorded": 0, "map_errors": 0,
                     "enrolled_entries": 0, "orig_dst_entries": 0}
        });
        let out = render(&v);
        assert!(
            out.contains("(kubernetes, first sync not complete)"),
            "{out}"
        );
        assert!(out.contains("2 pending"), "{out}");
        let service = out
            .lines()
            .find(|l| l.trim_start().starts_with("Service"))
            .expect("row");
        assert!(service.contains("no"), "{out}");
        assert!(
            service.contains("2025-01-01T00:00:00Z Service a/b: field spec.ports[0].port"),
            "{out}"
        );
    }
}
