//! AuthorizationPolicy: decoding, validation, and Istio's decision rules through a loaded
//! snapshot ([`Snapshot::authorize`]).
use std::net::Ipv4Addr;

use super::super::authz::{Connection, Denied, HttpRequest, Stage};
use super::super::model::{ObjectRef, Snapshot};
use super::{ConfigError, LoadedManifests, Sources, load_sources};
use crate::identity::Identity;

/// An AuthorizationPolicy in `ns` with the given spec block (lines indented by 2).
fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}"
    )
}

fn pod(ns: &str, name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, \
         labels: {{app: {name}}}}}\nspec: {{containers: [{{name: c}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

fn load(docs: &[&str]) -> Result<LoadedManifests, ConfigError> {
    load_sources(&Sources::from_texts([("a.yaml", docs.join("---\n"))]))
}

/// Pods `bookinfo/reviews` (10.0.0.2) and `other/db` (10.0.0.3), plus the policies.
fn snap(policies: &[&str]) -> Snapshot {
    let (reviews, db) = (
        pod("bookinfo", "reviews", "10.0.0.2"),
        pod("other", "db", "10.0.0.3"),
    );
    let mut docs = vec![reviews.as_str(), db.as_str()];
    docs.extend_from_slice(policies);
    load(&docs).expect("loads").snapshot
}

fn identity(ns: &str, sa: &str) -> Identity {
    Identity {
        trust_domain: "cluster.local".into(),
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

/// The decision for a connection from `from` (an identity, or plaintext) at `ip` to
/// `ns/pod` on `port`, on a TCP port.
fn check(
    snap: &Snapshot,
    pod: (&str, &str),
    from: Option<&Identity>,
    ip: &str,
    port: u16,
) -> Result<(), Denied> {
    check_at(snap, pod, from, ip, port, Stage::Connection)
}

fn check_at(
    snap: &Snapshot,
    pod: (&str, &str),
    from: Option<&Identity>,
    ip: &str,
    port: u16,
    stage: Stage<'_>,
) -> Result<(), Denied> {
    let pod = &snap.pods[&ObjectRef {
        namespace: pod.0.into(),
        name: pod.1.into(),
    }];
    let conn = Connection {
        source_ip: ip.parse().unwrap(),
        peer: from,
        destination_ip: pod.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        destination_port: port,
    };
    snap.authorize(pod, &conn, stage)
}

/// A request from `from` to `bookinfo/reviews` on 9080.
fn request(
    snap: &Snapshot,
    from: Option<&Identity>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(), Denied> {
    let mut map = hyper::HeaderMap::new();
    for (k, v) in headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap();
        map.append(name, v.parse().unwrap());
    }
    let req = HttpRequest {
        method,
        path,
        host,
        headers: &map,
    };
    check_at(snap, REVIEWS, from, "10.0.1.1", 9080, Stage::Request(&req))
}

const REVIEWS: (&str, &str) = ("bookinfo", "reviews");
const DB: (&str, &str) = ("other", "db");

fn id(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

#[test]
fn without_policies_everything_is_allowed() {
    let s = snap(&[]);
    assert_eq!(check(&s, REVIEWS, None, "10.0.9.9", 9080), Ok(()));
}

#[test]
fn allow_by_principal_denies_everyone_else() {
    let policy = ap(
        "bookinfo",
        "sleep-only",
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
         principals: [cluster.local/ns/sleep/sa/sleep]\n",
    );
    let s = snap(&[&policy]);
    let sleep = identity("sleep", "sleep");
    let other = identity("sleep", "other");
    assert_eq!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080), Ok(()));
    let denied = check(&s, REVIEWS, Some(&other), "10.0.1.1", 9080).unwrap_err();
    assert_eq!(
        denied,
        Denied::NoAllowMatch {
            policies: vec![id("bookinfo", "sleep-only")]
        }
    );
    assert_eq!(
        denied.to_string(),
        "no ALLOW AuthorizationPolicy matched (applying: bookinfo/sleep-only)"
    );
    // Plaintext has no principal.
    assert!(check(&s, REVIEWS, None, "10.0.1.1", 9080).is_err());
    // Another namespace's pod is not in the policy's scope.
    assert_eq!(check(&s, DB, Some(&other), "10.0.1.1", 5432), Ok(()));
}

#[test]
fn allow_without_rules_denies_all_and_an_empty_rule_allows_all() {
    let nothing = ap("bookinfo", "allow-nothing", "  action: ALLOW\n");
    let s = snap(&[&nothing]);
    let sleep = identity("sleep", "sleep");
    assert!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080).is_err());
    let all = ap("bookinfo", "allow-all", "  rules:\n  - {}\n");
    let s = snap(&[&nothing, &all]);
    assert_eq!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080), Ok(()));
}

#[test]
fn deny_wins_and_the_root_namespace_applies_everywhere() {
    let deny = ap(
        "nodemesh-system",
        "deny-legacy",
        "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n",
    );
    let allow = ap("bookinfo", "allow-all", "  rules:\n  - {}\n");
    let s = snap(&[&deny, &allow]);
    let legacy = identity("legacy", "app");
    let sleep = identity("sleep", "sleep");
    for pod in [REVIEWS, DB] {
        assert_eq!(
            check(&s, pod, Some(&legacy), "10.0.1.1", 80),
            Err(Denied::DenyPolicy(id("nodemesh-system", "deny-legacy")))
        );
        assert_eq!(check(&s, pod, Some(&sleep), "10.0.1.1", 80), Ok(()));
    }
}

#[test]
fn not_principals_star_refuses_plaintext_only() {
    // Istio's idiom for "mutual TLS only" as a policy.
    let policy = ap(
        "bookinfo",
        "require-mtls",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [\"*\"]}\n",
    );
    let s = snap(&[&policy]);
    assert!(check(&s, REVIEWS, None, "10.0.1.1", 9080).is_err());
    let sleep = identity("sleep", "sleep");
    assert_eq!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080), Ok(()));
}

