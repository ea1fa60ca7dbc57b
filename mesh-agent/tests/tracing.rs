//! Tracing through two agents (root, testbed, real curl, a real OTLP/gRPC receiver): one span
//! per agent hop, in one trace, parented client agent -> server agent -> app; W3C, B3 and
//! `x-request-id` headers as the app sees them; with the collector gone, requests are served
//! as before and the lost spans are counted.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mesh_testbed::{PodProcess, Testbed};
use serde_json::Value;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

fn manifests() -> String {
    docs(&[
        namespace("default", true),
        namespace("observability", false),
        pod_sa("default", "client", "node-1", "client", 9999),
        web("web-1", "node-2", "v1"),
        http_service("web", "web", "http", "http"),
        pod(
            "observability",
            "collector",
            "node-1",
            &[("app", "collector")],
            4317,
        ),
        service("observability", "otel-collector", "collector", 4317),
        // As Istio users configure an OpenTelemetry collector, sampling every request.
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: nodemesh-system\n\
         data:\n  mesh: |\n    enableTracing: true\n    defaultConfig:\n      tracing:\n        \
         sampling: 100\n    extensionProviders:\n    - name: otel-tracing\n      opentelemetry:\n        \
         service: otel-collector.observability.svc.cluster.local\n        port: 4317\n    \
         defaultProviders:\n      tracing:\n      - otel-tracing\n"
            .to_string(),
    ])
}

/// curl from the client pod to the web Service; the app's JSON answer.
fn get(tb: &Testbed, headers: &[&str]) -> Value {
    let svc = tb.service_ip("default", "web").expect("svc");
    let mut cmd = tb.pod_command("client", "curl").expect("pod command");
    cmd.args(["-sS", "--fail", "-m", "5"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(format!("http://{svc}/"));
    let out = run_bounded(cmd, Duration::from_secs(10)).expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The next `n` spans the receiver prints.
fn spans(receiver: &mut PodProcess, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let line = receiver
                .wait_for_line("{", Duration::from_secs(10))
                .expect("a span");
            serde_json::from_str(&line).expect("span json")
        })
        .collect()
}

/// An unlabelled counter's value (`NAME_total V`).
fn counter_total(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}_total in\n{text}"))
}

/// The spans of one request: (the client agent's, the server agent's).
fn hop_pair(spans: &[Value]) -> (&Value, &Value) {
    let by_kind: BTreeMap<i64, &Value> = spans
        .iter()
        .map(|s| (s["kind"].as_i64().unwrap_or_default(), s))
        .collect();
    // OTLP's SpanKind: 2 SERVER, 3 CLIENT.
    let (Some(client), Some(server)) = (by_kind.get(&3), by_kind.get(&2)) else {
        panic!("want one CLIENT and one SERVER span: {spans:#?}");
    };
    (client, server)
}

