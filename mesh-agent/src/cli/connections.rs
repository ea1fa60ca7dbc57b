//! `mesh-agent connections`: the connections the agent is proxying right now.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use super::Output;

#[derive(Debug, Deserialize)]
struct Conn {
    pod: String,
    direction: String,
    protocol: String,
    client: String,
    destination: String,
    upstream: String,
    peer_identity: Option<String>,
    age_seconds: u64,
    bytes_received: u64,
    bytes_sent: u64,
}

/// Lists open connections, optionally only those of one pod (`NAMESPACE/NAME`, or `NAME`
/// in any namespace).
pub async fn run(socket: &Path, output: Output, pod: Option<&str>) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/connections").await?;
    let body = match pod {
        None => body,
        Some(pod) => {
            let all: Vec<serde_json::Value> = serde_json::from_str(&body)
                .context("the agent's /connections answer is not valid JSON")?;
            let kept: Vec<_> = all
                .into_iter()
                .filter(|c| c["pod"].as_str().is_some_and(|p| pod_matches(p, pod)))
                .collect();
            serde_json::to_string_pretty(&kept)? + "\n"
        }
    };
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let list: Vec<Conn> =
        serde_json::from_str(&body).context("the agent's /connections answer is not valid JSON")?;
    if list.is_empty() {
        println!("no open connections");
        return Ok(());
    }
    print!("{}", table(&list));
    Ok(())
}

fn pod_matches(pod: &str, wanted: &str) -> bool {
    pod == wanted || (!wanted.contains('/') && pod.rsplit('/').next() == Some(wanted))
}

fn table(list: &[Conn]) -> String {
    let mut rows = vec![[
        "POD".to_string(),
        "DIRECTION".to_string(),
        "PROTOCOL".to_string(),
        "CLIENT".to_string(),
        "DESTINATION".to_string(),
        "UPSTREAM".to_string(),
        "PEER IDENTITY".to_string(),
        "AGE".to_string(),
        "RECEIVED".to_string(),
        "SENT".to_string(),
    ]];
    for c in list {
        rows.push([
            c.pod.clone(),
            c.direction.clone(),
            c.protocol.clone(),
            c.client.clone(),
            c.destination.clone(),
            c.upstream.clone(),
            c.peer_identity.clone().unwrap_or_else(|| "-".into()),
            format!("{}s", c.age_seconds),
            c.bytes_received.to_string(),
            c.bytes_sent.to_string(),
        ]);
    }
    super::render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_table() {
        let list: Vec<Conn> = serde_json::from_str(
            r#"[{"id":1,"pod":"default/client","direction":"outbound","protocol":"HBONE",
                "client":"10.244.1.2:40000","destination":"10.96.0.10:80",
                "upstream":"10.244.2.2:8080",
                "peer_identity":"spiffe://cluster.local/ns/default/sa/server",
                "started":"2026-11-26T02:00:00Z","age_seconds":12,
                "bytes_received":100,"bytes_sent":2048},
               {"id":2,"pod":"default/server","direction":"inbound","protocol":"TCP",
                "client":"10.244.3.9:51000","destination":"10.244.1.2:9999",
                "upstream":"10.244.1.2:9999","peer_identity":null,
                "started":"2026-11-26T02:00:05Z","age_seconds":7,
                "bytes_received":5,"bytes_sent":0}]"#,
        )
        .unwrap();
        assert_eq!(
            table(&list),
            "POD             DIRECTION  PROTOCOL  CLIENT            DESTINATION      UPSTREAM         PEER IDENTITY                                AGE  RECEIVED  SENT\n\
             default/client  outbound   HBONE     10.244.1.2:40000  10.96.0.10:80    10.244.2.2:8080  spiffe://cluster.local/ns/default/sa/server  12s  100       2048\n\
             default/server  inbound    TCP       10.244.3.9:51000  10.244.1.2:9999  10.244.1.2:9999  -                                            7s   5         0\n"
        );
        assert!(pod_matches("default/client", "client"));
        assert!(pod_matches("default/client", "default/client"));
        assert!(!pod_matches("default/client", "other/client"));
    }
}
