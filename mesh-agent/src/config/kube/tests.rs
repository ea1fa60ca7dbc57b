//! The Kubernetes source, unchanged, against the fake API server (no root needed): the
//! watchers' protocol, the shared conversion and the published snapshots and status.
use std::future::Future;
use std::time::Duration;

use mesh_testbed::fake_kube::FakeApiServer;
use serde_json::{Value, json};

use super::*;
use crate::config::model::{MtlsMode, ObjectRef};

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(15);

struct Source {
    server: FakeApiServer,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<ConfigStatus>,
    _dir: TempDir,
}

pub(super) struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client from a kubeconfig file, as `Config::infer` builds it from KUBECONFIG (tests run
/// in parallel, so not through the environment).
pub(super) async fn client_for(server: &FakeApiServer, tag: &str) -> (Client, TempDir) {
    let dir = std::env::temp_dir().join(format!("nodemesh-kube-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).expect("kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("read kubeconfig");
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .expect("config");
    (Client::try_from(config).expect("client"), TempDir(dir))
}

async fn start(server: FakeApiServer, tag: &str) -> Source {
    let (client, dir) = client_for(&server, tag).await;
    let (tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let status = spawn(client, NODE.into(), tx);
    Source {
        server,
        snapshots,
        status,
        _dir: dir,
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

impl Source {
    /// Waits for a snapshot satisfying `f`.
    async fn snapshot(&mut self, what: &str, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let snap = within(what, self.snapshots.wait_for(|s| f(s))).await;
        snap.expect("source alive").clone()
    }

    async fn status(&mut self, what: &str, f: impl Fn(&ConfigStatus) -> bool) -> ConfigStatus {
        let st = within(what, self.status.wait_for(|s| f(s))).await;
        st.expect("source alive").clone()
    }

    fn apply(&self, obj: Value) {
        self.server.apply(obj).expect("apply");
    }
}

fn resource<'a>(st: &'a ConfigStatus, kind: &str) -> &'a ResourceStatus {
    st.resources
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} in {st:?}"))
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled {
        json!({"nodemesh.io/enabled": "true"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name},
                        "annotations": {"nodemesh.io/netns": "/proc/1/ns/net"},
                        "managedFields": [{"manager": "kubectl"}]},
           "spec": {"nodeName": node, "serviceAccountName": format!("{name}-sa"),
                    "containers": [{"name": "app", "image": "app",
                                    "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip,
                      "conditions": [{"type": "Ready", "status": "True"},
                                     {"type": "PodScheduled", "status": "True"}]}})
}

fn service(ns: &str, name: &str, ip: &str, port: i64) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": ip, "selector": {"app": name},
                    "ports": [{"name": "http", "port": port, "targetPort": "http"}]}})
}

