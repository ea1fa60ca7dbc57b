//! Enrollment: turning the config's "pods this node must mesh" into listeners inside each
//! pod's network namespace and entries in the ENROLLED map, in that order.
//!
//! Enroll: open the namespace, create the listeners, start the accept loop, and only then
//! insert the netns cookie, so a captured connection always finds a listener. Unenroll: remove
//! the cookie first (new connections are no longer captured), then stop accepting;
//! established connections run in their own tasks and keep flowing.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::Capture;
use super::netns::{Listen, PodNetns};
use crate::cni::discover::Misses;
use crate::cni::registry::CniPods;
use crate::config::model::{ObjectRef, Pod, Snapshot};
use crate::identity::{CertManager, Identity};
use crate::proxy::hbone::PoolSettings;
use crate::proxy::hbone::pool::{Pool, PoolInputs, PoolStats};
use crate::proxy::hbone::tls;
use crate::proxy::inbound::{self, HboneListener, PlaintextListener};
use crate::proxy::outbound::{self, Hbone, OutboundListener};
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
    #[error("registering the pod's listeners with the runtime: {0}")]
    Listener(std::io::Error),
    #[error("waiting for a certificate for {0} from the CA")]
    // Keep the message's start equal to WAITING_FOR_CERTIFICATE.
    NoCertificate(Identity),
    #[error("the pod has no IP to serve mutual TLS (15008) on")]
    NoPodIp,
    #[error("building the pod's TLS config: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a pod is `pending`: it is meshed, but where its network namespace is is not known
/// yet. Not a failure: nothing is retried or logged as an error until a netns arrives.
pub const PENDING_NETNS: &str = "waiting for the pod's network namespace: the CNI plugin \
     reports it when the pod's sandbox is created (Kubernetes mode does not take it from the \
     pod: a pod could name another's)";

/// Start of a `pending` pod's reason once `/proc` was searched for it ([`Misses`]).
const PENDING_NETNS_SCANNED: &str = "waiting for the pod's network namespace";

/// Start of [`EnrollError::NoCertificate`]'s message.
const WAITING_FOR_CERTIFICATE: &str = "waiting for a certificate";

/// Mutual TLS between agents: where certificates come from and the pool settings.
#[derive(Clone)]
pub struct Mtls {
    pub certs: CertManager,
    pub pool: PoolSettings,
}

impl Mtls {
    pub fn identity_of(&self, pod: &Pod) -> Identity {
        Identity {
            trust_domain: self.certs.trust_domain().to_string(),
            namespace: pod.id.namespace.clone(),
            service_account: pod.service_account.clone(),
        }
    }
}

struct Enrolled {
    pod: Pod,
    netns: PodNetns,
    /// The accept loops: outbound, and with mutual TLS, inbound HBONE.
    accept: Vec<JoinHandle<()>>,
    stats: Arc<WorkloadStats>,
    identity: Option<Arc<Identity>>,
    pool: Option<Arc<PoolStats>>,
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
    /// `enrolled`; `failed` (retried, see `error`); or `pending`: meshed, but its network
    /// namespace is not known yet (see `reason`), so nothing is captured for it.
    pub state: &'static str,
    pub error: Option<String>,
    /// Why a `pending` pod waits.
    pub reason: Option<String>,
    pub outbound_connections: u64,
    pub outbound_active: u64,
    pub outbound_errors: u64,
    /// Outbound connections carried over HBONE (mutual TLS).
    pub outbound_hbone: u64,
    pub inbound_connections: u64,
    pub inbound_active: u64,
    /// SPIFFE identity, with mutual TLS on.
    pub identity: Option<String>,
    /// `HBONE` with mutual TLS on, else `TCP`.
    pub protocol: &'static str,
    /// TLS connections of the pod's HBONE pool: open now, and opened in total.
    pub hbone_connections_open: u64,
    pub hbone_connections_opened: u64,
    /// Tunnels (HTTP/2 CONNECT streams) opened on them in total.
    pub hbone_streams_opened: u64,
    /// Live counters, read again whenever the view is served.
    #[serde(skip)]
    pub stats: Option<Arc<WorkloadStats>>,
    #[serde(skip)]
    pub pool: Option<Arc<PoolStats>>,
}

