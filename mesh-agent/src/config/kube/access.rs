//! What the agent asks of the Kubernetes API, in one place: every watched [`Kind`] names its
//! API group, resource and verbs here. deploy/'s RBAC is checked against this list (no more,
//! no less; `deploy_tests::rbac`), and this list against the requests the watchers really
//! send to the fake API server (the test below), so a new watcher, or a new kind of request,
//! cannot reach a cluster without its RBAC.
//!
//! Discovery (`GET /apis/security.istio.io/v1` and the like, to find the served version of each
//! Istio kind)
//! is a non-resource URL every authenticated client may read (the built-in `system:discovery`
//! ClusterRole), so it needs no rule of ours.

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

#[cfg(test)]
use super::watchers::KINDS;
use super::watchers::Kind;
use crate::config::model::ROOT_NAMESPACE;

/// One RBAC-shaped permission: these verbs on this resource of this API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiAccess {
    /// `""` for the core group.
    pub group: &'static str,
    /// The plural resource name, as in a URL and an RBAC rule.
    pub resource: &'static str,
    /// `None`: in every namespace (a ClusterRole); `Some(ns)`: only in `ns` (a Role there).
    pub namespace: Option<&'static str>,
    /// Only these objects (an RBAC rule's `resourceNames`); empty: any. RBAC cannot narrow
    /// `create`, `list`, `watch` or `deletecollection` to names.
    pub names: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// A kube-runtime watcher lists, then watches from the list's resourceVersion; relists on
/// `410 Gone`. Nothing else.
pub const WATCH: &[&str] = &["list", "watch"];

/// Group and resource of a typed kind, from k8s-openapi (the same type the watcher's `Api`
/// uses, so the two cannot disagree).
fn typed<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
    (K::GROUP, K::URL_PATH_SEGMENT)
}

impl Kind {
    /// What this kind's watcher asks of the API server.
    pub fn access(self) -> ApiAccess {
        let (group, resource) = match self {
            Kind::Namespace => typed::<Namespace>(),
            // Both pod watchers: this node's (field selector) and every node's. RBAC cannot
            // narrow a list to a field selector, so both need pods cluster-wide.
            Kind::NodePod | Kind::Pod => typed::<Pod>(),
            Kind::Service => typed::<Service>(),
            Kind::EndpointSlice => typed::<EndpointSlice>(),
            Kind::PeerAuthentication
            | Kind::AuthorizationPolicy
            | Kind::VirtualService
            | Kind::DestinationRule
            | Kind::Gateway => {
                let istio = self.istio().expect("an Istio kind");
                (istio.group, istio.plural)
            }
            Kind::MeshConfig => typed::<ConfigMap>(),
            // Per name (field selector) in the gateway workload's namespace; the names are in
            // users' Gateways, so RBAC cannot list them: every namespace.
            Kind::Secret => typed::<Secret>(),
        };
        let namespace = match self {
            Kind::MeshConfig => Some(ROOT_NAMESPACE),
            _ => None,
        };
        ApiAccess {
            group,
            resource,
            namespace,
            names: &[],
            verbs: WATCH,
        }
    }
}

/// Everything the agent's Kubernetes source asks of the API server, merged per resource.
#[cfg(test)]
pub fn agent_api_access() -> Vec<ApiAccess> {
    let mut all: Vec<ApiAccess> = KINDS.iter().map(|k| k.access()).collect();
    all.sort();
    all.dedup();
    all
}

