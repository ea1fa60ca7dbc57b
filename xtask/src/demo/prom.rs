//! The demo's Prometheus: a real one (Debian's package) in node-1's network namespace,
//! scraping both agents' `/stats/prometheus` on 15020, and a few PromQL answers from it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_testbed::{PodProcess, Testbed};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1:19090";

/// A running Prometheus; stopped on drop.
pub struct Prometheus {
    _process: PodProcess,
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Runs `curl ARGS` in node-1's network namespace; stdout on success.
fn node_curl(tb: &Testbed, args: &[&str]) -> Result<String> {
    let out = tb
        .node_command("node-1", "curl")?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running curl in node-1")?;
    if !out.status.success() {
        bail!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One PromQL instant query; the result vector.
fn query(tb: &Testbed, q: &str) -> Result<Vec<Value>> {
    let body = node_curl(
        tb,
        &[
            "-sS",
            "-m",
            "5",
            "-G",
            &format!("http://{LISTEN}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ],
    )?;
    let v: Value = serde_json::from_str(&body).context("Prometheus answered invalid JSON")?;
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Starts Prometheus and waits until it has scraped both agents. `Ok(None)` if Prometheus is
/// not installed (`cargo xtask setup` installs it).
pub fn start(tb: &Testbed) -> Result<Option<Prometheus>> {
    if !on_path("prometheus") {
        println!("(prometheus is not installed: `cargo xtask setup` installs it; skipping PromQL)");
        return Ok(None);
    }
    let dir = tb.state_dir().join("prometheus");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let targets: Vec<String> = tb
        .nodes()
        .iter()
        .map(|n| format!("'{}:15020'", n.ip))
        .collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: nodemesh\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = tb.node_command("node-1", "prometheus")?;
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={LISTEN}"))
        .stderr(Stdio::null());
    let process = PodProcess::spawn(cmd, "prometheus in node-1")?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(tb, "sum(up{job=\"nodemesh\"})").unwrap_or_default();
        let scraped = up
            .first()
            .and_then(|r| r["value"][1].as_str())
            .is_some_and(|v| v == targets.len().to_string());
        if scraped {
            // One more scrape, so the counters include everything sent before.
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(Some(Prometheus { _process: process }));
        }
        if Instant::now() > until {
            bail!("Prometheus did not scrape both agents within 30 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Prints the answers to a few questions Istio's dashboards ask: HTTP requests as the
/// client's agent routes them, and the workload graph as the server's agent sees it.
pub fn print_answers(tb: &Testbed) -> Result<()> {
    let questions = [
        (
            "requests by destination service (reporter=source)",
            "sum by (destination_service) (istio_requests_total{reporter=\"source\"})",
            vec!["destination_service"],
        ),
        (
            "success rate (share of responses that are not 5xx)",
            "sum(istio_requests_total{reporter=\"source\",response_code!~\"5..\"}) / sum(istio_requests_total{reporter=\"source\"})",
            vec![],
        ),
        (
            "p99 request duration by destination service, ms",
            "histogram_quantile(0.99, sum by (le, destination_service) (istio_request_duration_milliseconds_bucket{reporter=\"source\"}))",
            vec!["destination_service"],
        ),
        (
            "requests by reviews version (the v1/v2/v3 split)",
            "sum by (destination_version) (istio_requests_total{reporter=\"source\",destination_service_name=\"reviews\"})",
            vec!["destination_version"],
        ),
        (
            "connections by source -> destination workload (reporter=destination, mutual TLS)",
            "sum by (source_workload, destination_workload) (istio_tcp_connections_opened_total{reporter=\"destination\",connection_security_policy=\"mutual_tls\"})",
            vec!["source_workload", "destination_workload"],
        ),
    ];
    println!(
        "==> PromQL on a real Prometheus scraping both agents (http://{LISTEN} in node-1's namespace)"
    );
    for (title, q, labels) in questions {
        println!("  {title}:  {q}");
        let result = query(tb, q)?;
        if result.is_empty() {
            println!("    (none)");
        }
        for r in result {
            let key: Vec<&str> = labels
                .iter()
                .map(|l| r["metric"][l].as_str().unwrap_or("?"))
                .collect();
            let key = if key.is_empty() { vec!["all"] } else { key };
            let value = r["value"][1].as_str().unwrap_or("?");
            println!("    {:<60} {value}", key.join(" -> "));
        }
    }
    Ok(())
}
