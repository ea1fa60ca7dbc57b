//! HTTP at the source agent (root, testbed, real curl and h2load): per-request balancing on
//! one keep-alive connection (HTTP/1.1 and h2c), upgrades passed through, Envoy's 503s with
//! their flags, Istio's request metrics (checked by promtool) and HTTP access log entries.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use mesh_testbed::Testbed;

/// `mesh-testapp http` in web-1..3 (versions v1..v3) on 8080, listening.
fn serve_web(tb: &Testbed) -> Vec<mesh_testbed::PodProcess> {
    [("web-1", "v1"), ("web-2", "v2"), ("web-3", "v3")]
        .iter()
        .map(|(p, v)| {
            let args = [
                "http",
                "--listen",
                "0.0.0.0:8080",
                "--service",
                "web",
                "--version",
                v,
            ];
            serve(tb, p, &args)
        })
        .collect()
}

fn manifests(access_log: &str) -> String {
    docs(&[
        namespace("default", true),
        pod_sa("default", "client", "node-1", "client", 9999),
        web("web-1", "node-1", "v1"),
        web("web-2", "node-2", "v2"),
        web("web-3", "node-2", "v3"),
        http_service("web", "web", "http-web", "http"),
        // The same pods (they serve h2c too) spoken to in HTTP/2.
        http_service("web2", "web", "http2-web", "http"),
        http_service("rpc", "web", "grpc", "http"),
        http_service("empty", "nobody", "http", "http"),
        http_service("dead", "web", "http", "7001"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: nodemesh-system\n\
             data:\n  mesh: |\n    accessLogFile: {access_log}\n"
        ),
    ])
}

