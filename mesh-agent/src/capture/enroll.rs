//! Enrollment: turning the config's "pods this node must mesh" into listeners inside each
//! pod's network namespace and entries in the ENROLLED map, in that order.
//!
//! Enroll: open the namespace, create the listeners, start the accept loop, and only then
//! insert the netns cookie, so a captured connection always finds a listener. Unenroll: remove
//! the cookie first (new connections are no longer captured), then stop accepting;
//! established connections run in their own tasks and keep flowing.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::Capture;
use super::netns::PodNetns;
use crate::config::model::{ObjectRef, Pod, Snapshot};
use crate::proxy::outbound::{self, OutboundListener};
use crate::proxy::{ProxyInputs, WorkloadStats};
use mesh_common::ports;

/// Why a pod could not be enrolled (it is retried on the next reconcile).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the pod has no network namespace path")]
    NoNetns,
    #[error(transparent)]
    Netns(#[from] super::netns::NetnsError),
    #[error(transparent)]
    Capture(#[from] super::CaptureError),
    #[error("registering the outbound listener with the runtime: {0}")]
    Listener(std::io::Error),
}

struct Enrolled {
    pod: Pod,
    netns: PodNetns,
    accept: JoinHandle<()>,
    stats: Arc<WorkloadStats>,
}

/// A workload as the admin API and CLI show it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub service_account: String,
    pub netns: PathBuf,
    pub netns_cookie: u64,
    pub state: &'static str,
    pub error: Option<String>,
    pub outbound_connections: u64,
    pub outbound_active: u64,
    pub outbound_errors: u64,
    /// Live counters, read again whenever the view is served.
    #[serde(skip)]
    pub stats: Option<Arc<WorkloadStats>>,
}

impl WorkloadView {
    /// This view with its counters read now.
    pub fn fresh(&self) -> WorkloadView {
        let mut v = self.clone();
        if let Some(s) = &self.stats {
            v.outbound_connections = s.outbound_connections.load(Ordering::Relaxed);
            v.outbound_active = s.outbound_active.load(Ordering::Relaxed);
            v.outbound_errors = s.outbound_errors.load(Ordering::Relaxed);
        }
        v
    }
}

/// Owns the enrolled workloads. Lives on the control plane; the accept loops it starts run on
/// the data-plane runtime.
pub struct Enroller {
    node: String,
    capture: Capture,
    data_plane: Handle,
    inputs: ProxyInputs,
    enrolled: BTreeMap<ObjectRef, Enrolled>,
    failed: BTreeMap<ObjectRef, (Pod, String)>,
    /// ENROLLED entries left by a previous agent, removed after the first reconcile.
    stale_checked: bool,
}

