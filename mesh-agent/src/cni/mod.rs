//! Pod enrollment without a race: a CNI plugin chained after the cluster's own, and the
//! agent's socket that answers it.
//!
//! ```text
//!  kubelet ─▶ runtime ─▶ cluster CNI (interface, IP) ─▶ nodemesh-cni ADD ──unix socket──▶ agent
//!                                                           │  waits         registry of pod
//!                                                           │                sandboxes (netns)
//!                                                           ◀── enrolled / not meshed ─┘   │
//!  app containers start only after ADD returned                        enroller ◀──────────┘
//! ```
//!
//! The plugin is the agent's own binary installed as `nodemesh-cni` (`mesh-agent cni install`,
//! or the agent with `--cni-bin-dir`/`--cni-conf-dir`): run under that name it acts as the
//! plugin (`mesh-agent cni` does the same). ADD sends the pod, the sandbox ID, its network
//! namespace path and its IPs to the agent and waits until the agent answers that the pod is
//! enrolled (listeners in its namespace, its netns cookie in ENROLLED) or is not meshed
//! (namespace not enrolled, pod opted out, hostNetwork); the runtime starts no app container
//! before ADD returns, so no byte leaves a meshed pod outside the mesh. If the pod is not yet
//! in the agent's config (its API watch is behind the kubelet), the agent waits for it, up to
//! the plugin's `timeout`. DEL tells the agent the sandbox is gone and always succeeds.
//!
//! **Fail-closed rule.** When the agent cannot be reached (no socket, nobody listening), ADD
//! fails — the runtime retries the sandbox later — unless the agent's last namespace list
//! (`cni-namespaces.json` beside the socket, rewritten by the agent on every namespace change)
//! says the pod's namespace is *not* enrolled. A namespace the list does not have (created
//! since), a list that is missing or unreadable (first boot of a node, `/var/run` is tmpfs),
//! or a namespace listed as enrolled: ADD fails, naming the socket, the namespace and the
//! file. The one exception is `excludeNamespaces` in the plugin config (the installer puts
//! `kube-system` and `nodemesh-system` there), whose pods start when the list cannot tell, so
//! a node's own system pods never wait for the mesh; a namespace the list says is enrolled
//! fails even then. An agent that accepts the connection but does not answer in time fails
//! ADD for every pod. The window this leaves: a namespace labelled while the node's agent is
//! down starts its pods on that node unmeshed, exactly like pods that were running before
//! the label; both are found in `/proc` ([`discover`]) once the agent runs.
//!
//! The agent treats the socket's input as hostile: the socket is root-only (mode 0600 and the
//! peer's uid checked with `SO_PEERCRED`), messages are bounded, every field is validated
//! ([`protocol`]), and a network namespace path must be in a runtime's netns directory or
//! `/proc/<pid>/ns/net`, must be a network namespace and must not be the node's own
//! ([`registry::NetnsId`]).

pub mod conf;
pub mod discover;
pub mod install;
pub mod namespaces;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod scan;
pub mod server;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admin::ControlView;
use crate::config::model::Snapshot;

/// The plugin's `type` in a conflist, and its executable's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "nodemesh-cni";
/// Where the agent listens for the plugin, and where the plugin looks by default.
pub const DEFAULT_SOCKET: &str = "/var/run/nodemesh/cni.sock";
/// Namespaces whose pods start when the agent is unreachable and cannot be asked.
pub const DEFAULT_EXCLUDED: [&str; 2] = ["kube-system", crate::config::model::ROOT_NAMESPACE];

/// What the CNI side gives the enroller.
pub struct Started {
    /// Pod sandboxes: reported by the plugin, recorded by a previous agent, or found in /proc.
    pub sandboxes: watch::Receiver<Arc<registry::CniPods>>,
    /// Kubernetes mode: meshed pods not found in /proc yet, and why.
    pub misses: watch::Receiver<Arc<discover::Misses>>,
}

/// `run`'s CNI side, on the control runtime: the socket (and the registry it feeds), with
/// `--cni-bin-dir`/`--cni-conf-dir` the plugin kept installed, checked every 10 s, and in
/// Kubernetes mode the search of `--proc-dir` for pods that predate the agent.
pub fn start(
    args: &crate::app::RunArgs,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    view: watch::Receiver<Arc<ControlView>>,
) -> anyhow::Result<Started> {
    let (sandboxes, adopter) = server::start(server::CniServerInputs {
        socket: args.cni_socket(),
        node: args.node.clone(),
        snapshot: snapshot.clone(),
        view: view.clone(),
    })?;
    if let (Some(bin_dir), Some(conf_dir)) = (&args.cni_bin_dir, &args.cni_conf_dir) {
        let install = install::InstallArgs {
            bin_dir: bin_dir.clone(),
            conf_dir: conf_dir.clone(),
            agent_socket: args.cni_socket(),
            timeout: "30s".into(),
            exclude_namespaces: DEFAULT_EXCLUDED.map(String::from).to_vec(),
        };
        tokio::spawn(install::keep_installed(install, Duration::from_secs(10)));
    }
    let (misses_tx, misses) = watch::channel(Arc::default());
    if args.kubernetes {
        tokio::spawn(discover::run(discover::DiscoverInputs {
            node: args.node.clone(),
            proc: scan::ProcRoot::new(&args.proc_dir),
            scope: capture_scope(args),
            snapshot,
            view,
            adopter,
            misses: misses_tx,
        }));
    }
    Ok(Started { sandboxes, misses })
}

/// The processes the agent captures: those under `--cgroup` (all of them at the root).
fn capture_scope(args: &crate::app::RunArgs) -> scan::Scope {
    let dir = args.cgroup.clone().or_else(crate::sys::cgroup2_mount);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match dir {
        Some(dir) => scan::Scope::of_cgroup(&dir, &mountinfo),
        None => scan::Scope::All,
    }
}

/// The agent's namespace list for the fail-closed rule, beside the socket.
pub fn namespaces_file(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or(Path::new("/"))
        .join("cni-namespaces.json")
}

/// The agent's record of pod sandboxes (survives an agent restart), beside the socket.
pub fn pods_file(socket: &Path) -> PathBuf {
    socket
        .parent()
        .unwrap_or(Path::new("/"))
        .join("cni-pods.json")
}

/// Writes `path` whole or not at all: a temporary file in the same directory (a name no
/// runtime reads as a config), synced, then renamed over it.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.nodemesh-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether this process was started as the plugin (`argv[0]` is `nodemesh-cni`).
pub fn invoked_as_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(Path::new)
        .and_then(Path::file_name)
        .is_some_and(|n| n == PLUGIN_TYPE)
}