impl WorkloadView {
    /// This view with its counters read now.
    pub fn fresh(&self) -> WorkloadView {
        let mut v = self.clone();
        if let Some(s) = &self.stats {
            v.outbound_connections = s.outbound_connections.load(Ordering::Relaxed);
            v.outbound_active = s.outbound_active.load(Ordering::Relaxed);
            v.outbound_errors = s.outbound_errors.load(Ordering::Relaxed);
            v.outbound_hbone = s.outbound_hbone.load(Ordering::Relaxed);
            v.inbound_connections = s.inbound_connections.load(Ordering::Relaxed);
            v.inbound_active = s.inbound_active.load(Ordering::Relaxed);
        }
        if let Some(p) = &self.pool {
            v.hbone_connections_open = p.connections_open.load(Ordering::Relaxed);
            v.hbone_connections_opened = p.connections_opened.load(Ordering::Relaxed);
            v.hbone_streams_opened = p.streams_opened.load(Ordering::Relaxed);
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
    mtls: Option<Mtls>,
    enrolled: BTreeMap<ObjectRef, Enrolled>,
    failed: BTreeMap<ObjectRef, (Pod, String)>,
    /// Desired pods whose network namespace is not known yet ([`PENDING_NETNS`]).
    pending: BTreeMap<ObjectRef, Pod>,
    /// ENROLLED entries left by a previous agent, removed after the first reconcile.
    stale_checked: bool,
    /// Pod sandboxes the CNI plugin reported: where each pod's network namespace is.
    node_netns: Option<watch::Receiver<Arc<CniPods>>>,
    /// Pending pods the `/proc` search did not find, and why.
    scan_misses: Option<watch::Receiver<Arc<Misses>>>,
}

impl Enroller {
    pub fn new(
        node: String,
        capture: Capture,
        data_plane: Handle,
        inputs: ProxyInputs,
        mtls: Option<Mtls>,
    ) -> Self {
        Enroller {
            node,
            capture,
            data_plane,
            inputs,
            mtls,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            pending: BTreeMap::new(),
            stale_checked: false,
            node_netns: None,
            scan_misses: None,
        }
    }

    /// Takes pods' network namespaces from the CNI plugin's reports (the config's `netns`,
    /// local mode's annotation, wins where it has one).
    pub fn set_node_netns(&mut self, reports: watch::Receiver<Arc<CniPods>>) {
        self.node_netns = Some(reports);
    }

    /// Shows why the `/proc` search did not find a pending pod (Kubernetes mode).
    pub fn set_scan_misses(&mut self, misses: watch::Receiver<Arc<Misses>>) {
        self.scan_misses = Some(misses);
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// Brings the enrolled set to what `snap` asks for. Failures are recorded per pod and
    /// retried on the next call; they never stop other pods.
    pub fn reconcile(&mut self, snap: &Snapshot) {
        let node = self.node.clone();
        let reports = match &self.node_netns {
            Some(rx) => rx.borrow().clone(),
            None => Arc::default(),
        };
        let desired: BTreeMap<ObjectRef, Cow<'_, Pod>> = snap
            .enrolled_pods(&node)
            .map(|p| (p.id.clone(), reports.overlay(p)))
            .collect();
        // Certificates for every identity with a pod here; a pod is enrolled only once its
        // identity has one (the manager signals `changed` when it arrives).
        if let Some(m) = &self.mtls {
            m.certs
                .want(desired.values().map(|p| m.identity_of(p)).collect());
        }

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
        self.pending
            .retain(|id, _| desired.get(id).is_some_and(|p| p.netns.is_none()));

        for (id, pod) in desired {
            if let Some(e) = self.enrolled.get_mut(&id) {
                e.pod = pod.into_owned();
                continue;
            }
            if pod.netns.is_none() {
                // Known and meshed, not enrollable yet: no error, no retry tick.
                self.failed.remove(&id);
                if self.pending.insert(id.clone(), pod.into_owned()).is_none() {
                    debug!(pod = %id, "meshed pod pending: its network namespace is not known yet");
                }
                continue;
            }
            // A reported namespace is believed only while its path still names it.
            let reported = reports
                .get(&id)
                .filter(|c| pod.netns.as_ref() == Some(&c.netns));
            if let Some(Err(why)) = reported.map(|c| c.netns_id.recheck(&c.netns)) {
                self.failed.insert(id, (pod.into_owned(), why));
                continue;
            }
            match self.enroll(&pod) {
                Ok(e) => {
                    info!(pod = %id, netns = %e.netns.path().display(), cookie = e.netns.cookie(), "enrolled");
                    self.failed.remove(&id);
                    self.enrolled.insert(id, e);
                }
                Err(e) => {
                    let reason = e.to_string();
                    let first = self.failed.get(&id).is_none_or(|(_, r)| *r != reason);
                    if first && matches!(e, EnrollError::NoCertificate(_)) {
                        // The normal first step of every pod with mutual TLS, not a fault:
                        // the certificate manager wakes the reconcile when it arrives.
                        info!(pod = %id, %reason, "enrolling once the certificate arrives");
                    } else if first {
                        error!(pod = %id, %reason, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(id, (pod.into_owned(), reason));
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
            for cookie in self.capture.inbound_cookies() {
                if !live.contains(&cookie) {
                    info!(
                        cookie,
                        "removing an inbound capture link left by a previous agent"
                    );
                    self.capture.detach_inbound(cookie);
                }
            }
        }
    }

    /// Desired pods still waiting for their first certificate.
    pub fn waiting_for_certificates(&self) -> usize {
        self.failed
            .values()
            .filter(|(_, reason)| reason.starts_with(WAITING_FOR_CERTIFICATE))
            .count()
    }

    /// True if some desired pod could not be enrolled (the caller retries later).
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    fn enroll(&mut self, pod: &Pod) -> Result<Enrolled, EnrollError> {
        let path = pod.netns.clone().ok_or(EnrollError::NoNetns)?;
        // With mutual TLS, the pod's certificate must be there before anything else.
        let mtls = match &self.mtls {
            Some(m) => {
                let identity = m.identity_of(pod);
                let cert = m
                    .certs
                    .handle(&identity)
                    .ok_or_else(|| EnrollError::NoCertificate(identity.clone()))?;
                let ip = pod.ip.ok_or(EnrollError::NoPodIp)?;
                Some((m, Arc::new(identity), cert, ip))
            }
            None => None,
        };
        let mut listen = vec![Listen {
            addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports::OUTBOUND),
            transparent: false,
        }];
        if let Some((_, _, _, ip)) = &mtls {
            listen.push(Listen {
                addr: SocketAddrV4::new(*ip, ports::INBOUND_HBONE),
                transparent: false,
            });
            listen.push(Listen {
                addr: SocketAddrV4::new(*ip, ports::INBOUND_PLAINTEXT),
                transparent: true,
            });
        }
        let (netns, listeners) = PodNetns::open(&path, &listen, mtls.is_some())?;
        let orig_dst = self.capture.orig_dst_table()?;
        let stats = Arc::new(WorkloadStats::default());
        let pod_ref = Arc::new(pod.id.clone());
        let _guard = self.data_plane.enter();
        let mut listeners = listeners
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<Result<Vec<_>, _>>()
            .map_err(EnrollError::Listener)?
            .into_iter();
        let (Some(outbound_listener), hbone_listener, plaintext_listener) =
            (listeners.next(), listeners.next(), listeners.next())
        else {
            return Err(EnrollError::Listener(std::io::Error::other(
                "no outbound listener was made",
            )));
        };
        let mut accept = Vec::with_capacity(3);
        let mut hbone = None;
        let mut pool_stats = None;
        if let (Some((m, identity, cert, ip)), Some(listener)) = (&mtls, hbone_listener) {
            let tls = tls::server_config(cert.clone(), m.certs.roots(), m.certs.provider())?;
            accept.push(self.data_plane.spawn(inbound::serve(
                self.inputs.clone(),
                HboneListener {
                    pod: pod_ref.clone(),
                    pod_ip: *ip,
                    listener,
                    tls: tokio_rustls::TlsAcceptor::from(tls),
                    trust_domain: Arc::from(m.certs.trust_domain()),
                    sockets: netns.sockets(),
                    stats: stats.clone(),
                },
            )));
            let pool = Pool::start(PoolInputs {
                source: cert.clone(),
                roots: m.certs.roots(),
                provider: m.certs.provider(),
                sockets: netns.sockets(),
                settings: m.pool.clone(),
            });
            pool_stats = Some(pool.stats.clone());
            if let Some(listener) = plaintext_listener {
                accept.push(self.data_plane.spawn(inbound::serve_plaintext(
                    self.inputs.clone(),
                    PlaintextListener {
                        pod: pod_ref.clone(),
                        pod_ip: *ip,
                        listener,
                        sockets: netns.sockets(),
                        stats: stats.clone(),
                    },
                )));
            }
            hbone = Some(Hbone {
                identity: identity.clone(),
                pool,
            });
        }
        accept.push(self.data_plane.spawn(outbound::serve(
            self.inputs.clone(),
            OutboundListener {
                pod: pod_ref,
                pod_ip: pod.ip,
                netns_cookie: netns.cookie(),
                listener: outbound_listener,
                orig_dst,
                sockets: netns.sockets(),
                stats: stats.clone(),
                hbone,
            },
        )));
        // Listeners first, then capture: inbound (tc on the pod's interface), then outbound.
        if mtls.is_some()
            && let Err(e) = self.capture.attach_inbound(&path, netns.cookie(), pod.ip)
        {
            accept.iter().for_each(JoinHandle::abort);
            return Err(e.into());
        }
        if let Err(e) = self.capture.enroll(netns.cookie()) {
            self.capture.detach_inbound(netns.cookie());
            accept.iter().for_each(JoinHandle::abort);
            return Err(e.into());
        }
        Ok(Enrolled {
            pod: pod.clone(),
            netns,
            accept,
            stats,
            identity: mtls.map(|(_, id, _, _)| id),
            pool: pool_stats,
        })
    }

    fn unenroll(&mut self, id: &ObjectRef, e: Enrolled) {
        // Capture off first, then stop accepting. Live connections are separate tasks.
        if let Err(err) = self.capture.unenroll(e.netns.cookie()) {
            error!(pod = %id, error = %err, "cannot remove the pod from ENROLLED");
        }
        self.capture.detach_inbound(e.netns.cookie());
        e.accept.iter().for_each(JoinHandle::abort);
        info!(pod = %id, active = e.stats.outbound_active.load(Ordering::Relaxed), "unenrolled");
    }

    /// Stops accepting everywhere (shutdown). ENROLLED entries stay: while the agent is away
    /// the pods' new connections fail closed.
    pub fn stop_accepting(&mut self) {
        for e in self.enrolled.values() {
            e.accept.iter().for_each(JoinHandle::abort);
        }
    }

    pub fn view(&self) -> Vec<WorkloadView> {
        let mut out: Vec<WorkloadView> = self
            .enrolled
            .values()
            .map(|e| {
                WorkloadView {
                    namespace: e.pod.id.namespace.clone(),
                    name: e.pod.id.name.clone(),
                    node: self.node.clone(),
                    ip: e.pod.ip,
                    service_account: e.pod.service_account.clone(),
                    netns: e.netns.path().to_owned(),
                    netns_cookie: e.netns.cookie(),
                    state: "enrolled",
                    error: None,
                    reason: None,
                    outbound_connections: e.stats.outbound_connections.load(Ordering::Relaxed),
                    outbound_active: e.stats.outbound_active.load(Ordering::Relaxed),
                    outbound_errors: e.stats.outbound_errors.load(Ordering::Relaxed),
                    outbound_hbone: 0,
                    inbound_connections: 0,
                    inbound_active: 0,
                    identity: e.identity.as_ref().map(|i| i.to_string()),
                    protocol: if e.identity.is_some() { "HBONE" } else { "TCP" },
                    hbone_connections_open: 0,
                    hbone_connections_opened: 0,
                    hbone_streams_opened: 0,
                    stats: Some(e.stats.clone()),
                    pool: e.pool.clone(),
                }
                .fresh()
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
            reason: None,
            outbound_connections: 0,
            outbound_active: 0,
            outbound_errors: 0,
            outbound_hbone: 0,
            inbound_connections: 0,
            inbound_active: 0,
            identity: self.mtls.as_ref().map(|m| m.identity_of(pod).to_string()),
            protocol: if self.mtls.is_some() { "HBONE" } else { "TCP" },
            hbone_connections_open: 0,
            hbone_connections_opened: 0,
            hbone_streams_opened: 0,
            stats: None,
            pool: None,
        }));
        let misses = match &self.scan_misses {
            Some(rx) => rx.borrow().clone(),
            None => Arc::default(),
        };
        let reason = |pod: &Pod| match misses.get(&pod.id) {
            Some(miss) => format!("{PENDING_NETNS_SCANNED}: {miss}"),
            None => PENDING_NETNS.to_owned(),
        };
        out.extend(self.pending.values().map(|pod| WorkloadView {
            namespace: pod.id.namespace.clone(),
            name: pod.id.name.clone(),
            node: self.node.clone(),
            ip: pod.ip,
            service_account: pod.service_account.clone(),
            netns: PathBuf::new(),
            netns_cookie: 0,
            state: "pending",
            error: None,
            reason: Some(reason(pod)),
            outbound_connections: 0,
            outbound_active: 0,
            outbound_errors: 0,
            outbound_hbone: 0,
            inbound_connections: 0,
            inbound_active: 0,
            identity: self.mtls.as_ref().map(|m| m.identity_of(pod).to_string()),
            protocol: if self.mtls.is_some() { "HBONE" } else { "TCP" },
            hbone_connections_open: 0,
            hbone_connections_opened: 0,
            hbone_streams_opened: 0,
            stats: None,
            pool: None,
        }));
        out
    }
}
