//! `mesh-agent routes [POD]`: the effective HTTP routes, per Service port: the
//! VirtualService in force, each rule's match and where it sends requests (Istio's
//! `proxy-config routes`).

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use super::Output;

#[derive(Debug, Deserialize)]
struct Destination {
    service: Option<String>,
    port: Option<u16>,
    subset: Option<String>,
    weight: u32,
    endpoints: usize,
    healthy: usize,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    matches: Vec<String>,
    action: String,
    destinations: Vec<Destination>,
    detail: Option<String>,
    timeout: Option<String>,
    retries: Option<String>,
    fault: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PortRoutes {
    service: String,
    address: String,
    virtual_service: Option<String>,
    rules: Vec<Rule>,
}

/// Shows the routes, as `pod` (`NAMESPACE/NAME`, or `NAME` in `default`) sees them.
pub async fn run(socket: &Path, output: Output, pod: Option<&str>) -> anyhow::Result<()> {
    let path = match pod {
        Some(p) => format!("/routes?pod={p}"),
        None => "/routes".into(),
    };
    let body = super::client::get_ok(socket, &path).await?;
    if super::print_structured(&body, output)? {
        return Ok(());
    }
    let list: Vec<PortRoutes> =
        serde_json::from_str(&body).context("the agent's /routes answer is not valid JSON")?;
    if list.is_empty() {
        println!("no HTTP Service ports");
        return Ok(());
    }
    print!("{}", table(&list));
    Ok(())
}

fn route(r: &Rule) -> String {
    let mut s = match r.action.as_str() {
        "route" => {
            let total: u32 = r.destinations.iter().map(|d| d.weight).sum();
            r.destinations
                .iter()
                .map(|d| {
                    let mut s = match (&d.service, &d.error) {
                        (Some(svc), _) => {
                            let subset = d
                                .subset
                                .as_ref()
                                .map(|s| format!("/{s}"))
                                .unwrap_or_default();
                            let port = d.port.map(|p| format!(":{p}")).unwrap_or_default();
                            format!(
                                "{svc}{subset}{port} ({}/{} healthy)",
                                d.healthy, d.endpoints
                            )
                        }
                        (None, Some(e)) => format!("503 NC: {e}"),
                        (None, None) => "?".into(),
                    };
                    if r.destinations.len() > 1 && total > 0 {
                        s.push_str(&format!(" {}%", d.weight * 100 / total));
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        "redirect" => format!("redirect {}", r.detail.as_deref().unwrap_or("")),
        _ => format!("direct response {}", r.detail.as_deref().unwrap_or("")),
    };
    for (what, v) in [
        ("timeout", &r.timeout),
        ("retries", &r.retries),
        ("fault", &r.fault),
    ] {
        if let Some(v) = v {
            s.push_str(&format!("; {what} {v}"));
        }
    }
    s
}

fn table(list: &[PortRoutes]) -> String {
    let mut rows =
        vec![["SERVICE", "ADDRESS", "VIRTUALSERVICE", "MATCH", "ROUTE"].map(String::from)];
    for p in list {
        for r in &p.rules {
            rows.push([
                p.service.clone(),
                p.address.clone(),
                p.virtual_service.clone().unwrap_or_else(|| "-".into()),
                r.matches.join(" || "),
                route(r),
            ]);
        }
    }
    super::render_table(&rows)
}
