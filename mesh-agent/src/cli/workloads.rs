//! `mesh-agent workloads`: this node's enrolled pods.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use super::Output;

#[derive(Debug, Deserialize)]
struct Workload {
    namespace: String,
    name: String,
    ip: Option<String>,
    service_account: String,
    state: String,
    error: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    outbound_connections: u64,
    outbound_active: u64,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
}

pub async fn run(socket: &Path, output: Output) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/workloads").await?;
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let list: Vec<Workload> =
        serde_json::from_str(&body).context("the agent's /workloads answer is not valid JSON")?;
    print!("{}", table(&list));
    Ok(())
}

fn table(list: &[Workload]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".to_string(),
        "IP".to_string(),
        "IDENTITY".to_string(),
        "PROTOCOL".to_string(),
        "STATE".to_string(),
        "CONNECTIONS".to_string(),
        "ACTIVE".to_string(),
    ]];
    for w in list {
        let state = match w.error.as_ref().or(w.reason.as_ref()) {
            Some(e) => format!("{} ({e})", w.state),
            None => w.state.clone(),
        };
        rows.push([
            w.namespace.clone(),
            w.name.clone(),
            w.ip.clone().unwrap_or_else(|| "-".into()),
            w.identity
                .clone()
                .unwrap_or_else(|| w.service_account.clone()),
            w.protocol.clone().unwrap_or_else(|| "TCP".into()),
            state,
            w.outbound_connections.to_string(),
            w.outbound_active.to_string(),
        ]);
    }
    super::render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let list = vec![Workload {
            namespace: "default".into(),
            name: "productpage-v1".into(),
            ip: Some("10.244.1.2".into()),
            service_account: "bookinfo-productpage".into(),
            state: "enrolled".into(),
            error: None,
            reason: None,
            outbound_connections: 3,
            outbound_active: 1,
            identity: Some("spiffe://cluster.local/ns/default/sa/bookinfo-productpage".into()),
            protocol: Some("HBONE".into()),
        }];
        let t = table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAMESPACE  NAME"));
        assert!(lines[1].contains("productpage-v1"));
        assert_eq!(
            lines[0].find(" NAME ").map(|i| i + 1),
            lines[1].find("productpage-v1")
        );
    }
}
