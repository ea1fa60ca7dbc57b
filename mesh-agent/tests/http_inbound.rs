//! HTTP at the destination agent (root, testbed, real curl): a client outside the mesh
//! talks plaintext to an enrolled pod's HTTP port; the pod's agent parses each request,
//! reports it (`reporter="destination"`, `connection_security_policy="none"`), logs it, and
//! answers Envoy's 503 when the app breaks the exchange. (Requests arriving over HBONE are
//! checked in tests/http.rs.)

mod common;

use std::time::Duration;

use common::*;
use mesh_testbed::Testbed;

fn manifests(access_log: &str) -> String {
    docs(&[
        namespace("default", true),
        namespace("other", false),
        pod_sa("other", "outsider", "node-1", "default", 9999),
        web("web-1", "node-2", "v1"),
        http_service("web", "web", "http", "http"),
        // Declares HTTP; the app writes a line that is no HTTP response and closes.
        pod("default", "mute", "node-2", &[("app", "mute")], 7000)
            .replace("name: tcp-app", "name: http"),
        http_service("mute", "mute", "http", "http"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: nodemesh-system\n\
             data:\n  mesh: |\n    accessLogFile: {access_log}\n"
        ),
    ])
}

/// curl from the outsider; (stdout, whether curl succeeded).
fn curl(tb: &Testbed, args: &[&str]) -> (String, bool) {
    let mut cmd = tb.pod_command("outsider", "curl").expect("pod command");
    cmd.args(["-sS", "-m", "5"]).args(args);
    let out = run_bounded(cmd, Duration::from_secs(15)).expect("curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

#[test]
fn plaintext_http_is_parsed_reported_and_logged_by_the_destination() {
    let log_dir = std::env::temp_dir().join(format!("nodemesh-http-in-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let log_file = log_dir.join("access.log");
    let yaml = manifests(log_file.to_str().expect("utf-8"));
    let Some(tb) = up("http_inbound", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _web = serve(
        &tb,
        "web-1",
        &["http", "--listen", "0.0.0.0:8080", "--service", "web"],
    );
    let _mute = serve(&tb, "mute", &["peer", "--listen", "0.0.0.0:7000"]);
    let outsider = tb.pod_ip("other", "outsider").expect("ip").to_string();
    let web = tb.pod_ip("default", "web-1").expect("ip");
    let base = format!("http://{web}:8080");

    // Three requests on one keep-alive connection, one of them answered 404 by the app,
    // then one in h2c.
    let (body, ok) = curl(
        &tb,
        &[
            &format!("{base}/a"),
            &format!("{base}/b"),
            &format!("{base}/c?status=404"),
        ],
    );
    assert!(ok, "{body}");
    let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&body)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(answers.len(), 3, "{body}");
    for a in &answers {
        let client = a["client"].as_str().unwrap_or_default();
        assert!(
            client.starts_with(&format!("{outsider}:")),
            "the app saw {client}, not the outsider's IP"
        );
        assert_eq!(a["http_version"], "HTTP/1.1", "{a}");
    }
    // h2c from the client; the port declares `http`: the app gets HTTP/1.1.
    let (body, ok) = curl(&tb, &["--http2-prior-knowledge", &format!("{base}/h2")]);
    assert!(ok, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["http_version"], "HTTP/1.1", "{v}");

    // An app that breaks the exchange: Envoy's 503, reported with `UC`.
    let mute = tb.pod_ip("default", "mute").expect("ip");
    let (body, _) = curl(
        &tb,
        &["-w", " %{http_code}", &format!("http://{mute}:7000/")],
    );
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers")
            && body.ends_with(" 503"),
        "{body}"
    );

    let d = [
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
        ("source_workload", "outsider"),
        ("source_workload_namespace", "other"),
        ("source_principal", "unknown"),
    ];
    let web_d = [
        d.as_slice(),
        &[
            ("destination_workload", "web-1"),
            ("destination_service", "web.default.svc.cluster.local"),
            ("request_protocol", "http"),
        ],
    ]
    .concat();
    let mut text = String::new();
    wait_until(
        "5 destination-reported requests",
        Duration::from_secs(5),
        || {
            text = node_metrics(&tb, "node-2");
            metric(&text, "istio_requests_total", &d) >= 5
        },
    );
    let with = |extra: &[(&'static str, &'static str)]| [web_d.as_slice(), extra].concat();
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &with(&[("response_code", "200")])
        ),
        3,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &with(&[("response_code", "404")])
        ),
        1
    );
    let uc = [
        d.as_slice(),
        &[
            ("destination_workload", "mute"),
            ("response_code", "503"),
            ("response_flags", "UC"),
        ],
    ]
    .concat();
    assert_eq!(metric(&text, "istio_requests_total", &uc), 1, "{text}");
    assert_eq!(
        metric(
            &text,
            "istio_request_duration_milliseconds_count",
            &with(&[("response_code", "200")])
        ),
        3
    );
    assert!(metric(&text, "istio_response_bytes_sum", &with(&[])) > 4 * 50);
    // HTTP is reported per request, not again as TCP connections.
    let tcp = [
        ("reporter", "destination"),
        ("destination_workload", "web-1"),
    ];
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &tcp),
        0,
        "{text}"
    );
    // The source side of these requests is outside the mesh: nothing reported there.
    let node1 = node_metrics(&tb, "node-1");
    assert_eq!(
        metric(
            &node1,
            "istio_requests_total",
            &[("source_workload", "outsider")]
        ),
        0
    );
    promtool_check(&text);

    // One access log line per request, with the request's details and the inbound cluster.
    let mut lines = Vec::new();
    wait_until("5 inbound entries", Duration::from_secs(5), || {
        lines = std::fs::read_to_string(&log_file)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" inbound|"))
            .map(str::to_string)
            .collect();
        lines.len() >= 5
    });
    for (request, cluster) in [
        ("\"GET /a HTTP/1.1\" 200 ", "inbound|8080||"),
        ("\"GET /c?status=404 HTTP/1.1\" 404 ", "inbound|8080||"),
        ("\"GET /h2 HTTP/2\" 200 ", "inbound|8080||"),
        ("\"GET / HTTP/1.1\" 503 UC ", "inbound|7000||"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(request) && l.contains(cluster) && l.contains(&outsider)),
            "{request} {cluster}: {lines:#?}"
        );
    }
    tb.down().expect("down");
    let _ = std::fs::remove_dir_all(&log_dir);
}
