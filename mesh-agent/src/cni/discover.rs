//! Kubernetes mode: enrolling pods that were running before the agent, without the CNI
//! plugin. After the first full sync, and whenever the config changes, every meshed pod on
//! this node that has an IP but no sandbox in the registry (no ADD reached this agent, and no
//! record survived) is looked for in the host's `/proc` ([`super::scan`]). A pod found is
//! recorded in the registry exactly as an ADD would record it, so the enroller enrolls it the
//! same way (and a restarted agent finds it in the record). A pod not found is retried with
//! exponential backoff and shown as `pending` with the reason in `mesh-agent workloads`.
//!
//! Runs on the control runtime; the walk through `/proc` runs on its blocking pool.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::registry::{CniPod, CniPods, NetnsId};
use super::scan::{Found, ProcRoot, ScanReport, Scope, Wanted};
use super::server::Adopter;
use crate::admin::ControlView;
use crate::config::model::{ObjectRef, Snapshot};

/// The first retry of a pod not found; doubled after each miss up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// Why a meshed pod without a sandbox was not found in `/proc` (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Miss {
    pub reason: String,
    pub scans: u32,
    pub retry_in: Duration,
}

impl std::fmt::Display for Miss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no CNI report and not found in /proc after {} scan(s): {}; next scan within {}s",
            self.scans,
            self.reason,
            self.retry_in.as_secs()
        )
    }
}

/// The misses of the last scans, by pod.
pub type Misses = BTreeMap<ObjectRef, Miss>;

pub struct DiscoverInputs {
    pub node: String,
    pub proc: ProcRoot,
    pub scope: Scope,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub view: watch::Receiver<Arc<ControlView>>,
    pub adopter: Adopter,
    pub misses: watch::Sender<Arc<Misses>>,
}

/// Backoff state of one pod; forgotten when the pod is no longer looked for or its IP changes.
struct Tries {
    ip: Ipv4Addr,
    scans: u32,
    next: Instant,
    miss: Option<Miss>,
}

/// A sandbox recorded from `/proc`, logged once the enroller shows the pod enrolled in it.
struct Adopted {
    path: PathBuf,
    ino: u64,
    pid: u32,
}

/// The pods to look for: meshed, on this node, with an IP, no netns of their own (local
/// mode's annotation) and no sandbox in the registry.
pub fn wanted(node: &str, snap: &Snapshot, sandboxes: &CniPods) -> Vec<Wanted> {
    snap.enrolled_pods(node)
        .filter(|p| p.netns.is_none() && sandboxes.get(&p.id).is_none())
        .filter_map(|p| {
            Some(Wanted {
                id: p.id.clone(),
                ip: p.ip?,
                uid: p.uid.clone(),
            })
        })
        .collect()
}

pub async fn run(mut inputs: DiscoverInputs) {
    let mut tries: BTreeMap<ObjectRef, Tries> = BTreeMap::new();
    let mut adopted: BTreeMap<ObjectRef, Adopted> = BTreeMap::new();
    info!(proc = %inputs.proc.path().display(), scope = ?inputs.scope, "looking for pods that predate the agent in /proc once the config is synced");
    loop {
        let view = inputs.view.borrow_and_update().clone();
        log_enrolled(&view, &inputs.adopter.pods(), &mut adopted);
        if view.config_synced {
            let snap = inputs.snapshot.borrow_and_update().clone();
            let sandboxes = inputs.adopter.pods();
            let wanted = wanted(&inputs.node, &snap, &sandboxes);
            tries.retain(|id, t| wanted.iter().any(|w| &w.id == id && w.ip == t.ip));
            let now = Instant::now();
            let due: Vec<Wanted> = wanted
                .into_iter()
                .filter(|w| tries.get(&w.id).is_none_or(|t| t.next <= now))
                .collect();
            if !due.is_empty() {
                let taken: HashSet<u64> = sandboxes.iter().map(|(_, p)| p.netns_id.ino).collect();
                let outcome = scan(&inputs, due.clone(), taken).await;
                record(&inputs.adopter, &due, outcome, &mut tries, &mut adopted);
            }
            let misses: Misses = tries
                .iter()
                .filter_map(|(id, t)| Some((id.clone(), t.miss.clone()?)))
                .collect();
            inputs.misses.send_if_modified(|m| {
                let changed = **m != misses;
                if changed {
                    *m = Arc::new(misses);
                }
                changed
            });
        }
        let next = tries.values().map(|t| t.next).min();
        tokio::select! {
            r = inputs.snapshot.changed() => if r.is_err() { return },
            r = inputs.view.changed() => if r.is_err() { return },
            _ = async { match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            } } => {}
        }
    }
}

/// What one scan gave for each pod: found (with the probed namespace) or why not.
type Outcome = BTreeMap<ObjectRef, Result<(Found, NetnsId), String>>;

/// One walk through `/proc` for `due`, on the blocking pool. A namespace found is probed
/// (opened, checked to be a network namespace other than the node's) right away, and must
/// still be the one scanned.
async fn scan(inputs: &DiscoverInputs, due: Vec<Wanted>, taken: HashSet<u64>) -> Outcome {
    let (proc, scope) = (inputs.proc.clone(), inputs.scope.clone());
    let ids: Vec<ObjectRef> = due.iter().map(|w| w.id.clone()).collect();
    let work = tokio::task::spawn_blocking(move || -> Result<Outcome, String> {
        let ScanReport {
            found,
            missed,
            processes,
            namespaces,
            unreadable,
        } = proc.scan(&due, &scope, &taken).map_err(|e| e.to_string())?;
        debug!(
            processes,
            namespaces,
            unreadable,
            found = found.len(),
            "scanned /proc"
        );
        let mut out: Outcome = missed.into_iter().map(|(id, why)| (id, Err(why))).collect();
        for (id, f) in found {
            let probed = NetnsId::probe(&f.path).and_then(|n| {
                if n.ino == f.netns_ino {
                    Ok(n)
                } else {
                    Err(format!("{} changed while scanning", f.path.display()))
                }
            });
            out.insert(id, probed.map(|n| (f, n)));
        }
        Ok(out)
    });
    match work.await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(why)) => {
            warn!(error = %why, "cannot scan /proc for pods that predate the agent");
            ids.into_iter().map(|id| (id, Err(why.clone()))).collect()
        }
        Err(e) => {
            let why = format!("the /proc scan stopped: {e}");
            ids.into_iter().map(|id| (id, Err(why.clone()))).collect()
        }
    }
}

