//! Finding the network namespace of a pod that was running before the agent (an agent restart
//! or upgrade without its sandbox record, or a namespace labelled after its pods started):
//! no CNI ADD will ever come for it, so the agent looks through the host's `/proc`, as
//! istio-cni's and Kmesh's node agents do.
//!
//! Every process names its network namespace (`/proc/<pid>/ns/net`, a link to `net:[<inode>]`)
//! and, without entering it, shows that namespace's addresses (`/proc/<pid>/net/fib_trie`, per
//! network namespace) and its cgroup (`/proc/<pid>/cgroup`, where the kubelet puts the pod's
//! UID: `kubepods…pod<uid>…`). A pod is matched by its IP, which works with every runtime, and
//! the match is confirmed by the UID when a cgroup names one; a namespace whose cgroup names
//! another pod is never taken, nor one that is ambiguous (several namespaces with the IP, as
//! on a test machine with isolated bridges). Many processes share a namespace: each is read
//! once, by inode, and the node's own namespace (the agent's, pid 1's) is never a pod's.
//!
//! The `/proc` root is a parameter and every kernel read goes through [`ProcRoot`]'s three
//! methods (a link, a file, a directory listing), so unit tests run on a fake tree.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::config::model::ObjectRef;

/// A pod to find: meshed, on this node, with an IP, and no sandbox reported by the plugin.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub id: ObjectRef,
    pub ip: Ipv4Addr,
    pub uid: Option<String>,
}

/// How a namespace was recognised as the pod's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedBy {
    /// The pod's IP is local in it; no cgroup named a pod (not a kubelet's cgroup layout).
    Ip,
    /// The pod's IP, and a cgroup of one of its processes names the pod's UID.
    IpAndCgroup,
}

/// Where a pod's network namespace is.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    pub netns_ino: u64,
    /// The oldest process in the namespace: the sandbox's (pause) process in a real pod, the
    /// one that lives as long as the namespace.
    pub pid: u32,
    /// `<root>/<pid>/ns/net`.
    pub path: PathBuf,
    pub by: MatchedBy,
    /// The sandbox's container ID from that process's cgroup, when it has one: a later CNI DEL
    /// of the sandbox names it.
    pub sandbox_id: Option<String>,
}

/// Which processes the agent can capture: those in the cgroup subtree its programs are
/// attached to. Others are not looked at, even if their namespace has the pod's IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The root of the hierarchy: every process (the DaemonSet).
    All,
    /// Processes whose cgroup v2 path (as `/proc/<pid>/cgroup` shows it) is this or below.
    Under(String),
}

impl Scope {
    /// The scope of capture attached at cgroup directory `dir`, given `/proc/self/mountinfo`.
    /// A directory without `cgroup.type` is a hierarchy's root; otherwise its path is its
    /// mount's root plus the path below the mount point. A mount whose root lies outside the
    /// agent's cgroup namespace (`/..`) cannot be placed: every process, like the root.
    pub fn of_cgroup(dir: &Path, mountinfo: &str) -> Scope {
        if !dir.join("cgroup.type").exists() {
            return Scope::All;
        }
        let best = mountinfo
            .lines()
            .filter_map(cgroup2_mount_line)
            .filter_map(|(root, mount)| Some((root, dir.strip_prefix(&mount).ok()?.to_owned())))
            .min_by_key(|(_, rest)| rest.components().count());
        match best {
            Some((root, rest)) if !root.split('/').any(|c| c == "..") => {
                let path = Path::new(&root).join(rest);
                Scope::Under(path.to_string_lossy().into_owned())
            }
            _ => Scope::All,
        }
    }

    fn contains(&self, cgroup: Option<&str>) -> bool {
        match (self, cgroup) {
            (Scope::All, _) => true,
            (Scope::Under(_), None) => false,
            (Scope::Under(top), Some(path)) => {
                let top = top.trim_end_matches('/');
                path == top || path.strip_prefix(top).is_some_and(|r| r.starts_with('/'))
            }
        }
    }
}

/// `(root, mount point)` of a cgroup2 line of mountinfo.
fn cgroup2_mount_line(line: &str) -> Option<(String, PathBuf)> {
    let (pre, post) = line.split_once(" - ")?;
    if post.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mut f = pre.split_whitespace().skip(3);
    let root = crate::sys::unescape_mount(f.next()?);
    let mount = crate::sys::unescape_mount(f.next()?);
    Some((root, PathBuf::from(mount)))
}