/// A watch error, with what RBAC must grant when the API server said 403 Forbidden.
pub fn explain(kind: Kind, error: String) -> String {
    if !error.contains("403") && !error.to_ascii_lowercase().contains("forbidden") {
        return error;
    }
    let a = kind.access();
    let group = if a.group.is_empty() {
        "the core group".to_owned()
    } else {
        a.group.to_owned()
    };
    let (scope, role) = match a.namespace {
        Some(ns) => (format!("in namespace {ns}"), "Role"),
        None => ("cluster-wide".to_owned(), "ClusterRole"),
    };
    format!(
        "{error} (the agent's service account needs {} on {} in {group}, {scope}: the {role} \
         nodemesh-agent in deploy/ grants it)",
        a.verbs.join(", "),
        a.resource
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use mesh_testbed::fake_kube::FakeApiServer;

    use super::*;

    /// (verb, group, resource, namespace) of a request the fake API server recorded, or
    /// `None` for discovery (`/api`, `/apis`, `/apis/G/V`).
    fn classify(request: &str) -> Option<(String, String, String, Option<String>)> {
        let (method, url) = request.split_once(' ').expect("METHOD URL");
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (resource, named) = match rest {
            [] => return None,
            [resource] => (*resource, false),
            [resource, _name, ..] => (*resource, true),
        };
        let watch = query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match (method, named, watch) {
            ("GET", _, true) => "watch",
            ("GET", false, false) => "list",
            ("GET", true, false) => "get",
            ("POST", ..) => "create",
            ("PUT", ..) => "update",
            ("PATCH", ..) => "patch",
            ("DELETE", false, _) => "deletecollection",
            ("DELETE", true, _) => "delete",
            (other, ..) => other,
        };
        Some((verb.into(), group.into(), resource.into(), namespace))
    }

    #[test]
    fn classifies_requests() {
        let c = |r: &str| classify(r).map(|(v, g, res, ns)| format!("{v} {g}/{res} {ns:?}"));
        assert_eq!(
            c("GET /api/v1/pods?fieldSelector=spec.nodeName=n"),
            Some("list /pods None".into())
        );
        assert_eq!(
            c("GET /apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=3"),
            Some("watch discovery.k8s.io/endpointslices None".into())
        );
        assert_eq!(
            c("GET /api/v1/namespaces"),
            Some("list /namespaces None".into())
        );
        assert_eq!(
            c("GET /api/v1/namespaces/x"),
            Some("get /namespaces None".into())
        );
        assert_eq!(
            c("GET /api/v1/namespaces/nodemesh-system/configmaps?watch=1"),
            Some("watch /configmaps Some(\"nodemesh-system\")".into())
        );
        assert_eq!(
            c("POST /apis/authentication.k8s.io/v1/tokenreviews"),
            Some("create authentication.k8s.io/tokenreviews None".into())
        );
        assert_eq!(c("GET /apis/security.istio.io/v1"), None);
        assert_eq!(c("GET /apis"), None);
    }

    type Grant = (String, String, String, Option<String>);

    fn declared() -> BTreeSet<Grant> {
        agent_api_access()
            .iter()
            .flat_map(|a| {
                a.verbs.iter().map(|v| {
                    (
                        v.to_string(),
                        a.group.to_string(),
                        a.resource.to_string(),
                        a.namespace.map(str::to_owned),
                    )
                })
            })
            .collect()
    }

    /// A request in one namespace, as a cluster-wide grant covers it.
    fn cluster_wide(g: &Grant) -> Grant {
        (g.0.clone(), g.1.clone(), g.2.clone(), None)
    }

    /// The list is exactly what the watchers do: run the Kubernetes source against the fake
    /// API server until it synced and every watch is open, then compare the requests it
    /// sent (verb, group, resource, namespace) with [`agent_api_access`] both ways (a
    /// cluster-wide grant covers requests in any namespace). A Gateway naming a credential
    /// makes the agent watch that Secret.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_api_access_is_what_the_watchers_request() {
        let server = FakeApiServer::start().expect("fake API server");
        for obj in super::super::tests::gateway_objects() {
            server.apply(obj).expect("apply");
        }
        let (client, _dir) = super::super::tests::client_for(&server, "access").await;
        let (tx, _snapshots) = tokio::sync::watch::channel(Default::default());
        let mut status = super::super::spawn(client, "node-1".into(), tx);
        let synced = status.wait_for(|s| s.synced);
        tokio::time::timeout(Duration::from_secs(15), synced)
            .await
            .expect("first sync within 15 s")
            .expect("source alive");
        // Relisting (410 Gone) and resuming (a dropped watch) must not need more either.
        server.expire_watches();
        server.drop_watches();
        let want = declared();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let seen = loop {
            let seen: BTreeSet<Grant> = server
                .requests()
                .iter()
                .filter_map(|r| classify(r))
                .collect();
            if want.is_subset(&seen) || tokio::time::Instant::now() > deadline {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let undeclared: Vec<&Grant> = seen.difference(&want).collect();
        let undeclared: Vec<&Grant> = undeclared
            .into_iter()
            .filter(|g| !want.contains(&cluster_wide(g)))
            .collect();
        assert!(
            undeclared.is_empty(),
            "the agent sent requests its access list (config/kube/access.rs) does not declare, \
             so deploy/'s RBAC would refuse them: {undeclared:?}"
        );
        let seen_anywhere: BTreeSet<Grant> = seen.iter().map(cluster_wide).collect();
        let unused: Vec<&Grant> = want
            .difference(&seen)
            .filter(|g| !seen_anywhere.contains(*g))
            .collect();
        assert!(
            unused.is_empty(),
            "declared in config/kube/access.rs but never requested by the watchers (RBAC would \
             grant more than the code uses): {unused:?}"
        );
    }

    #[test]
    fn forbidden_errors_say_what_to_grant() {
        let e = explain(Kind::EndpointSlice, "ApiError: endpointslices is forbidden: User \"system:serviceaccount:nodemesh-system:nodemesh-agent\" cannot list resource (403)".into());
        assert!(
            e.contains("needs list, watch on endpointslices in discovery.k8s.io"),
            "{e}"
        );
        assert_eq!(
            explain(Kind::Pod, "connection refused".into()),
            "connection refused"
        );
    }
}
