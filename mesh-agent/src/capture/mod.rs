//! eBPF loading and attachment, and the maps the agent maintains.
//!
//! Programs are attached to a cgroup v2 subtree with bpf links, and links and maps are pinned
//! under `--bpffs-dir`. Pinning is what makes capture fail closed: when the agent stops, the
//! programs keep rewriting enrolled pods' connections to 127.0.0.1:15001, where nobody
//! listens, so they are refused instead of leaving the pod in plaintext around the mesh. A
//! restarted agent attaches fresh programs first and only then drops the old links, so there
//! is no gap.

pub mod delivery;
pub mod enroll;
pub mod fast_path;
pub mod netns;
pub mod tc;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{EnrolledPod, OrigDst, OrigDstKey, SockKey, names, stats};
use tracing::{debug, info, warn};

/// The eBPF object built from `mesh-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// The cgroup/sock_addr programs: capture on connect, the original peer on getpeername.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 4] = [
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
    names::PROG_GETPEERNAME4,
    names::PROG_GETPEERNAME6,
];

/// Magic number of a bpf filesystem (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs: {path}: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("cannot open cgroup {path} (a cgroup v2 directory is needed): {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object (pinned maps in {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no program or map named {0}")]
    Missing(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("no interface to capture inbound traffic on in {path}: {reason}")]
    PodInterface { path: PathBuf, reason: String },
    #[error("eBPF map {name}: duplicating its file descriptor: {source}")]
    MapFd {
        name: &'static str,
        source: io::Error,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map {
        name,
        source: Box::new(source),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        name,
        source: Box::new(source),
    }
}

/// Where capture is attached and pinned.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// cgroup v2 directory whose subtree is captured.
    pub cgroup: PathBuf,
    /// bpffs directory holding this agent's pinned maps and links.
    pub pin_dir: PathBuf,
    /// Attach the fast path's sk_msg program (its sock_ops half is always loaded; it stays
    /// idle until FAST_PATH_ON is set).
    pub fast_path: bool,
}

/// Loaded and attached capture programs plus the control-plane handle of ENROLLED.
pub struct Capture {
    ebpf: Ebpf,
    enrolled: BpfHashMap<MapData, u64, EnrolledPod>,
    pin_dir: PathBuf,
    _links: Vec<PinnedLink>,
}

impl Capture {
    /// Loads the programs, reuses or creates the pinned maps, attaches to the cgroup and
    /// replaces links left by a previous agent.
    pub fn start(cfg: &CaptureConfig) -> Result<Capture, CaptureError> {
        ensure_bpffs(&cfg.pin_dir)?;
        let cgroup = File::open(&cfg.cgroup).map_err(|source| CaptureError::Cgroup {
            path: cfg.cgroup.clone(),
            source,
        })?;
        let mut ebpf = load_programs(&cfg.pin_dir)?;

        // With bpf links the kernel always attaches in multi mode and rejects explicit
        // flags, so `Single` (flags 0) is the right mode here.
        let mut links = Vec::new();
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            links.push(replace_pinned_link(name, link.try_into(), &cfg.pin_dir)?);
        }
        let name = names::PROG_SOCK_OPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        links.push(replace_pinned_link(name, link.try_into(), &cfg.pin_dir)?);
        if cfg.fast_path {
            links.extend(attach_fast_path(&mut ebpf, cfg)?);
        }

        let enrolled = open_pinned(&cfg.pin_dir, names::MAP_ENROLLED)?;
        info!(
            cgroup = %cfg.cgroup.display(),
            pin_dir = %cfg.pin_dir.display(),
            fast_path = cfg.fast_path,
            "capture attached (connect4/6, getpeername4/6, sock_ops)"
        );
        Ok(Capture {
            ebpf,
            enrolled,
            pin_dir: cfg.pin_dir.clone(),
            _links: links,
        })
    }

    pub fn enroll(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        self.enrolled
            .insert(netns_cookie, EnrolledPod::default(), 0)
            .map_err(map_err(names::MAP_ENROLLED))
    }

    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_ENROLLED)(e)),
        }
    }

    /// Netns cookies currently in ENROLLED (including entries left by a previous agent).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// A new, independent handle on ORIG_DST for one accept loop.
    pub fn orig_dst_table(&self) -> Result<OrigDstTable, CaptureError> {
        Ok(OrigDstTable {
            map: open_pinned(&self.pin_dir, names::MAP_ORIG_DST)?,
        })
    }

    /// Read-only handles on the maps, for the admin API.
    pub fn reader(&self) -> Result<MapReader, CaptureError> {
        MapReader::open(&self.pin_dir)
    }
}

