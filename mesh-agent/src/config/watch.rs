//! Local mode: re-read the manifests directory when it changes and publish new snapshots.
//!
//! Startup calls [`initial`] (a bad directory is fatal then, and only then), then starts the
//! watcher. At runtime a broken directory never takes the agent down: the error is logged
//! and shown in [`ConfigStatus`], and the last good snapshot stays in force.
//!
//! ```ignore
//! let loaded = config::watch::initial(&dir)?; // print the error and exit on Err
//! let fingerprint = loaded.fingerprint;
//! let (snap_tx, snap_rx) = tokio::sync::watch::channel(Arc::new(loaded.snapshot));
//! // inside a tokio runtime:
//! let status_rx = config::watch::spawn_from(dir, snap_tx, fingerprint);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::manifests::{self, ConfigError, LoadStats, LoadedManifests};
use super::model::Snapshot;

/// Quiet period after a file event before reloading (editors write in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Upper bound on the debounce when events keep coming.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// Fallback rescan period, for changes inotify does not report (directory replaced, NFS, ...).
pub const RESCAN: Duration = Duration::from_secs(2);

/// How the config source is doing; for the admin API. Published on its own watch channel,
/// only by the source's task; the data path never reads it. Local mode fills `dir` and
/// `fingerprint`; Kubernetes mode fills `resources`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConfigStatus {
    /// `manifests` or `kubernetes`.
    pub source: String,
    /// The first full config is in force. Always true in local mode (startup loads it);
    /// in Kubernetes mode, once every kind's first list arrived and a snapshot was built.
    pub synced: bool,
    /// Kubernetes mode: sync state per watched kind.
    pub resources: Vec<super::kube::ResourceStatus>,
    pub dir: PathBuf,
    /// Generation of the snapshot in force.
    pub generation: u64,
    /// Fingerprint of the directory content the snapshot in force was built from.
    pub fingerprint: u64,
    /// When the snapshot in force was loaded.
    pub last_loaded: SystemTime,
    pub stats: LoadStats,
    /// The error of the latest load attempt, one problem per line; `None` when the snapshot
    /// in force reflects the directory's current content.
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// Failed loads (each distinct broken content counts once).
    pub errors_total: u64,
    /// Snapshots applied after the initial one.
    pub reloads_total: u64,
}

impl ConfigStatus {
    /// The status of a snapshot just applied from content with this fingerprint. `stats`
    /// only counts objects (files and documents are counted by the next reload).
    pub fn new(dir: &Path, snapshot: &Snapshot, fingerprint: u64) -> Self {
        ConfigStatus {
            source: "manifests".into(),
            synced: true,
            dir: dir.to_path_buf(),
            generation: snapshot.generation,
            fingerprint,
            last_loaded: SystemTime::now(),
            stats: LoadStats::of(snapshot),
            ..ConfigStatus::default()
        }
    }
}

impl Default for ConfigStatus {
    fn default() -> Self {
        ConfigStatus {
            source: String::new(),
            synced: false,
            resources: Vec::new(),
            dir: PathBuf::new(),
            generation: 0,
            fingerprint: 0,
            last_loaded: SystemTime::UNIX_EPOCH,
            stats: LoadStats::default(),
            last_error: None,
            last_error_at: None,
            errors_total: 0,
            reloads_total: 0,
        }
    }
}

/// Startup load: the snapshot has generation 1. On error the caller prints it and exits.
pub fn initial(dir: &Path) -> Result<LoadedManifests, ConfigError> {
    let mut loaded = manifests::load_dir(dir)?;
    loaded.snapshot.generation = 1;
    let s = loaded.stats;
    if s.files == 0 {
        warn!(dir = %dir.display(), "manifests directory has no *.yaml or *.yml files");
    }
    info!(
        dir = %dir.display(), generation = 1, files = s.files, namespaces = s.namespaces,
        pods = s.pods, services = s.services, endpoints = s.endpoints,
        peer_authentications = s.peer_authentications, ignored = s.ignored, "manifests loaded"
    );
    Ok(loaded)
}

/// Spawn [`watch_dir`] on the current tokio runtime, starting from the snapshot in
/// `snapshots`, which was loaded from content with `fingerprint` (see [`initial`]).
pub fn spawn_from(
    dir: PathBuf,
    snapshots: watch::Sender<Arc<Snapshot>>,
    fingerprint: u64,
) -> watch::Receiver<ConfigStatus> {
    let status = ConfigStatus::new(&dir, &snapshots.borrow(), fingerprint);
    let (status_tx, status_rx) = watch::channel(status);
    tokio::spawn(watch_dir(dir, snapshots, status_tx));
    status_rx
}