#[test]
fn ip_blocks_ports_and_conditions() {
    let policy = ap(
        "bookinfo",
        "lan-9080",
        "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.1.0/24], notIpBlocks: [10.0.1.66]}\n    \
         to:\n    - operation: {ports: [\"9080\"]}\n    when:\n    \
         - {key: source.namespace, notValues: [legacy]}\n",
    );
    let s = snap(&[&policy]);
    let sleep = identity("sleep", "sleep");
    let legacy = identity("legacy", "app");
    assert_eq!(check(&s, REVIEWS, Some(&sleep), "10.0.1.7", 9080), Ok(()));
    assert!(check(&s, REVIEWS, Some(&sleep), "10.0.1.66", 9080).is_err());
    assert!(check(&s, REVIEWS, Some(&sleep), "10.0.2.7", 9080).is_err());
    assert!(check(&s, REVIEWS, Some(&sleep), "10.0.1.7", 9081).is_err());
    assert!(check(&s, REVIEWS, Some(&legacy), "10.0.1.7", 9080).is_err());
    // Plaintext has no namespace: notValues holds, the rest decides.
    assert_eq!(check(&s, REVIEWS, None, "10.0.1.7", 9080), Ok(()));
}

#[test]
fn prefixes_suffixes_and_service_accounts() {
    let policy = ap(
        "bookinfo",
        "p",
        "  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/team-*\"]}\n    \
         - source: {namespaces: [\"*-prod\"]}\n    - source: {serviceAccounts: [ops/admin]}\n",
    );
    let s = snap(&[&policy]);
    let ok = [
        identity("team-a", "x"),
        identity("shop-prod", "x"),
        identity("ops", "admin"),
    ];
    for who in &ok {
        assert_eq!(
            check(&s, REVIEWS, Some(who), "10.0.1.1", 1),
            Ok(()),
            "{who}"
        );
    }
    for who in [identity("ops", "viewer"), identity("prod", "x")] {
        assert!(
            check(&s, REVIEWS, Some(&who), "10.0.1.1", 1).is_err(),
            "{who}"
        );
    }
}

