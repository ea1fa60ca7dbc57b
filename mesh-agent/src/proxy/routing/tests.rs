use std::net::{Ipv4Addr, SocketAddrV4};

use hyper::header::{HeaderMap, HeaderValue};

use super::*;
use crate::config::model::{Endpoint, ObjectRef, Pod, Service, ServicePort, Snapshot, TargetPort};

fn id(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn pod(name: &str, version: &str, ip: u8) -> Pod {
    Pod {
        id: id(name),
        labels: [
            ("app".into(), "reviews".into()),
            ("version".into(), version.into()),
        ]
        .into(),
        node: Some("node-1".into()),
        ip: Some(Ipv4Addr::new(10, 244, 1, ip)),
        uid: None,
        host_network: false,
        ready: true,
        service_account: "default".into(),
        netns: None,
        ports: vec![],
    }
}

/// reviews (v1, v2, v3) on port 9080, and a two-port Service `multi`.
fn snapshot(vs: &[&str], dr: &[&str]) -> Snapshot {
    let mut snap = Snapshot::default();
    let pods = [
        pod("reviews-v1", "v1", 1),
        pod("reviews-v2", "v2", 2),
        pod("reviews-v3", "v3", 3),
    ];
    let eps = pods
        .iter()
        .map(|p| Endpoint {
            pod: Some(p.id.clone()),
            addr: SocketAddrV4::new(p.ip.unwrap(), 9080),
            node: p.node.clone(),
        })
        .collect::<Vec<_>>();
    for p in pods {
        snap.pods.insert(p.id.clone(), p);
    }
    let port = |n: u16| ServicePort {
        name: Some("http".into()),
        port: n,
        target_port: TargetPort::Number(9080),
        app_protocol: None,
    };
    snap.services.insert(
        id("reviews"),
        Service {
            id: id("reviews"),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 1)),
            selector: Default::default(),
            ports: vec![port(9080)],
            endpoints: vec![eps.clone()],
        },
    );
    snap.services.insert(
        id("multi"),
        Service {
            id: id("multi"),
            cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 2)),
            selector: Default::default(),
            ports: vec![port(80), port(81)],
            endpoints: vec![eps.clone(), eps],
        },
    );
    let docs: String = vs.iter().chain(dr).map(|d| format!("---\n{d}")).collect();
    let sources = crate::config::manifests::Sources::from_texts([("routing.yaml", docs.as_str())]);
    let loaded = crate::config::manifests::load_sources(&sources).expect("loads");
    snap.virtual_services = loaded.snapshot.virtual_services;
    snap.destination_rules = loaded.snapshot.destination_rules;
    snap
}

fn head<'a>(path: &'a str, headers: &'a HeaderMap, source: Option<&'a Pod>) -> RequestHead<'a> {
    RequestHead {
        method: "GET",
        path,
        query: None,
        authority: Some("reviews:9080"),
        headers,
        port: 9080,
        source,
    }
}

fn router(snap: &Snapshot, svc: &str, port: u16) -> HttpRouter {
    let prev = HashMap::new();
    let mut c = Compiler::new(snap, &prev);
    c.router(&snap.services[&id(svc)], port)
}

const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n\
spec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";

fn target_subset(routed: Routed<'_>) -> Option<String> {
    match routed {
        Routed::Rule(rule) => rule
            .pick()
            .and_then(|t| t.backend.as_ref().ok()?.subset.clone()),
        Routed::Default(_) => Some("default".into()),
        Routed::NoRoute => None,
    }
}

#[test]
fn first_matching_rule_wins_and_no_match_is_no_route() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n\
spec:\n  hosts: [reviews]\n  http:\n  - match:\n    - headers: {end-user: {exact: jason}}\n    route:\n    - destination: {host: reviews, subset: v2}\n  \
- match:\n    - uri: {prefix: /reviews}\n      withoutHeaders: {x-skip: {}}\n    route:\n    - destination: {host: reviews, subset: v1}\n";
    let snap = snapshot(&[vs], &[DR]);
    let r = router(&snap, "reviews", 9080);
    let mut h = HeaderMap::new();
    assert_eq!(
        target_subset(r.route(&head("/reviews/1", &h, None))).as_deref(),
        Some("v1")
    );
    h.insert("end-user", HeaderValue::from_static("jason"));
    assert_eq!(
        target_subset(r.route(&head("/other", &h, None))).as_deref(),
        Some("v2")
    );
    let mut skip = HeaderMap::new();
    skip.insert("x-skip", HeaderValue::from_static("1"));
    assert!(matches!(
        r.route(&head("/reviews/1", &skip, None)),
        Routed::NoRoute
    ));
    assert!(matches!(
        r.route(&head("/other", &HeaderMap::new(), None)),
        Routed::NoRoute
    ));
    // Another Service is not governed by this VirtualService.
    let other = router(&snap, "multi", 80);
    assert!(matches!(
        other.route(&head("/", &HeaderMap::new(), None)),
        Routed::Default(_)
    ));
}

#[test]
fn gateway_bound_rules_do_not_apply_in_the_mesh() {
    let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: gw}\n\
spec:\n  hosts: [reviews]\n  gateways: [bookinfo-gateway]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n";
    let snap = snapshot(&[vs], &[DR]);
    let r = router(&snap, "reviews", 9080);
    assert!(r.virtual_services.is_empty());
    let both = vs.replace("[bookinfo-gateway]", "[bookinfo-gateway, mesh]");
    let snap = snapshot(&[&both], &[DR]);
    assert_eq!(router(&snap, "reviews", 9080).virtual_services.len(), 1);
}

