//! How a TokenReview's answer is read: every refusal with its reason, the node from the
//! token or from its bound pod, and the cache.

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use serde_json::json;

use super::*;

const AGENT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

fn expect() -> Expect {
    Expect {
        audience: DEFAULT_AUDIENCE.into(),
        agent: ServiceAccountUser::parse(DEFAULT_AGENT_ACCOUNT).unwrap(),
    }
}

fn status(v: serde_json::Value) -> TokenReviewStatus {
    serde_json::from_value(v).unwrap()
}

fn agent_status(extra: serde_json::Value) -> TokenReviewStatus {
    status(json!({
        "authenticated": true,
        "audiences": ["nodemesh-ca"],
        "user": {"username": AGENT, "uid": "u1", "groups": ["system:serviceaccounts"], "extra": extra},
    }))
}

#[test]
fn service_account_usernames_parse() {
    let sa = ServiceAccountUser::parse(AGENT).unwrap();
    assert_eq!(
        (sa.namespace.as_str(), sa.name.as_str()),
        ("nodemesh-system", "nodemesh-agent")
    );
    assert_eq!(sa.username(), AGENT);
    for bad in [
        "nodemesh-agent",
        "system:serviceaccount:ns",
        "system:serviceaccount::x",
        "system:serviceaccount:a:b:c",
        "system:node:n1",
    ] {
        assert!(ServiceAccountUser::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_node_comes_from_the_token() {
    let s = agent_status(json!({
        NODE_NAME_KEY: ["node-1"], POD_NAME_KEY: ["nodemesh-agent-x"], POD_UID_KEY: ["uid-1"],
    }));
    assert_eq!(
        interpret(Some(&s), &expect()),
        Ok(Caller::Node("node-1".into()))
    );
}

#[test]
fn without_a_node_the_bound_pod_is_read() {
    let s = agent_status(json!({POD_NAME_KEY: ["nodemesh-agent-x"], POD_UID_KEY: ["uid-1"]}));
    assert_eq!(
        interpret(Some(&s), &expect()),
        Ok(Caller::Pod {
            namespace: "nodemesh-system".into(),
            name: "nodemesh-agent-x".into(),
            uid: "uid-1".into()
        })
    );
    // An empty node name counts as none.
    let s = agent_status(json!({NODE_NAME_KEY: [""], POD_NAME_KEY: ["p"], POD_UID_KEY: ["u"]}));
    assert!(matches!(
        interpret(Some(&s), &expect()),
        Ok(Caller::Pod { .. })
    ));
    let s = agent_status(json!({POD_NAME_KEY: ["p"]}));
    let e = interpret(Some(&s), &expect()).unwrap_err();
    assert!(
        e.to_string()
            .contains("has no authentication.kubernetes.io/pod-uid"),
        "{e}"
    );
}

#[test]
fn a_token_bound_to_nothing_is_refused() {
    for extra in [json!({}), json!(null)] {
        let e = interpret(Some(&agent_status(extra)), &expect()).unwrap_err();
        assert_eq!(e, AuthError::NotBound);
        assert!(
            e.to_string()
                .contains("not a pod-bound projected service-account token")
        );
        assert_eq!(e.status(), 401);
    }
}

#[test]
fn unauthenticated_tokens_are_refused_with_the_servers_reason() {
    let s = status(json!({"authenticated": false, "error": "token has expired"}));
    let e = interpret(Some(&s), &expect()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the token is not authenticated by the Kubernetes API server: token has expired"
    );
    let s = status(json!({"user": {"username": AGENT}, "audiences": ["nodemesh-ca"]}));
    let e = interpret(Some(&s), &expect()).unwrap_err();
    assert!(e.to_string().ends_with("no reason given"), "{e}");
    let e = interpret(None, &expect()).unwrap_err();
    assert!(e.to_string().contains("without a status"), "{e}");
}

#[test]
fn another_audience_is_refused() {
    let mut s = agent_status(json!({NODE_NAME_KEY: ["node-1"]}));
    s.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
    let e = interpret(Some(&s), &expect()).unwrap_err();
    assert_eq!(
        e,
        AuthError::WrongAudience {
            want: "nodemesh-ca".into(),
            got: vec!["https://kubernetes.default.svc".into()]
        }
    );
    assert!(
        e.to_string().contains("not for audience \"nodemesh-ca\""),
        "{e}"
    );
    // An API server that does not report audiences is not audience-aware: refused too.
    s.audiences = None;
    assert!(matches!(
        interpret(Some(&s), &expect()),
        Err(AuthError::WrongAudience { .. })
    ));
}

#[test]
fn another_service_account_is_refused() {
    let mut s = agent_status(json!({NODE_NAME_KEY: ["node-1"]}));
    for user in [
        "system:serviceaccount:default:default",
        "system:serviceaccount:nodemesh-system:nodemesh-ca",
        "system:node:node-1",
        "",
    ] {
        s.user.as_mut().unwrap().username = Some(user.into());
        let e = interpret(Some(&s), &expect()).unwrap_err();
        assert!(
            matches!(e, AuthError::WrongServiceAccount { .. }),
            "{user}: {e}"
        );
        assert!(
            e.to_string().contains(&format!(
                "belongs to {user:?}, not to the agent's service account \"{AGENT}\""
            )),
            "{e}"
        );
    }
    // The account is configurable.
    let mut other = expect();
    other.agent = ServiceAccountUser::parse("system:serviceaccount:mesh:agent").unwrap();
    s.user.as_mut().unwrap().username = Some("system:serviceaccount:mesh:agent".into());
    assert_eq!(
        interpret(Some(&s), &other),
        Ok(Caller::Node("node-1".into()))
    );
}

fn agent_pod(uid: &str, node: Option<&str>) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "nodemesh-agent-x", "namespace": "nodemesh-system", "uid": uid},
        "spec": {"containers": [], "nodeName": node},
    }))
    .unwrap()
}

