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
/// The mesh's root namespace (Istio's `istio-system`): a PeerAuthentication there without
/// a selector is the mesh-wide policy.
pub const ROOT_NAMESPACE: &str = "nodemesh-system";

/// A DNS-1123 name (label or subdomain), as Kubernetes names objects: lowercase letters,
/// digits, `-` (and `.` for a subdomain), starting and ending with a letter or digit.
pub fn dns_name(s: &str, dots: bool, max: usize) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= max
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.'))
}

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
    /// `metadata.uid` (Kubernetes mode; local manifests usually have none): the kubelet puts
    /// it in the pod's cgroup path (`kubepods…pod<uid>…`), which confirms a `/proc` match.
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// Ready unless the pod's status says otherwise (no status in local mode means ready).
    pub ready: bool,
    pub service_account: String,
    /// The pod's network namespace, once known: from the `nodemesh.io/netns` annotation in
    /// local mode; never from the pod itself in Kubernetes mode (a pod could name another's).
    /// `None` means known but not yet enrollable: the enroller shows the pod as `pending`
    /// and enrolls it when a netns arrives, without counting it as a failure.
    pub netns: Option<PathBuf>,
    /// Declared container ports, for `targetPort` by name.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// The pod opted out with `nodemesh.io/enabled=false`.
    pub fn opted_out(&self) -> bool {
        self.labels.get(ENROLL_LABEL).map(String::as_str) == Some("false")
    }

    /// Whether the pod carries every label of `selector` (a DestinationRule subset's labels).
    pub fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
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
    /// The pod behind the address; `None` for endpoints that are not pods (EndpointSlices
    /// written by hand for selector-less Services).
    pub pod: Option<ObjectRef>,
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

/// Istio PeerAuthentication mTLS mode, serialized under its Istio name (`STRICT`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent level (port -> workload -> namespace -> mesh).
    Unset,
    /// Plain text only.
    Disable,
    /// mTLS and plain text accepted.
    Permissive,
    /// mTLS only.
    Strict,
}