fn slice(ns: &str, service: &str, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

fn peer_auth(version: &str, ns: &str, mode: &str) -> Value {
    json!({"apiVersion": format!("security.istio.io/{version}"), "kind": "PeerAuthentication",
           "metadata": {"name": "default", "namespace": ns}, "spec": {"mtls": {"mode": mode}}})
}

fn id(ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn meshed_here(s: &Snapshot) -> Vec<String> {
    s.enrolled_pods(NODE).map(|p| p.id.to_string()).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn first_sync_gates_the_snapshot_then_changes_follow() {
    let server = FakeApiServer::start().expect("fake API server");
    server.apply(namespace("shop", true)).expect("ns");
    server.apply(namespace("plain", false)).expect("ns");
    server
        .apply(pod("shop", "web", NODE, "10.244.1.5"))
        .expect("pod");
    server
        .apply(pod("plain", "db", NODE, "10.244.1.6"))
        .expect("pod");
    server
        .apply(pod("shop", "far", "node-2", "10.244.2.5"))
        .expect("pod");
    server
        .apply(service("shop", "web", "10.96.0.10", 80))
        .expect("svc");
    server
        .apply(slice("shop", "web", &["10.244.1.5"]))
        .expect("slice");
    server.apply(peer_auth("v1", "shop", "STRICT")).expect("pa");
    server.hold("list:services");
    let mut src = start(server, "sync").await;

    // Everything but Services listed: nothing published, not synced, Service named.
    let st = src
        .status("the other kinds to sync", |s| {
            s.resources.iter().filter(|r| r.synced).count() == super::watchers::KINDS.len() - 1
        })
        .await;
    assert!(!st.synced && !resource(&st, "Service").synced, "{st:?}");
    assert_eq!(src.snapshots.borrow().generation, 0);
    src.server.release("list:services");
    let snap = src
        .snapshot("the first snapshot", |s| s.generation == 1)
        .await;
    assert!(src.status.borrow().synced);
    assert_eq!(meshed_here(&snap), ["shop/web"]);
    let web = &snap.pods[&id("shop", "web")];
    assert_eq!(
        web.netns, None,
        "the netns annotation is not trusted in Kubernetes mode"
    );
    let far = &snap.pods[&id("shop", "far")];
    assert_eq!(
        (far.service_account.as_str(), far.node.as_deref()),
        ("far-sa", Some("node-2"))
    );
    assert!(
        far.ready && snap.is_meshed(far),
        "remote pods keep what the model reads"
    );
    let svc = &snap.services[&id("shop", "web")];
    assert_eq!(svc.endpoints[0][0].addr.to_string(), "10.244.1.5:8080");
    assert_eq!(snap.inbound_mode(web, 8080), MtlsMode::Strict);

    // Relabelling a namespace, editing a PeerAuthentication, scaling the endpoints.
    src.apply(namespace("plain", true));
    src.apply(peer_auth("v1", "shop", "PERMISSIVE"));
    src.apply(slice("shop", "web", &["10.244.1.5", "10.244.2.5"]));
    let snap = src
        .snapshot("the edits", |s| {
            let web = s.pods.get(&id("shop", "web"));
            meshed_here(s).len() == 2
                && web.is_some_and(|w| s.inbound_mode(w, 8080) == MtlsMode::Permissive)
                && s.services[&id("shop", "web")].endpoints[0].len() == 2
        })
        .await;
    assert_eq!(meshed_here(&snap), ["plain/db", "shop/web"]);
    // Deleting the pod on this node unmeshes it.
    assert!(src.server.delete("v1", "Pod", "plain", "db"));
    src.snapshot("the deletion", |s| meshed_here(s) == ["shop/web"])
        .await;

    let requests = src.server.requests();
    let has = |needle: &str| requests.iter().any(|r| r.contains(needle));
    assert!(
        has("/api/v1/pods?") && has("fieldSelector=spec.nodeName=node-1"),
        "{requests:#?}"
    );
    assert!(
        has("labelSelector=kubernetes.io/service-name"),
        "{requests:#?}"
    );
    assert!(has("allowWatchBookmarks=true"), "{requests:#?}");
    assert!(
        has("/apis/security.istio.io/v1/peerauthentications"),
        "{requests:#?}"
    );
    let st = src.status.borrow().clone();
    assert_eq!(
        resource(&st, "PeerAuthentication").api_version.as_deref(),
        Some("security.istio.io/v1")
    );
    assert!(
        st.resources.iter().all(|r| r.last_error.is_none()),
        "{st:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_watches_and_410_gone_lose_no_event() {
    let server = FakeApiServer::start().expect("fake API server");
    server.apply(namespace("shop", true)).expect("ns");
    server
        .apply(service("shop", "web", "10.96.0.10", 80))
        .expect("svc");
    let mut src = start(server, "resume").await;
    src.snapshot("the first snapshot", |s| s.generation >= 1)
        .await;

    // A bookmark moves the watches' resourceVersion past changes they did not carry.
    src.apply(namespace("other", false));
    src.snapshot("the namespace", |s| s.namespaces.contains_key("other"))
        .await;
    let bookmark = src.server.resource_version();
    assert!(
        src.server.bookmark() >= 5,
        "every watch asked for bookmarks"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Cut every watch; while none is open, change things: the resumed watches replay them.
    src.server.hold("watch:*");
    assert!(src.server.drop_watches() >= 5);
    src.apply(pod("shop", "web", NODE, "10.244.1.5"));
    src.apply(service("shop", "api", "10.96.0.11", 81));
    src.server.release("watch:*");
    src.snapshot("the changes made while disconnected", |s| {
        meshed_here(s) == ["shop/web"] && s.services.contains_key(&id("shop", "api"))
    })
    .await;
    let requests = src.server.requests();
    let resumed = format!(
        "/api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={bookmark}"
    );
    let resumed_from_bookmark = requests.iter().any(|r| {
        r.contains("/api/v1/services?")
            && r.contains("watch=true")
            && r.contains(&format!("resourceVersion={bookmark}"))
    });
    assert!(
        resumed_from_bookmark,
        "expected a watch like {resumed} in {requests:#?}"
    );

    // 410 Gone: the history is compacted, the watchers must list again.
    let lists_before = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch="))
        .count();
    assert!(src.server.expire_watches() >= 5);
    assert!(src.server.delete("v1", "Service", "shop", "api"));
    src.apply(namespace("shop", false));
    src.snapshot("the changes after 410 Gone", |s| {
        meshed_here(s).is_empty() && !s.services.contains_key(&id("shop", "api"))
    })
    .await;
    let requests = src.server.requests();
    let lists_after = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch="))
        .count();
    assert!(
        lists_after > lists_before,
        "a relist after 410: {requests:#?}"
    );
    let st = src.status.borrow().clone();
    assert!(
        st.resources.iter().all(|r| r.errors_total == 0),
        "410 is routine, not an error: {st:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_objects_are_skipped_and_others_apply() {
    let server = FakeApiServer::start().expect("fake API server");
    server
        .apply(service("shop", "bad", "10.96.0.12", 70000))
        .expect("svc");
    server
        .apply(service("shop", "good", "10.96.0.13", 80))
        .expect("svc");
    let mut src = start(server, "invalid").await;
    let snap = src
        .snapshot("the first snapshot", |s| s.generation >= 1)
        .await;
    assert!(snap.services.contains_key(&id("shop", "good")));
    assert!(!snap.services.contains_key(&id("shop", "bad")));
    let st = src
        .status("the invalid Service in the status", |s| s.synced)
        .await;
    let svc = resource(&st, "Service");
    assert_eq!((svc.objects, svc.invalid), (2, 1), "{svc:?}");
    let error = svc.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("Service shop/bad: field spec.ports[0].port: port 70000 is out of range"),
        "{error}"
    );
    assert!(svc.last_error_at.is_some());
    // Fixed: it applies, and is no longer counted.
    src.apply(service("shop", "bad", "10.96.0.12", 8080));
    src.snapshot("the fixed Service", |s| {
        s.services.contains_key(&id("shop", "bad"))
    })
    .await;
    let st = src
        .status("no invalid objects", |s| {
            resource(s, "Service").invalid == 0
        })
        .await;
    assert_eq!(resource(&st, "Service").errors_total, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn peer_authentication_version_fallback_and_errors_per_kind() {
    let server = FakeApiServer::start().expect("fake API server");
    server.serve_versions("security.istio.io", "PeerAuthentication", &["v1beta1"]);
    server
        .apply(peer_auth("v1beta1", "nodemesh-system", "STRICT"))
        .expect("pa");
    server.fail("endpointslices", Some(500));
    let mut src = start(server, "fallback").await;
    let st = src
        .status("the EndpointSlice error", |s| {
            resource(s, "EndpointSlice").last_error.is_some()
        })
        .await;
    assert!(!st.synced);
    let error = resource(&st, "EndpointSlice")
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("500") || error.contains("failing on purpose"),
        "{error}"
    );
    src.server.fail("endpointslices", None);
    let snap = src
        .snapshot("the first snapshot", |s| s.generation >= 1)
        .await;
    assert_eq!(snap.peer_authentications.len(), 1);
    let st = src.status.borrow().clone();
    let pa = resource(&st, "PeerAuthentication");
    assert_eq!(pa.api_version.as_deref(), Some("security.istio.io/v1beta1"));
    assert!(resource(&st, "EndpointSlice").synced);

    // Without Istio's CRDs the kind is synced, empty, and says why.
    let server = FakeApiServer::start().expect("fake API server");
    server.serve_versions("security.istio.io", "PeerAuthentication", &[]);
    let mut src = start(server, "no-istio").await;
    let st = src.status("synced without Istio", |s| s.synced).await;
    let pa = resource(&st, "PeerAuthentication");
    assert!(
        pa.synced && pa.note.is_some() && pa.api_version.is_none(),
        "{pa:?}"
    );
}

fn mesh_config(ns: &str, name: &str, mesh: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
           "data": {"mesh": mesh}})
}

#[tokio::test(flavor = "current_thread")]
async fn mesh_config_comes_from_the_istio_config_map_of_the_root_namespace() {
    let server = FakeApiServer::start().expect("fake API server");
    // Only `istio` in nodemesh-system is MeshConfig; the watch does not even see the others.
    server
        .apply(mesh_config(
            "default",
            "istio",
            "accessLogFile: /dev/stderr\n",
        ))
        .expect("cm");
    server
        .apply(mesh_config(
            "nodemesh-system",
            "other",
            "accessLogFile: /dev/stderr\n",
        ))
        .expect("cm");
    let mut src = start(server, "mesh").await;
    let snap = src
        .snapshot("the first snapshot", |s| s.generation >= 1)
        .await;
    assert!(snap.mesh.access_log.is_none() && snap.mesh.source.is_none());
    let st = src.status.borrow().clone();
    let cm = resource(&st, "ConfigMap");
    assert_eq!(
        (cm.objects, cm.selector.as_deref()),
        (0, Some("metadata.name=istio"))
    );

    // The demo profile's MeshConfig turns access logs on, at runtime.
    src.apply(mesh_config(
        "nodemesh-system",
        "istio",
        "accessLogFile: /dev/stdout\n",
    ));
    let snap = src
        .snapshot("access logs on", |s| s.mesh.access_log.is_some())
        .await;
    let log = snap.mesh.access_log.as_ref().expect("on");
    assert_eq!(log.file, "/dev/stdout");
    assert_eq!(
        snap.mesh.source.as_deref(),
        Some("ConfigMap nodemesh-system/istio data.mesh")
    );

    // A typo is skipped and named; the last valid MeshConfig is not kept (the object is
    // skipped as a whole, as any invalid object), and the rest still applies.
    src.apply(mesh_config(
        "nodemesh-system",
        "istio",
        "accesLogFile: /dev/stdout\n",
    ));
    let st = src
        .status("the invalid MeshConfig", |s| {
            resource(s, "ConfigMap").invalid == 1
        })
        .await;
    let error = resource(&st, "ConfigMap")
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("ConfigMap nodemesh-system/istio") && error.contains("accesLogFile"),
        "{error}"
    );
    src.snapshot("access logs off again", |s| s.mesh.access_log.is_none())
        .await;
}

fn virtual_service(version: &str, subset: &str, regex: &str) -> Value {
    json!({"apiVersion": format!("networking.istio.io/{version}"), "kind": "VirtualService",
           "metadata": {"name": "reviews", "namespace": "shop"},
           "spec": {"hosts": ["reviews"], "http": [
               {"match": [{"uri": {"regex": regex}}],
                "route": [{"destination": {"host": "reviews", "subset": subset}}]}]}})
}

#[tokio::test(flavor = "current_thread")]
async fn routing_rules_are_watched_and_an_edit_changes_routing() {
    use crate::config::routing::HttpAction;
    let server = FakeApiServer::start().expect("fake API server");
    // VirtualService only as v1beta1 (an older Istio), DestinationRule as v1.
    server.serve_versions("networking.istio.io", "VirtualService", &["v1beta1"]);
    server.apply(namespace("shop", true)).expect("ns");
    server
        .apply(service("shop", "reviews", "10.96.0.20", 9080))
        .expect("svc");
    server
        .apply(
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                      "metadata": {"name": "reviews", "namespace": "shop"},
                      "spec": {"host": "reviews", "subsets": [
                          {"name": "v1", "labels": {"version": "v1"}},
                          {"name": "v2", "labels": {"version": "v2"}}]}}),
        )
        .expect("dr");
    server
        .apply(virtual_service("v1beta1", "v1", "/r/.*"))
        .expect("vs");
    let subset = |s: &Snapshot| {
        let vs = s.virtual_services.get(&id("shop", "reviews"))?;
        match &vs.http.first()?.action {
            HttpAction::Route(d) => d.first()?.destination.subset.clone(),
            _ => None,
        }
    };
    let mut src = start(server, "routing").await;
    let snap = src
        .snapshot("the VirtualService", |s| subset(s).as_deref() == Some("v1"))
        .await;
    assert_eq!(
        snap.destination_rules[&id("shop", "reviews")].subsets.len(),
        2
    );
    let st = src.status.borrow().clone();
    assert_eq!(
        resource(&st, "VirtualService").api_version.as_deref(),
        Some("networking.istio.io/v1beta1")
    );

    // An edit reaches the snapshot.
    src.apply(virtual_service("v1beta1", "v2", "/r/.*"));
    src.snapshot("the edited route", |s| subset(s).as_deref() == Some("v2"))
        .await;

    // An invalid edit (a regex that does not compile) is skipped and named; the rest applies.
    src.apply(virtual_service("v1beta1", "v1", "(unclosed"));
    let st = src
        .status("the invalid VirtualService", |s| {
            resource(s, "VirtualService").invalid == 1
        })
        .await;
    let error = resource(&st, "VirtualService")
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("shop/reviews") && error.contains("regular expression"),
        "{error}"
    );
    let snap = src.snapshots.borrow().clone();
    assert!(
        snap.virtual_services.is_empty(),
        "the invalid rule is not half-applied"
    );
    assert_eq!(snap.destination_rules.len(), 1);
}

