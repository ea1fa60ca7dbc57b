//! What the demo prints: the answers to the client's requests and what each agent proxied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use mesh_testbed::Testbed;
use serde_json::Value;

/// The reviews versions bookinfo has.
pub const REVIEWS_VERSIONS: [&str; 3] = ["v1", "v2", "v3"];
/// The demo's routing rules (`demo/routing.yaml`): end-user jason gets reviews v2, everyone
/// else v1 or v3, half each.
pub const JASON_VERSION: &str = "v2";
pub const SPLIT_VERSIONS: [&str; 2] = ["v1", "v3"];

/// The client's requests to productpage and what answered them.
#[derive(Debug, Default)]
pub struct Traffic {
    pub requests: usize,
    /// reviews version -> answers, for requests without an end-user.
    pub reviews: BTreeMap<String, usize>,
    /// reviews version -> answers, for requests as end-user jason.
    pub jason: BTreeMap<String, usize>,
    /// Requests whose reviews called ratings (v2 and v3 do).
    pub ratings_calls: usize,
    /// The reviews version of each request, in order (`-` when the request failed).
    pub order: Vec<String>,
    /// "request N: reason".
    pub failures: Vec<String>,
    /// A complete answer, preferably one where reviews called ratings.
    pub sample: Option<Value>,
    sample_without_ratings: bool,
    /// Spans of the longest trace the collector received (`None`: not looked at).
    pub longest_trace: Option<usize>,
}

impl Traffic {
    /// Records one curl result (its HTTP status and body), sent as `user` (the `end-user`
    /// header) if given.
    pub fn record(&mut self, n: usize, status: u16, body: &str, user: Option<&str>) {
        let answer = if status == 200 {
            serde_json::from_str::<Value>(body)
                .map_err(|e| format!("productpage answered invalid JSON ({e})"))
                .and_then(|v| analyse(&v).map(|a| (a, v)))
        } else {
            Err(format!(
                "productpage answered HTTP {status}: {}",
                body.trim()
            ))
        };
        match answer {
            Ok(((version, ratings), v)) => {
                self.requests += 1;
                let per_version = if user.is_some() {
                    &mut self.jason
                } else {
                    &mut self.reviews
                };
                *per_version.entry(version.clone()).or_default() += 1;
                self.ratings_calls += usize::from(ratings);
                self.order.push(version);
                // Prefer an answer that shows the whole chain (reviews v2/v3 -> ratings).
                if self.sample.is_none() || (ratings && self.sample_without_ratings) {
                    self.sample_without_ratings = !ratings;
                    self.sample = Some(v);
                }
            }
            Err(reason) => self.fail(n, reason),
        }
    }

    /// Records a failed request.
    pub fn fail(&mut self, n: usize, reason: String) {
        self.requests += 1;
        self.order.push("-".into());
        self.failures.push(format!("request {n}: {reason}"));
    }

    /// Fails if a request failed, or reviews answered against the routing rules: requests
    /// without an end-user must reach v1 and v3 (and only them), jason's only v2.
    pub fn check(&self) -> Result<()> {
        // sleep -> productpage -> details, reviews -> ratings: two spans per hop.
        if let Some(n) = self.longest_trace
            && n < 8
        {
            bail!(
                "the longest trace at the OTLP collector has {n} spans; a request through                  productpage, details, reviews and ratings makes 8"
            );
        }
        if !self.failures.is_empty() {
            bail!(
                "{} of {} requests failed; first: {}",
                self.failures.len(),
                self.requests,
                self.failures[0]
            );
        }
        if let Some((v, n)) = self
            .reviews
            .iter()
            .find(|(v, _)| !SPLIT_VERSIONS.contains(&v.as_str()))
        {
            bail!(
                "reviews {v} answered {n} requests without an end-user; the VirtualService \
                 sends those to {} only",
                SPLIT_VERSIONS.join(" and ")
            );
        }
        if let Some((v, n)) = self.jason.iter().find(|(v, _)| v.as_str() != JASON_VERSION) {
            bail!(
                "reviews {v} answered {n} requests of end-user jason; the VirtualService sends those to {JASON_VERSION}"
            );
        }
        let missing: Vec<&str> = SPLIT_VERSIONS
            .into_iter()
            .filter(|v| !self.reviews.contains_key(*v))
            .collect();
        if !missing.is_empty() {
            bail!(
                "reviews {} never answered in {} requests (the 50/50 split should reach both)",
                missing.join(", "),
                self.requests
            );
        }
        Ok(())
    }
}

/// The call made to `name` in a testapp answer.
fn call<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["calls"].as_array()?.iter().find(|c| c["name"] == name)
}

