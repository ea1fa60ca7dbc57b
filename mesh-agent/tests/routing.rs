//! Istio's routing API at the source agent (root, testbed, real curl): the reference guide's
//! VirtualService, weighted and header-matched subset routing, retries, timeouts, faults,
//! outlier detection, connection pool limits, redirects, direct responses, rewrites and
//! header edits. Every rule is applied to a running mesh and checked with real requests.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use mesh_testbed::Testbed;

/// A pod labelled app=APP, version=VERSION, serving HTTP on the named port `http` (9080).
fn app_pod(name: &str, node: &str, app: &str, version: &str) -> String {
    pod(
        "default",
        name,
        node,
        &[("app", app), ("version", version)],
        9080,
    )
    .replace("name: tcp-app", "name: http")
}

fn http_service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         selector:\n    app: {name}\n  ports:\n  - name: http\n    port: {port}\n    \
         targetPort: http\n"
    )
}

fn manifests() -> String {
    docs(&[
        namespace("default", true),
        pod("default", "client", "node-1", &[("app", "client")], 9999),
        app_pod("productpage-v1", "node-2", "productpage", "v1"),
        app_pod("reviews-v1", "node-1", "reviews", "v1"),
        app_pod("reviews-v2", "node-2", "reviews", "v2"),
        app_pod("reviews-v3", "node-2", "reviews", "v3"),
        app_pod("flaky-ok", "node-2", "flaky", "ok"),
        app_pod("flaky-bad", "node-2", "flaky", "bad"),
        http_service("productpage", 9080),
        http_service("reviews", 9080),
        http_service("flaky", 80),
    ])
}

/// The reference guide's VirtualService, verbatim.
const GUIDE_VS: &str = "\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: bookinfo
spec:
  hosts:
    - \"bookinfo.example.com\"
  gateways:
    - bookinfo-gateway
  http:
    - match:
        - uri:
            prefix: /productpage
        - uri:
            prefix: /api/v1
      route:
        - destination:
            host: productpage
            port:
              number: 9080
";

/// Applies a manifest file and waits until both agents route with it.
fn apply(tb: &mut Testbed, file: &str, yaml: &str) {
    let generation = |tb: &Testbed, node: &str| {
        admin_json(tb, node, "/stats")["routes_generation"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = [generation(tb, "node-1"), generation(tb, "node-2")];
    tb.apply(file, yaml).expect("apply");
    wait_until(&format!("{file} applied"), Duration::from_secs(15), || {
        generation(tb, "node-1") > before[0] && generation(tb, "node-2") > before[1]
    });
}

/// One curl per URL list from the client pod, each answer's status code (and, with
/// `bodies`, the bodies as well).
fn statuses(tb: &Testbed, urls: &[String], extra: &[&str]) -> Vec<u16> {
    let mut cmd = tb.pod_command("client", "curl").expect("pod command");
    cmd.args(["-sS", "-m", "20", "-w", "%{http_code}\\n"])
        .args(extra);
    for u in urls {
        cmd.args(["-o", "/dev/null", u]);
    }
    let out = run_bounded(cmd, Duration::from_secs(120)).expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap_or(0))
        .collect()
}

/// One request: (status, body, seconds taken).
fn get(tb: &Testbed, url: &str, extra: &[&str]) -> (u16, String, f64) {
    let mut cmd = tb.pod_command("client", "curl").expect("pod command");
    cmd.args(["-sS", "-m", "20", "-w", "\n%{http_code} %{time_total}"])
        .args(extra)
        .arg(url);
    let out = run_bounded(cmd, Duration::from_secs(30)).expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut tail = tail.split(' ');
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let secs = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (status, body.to_string(), secs)
}

/// The JSON answers of `mesh-testapp http` to `n` requests for `url` from one curl in the
/// client pod (`extra` after `-m 60`, so it may set another), killed after `limit`.
fn answers(
    tb: &Testbed,
    url: &str,
    n: usize,
    extra: &[&str],
    limit: Duration,
) -> Vec<serde_json::Value> {
    let mut cmd = tb.pod_command("client", "curl").expect("pod command");
    cmd.args(["-sS", "-m", "60"]).args(extra);
    for _ in 0..n {
        cmd.arg(url);
    }
    let out = run_bounded(cmd, limit).expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    serde_json::Deserializer::from_str(&body)
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("{e}: {body}")))
        .collect()
}