fn authorization_policy(action: &str, namespaces: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": action,
                    "rules": [{"from": [{"source": {"namespaces": namespaces}}]}]}})
}

#[tokio::test(flavor = "current_thread")]
async fn authorization_policies_are_watched_enforced_and_invalid_ones_named() {
    use crate::config::authz::{Connection, Denied, Stage};
    use crate::identity::Identity;
    let server = FakeApiServer::start().expect("fake API server");
    // Served only as v1beta1 (an older Istio): discovery picks it.
    server.serve_versions("security.istio.io", "AuthorizationPolicy", &["v1beta1"]);
    server.apply(namespace("shop", true)).expect("ns");
    server
        .apply(pod("shop", "web", NODE, "10.244.1.5"))
        .expect("pod");
    server
        .apply(authorization_policy("ALLOW", json!(["front"])))
        .expect("ap");
    let decide = |s: &Snapshot, from_ns: &str| {
        let pod = s.pods.get(&id("shop", "web"))?;
        let peer = Identity {
            trust_domain: "cluster.local".into(),
            namespace: from_ns.into(),
            service_account: "default".into(),
        };
        let conn = Connection {
            source_ip: "10.244.2.9".parse().ok()?,
            peer: Some(&peer),
            destination_ip: "10.244.1.5".parse().ok()?,
            destination_port: 80,
        };
        Some(s.authorize(pod, &conn, Stage::Connection))
    };
    let mut src = start(server, "authz").await;
    let snap = src
        .snapshot("the ALLOW policy", |s| {
            decide(s, "other").is_some_and(|d| d.is_err())
        })
        .await;
    assert_eq!(decide(&snap, "front"), Some(Ok(())));
    let st = src.status.borrow().clone();
    assert_eq!(
        resource(&st, "AuthorizationPolicy").api_version.as_deref(),
        Some("security.istio.io/v1beta1")
    );

    // An edit to DENY applies: `front` is now the one refused.
    src.apply(authorization_policy("DENY", json!(["front"])));
    let snap = src
        .snapshot("the DENY policy", |s| {
            decide(s, "front").is_some_and(|d| d.is_err())
        })
        .await;
    assert_eq!(
        decide(&snap, "front"),
        Some(Err(Denied::DenyPolicy(id("shop", "web"))))
    );
    assert_eq!(decide(&snap, "other"), Some(Ok(())));

    // An invalid edit is named, not half-applied, and fails closed: the policy's namespace is
    // refused to everyone until it is fixed.
    src.apply(authorization_policy("CUSTOM", json!(["front"])));
    let st = src
        .status("the invalid AuthorizationPolicy", |s| {
            resource(s, "AuthorizationPolicy").invalid == 1
        })
        .await;
    let error = resource(&st, "AuthorizationPolicy")
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("shop/web") && error.contains("spec.action") && error.contains("CUSTOM"),
        "{error}"
    );
    let snap = src.snapshots.borrow().clone();
    assert!(snap.authorization_policies.is_empty(), "{snap:?}");
    assert_eq!(snap.pods.len(), 1);
    for from in ["front", "other"] {
        assert_eq!(
            decide(&snap, from),
            Some(Err(Denied::InvalidPolicy(id("shop", "web"))))
        );
    }
    // Fixed: enforced as written again.
    src.apply(authorization_policy("DENY", json!(["front"])));
    src.snapshot("the fixed policy", |s| decide(s, "other") == Some(Ok(())))
        .await;
}