/// Checks that every call in the tree answered 200.
fn all_ok(v: &Value, path: &str) -> Result<(), String> {
    for c in v["calls"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("?");
        let here = format!("{path} -> {name}");
        if c["status"] != 200 {
            let why = match &c["body"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            return Err(format!("{here} failed (status {}): {why}", c["status"]));
        }
        all_ok(&c["body"], &here)?;
    }
    Ok(())
}

/// (reviews version, whether reviews called ratings) of a productpage answer.
fn analyse(v: &Value) -> Result<(String, bool), String> {
    all_ok(v, "productpage")?;
    for needed in ["details", "reviews"] {
        if call(v, needed).is_none() {
            return Err(format!("productpage did not call {needed}"));
        }
    }
    let reviews = &call(v, "reviews")
        .map(|c| &c["body"])
        .unwrap_or(&Value::Null);
    let version = reviews["version"]
        .as_str()
        .ok_or_else(|| format!("reviews answered without a version: {reviews}"))?;
    Ok((version.to_string(), call(reviews, "ratings").is_some()))
}

/// Pod IP -> pod name.
fn pod_names(tb: &Testbed) -> HashMap<String, String> {
    tb.pods()
        .iter()
        .map(|p| (p.ip.to_string(), p.name.clone()))
        .collect()
}

/// `ip (pod)` for an address `ip` or `ip:port`.
fn who(addr: &str, pods: &HashMap<String, String>) -> String {
    let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
    match pods.get(ip) {
        Some(name) => format!("{ip} ({name})"),
        None => ip.to_string(),
    }
}

fn print_tree(v: &Value, indent: &str, pods: &HashMap<String, String>) {
    let calls: Vec<&Value> = v["calls"].as_array().into_iter().flatten().collect();
    for (i, c) in calls.iter().enumerate() {
        let last = i + 1 == calls.len();
        let b = &c["body"];
        println!(
            "{indent}{} {} {} -> {} {} on {}, saw client {}",
            if last { "└─" } else { "├─" },
            c["url"].as_str().unwrap_or("?"),
            c["status"],
            b["service"].as_str().unwrap_or("?"),
            b["version"].as_str().unwrap_or("?"),
            who(b["pod_ip"].as_str().unwrap_or("?"), pods),
            who(b["client"].as_str().unwrap_or("?"), pods),
        );
        print_tree(
            b,
            &format!("{indent}{}", if last { "   " } else { "│  " }),
            pods,
        );
    }
}

pub fn print_traffic(tb: &Testbed, t: &Traffic) {
    let pods = pod_names(tb);
    if let Some(v) = &t.sample {
        println!("one answer, condensed (the JSON also has each hop's request headers):");
        println!(
            "  productpage {} on {}, saw client {}",
            v["version"].as_str().unwrap_or("?"),
            who(v["pod_ip"].as_str().unwrap_or("?"), &pods),
            who(v["client"].as_str().unwrap_or("?"), &pods),
        );
        print_tree(v, "  ", &pods);
        let reviews = call(v, "reviews").map(|c| &c["body"]);
        let version = reviews.and_then(|r| r["version"].as_str()).unwrap_or("?");
        let ratings = reviews.is_some_and(|r| call(r, "ratings").is_some());
        println!(
            "  => reviews {version} answered; ratings {}",
            if ratings {
                "was called"
            } else {
                "was not called (reviews-v1 never calls it)"
            }
        );
    }
    println!();
    println!("reviews version per request: {}", t.order.join(" "));
    println!("  without an end-user (VirtualService reviews: v1 50%, v3 50%):");
    for version in REVIEWS_VERSIONS {
        let n = t.reviews.get(version).copied().unwrap_or(0);
        println!("    reviews {version}: {n:>3} {}", "#".repeat(n));
    }
    for (other, n) in t
        .reviews
        .iter()
        .filter(|(v, _)| !REVIEWS_VERSIONS.contains(&v.as_str()))
    {
        println!("    reviews {other}: {n:>3} (unexpected version)");
    }
    println!("  as end-user jason (header match: v2):");
    for (version, n) in &t.jason {
        println!("    reviews {version}: {n:>3} {}", "#".repeat(*n));
    }
    println!(
        "  ratings called by {} of {} answers; {} failed",
        t.ratings_calls,
        t.requests,
        t.failures.len()
    );
    for f in t.failures.iter().take(5) {
        println!("  FAILED {f}");
    }
}

/// `mesh-agent routes productpage-v1`: the rules productpage's agent applies to its calls.
pub fn print_routes(tb: &Testbed, agent_bin: &Path) {
    let Some(node) = tb.nodes().first() else {
        return;
    };
    println!(
        "the routes productpage-v1 sees (mesh-agent routes productpage-v1, agent of {}):",
        node.name
    );
    let out = std::process::Command::new(agent_bin)
        .args(["routes", "productpage-v1", "--admin-socket"])
        .arg(&node.admin_socket)
        .output();
    match out {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                println!("  {line}");
            }
        }
        Ok(o) => println!("  (failed: {})", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => println!("  (could not run {}: {e})", agent_bin.display()),
    }
}

