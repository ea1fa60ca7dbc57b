//! The node-local half of the desired state: which network namespace each pod sandbox on this
//! node has, as the CNI plugin reported it. Kubernetes never says (a pod annotation could name
//! another pod's namespace), so the enroller takes a pod's netns from here and everything else
//! from the config snapshot.
//!
//! Published on a watch channel: an ADD or DEL wakes the control loop exactly like a config
//! change does. Persisted (root-only file next to the socket) so a restarted agent re-enrolls
//! the pods it had, each entry checked again before it is believed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::model::{ObjectRef, Pod};

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, linux/nsfs.h).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Which network namespace a path named when the plugin reported it: the nsfs inode, and for
/// `/proc/<pid>/ns/net` the process's start time, so a reused pid (or path) is not mistaken
/// for the pod's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
    /// `/proc/<pid>/stat` field 22, for `/proc` paths.
    pub pid_start: Option<u64>,
}

impl NetnsId {
    /// Opens `path` and checks it is a network namespace other than the agent's (the host's):
    /// a pod must never enroll the node's own network.
    pub fn probe(path: &Path) -> Result<NetnsId, String> {
        let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: ioctl on a valid fd with no argument; returns the namespace type or -1.
        let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(format!("{} is not a network namespace", path.display()));
        }
        let m = f
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        let own = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| format!("cannot stat /proc/self/ns/net: {e}"))?;
        if (m.dev(), m.ino()) == (own.dev(), own.ino()) {
            return Err(format!(
                "{} is the agent's own (the node's) network namespace, not a pod's",
                path.display()
            ));
        }
        let pid_start = match pid_of(path) {
            Some(pid) => Some(
                start_time(pid)
                    .map_err(|e| format!("cannot read the start time of process {pid}: {e}"))?,
            ),
            None => None,
        };
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
            pid_start,
        })
    }

    /// Whether `path` still names this namespace; why not otherwise.
    pub fn recheck(&self, path: &Path) -> Result<(), String> {
        let now = NetnsId::probe(path)?;
        if now == *self {
            Ok(())
        } else {
            Err(format!(
                "{} no longer names the network namespace the CNI plugin reported",
                path.display()
            ))
        }
    }
}

/// The pid of a `/proc/<pid>/ns/net` path.
fn pid_of(path: &Path) -> Option<u32> {
    let s = path.to_str()?;
    s.strip_prefix("/proc/")?
        .strip_suffix("/ns/net")?
        .parse()
        .ok()
}

/// Start time of a process in clock ticks since boot (`/proc/<pid>/stat` field 22).
fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unexpected /proc/<pid>/stat format"))?;
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no start time in /proc/<pid>/stat"))
}

/// One pod sandbox the plugin reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniPod {
    pub container_id: String,
    pub netns: PathBuf,
    pub netns_id: NetnsId,
    /// From the interface plugin's result: the API server has no pod IP until the sandbox is
    /// up, and mutual TLS needs one to listen on.
    pub ip: Option<Ipv4Addr>,
}

/// Pod sandboxes on this node by pod, as the CNI plugin reported them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CniPods {
    pods: BTreeMap<ObjectRef, CniPod>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    version: u32,
    pods: Vec<PersistedPod>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PersistedPod {
    namespace: String,
    name: String,
    #[serde(flatten)]
    pod: CniPod,
}

