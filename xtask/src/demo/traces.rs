//! The demo's traces: `mesh-testapp otlp-receiver` in the `observability` namespace plays the
//! OTLP collector the agents export to (xtask/demo/observability.yaml); after the traffic the
//! demo prints how many spans and traces arrived and one trace as a tree.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_testbed::{PodProcess, Testbed};
use serde_json::Value;

pub const POD: &str = "otel-collector";

/// Starts the collector and waits until it listens.
pub fn start(tb: &Testbed, testapp: &Path) -> Result<PodProcess> {
    let mut p = tb
        .spawn_in_pod(POD, testapp, ["otlp-receiver", "--listen", "0.0.0.0:4317"])
        .context("starting the OTLP collector")?;
    p.wait_for_line("listening", Duration::from_secs(10))
        .context("waiting for the OTLP collector to listen")?;
    Ok(p)
}

/// Reads the spans received so far (waiting a little for the agents' last batches) and
/// prints a summary and the longest trace; returns the longest trace's span count.
pub fn print(collector: &mut PodProcess) -> usize {
    let mut spans: Vec<Value> = Vec::new();
    // The exporters send every 200 ms; stop once nothing arrived for a second.
    while let Ok(line) = collector.wait_for_line("{", Duration::from_secs(1)) {
        if let Ok(v) = serde_json::from_str(&line) {
            spans.push(v);
        }
    }
    let mut traces: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in &spans {
        let id = s["trace_id"].as_str().unwrap_or_default().to_string();
        traces.entry(id).or_default().push(s);
    }
    println!(
        "==> traces: {} spans in {} traces at the OTLP collector (observability/otel-collector:4317; \
         MeshConfig in xtask/demo/observability.yaml)",
        spans.len(),
        traces.len()
    );
    let Some((id, trace)) = traces.iter().max_by_key(|(_, t)| t.len()) else {
        println!("    none arrived");
        return 0;
    };
    println!(
        "    the longest trace, {id}: one span per agent hop, parented through the headers the apps propagate"
    );
    let roots: Vec<&&Value> = trace
        .iter()
        .filter(|s| {
            let parent = s["parent_span_id"].as_str().unwrap_or_default();
            !trace.iter().any(|o| o["span_id"] == parent)
        })
        .collect();
    for r in roots {
        print_span(r, trace, "    ");
    }
    trace.len()
}

fn print_span(s: &Value, trace: &[&Value], indent: &str) {
    let kind = match s["kind"].as_i64() {
        Some(2) => "SERVER",
        Some(3) => "CLIENT",
        _ => "?",
    };
    let ms = |k: &str| s[k].as_u64().unwrap_or_default();
    let took = ms("end").saturating_sub(ms("start")) as f64 / 1e6;
    println!(
        "{indent}{} {kind} {} {} ({took:.2} ms)",
        s["service"].as_str().unwrap_or("?"),
        s["name"].as_str().unwrap_or("?"),
        s["attributes"]["http.status_code"].as_str().unwrap_or("?"),
    );
    let id = &s["span_id"];
    let mut children: Vec<&&Value> = trace
        .iter()
        .filter(|c| c["parent_span_id"] == *id)
        .collect();
    children.sort_by_key(|c| c["start"].as_u64());
    for c in children {
        print_span(c, trace, &format!("{indent}  "));
    }
}
