//! AuthorizationPolicy at the destination's agent (root, testbed with the mesh CA): an ALLOW
//! policy by principal lets only that identity through (HBONE streams of others get 401 with
//! the reason, plaintext is reset), a DENY policy by port refuses one port, an edit of the
//! manifests changes the decision for new connections and closes the live ones it refuses, and
//! on HTTP ports each request is checked with its method and path.

mod common;

use std::time::Duration;

use common::*;
use mesh_testbed::Testbed;

/// client (sa `client`) and intruder (sa `intruder`) on node-1, server (sa `server`) on
/// node-2, all meshed in `default`; an unenrolled `outsider` on node-1; plus `policy`.
fn manifests(policy: &str) -> String {
    docs(&[
        namespace("default", true),
        namespace("other", false),
        pod_sa("default", "client", "node-1", "client", 9999),
        pod_sa("default", "intruder", "node-1", "intruder", 9999),
        pod_sa("default", "server", "node-2", "server", 7000),
        pod_sa("other", "outsider", "node-1", "default", 9999),
        policy.to_string(),
    ])
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: server\n{spec}"
    )
}

/// What `pod` reads from the server's `port`: the client address the app saw, or `None` if
/// the connection was refused (reset, or closed before the app answered).
fn reaches(tb: &Testbed, pod: &str, port: u16) -> Option<String> {
    let ip = tb.pod_ip("default", "server").expect("server ip");
    read_from(tb, pod, &format!("{ip}:{port}"))
        .ok()
        .filter(|s| !s.is_empty())
}

#[test]
fn allow_by_principal_admits_only_that_identity_and_edits_apply() {
    let allow = policy(
        "client-only",
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/default/sa/client]\n",
    );
    let Some(mut tb) = up("authz", 2, &[("app.yaml", &manifests(&allow))]) else {
        return;
    };
    let _p1 = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7000"]);
    let _p2 = serve(&tb, "server", &["peer", "--listen", "0.0.0.0:7001"]);
    let _echo = serve(&tb, "server", &["echo", "--listen", "0.0.0.0:7002"]);
    let client_ip = tb.pod_ip("default", "client").expect("ip").to_string();
    let server_ip = tb.pod_ip("default", "server").expect("ip");
    // A long-lived connection, open through every policy change below until one refuses it.
    let mut chat = Chat::open(&tb, "client", &format!("{server_ip}:7002"));
    assert!(chat.echo("allowed"));
    let got = reaches(&tb, "client", 7000).expect("the allowed client is refused");
    assert!(got.starts_with(&format!("{client_ip}:")), "{got}");

    let before = counter(&tb, "node-2", "inbound", "authz_denied");
    assert_eq!(
        reaches(&tb, "intruder", 7000),
        None,
        "another identity got in"
    );
    assert_eq!(reaches(&tb, "outsider", 7000), None, "plaintext got in");
    assert_eq!(
        counter(&tb, "node-2", "inbound", "authz_denied"),
        before + 2
    );
    // The destination names the policy; the source's agent logs the 401 with that reason.
    let server_log = tb.agent_log("node-2");
    let outsider = tb.pod_ip("other", "outsider").expect("ip").to_string();
    for who in ["cluster.local/ns/default/sa/intruder", outsider.as_str()] {
        assert!(
            server_log
                .lines()
                .any(|l| l.contains("AuthorizationPolicy refused")
                    && l.contains(who)
                    && l.contains(
                        "no ALLOW AuthorizationPolicy matched (applying: default/client-only)"
                    )),
            "no refusal of {who} in:\n{}",
            mesh_testbed::tail(&server_log, 30)
        );
    }
    let client_log = tb.agent_log("node-1");
    assert!(
        client_log
            .lines()
            .any(|l| l.contains("401 Unauthorized") && l.contains("default/client-only")),
        "{}",
        mesh_testbed::tail(&client_log, 30)
    );

    // Replaced by a DENY of port 7001 for the client: no ALLOW policy any more, so the others
    // get in, and the client loses 7001 only.
    let deny = policy(
        "no-7001",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/default/sa/client]\n    to:\n    - operation:\n        \
         ports: [\"7001\"]\n",
    );
    tb.apply("app.yaml", &manifests(&deny)).expect("apply");
    wait_until("the DENY policy to apply", Duration::from_secs(20), || {
        reaches(&tb, "client", 7001).is_none()
    });
    assert!(reaches(&tb, "client", 7000).is_some());
    assert!(reaches(&tb, "intruder", 7000).is_some());
    assert!(reaches(&tb, "intruder", 7001).is_some());
    assert!(reaches(&tb, "outsider", 7001).is_some());
    let server_log = tb.agent_log("node-2");
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("denied by AuthorizationPolicy default/no-7001 (DENY)")),
        "{}",
        mesh_testbed::tail(&server_log, 30)
    );
    // The live connection to 7002 is still allowed under both policies: it stayed open.
    assert!(
        chat.echo("still allowed"),
        "a policy change closed an allowed connection"
    );

    // A policy refusing the client everywhere closes its live connection too.
    let deny_all = policy(
        "no-client",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/default/sa/client]\n",
    );
    tb.apply("app.yaml", &manifests(&deny_all)).expect("apply");
    wait_until(
        "the live connection to be closed",
        Duration::from_secs(20),
        || !chat.echo("after the change"),
    );
    let server_log = tb.agent_log("node-2");
    assert!(
        server_log
            .lines()
            .any(|l| l.contains("closed connections the new AuthorizationPolicy refuses")),
        "{}",
        mesh_testbed::tail(&server_log, 30)
    );
}