/// curl from the client pod; returns (exit status ok, stdout).
fn curl_args(tb: &Testbed, args: &[&str]) -> (bool, String) {
    let mut cmd = tb.pod_command("client", "curl").expect("pod command");
    cmd.args(["-sS", "-m", "5"]).args(args);
    let out = run_bounded(cmd, Duration::from_secs(15)).expect("curl");
    if !out.status.success() {
        eprintln!(
            "curl {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The versions answering a sequence of JSON responses.
fn versions(body: &str) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for v in serde_json::Deserializer::from_str(body).into_iter::<serde_json::Value>() {
        let v = v.unwrap_or_else(|e| panic!("{e}: {body}"));
        *count
            .entry(v["version"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    count
}

#[test]
fn http_requests_are_balanced_one_by_one_with_envoys_errors_metrics_and_logs() {
    let log_dir = std::env::temp_dir().join(format!("nodemesh-http-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let log_file = log_dir.join("access.log");
    let Some(tb) = up(
        "http_l7",
        2,
        &[("app.yaml", &manifests(log_file.to_str().expect("utf-8")))],
    ) else {
        return;
    };
    let _servers = serve_web(&tb);
    let svc = tb.service_ip("default", "web").expect("svc");
    let url = format!("http://{svc}/");
    let accepted = counter(&tb, "node-1", "proxy", "accepted");

    // HTTP/1.1, nine requests on one keep-alive connection: 3/3/3 across the endpoints.
    let nine: Vec<&str> = std::iter::repeat_n(url.as_str(), 9).collect();
    let (ok, body) = curl_args(&tb, &nine);
    assert!(ok, "{body}");
    let split = versions(&body);
    assert_eq!(
        split.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{split:?}"
    );
    assert_eq!(
        counter(&tb, "node-1", "proxy", "accepted"),
        accepted + 1,
        "curl reuses its connection: one captured connection"
    );

    // h2c with prior knowledge from the client (h2load: Debian's curl 7.88.1 cannot reuse a
    // prior-knowledge connection, curl#10634), 4 streams at a time on one connection,
    // HTTP/1.1 to the apps: balanced per request too (checked in the metrics below).
    let accepted = counter(&tb, "node-1", "proxy", "accepted");
    let mut cmd = tb.pod_command("client", "h2load").expect("pod command");
    cmd.args(["-n", "12", "-c", "1", "-m", "4", &url]);
    let out = run_bounded(cmd, Duration::from_secs(20)).expect("h2load");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("12 succeeded") && report.contains("12 2xx"),
        "{report}"
    );
    assert_eq!(counter(&tb, "node-1", "proxy", "accepted"), accepted + 1);

    // Separate client connections share the agents' HTTP/2 connections: twelve curl runs
    // (twelve connections, four per endpoint) open at most one HBONE stream per endpoint and
    // data-path thread, not one each.
    let streams = |tb: &Testbed| -> u64 {
        ["node-1", "node-2"]
            .iter()
            .map(|n| counter(tb, n, "inbound", "streams"))
            .sum()
    };
    let accepted = counter(&tb, "node-1", "proxy", "accepted");
    let before = streams(&tb);
    for _ in 0..12 {
        let (ok, body) = curl_args(&tb, &[url.as_str()]);
        assert!(ok, "{body}");
    }
    assert_eq!(counter(&tb, "node-1", "proxy", "accepted"), accepted + 12);
    let opened = streams(&tb) - before;
    assert!(
        opened <= 3,
        "{opened} HBONE streams for 12 client connections"
    );

    // Keep-alive HTTP connections are listed by `/connections` (mesh-agent connections) as
    // HTTP, with their request and response bytes so far.
    let mut hold = tb
        .spawn_in_pod(
            "client",
            testapp(),
            [
                "hold",
                "--connect",
                &format!("{svc}:80"),
                "--connections",
                "3",
                "--http",
                "--seconds",
                "30",
            ],
        )
        .expect("hold");
    hold.wait_for_line("holding 3", Duration::from_secs(10))
        .expect("3 connections held");
    let conns = admin_json(&tb, "node-1", "/connections");
    let http: Vec<&serde_json::Value> = conns
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["protocol"] == "HTTP" && c["destination"] == format!("{svc}:80"))
        .collect();
    assert_eq!(http.len(), 3, "{conns:#}");
    for c in &http {
        assert_eq!(c["pod"], "default/client");
        assert_eq!(c["direction"], "outbound");
        assert!(c["bytes_sent"].as_u64().unwrap_or_default() > 100, "{c}");
    }
    hold.stop().expect("stop hold");

    // An `http2-*` port: HTTP/1.1 from the client, HTTP/2 to the apps, still balanced.
    let web2 = tb.service_ip("default", "web2").expect("svc");
    let url2 = format!("http://{web2}/");
    let (ok, body) = curl_args(&tb, &[url2.as_str(), url2.as_str(), url2.as_str()]);
    assert!(ok, "{body}");
    for v in serde_json::Deserializer::from_str(&body).into_iter::<serde_json::Value>() {
        let v = v.expect("json");
        assert_eq!(v["http_version"], "HTTP/2.0", "{v}");
        assert_eq!(
            v["headers"]["host"],
            serde_json::Value::Null,
            "h2 carries :authority: {v}"
        );
    }
    assert_eq!(versions(&body).len(), 3, "{body}");
    let rpc = tb.service_ip("default", "rpc").expect("svc");
    let (ok, _) = curl_args(&tb, &[&format!("http://{rpc}/")]);
    assert!(ok);

    // No endpoint: 503 "no healthy upstream"; nothing listening: 503 connect failure.
    let empty = tb.service_ip("default", "empty").expect("svc");
    let (_, body) = curl_args(&tb, &["-w", " %{http_code}", &format!("http://{empty}/")]);
    assert_eq!(body, "no healthy upstream 503");
    let dead = tb.service_ip("default", "dead").expect("svc");
    let (_, body) = curl_args(&tb, &["-w", " %{http_code}", &format!("http://{dead}/")]);
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers. reset reason: connection failure")
            && body.ends_with(" 503"),
        "{body}"
    );

    // An HTTP/1.1 upgrade (as WebSocket does it) passes through, then raw bytes both ways.
    let out = testapp_in(
        &tb,
        "client",
        &[
            "upgrade",
            "--connect",
            &format!("{svc}:80"),
            "--message",
            "ws-frame-42",
        ],
        Duration::from_secs(15),
    )
    .expect("upgrade");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "HTTP/1.1 101 Switching Protocols\nws-frame-42\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Istio's request metrics, reported by the client's agent.
    let text = node_metrics(&tb, "node-1");
    let web = "web.default.svc.cluster.local";
    let base = [("reporter", "source"), ("destination_service", web)];
    let ok_200 = [
        base.as_slice(),
        &[("response_code", "200"), ("request_protocol", "http")],
    ]
    .concat();
    assert_eq!(metric(&text, "istio_requests_total", &ok_200), 36, "{text}");
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("reporter", "source"), ("response_code", "101")]
        ),
        1
    );
    let h2 = [
        ("reporter", "source"),
        ("destination_service", "web2.default.svc.cluster.local"),
        ("request_protocol", "http"),
    ];
    assert_eq!(metric(&text, "istio_requests_total", &h2), 3);
    let grpc = [
        ("reporter", "source"),
        ("destination_service", "rpc.default.svc.cluster.local"),
        ("request_protocol", "grpc"),
    ];
    assert_eq!(metric(&text, "istio_requests_total", &grpc), 1);
    for (v, n) in [("v1", 12), ("v2", 12), ("v3", 12)] {
        let l = [
            base.as_slice(),
            &[("destination_version", v), ("response_code", "200")],
        ]
        .concat();
        assert_eq!(metric(&text, "istio_requests_total", &l), n, "{v}");
    }
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("response_flags", "UH"), ("response_code", "503")]
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("response_flags", "UF"), ("response_code", "503")]
        ),
        1
    );
    // The destination agents parse the requests again and report each one that reached an
    // app, as mutual TLS from the client's proven identity. web, web2 and rpc all send to
    // the same pod port: the request's authority (the ClusterIP curl used) says which.
    let mut dest_text = Vec::new();
    let dest = |texts: &[String], labels: &[(&str, &str)]| -> u64 {
        let d = [
            ("reporter", "destination"),
            ("connection_security_policy", "mutual_tls"),
            ("source_workload", "client"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/default",
            ),
        ];
        let l = [d.as_slice(), labels].concat();
        texts
            .iter()
            .map(|t| metric(t, "istio_requests_total", &l))
            .sum()
    };
    let web_200 = [("destination_service", web), ("response_code", "200")];
    wait_until(
        "33 destination-reported requests",
        Duration::from_secs(5),
        || {
            dest_text = vec![node_metrics(&tb, "node-1"), node_metrics(&tb, "node-2")];
            dest(&dest_text, &web_200) >= 33
        },
    );
    assert_eq!(dest(&dest_text, &web_200), 33, "{dest_text:#?}");
    for (v, n) in [("v1", 11), ("v2", 11), ("v3", 11)] {
        let l = [web_200.as_slice(), &[("destination_version", v)]].concat();
        assert_eq!(dest(&dest_text, &l), n, "{v}");
    }
    // The three held connections sent `Host: hold`, which names none of the Services
    // sharing the pods' port: the destination reports them without a Service.
    let unnamed = [("destination_service", "unknown"), ("response_code", "200")];
    assert_eq!(dest(&dest_text, &unnamed), 3);
    // web-1 is on node-1: its share is reported there.
    assert_eq!(dest(&dest_text[..1], &web_200), 11);
    assert_eq!(dest(&dest_text, &[("response_code", "101")]), 1);
    let web2 = [
        ("destination_service", "web2.default.svc.cluster.local"),
        ("request_protocol", "http"),
        ("response_code", "200"),
    ];
    assert_eq!(dest(&dest_text, &web2), 3);
    let rpc = [
        ("destination_service", "rpc.default.svc.cluster.local"),
        ("request_protocol", "grpc"),
    ];
    assert_eq!(dest(&dest_text, &rpc), 1);
    // No request reached an app of `empty` or `dead`: nothing reported for them.
    for svc in ["empty", "dead"] {
        let l = [("destination_service_name", svc)];
        assert_eq!(dest(&dest_text, &l), 0, "{svc}");
    }
    // The HTTP requests are not reported again as TCP connections by the destination.
    for t in &dest_text {
        let l = [("reporter", "destination"), ("destination_service", web)];
        assert_eq!(metric(t, "istio_tcp_connections_opened_total", &l), 0);
        promtool_check(t);
    }

    let base = [base.as_slice(), &[("response_code", "200")]].concat();
    let le_inf = [base.as_slice(), &[("le", "+Inf")]].concat();
    assert_eq!(
        metric(&text, "istio_request_duration_milliseconds_bucket", &le_inf),
        36
    );
    assert_eq!(metric(&text, "istio_response_bytes_count", &base), 36);
    assert!(metric(&text, "istio_response_bytes_sum", &base) > 36 * 100);
    promtool_check(&text);

    // One access log entry per request, in Istio's default format.
    let mut lines = Vec::new();
    wait_until(
        "17 HTTP entries in the access log",
        Duration::from_secs(10),
        || {
            lines = std::fs::read_to_string(&log_file)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" outbound|80||"))
                .map(str::to_string)
                .collect();
            lines.len() >= 17
        },
    );
    let h1 = lines
        .iter()
        .find(|l| l.contains("\"GET / HTTP/1.1\" 200 - via_upstream - \"-\" 0 "))
        .unwrap_or_else(|| panic!("no HTTP/1.1 entry in {lines:#?}"));
    assert!(h1.contains(" \"curl/"), "{h1}");
    assert!(
        h1.contains(&format!("\"{svc}\" \"")) && h1.contains(&format!(" outbound|80||{web} ")),
        "{h1}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"GET / HTTP/2\" 200 "))
            .count(),
        12,
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" 503 UH ") && l.contains("outbound|80||empty.default")),
        "{lines:#?}"
    );
    tb.down().expect("down");
    let _ = std::fs::remove_dir_all(&log_dir);
}