/// The guide's Gateway (`default/bookinfo-gateway`, credential `bookinfo-tls-cert`), its
/// workload (a pod labelled `istio: ingressgateway` in `istio-system`), the Secret it names and
/// one it does not.
pub(super) fn gateway_objects() -> Vec<Value> {
    use crate::config::gateway::testing::cert;
    let gateway = json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
        "metadata": {"name": "bookinfo-gateway", "namespace": "default"},
        "spec": {"selector": {"istio": "ingressgateway"},
                 "servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                              "hosts": ["bookinfo.example.com"],
                              "tls": {"mode": "SIMPLE", "credentialName": "bookinfo-tls-cert"}}]}});
    let ingress = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ingress", "namespace": "istio-system",
                     "labels": {"istio": "ingressgateway"}},
        "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.2.20"}});
    let (crt, key) = cert("bookinfo.example.com", false);
    vec![
        gateway,
        ingress,
        tls_secret("bookinfo-tls-cert", &crt, &key),
        tls_secret("unrelated", &crt, &key),
    ]
}

/// A TLS Secret in `istio-system` as the API server holds it (k8s-openapi writes its
/// apiVersion and kind).
fn tls_secret(name: &str, crt: &str, key: &str) -> Value {
    let entries = [("tls.crt", crt), ("tls.key", key)];
    let secret = crate::config::gateway::testing::secret("istio-system", name, &entries);
    serde_json::to_value(secret).expect("secret JSON")
}

