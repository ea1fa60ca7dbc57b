//! Enrollment and agent lifecycle on the testbed (root): who is captured, enrolling and
//! unenrolling at runtime, failing closed while the agent is away, and bad manifests.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

fn curl_client_ip(tb: &mesh_testbed::Testbed, from: &str, url: &str) -> String {
    let body = curl(tb, from, url).unwrap_or_else(|e| panic!("{e:#}"));
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let client = v["client"].as_str().expect("client").to_string();
    client.split(':').next().unwrap_or_default().to_string()
}

#[test]
fn unlabelled_namespace_and_opted_out_pod_are_not_captured() {
    let yaml = docs(&[
        namespace("default", true),
        namespace("plain", false),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod(
            "default",
            "optout",
            "node-1",
            &[("app", "optout"), ("nodemesh.io/enabled", "false")],
            9999,
        ),
        pod("plain", "outsider", "node-1", &[("app", "outsider")], 9999),
        pod("default", "web", "node-2", &[("app", "web")], 8080),
    ]);
    let Some(tb) = up("lc_not_captured", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _web = serve(
        &tb,
        "web",
        &["http", "--listen", "0.0.0.0:8080", "--service", "web"],
    );
    let url = format!("http://{}:8080/", tb.pod_ip("default", "web").expect("ip"));

    let names = enrolled(&tb, "node-1");
    assert!(names.contains(&"default/client".to_string()), "{names:?}");
    assert!(!names.contains(&"default/optout".to_string()), "{names:?}");
    assert!(!names.contains(&"plain/outsider".to_string()), "{names:?}");

    let redirected = counter(&tb, "node-1", "ebpf", "redirected");
    for p in ["optout", "outsider"] {
        let seen = curl_client_ip(&tb, p, &url);
        assert_eq!(seen, tb.pod(p).expect("pod").ip.to_string());
    }
    assert_eq!(
        counter(&tb, "node-1", "ebpf", "redirected"),
        redirected,
        "an unenrolled pod's connection was redirected"
    );
    // The same request from the enrolled pod is captured: the counter can move.
    curl_client_ip(&tb, "client", &url);
    assert_eq!(counter(&tb, "node-1", "ebpf", "redirected"), redirected + 1);
    tb.down().expect("down");
}

#[test]
fn enroll_and_unenroll_at_runtime_keep_established_connections() {
    let pods = docs(&[
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod("default", "echo", "node-2", &[("app", "echo")], 7000),
    ]);
    let Some(mut tb) = up(
        "lc_runtime_enroll",
        2,
        &[
            ("ns.yaml", &namespace("default", false)),
            ("pods.yaml", &pods),
        ],
    ) else {
        return;
    };
    let _echo = serve(&tb, "echo", &["echo", "--listen", "0.0.0.0:7000"]);
    let target = format!("{}:7000", tb.pod_ip("default", "echo").expect("ip"));
    let accepted = |tb: &mesh_testbed::Testbed| counter(tb, "node-1", "proxy", "accepted");

    // Not enrolled yet: a connection goes direct.
    let before = accepted(&tb);
    let mut direct = Chat::open(&tb, "client", &target);
    assert!(direct.echo("direct"));
    assert_eq!(accepted(&tb), before);

    tb.apply("ns.yaml", &namespace("default", true))
        .expect("label namespace");
    wait_until("client enrolled", WAIT, || {
        enrolled(&tb, "node-1").contains(&"default/client".to_string())
    });
    let mut meshed = Chat::open(&tb, "client", &target);
    assert!(meshed.echo("through the agent"));
    assert_eq!(accepted(&tb), before + 1);

    tb.apply("ns.yaml", &namespace("default", false))
        .expect("unlabel namespace");
    wait_until("client unenrolled", WAIT, || {
        !enrolled(&tb, "node-1").contains(&"default/client".to_string())
    });
    // The established connection through the agent survives the unenroll...
    assert!(meshed.echo("still flowing after unenroll"));
    assert!(direct.echo("direct still flowing"));
    // ...and new connections are no longer captured.
    let mut after = Chat::open(&tb, "client", &target);
    assert!(after.echo("direct again"));
    assert_eq!(accepted(&tb), before + 1);
    drop((direct, meshed, after));
    tb.down().expect("down");
}

#[test]
fn stopped_agent_fails_closed_and_restarted_agent_captures_again() {
    let yaml = docs(&[
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod("default", "web", "node-2", &[("app", "web")], 8080),
    ]);
    let Some(mut tb) = up("lc_fail_closed", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _web = serve(&tb, "web", &["peer", "--listen", "0.0.0.0:8080"]);
    let target = format!("{}:8080", tb.pod_ip("default", "web").expect("ip"));
    read_from(&tb, "client", &target).expect("through the agent");

    tb.kill_agent("node-1").expect("kill agent");
    for _ in 0..3 {
        let r = read_from(&tb, "client", &target);
        assert!(
            r.is_err(),
            "with the agent gone the connection must fail, not leak around the mesh: {r:?}"
        );
    }
    tb.start_agent("node-1").expect("restart agent");
    let accepted = counter(&tb, "node-1", "proxy", "accepted");
    let reply = read_from(&tb, "client", &target).expect("captured again after restart");
    assert!(reply.starts_with(&tb.pod_ip("default", "client").expect("ip").to_string()));
    assert_eq!(counter(&tb, "node-1", "proxy", "accepted"), accepted + 1);
    tb.down().expect("down");
}

/// Writes a file into the agents' manifests directory atomically, bypassing the testbed's
/// rendering (which would refuse or fix some of these mistakes).
fn write_raw(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

#[test]
fn bad_manifests_are_reported_and_the_last_good_config_stays() {
    let yaml = docs(&[
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        pod("default", "web", "node-2", &[("app", "web")], 8080),
        service("default", "web", "web", 80),
    ]);
    let Some(tb) = up("lc_bad_manifests", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _web = serve(&tb, "web", &["peer", "--listen", "0.0.0.0:8080"]);
    let svc = format!("{}:80", tb.service_ip("default", "web").expect("ip"));
    let dir = tb.manifests_dir();
    let generation = admin_json(&tb, "node-1", "/config_dump")["generation"].clone();

    let cases: [(&str, String, &[&str]); 5] = [
        (
            "broken-syntax.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n".to_string(),
            &["broken-syntax.yaml", "line"],
        ),
        (
            "unknown-field.yaml",
            pod("default", "typo", "node-1", &[("app", "typo")], 1)
                .replace("  containers:", "  containerz: []\n  containers:"),
            &["unknown-field.yaml", "spec.containerz"],
        ),
        (
            "no-selector.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: nosel}\nspec:\n  ports: [{port: 80}]\n"
                .to_string(),
            &["no-selector.yaml", "selector"],
        ),
        (
            "no-ports.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: noports}\nspec:\n  selector: {app: web}\n"
                .to_string(),
            &["no-ports.yaml", "ports"],
        ),
        (
            "no-netns.yaml",
            pod("default", "lost", "node-1", &[("app", "lost")], 1),
            &["no-netns.yaml", "nodemesh.io/netns"],
        ),
    ];
    for (file, text, expect) in &cases {
        write_raw(&dir, file, text);
        let mut last = String::new();
        wait_until(&format!("the agent to report {file}"), WAIT, || {
            let dump = admin_json(&tb, "node-1", "/config_dump");
            last = dump["config_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            expect.iter().all(|e| last.contains(e))
        });
        let dump = admin_json(&tb, "node-1", "/config_dump");
        assert_eq!(
            dump["generation"], generation,
            "{file} must not be applied: {last}"
        );
        // The previous config keeps working.
        let reply = read_from(&tb, "client", &svc).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        assert!(!reply.is_empty());
        std::fs::remove_file(dir.join(file)).expect("remove bad file");
        wait_until("the error to clear", WAIT, || {
            admin_json(&tb, "node-1", "/config_dump")["config_error"].is_null()
        });
    }
    let log = tb.agent_log("node-1");
    assert!(
        log.contains("no-selector.yaml"),
        "errors must be logged too"
    );
    tb.down().expect("down");
}
