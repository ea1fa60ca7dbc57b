//! `mesh-agent services`: the Services this agent knows, their ports, how each port is
//! proxied (HTTP per request, or TCP), the DestinationRule's subsets, and the ready endpoints
//! behind each port with their outlier-detection health.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use super::Output;

#[derive(Debug, Deserialize)]
struct Service {
    service: String,
    cluster_ip: Option<String>,
    ports: Vec<Port>,
}

#[derive(Debug, Deserialize)]
struct Port {
    port: u16,
    target_port: String,
    protocol: String,
    subsets: Vec<Subset>,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
struct Subset {
    name: String,
    endpoints: usize,
    healthy: usize,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    address: String,
    node: Option<String>,
    health: String,
    ejected_for_ms: Option<u64>,
}

pub async fn run(socket: &Path, output: Output) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/services").await?;
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let services: Vec<Service> =
        serde_json::from_str(&body).context("the agent's /services answer is not valid")?;
    print!("{}", table(&services));
    Ok(())
}

/// `10.244.1.3:9080 (node-1)`, with the ejection when outlier detection holds it out.
fn endpoint(e: &Endpoint) -> String {
    let mut notes: Vec<String> = e.node.iter().cloned().collect();
    if e.health != "healthy" {
        notes.push(match e.ejected_for_ms {
            Some(ms) => format!("{} for {}s", e.health.to_uppercase(), ms.div_ceil(1000)),
            None => e.health.to_uppercase(),
        });
    }
    if notes.is_empty() {
        e.address.clone()
    } else {
        format!("{} ({})", e.address, notes.join(", "))
    }
}

fn table(services: &[Service]) -> String {
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "CLUSTER-IP",
            "PORT",
            "TARGET",
            "PROTOCOL",
            "SUBSETS (HEALTHY/READY)",
            "ENDPOINTS",
        ]
        .map(String::from),
    ];
    for s in services {
        let (namespace, name) = s.service.split_once('/').unwrap_or(("", &s.service));
        for p in &s.ports {
            let subsets = if p.subsets.is_empty() {
                "-".to_string()
            } else {
                p.subsets
                    .iter()
                    .map(|s| format!("{} {}/{}", s.name, s.healthy, s.endpoints))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let endpoints = if p.endpoints.is_empty() {
                "none ready".to_string()
            } else {
                p.endpoints
                    .iter()
                    .map(endpoint)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            rows.push([
                namespace.to_string(),
                name.to_string(),
                s.cluster_ip.clone().unwrap_or_else(|| "None".into()),
                p.port.to_string(),
                p.target_port.clone(),
                p.protocol.clone(),
                subsets,
                endpoints,
            ]);
        }
    }
    super::render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_subsets_and_ejected_endpoints() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([{
            "service": "default/reviews",
            "cluster_ip": "10.96.0.12",
            "destination_rule": "default/reviews",
            "ports": [
                {"name": "http", "port": 9080, "target_port": "9080", "protocol": "http",
                 "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}, "endpoints": 1, "healthy": 0},
                    {"name": "v2", "labels": {"version": "v2"}, "endpoints": 1, "healthy": 1}],
                 "endpoints": [
                    {"address": "10.244.1.3:9080", "pod": "default/reviews-v1", "node": "node-1",
                     "subsets": ["v1"], "health": "ejected", "ejected_for_ms": 29001, "in_flight": 0},
                    {"address": "10.244.2.3:9080", "pod": "default/reviews-v2", "node": "node-2",
                     "subsets": ["v2"], "health": "healthy", "ejected_for_ms": null, "in_flight": 0}]},
                {"name": "metrics", "port": 15090, "target_port": "stats", "protocol": "tcp",
                 "subsets": [], "endpoints": []}
            ]
        }]))
        .expect("services");
        assert_eq!(
            table(&services),
            "NAMESPACE  NAME     CLUSTER-IP  PORT   TARGET  PROTOCOL  SUBSETS (HEALTHY/READY)  ENDPOINTS\n\
             default    reviews  10.96.0.12  9080   9080    http      v1 0/1, v2 1/1           10.244.1.3:9080 (node-1, EJECTED for 30s), 10.244.2.3:9080 (node-2)\n\
             default    reviews  10.96.0.12  15090  stats   tcp       -                        none ready\n"
        );
    }
}
