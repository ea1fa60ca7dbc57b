//! `mesh-agent certs`: the workload certificates this node's agent holds.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use super::Output;

#[derive(Debug, Deserialize)]
struct Cert {
    identity: String,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    state: String,
    last_error: Option<String>,
}

pub async fn run(socket: &Path, output: Output) -> anyhow::Result<()> {
    let body = super::client::get_ok(socket, "/certs").await?;
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let list: Vec<Cert> =
        serde_json::from_str(&body).context("the agent's /certs answer is not valid JSON")?;
    if list.is_empty() {
        println!("no workload certificates (mutual TLS is off, or no pod is enrolled)");
        return Ok(());
    }
    print!("{}", table(&list));
    Ok(())
}

fn table(list: &[Cert]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "IDENTITY".to_string(),
        "SERIAL".to_string(),
        "NOT BEFORE".to_string(),
        "NOT AFTER".to_string(),
        "STATE".to_string(),
    ]];
    for c in list {
        let state = match &c.last_error {
            Some(e) => format!("{} (last error: {e})", c.state),
            None => c.state.clone(),
        };
        rows.push([
            c.identity.clone(),
            dash(&c.serial),
            dash(&c.not_before),
            dash(&c.not_after),
            state,
        ]);
    }
    super::render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_state_and_last_error() {
        let list = vec![Cert {
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            serial: Some("0a1b".into()),
            not_before: Some("2026-11-25T18:00:00Z".into()),
            not_after: Some("2026-11-26T18:00:00Z".into()),
            state: "renewing".into(),
            last_error: Some("CA unreachable".into()),
        }];
        let t = table(&list);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("IDENTITY"));
        assert!(lines[1].contains("sa/web") && lines[1].contains("0a1b"));
        assert!(lines[1].ends_with("renewing (last error: CA unreachable)"));
    }
}
