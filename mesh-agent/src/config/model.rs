//! The validated, immutable configuration snapshot everything downstream reads.
//!
//! A snapshot is built whole from its sources and swapped atomically (`watch` channel of
//! `Arc<Snapshot>`); nothing downstream ever sees a half-applied config.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use serde::Serialize;

/// Label that enrolls a namespace (`true`) or opts a pod out (`false`).
pub const ENROLL_LABEL: &str = "nodemesh.io/enabled";
/// Local mode: pod annotation naming the pod's network namespace (a name under
/// `/var/run/netns` or an absolute path).
pub const NETNS_ANNOTATION: &str = "nodemesh.io/netns";

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    pub fn enrolled(&self) -> bool {
        self.labels.get(ENROLL_LABEL).map(String::as_str) == Some("true")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pod {
    pub id: ObjectRef,
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// Ready unless the pod's status says otherwise (no status in local mode means ready).
    pub ready: bool,
    pub service_account: String,
    /// Resolved network namespace path (local mode annotation), if any.
    pub netns: Option<PathBuf>,
    /// Declared container ports, for `targetPort` by name.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// The pod opted out with `nodemesh.io/enabled=false`.
    pub fn opted_out(&self) -> bool {
        self.labels.get(ENROLL_LABEL).map(String::as_str) == Some("false")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    pub pod: ObjectRef,
    pub addr: SocketAddrV4,
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub id: ObjectRef,
    pub cluster_ip: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
    /// Ready endpoints per service port (same order as `ports`), sorted by pod for
    /// deterministic balancing.
    pub endpoints: Vec<Vec<Endpoint>>,
}

/// One whole, validated configuration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Increases by one with every snapshot applied.
    pub generation: u64,
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub services: BTreeMap<ObjectRef, Service>,
    /// (cluster IP, port) -> (service, index into `ports`).
    #[serde(skip)]
    pub by_cluster_ip: std::collections::HashMap<SocketAddrV4, (ObjectRef, usize)>,
    /// Pod IP -> pod.
    #[serde(skip)]
    pub by_pod_ip: std::collections::HashMap<Ipv4Addr, ObjectRef>,
}

impl Snapshot {
    /// Pods this node must enroll: scheduled here, in an enrolled namespace, not
    /// hostNetwork, not opted out.
    pub fn enrolled_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .values()
            .filter(move |p| p.node.as_deref() == Some(node) && self.is_meshed(p))
    }

    /// Whether the pod is in the mesh on whatever node it runs: in an enrolled namespace,
    /// not hostNetwork, not opted out. Traffic to a meshed pod goes through its agent.
    pub fn is_meshed(&self, p: &Pod) -> bool {
        !p.host_network
            && !p.opted_out()
            && self
                .namespaces
                .get(&p.id.namespace)
                .is_some_and(Namespace::enrolled)
    }

    /// The service port a ClusterIP:port belongs to.
    #[cfg(test)]
    pub fn service_for(&self, dst: SocketAddrV4) -> Option<(&Service, usize)> {
        let (id, idx) = self.by_cluster_ip.get(&dst)?;
        self.services.get(id).map(|s| (s, *idx))
    }

    #[cfg(test)]
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.by_pod_ip.get(&ip).and_then(|id| self.pods.get(id))
    }
}