#[tokio::test(flavor = "current_thread")]
async fn gateway_credentials_are_watched_by_name_and_followed() {
    use crate::config::gateway::CredentialState;
    use crate::config::gateway::testing::{cert, cert_valid};
    let server = FakeApiServer::start().expect("fake API server");
    for obj in gateway_objects() {
        server.apply(obj).expect("apply");
    }
    let state = |s: &Snapshot| {
        s.gateway_credentials
            .get(&id("istio-system", "bookinfo-tls-cert"))
            .cloned()
    };
    let mut src = start(server, "gateway").await;
    let snap = src
        .snapshot("the credential's first list", |s| {
            matches!(state(s), Some(CredentialState::Valid { .. }))
        })
        .await;
    assert!(
        snap.gateways
            .contains_key(&id("default", "bookinfo-gateway"))
    );
    assert_eq!(
        snap.gateway_credentials.len(),
        1,
        "{:?}",
        snap.gateway_credentials
    );
    let st = src.status.borrow().clone();
    assert_eq!(resource(&st, "Secret").objects, 1, "{st:?}");
    assert_eq!(
        resource(&st, "Gateway").api_version.as_deref(),
        Some("networking.istio.io/v1")
    );
    // Only that Secret was ever asked for: by name, in the workload's namespace.
    let secret_requests: Vec<String> = src
        .server
        .requests()
        .into_iter()
        .filter(|r| r.contains("/secrets"))
        .collect();
    assert!(!secret_requests.is_empty());
    for r in &secret_requests {
        assert!(
            r.contains("/api/v1/namespaces/istio-system/secrets?")
                && r.contains("fieldSelector=metadata.name=bookinfo-tls-cert"),
            "a request for other Secrets: {r}"
        );
    }

    // The Secret changes to a key of another certificate: unusable, named.
    let (crt, _) = cert("bookinfo.example.com", false);
    let (_, other_key) = cert("bookinfo.example.com", false);
    src.apply(tls_secret("bookinfo-tls-cert", &crt, &other_key));
    let snap = src
        .snapshot("the mismatched key", |s| {
            matches!(state(s), Some(CredentialState::Invalid { .. }))
        })
        .await;
    let Some(CredentialState::Invalid { reason }) = state(&snap) else {
        unreachable!()
    };
    assert!(reason.contains("tls.key"), "{reason}");

    // A certificate that expires while in force turns invalid then, the Secret unchanged.
    let now = std::time::SystemTime::now();
    let (crt, key) = cert_valid(
        "bookinfo.example.com",
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    );
    src.apply(tls_secret("bookinfo-tls-cert", &crt, &key));
    src.snapshot("the soon expiring certificate", |s| {
        matches!(state(s), Some(CredentialState::Valid { .. }))
    })
    .await;
    let snap = src
        .snapshot("the certificate's expiry", |s| {
            matches!(state(s), Some(CredentialState::Invalid { .. }))
        })
        .await;
    let Some(CredentialState::Invalid { reason }) = state(&snap) else {
        unreachable!()
    };
    assert!(reason.contains("expired at"), "{reason}");

    // Deleted: missing. The Gateway deleted: the watch stops and nothing is kept.
    assert!(
        src.server
            .delete("v1", "Secret", "istio-system", "bookinfo-tls-cert")
    );
    src.snapshot("the deleted Secret", |s| {
        state(s) == Some(CredentialState::Missing)
    })
    .await;
    assert!(src.server.delete(
        "networking.istio.io/v1",
        "Gateway",
        "default",
        "bookinfo-gateway"
    ));
    src.snapshot("no Gateway", |s| {
        s.gateways.is_empty() && s.gateway_credentials.is_empty()
    })
    .await;
    let st = src
        .status("the Secret watch stopped", |s| {
            resource(s, "Secret").objects == 0
        })
        .await;
    assert_eq!(resource(&st, "Secret").objects, 0);
}