impl Enroller {
    pub fn new(node: String, capture: Capture, data_plane: Handle, inputs: ProxyInputs) -> Self {
        Enroller {
            node,
            capture,
            data_plane,
            inputs,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            stale_checked: false,
        }
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// Brings the enrolled set to what `snap` asks for. Failures are recorded per pod and
    /// retried on the next call; they never stop other pods.
    pub fn reconcile(&mut self, snap: &Snapshot) {
        let node = self.node.clone();
        let desired: BTreeMap<ObjectRef, &Pod> = snap
            .enrolled_pods(&node)
            .map(|p| (p.id.clone(), p))
            .collect();

        // Unenroll pods no longer desired, or whose namespace path changed.
        let gone: Vec<ObjectRef> = self
            .enrolled
            .iter()
            .filter(|(id, e)| desired.get(*id).is_none_or(|p| p.netns != e.pod.netns))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(e) = self.enrolled.remove(&id) {
                self.unenroll(&id, e);
            }
        }
        self.failed.retain(|id, _| desired.contains_key(id));

        for (id, pod) in desired {
            if let Some(e) = self.enrolled.get_mut(&id) {
                e.pod = pod.clone();
                continue;
            }
            match self.enroll(pod) {
                Ok(e) => {
                    info!(pod = %id, netns = %e.netns.path().display(), cookie = e.netns.cookie(), "enrolled");
                    self.failed.remove(&id);
                    self.enrolled.insert(id, e);
                }
                Err(e) => {
                    let reason = e.to_string();
                    let first = self.failed.get(&id).is_none_or(|(_, r)| *r != reason);
                    if first {
                        error!(pod = %id, %reason, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(id, (pod.clone(), reason));
                }
            }
        }

        if !self.stale_checked {
            self.stale_checked = true;
            let live: HashSet<u64> = self.enrolled.values().map(|e| e.netns.cookie()).collect();
            for cookie in self.capture.enrolled_cookies() {
                if !live.contains(&cookie) {
                    info!(
                        cookie,
                        "removing an ENROLLED entry left by a previous agent"
                    );
                    if let Err(e) = self.capture.unenroll(cookie) {
                        warn!(cookie, error = %e, "cannot remove stale ENROLLED entry");
                    }
                }
            }
        }
    }

    /// True if some desired pod could not be enrolled (the caller retries later).
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    fn enroll(&mut self, pod: &Pod) -> Result<Enrolled, EnrollError> {
        let path = pod.netns.clone().ok_or(EnrollError::NoNetns)?;
        let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports::OUTBOUND);
        let (netns, listener) = PodNetns::open(&path, listen)?;
        let orig_dst = self.capture.orig_dst_table()?;
        let stats = Arc::new(WorkloadStats::default());
        let listener = {
            let _guard = self.data_plane.enter();
            tokio::net::TcpListener::from_std(listener).map_err(EnrollError::Listener)?
        };
        let accept = self.data_plane.spawn(outbound::serve(
            self.inputs.clone(),
            OutboundListener {
                pod: Arc::new(pod.id.clone()),
                pod_ip: pod.ip,
                netns_cookie: netns.cookie(),
                listener,
                orig_dst,
                sockets: netns.sockets(),
                stats: stats.clone(),
            },
        ));
        // Listener first, then capture.
        if let Err(e) = self.capture.enroll(netns.cookie()) {
            accept.abort();
            return Err(e.into());
        }
        Ok(Enrolled {
            pod: pod.clone(),
            netns,
            accept,
            stats,
        })
    }

    fn unenroll(&mut self, id: &ObjectRef, e: Enrolled) {
        // Capture off first, then stop accepting. Live connections are separate tasks.
        if let Err(err) = self.capture.unenroll(e.netns.cookie()) {
            error!(pod = %id, error = %err, "cannot remove the pod from ENROLLED");
        }
        e.accept.abort();
        info!(pod = %id, active = e.stats.outbound_active.load(Ordering::Relaxed), "unenrolled");
    }

    /// Stops accepting everywhere (shutdown). ENROLLED entries stay: while the agent is away
    /// the pods' new connections fail closed.
    pub fn stop_accepting(&mut self) {
        for e in self.enrolled.values() {
            e.accept.abort();
        }
    }

    pub fn view(&self) -> Vec<WorkloadView> {
        let mut out: Vec<WorkloadView> = self
            .enrolled
            .values()
            .map(|e| WorkloadView {
                namespace: e.pod.id.namespace.clone(),
                name: e.pod.id.name.clone(),
                node: self.node.clone(),
                ip: e.pod.ip,
                service_account: e.pod.service_account.clone(),
                netns: e.netns.path().to_owned(),
                netns_cookie: e.netns.cookie(),
                state: "enrolled",
                error: None,
                outbound_connections: e.stats.outbound_connections.load(Ordering::Relaxed),
                outbound_active: e.stats.outbound_active.load(Ordering::Relaxed),
                outbound_errors: e.stats.outbound_errors.load(Ordering::Relaxed),
                stats: Some(e.stats.clone()),
            })
            .collect();
        out.extend(self.failed.values().map(|(pod, reason)| WorkloadView {
            namespace: pod.id.namespace.clone(),
            name: pod.id.name.clone(),
            node: self.node.clone(),
            ip: pod.ip,
            service_account: pod.service_account.clone(),
            netns: pod.netns.clone().unwrap_or_default(),
            netns_cookie: 0,
            state: "failed",
            error: Some(reason.clone()),
            outbound_connections: 0,
            outbound_active: 0,
            outbound_errors: 0,
            stats: None,
        }));
        out
    }
}