/// The agent could not look at `/proc` at all (one process that cannot be read is skipped,
/// not an error).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot list the processes in {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error(
        "cannot read the agent's own network namespace {path} ({source}); is {root} the host's \
         /proc (the DaemonSet needs hostPID: true)?"
    )]
    OwnNetns {
        path: PathBuf,
        root: PathBuf,
        source: io::Error,
    },
}

/// What one pass over `/proc` found.
#[derive(Debug, Default, PartialEq)]
pub struct ScanReport {
    pub found: BTreeMap<ObjectRef, Found>,
    /// Why each pod not found was not, for `mesh-agent workloads`.
    pub missed: BTreeMap<ObjectRef, String>,
    /// Processes looked at, network namespaces among them (not the node's).
    pub processes: usize,
    pub namespaces: usize,
    /// Processes that went away or could not be read while scanning.
    pub unreadable: usize,
}

/// One network namespace and what its processes show.
#[derive(Debug, Default)]
struct Netns {
    /// (start time, pid), oldest first once sorted.
    pids: Vec<(u64, u32)>,
    addrs: Option<BTreeSet<Ipv4Addr>>,
}

/// A `/proc` tree: the host's (`/proc` with hostPID), or a fake one in tests.
#[derive(Clone, Debug)]
pub struct ProcRoot {
    root: PathBuf,
}

