//! Golden tests of the inspection CLI on the demo topology (root): `cargo xtask demo`'s
//! bookinfo manifests and routing rules on two nodes, then `status`, `workloads`,
//! `services`, `routes`, `certs`, `connections` and `version` on each agent, in table and
//! JSON form, compared with `tests/data/golden/`.
//!
//! What changes from run to run (times, serials, ephemeral ports, ages, the testbed's name)
//! is replaced by a placeholder first; everything else must match byte for byte (tables
//! compare cell by cell, as column widths follow the replaced values). After a deliberate
//! change of the output, regenerate with `MESH_UPDATE_GOLDEN=1` and review the diff.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use regex::Regex;
use serde_json::Value;

const BOOKINFO: &str = include_str!("../../xtask/demo/bookinfo.yaml");
const ROUTING: &str = include_str!("../../xtask/demo/routing.yaml");

#[test]
fn cli_outputs_on_the_demo_topology_match_the_golden_files() {
    let Some(tb) = up(
        "cli_golden",
        2,
        &[("bookinfo.yaml", BOOKINFO), ("routing.yaml", ROUTING)],
    ) else {
        return;
    };
    let pods = [
        ("node-1", 4), // productpage, reviews-v1, ratings, sleep
        ("node-2", 3), // details, reviews-v2, reviews-v3
    ];
    for (node, n) in pods {
        wait_until(
            &format!("{n} pods enrolled on {node}"),
            Duration::from_secs(20),
            || enrolled(&tb, node).len() == n,
        );
    }
    // One open connection to list: sleep (node-1) to an echo server in details-v1
    // (node-2), over HBONE, with known byte counts.
    let _echo = serve(&tb, "details-v1", &["echo", "--listen", "0.0.0.0:7000"]);
    let details = tb.pod_ip("default", "details-v1").expect("ip");
    let mut chat = Chat::open(&tb, "sleep", &format!("{details}:7000"));
    assert!(chat.echo("hello"));

    let volatile = Volatile::new(tb.prefix());
    let mut mismatches = Vec::new();
    let commands: &[&[&str]] = &[
        &["status"],
        &["workloads"],
        &["services"],
        &["routes"],
        &["routes", "sleep"],
        &["certs"],
        &["connections"],
    ];
    for (node, _) in pods {
        let socket = tb.node(node).expect("node").admin_socket.clone();
        for args in commands {
            for format in ["table", "json"] {
                let out = Command::new(AGENT)
                    .args(*args)
                    .args(["-o", format, "--admin-socket"])
                    .arg(&socket)
                    .output()
                    .expect("run the CLI");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "mesh-agent {args:?} -o {format} on {node}: {}\n{stdout}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let normalised = match format {
                    "json" => volatile.json(&stdout),
                    _ => volatile.table(&stdout),
                };
                let name = format!(
                    "{node}-{}.{}",
                    args.join("-"),
                    if format == "json" { "json" } else { "txt" }
                );
                if let Some(m) = compare(&name, &normalised) {
                    mismatches.push(m);
                }
            }
        }
        let out = Command::new(AGENT)
            .args(["version", "--admin-socket"])
            .arg(&socket)
            .output()
            .expect("version");
        assert!(out.status.success());
        let version = volatile.table(&String::from_utf8_lossy(&out.stdout));
        if let Some(m) = compare(&format!("{node}-version.txt"), &version) {
            mismatches.push(m);
        }
    }
    drop(chat);
    assert!(
        mismatches.is_empty(),
        "CLI output differs from the golden files (MESH_UPDATE_GOLDEN=1 rewrites them):\n\n{}",
        mismatches.join("\n\n")
    );
}

/// `tests/data/golden/NAME`, or None when `actual` equals it; rewrites it instead with
/// MESH_UPDATE_GOLDEN=1.
fn compare(name: &str, actual: &str) -> Option<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(name);
    if std::env::var_os("MESH_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return None;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    (expected != actual).then(|| {
        let diff: Vec<String> = diff_lines(&expected, actual);
        format!("--- {}\n{}", path.display(), diff.join("\n"))
    })
}

/// The lines that differ, position by position (the outputs are short).
fn diff_lines(expected: &str, actual: &str) -> Vec<String> {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    (0..e.len().max(a.len()))
        .filter(|&i| e.get(i) != a.get(i))
        .map(|i| {
            format!(
                "line {}:\n  expected: {}\n  actual:   {}",
                i + 1,
                e.get(i).unwrap_or(&"<none>"),
                a.get(i).unwrap_or(&"<none>")
            )
        })
        .collect()
}

/// What differs between two runs of the same topology, and its placeholders.
struct Volatile {
    rules: Vec<(Regex, &'static str)>,
    /// JSON keys whose values differ between runs.
    keys: &'static [&'static str],
}

impl Volatile {
    fn new(testbed: &str) -> Self {
        let rule = |re: &str, to: &'static str| (Regex::new(re).expect("regex"), to);
        Self {
            rules: vec![
                rule(&regex::escape(testbed), "<testbed>"),
                rule(
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
                    "<time>",
                ),
                // Certificate serials (hex, maybe colon-separated).
                rule(r"\b[0-9a-f]{2}(:[0-9a-f]{2}){7,}\b", "<serial>"),
                rule(r"\b[0-9a-f]{16,}\b", "<serial>"),
                // Ephemeral client ports.
                rule(
                    r"(\d+\.\d+\.\d+\.\d+):(3[2-9]\d{3}|[4-6]\d{4})\b",
                    "$1:<port>",
                ),
                // Ages and remaining lifetimes: 3s, 12m4s, 23h59m.
                rule(r"\b(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)\b", "<age>"),
                rule(r"\b\d+h\d+m\b", "<age>"),
            ],
            keys: &[
                "serial",
                "not_before",
                "not_after",
                "age_seconds",
                "uptime_seconds",
                "started",
                "renew_at",
                "expires_in_seconds",
                // Kernel-assigned network namespace cookies.
                "netns_cookie",
                // The agent's own connections (to the CA, HBONE): retries make them vary.
                "skipped_agent_mark",
            ],
        }
    }

    fn text(&self, s: &str) -> String {
        self.rules.iter().fold(s.to_string(), |acc, (re, to)| {
            re.replace_all(&acc, *to).into_owned()
        })
    }

    /// Cells of each row joined by ` | `: column widths follow the replaced values, so
    /// alignment is left to the unit tests of `render_table`.
    fn table(&self, s: &str) -> String {
        let split = Regex::new(r" {2,}").expect("regex");
        let mut out = String::new();
        for line in self.text(s).lines() {
            let cells: Vec<&str> = split.split(line.trim_end()).collect();
            out.push_str(&cells.join(" | "));
            out.push('\n');
        }
        out
    }

    fn json(&self, s: &str) -> String {
        let mut v: Value = serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"));
        self.scrub(&mut v);
        serde_json::to_string_pretty(&v).expect("json") + "\n"
    }

    fn scrub(&self, v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    if self.keys.contains(&k.as_str()) && !val.is_null() {
                        *val = Value::String(format!("<{k}>"));
                    } else {
                        self.scrub(val);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.scrub(i)),
            Value::String(s) => *s = self.text(s),
            _ => {}
        }
    }
}