impl CniPods {
    pub fn get(&self, id: &ObjectRef) -> Option<&CniPod> {
        self.pods.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectRef, &CniPod)> {
        self.pods.iter()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Records an ADD; a newer sandbox of the same pod replaces the older one.
    pub fn insert(&mut self, id: ObjectRef, pod: CniPod) {
        self.pods.insert(id, pod);
    }

    /// Forgets a DEL'd sandbox, only if it is still the pod's current one: a late DEL of an
    /// old sandbox must not unenroll its replacement. Returns whether it was there.
    pub fn remove(&mut self, id: &ObjectRef, container_id: &str) -> bool {
        if self
            .pods
            .get(id)
            .is_some_and(|p| p.container_id == container_id)
        {
            self.pods.remove(id);
            return true;
        }
        false
    }

    /// Drops sandboxes whose path no longer names the namespace reported (torn down without
    /// a DEL reaching the agent, or a reused pid); returns what was dropped and why.
    pub fn prune(&mut self) -> Vec<(ObjectRef, String)> {
        let mut gone = Vec::new();
        self.pods
            .retain(|id, p| match p.netns_id.recheck(&p.netns) {
                Ok(()) => true,
                Err(why) => {
                    gone.push((id.clone(), why));
                    false
                }
            });
        gone
    }

    /// `pod` as the enroller must see it: with the reported netns (and IP while the API
    /// server has none). A netns already in the pod (local mode's annotation) wins.
    pub fn overlay<'a>(&self, pod: &'a Pod) -> Cow<'a, Pod> {
        match self.pods.get(&pod.id) {
            Some(c) if pod.netns.is_none() => {
                let mut p = pod.clone();
                p.netns = Some(c.netns.clone());
                p.ip = p.ip.or(c.ip);
                Cow::Owned(p)
            }
            _ => Cow::Borrowed(pod),
        }
    }

    /// Saved as a root-only file, replaced atomically.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let doc = Persisted {
            version: 1,
            pods: self
                .pods
                .iter()
                .map(|(id, p)| PersistedPod {
                    namespace: id.namespace.clone(),
                    name: id.name.clone(),
                    pod: p.clone(),
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&doc).map_err(io::Error::other)?;
        super::write_atomic(path, &text, 0o600)
    }

    /// What a previous agent saved, each entry checked again; nothing if there is no file.
    /// A file that does not parse is reported and ignored: those pods wait for their next
    /// sandbox (or DEL), they are never enrolled on an unverified path.
    pub fn load(path: &Path) -> CniPods {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return CniPods::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the CNI pod state; starting without it");
                return CniPods::default();
            }
        };
        let doc: Persisted = match serde_json::from_slice(&text) {
            Ok(d) => d,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "invalid CNI pod state; starting without it");
                return CniPods::default();
            }
        };
        let mut pods = CniPods::default();
        for p in doc.pods {
            let id = ObjectRef {
                namespace: p.namespace,
                name: p.name,
            };
            let valid = super::protocol::netns_path(&p.pod.netns.to_string_lossy())
                .and_then(|_| p.pod.netns_id.recheck(&p.pod.netns));
            match valid {
                Ok(()) => {
                    info!(pod = %id, netns = %p.pod.netns.display(), "pod sandbox from the previous agent");
                    pods.insert(id, p.pod);
                }
                Err(why) => info!(pod = %id, %why, "dropping a pod sandbox the previous agent had"),
            }
        }
        pods
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Pod {
        Pod {
            id: ObjectRef {
                namespace: ns.into(),
                name: name.into(),
            },
            labels: BTreeMap::new(),
            node: Some("n".into()),
            ip: None,
            uid: None,
            host_network: false,
            ready: true,
            service_account: "default".into(),
            netns: None,
            ports: Vec::new(),
        }
    }

    fn cni(container: &str, netns: &str) -> CniPod {
        CniPod {
            container_id: container.into(),
            netns: netns.into(),
            netns_id: NetnsId {
                dev: 4,
                ino: 4026532000,
                pid_start: None,
            },
            ip: Some(Ipv4Addr::new(10, 99, 0, 2)),
        }
    }

    #[test]
    fn overlay_gives_the_reported_netns_and_ip() {
        let mut pods = CniPods::default();
        let web = pod("shop", "web");
        pods.insert(web.id.clone(), cni("c1", "/var/run/netns/a"));
        let seen = pods.overlay(&web);
        assert_eq!(seen.netns.as_deref(), Some(Path::new("/var/run/netns/a")));
        assert_eq!(seen.ip, Some(Ipv4Addr::new(10, 99, 0, 2)));
        // The API server's IP wins once it has one; a local-mode netns is left alone.
        let mut known = web.clone();
        known.ip = Some(Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(pods.overlay(&known).ip, Some(Ipv4Addr::new(10, 1, 1, 1)));
        let mut local = web.clone();
        local.netns = Some("/var/run/netns/local".into());
        assert!(matches!(pods.overlay(&local), Cow::Borrowed(_)));
        assert!(matches!(
            pods.overlay(&pod("shop", "other")),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_late_del_of_an_old_sandbox_keeps_the_new_one() {
        let mut pods = CniPods::default();
        let id = pod("shop", "web").id;
        pods.insert(id.clone(), cni("old", "/var/run/netns/a"));
        pods.insert(id.clone(), cni("new", "/var/run/netns/b"));
        assert!(!pods.remove(&id, "old"));
        assert_eq!(pods.get(&id).map(|p| p.container_id.as_str()), Some("new"));
        assert!(pods.remove(&id, "new"));
        assert_eq!(pods.len(), 0);
    }

    #[test]
    fn state_round_trips_and_unverifiable_entries_are_dropped() {
        let dir = std::env::temp_dir().join(format!("nodemesh-cni-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cni-pods.json");
        let mut pods = CniPods::default();
        pods.insert(
            pod("shop", "web").id,
            cni("c1", "/var/run/netns/nodemesh-gone"),
        );
        pods.save(&path).expect("save");
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"containerId\": \"c1\""), "{text}");
        // The namespace does not exist here: not believed after a restart.
        assert_eq!(CniPods::load(&path).len(), 0);
        std::fs::write(&path, "{not json").expect("write");
        assert_eq!(CniPods::load(&path).len(), 0);
        assert_eq!(CniPods::load(&dir.join("missing.json")).len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_network_namespaces_of_others_are_accepted() {
        let own = NetnsId::probe(Path::new("/proc/self/ns/net")).expect_err("own");
        assert!(own.contains("the agent's own"), "{own}");
        let mnt = NetnsId::probe(Path::new("/proc/self/ns/mnt")).expect_err("mnt");
        assert!(mnt.contains("not a network namespace"), "{mnt}");
        let file = NetnsId::probe(Path::new("/proc/self/stat")).expect_err("file");
        assert!(file.contains("not a network namespace"), "{file}");
        let pid = std::process::id();
        assert!(start_time(pid).is_ok());
        assert_eq!(pid_of(Path::new(&format!("/proc/{pid}/ns/net"))), Some(pid));
        assert_eq!(pid_of(Path::new("/var/run/netns/x")), None);
    }
}