#[test]
fn the_bound_pod_must_be_the_tokens() {
    let name = "nodemesh-agent-x";
    assert_eq!(
        node_of_bound_pod(Some(&agent_pod("u1", Some("node-3"))), name, "u1"),
        Ok("node-3".into())
    );
    let e = node_of_bound_pod(Some(&agent_pod("u2", Some("node-3"))), name, "u1").unwrap_err();
    assert!(e.contains("differs from the token's \"u1\""), "{e}");
    let e = node_of_bound_pod(Some(&agent_pod("u1", None)), name, "u1").unwrap_err();
    assert_eq!(e, "not scheduled on a node");
    assert!(
        node_of_bound_pod(None, name, "u1")
            .unwrap_err()
            .contains("not found")
    );
}

#[test]
fn api_failures_are_503() {
    let e = AuthError::Unavailable {
        reason: "TokenReview: connection refused".into(),
    };
    assert_eq!(e.status(), 503);
    assert_eq!(AuthError::Unknown.status(), 401);
}

#[test]
fn the_cache_forgets_after_its_ttl_and_stays_bounded() {
    let mut c = Cache::default();
    let now = Instant::now();
    c.put(digest("a"), "node-1".into(), now);
    assert_eq!(
        c.get(&digest("a"), now + CACHE_TTL / 2),
        Some("node-1".into())
    );
    assert_eq!(c.get(&digest("b"), now), None);
    assert_eq!(c.get(&digest("a"), now + CACHE_TTL), None);
    assert!(
        c.entries.is_empty(),
        "an expired entry is dropped when seen"
    );
    for i in 0..CACHE_ENTRIES + 10 {
        let at = now + Duration::from_millis(i as u64);
        c.put(digest(&i.to_string()), format!("node-{i}"), at);
    }
    assert_eq!(c.entries.len(), CACHE_ENTRIES);
    // The oldest went first; the newest are there.
    assert_eq!(c.get(&digest("0"), now), None);
    let last = CACHE_ENTRIES + 9;
    assert_eq!(
        c.get(&digest(&last.to_string()), now),
        Some(format!("node-{last}"))
    );
}
