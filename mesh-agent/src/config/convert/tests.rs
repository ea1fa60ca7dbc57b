//! The shared conversion in Kubernetes mode (local mode is covered through the manifests
//! loader's tests): objects as the API server serves them.
use serde_json::json;

use super::*;

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

fn pod(name: &str, ip: &str, node: &str, extra: serde_json::Value) -> k8s::Pod {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"nodemesh.io/netns": "/proc/1/ns/net"}},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIP": ip, "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]}
    });
    if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in extra {
            v.insert(k.clone(), x.clone());
        }
    }
    from(v)
}

fn service(ports: serde_json::Value, selector: Option<serde_json::Value>) -> k8s::Service {
    let mut spec = json!({"clusterIP": "10.96.0.5", "ports": ports});
    if let Some(s) = selector {
        spec["selector"] = s;
    }
    from(json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}))
}

fn slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
    from(json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
}

fn ep(ip: &str, pod: &str, ready: bool) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": ready}, "nodeName": "node-2",
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
}

fn id(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "shop".into(),
        name: name.into(),
    }
}

#[test]
fn kubernetes_mode_ignores_the_netns_annotation_and_finished_pods() {
    let running = pod("a", "10.244.1.5", "node-1", json!({}));
    let done = pod(
        "old",
        "10.244.1.5",
        "node-1",
        json!({"status": {"podIP": "10.244.1.5", "phase": "Succeeded"}}),
    );
    let inputs = [("a", Input::Pod(&running)), ("old", Input::Pod(&done))];
    let (snap, problems) = build(inputs, Mode::Kubernetes);
    assert!(problems.is_empty(), "{problems:?}");
    let a = &snap.pods[&id("a")];
    assert_eq!(
        a.netns, None,
        "a pod must not choose its own netns in Kubernetes mode"
    );
    assert!(
        !snap.pods.contains_key(&id("old")),
        "finished pods are left out"
    );
    assert_eq!(snap.by_pod_ip[&Ipv4Addr::new(10, 244, 1, 5)], id("a"));
    // Local mode reads the annotation from the same object.
    let (local, _) = build([("a", Input::Pod(&running))], Mode::Local);
    assert_eq!(
        local.pods[&id("a")].netns.as_deref(),
        Some(Path::new("/proc/1/ns/net"))
    );
}

#[test]
fn endpoints_come_from_slices_by_port_name() {
    let svc = service(
        json!([{"name": "http", "port": 80, "targetPort": "http"},
                             {"name": "admin", "port": 9000}]),
        Some(json!({"app": "web"})),
    );
    let s1 = slice(
        "web-1",
        json!([ep("10.244.2.7", "b", true), ep("10.244.2.8", "c", false)]),
    );
    // The same endpoint in a second slice (mid-move) counts once; no targetRef is fine.
    let s2 = slice(
        "web-2",
        json!([ep("10.244.2.7", "b", true), {"addresses": ["10.0.0.9"]}]),
    );
    let other: EndpointSlice = from(json!({
        "metadata": {"name": "x", "namespace": "shop"}, "addressType": "IPv4", "endpoints": []
    }));
    let v6: EndpointSlice = from(json!({
        "metadata": {"name": "v6", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv6", "endpoints": [{"addresses": ["fd00::1"]}]
    }));
    let inputs = [
        ("svc", Input::Service(&svc)),
        ("s1", Input::EndpointSlice(&s1)),
        ("s2", Input::EndpointSlice(&s2)),
        ("other", Input::EndpointSlice(&other)),
        ("v6", Input::EndpointSlice(&v6)),
    ];
    let (snap, problems) = build(inputs, Mode::Kubernetes);
    assert!(problems.is_empty(), "{problems:?}");
    let web = &snap.services[&id("web")];
    let http: Vec<String> = web.endpoints[0]
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(http, ["10.0.0.9:8080", "10.244.2.7:8080"]);
    assert_eq!(web.endpoints[0][1].pod, Some(id("b")));
    assert_eq!(web.endpoints[0][1].node.as_deref(), Some("node-2"));
    assert!(web.endpoints[1].is_empty(), "no slice port named admin");
    // Local mode ignores slices and derives endpoints from the selector.
    let p = pod("b", "10.244.2.7", "node-2", json!({}));
    let (local, _) = build(
        [
            ("svc", Input::Service(&svc)),
            ("s1", Input::EndpointSlice(&s1)),
            ("b", Input::Pod(&p)),
        ],
        Mode::Local,
    );
    let local_eps: Vec<String> = local.services[&id("web")].endpoints[0]
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(local_eps, ["10.244.2.7:8080"]);
}

#[test]
fn invalid_objects_are_skipped_with_their_field_and_the_rest_builds() {
    let bad = service(json!([{"name": "http", "port": 70000}]), None);
    let good: k8s::Service = from(json!({
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.6", "ports": [{"port": 80}]}
    }));
    let bad_slice = slice("web-x", json!([{"addresses": ["not-an-ip"]}]));
    let inputs = [
        ("Service shop/web", Input::Service(&bad)),
        ("Service shop/api", Input::Service(&good)),
        ("EndpointSlice shop/web-x", Input::EndpointSlice(&bad_slice)),
    ];
    let (snap, problems) = build(inputs, Mode::Kubernetes);
    let text: Vec<String> = problems.iter().map(|(o, p)| format!("{o}: {p}")).collect();
    assert_eq!(
        text,
        [
            "Service shop/web: field spec.ports[0].port: port 70000 is out of range 1..65535",
            "EndpointSlice shop/web-x: field endpoints[0].addresses[0]: \"not-an-ip\" is not an IPv4 address",
        ]
    );
    assert_eq!(problems[0].1.field(), Some("spec.ports[0].port"));
    assert!(!snap.services.contains_key(&id("web")));
    assert!(
        snap.services.contains_key(&id("api")),
        "a selector-less Service is fine here"
    );
    // Local mode still wants a selector.
    let (_, local) = build([("api", Input::Service(&good))], Mode::Local);
    assert!(
        local[0].1.to_string().contains("spec.selector"),
        "{}",
        local[0].1
    );
}