/// An Istio PeerAuthentication (`security.istio.io/v1` or `v1beta1`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthentication {
    pub id: ObjectRef,
    /// `spec.selector.matchLabels`; `None` (also for empty labels) makes it a namespace-wide
    /// policy, or the mesh-wide one in [`ROOT_NAMESPACE`].
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`, by the workload's own (container) port; only with a selector.
    pub port_modes: BTreeMap<u16, MtlsMode>,
    /// `metadata.creationTimestamp`, RFC 3339 in UTC with whole seconds (as Kubernetes keeps
    /// it), so it sorts as text; when several policies apply the oldest wins, `None` first.
    pub created: Option<String>,
}

impl PeerAuthentication {
    fn selects(&self, pod: &Pod) -> bool {
        self.selector.as_ref().is_some_and(|s| pod.has_labels(s))
    }
}

/// What nodemesh takes from Istio's MeshConfig.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MeshSettings {
    /// Where it came from (`ConfigMap nodemesh-system/istio data.mesh`, an IstioOperator);
    /// `None`: defaults.
    pub source: Option<String>,
    /// `None`: access logs off (MeshConfig `accessLogFile` empty, Istio's default).
    pub access_log: Option<std::sync::Arc<crate::telemetry::access_log::AccessLogConfig>>,
    /// `None`: no spans exported (`enableTracing: false`, or no tracing provider selected).
    pub tracing: Option<std::sync::Arc<crate::telemetry::trace::TracingConfig>>,
}

/// One whole, validated configuration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Increases by one with every snapshot applied.
    pub generation: u64,
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub services: BTreeMap<ObjectRef, Service>,
    pub peer_authentications: BTreeMap<ObjectRef, PeerAuthentication>,
    pub authorization_policies: BTreeMap<ObjectRef, super::authz::AuthorizationPolicy>,
    /// Kubernetes mode: AuthorizationPolicies that do not decode or validate, with why. Each
    /// refuses every connection to the pods of its namespace (of the mesh, in the root
    /// namespace): a policy that cannot be read must not open what it may have closed.
    pub invalid_authorization_policies: BTreeMap<ObjectRef, String>,
    pub virtual_services: BTreeMap<ObjectRef, std::sync::Arc<super::routing::VirtualService>>,
    pub destination_rules: BTreeMap<ObjectRef, std::sync::Arc<super::routing::DestinationRule>>,
    pub gateways: BTreeMap<ObjectRef, super::gateway::Gateway>,
    /// The Secrets the Gateways name ([`Snapshot::wanted_credentials`]) and what they hold.
    pub gateway_credentials: BTreeMap<ObjectRef, super::gateway::CredentialState>,
    pub mesh: MeshSettings,
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

    /// The effective mTLS mode for connections to `pod`'s own `port`, never `Unset`; Istio's
    /// rules. The workload policy (the pod's namespace, selector matching its labels) wins
    /// over the namespace policy (no selector), which wins over the mesh policy
    /// ([`ROOT_NAMESPACE`], no selector); among several of a level the oldest, then the first
    /// by name. An `Unset` level inherits from the next; the workload policy's port-level mode
    /// overrides its mode for that port. Without any policy: `Permissive`.
    pub fn inbound_mode(&self, pod: &Pod, port: u16) -> MtlsMode {
        let oldest = |applies: &dyn Fn(&PeerAuthentication) -> bool| {
            let policies = self.peer_authentications.values().filter(|p| applies(p));
            policies.min_by(|a, b| (&a.created, &a.id.name).cmp(&(&b.created, &b.id.name)))
        };
        let ns = pod.id.namespace.as_str();
        let workload = oldest(&|p| p.id.namespace == ns && p.selects(pod));
        let namespace = oldest(&|p| p.id.namespace == ns && p.selector.is_none());
        let mesh = oldest(&|p| p.id.namespace == ROOT_NAMESPACE && p.selector.is_none());
        let set = |m: &MtlsMode| *m != MtlsMode::Unset;
        let mut levels = [namespace, mesh].into_iter().flatten().map(|p| p.mode);
        let inherited = levels.find(set).unwrap_or(MtlsMode::Permissive);
        let Some(workload) = workload else {
            return inherited;
        };
        let own = Some(workload.mode).filter(set).unwrap_or(inherited);
        let port_mode = workload.port_modes.get(&port).copied();
        port_mode.filter(set).unwrap_or(own)
    }

    /// Whether any AuthorizationPolicy (valid or not) exists: without one there is nothing to
    /// check.
    pub fn has_authorization(&self) -> bool {
        !self.authorization_policies.is_empty() || !self.invalid_authorization_policies.is_empty()
    }

    /// Whether AuthorizationPolicy lets `conn` reach `pod` at `stage` ([`super::authz`]);
    /// only the policies of the pod's and the root namespace are looked at.
    pub fn authorize(
        &self,
        pod: &Pod,
        conn: &super::authz::Connection<'_>,
        stage: super::authz::Stage<'_>,
    ) -> Result<(), super::authz::Denied> {
        let in_namespace = |ns: &str| {
            let from = ObjectRef {
                namespace: ns.to_owned(),
                name: String::new(),
            };
            let ns = ns.to_owned();
            self.authorization_policies
                .range(from..)
                .take_while(move |(id, _)| id.namespace == ns)
                .map(|(_, p)| p)
        };
        let ns = &pod.id.namespace;
        let invalid = self.invalid_authorization_policies.keys();
        if let Some(id) = invalid
            .into_iter()
            .find(|id| id.namespace == *ns || id.namespace == ROOT_NAMESPACE)
        {
            return Err(super::authz::Denied::InvalidPolicy(id.clone()));
        }
        let root = in_namespace(ROOT_NAMESPACE);
        if pod.id.namespace == ROOT_NAMESPACE {
            return super::authz::authorize(root, pod, conn, stage);
        }
        let policies = root.chain(in_namespace(&pod.id.namespace));
        super::authz::authorize(policies, pod, conn, stage)
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
