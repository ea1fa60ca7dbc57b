//! `mesh-agent analyze` as a user runs it (no root, no agent): each problem's fixture under
//! tests/data/analyze gives exactly Istio's line(s) and exit status; the reference guide's
//! YAML and the demo's bookinfo and routing rules come out clean.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/analyze")
}

/// Runs `analyze ARGS` from the fixtures directory (so messages name files as given).
fn analyze(args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("analyze")
        .args(args)
        .current_dir(data())
        .output()
        .expect("run mesh-agent analyze")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `file` gives exactly `lines` on stdout and exits with `code`.
fn expect(file: &str, code: i32, lines: &[&str]) {
    let out = analyze(&[file]);
    let want: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout(&out), want, "{file}; stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(code), "{file}; stderr:\n{stderr}");
}

#[test]
fn the_reference_guides_yaml_is_clean() {
    // Its Deployment, Service, Gateway, the VirtualService bound to that Gateway, and the
    // production IstioOperator.
    let out = analyze(&["guide.yaml"]);
    assert_eq!(stdout(&out), "");
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("No validation issues found"), "{stderr}");
    assert!(stderr.contains("5 document(s)"), "{stderr}");
}

#[test]
fn the_demos_bookinfo_and_routing_rules_are_clean() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/demo");
    for args in [
        vec![demo.join("bookinfo.yaml"), demo.join("routing.yaml")],
        vec![demo.clone()], // the directory: the same two files
    ] {
        let out = Command::new(AGENT)
            .arg("analyze")
            .args(&args)
            .output()
            .expect("run");
        assert_eq!(stdout(&out), "", "{args:?}");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn referenced_host_not_found() {
    expect(
        "host-not-found.yaml",
        1,
        &[
            r#"Error [IST0101] (VirtualService default/ratings host-not-found.yaml:13) Referenced host not found: "ratings-bogus""#,
        ],
    );
}

#[test]
fn referenced_port_not_found_and_port_selector_required() {
    expect(
        "port-not-found.yaml",
        1,
        &[
            r#"Error [IST0101] (VirtualService default/bookinfo port-not-found.yaml:27) Referenced host:port not found: "productpage:9081""#,
            r#"Error [IST0112] (VirtualService default/bookinfo port-not-found.yaml:27) This VirtualService routes to a service "details" that exposes multiple ports [9080 9090]. Specifying a port in the destination is required to disambiguate."#,
        ],
    );
}

#[test]
fn referenced_subset_and_mirror_not_found() {
    expect(
        "subset-not-found.yaml",
        1,
        &[
            r#"Error [IST0101] (VirtualService default/ratings subset-not-found.yaml:66) Referenced host+subset in destinationrule not found: "ratings+v1""#,
            r#"Error [IST0101] (VirtualService default/reviews subset-not-found.yaml:48) Referenced host+subset in destinationrule not found: "reviews+v9""#,
            r#"Error [IST0101] (VirtualService default/reviews-shadow subset-not-found.yaml:80) Referenced mirror host not found: "reviews-v3""#,
            r#"Error [IST0101] (VirtualService default/reviews-shadow subset-not-found.yaml:80) Referenced mirror+subset in destinationrule not found: "reviews+v2""#,
        ],
    );
}

#[test]
fn referenced_gateway_not_found_and_host_not_in_gateway() {
    expect(
        "gateway-not-found.yaml",
        1,
        &[
            r#"Error [IST0101] (VirtualService default/bookinfo gateway-not-found.yaml:29) Referenced gateway not found: "bookinfo-gateway""#,
            r#"Warning [IST0132] (VirtualService default/bookinfo gateway-not-found.yaml:29) one or more host [bookinfo.example.com] defined in VirtualService default/bookinfo not found in Gateway default/shop-gateway."#,
        ],
    );
}

#[test]
fn port_names_without_a_protocol_are_info_only() {
    expect(
        "port-name.yaml",
        0,
        &[
            "Info [IST0118] (Service default/details port-name.yaml:2) Port name  (port: 8443, targetPort: https-port) doesn't follow the naming convention of Istio port.",
            "Info [IST0118] (Service default/details port-name.yaml:2) Port name foo (port: 9080, targetPort: 9080) doesn't follow the naming convention of Istio port.",
        ],
    );
}

#[test]
fn unreachable_rules() {
    expect(
        "unreachable-rule.yaml",
        0,
        &[
            r#"Warning [IST0130] (VirtualService default/reviews unreachable-rule.yaml:13) VirtualService rule "jason-again" not used (all matches used by prior rules)."#,
            "Warning [IST0130] (VirtualService default/reviews unreachable-rule.yaml:13) VirtualService rule #3 not used (route without matches defined before).",
            "Warning [IST0130] (VirtualService default/reviews unreachable-rule.yaml:13) VirtualService rule #4 not used (only the last rule can have no matches).",
            r#"Info [IST0131] (VirtualService default/reviews unreachable-rule.yaml:13) VirtualService rule "jason-again" match "same-user" is not used (duplicate/overlapping match in rule "jason")."#,
        ],
    );
}

#[test]
fn ineffective_matches() {
    expect(
        "ineffective-match.yaml",
        0,
        &[
            "Info [IST0131] (VirtualService default/productpage ineffective-match.yaml:15) VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0).",
            "Info [IST0131] (VirtualService default/productpage ineffective-match.yaml:15) VirtualService rule #1 match #1 of prefix /api/v1 is not used (duplicate/overlapping match in rule #0 of prefix /api on #0).",
        ],
    );
}

#[test]
fn subsets_that_select_no_pods() {
    expect(
        "subset-no-pods.yaml",
        1,
        &[
            "Error [IST0173] (DestinationRule default/reviews subset-no-pods.yaml:70) The Subset v3 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
            "Error [IST0173] (DestinationRule default/reviews subset-no-pods.yaml:70) The Subset v4 defined in the DestinationRule does not select any pods. Which may lead to 503 UH (NoHealthyUpstream).",
            "Warning [IST0174] (DestinationRule default/ratings subset-no-pods.yaml:91) The host ratings defined in the DestinationRule does not match any services in the mesh.",
        ],
    );
}

#[test]
fn schema_validation_errors_name_the_field() {
    expect(
        "schema.yaml",
        1,
        &[
            "Error [IST0106] (Deployment default/ratings schema.yaml:40) Schema validation error: field spec.replica: unknown field of Deployment (misspelled or misplaced?)",
            r#"Error [IST0106] (DestinationRule default/reviews schema.yaml:15) Schema validation error: field spec.trafficPolicy.loadBalancer.simple: "FASTEST" is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH"#,
            "Error [IST0106] (Service default/reviews schema.yaml:69) Schema validation error: field spec.ports[0].port: port 70000 is out of range 1..65535",
            "Error [IST0106] (VirtualService default/ratings schema.yaml:25) Schema validation error: field spec.http[0].retries.backoff: retries.backoff is not supported by nodemesh yet; remove it or apply the rule elsewhere",
            "Error [IST0106] (VirtualService default/reviews schema.yaml:3) Schema validation error: field spec.htttp: unknown field of VirtualService (misspelled or misplaced?)",
        ],
    );
}

#[test]
fn namespaces_not_enabled() {
    expect(
        "namespace.yaml",
        0,
        &[
            "Info [IST0102] (Namespace shop namespace.yaml:3) The namespace is not enabled for nodemesh. Run 'kubectl label namespace shop nodemesh.io/enabled=true' to enable it, or 'kubectl label namespace shop nodemesh.io/enabled=false' to explicitly mark it as not needing it.",
        ],
    );
}

#[test]
fn unreadable_input_exits_2_and_says_why() {
    let out = analyze(&["syntax.yaml", "guide.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("syntax.yaml: document 1: YAML syntax error:")
            && stderr.contains("at line 6 column 1"),
        "{stderr}"
    );
    let out = analyze(&["no-such-file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-file.yaml: cannot read:"),
        "{stderr}"
    );
    let empty = std::env::temp_dir().join(format!("analyze-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    let out = Command::new(AGENT)
        .arg("analyze")
        .arg(&empty)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir(&empty);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without *.yaml or *.yml files"), "{stderr}");
}

#[test]
fn json_and_yaml_list_code_level_resource_message_and_origin() {
    let out = analyze(&["-o", "json", "subset-not-found.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let first = &list[0];
    assert_eq!(first["code"], "IST0101");
    assert_eq!(first["level"], "Error");
    assert_eq!(first["resource"], "VirtualService default/ratings");
    assert_eq!(
        first["message"],
        r#"Referenced host+subset in destinationrule not found: "ratings+v1""#
    );
    assert_eq!(
        first["origin"],
        serde_json::json!({"file": "subset-not-found.yaml", "document": 6, "line": 66})
    );
    assert_eq!(list.as_array().map(Vec::len), Some(4));

    let out = analyze(&["-o", "yaml", "subset-not-found.yaml"]);
    let yaml: serde_json::Value = serde_yaml::from_slice(&out.stdout).expect("YAML");
    assert_eq!(yaml, list, "the YAML form is the same document");

    let out = analyze(&["-o", "json", "guide.yaml"]);
    assert_eq!(stdout(&out).trim(), "[]");
}

#[test]
fn help_explains_codes_and_exit_status() {
    let out = Command::new(AGENT)
        .args(["analyze", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = stdout(&out);
    for needle in [
        "IST0101",
        "IST0106",
        "IST0118",
        "IST0130",
        "IST0131",
        "IST0173",
        "Exit status",
        "--output",
        "--local",
    ] {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
}

#[test]
fn standard_input_is_read_for_a_dash() {
    use std::io::Write as _;
    use std::process::Stdio;
    let yaml = std::fs::read(data().join("host-not-found.yaml")).expect("fixture");
    let mut child = Command::new(AGENT)
        .args(["analyze", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&yaml)
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        stdout(&out),
        "Error [IST0101] (VirtualService default/ratings stdin:13) Referenced host not found: \"ratings-bogus\"\n"
    );
    assert_eq!(out.status.code(), Some(1));
}
