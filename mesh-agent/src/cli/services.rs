//! `mesh-agent services`: the Services this agent knows, their ports, how each port is
//! proxied (HTTP per request, or TCP), and the ready endpoints behind it.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

use super::Output;

#[derive(Debug, Deserialize)]
struct Ref {
    namespace: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Port {
    name: Option<String>,
    port: u16,
    target_port: Value,
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    addr: String,
    node: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Service {
    id: Ref,
    cluster_ip: Option<String>,
    ports: Vec<Port>,
    endpoints: Vec<Vec<Endpoint>>,
}

#[derive(Debug, Deserialize)]
struct Dump {
    services: Vec<Service>,
}

pub async fn run(socket: &Path, output: Output) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/config_dump").await?;
    let dump: Dump =
        serde_json::from_str(&body).context("the agent's /config_dump answer is not valid")?;
    if output != Output::Table {
        let v: Value = serde_json::from_str(&body).context("invalid JSON")?;
        let services = serde_json::to_string_pretty(&v["services"])? + "\n";
        super::print_structured(&services, output)?;
        return Ok(());
    }
    print!("{}", table(&dump.services));
    Ok(())
}

/// How the agent proxies the port: the agent's own selection (`proxy::protocol`), so the
/// CLI and the data path cannot disagree.
fn protocol(p: &Port) -> String {
    use crate::config::model::{ServicePort, TargetPort};
    use crate::proxy::protocol::AppProtocol;
    let port = ServicePort {
        name: p.name.clone(),
        port: p.port,
        target_port: TargetPort::Number(0),
        app_protocol: p.app_protocol.clone(),
    };
    AppProtocol::of(&port).name().to_string()
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
            "ENDPOINTS",
        ]
        .map(String::from),
    ];
    for s in services {
        for (i, p) in s.ports.iter().enumerate() {
            let target = match &p.target_port {
                Value::Object(o) => o
                    .values()
                    .next()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .unwrap_or_default(),
                other => other.to_string(),
            };
            let eps = s.endpoints.get(i).map(Vec::as_slice).unwrap_or_default();
            let eps = if eps.is_empty() {
                "none ready".to_string()
            } else {
                eps.iter()
                    .map(|e| match &e.node {
                        Some(n) => format!("{} ({n})", e.addr),
                        None => e.addr.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            rows.push([
                s.id.namespace.clone(),
                s.id.name.clone(),
                s.cluster_ip.clone().unwrap_or_else(|| "None".into()),
                p.port.to_string(),
                target,
                protocol(p),
                eps,
            ]);
        }
    }
    super::render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_table() {
        let dump: Dump = serde_json::from_value(serde_json::json!({"services": [{
            "id": {"namespace": "default", "name": "reviews"},
            "cluster_ip": "10.96.0.12",
            "selector": {"app": "reviews"},
            "ports": [
                {"name": "http", "port": 9080, "target_port": {"Number": 9080}, "app_protocol": null},
                {"name": "metrics", "port": 15090, "target_port": {"Name": "stats"}, "app_protocol": "HTTP"}
            ],
            "endpoints": [
                [{"pod": {"namespace": "default", "name": "reviews-v1"}, "addr": "10.244.1.3:9080", "node": "node-1"},
                 {"pod": {"namespace": "default", "name": "reviews-v2"}, "addr": "10.244.2.3:9080", "node": "node-2"}],
                []
            ]
        }]})).expect("dump");
        assert_eq!(
            table(&dump.services),
            "NAMESPACE  NAME     CLUSTER-IP  PORT   TARGET  PROTOCOL  ENDPOINTS\n\
             default    reviews  10.96.0.12  9080   9080    http      10.244.1.3:9080 (node-1), 10.244.2.3:9080 (node-2)\n\
             default    reviews  10.96.0.12  15090  stats   http      none ready\n"
        );
    }

    #[test]
    fn protocol_selection_order() {
        let port = |name: Option<&str>, app: Option<&str>| Port {
            name: name.map(String::from),
            port: 80,
            target_port: Value::Null,
            app_protocol: app.map(String::from),
        };
        assert_eq!(protocol(&port(Some("tcp-db"), Some("http"))), "http");
        assert_eq!(protocol(&port(Some("grpc-api"), None)), "grpc");
        assert_eq!(protocol(&port(Some("tcp-db"), None)), "tcp");
        // Undeclared: detected per connection.
        assert_eq!(protocol(&port(Some("web"), None)), "auto");
        assert_eq!(protocol(&port(None, None)), "auto");
    }
}