/// What one look at the directory found.
#[derive(Debug)]
pub enum Outcome {
    /// Same content as the snapshot in force.
    Unchanged,
    /// Same broken content (or the same read error) as last time: already reported.
    StillFailing,
    /// New content that loads; not yet numbered (generation 0).
    Loaded(Box<LoadedManifests>),
    /// New content that does not load. `fingerprint` is `None` when the directory could not
    /// be read at all.
    Failed {
        fingerprint: Option<u64>,
        error: ConfigError,
    },
}

/// The reload state machine, without channels or timers (blocking file I/O).
#[derive(Debug)]
pub struct Reloader {
    dir: PathBuf,
    applied: u64,
    /// Fingerprint (or, for unreadable directories, the message) of the last failure.
    failed: Option<Result<u64, String>>,
}

impl Reloader {
    pub fn new(dir: PathBuf, applied_fingerprint: u64) -> Self {
        Reloader {
            dir,
            applied: applied_fingerprint,
            failed: None,
        }
    }

    pub fn check(&mut self) -> Outcome {
        let sources = match manifests::read_sources(&self.dir) {
            Ok(s) => s,
            Err(error) => {
                let key = Err(error.to_string());
                if self.failed.as_ref() == Some(&key) {
                    return Outcome::StillFailing;
                }
                self.failed = Some(key);
                return Outcome::Failed {
                    fingerprint: None,
                    error,
                };
            }
        };
        let fp = sources.fingerprint;
        if fp == self.applied {
            self.failed = None;
            return Outcome::Unchanged;
        }
        if self.failed == Some(Ok(fp)) {
            return Outcome::StillFailing;
        }
        match manifests::load_sources(&sources) {
            Ok(loaded) => {
                self.applied = fp;
                self.failed = None;
                Outcome::Loaded(Box::new(loaded))
            }
            Err(error) => {
                self.failed = Some(Ok(fp));
                Outcome::Failed {
                    fingerprint: Some(fp),
                    error,
                }
            }
        }
    }
}

/// Events that may mean content changed (we ignore opens and reads, including our own).
fn relevant(event: &Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watch `dir` and publish each new good snapshot on `snapshots` with generation + 1.
/// Starts from the snapshot and status currently in the channels (see [`initial`]); returns
/// when every snapshot receiver is dropped. Never exits the process.
pub async fn watch_dir(
    dir: PathBuf,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<ConfigStatus>,
) {
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
    let on_event = move |res: notify::Result<Event>| {
        let wake = match &res {
            Ok(ev) => relevant(ev),
            Err(e) => {
                debug!(error = %e, "manifests watch error");
                true
            }
        };
        if wake {
            // Full means a wake-up is already pending; closed means we are shutting down.
            let _ = ev_tx.try_send(());
        }
    };
    // Kept alive for the whole loop; dropping it stops the inotify watch.
    let _watcher = match notify::recommended_watcher(on_event) {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                warn!(
                    dir = %dir.display(), error = %e,
                    "cannot watch manifests directory; rescanning every {RESCAN:?}"
                );
                None
            }
        },
        Err(e) => {
            warn!(error = %e, "cannot create file watcher; rescanning manifests every {RESCAN:?}");
            None
        }
    };
    let mut reloader = Reloader::new(dir.clone(), status.borrow().fingerprint);
    let mut rescan = tokio::time::interval(RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.tick().await; // the first tick is immediate; `initial` just loaded
    loop {
        tokio::select! {
            _ = snapshots.closed() => {
                debug!("no snapshot receivers left; manifests watcher stops");
                return;
            }
            Some(()) = ev_rx.recv() => debounce(&mut ev_rx).await,
            _ = rescan.tick() => {}
        }
        // File reads and parsing are blocking work: keep them off the runtime's workers.
        let check = move || {
            let outcome = reloader.check();
            (reloader, outcome)
        };
        let outcome;
        (reloader, outcome) = match tokio::task::spawn_blocking(check).await {
            Ok(done) => done,
            Err(e) => {
                error!(error = %e, "manifests reload panicked; manifests watcher stops");
                return;
            }
        };
        apply(&dir, outcome, &snapshots, &status);
    }
}

/// Wait until events stop for [`DEBOUNCE`] (at most [`MAX_DEBOUNCE`]).
async fn debounce(rx: &mut mpsc::Receiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        let quiet = tokio::time::sleep(DEBOUNCE);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            more = rx.recv() => if more.is_none() { return },
            _ = quiet => return,
        }
    }
}

