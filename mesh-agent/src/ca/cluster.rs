//! Cluster mode's pods: a kube-runtime reflector over every namespace's running pods, kept
//! to the fields the signing policy reads (namespace, name, uid, node, service account), so
//! a large cluster costs the CA little memory. The CA signs nothing before the first full
//! list (503, and `/healthz/ready` says not ready), and keeps answering from the last known
//! pods while a watch is being re-established.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tracing::{info, warn};

use crate::identity::Identity;

/// Finished pods keep their identity no longer: their containers are gone for good.
pub const RUNNING_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// The cluster's running pods, as the CA knows them.
#[derive(Clone)]
pub struct ClusterPods {
    store: Store<Pod>,
    ready: Arc<AtomicBool>,
}

/// A pod's service account, as the kubelet picks it.
fn service_account(spec: &PodSpec) -> &str {
    fn non_empty(s: &Option<String>) -> Option<&str> {
        s.as_deref().filter(|s| !s.is_empty())
    }
    // `serviceAccount`: the deprecated alias Kubernetes still honours.
    let alias = non_empty(&spec.service_account);
    non_empty(&spec.service_account_name)
        .or(alias)
        .unwrap_or("default")
}

/// Only what the policy reads.
fn trim(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
    pod.status = None;
    if let Some(spec) = pod.spec.take() {
        let account = service_account(&spec).to_owned();
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            service_account_name: Some(account),
            ..PodSpec::default()
        });
    }
}

/// Whether `pod` runs on `node` as `identity`'s namespace and service account.
pub fn grants(pod: &Pod, node: &str, identity: &Identity) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    pod.metadata.namespace.as_deref() == Some(identity.namespace.as_str())
        && service_account(spec) == identity.service_account
        && spec.node_name.as_deref() == Some(node)
}

impl ClusterPods {
    /// Starts the reflector on the current runtime.
    pub fn spawn(client: Client) -> ClusterPods {
        let (store, writer) = reflector::store();
        let api: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(RUNNING_PODS);
        let stream = watcher(api, cfg)
            .default_backoff()
            .modify(trim)
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = pin!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) if failing => {
                        info!("pod watch recovered");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let error = crate::config::kube::error_chain(&e);
                        warn!(%error, "pod watch failed (RBAC: list and watch pods cluster-wide); retrying with backoff");
                        failing = true;
                    }
                }
            }
        });
        let pods = ClusterPods {
            store,
            ready: Arc::new(AtomicBool::new(false)),
        };
        let (store, ready) = (pods.store.clone(), pods.ready.clone());
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                ready.store(true, Ordering::Release);
                info!(
                    pods = store.len(),
                    "pods listed from the API server: ready to sign"
                );
            }
        });
        pods
    }

    /// The first full list arrived.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether a running pod of `identity` is on `node`.
    pub fn on_node(&self, node: &str, identity: &Identity) -> bool {
        self.store.find(|p| grants(p, node, identity)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, sa: Option<&str>, node: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": ns, "uid": "u", "labels": {"a": "b"},
                         "annotations": {"big": "x".repeat(1000)}},
            "spec": {"containers": [{"name": "c", "image": "i"}],
                     "serviceAccountName": sa, "nodeName": node},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }))
        .expect("pod")
    }

    #[test]
    fn trimmed_pods_keep_what_the_policy_reads() {
        let id = Identity::new("cluster.local", "shop", "web");
        let mut p = pod("shop", Some("web"), Some("node-1"));
        trim(&mut p);
        assert!(p.metadata.annotations.is_none() && p.metadata.labels.is_none());
        assert!(p.status.is_none());
        assert!(p.spec.as_ref().is_some_and(|s| s.containers.is_empty()));
        assert_eq!(p.metadata.uid.as_deref(), Some("u"));
        assert!(grants(&p, "node-1", &id));
        assert!(!grants(&p, "node-2", &id));
        assert!(!grants(
            &p,
            "node-1",
            &Identity::new("cluster.local", "shop", "db")
        ));
        assert!(!grants(
            &p,
            "node-1",
            &Identity::new("cluster.local", "other", "web")
        ));
    }

    #[test]
    fn a_pod_without_service_account_is_default_and_unscheduled_grants_nothing() {
        let default = Identity::new("cluster.local", "shop", "default");
        let mut p = pod("shop", None, Some("node-1"));
        trim(&mut p);
        assert!(grants(&p, "node-1", &default));
        let mut pending = pod("shop", None, None);
        trim(&mut pending);
        assert!(!grants(&pending, "", &default));
        assert!(!grants(&pending, "node-1", &default));
    }
}