/// Attaches the fast path's sk_msg program to its SOCKHASH and, when the agent's own cgroup
/// is outside the captured one, the sock_ops program to the agent's cgroup too: the agent's
/// ends of the hops (accepted 15001 connections, delivery connections) are its own sockets,
/// and sock_ops only sees sockets of the cgroups it is attached to.
fn attach_fast_path(ebpf: &mut Ebpf, cfg: &CaptureConfig) -> Result<Vec<PinnedLink>, CaptureError> {
    let map = ebpf
        .map(names::MAP_FAST_PATH)
        .ok_or(CaptureError::Missing(names::MAP_FAST_PATH))?;
    let sockhash: SockHash<&MapData, SockKey> =
        SockHash::try_from(map).map_err(map_err(names::MAP_FAST_PATH))?;
    let map_fd = sockhash
        .fd()
        .try_clone()
        .map_err(|source| CaptureError::MapFd {
            name: names::MAP_FAST_PATH,
            source,
        })?;
    let name = names::PROG_FAST_PATH_MSG;
    let prog: &mut SkMsg = program(ebpf, name)?;
    // sk_msg attaches to the map (not a bpf link); the program stays attached as long as
    // this agent holds it, and a restarted agent's attach replaces it.
    prog.attach(&map_fd).map_err(prog_err(name))?;

    let mut links = Vec::new();
    match own_cgroup() {
        Some(own) if !own.starts_with(&cfg.cgroup) => {
            let file = File::open(&own).map_err(|source| CaptureError::Cgroup {
                path: own.clone(),
                source,
            })?;
            let name = names::PROG_SOCK_OPS;
            let prog: &mut SockOps = program(ebpf, name)?;
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            links.push(replace_pinned_link(
                "record_orig_dst_agent",
                link.try_into(),
                &cfg.pin_dir,
            )?);
            info!(cgroup = %own.display(), "sock_ops attached to the agent's own cgroup for the fast path");
        }
        Some(_) => {}
        None => warn!(
            "cannot read the agent's own cgroup from /proc/self/cgroup; the fast path works only if the agent runs under --cgroup"
        ),
    }
    Ok(links)
}

/// The agent's cgroup v2 directory (`0::/path` in /proc/self/cgroup, under the cgroup2 mount).
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mount = crate::sys::cgroup2_mount()?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// eBPF counters and map occupancy, as the admin API shows them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EbpfStats {
    pub redirected: u64,
    pub skipped_agent_mark: u64,
    pub recorded: u64,
    pub map_errors: u64,
    /// Inbound SYNs given to the agent's 15006 listener (tc ingress).
    pub inbound_captured: u64,
    /// Inbound SYNs dropped because no agent listened on 15006 (fail closed).
    pub inbound_no_listener: u64,
    pub enrolled_entries: usize,
    pub orig_dst_entries: usize,
    /// Captured sockets still open (their original destination serves getpeername).
    pub sock_orig_dst_entries: usize,
    /// Sockets put into the fast path's SOCKHASH.
    pub fast_path_inserted: u64,
    /// Messages moved socket to socket by the fast path.
    pub fast_path_redirected: u64,
    /// Messages of fast-path sockets that took the TCP/IP stack (peer not there yet, budget
    /// spent, or off).
    pub fast_path_stack: u64,
    /// Sockets in the SOCKHASH now (two per accelerated connection).
    pub fast_path_entries: usize,
    /// Open fast-path sockets that have sent (their byte count, or pinned to the stack).
    pub fast_path_sent_entries: usize,
}