#[test]
fn spans_from_both_agents_share_one_trace_and_parent_correctly() {
    let Some(tb) = up("tracing", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let mut receiver = serve(
        &tb,
        "collector",
        &["otlp-receiver", "--listen", "0.0.0.0:4317"],
    );
    let _web = serve(
        &tb,
        "web-1",
        &["http", "--listen", "0.0.0.0:8080", "--service", "web"],
    );

    // 1. The app upstream of the client agent started a trace (W3C).
    let seen = get(&tb, &[&format!("traceparent: 00-{TRACE}-{APP_SPAN}-01")]);
    let got = spans(&mut receiver, 2);
    let (client, server) = hop_pair(&got);
    for s in [client, server] {
        assert_eq!(s["trace_id"], TRACE, "{s:#}");
        assert_eq!(s["name"], "web.default.svc.cluster.local:80/*", "{s:#}");
        assert_eq!(s["attributes"]["http.method"], "GET");
        assert_eq!(s["attributes"]["http.status_code"], "200");
        assert_eq!(s["attributes"]["component"], "proxy");
    }
    assert_eq!(client["parent_span_id"], APP_SPAN, "the caller's span");
    assert_eq!(
        server["parent_span_id"], client["span_id"],
        "the server agent's span is the client agent's child"
    );
    assert_eq!(client["service"], "client.default");
    assert_eq!(server["service"], "web.default");
    assert_eq!(client["attributes"]["istio.canonical_service"], "client");
    assert_eq!(server["attributes"]["istio.canonical_revision"], "v1");
    assert_eq!(
        client["attributes"]["upstream_cluster"],
        "outbound|80||web.default.svc.cluster.local"
    );
    assert_eq!(server["attributes"]["upstream_cluster"], "inbound|8080||");
    // The app sees the server agent's span as its parent, in both header families, and the
    // request id both spans carry.
    let h = &seen["headers"];
    let server_span = server["span_id"].as_str().expect("span id");
    assert_eq!(
        h["traceparent"],
        format!("00-{TRACE}-{server_span}-01"),
        "{h:#}"
    );
    assert_eq!(h["x-b3-traceid"], TRACE);
    assert_eq!(h["x-b3-spanid"], server_span);
    assert_eq!(h["x-b3-parentspanid"], client["span_id"]);
    assert_eq!(h["x-b3-sampled"], "1");
    let request_id = h["x-request-id"].as_str().expect("x-request-id");
    assert_eq!(request_id.len(), 36, "{request_id}");
    for s in [client, server] {
        assert_eq!(s["attributes"]["guid:x-request-id"], request_id);
    }

    // 2. No trace yet: the client agent starts one (sampling 100%), B3-only callers too.
    let seen = get(&tb, &["x-request-id: req-42"]);
    let got = spans(&mut receiver, 2);
    let (client, server) = hop_pair(&got);
    assert_eq!(client["parent_span_id"], "", "a root span");
    assert_eq!(server["parent_span_id"], client["span_id"]);
    assert_eq!(client["trace_id"], server["trace_id"]);
    assert_ne!(client["trace_id"], TRACE);
    assert_eq!(seen["headers"]["x-request-id"], "req-42", "kept as sent");
    assert_eq!(client["attributes"]["guid:x-request-id"], "req-42");
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    get(
        &tb,
        &[
            &format!("x-b3-traceid: {b3_trace}"),
            "x-b3-spanid: e457b5a2e4d86bd1",
            "x-b3-sampled: 1",
        ],
    );
    let got = spans(&mut receiver, 2);
    let (client, _) = hop_pair(&got);
    assert_eq!(client["trace_id"], b3_trace);
    assert_eq!(client["parent_span_id"], "e457b5a2e4d86bd1");

    // 3. A caller that decided not to sample: propagated, not exported.
    let seen = get(&tb, &["x-b3-sampled: 0"]);
    assert_eq!(seen["headers"]["x-b3-sampled"], "0");
    assert!(
        seen["headers"]["traceparent"]
            .as_str()
            .is_some_and(|t| t.ends_with("-00")),
        "{:#}",
        seen["headers"]
    );

    // 4. The collector goes away: requests are served as before; lost spans are counted.
    receiver.stop().expect("stop receiver");
    let dropped_before: u64 = ["node-1", "node-2"]
        .iter()
        .map(|n| counter_total(&node_metrics(&tb, n), "nodemesh_tracing_spans_dropped"))
        .sum();
    for _ in 0..10 {
        assert_eq!(get(&tb, &[])["service"], "web");
    }
    wait_until(
        "20 spans counted as dropped",
        Duration::from_secs(20),
        || {
            let dropped: u64 = ["node-1", "node-2"]
                .iter()
                .map(|n| counter_total(&node_metrics(&tb, n), "nodemesh_tracing_spans_dropped"))
                .sum();
            dropped >= dropped_before + 20
        },
    );
    let exported = counter_total(
        &node_metrics(&tb, "node-1"),
        "nodemesh_tracing_spans_exported",
    );
    assert_eq!(exported, 3, "node-1 exported its three client spans");
    tb.down().expect("down");
}
