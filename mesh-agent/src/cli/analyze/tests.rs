use super::input::document_lines;
use super::routing::{gateway_ref, overlaps};
use super::*;
use crate::config::manifests::Sources;
use crate::config::model::ObjectRef;

fn run(mode: Mode, files: &[(&str, &str)]) -> Report {
    analyze(&Sources::from_texts(files.iter().copied()), mode)
}

/// The table lines of analyzing one file.
fn lines(yaml: &str) -> Vec<String> {
    let report = run(Mode::Kubernetes, &[("in.yaml", yaml)]);
    assert!(report.unreadable.is_empty(), "{:?}", report.unreadable);
    report.messages.iter().map(ToString::to_string).collect()
}

const REVIEWS: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
";

#[test]
fn document_lines_follow_the_parsers_documents() {
    // Leading comments; a document starts at its first content line.
    assert_eq!(
        document_lines("# c\n\na: 1\n---\n# d\nb: 2\n"),
        Some(vec![3, 6])
    );
    // A leading `---` starts the first document; trailing `---` is an empty document.
    assert_eq!(document_lines("---\na: 1\n---\n"), Some(vec![2, 3]));
    // Content on the `---` line, `...` ends a document, directives precede `---`.
    assert_eq!(
        document_lines("--- {a: 1}\n...\n%YAML 1.2\n---\nb: 2\n"),
        Some(vec![1, 5])
    );
    // Two separators in a row: an empty document between them.
    assert_eq!(
        document_lines("a: 1\n---\n---\nb: 2\n"),
        Some(vec![1, 2, 4])
    );
    // No content: the parser still yields one (null) document, which nothing refers to.
    assert_eq!(document_lines(""), Some(vec![]));
    assert_eq!(document_lines("# only a comment\n"), Some(vec![]));
    // A syntax error: lines cannot be trusted.
    assert_eq!(document_lines("a: [1\n"), None);
}

#[test]
fn gateway_references_resolve_like_istio() {
    let r = |ns: &str, name: &str| ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    };
    assert_eq!(gateway_ref("gw", "shop"), r("shop", "gw"));
    assert_eq!(
        gateway_ref("istio-system/gw", "shop"),
        r("istio-system", "gw")
    );
    assert_eq!(
        gateway_ref("gw.istio-system.svc.cluster.local", "shop"),
        r("istio-system", "gw")
    );
}

#[test]
fn host_overlap_is_istios_wildcard_match() {
    assert!(overlaps("bookinfo.example.com", "bookinfo.example.com"));
    assert!(overlaps("*", "anything"));
    assert!(overlaps("*.example.com", "bookinfo.example.com"));
    assert!(overlaps("bookinfo.example.com", "*.example.com"));
    assert!(overlaps("*.com", "*.example.com"));
    assert!(!overlaps("*.example.com", "example.org"));
    assert!(!overlaps("a.example.com", "b.example.com"));
}

#[test]
fn a_service_that_fails_conversion_is_not_also_a_missing_host() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 0}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
";
    let got = lines(yaml);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with("Error [IST0106] (Service default/reviews in.yaml:2)"),
        "{got:#?}"
    );
    // Nor one that does not even decode.
    let got = lines(&yaml.replace("port: 0", "port: nine"));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].contains("field spec.ports[0].port: invalid type"),
        "{got:#?}"
    );
}

#[test]
fn tcp_rules_are_checked_like_http_rules() {
    let yaml = format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  tcp:
  - match: [{{port: 9080}}]
    route: [{{destination: {{host: reviews}}}}]
  - match: [{{port: 9080}}]
    route: [{{destination: {{host: reviews}}}}]
"
    );
    assert_eq!(
        lines(&yaml),
        [
            "Warning [IST0130] (VirtualService default/reviews in.yaml:9) VirtualService rule #1 not used (all matches used by prior rules).",
            "Info [IST0131] (VirtualService default/reviews in.yaml:9) VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0).",
        ]
    );
}

#[test]
fn subsets_count_pods_of_the_services_namespace_and_selector_only() {
    // A CronJob's template in the namespace selects v1; v2's pod is in another namespace;
    // v3 contradicts the Service's own selector.
    let yaml = format!(
        "{REVIEWS}---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: reviews-v1}}
spec:
  schedule: '* * * * *'
  jobTemplate:
    spec:
      template:
        metadata: {{labels: {{app: reviews, version: v1}}}}
        spec: {{containers: [{{name: c, image: i}}], restartPolicy: Never}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reviews-v2, namespace: other, labels: {{app: reviews, version: v2}}}}
spec: {{containers: [{{name: c, image: i}}]}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{app: ratings, version: v1}}}}
"
    );
    let got = lines(&yaml);
    let subsets: Vec<&str> = got
        .iter()
        .filter_map(|l| l.split("The Subset ").nth(1))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(subsets, ["v2", "v3"], "{got:#?}");
}

#[test]
fn gateways_in_other_namespaces_and_wildcards() {
    let yaml = format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {{name: public, namespace: istio-system}}
spec:
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: ['default/*.example.com']
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews.example.com]
  gateways: [istio-system/public, mesh]
  http:
  - route: [{{destination: {{host: reviews}}}}]
"
    );
    assert_eq!(lines(&yaml), Vec::<String>::new());
}

#[test]
fn local_mode_adds_local_modes_rules() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: external}
spec:
  ports: [{name: http, port: 80}]
";
    assert!(
        run(Mode::Kubernetes, &[("a.yaml", yaml)])
            .messages
            .is_empty()
    );
    let local = run(Mode::Local, &[("a.yaml", yaml)]);
    assert_eq!(local.messages.len(), 1);
    assert!(
        local.messages[0].message.contains("spec.selector"),
        "{local:?}"
    );
    assert_eq!(local.exit_code(), 1);
}

#[test]
fn exit_status_is_2_for_unreadable_1_for_errors_0_otherwise() {
    let info_only = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
    let report = run(Mode::Kubernetes, &[("a.yaml", info_only)]);
    assert_eq!(report.messages.len(), 1);
    assert_eq!(report.exit_code(), 0);
    let error = format!("{REVIEWS}---\n{REVIEWS}");
    let report = run(Mode::Kubernetes, &[("a.yaml", error.as_str())]);
    assert!(
        report.messages[0]
            .message
            .contains("duplicate Service default/reviews")
    );
    assert_eq!(report.exit_code(), 1);
    let broken = run(
        Mode::Kubernetes,
        &[("a.yaml", "a: [1\n"), ("b.yaml", info_only)],
    );
    assert_eq!(broken.exit_code(), 2);
    assert_eq!(
        broken.messages.len(),
        1,
        "the readable file is still analyzed"
    );
}

#[test]
fn a_message_without_a_line_names_the_file_only() {
    let m = Message {
        code: "IST0101",
        level: Level::Error,
        resource: "VirtualService default/x".into(),
        message: "Referenced host not found: \"y\"".into(),
        origin: Some(Location {
            file: "a.yaml".into(),
            document: 2,
            line: None,
        }),
    };
    assert_eq!(
        m.to_string(),
        "Error [IST0101] (VirtualService default/x a.yaml) Referenced host not found: \"y\""
    );
}