impl ProcRoot {
    pub fn new(root: impl Into<PathBuf>) -> ProcRoot {
        ProcRoot { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    // The three kernel reads: everything else is parsing.

    fn link(&self, pid: &str, file: &str) -> io::Result<String> {
        let target = std::fs::read_link(self.root.join(pid).join(file))?;
        Ok(target.to_string_lossy().into_owned())
    }

    fn read(&self, pid: &str, file: &str) -> io::Result<String> {
        std::fs::read_to_string(self.root.join(pid).join(file))
    }

    fn pids(&self) -> io::Result<Vec<u32>> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.root)?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    fn netns_ino(&self, pid: &str) -> io::Result<u64> {
        let link = self.link(pid, "ns/net")?;
        parse_ns_link(&link).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected link {link:?}"),
            )
        })
    }

    fn cgroup(&self, pid: u32) -> Option<String> {
        let text = self.read(&pid.to_string(), "cgroup").ok()?;
        cgroup_v2_path(&text).map(str::to_owned)
    }

    /// Looks for `wanted` among the processes in `scope`, never taking a namespace in `taken`
    /// (already some pod's sandbox).
    pub fn scan(
        &self,
        wanted: &[Wanted],
        scope: &Scope,
        taken: &HashSet<u64>,
    ) -> Result<ScanReport, ScanError> {
        let own_path = self.root.join("self/ns/net");
        let own = self
            .netns_ino("self")
            .map_err(|source| ScanError::OwnNetns {
                path: own_path,
                root: self.root.clone(),
                source,
            })?;
        // pid 1's is the node's too when the agent runs in a container with hostPID.
        let node: HashSet<u64> = [Some(own), self.netns_ino("1").ok()]
            .into_iter()
            .flatten()
            .collect();
        let pids = self.pids().map_err(|source| ScanError::List {
            path: self.root.clone(),
            source,
        })?;
        let mut report = ScanReport::default();
        let mut namespaces: BTreeMap<u64, Netns> = BTreeMap::new();
        for pid in pids {
            let p = pid.to_string();
            let Ok(ino) = self.netns_ino(&p) else {
                report.unreadable += 1;
                continue;
            };
            if node.contains(&ino) || taken.contains(&ino) {
                continue;
            }
            if scope != &Scope::All && !scope.contains(self.cgroup(pid).as_deref()) {
                continue;
            }
            report.processes += 1;
            let started = self
                .read(&p, "stat")
                .ok()
                .and_then(|s| stat_start_time(&s))
                .unwrap_or(u64::MAX);
            namespaces.entry(ino).or_default().pids.push((started, pid));
        }
        report.namespaces = namespaces.len();
        for ns in namespaces.values_mut() {
            ns.pids.sort_unstable();
            // Any process shows the namespace's addresses; the first one still there.
            ns.addrs = ns.pids.iter().find_map(|(_, pid)| {
                let text = self.read(&pid.to_string(), "net/fib_trie").ok()?;
                Some(local_ipv4s(&text))
            });
        }
        for w in wanted {
            match self.best_match(w, &namespaces) {
                Ok(found) => {
                    report.found.insert(w.id.clone(), found);
                }
                Err(why) => {
                    report.missed.insert(w.id.clone(), why);
                }
            }
        }
        Ok(report)
    }

    fn best_match(&self, w: &Wanted, namespaces: &BTreeMap<u64, Netns>) -> Result<Found, String> {
        let with_ip: Vec<(&u64, &Netns)> = namespaces
            .iter()
            .filter(|(_, ns)| ns.addrs.as_ref().is_some_and(|a| a.contains(&w.ip)))
            .collect();
        if with_ip.is_empty() {
            return Err(format!(
                "no process's network namespace has IP {} (of {} namespaces looked at)",
                w.ip,
                namespaces.len()
            ));
        }
        let mut confirmed = Vec::new();
        let mut unconfirmed = Vec::new();
        let mut others = Vec::new();
        for (ino, ns) in with_ip {
            let uids: BTreeSet<String> = ns
                .pids
                .iter()
                .filter_map(|(_, pid)| pod_uid(&self.cgroup(*pid)?))
                .collect();
            let want = w.uid.as_deref().map(normalise_uid);
            match want {
                Some(u) if uids.contains(&u) => confirmed.push((*ino, ns)),
                Some(_) if !uids.is_empty() => others.push(format!(
                    "inode {ino} (its cgroup names pod {})",
                    uids.into_iter().collect::<Vec<_>>().join(", ")
                )),
                _ => unconfirmed.push((*ino, ns)),
            }
        }
        let (candidates, by) = if confirmed.is_empty() {
            (unconfirmed, MatchedBy::Ip)
        } else {
            (confirmed, MatchedBy::IpAndCgroup)
        };
        match candidates.as_slice() {
            [(ino, ns)] => Ok(self.found(*ino, ns, by)),
            [] => Err(format!(
                "the network namespace with IP {} belongs to another pod: {}",
                w.ip,
                others.join("; ")
            )),
            many => Err(format!(
                "{} network namespaces have IP {} (inodes {}); not guessing which is the pod's",
                many.len(),
                w.ip,
                many.iter()
                    .map(|(i, _)| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn found(&self, ino: u64, ns: &Netns, by: MatchedBy) -> Found {
        let pid = ns.pids.first().map_or(0, |(_, pid)| *pid);
        Found {
            netns_ino: ino,
            pid,
            path: self.root.join(pid.to_string()).join("ns/net"),
            by,
            sandbox_id: self.cgroup(pid).as_deref().and_then(container_id),
        }
    }
}

/// `net:[4026532001]` → 4026532001.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The addresses a namespace's `fib_trie` lists as `/32 host LOCAL`: its own IPv4 addresses.
pub fn local_ipv4s(fib_trie: &str) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with('/') {
            if let (Some(ip), true) = (last, t == "/32 host LOCAL") {
                out.insert(ip);
            }
        } else {
            last = None;
        }
    }
    out.remove(&Ipv4Addr::LOCALHOST);
    out
}

/// The cgroup v2 (`0::`) path of a `/proc/<pid>/cgroup`.
pub fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

fn normalise_uid(uid: &str) -> String {
    uid.replace('_', "-").to_ascii_lowercase()
}

/// The pod UID in a kubelet's cgroup path: `…/kubepods/besteffort/pod<uid>/…` (cgroupfs) or
/// `…/kubepods-besteffort-pod<uid with _>.slice/…` (systemd).
pub fn pod_uid(cgroup: &str) -> Option<String> {
    if !cgroup.contains("kubepods") {
        return None;
    }
    cgroup.split('/').find_map(|part| {
        let part = part.strip_suffix(".slice").unwrap_or(part);
        let (_, uid) = part.rsplit_once("pod")?;
        let uid = normalise_uid(uid);
        let shape = uid.len() == 36
            && uid.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        shape.then_some(uid)
    })
}

/// A container ID in the last part of a cgroup path (`cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, or the bare 64 hex digits of cgroupfs).
pub fn container_id(cgroup: &str) -> Option<String> {
    let last = cgroup.rsplit('/').next()?;
    let last = last.strip_suffix(".scope").unwrap_or(last);
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|p| last.strip_prefix(p))
        .unwrap_or(last);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
fn stat_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