fn admin_json(tb: &Testbed, node: &str, path: &str) -> Result<Value> {
    let (code, body) = tb.admin_get(node, path)?;
    if code != 200 {
        bail!(
            "GET {path} on the agent of {node} answered {code}: {}",
            body.trim()
        );
    }
    serde_json::from_str(&body)
        .with_context(|| format!("GET {path} on the agent of {node}: invalid JSON"))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn bytes(n: u64) -> String {
    if n < 10 * 1024 {
        format!("{n} B")
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// Per node: enrolled workloads with their outbound connections, per-service connections,
/// proxy and eBPF counters, from the agent's admin API.
pub fn print_agents(tb: &Testbed) -> Result<()> {
    println!("what each agent proxied (admin API /workloads and /stats):");
    for node in tb.nodes() {
        let workloads = admin_json(tb, &node.name, "/workloads")?;
        let stats = admin_json(tb, &node.name, "/stats")?;
        let pid = tb
            .agent_pid(&node.name)
            .map_or("?".into(), |p| p.to_string());
        println!();
        println!("{} (agent pid {pid})", node.name);
        println!(
            "  {:<24} {:<12} {:<22} {:<9} {:>8} {:>7}",
            "WORKLOAD", "IP", "SERVICE ACCOUNT", "STATE", "OUTBOUND", "ERRORS"
        );
        for w in workloads.as_array().into_iter().flatten() {
            println!(
                "  {:<24} {:<12} {:<22} {:<9} {:>8} {:>7}",
                format!(
                    "{}/{}",
                    w["namespace"].as_str().unwrap_or("?"),
                    w["name"].as_str().unwrap_or("?")
                ),
                w["ip"].as_str().unwrap_or("-"),
                w["service_account"].as_str().unwrap_or("?"),
                w["state"].as_str().unwrap_or("?"),
                num(&w["outbound_connections"]),
                num(&w["outbound_errors"]),
            );
        }
        let services: Vec<String> = stats["services"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                let mut line = format!(
                    "{} {}",
                    s["service"].as_str().unwrap_or("?"),
                    num(&s["connections"])
                );
                let errors = num(&s["connect_errors"]) + num(&s["no_endpoints"]);
                if errors > 0 {
                    line.push_str(&format!(" ({errors} failed)"));
                }
                line
            })
            .collect();
        println!("  connections per service: {}", services.join(", "));
        let p = &stats["proxy"];
        println!(
            "  proxy: {} accepted, {} completed, {} active, {} connect errors, {} sent, {} received",
            num(&p["accepted"]),
            num(&p["completed"]),
            num(&p["active"]),
            num(&p["connect_errors"]),
            bytes(num(&p["bytes_sent"])),
            bytes(num(&p["bytes_received"])),
        );
        let e = &stats["ebpf"];
        println!(
            "  eBPF: {} connects redirected to 127.0.0.1:15001, {} original destinations recorded, \
             {} map errors, {} netns enrolled",
            num(&e["redirected"]),
            num(&e["recorded"]),
            num(&e["map_errors"]),
            num(&e["enrolled_entries"]),
        );
    }
    Ok(())
}

/// How to look at the running demo by hand.
pub fn print_inspect(tb: &Testbed, agent_bin: &Path, curl_args: &str, waiting: bool) {
    println!();
    if waiting {
        println!("inspect it yourself while the demo runs:");
    } else {
        println!("inspect it yourself (run without --no-wait to keep the testbed up):");
    }
    for node in tb.nodes() {
        println!(
            "  {} workloads --admin-socket {}",
            agent_bin.display(),
            node.admin_socket.display()
        );
    }
    if let Some(node) = tb.nodes().first() {
        // productpage runs on node-1: its agent routes its calls to reviews.
        println!(
            "  {} routes productpage-v1 --admin-socket {}",
            agent_bin.display(),
            node.admin_socket.display()
        );
    }
    if let Some(node) = tb.nodes().first() {
        println!(
            "  curl -s --unix-socket {} http://agent/stats   (also /workloads, /config_dump)",
            node.admin_socket.display()
        );
    }
    for node in tb.nodes() {
        println!("  agent log of {}: {}", node.name, node.agent_log.display());
    }
    if let Ok(sleep) = tb.pod("sleep") {
        // The pod's cgroup first (capture is attached to the node's cgroup), then its netns.
        println!(
            "  curl from the sleep pod: sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} curl {curl_args}'",
            sleep.cgroup.display(),
            sleep.netns
        );
    }
    println!(
        "  testbed {} state: {}   (if the demo is killed: cargo xtask testbed down --all)",
        tb.prefix(),
        tb.state_dir().display()
    );
}

/// Where the access log goes (MeshConfig `accessLogFile: /dev/stdout`: each agent's stdout,
/// kept in the testbed's agent log), with one HTTP line from each side.
pub fn print_access_log(tb: &Testbed) {
    println!(
        "==> access log (accessLogFile: /dev/stdout, Istio's default TEXT format): each agent's stdout"
    );
    for n in tb.nodes() {
        let log = tb.agent_log(&n.name);
        let http = |cluster: &str| {
            log.lines()
                .rev()
                .find(|l| l.starts_with('[') && l.contains("\"GET ") && l.contains(cluster))
                .map(str::to_string)
        };
        println!("    {}: {}", n.name, n.agent_log.display());
        for cluster in [" outbound|", " inbound|"] {
            if let Some(l) = http(cluster) {
                println!("      {l}");
            }
        }
    }
}
