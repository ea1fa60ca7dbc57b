//! Istio-compatible TCP metrics on 15020, checked with promtool and scraped by a real
//! Prometheus on the testbed (root).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use mesh_testbed::{PodProcess, Testbed};
use serde_json::Value;

fn manifests() -> String {
    docs(&[
        namespace("default", true),
        pod(
            "default",
            "client",
            "node-1",
            &[("app", "client"), ("version", "v1")],
            9999,
        ),
        pod(
            "default",
            "web-1",
            "node-1",
            &[("app", "web"), ("version", "v1")],
            8080,
        ),
        pod(
            "default",
            "web-2",
            "node-2",
            &[("app", "web"), ("version", "v2")],
            8080,
        ),
        service("default", "web", "web", 80),
    ])
}

/// GET a URL from inside node-1's network namespace with curl.
fn node_get(tb: &Testbed, url: &str, query: Option<&str>) -> String {
    let mut cmd = tb.node_command("node-1", "curl").expect("node command");
    cmd.args(["-sS", "--fail", "-m", "5", "-G", url]);
    if let Some(q) = query {
        cmd.args(["--data-urlencode", &format!("query={q}")]);
    }
    let out = run_bounded(cmd, Duration::from_secs(10)).expect("curl");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the web servers and sends traffic with known counts: 4 connections to the Service,
/// 1 refused connection. Returns the servers (stopped on drop).
fn send_traffic(tb: &Testbed) -> Vec<PodProcess> {
    let servers = ["web-1", "web-2"]
        .iter()
        .map(|p| {
            serve(
                tb,
                p,
                &["http", "--listen", "0.0.0.0:8080", "--service", "web"],
            )
        })
        .collect();
    let svc = tb.service_ip("default", "web").expect("service ip");
    for _ in 0..4 {
        curl(tb, "client", &format!("http://{svc}/")).expect("curl through the mesh");
    }
    let web1 = tb.pod_ip("default", "web-1").expect("ip");
    assert!(read_from(tb, "client", &format!("{web1}:8081")).is_err());
    servers
}

#[test]
fn exposition_has_istio_tcp_metrics_and_passes_promtool() {
    let Some(tb) = up("tm_promtool", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _servers = send_traffic(&tb);
    let text = node_get(&tb, "http://127.0.0.1:15020/stats/prometheus", None);

    for name in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_build",
        "nodemesh_enrolled_pods",
        "nodemesh_ebpf_redirected_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    let opened: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"source\"")
        })
        .collect();
    // web-1 runs on node-1: its side of the tunnel is reported there too, as mutual TLS,
    // with the service the connection was for.
    let destination: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_flags=\"-\"")
        })
        .collect();
    assert_eq!(destination.len(), 1, "{destination:#?}");
    for label in [
        "destination_workload=\"web-1\"",
        "destination_service=\"web.default.svc.cluster.local\"",
        "connection_security_policy=\"mutual_tls\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/default\"",
    ] {
        assert!(
            destination[0].contains(label),
            "{label}: {}",
            destination[0]
        );
    }
    assert!(destination[0].ends_with(" 2"), "{}", destination[0]);
    let web = opened
        .iter()
        .filter(|l| l.contains("destination_service=\"web.default.svc.cluster.local\""))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum::<u64>();
    assert_eq!(web, 4, "{opened:#?}");
    assert!(
        opened
            .iter()
            .any(|l| l.contains("response_flags=\"UF\"")
                && l.contains("destination_workload=\"web-1\"")),
        "the refused connection must be reported with UF: {opened:#?}"
    );
    for label in [
        "reporter=\"source\"",
        "source_workload=\"client\"",
        "source_canonical_service=\"client\"",
        "source_canonical_revision=\"v1\"",
        "destination_app=\"web\"",
        "request_protocol=\"tcp\"",
        "connection_security_policy=\"unknown\"",
    ] {
        assert!(
            opened.iter().all(|l| l.contains(label)),
            "{label}: {opened:#?}"
        );
    }

    promtool_check(&text);

    // The node-network ports serve nothing but their own path.
    let mut cmd = tb.node_command("node-1", "curl").expect("node command");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:15020/config_dump",
    ]);
    let out = run_bounded(cmd, Duration::from_secs(10)).expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    assert_eq!(
        node_get(&tb, "http://127.0.0.1:15021/healthz/ready", None),
        "ready\n"
    );
    tb.down().expect("down");
}

#[test]
fn prometheus_scrapes_the_agent_and_promql_returns_the_counts_sent() {
    let Some(tb) = up("tm_prometheus", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let _servers = send_traffic(&tb);

    let dir = tb.state_dir().join("prometheus");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\nscrape_configs:\n- job_name: nodemesh\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: ['127.0.0.1:15020']\n",
    )
    .expect("config");
    let mut cmd = tb
        .node_command("node-1", "prometheus")
        .expect("node command");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:19090")
        .stderr(Stdio::null());
    let _prometheus = PodProcess::spawn(cmd, "prometheus in node-1").expect("prometheus");

    let query = |q: &str| -> Option<f64> {
        let body = node_get(&tb, "http://127.0.0.1:19090/api/v1/query", Some(q));
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let until = Instant::now() + Duration::from_secs(30);
    let ready = || {
        let mut cmd = tb.node_command("node-1", "curl").expect("node command");
        cmd.args(["-sf", "-m", "2", "http://127.0.0.1:19090/-/ready"]);
        run_bounded(cmd, Duration::from_secs(5)).is_ok_and(|o| o.status.success())
    };
    while !ready() {
        assert!(Instant::now() < until, "prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(250));
    }
    let by_service = "sum(istio_tcp_connections_opened_total{reporter=\"source\",destination_service=\"web.default.svc.cluster.local\",source_workload=\"client\",connection_security_policy=\"unknown\"})";
    while query(by_service) != Some(4.0) {
        assert!(
            Instant::now() < until,
            "PromQL {by_service} = {:?}, want 4",
            query(by_service)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let per_backend = |w: &str| {
        query(&format!(
            "sum(istio_tcp_connections_opened_total{{reporter=\"source\",destination_workload=\"{w}\",response_flags=\"-\"}})"
        ))
    };
    assert_eq!(
        per_backend("web-1"),
        Some(2.0),
        "round-robin: 2 of 4 to web-1"
    );
    assert_eq!(
        per_backend("web-2"),
        Some(2.0),
        "round-robin: 2 of 4 to web-2"
    );
    assert_eq!(
        query("sum(istio_tcp_connections_closed_total{reporter=\"source\",response_flags=\"UF\"})"),
        Some(1.0)
    );
    let received = query(
        "sum(istio_tcp_received_bytes_total{destination_service_name=\"web\",reporter=\"source\"})",
    )
    .expect("received bytes");
    assert!(received > 0.0, "request bytes must be counted");
    tb.down().expect("down");
}