/// Read-only view of the pinned maps; safe to share (every operation takes `&self`).
pub struct MapReader {
    stats: PerCpuArray<MapData, u64>,
    enrolled: BpfHashMap<MapData, u64, EnrolledPod>,
    orig_dst: BpfHashMap<MapData, OrigDstKey, OrigDst>,
    sock_orig_dst: BpfHashMap<MapData, u64, OrigDst>,
    fast_path: SockHash<MapData, SockKey>,
    fast_path_sent: BpfHashMap<MapData, SockKey, u32>,
}

impl MapReader {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<MapReader, CaptureError> {
        Ok(MapReader {
            stats: open_pinned(pin_dir, names::MAP_STATS)?,
            enrolled: open_pinned(pin_dir, names::MAP_ENROLLED)?,
            orig_dst: open_pinned(pin_dir, names::MAP_ORIG_DST)?,
            sock_orig_dst: open_pinned(pin_dir, names::MAP_SOCK_ORIG_DST)?,
            fast_path: open_pinned(pin_dir, names::MAP_FAST_PATH)?,
            fast_path_sent: open_pinned(pin_dir, names::MAP_FAST_PATH_SENT)?,
        })
    }

    /// True if the socket with this key is in the fast path's SOCKHASH. (A SOCKHASH with
    /// 4-byte values cannot be looked up from user space, so this walks the keys.)
    pub fn in_fast_path(&self, key: &SockKey) -> bool {
        self.fast_path.keys().any(|k| k.is_ok_and(|k| k == *key))
    }

    pub fn read(&self) -> EbpfStats {
        let counter = |i: u32| {
            self.stats
                .get(&i, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        EbpfStats {
            redirected: counter(stats::REDIRECTED),
            skipped_agent_mark: counter(stats::SKIPPED_AGENT_MARK),
            recorded: counter(stats::RECORDED),
            map_errors: counter(stats::MAP_ERRORS),
            inbound_captured: counter(stats::INBOUND_CAPTURED),
            inbound_no_listener: counter(stats::INBOUND_NO_LISTENER),
            enrolled_entries: self.enrolled.keys().count(),
            orig_dst_entries: self.orig_dst.keys().count(),
            sock_orig_dst_entries: self.sock_orig_dst.keys().count(),
            fast_path_inserted: counter(stats::FAST_PATH_INSERTED),
            fast_path_redirected: counter(stats::FAST_PATH_REDIRECTED),
            fast_path_stack: counter(stats::FAST_PATH_STACK),
            fast_path_entries: self.fast_path.keys().count(),
            fast_path_sent_entries: self.fast_path_sent.keys().count(),
        }
    }
}

/// Loads the object (maps pinned by name under `pin_dir`, reused when a previous agent left
/// them) and every program into the kernel, verifier included. Nothing is attached.
fn load_programs(pin_dir: &Path) -> Result<Ebpf, CaptureError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| CaptureError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
    for name in CGROUP_SOCK_ADDR_PROGRAMS {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(prog_err(name))?;
    }
    let prog: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
    prog.load().map_err(prog_err(names::PROG_SOCK_OPS))?;
    let prog: &mut SchedClassifier = program(&mut ebpf, names::PROG_INBOUND)?;
    prog.load().map_err(prog_err(names::PROG_INBOUND))?;
    let prog: &mut SkMsg = program(&mut ebpf, names::PROG_FAST_PATH_MSG)?;
    prog.load().map_err(prog_err(names::PROG_FAST_PATH_MSG))?;
    Ok(ebpf)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))
}