#[test]
fn subsets_select_by_labels_and_weights_split() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n\
spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 75\n    - destination: {host: reviews, subset: v2}\n      weight: 25\n";
    let snap = snapshot(&[vs], &[DR]);
    let r = router(&snap, "reviews", 9080);
    let Routed::Rule(rule) = r.route(&head("/", &HeaderMap::new(), None)) else {
        panic!("rule")
    };
    let mut v1 = 0;
    for _ in 0..4000 {
        let b = rule.pick().unwrap().backend.as_ref().unwrap();
        let ep = b.pick(None, &[]).unwrap();
        let version = &snap.pods[ep.endpoint.pod.as_ref().unwrap()].labels["version"];
        assert_eq!(Some(version), b.subset.as_ref(), "subset endpoints only");
        if version == "v1" {
            v1 += 1;
        }
    }
    assert!((2800..=3200).contains(&v1), "{v1}");
}

#[test]
fn unknown_hosts_subsets_and_ports_are_unroutable() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n\
spec:\n  hosts: [reviews]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: nothere}}]\n  \
- match: [{uri: {prefix: /b}}]\n    route: [{destination: {host: reviews, subset: v9}}]\n  \
- match: [{uri: {prefix: /c}}]\n    route: [{destination: {host: multi}}]\n  \
- match: [{uri: {prefix: /d}}]\n    route: [{destination: {host: multi, port: {number: 81}}}]\n";
    let snap = snapshot(&[vs], &[DR]);
    let r = router(&snap, "reviews", 9080);
    let backend = |p: &str| match r.route(&head(p, &HeaderMap::new(), None)) {
        Routed::Rule(rule) => rule.pick().unwrap().backend.clone().map(|b| b.port),
        _ => panic!("rule"),
    };
    assert_eq!(
        backend("/a"),
        Err(Unroutable::UnknownHost("nothere".into()))
    );
    assert!(matches!(
        backend("/b"),
        Err(Unroutable::UnknownSubset { .. })
    ));
    assert!(matches!(
        backend("/c"),
        Err(Unroutable::UnknownPort { port: None, .. })
    ));
    assert_eq!(backend("/d"), Ok(81));
}

#[test]
fn source_labels_namespace_and_query_matches() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\n\
spec:\n  hosts: [reviews]\n  http:\n  - match:\n    - sourceLabels: {version: v3}\n      sourceNamespace: default\n    route: [{destination: {host: reviews, subset: v2}}]\n  \
- match:\n    - queryParams: {beta: {exact: \"1\"}}\n      method: {exact: GET}\n    route: [{destination: {host: reviews, subset: v1}}]\n";
    let snap = snapshot(&[vs], &[DR]);
    let r = router(&snap, "reviews", 9080);
    let v3 = snap.pods[&id("reviews-v3")].clone();
    let h = HeaderMap::new();
    assert_eq!(
        target_subset(r.route(&head("/", &h, Some(&v3)))).as_deref(),
        Some("v2")
    );
    let mut q = head("/", &h, None);
    q.query = Some("a=2&beta=1");
    assert_eq!(target_subset(r.route(&q)).as_deref(), Some("v1"));
    q.query = Some("beta=2");
    assert!(matches!(r.route(&q), Routed::NoRoute));
}

#[test]
fn load_balancers_and_outlier_ejection() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n\
spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n    \
outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}\n";
    let snap = snapshot(&[], &[dr]);
    let r = router(&snap, "reviews", 9080);
    let b = r.default.backend.as_ref().unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("alice"));
    let key = hash_key(&b.policy, &head("/", &h, None), Ipv4Addr::LOCALHOST);
    assert!(key.is_some());
    let first = b.pick(key, &[]).unwrap().endpoint.addr;
    for _ in 0..20 {
        assert_eq!(
            b.pick(key, &[]).unwrap().endpoint.addr,
            first,
            "same key, same endpoint"
        );
    }
    // Two 5xx in a row eject it; the key moves to another endpoint.
    let state = b.pick(key, &[]).unwrap().state.clone();
    b.observe(&state, Some(503));
    b.observe(&state, Some(200));
    b.observe(&state, Some(503));
    assert_eq!(
        b.pick(key, &[]).unwrap().endpoint.addr,
        first,
        "not consecutive"
    );
    b.observe(&state, Some(503));
    let moved = b.pick(key, &[]).unwrap().endpoint.addr;
    assert_ne!(moved, first, "ejected");
    assert_eq!(b.healthy(), 2);
    // maxEjectionPercent 50 of 3 endpoints: only one may be out.
    let other = b.pick(key, &[]).unwrap().state.clone();
    b.observe(&other, None);
    b.observe(&other, None);
    assert_eq!(b.healthy(), 2);
    // Retries avoid endpoints already tried when they can.
    let rr = router(&snapshot(&[], &[]), "reviews", 9080);
    let rb = rr.default.backend.as_ref().unwrap();
    let a = rb.pick(None, &[]).unwrap().endpoint.addr;
    for _ in 0..6 {
        assert_ne!(rb.pick(None, &[a]).unwrap().endpoint.addr, a);
    }
}