/// Raw bytes from the client pod to `addr` (curl's telnet:// sends stdin as is); the answer.
fn raw(tb: &Testbed, addr: &str, script: &str) -> String {
    let mut cmd = tb.pod_command("client", "sh").expect("pod command");
    cmd.args([
        "-c",
        &format!("{{ {script}; }} | curl -sS -m 3 telnet://{addr}"),
    ]);
    let out = run_bounded(cmd, Duration::from_secs(15)).expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn malformed_requests_are_refused_and_the_agent_keeps_serving() {
    let Some(tb) = up(
        "http_malformed",
        2,
        &[("app.yaml", &manifests("/dev/stderr"))],
    ) else {
        return;
    };
    let _servers = serve_web(&tb);
    let svc = tb.service_ip("default", "web").expect("svc");
    let addr = format!("{svc}:80");
    let cases = [
        (
            "a header line without a colon",
            r"printf 'GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n'",
            "HTTP/1.1 400",
        ),
        (
            "a control byte in a header value",
            r"printf 'GET / HTTP/1.1\r\nHost: web\r\nX-Bad: a\001b\r\n\r\n'",
            "HTTP/1.1 400",
        ),
        (
            "70 KB of headers (the limit is 64 KiB, as Envoy's 60 KiB)",
            r"printf 'GET / HTTP/1.1\r\nHost: web\r\nX-Big: '; head -c 70000 /dev/zero | tr '\000' a; printf '\r\n\r\n'",
            "HTTP/1.1 431",
        ),
        (
            "a chunk size that is not hexadecimal",
            r"printf 'POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n'",
            "HTTP/1.1 400",
        ),
    ];
    for (what, script, expected) in cases {
        let answer = raw(&tb, &addr, script);
        assert!(answer.starts_with(expected), "{what}: {answer:?}");
        assert!(
            !answer.contains("\"service\":\"web\""),
            "{what} reached the app: {answer}"
        );
        // The agent keeps serving well-formed requests.
        let (ok, body) = curl_args(&tb, &[&format!("http://{svc}/")]);
        assert!(
            ok && body.contains("\"service\":\"web\""),
            "after {what}: {body}"
        );
    }
    // A well-formed chunked body goes through, counted.
    let good = raw(
        &tb,
        &addr,
        r"printf 'POST / HTTP/1.1\r\nHost: web\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n'",
    );
    assert!(
        good.starts_with("HTTP/1.1 200") && good.contains("\"body_bytes\":3"),
        "{good}"
    );
    let text = node_metrics(&tb, "node-1");
    assert_eq!(
        metric(
            &text,
            "istio_requests_total",
            &[("response_code", "400"), ("response_flags", "DPE")]
        ),
        1,
        "the invalid chunked body is recorded as Envoy's DPE"
    );
    tb.down().expect("down");
}

#[test]
fn grpc_unary_and_bidirectional_streaming_through_the_mesh() {
    let echo = |name: &str, node: &str, version: &str| {
        pod(
            "default",
            name,
            node,
            &[("app", "echo"), ("version", version)],
            50051,
        )
        .replace("name: tcp-app", "name: grpc")
    };
    let yaml = docs(&[
        namespace("default", true),
        pod_sa("default", "client", "node-1", "client", 9999),
        echo("echo-1", "node-2", "v1"),
        echo("echo-2", "node-1", "v2"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n\
         spec:\n  selector: {app: echo}\n  ports:\n  - {name: grpc-echo, port: 50051, targetPort: grpc}\n"
            .to_string(),
    ]);
    let Some(tb) = up("http_grpc", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _servers = [("echo-1", "v1"), ("echo-2", "v2")].map(|(p, v)| {
        serve(
            &tb,
            p,
            &["grpc-echo", "--listen", "0.0.0.0:50051", "--version", v],
        )
    });
    let svc = tb.service_ip("default", "echo").expect("svc");
    let out = testapp_in(
        &tb,
        "client",
        &[
            "grpc",
            "--connect",
            &format!("{svc}:50051"),
            "--unary",
            "10",
            "--chat",
            "50",
        ],
        Duration::from_secs(60),
    )
    .expect("grpc client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One HTTP/2 connection from the client, its calls balanced one by one.
    assert!(stdout.contains("unary 10 ok (v1,v2)"), "{stdout}");
    assert!(stdout.contains("chat 50 ok"), "{stdout}");
    let text = node_metrics(&tb, "node-1");
    let grpc_ok = [
        ("reporter", "source"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "0"),
    ];
    assert_eq!(
        metric(&text, "istio_requests_total", &grpc_ok),
        11,
        "10 unary calls and 1 stream"
    );
    tb.down().expect("down");
}

/// The agent's resident memory on `node`, in KiB.
fn agent_rss_kib(tb: &Testbed, node: &str) -> u64 {
    let pid = tb.agent_pid(node).expect("agent pid");
    mesh_testbed::status_kib(&pid.to_string(), "VmRSS").expect("VmRSS")
}

#[test]
fn h2_rapid_reset_is_bounded_and_other_clients_keep_being_served() {
    let Some(tb) = up("http_reset", 2, &[("app.yaml", &manifests("/dev/stderr"))]) else {
        return;
    };
    let _servers = serve_web(&tb);
    let svc = tb.service_ip("default", "web").expect("svc");
    let url = format!("http://{svc}/");
    assert!(curl_args(&tb, &[&url]).0);
    let before = agent_rss_kib(&tb, "node-1");
    let attack = std::thread::scope(|s| {
        let attacker = s.spawn(|| {
            testapp_in(
                &tb,
                "client",
                &[
                    "rapid-reset",
                    "--connect",
                    &format!("{svc}:80"),
                    "--streams",
                    "20000",
                    "--seconds",
                    "20",
                ],
                Duration::from_secs(40),
            )
            .expect("rapid-reset")
        });
        // A well-behaved client at the same time: every request answered.
        for i in 0..20 {
            let (ok, body) = curl_args(&tb, &[&url]);
            assert!(
                ok && body.contains("\"service\":\"web\""),
                "request {i} during the attack: {body}"
            );
        }
        attacker.join().expect("attacker")
    });
    let stdout = String::from_utf8_lossy(&attack.stdout);
    assert!(
        attack.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&attack.stderr)
    );
    let streams: u64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(streams >= 1000, "the attack ran: {stdout}");
    let after = agent_rss_kib(&tb, "node-1");
    eprintln!(
        "rapid reset: {} agent RSS {before} KiB -> {after} KiB",
        stdout.trim()
    );
    assert!(
        after < before + 16 * 1024,
        "agent RSS grew from {before} KiB to {after} KiB under rapid reset ({stdout})"
    );
    assert!(curl_args(&tb, &[&url]).0, "served after the attack");
    tb.down().expect("down");
}

#[test]
fn undeclared_ports_are_sniffed_http_per_request_and_server_first_tcp_unhindered() {
    let svc = |name: &str, selector: &str, port: u16, target: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  selector: {{app: {selector}}}\n  ports:\n  - {{port: {port}, targetPort: {target}}}\n"
        )
    };
    let yaml = docs(&[
        namespace("default", true),
        pod_sa("default", "client", "node-1", "client", 9999),
        web("web-1", "node-1", "v1"),
        web("web-2", "node-2", "v2"),
        web("web-3", "node-2", "v3"),
        pod("default", "greeter", "node-2", &[("app", "greeter")], 7000),
        // No port name, no appProtocol: undeclared.
        svc("auto-web", "web", 80, 8080),
        svc("auto-greeter", "greeter", 81, 7000),
    ]);
    let Some(tb) = up("http_sniff", 2, &[("app.yaml", &yaml)]) else {
        return;
    };
    let _servers = serve_web(&tb);
    let _greeter = serve(&tb, "greeter", &["peer", "--listen", "0.0.0.0:7000"]);
    let web = tb.service_ip("default", "auto-web").expect("svc");
    // HTTP/1.1 on one keep-alive connection: sniffed, then balanced per request.
    let url = format!("http://{web}/");
    let nine: Vec<&str> = std::iter::repeat_n(url.as_str(), 9).collect();
    let (ok, body) = curl_args(&tb, &nine);
    assert!(ok, "{body}");
    let split = versions(&body);
    assert_eq!(
        split.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{split:?}"
    );
    // h2c with prior knowledge: sniffed as HTTP/2, spoken to the app as HTTP/2.
    let (ok, body) = curl_args(&tb, &["--http2-prior-knowledge", &url]);
    assert!(
        ok && body.contains("\"http_version\":\"HTTP/2.0\""),
        "{body}"
    );
    let text = node_metrics(&tb, "node-1");
    let http = [
        ("reporter", "source"),
        ("destination_service_name", "auto-web"),
        ("request_protocol", "http"),
    ];
    assert_eq!(metric(&text, "istio_requests_total", &http), 10);
    // A server-first protocol: the client sends nothing and waits for the greeting, which
    // comes after the short detection wait, not never (the read gives up after 3 s).
    let greeter = tb.service_ip("default", "auto-greeter").expect("svc");
    let started = std::time::Instant::now();
    let out = testapp_in(
        &tb,
        "client",
        &[
            "read",
            "--connect",
            &format!("{greeter}:81"),
            "--keep-open",
            "--timeout",
            "3",
        ],
        Duration::from_secs(15),
    )
    .expect("read");
    let greeting = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && greeting.trim().starts_with("10.244."),
        "the server's greeting: {greeting:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    tb.down().expect("down");
}