/// Versions answering `n` requests on one keep-alive connection.
fn versions(tb: &Testbed, url: &str, n: usize, extra: &[&str]) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for v in answers(tb, url, n, extra, Duration::from_secs(120)) {
        let version = v["version"].as_str().unwrap_or("?").to_string();
        *count.entry(version).or_default() += 1;
    }
    count
}

/// `mesh-agent routes ARGS` against node-1's agent.
fn routes_cli(tb: &Testbed, args: &[&str]) -> String {
    cli(tb, "routes", args)
}

/// `mesh-agent COMMAND ARGS` against node-1's agent (the client's); must succeed.
fn cli(tb: &Testbed, command: &str, args: &[&str]) -> String {
    let socket = tb.node("node-1").expect("node").admin_socket.clone();
    let out = std::process::Command::new(AGENT)
        .arg(command)
        .args(args)
        .arg("--admin-socket")
        .arg(&socket)
        .output()
        .expect(command);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn istio_routing_rules_route_real_requests() {
    let Some(mut tb) = up("routing", 2, &[("app.yaml", &manifests())]) else {
        return;
    };
    let serve_as = |pod: &str, service: &str, version: &str, extra: &[&str]| {
        let mut args = vec![
            "http",
            "--listen",
            "0.0.0.0:9080",
            "--service",
            service,
            "--version",
            version,
        ];
        args.extend_from_slice(extra);
        serve(&tb, pod, &args)
    };
    let mut servers = [
        serve_as("productpage-v1", "productpage", "v1", &["--log-requests"]),
        serve_as("reviews-v1", "reviews", "v1", &[]),
        serve_as("reviews-v2", "reviews", "v2", &[]),
        serve_as("reviews-v3", "reviews", "v3", &[]),
        serve_as("flaky-ok", "flaky", "ok", &[]),
        serve_as("flaky-bad", "flaky", "bad", &["--status", "503"]),
    ];
    let pp = tb
        .service_ip("default", "productpage")
        .expect("productpage");
    let reviews = tb.service_ip("default", "reviews").expect("reviews");
    let flaky = tb.service_ip("default", "flaky").expect("flaky");
    let pp_url = |path: &str| format!("http://{pp}:9080{path}");

    // Without a VirtualService every path reaches productpage.
    assert_eq!(get(&tb, &pp_url("/other"), &[]).0, 200);

    // The guide's VirtualService, unchanged: bound to its gateway, it changes nothing for
    // traffic inside the mesh.
    apply(&mut tb, "vs.yaml", GUIDE_VS);
    assert_eq!(
        get(&tb, &pp_url("/other"), &[]).0,
        200,
        "gateway-bound rules leave the mesh alone"
    );

    // The same rules without `gateways` and with `hosts` naming the productpage Service.
    let mesh_vs = GUIDE_VS.replace(
        "    - \"bookinfo.example.com\"\n  gateways:\n    - bookinfo-gateway\n",
        "    - productpage\n",
    );
    apply(&mut tb, "vs.yaml", &mesh_vs);
    let (status, body, _) = get(&tb, &pp_url("/productpage"), &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"service\":\"productpage\""), "{body}");
    assert_eq!(get(&tb, &pp_url("/api/v1/products"), &[]).0, 200);
    assert_eq!(
        get(&tb, &pp_url("/other"), &[]).0,
        404,
        "no rule matches: 404 NR"
    );
    assert!(
        metric(
            &node_metrics(&tb, "node-1"),
            "istio_requests_total",
            &[("response_code", "404"), ("response_flags", "NR")]
        ) >= 1
    );

    // Subsets by label, a header match for one user, and an 80/20 split for everyone else.
    apply(
        &mut tb,
        "reviews.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: reviews\n\
spec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n  \
- name: v3\n    labels: {version: v3}\n---\n\
apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: reviews\nspec:\n  hosts: [reviews]\n  http:\n  \
- match:\n    - headers:\n        end-user: {exact: jason}\n    route:\n    - destination: {host: reviews, subset: v2}\n  \
- route:\n    - destination: {host: reviews, subset: v1}\n      weight: 80\n    - destination: {host: reviews, subset: v3}\n      weight: 20\n",
    );
    let reviews_url = format!("http://{reviews}:9080/reviews/0");
    let jason = versions(&tb, &reviews_url, 20, &["-H", "end-user: jason"]);
    assert_eq!(
        jason,
        BTreeMap::from([("v2".to_string(), 20)]),
        "the named user goes to v2"
    );
    let split = versions(&tb, &reviews_url, 2000, &[]);
    let v1 = split.get("v1").copied().unwrap_or(0);
    let v3 = split.get("v3").copied().unwrap_or(0);
    assert_eq!(v1 + v3, 2000, "only the weighted subsets answer: {split:?}");
    let share = v1 as f64 / 2000.0 * 100.0;
    assert!(
        (76.0..=84.0).contains(&share),
        "v1 share {share:.1}% not within 80±4: {split:?}"
    );

    // `mesh-agent routes POD` shows the rules in force for the client, with their matches,
    // subsets and weights; JSON carries the same.
    let routes = routes_cli(&tb, &["default/client"]);
    let line = |needle: &str| {
        routes
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{routes}"))
            .to_string()
    };
    assert!(
        line("headers[end-user]=jason").contains("default/reviews/v2:9080 (1/1 healthy)"),
        "{routes}"
    );
    let split_line = line("default/reviews/v1:9080");
    assert!(
        split_line.contains("80%")
            && split_line.contains("default/reviews/v3:9080")
            && split_line.contains("20%"),
        "{routes}"
    );
    assert!(
        line("uri^=/productpage || uri^=/api/v1").contains("default/bookinfo"),
        "{routes}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&routes_cli(&tb, &["client", "-o", "json"])).expect("json");
    let reviews_port = json
        .as_array()
        .and_then(|a| a.iter().find(|p| p["service"] == "default/reviews"))
        .expect("reviews in /routes");
    assert_eq!(reviews_port["virtual_service"], "default/reviews");
    assert_eq!(reviews_port["rules"][1]["destinations"][1]["weight"], 20);

    // Retries: one of flaky's two pods always answers 503; with retries every request
    // succeeds on the other pod, without them about half fail.
    let flaky_url = |path: &str| format!("http://{flaky}{path}");
    let flaky_vs = |http: &str| {
        format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata:\n  name: flaky\nspec:\n  \
             hosts: [flaky.default.svc.cluster.local]\n  http:\n{http}"
        )
    };
    apply(
        &mut tb,
        "flaky.yaml",
        &flaky_vs(
            "  - route:\n    - destination: {host: flaky}\n    retries: {attempts: 3, retryOn: 5xx}\n",
        ),
    );
    let urls: Vec<String> = (0..20).map(|_| flaky_url("/")).collect();
    let codes = statuses(&tb, &urls, &[]);
    assert_eq!(codes, vec![200; 20], "retries on the other endpoint");
    // Requests with a body are retried too: the copy kept while the first try streamed it is
    // sent again, whole (the app reports the bytes it got).
    let payload = "b".repeat(5000);
    let post = ["--data-binary", payload.as_str()];
    let codes = statuses(&tb, &urls, &post);
    assert_eq!(codes, vec![200; 20], "POSTs retried on the other endpoint");
    for _ in 0..6 {
        let (status, body, _) = get(&tb, &flaky_url("/"), &post);
        let json: serde_json::Value = serde_json::from_str(body.trim()).expect("json");
        assert_eq!(
            (status, json["body_bytes"].as_u64()),
            (200, Some(5000)),
            "{body}"
        );
    }
    apply(
        &mut tb,
        "flaky.yaml",
        &flaky_vs("  - route:\n    - destination: {host: flaky}\n    retries: {attempts: 0}\n"),
    );
    let codes = statuses(&tb, &urls, &[]);
    let failed = codes.iter().filter(|c| **c == 503).count();
    assert!(
        (5..=15).contains(&failed),
        "without retries half fail: {codes:?}"
    );

    // Timeouts: the route's and a try's, both answered 504 `UT` well before the app answers.
    apply(
        &mut tb,
        "flaky.yaml",
        &flaky_vs(
            "  - match:\n    - uri: {prefix: /slow}\n    timeout: 0.5s\n    route:\n    - destination: {host: flaky.default}\n  \
- match:\n    - uri: {prefix: /try}\n    retries: {attempts: 1, perTryTimeout: 0.3s}\n    route:\n    - destination: {host: flaky}\n  \
- route:\n    - destination: {host: flaky}\n",
        ),
    );
    for path in ["/slow?delay_ms=5000", "/try?delay_ms=5000"] {
        let (status, body, secs) = get(&tb, &flaky_url(path), &[]);
        assert_eq!(status, 504, "{path}: {body}");
        assert_eq!(body, "upstream request timeout");
        assert!(secs < 4.0, "{path} took {secs} s");
    }
    assert!(
        metric(
            &node_metrics(&tb, "node-1"),
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ) >= 2
    );
    // The route's timeout runs to the response's last byte, as Envoy's does: headers in time
    // and a body still coming at the deadline end in a cut response, recorded `UT`.
    let (status, body, secs) = get(&tb, &flaky_url("/slow?drip_ms=5000"), &[]);
    assert_eq!((status, body.as_str()), (200, "first\n"), "a dripping body");
    assert!(secs < 4.0, "the dripping body was cut after {secs} s");
    assert_eq!(
        metric(
            &node_metrics(&tb, "node-1"),
            "istio_requests_total",
            &[("response_code", "200"), ("response_flags", "UT")]
        ),
        1
    );

    // Faults: a 50% abort over 1000 requests, and a delay.
    apply(
        &mut tb,
        "flaky.yaml",
        &(flaky_vs(
            "  - match:\n    - uri: {prefix: /delayed}\n    fault:\n      delay: {fixedDelay: 1s, percentage: {value: 100}}\n    route:\n    - destination: {host: flaky, subset: ok}\n  \
- fault:\n      abort: {httpStatus: 418, percentage: {value: 50}}\n    route:\n    - destination: {host: flaky, subset: ok}\n",
        ) + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: flaky\nspec:\n  host: flaky\n  subsets:\n  - name: ok\n    labels: {version: ok}\n"),
    );
    let urls: Vec<String> = (0..1000).map(|_| flaky_url("/")).collect();
    let codes = statuses(&tb, &urls, &[]);
    let aborted = codes.iter().filter(|c| **c == 418).count();
    let ok = codes.iter().filter(|c| **c == 200).count();
    assert_eq!(aborted + ok, 1000, "{codes:?}");
    assert!(
        (450..=550).contains(&aborted),
        "{aborted} of 1000 aborted, not within 50±5%"
    );
    let (status, _, secs) = get(&tb, &flaky_url("/delayed"), &[]);
    assert_eq!(status, 200);
    assert!(secs >= 0.95, "the delay delays: {secs} s");

    // Outlier detection ejects the failing pod after 2 consecutive 5xx and lets it back
    // after the ejection time.
    apply(
        &mut tb,
        "flaky.yaml",
        &(flaky_vs("  - route:\n    - destination: {host: flaky}\n    retries: {attempts: 0}\n")
            + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: flaky\nspec:\n  host: flaky\n  \
               trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}\n"),
    );
    let urls: Vec<String> = (0..10).map(|_| flaky_url("/")).collect();
    let before = statuses(&tb, &urls, &[]);
    assert!(
        before.contains(&503),
        "the bad pod answers at first: {before:?}"
    );
    let ejected_at = Instant::now();
    // The CLI shows the ejection while it lasts (3 s).
    let services = cli(&tb, "services", &[]);
    let flaky_row = services
        .lines()
        .find(|l| l.contains(" flaky "))
        .unwrap_or_else(|| panic!("no flaky row: {services}"));
    assert!(
        flaky_row.contains("EJECTED for") || ejected_at.elapsed() > Duration::from_secs(3),
        "mesh-agent services shows the ejected endpoint:\n{services}"
    );
    let during = statuses(&tb, &urls, &[]);
    assert!(
        during.iter().all(|c| *c == 200) || ejected_at.elapsed() > Duration::from_secs(3),
        "ejected: {during:?}"
    );
    std::thread::sleep(Duration::from_millis(3500));
    let after = statuses(&tb, &urls, &[]);
    assert!(
        after.contains(&503),
        "back after the ejection time: {after:?}"
    );

    // The connection pool: one request in flight; concurrent ones get 503 `UO`.
    apply(
        &mut tb,
        "flaky.yaml",
        &(flaky_vs("  - route:\n    - destination: {host: flaky, subset: ok}\n")
            + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: flaky\nspec:\n  host: flaky\n  \
               trafficPolicy:\n    connectionPool:\n      http: {http2MaxRequests: 1}\n  subsets:\n  - name: ok\n    labels: {version: ok}\n"),
    );
    let urls: Vec<String> = (0..4).map(|_| flaky_url("/?delay_ms=1500")).collect();
    let codes = statuses(
        &tb,
        &urls,
        &["--parallel", "--parallel-immediate", "--parallel-max", "4"],
    );
    assert!(codes.contains(&200) && codes.contains(&503), "{codes:?}");
    assert!(
        metric(
            &node_metrics(&tb, "node-1"),
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        ) >= 1
    );

    // Redirects, direct responses, rewrites and header edits.
    apply(
        &mut tb,
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: bookinfo\nspec:\n  hosts: [productpage]\n  http:\n  \
- match:\n    - uri: {exact: /moved}\n    redirect: {uri: /productpage, authority: bookinfo.example.com, redirectCode: 302}\n  \
- match:\n    - uri: {regex: \"/ping/[0-9]+\"}\n    directResponse: {status: 200, body: {string: pong}}\n  \
- match:\n    - uri: {prefix: /OLD/}\n      ignoreUriCase: true\n    rewrite: {uri: /new/}\n    headers:\n      request:\n        set: {x-mesh: nodemesh}\n      response:\n        add: {x-served-by: nodemesh}\n    route:\n    - destination: {host: productpage}\n",
    );
    let (status, _, _) = get(&tb, &pp_url("/moved"), &[]);
    assert_eq!(status, 302);
    let (_, headers, _) = get(&tb, &pp_url("/moved"), &["-D", "-", "-o", "/dev/null"]);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("location: http://bookinfo.example.com/productpage"),
        "{headers}"
    );
    assert_eq!(get(&tb, &pp_url("/ping/42"), &[]).1, "pong");
    assert_eq!(get(&tb, &pp_url("/ping/x"), &[]).0, 404);
    let (status, body, _) = get(&tb, &pp_url("/old/page?x=1"), &["-D", "/dev/stderr"]);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["path"], "/new/page", "{body}");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["headers"]["x-mesh"], "nodemesh");
    let (_, headers, _) = get(&tb, &pp_url("/old/page"), &["-D", "-", "-o", "/dev/null"]);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("x-served-by: nodemesh"),
        "{headers}"
    );

    // Mirroring: every request to flaky is copied to productpage with a `-shadow` authority;
    // the client gets flaky's answer.
    apply(
        &mut tb,
        "flaky.yaml",
        &(flaky_vs(
            "  - route:\n    - destination: {host: flaky, subset: ok}\n    mirror: {host: productpage}\n    mirrorPercentage: {value: 100}\n",
        ) + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: flaky\nspec:\n  host: flaky\n  \
               subsets:\n  - name: ok\n    labels: {version: ok}\n"),
    );
    let (status, body, _) = get(&tb, &flaky_url("/mirrored-1"), &[]);
    assert!(
        status == 200 && body.contains("\"service\":\"flaky\""),
        "{body}"
    );
    let line = servers[0]
        .wait_for_line("request GET /mirrored-1", Duration::from_secs(5))
        .expect("the mirrored copy reaches productpage");
    assert!(line.ends_with(&format!("host={flaky}-shadow")), "{line}");

    // CORS: a preflight from an allowed origin is answered by the agent; an allowed origin's
    // request gets Access-Control-Allow-Origin; another origin gets nothing.
    apply(
        &mut tb,
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: bookinfo\nspec:\n  hosts: [productpage]\n  http:\n  \
- corsPolicy:\n      allowOrigins: [{exact: \"https://example.com\"}]\n      allowMethods: [GET, POST]\n      \
allowHeaders: [x-custom]\n      maxAge: 1h\n      allowCredentials: true\n    route:\n    - destination: {host: productpage}\n",
    );
    let head = |extra: &[&str]| {
        let mut args = vec!["-D", "-", "-o", "/dev/null"];
        args.extend_from_slice(extra);
        get(&tb, &pp_url("/productpage"), &args)
            .1
            .to_ascii_lowercase()
    };
    let preflight = head(&[
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://example.com",
        "-H",
        "Access-Control-Request-Method: POST",
    ]);
    for h in [
        "access-control-allow-origin: https://example.com",
        "access-control-allow-methods: get,post",
        "access-control-allow-headers: x-custom",
        "access-control-max-age: 3600",
        "access-control-allow-credentials: true",
    ] {
        assert!(
            preflight.contains(h),
            "{h} in the preflight answer:\n{preflight}"
        );
    }
    assert!(
        !preflight.contains("content-type: application/json"),
        "answered by the agent, not the app"
    );
    let allowed = head(&["-H", "Origin: https://example.com"]);
    assert!(
        allowed.contains("access-control-allow-origin: https://example.com"),
        "{allowed}"
    );
    let other = head(&["-H", "Origin: https://evil.example"]);
    assert!(
        other.starts_with("http/1.1 200") && !other.contains("access-control-allow-origin"),
        "{other}"
    );

    // `tcp[]` routes on a TCP port: every connection to the subset the rule names (the
    // failing pod behind the same Service never answers).
    apply(
        &mut tb,
        "tcp.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: flaky-tcp, namespace: default}\n\
         spec:\n  selector: {app: flaky}\n  ports:\n  - {name: tcp, port: 7000, targetPort: http}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: flaky-tcp}\n\
         spec:\n  host: flaky-tcp\n  subsets:\n  - {name: ok, labels: {version: ok}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: flaky-tcp}\n\
         spec:\n  hosts: [flaky-tcp]\n  tcp:\n  - match: [{port: 7000}]\n    route:\n    - destination: {host: flaky-tcp, subset: ok}\n",
    );
    let tcp_ip = tb.service_ip("default", "flaky-tcp").expect("flaky-tcp");
    let urls: Vec<String> = (0..10).map(|_| format!("http://{tcp_ip}:7000/")).collect();
    // A connection per request: TCP routes choose per connection.
    let codes = statuses(&tb, &urls, &["-H", "Connection: close"]);
    assert_eq!(codes, vec![200; 10], "every connection to the ok subset");
    tb.down().expect("down");
}

/// DestinationRules shaping connections: on a TCP Service port (no VirtualService) the load
/// balancer, the connection pool's `maxConnections` (`UO`) and `tcp.idleTimeout`, per
/// connection; on an HTTP port `http.idleTimeout` of the upstream connections.
#[test]
fn destination_rules_shape_connections() {
    let tcp_service = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews-tcp, namespace: default}\n\
         spec:\n  selector: {app: reviews}\n  ports:\n  - {name: tcp, port: 7000, targetPort: http}\n";
    let app = format!("{}---\n{tcp_service}", manifests());
    let Some(mut tb) = up("routing_tcp", 2, &[("app.yaml", &app)]) else {
        return;
    };
    let _servers: Vec<_> = ["v1", "v2", "v3"]
        .iter()
        .map(|v| {
            let args = [
                "http",
                "--listen",
                "0.0.0.0:9080",
                "--service",
                "reviews",
                "--version",
                v,
            ];
            serve(&tb, &format!("reviews-{v}"), &args)
        })
        .collect();
    let ip = tb
        .service_ip("default", "reviews-tcp")
        .expect("reviews-tcp");
    let url = |path: &str| format!("http://{ip}:7000{path}");
    let dr = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews-tcp}}\n\
             spec:\n  host: reviews-tcp\n  trafficPolicy: {policy}\n"
        )
    };
    // A connection per request: TCP ports balance per connection.
    let close = ["-H", "Connection: close"];

    // Without a DestinationRule: round robin over all three.
    let spread = versions(&tb, &url("/"), 12, &close);
    assert_eq!(
        spread.len(),
        3,
        "round robin reaches every version: {spread:?}"
    );

    // consistentHash on the source IP: every connection of the client to one endpoint.
    apply(
        &mut tb,
        "dr.yaml",
        &dr("{loadBalancer: {consistentHash: {useSourceIp: true}}}"),
    );
    let hashed = versions(&tb, &url("/"), 12, &close);
    assert_eq!(
        hashed.len(),
        1,
        "one endpoint for one source IP: {hashed:?}"
    );

    // maxConnections: 1. While one connection is open, another is refused (`UO`).
    apply(
        &mut tb,
        "dr.yaml",
        &dr("{connectionPool: {tcp: {maxConnections: 1}}}"),
    );
    let mut held = tb.pod_command("client", "curl").expect("pod command");
    held.args(["-sS", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(url("/?delay_ms=3000"));
    let held = std::thread::spawn(move || run_bounded(held, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(800));
    let (status, _, _) = get(&tb, &url("/"), &[]);
    assert_eq!(
        status, 0,
        "a second connection over maxConnections is refused"
    );
    let out = held.join().expect("thread").expect("the held request");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the held connection is served"
    );
    assert_eq!(get(&tb, &url("/"), &[]).0, 200, "room again once it closed");
    assert_eq!(
        metric(
            &node_metrics(&tb, "node-1"),
            "istio_tcp_connections_opened_total",
            &[
                ("response_flags", "UO"),
                ("destination_service_name", "reviews-tcp")
            ]
        ),
        1
    );

    // tcp.idleTimeout: a connection silent that long is closed, mid-response; `0s` turns
    // the timeout off.
    apply(
        &mut tb,
        "dr.yaml",
        &dr("{connectionPool: {tcp: {idleTimeout: 1s}}}"),
    );
    let (status, body, secs) = get(&tb, &url("/?drip_ms=4000"), &[]);
    assert_eq!((status, body.as_str()), (200, "first\n"), "cut while idle");
    assert!(secs < 3.5, "closed after {secs} s, not by the idle timeout");
    apply(
        &mut tb,
        "dr.yaml",
        &dr("{connectionPool: {tcp: {idleTimeout: 0s}}}"),
    );
    let (status, body, _) = get(&tb, &url("/?drip_ms=1500"), &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, "first\nlast\n"),
        "no idle timeout"
    );

    // http.idleTimeout: requests to a meshed pod share one upstream connection (the app
    // sees one client port through the destination agent) until it has been unused that long.
    // (productpage: no TCP Service port sends to its pod, so its connections are shared; the
    // agent's one data-path thread, on 2 CPUs, keeps one per pod pair.)
    let _productpage = serve(
        &tb,
        "productpage-v1",
        &[
            "http",
            "--listen",
            "0.0.0.0:9080",
            "--service",
            "productpage",
            "--version",
            "v1",
        ],
    );
    let pp = tb
        .service_ip("default", "productpage")
        .expect("productpage");
    let seen_from = |tb: &Testbed| {
        let (status, body, _) = get(tb, &format!("http://{pp}:9080/"), &[]);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
        v["client"].as_str().expect("client").to_owned()
    };
    let first = seen_from(&tb);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(seen_from(&tb), first, "kept without an idle timeout");
    apply(
        &mut tb,
        "pp-dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage}\n\
         spec:\n  host: productpage\n  trafficPolicy: {connectionPool: {http: {idleTimeout: 1s}}}\n",
    );
    let first = seen_from(&tb);
    assert_eq!(seen_from(&tb), first, "reused while in use");
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(seen_from(&tb), first, "a new connection after 1 s unused");

    // The shared connection's requests in flight at once each need a connection to the
    // (HTTP/1.1) app at the destination; those are kept for the next burst, not just a few:
    // a second burst of 24 requests reaches the app on the connections the first one opened.
    apply(
        &mut tb,
        "pp-dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage}\n\
         spec:\n  host: productpage\n  trafficPolicy: {connectionPool: {http: {idleTimeout: 1h}}}\n",
    );
    let burst = |tb: &Testbed| -> std::collections::BTreeSet<String> {
        let extra = [
            "-m",
            "20",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            "24",
        ];
        let url = format!("http://{pp}:9080/?delay_ms=700");
        let all = answers(tb, &url, 24, &extra, Duration::from_secs(60));
        assert_eq!(all.len(), 24, "{all:?}");
        all.iter()
            .map(|v| v["client"].as_str().expect("client").to_owned())
            .collect()
    };
    let first = burst(&tb);
    // The 24 were in flight together: the app saw (nearly) as many connections.
    assert!(first.len() >= 16, "not concurrent: {first:?}");
    let second = burst(&tb);
    let new: Vec<_> = second.difference(&first).collect();
    assert!(
        new.len() <= 2,
        "{} of the second burst's connections are new: {new:?} (first burst: {first:?})",
        new.len()
    );

    // A burst that finds no shared connection (the last one went unused for over 1 s): the
    // first request opens it, in one HBONE tunnel, and the others wait for it rather than
    // each opening a tunnel of their own.
    apply(
        &mut tb,
        "pp-dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: productpage}\n\
         spec:\n  host: productpage\n  trafficPolicy: {connectionPool: {http: {idleTimeout: 1s}}}\n",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let tunnels = |tb: &Testbed| {
        let w = admin_json(tb, "node-1", "/workloads");
        let client = w
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "client"));
        client
            .and_then(|c| c["hbone_streams_opened"].as_u64())
            .unwrap_or_else(|| panic!("no client in {w}"))
    };
    let opened = tunnels(&tb);
    burst(&tb);
    assert_eq!(
        tunnels(&tb) - opened,
        1,
        "tunnels opened for 24 concurrent requests"
    );
    tb.down().expect("down");
}