/// Publish the outcome of a check: new snapshot and status, or the error in status.
fn apply(
    dir: &Path,
    outcome: Outcome,
    snapshots: &watch::Sender<Arc<Snapshot>>,
    status: &watch::Sender<ConfigStatus>,
) {
    match outcome {
        Outcome::StillFailing => {}
        Outcome::Unchanged => {
            status.send_if_modified(|st| {
                let was_failing = st.last_error.take().is_some();
                if was_failing {
                    let generation = st.generation;
                    info!(dir = %dir.display(), generation, "manifests back to the applied content");
                }
                was_failing
            });
        }
        Outcome::Loaded(loaded) => {
            let LoadedManifests {
                mut snapshot,
                fingerprint,
                stats,
            } = *loaded;
            let generation = snapshots.borrow().generation + 1;
            snapshot.generation = generation;
            // Status first: whoever sees the new snapshot also sees its status.
            status.send_modify(|st| {
                st.generation = generation;
                st.fingerprint = fingerprint;
                st.last_loaded = SystemTime::now();
                st.stats = stats;
                st.last_error = None;
                st.reloads_total += 1;
            });
            snapshots.send_replace(Arc::new(snapshot));
            info!(
                dir = %dir.display(), generation, files = stats.files, namespaces = stats.namespaces,
                pods = stats.pods, services = stats.services, endpoints = stats.endpoints,
                peer_authentications = stats.peer_authentications, ignored = stats.ignored,
                "manifests reloaded"
            );
        }
        Outcome::Failed { fingerprint, error } => {
            let generation = snapshots.borrow().generation;
            error!(
                dir = %dir.display(), errors = error.errors.len(), generation, fingerprint,
                "manifests not applied, keeping generation {generation}:\n{error}"
            );
            status.send_modify(|st| {
                st.last_error = Some(error.to_string());
                st.last_error_at = Some(SystemTime::now());
                st.errors_total += 1;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.0.1}\n";

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("nodemesh-watch-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            TempDir(dir)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).expect("write");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reloader_reports_each_change_once() {
        let dir = TempDir::new("reloader");
        dir.write("a.yaml", POD);
        let first = initial(&dir.0).expect("initial");
        assert_eq!(first.snapshot.generation, 1);
        let mut r = Reloader::new(dir.0.clone(), first.fingerprint);
        assert!(matches!(r.check(), Outcome::Unchanged));
        dir.write("a.yaml", &POD.replace("name: c", "name: c, imagee: x"));
        let Outcome::Failed {
            fingerprint: Some(_),
            error,
        } = r.check()
        else {
            panic!("expected failure")
        };
        assert!(
            error.to_string().contains("spec.containers[0].imagee"),
            "{error}"
        );
        assert!(matches!(r.check(), Outcome::StillFailing));
        dir.write(
            "b.yaml",
            &POD.replace("name: a", "name: b").replace(".1}", ".2}"),
        );
        assert!(matches!(r.check(), Outcome::Failed { .. }));
        dir.write("a.yaml", POD);
        let Outcome::Loaded(loaded) = r.check() else {
            panic!("expected a load")
        };
        assert_eq!(loaded.snapshot.pods.len(), 2);
        assert!(matches!(r.check(), Outcome::Unchanged));
        std::fs::remove_dir_all(&dir.0).expect("rm");
        assert!(matches!(
            r.check(),
            Outcome::Failed {
                fingerprint: None,
                ..
            }
        ));
        assert!(matches!(r.check(), Outcome::StillFailing));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn watcher_publishes_good_snapshots_and_keeps_them_on_error() {
        let dir = TempDir::new("task");
        dir.write("a.yaml", POD);
        let loaded = initial(&dir.0).expect("initial");
        let status = ConfigStatus::new(&dir.0, &loaded.snapshot, loaded.fingerprint);
        let (status_tx, mut status) = watch::channel(status);
        let (snap_tx, mut snapshots) = watch::channel(Arc::new(loaded.snapshot));
        let task = tokio::spawn(watch_dir(dir.0.clone(), snap_tx, status_tx));
        let wait = Duration::from_secs(10);
        tokio::time::sleep(Duration::from_millis(100)).await; // let the task set up its watch
        dir.write(
            "b.yaml",
            &POD.replace("name: a", "name: b").replace(".1}", ".2}"),
        );
        tokio::time::timeout(wait, snapshots.changed())
            .await
            .expect("reload in time")
            .expect("open");
        let snap = snapshots.borrow_and_update().clone();
        assert_eq!((snap.generation, snap.pods.len()), (2, 2));
        dir.write("b.yaml", "kind: [");
        tokio::time::timeout(wait, status.wait_for(|s| s.last_error.is_some()))
            .await
            .expect("error in time")
            .expect("open");
        assert_eq!(status.borrow().errors_total, 1);
        assert_eq!(snapshots.borrow().generation, 2, "last good snapshot kept");
        std::fs::remove_file(dir.0.join("b.yaml")).expect("rm");
        tokio::time::timeout(wait, snapshots.changed())
            .await
            .expect("reload in time")
            .expect("open");
        let st = status.borrow().clone();
        assert_eq!(
            (st.generation, st.reloads_total, st.last_error.is_none()),
            (3, 2, true)
        );
        drop(snapshots);
        tokio::time::timeout(wait, task)
            .await
            .expect("task ends")
            .expect("no panic");
    }
}