#[test]
fn request_attributes_fail_closed_at_the_connection() {
    // An ALLOW rule that needs the method cannot be proven per connection: it never matches.
    let allow = ap(
        "bookinfo",
        "get-only",
        "  rules:\n  - to:\n    - operation: {methods: [GET]}\n",
    );
    let s = snap(&[&allow]);
    let sleep = identity("sleep", "sleep");
    assert!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080).is_err());
    // A DENY rule with a path applies on its other fields.
    let deny = ap(
        "bookinfo",
        "no-admin",
        "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [sleep]}\n    \
         to:\n    - operation: {paths: [/admin]}\n    when:\n    \
         - {key: \"request.headers[x-debug]\", values: [\"1\"]}\n",
    );
    let s = snap(&[&deny]);
    assert_eq!(
        check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080),
        Err(Denied::DenyPolicy(id("bookinfo", "no-admin")))
    );
    let other = identity("other", "x");
    assert_eq!(check(&s, REVIEWS, Some(&other), "10.0.1.1", 9080), Ok(()));
}

#[test]
fn selectors_and_audit() {
    let for_db = ap(
        "other",
        "db-nothing",
        "  selector: {matchLabels: {app: db}}\n  action: ALLOW\n",
    );
    let for_web = ap(
        "other",
        "web-nothing",
        "  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - {}\n",
    );
    let audit = ap("bookinfo", "audit", "  action: AUDIT\n  rules:\n  - {}\n");
    let s = snap(&[&for_db, &for_web, &audit]);
    let sleep = identity("sleep", "sleep");
    assert_eq!(
        check(&s, DB, Some(&sleep), "10.0.1.1", 5432),
        Err(Denied::NoAllowMatch {
            policies: vec![id("other", "db-nothing")]
        })
    );
    assert_eq!(check(&s, REVIEWS, Some(&sleep), "10.0.1.1", 9080), Ok(()));
}

#[test]
fn invalid_policies_name_their_field() {
    let cases = [
        (
            "  action: CUSTOM\n  provider: {name: ext}\n",
            "spec.action",
            "CUSTOM",
        ),
        (
            "  action: REJECT\n",
            "spec.action",
            "\"REJECT\" is not one of",
        ),
        (
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n",
            "spec.targetRefs",
            "not supported",
        ),
        (
            "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/33]}\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "not an IP address or CIDR block",
        ),
        (
            "  rules:\n  - from:\n    - source: {notIpBlocks: [nope]}\n",
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "\"nope\"",
        ),
        (
            "  rules:\n  - to:\n    - operation: {ports: [\"0\"]}\n",
            "spec.rules[0].to[0].operation.ports[0]",
            "not a port number",
        ),
        (
            "  rules:\n  - when:\n    - {key: connection.sni, values: [a]}\n",
            "spec.rules[0].when[0].key",
            "\"connection.sni\" is not a supported key",
        ),
        (
            "  rules:\n  - to:\n    - operation: {paths: [\"/a/{*}/b\"]}\n",
            "spec.rules[0].to[0].operation.paths[0]",
            "path templates",
        ),
        (
            "  rules:\n  - when:\n    - {key: \"request.headers[a b]\", values: [x]}\n",
            "spec.rules[0].when[0].key",
            "not a header name",
        ),
        (
            "  rules:\n  - when:\n    - {key: source.ip}\n",
            "spec.rules[0].when[0].values",
            "one of values or notValues",
        ),
        (
            "  rules:\n  - from:\n    - source: {serviceAccounts: [admin]}\n",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "NAMESPACE/SERVICE_ACCOUNT",
        ),
        (
            "  rules:\n  - from:\n    - source: {principals: [\"\"]}\n",
            "spec.rules[0].from[0].source.principals[0]",
            "empty value",
        ),
        (
            "  rules:\n  - from:\n    - {}\n",
            "spec.rules[0].from[0].source",
            "missing",
        ),
        (
            "  rules:\n  - from:\n    - source: {principal: [a]}\n",
            "principal",
            "unknown field",
        ),
    ];
    for (spec, field, reason) in cases {
        let doc = ap("bookinfo", "bad", spec);
        let text = load(&[&doc]).map(|_| ()).expect_err(spec).to_string();
        assert!(text.contains(field), "{field:?} not in:\n{text}");
        assert!(text.contains(reason), "{reason:?} not in:\n{text}");
    }
}