/// Records what was found in the registry and the misses with their next retry.
fn record(
    adopter: &Adopter,
    due: &[Wanted],
    mut outcome: Outcome,
    tries: &mut BTreeMap<ObjectRef, Tries>,
    adopted: &mut BTreeMap<ObjectRef, Adopted>,
) {
    let now = Instant::now();
    for w in due {
        let result = outcome
            .remove(&w.id)
            .unwrap_or_else(|| Err("not looked at".into()));
        match result {
            Ok((found, netns_id)) => {
                tries.remove(&w.id);
                let sandbox = CniPod {
                    container_id: found
                        .sandbox_id
                        .clone()
                        .unwrap_or_else(|| format!("proc-{}", found.pid)),
                    netns: found.path.clone(),
                    netns_id,
                    ip: Some(w.ip),
                };
                if adopter.adopt(&w.id, sandbox) {
                    info!(pod = %w.id, netns = %found.path.display(), inode = found.netns_ino, pid = found.pid, matched_by = ?found.by, "found existing pod {} in /proc; enrolling it", w.id);
                    adopted.insert(
                        w.id.clone(),
                        Adopted {
                            path: found.path,
                            ino: found.netns_ino,
                            pid: found.pid,
                        },
                    );
                }
            }
            Err(reason) => {
                let t = tries.entry(w.id.clone()).or_insert(Tries {
                    ip: w.ip,
                    scans: 0,
                    next: now,
                    miss: None,
                });
                t.scans += 1;
                let retry_in = FIRST_RETRY
                    .saturating_mul(1 << t.scans.saturating_sub(1).min(6))
                    .min(LAST_RETRY);
                t.next = now + retry_in;
                let changed = t.miss.as_ref().is_none_or(|m| m.reason != reason);
                let miss = Miss {
                    reason,
                    scans: t.scans,
                    retry_in,
                };
                if changed {
                    info!(pod = %w.id, scans = t.scans, retry_in = ?retry_in, "existing pod {} not found in /proc: {}", w.id, miss.reason);
                } else {
                    debug!(pod = %w.id, scans = t.scans, retry_in = ?retry_in, "existing pod {} still not found in /proc", w.id);
                }
                t.miss = Some(miss);
            }
        }
    }
}

/// Logs each adopted pod once the enroller shows it enrolled in the namespace found; forgets
/// those whose record is gone.
fn log_enrolled(
    view: &ControlView,
    sandboxes: &CniPods,
    adopted: &mut BTreeMap<ObjectRef, Adopted>,
) {
    adopted.retain(|id, a| {
        let enrolled = view.workloads.iter().any(|w| {
            w.namespace == id.namespace
                && w.name == id.name
                && w.state == "enrolled"
                && w.netns == a.path
        });
        if enrolled {
            info!(pod = %id, "enrolled existing pod {id} from /proc (netns inode {}, pid {})", a.ino, a.pid);
            return false;
        }
        sandboxes.get(id).is_some_and(|s| s.netns == a.path)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{Namespace, Pod};

    #[test]
    fn wants_meshed_pods_with_an_ip_and_no_sandbox() {
        let mut snap = Snapshot::default();
        snap.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                labels: [(
                    crate::config::model::ENROLL_LABEL.to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            },
        );
        let pod = |name: &str, ip: Option<&str>, node: &str, host: bool| Pod {
            id: ObjectRef {
                namespace: "shop".into(),
                name: name.into(),
            },
            uid: Some(format!("uid-{name}")),
            labels: Default::default(),
            node: Some(node.into()),
            ip: ip.map(|i| i.parse().expect("ip")),
            host_network: host,
            ready: true,
            service_account: "default".into(),
            netns: None,
            ports: vec![],
        };
        for p in [
            pod("web", Some("10.244.1.5"), "node-1", false),
            pod("starting", None, "node-1", false),
            pod("far", Some("10.244.2.5"), "node-2", false),
            pod("host", Some("192.168.1.10"), "node-1", true),
            pod("added", Some("10.244.1.6"), "node-1", false),
        ] {
            snap.pods.insert(p.id.clone(), p);
        }
        let mut sandboxes = CniPods::default();
        sandboxes.insert(
            ObjectRef {
                namespace: "shop".into(),
                name: "added".into(),
            },
            CniPod {
                container_id: "c".into(),
                netns: "/var/run/netns/x".into(),
                netns_id: NetnsId {
                    dev: 1,
                    ino: 2,
                    pid_start: None,
                },
                ip: None,
            },
        );
        let w = wanted("node-1", &snap, &sandboxes);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].id.name, "web");
        assert_eq!(w[0].uid.as_deref(), Some("uid-web"));
        let miss = Miss {
            reason: "no process's network namespace has IP 10.244.1.5".into(),
            scans: 3,
            retry_in: Duration::from_secs(4),
        };
        assert_eq!(
            miss.to_string(),
            "no CNI report and not found in /proc after 3 scan(s): no process's network \
             namespace has IP 10.244.1.5; next scan within 4s"
        );
    }
}