/// Loads every program into the kernel (verifier included) without attaching anything, with
/// the maps pinned in a private directory removed afterwards: what `mesh-agent check` runs.
pub fn verify_programs() -> Result<(), CaptureError> {
    let dir = PathBuf::from(format!("/sys/fs/bpf/nodemesh-check-{}", std::process::id()));
    ensure_bpffs(&dir)?;
    let result = load_programs(&dir).map(drop);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `mesh-agent check`: the fast path's self-test with private maps (pinned in a directory
/// removed afterwards) and the sock_ops program attached to this process's own cgroup for
/// the duration. Says whether `--fast-path=on` would turn the fast path on here.
pub fn check_fast_path(
    budget: u32,
) -> Result<fast_path::SelfTestReport, fast_path::FastPathCheckError> {
    use fast_path::FastPathCheckError as E;
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/nodemesh-check-fast-path-{}",
        std::process::id()
    ));
    ensure_bpffs(&dir)?;
    let result = (|| {
        let mut ebpf = load_programs(&dir)?;
        let own = own_cgroup().ok_or(E::NoCgroup)?;
        let cfg = CaptureConfig {
            cgroup: own.clone(),
            pin_dir: dir.clone(),
            fast_path: true,
        };
        let cgroup = File::open(&own).map_err(|source| CaptureError::Cgroup {
            path: own.clone(),
            source,
        })?;
        let name = names::PROG_SOCK_OPS;
        let prog: &mut SockOps = program(&mut ebpf, name)?;
        // Dropped with `ebpf` at the end: nothing stays attached.
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        attach_fast_path(&mut ebpf, &cfg)?;
        let mut on: aya::maps::Array<MapData, u32> = open_pinned(&dir, names::MAP_FAST_PATH_ON)?;
        on.set(mesh_common::FAST_PATH_BUDGET_INDEX, budget, 0)
            .map_err(map_err(names::MAP_FAST_PATH_ON))?;
        let report = fast_path::self_test(&dir, budget, false)?;
        drop(ebpf);
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The map pinned as `<pin_dir>/<name>`, as the typed aya map `T` (hash, array, SOCKHASH...).
pub(crate) fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Pins `link` at `<pin_dir>/link_<name>`, detaching a link a previous agent left there.
/// The new link is attached before the old one goes, so capture never lapses.
fn replace_pinned_link(
    name: &'static str,
    link: Result<FdLink, aya::programs::links::LinkError>,
    pin_dir: &Path,
) -> Result<PinnedLink, CaptureError> {
    let path = pin_dir.join(format!("link_{name}"));
    let link = link.map_err(|e| CaptureError::Pin {
        what: name,
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    if path.exists() {
        match PinnedLink::from_pin(&path) {
            Ok(old) => match old.unpin() {
                Ok(old) => {
                    drop(old);
                    debug!(path = %path.display(), "replaced the link of a previous agent");
                }
                Err(e) => warn!(path = %path.display(), error = %e, "cannot unpin old link"),
            },
            Err(e) => {
                warn!(path = %path.display(), error = %e, "stale pin is not a link, removing it");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    link.pin(&path).map_err(|e| CaptureError::Pin {
        what: name,
        path: path.clone(),
        source: io::Error::other(e),
    })
}

/// Makes sure `dir` exists on a bpf filesystem, mounting bpffs on /sys/fs/bpf if needed.
fn ensure_bpffs(dir: &Path) -> Result<(), CaptureError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| CaptureError::Bpffs { path, source }
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if parent.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
            mount_bpffs(sys_bpf).map_err(err(sys_bpf))?;
            info!("mounted bpffs on /sys/fs/bpf");
        }
        if !is_bpffs(parent) {
            return Err(CaptureError::Bpffs {
                path: parent.to_owned(),
                source: io::Error::other("not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)"),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(err(dir))
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    statfs_type(path) == Some(BPF_FS_MAGIC)
}

fn statfs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid NUL-terminated path and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statfs succeeded and initialised the struct.
    Some(unsafe { st.assume_init() }.f_type)
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: constant, NUL-terminated strings and a valid target path.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One accept loop's handle on ORIG_DST: look up and delete the original destination of an
/// accepted connection. Owned by a single task, so no lock is shared between connections.
pub struct OrigDstTable {
    map: BpfHashMap<MapData, OrigDstKey, OrigDst>,
}

impl OrigDstTable {
    /// The original destination of the connection from `peer` in the namespace `netns_cookie`,
    /// removed from the map so entries never outlive their connection.
    pub fn take(&mut self, netns_cookie: u64, peer: std::net::SocketAddrV4) -> Option<OrigDst> {
        let key = OrigDstKey {
            netns_cookie,
            src_ip4: u32::from_ne_bytes(peer.ip().octets()),
            src_port: peer.port(),
            _pad: 0,
        };
        let v = self.map.get(&key, 0).ok()?;
        let _ = self.map.remove(&key);
        Some(v)
    }
}