#[test]
fn requests_are_checked_with_their_method_path_host_and_headers() {
    let allow = ap(
        "bookinfo",
        "read-only",
        "  rules:\n  - to:\n    - operation:\n        methods: [GET, HEAD]\n        \
         paths: [\"/api/*\", /health]\n        notPaths: [/api/admin]\n        \
         hosts: [\"reviews*\"]\n    when:\n    \
         - {key: \"request.headers[X-Team]\", values: [blue, \"green*\"]}\n",
    );
    let s = snap(&[&allow]);
    let sleep = identity("sleep", "sleep");
    let team = [("x-team", "blue")];
    let me = Some(&sleep);
    assert_eq!(
        request(&s, me, "GET", "reviews:9080", "/api/v1", &team),
        Ok(())
    );
    assert_eq!(
        request(
            &s,
            me,
            "HEAD",
            "REVIEWS",
            "/health",
            &[("x-team", "greenish")]
        ),
        Ok(())
    );
    for (method, host, path, headers) in [
        ("POST", "reviews:9080", "/api/v1", &team[..]),
        ("GET", "reviews:9080", "/api/admin", &team[..]),
        ("GET", "reviews:9080", "/other", &team[..]),
        ("GET", "ratings:9080", "/api/v1", &team[..]),
        ("GET", "reviews:9080", "/api/v1", &[("x-team", "red")][..]),
        ("GET", "reviews:9080", "/api/v1", &[][..]),
    ] {
        let r = request(&s, me, method, host, path, headers);
        assert!(r.is_err(), "{method} {host}{path} {headers:?} got in");
    }
    // The connection itself may carry allowed requests: it is let through on an HTTP port,
    // and refused on a TCP port (the rule can never be proven there).
    let http = Stage::HttpConnection;
    assert_eq!(check_at(&s, REVIEWS, me, "10.0.1.1", 9080, http), Ok(()));
    assert!(check(&s, REVIEWS, me, "10.0.1.1", 9080).is_err());
}

#[test]
fn request_deny_rules_wait_for_the_request_on_http_ports() {
    let deny = ap(
        "bookinfo",
        "no-delete",
        "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [DELETE]}\n",
    );
    let s = snap(&[&deny]);
    let sleep = identity("sleep", "sleep");
    let me = Some(&sleep);
    let http = Stage::HttpConnection;
    assert_eq!(check_at(&s, REVIEWS, me, "10.0.1.1", 9080, http), Ok(()));
    assert_eq!(request(&s, me, "GET", "reviews", "/", &[]), Ok(()));
    assert_eq!(
        request(&s, me, "DELETE", "reviews", "/", &[]),
        Err(Denied::DenyPolicy(id("bookinfo", "no-delete")))
    );
    // On a TCP port the DELETE cannot be seen: the rule applies to the whole connection.
    assert!(check(&s, REVIEWS, me, "10.0.1.1", 9080).is_err());
}

#[test]
fn without_a_token_request_principals_never_match() {
    // No RequestAuthentication here: as in Istio for a request without a JWT.
    let allow = ap(
        "bookinfo",
        "jwt",
        "  rules:\n  - from:\n    - source: {requestPrincipals: [\"*\"]}\n",
    );
    let deny = ap(
        "bookinfo",
        "need-jwt",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notRequestPrincipals: [\"*\"]}\n",
    );
    let sleep = identity("sleep", "sleep");
    let me = Some(&sleep);
    let s = snap(&[&allow]);
    assert!(request(&s, me, "GET", "reviews", "/", &[]).is_err());
    let s = snap(&[&deny]);
    assert_eq!(
        request(&s, me, "GET", "reviews", "/", &[]),
        Err(Denied::DenyPolicy(id("bookinfo", "need-jwt")))
    );
}
