//! VirtualService and DestinationRule: decoding, validation with the field at fault, and
//! the model they become.
use std::time::Duration;

use super::super::routing::{HttpAction, LoadBalancer, StringMatch};
use super::{ConfigError, LoadedManifests, Sources, load_sources};

fn load(docs: &[&str]) -> Result<LoadedManifests, ConfigError> {
    load_sources(&Sources::from_texts([("r.yaml", docs.join("---\n"))]))
}

fn err(docs: &[&str]) -> String {
    load(docs)
        .map(|_| ())
        .expect_err("expected an error")
        .to_string()
}

fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

fn vs(version: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/{version}\nkind: VirtualService\n\
         metadata: {{name: reviews, namespace: bookinfo}}\nspec:\n{spec}"
    )
}

fn dr(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: reviews, namespace: bookinfo}}\nspec:\n{spec}"
    )
}

#[test]
fn every_served_version_decodes_into_the_model() {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let spec = "  hosts: [reviews]\n  http:\n  - name: jason\n    match:\n    - uri: {regex: \"/r/[0-9]+\"}\n      \
                    ignoreUriCase: true\n    route:\n    - destination: {host: reviews, subset: v2, port: {number: 9080}}\n    \
                    timeout: 1.5s\n    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: \"5xx,connect-failure,503\"}\n";
        let loaded = load(&[&vs(version, spec)]).expect(version);
        let v = loaded
            .snapshot
            .virtual_services
            .values()
            .next()
            .expect("one");
        assert_eq!(v.id.to_string(), "bookinfo/reviews");
        let rule = &v.http[0];
        assert_eq!(rule.timeout, Some(Duration::from_millis(1500)));
        let retries = rule.retries.as_ref().expect("retries");
        assert_eq!(
            (retries.attempts, retries.per_try_timeout),
            (3, Some(Duration::from_millis(250)))
        );
        assert!(retries.retry_on.server_error && retries.retry_on.connect_failure);
        assert_eq!(retries.retry_on.status_codes, [503]);
        let Some(StringMatch::Regex(p)) = &rule.matches[0].uri else {
            panic!("regex")
        };
        assert!(
            p.regex.is_match("/R/12"),
            "ignoreUriCase applies to the regex"
        );
        let HttpAction::Route(d) = &rule.action else {
            panic!("route")
        };
        assert_eq!(d[0].destination.port, Some(9080));
    }
}

#[test]
fn problems_name_the_field_and_the_value() {
    let cases = [
        ("  hosts: []\n", "field spec.hosts: missing"),
        (
            "  hosts: [a_b]\n",
            "field spec.hosts[0]: \"a_b\" is not a valid DNS name",
        ),
        (
            "  hosts: [r]\n  http:\n  - match:\n    - uri: {regex: \"(\"}\n    route: [{destination: {host: r}}]\n",
            "field spec.http[0].match[0].uri.regex: \"(\" is not a valid regular expression",
        ),
        (
            "  hosts: [r]\n  http:\n  - match:\n    - uri: {exact: /a, prefix: /b}\n    route: [{destination: {host: r}}]\n",
            "field spec.http[0].match[0].uri: set only one of exact, prefix, regex",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    timeout: 10\n",
            "field spec.http[0].timeout: \"10\" is not a duration",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: a}}, {destination: {host: b}, weight: 50}]\n",
            "field spec.http[0].route[0].weight: missing; with several destinations",
        ),
        (
            "  hosts: [r]\n  http:\n  - name: nothing\n",
            "field spec.http[0]: needs one of route, redirect, directResponse",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    delegate: {name: r2}\n",
            "field spec.http[0].delegate: delegate is not supported by nodemesh yet",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    fault: {abort: {httpStatus: 99}}\n",
            "field spec.http[0].fault.abort.httpStatus: 99 is not an HTTP status",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    retries: {attempts: 1, retryOn: \"5xx,sometimes\"}\n",
            "field spec.http[0].retries.retryOn: \"sometimes\" is not a retry condition",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    rewrite: {uri: /a}\n    rewritten: true\n",
            "field spec.http[0].rewritten: unknown field of VirtualService",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    mirror: {host: m}\n    mirrorPercentage: {value: 150}\n",
            "field spec.http[0].mirrorPercentage.value: 150 is not a percentage",
        ),
        (
            "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    corsPolicy: {unmatchedPreflights: DROP}\n",
            "field spec.http[0].corsPolicy.unmatchedPreflights: \"DROP\" is not FORWARD or IGNORE",
        ),
        (
            "  hosts: [r]\n  http:\n  - redirect: {uri: /a, redirectCode: 200}\n",
            "field spec.http[0].redirect.redirectCode: 200 is not a redirect status",
        ),
    ];
    for (spec, needle) in cases {
        let e = err(&[&vs("v1", spec)]);
        has(&e, "r.yaml: document 1 (VirtualService bookinfo/reviews)");
        has(&e, needle);
    }
    let dr_cases = [
        ("  subsets: []\n", "field spec.host: missing"),
        (
            "  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: FASTEST}\n",
            "field spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not one of",
        ),
        (
            "  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v1, labels: {version: v2}}\n",
            "field spec.subsets[1].name: duplicate subset \"v1\"",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    connectionPool: {http: {http2MaxRequests: -1}}\n",
            "field spec.trafficPolicy.connectionPool.http.http2MaxRequests: -1 is not a positive number",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 70000}\n",
            "field spec.trafficPolicy.portLevelSettings[0].port.number: port 70000 is out of range",
        ),
    ];
    for (spec, needle) in dr_cases {
        let e = err(&[&dr(spec)]);
        has(&e, "(DestinationRule bookinfo/reviews)");
        has(&e, needle);
    }
}

#[test]
fn destination_rule_policies_layer_subset_over_rule_and_port_over_both() {
    let spec = "  host: reviews.bookinfo.svc.cluster.local\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    \
                connectionPool: {tcp: {maxConnections: 10}}\n    portLevelSettings:\n    - port: {number: 9080}\n      \
                loadBalancer: {simple: LEAST_REQUEST}\n  subsets:\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n      \
                loadBalancer: {consistentHash: {httpCookie: {name: user}}}\n      outlierDetection: {consecutive5xxErrors: 3}\n";
    let loaded = load(&[&dr(spec)]).expect("loads");
    let d = loaded
        .snapshot
        .destination_rules
        .values()
        .next()
        .expect("one");
    assert_eq!(d.policy(None, 80).load_balancer, LoadBalancer::Random);
    assert_eq!(
        d.policy(None, 9080).load_balancer,
        LoadBalancer::LeastRequest
    );
    let v2 = d.subset("v2");
    let p = d.policy(v2, 9080);
    assert!(matches!(p.load_balancer, LoadBalancer::Hash(_)), "{p:?}");
    assert_eq!(
        p.connection_pool.max_connections,
        Some(10),
        "inherited from the rule"
    );
    let od = p.outlier_detection.expect("subset's");
    assert_eq!(
        (od.consecutive_5xx, od.base_ejection_time),
        (Some(3), Duration::from_secs(30))
    );
}

#[test]
fn a_bad_rule_rejects_the_whole_directory() {
    let good = vs(
        "v1",
        "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n",
    );
    let bad = vs(
        "v1",
        "  hosts: [r]\n  http:\n  - route: [{destination: {host: r}}]\n    timeout: soon\n",
    )
    .replace("name: reviews", "name: other");
    let e = err(&[&good, &bad]);
    has(&e, "(VirtualService bookinfo/other)");
    assert!(load(&[&good]).is_ok());
}