/// `curl -w ' %{http_code}'` from `pod`: (exit success, body and status).
fn curl_code(tb: &Testbed, pod: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = tb.pod_command(pod, "curl").expect("pod command");
    cmd.args(["-sS", "-m", "5", "-w", " %{http_code}"])
        .args(args);
    let out = run_bounded(cmd, Duration::from_secs(15)).expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn on_http_ports_each_request_is_checked_with_its_method_and_path() {
    // web-1 on node-2 serves HTTP on a port its Service names `http`: the destination's agent
    // parses each request, so the method and path rule is enforced per request.
    let read_only = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
        name: read-only\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      \
        app: web\n  rules:\n  - from:\n    - source:\n        \
        principals: [cluster.local/ns/default/sa/client]\n    to:\n    - operation:\n        \
        methods: [GET]\n        paths: [\"/api/*\"]\n";
    let yaml = docs(&[
        namespace("default", true),
        pod_sa("default", "client", "node-1", "client", 9999),
        pod_sa("default", "intruder", "node-1", "intruder", 9999),
        web("web-1", "node-2", "v1"),
        http_service("web", "web", "http", "http"),
        read_only.to_string(),
    ]);
    let Some(tb) = up("authz_http", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _web = serve(
        &tb,
        "web-1",
        &["http", "--listen", "0.0.0.0:8080", "--service", "web"],
    );
    let ip = tb.service_ip("default", "web").expect("service ip");
    let url = |path: &str| format!("http://{ip}{path}");
    let (ok, got) = curl_code(&tb, "client", &[&url("/api/reviews")]);
    assert!(ok && got.ends_with(" 200"), "{got}");
    let before = counter(&tb, "node-2", "inbound", "authz_denied");
    for args in [vec!["-X", "POST", "-d", "x"], vec!["-X", "DELETE"], vec![]] {
        let path = if args.is_empty() {
            "/admin"
        } else {
            "/api/reviews"
        };
        let mut all = args.clone();
        let u = url(path);
        all.push(&u);
        let (ok, got) = curl_code(&tb, "client", &all);
        assert!(
            ok && got == "RBAC: access denied 403",
            "{args:?} {path}: {got}"
        );
    }
    assert_eq!(
        counter(&tb, "node-2", "inbound", "authz_denied"),
        before + 3
    );
    // A request allowed by method and path from another identity: refused with the connection
    // (no request on it could be allowed), so the client sees no HTTP answer.
    let (ok, got) = curl_code(&tb, "intruder", &[&url("/api/reviews")]);
    assert!(!got.ends_with(" 200"), "the intruder got in: {ok} {got}");
    // The destination's metrics carry the 403s as Envoy reports RBAC denials.
    let metrics = node_metrics(&tb, "node-2");
    let denied = metric(
        &metrics,
        "istio_requests_total",
        &[("reporter", "destination"), ("response_code", "403")],
    );
    assert_eq!(denied, 3, "{metrics}");
}
