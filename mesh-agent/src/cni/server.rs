//! The agent's CNI socket: receives the plugin's ADD, DEL and CHECK, keeps the registry of pod
//! sandboxes the enroller reads, and answers ADD only once the pod's fate is known. Runs on
//! the control runtime; the data path never sees any of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::namespaces::NamespaceCache;
use super::protocol::{self, Command, Reply, Request, Valid};
use super::registry::{CniPod, CniPods, NetnsId};
use crate::admin::ControlView;
use crate::config::model::{ENROLL_LABEL, ObjectRef, Snapshot};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent answers this long before the plugin's own deadline.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// DEL waits at most this for the unenrollment to show.
const DEL_WAIT: Duration = Duration::from_secs(10);
/// How often sandboxes whose namespace is gone are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// What the CNI server reads from the rest of the agent.
pub struct CniServerInputs {
    pub socket: PathBuf,
    pub node: String,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub view: watch::Receiver<Arc<ControlView>>,
}

struct Shared {
    node: String,
    socket: PathBuf,
    pods_file: PathBuf,
    pods: watch::Sender<Arc<CniPods>>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    view: watch::Receiver<Arc<ControlView>>,
}

/// Records sandboxes found without the plugin: pods that were running before the agent
/// ([`super::discover`]). Same registry, same file, same enrollment as an ADD.
#[derive(Clone)]
pub struct Adopter(Arc<Shared>);

impl Adopter {
    /// Records `pod` as `id`'s sandbox unless one is recorded already (an ADD that raced the
    /// scan wins); whether it was recorded.
    pub fn adopt(&self, id: &ObjectRef, pod: CniPod) -> bool {
        let adopted = self.0.pods.send_if_modified(|pods| {
            if pods.get(id).is_some() {
                return false;
            }
            let mut next = (**pods).clone();
            next.insert(id.clone(), pod);
            *pods = Arc::new(next);
            true
        });
        if adopted {
            save(&self.0);
        }
        adopted
    }

    /// The registry as it is now.
    pub fn pods(&self) -> Arc<CniPods> {
        self.0.pods.borrow().clone()
    }
}

/// Binds the socket (root only), loads the sandboxes a previous agent recorded and starts
/// serving. The returned channel is the registry: it changes on every ADD, DEL and prune.
pub fn start(inputs: CniServerInputs) -> anyhow::Result<(watch::Receiver<Arc<CniPods>>, Adopter)> {
    let listener = crate::admin::bind_unix(&inputs.socket).with_context(|| {
        format!(
            "binding the CNI socket {} (--cni-socket)",
            inputs.socket.display()
        )
    })?;
    let pods_file = super::pods_file(&inputs.socket);
    let pods = CniPods::load(&pods_file);
    let (tx, rx) = watch::channel(Arc::new(pods));
    let shared = Arc::new(Shared {
        node: inputs.node,
        socket: inputs.socket,
        pods_file,
        pods: tx,
        snapshot: inputs.snapshot,
        view: inputs.view,
    });
    info!(socket = %shared.socket.display(), sandboxes = rx.borrow().len(), "CNI socket listening");
    tokio::spawn(accept(listener, shared.clone()));
    tokio::spawn(write_namespaces(shared.clone()));
    tokio::spawn(prune(shared.clone()));
    Ok((rx, Adopter(shared)))
}

async fn accept(listener: UnixListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_conn(&shared, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Only root (or the agent's own user) may talk to the agent about namespaces.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if cred.uid() == 0 || cred.uid() == own {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use the CNI socket (root only)",
            cred.uid()
        ))
    }
}

async fn serve_conn(shared: &Shared, stream: UnixStream) {
    if let Err(e) = peer_allowed(&stream) {
        warn!(error = %e, "CNI socket: connection refused");
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(protocol::MAX_MESSAGE as u64);
    let got = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match got {
        Err(_) => failed(format!("no complete request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => failed(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.last() != Some(&b'\n') => failed(format!(
            "the request is not one line of at most {} bytes",
            protocol::MAX_MESSAGE
        )),
        Ok(Ok(_)) => {
            line.pop();
            match protocol::decode::<Request>(&line).and_then(|r| r.validate()) {
                Ok(req) => serve(shared, req).await,
                Err(e) => failed(format!("invalid request: {e}")),
            }
        }
    };
    if let Reply::Failed { message } = &reply {
        warn!(%message, "CNI request failed");
    }
    if let Err(e) = write.write_all(&protocol::encode(&reply)).await {
        debug!(error = %e, "CNI client went away before the reply");
    }
    // Closing with unread input would reset the connection before the client reads the
    // reply: take (a bounded amount of) what is left, briefly.
    let _ = write.shutdown().await;
    let mut rest = reader.into_inner().take(1 << 20);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::copy(&mut rest, &mut tokio::io::sink()),
    )
    .await;
}

fn failed(message: String) -> Reply {
    Reply::Failed { message }
}

async fn serve(shared: &Shared, req: Valid) -> Reply {
    let id = ObjectRef {
        namespace: req.namespace.clone(),
        name: req.name.clone(),
    };
    match req.command {
        Command::Add => add(shared, id, req).await,
        Command::Del => del(shared, id, req).await,
        Command::Check => check(shared, &id, &req),
    }
}

async fn add(shared: &Shared, id: ObjectRef, req: Valid) -> Reply {
    let deadline = Instant::now() + req.timeout.saturating_sub(ANSWER_MARGIN);
    let Some(netns) = req.netns else {
        return failed("ADD without a network namespace".into());
    };
    let netns_id = match NetnsId::probe(&netns) {
        Ok(n) => n,
        Err(e) => return failed(e),
    };
    info!(pod = %id, container = %req.container_id, netns = %netns.display(), "CNI ADD");
    let entry = CniPod {
        container_id: req.container_id,
        netns: netns.clone(),
        netns_id,
        ip: req.ip,
    };
    shared.pods.send_modify(|pods| {
        let mut next = (**pods).clone();
        next.insert(id.clone(), entry);
        *pods = Arc::new(next);
    });
    save(shared);
    let reply = wait(shared, deadline, |snap, view| {
        decide(&shared.node, snap, view, &id, &netns)
    })
    .await;
    info!(pod = %id, ?reply, "CNI ADD answered");
    reply
}

async fn del(shared: &Shared, id: ObjectRef, req: Valid) -> Reply {
    let mut removed = None;
    shared.pods.send_if_modified(|pods| {
        let netns = pods.get(&id).map(|p| p.netns.clone());
        let mut next = (**pods).clone();
        if next.remove(&id, &req.container_id) {
            removed = netns;
            *pods = Arc::new(next);
            return true;
        }
        false
    });
    let Some(netns) = removed else {
        info!(pod = %id, container = %req.container_id, "CNI DEL of a sandbox the agent does not have");
        return Reply::Deleted { known: false };
    };
    save(shared);
    let deadline = Instant::now() + req.timeout.saturating_sub(ANSWER_MARGIN).min(DEL_WAIT);
    let done = wait(shared, deadline, |_, view| {
        let enrolled = view.workloads.iter().any(|w| {
            w.namespace == id.namespace
                && w.name == id.name
                && w.state == "enrolled"
                && w.netns == netns
        });
        if enrolled {
            Err("still enrolled".into())
        } else {
            Ok(Reply::Deleted { known: true })
        }
    })
    .await;
    if let Reply::Failed { message } = done {
        // DEL succeeds regardless: the sandbox is forgotten, the enroller catches up.
        warn!(pod = %id, %message, "CNI DEL: unenrollment not seen in time");
    }
    info!(pod = %id, netns = %netns.display(), "CNI DEL: sandbox forgotten, pod unenrolled");
    Reply::Deleted { known: true }
}

fn check(shared: &Shared, id: &ObjectRef, req: &Valid) -> Reply {
    let pods = shared.pods.borrow().clone();
    let recorded = pods
        .get(id)
        .filter(|p| p.container_id == req.container_id && Some(&p.netns) == req.netns.as_ref());
    let Some(p) = recorded else {
        return failed(format!(
            "the agent has no record of sandbox {} of pod {id} (its ADD did not reach this agent)",
            req.container_id
        ));
    };
    let (snap, view) = (
        shared.snapshot.borrow().clone(),
        shared.view.borrow().clone(),
    );
    decide(&shared.node, &snap, &view, id, &p.netns).unwrap_or_else(failed)
}

/// Re-evaluates `f` on every config or enrollment change until it decides or `deadline`
/// passes; then the last reason it gave is the failure.
async fn wait(
    shared: &Shared,
    deadline: Instant,
    f: impl Fn(&Snapshot, &ControlView) -> Result<Reply, String>,
) -> Reply {
    let (mut snap, mut view) = (shared.snapshot.clone(), shared.view.clone());
    let started = Instant::now();
    loop {
        let current = {
            let s = snap.borrow_and_update().clone();
            let v = view.borrow_and_update().clone();
            f(&s, &v)
        };
        let reason = match current {
            Ok(reply) => return reply,
            Err(reason) => reason,
        };
        tokio::select! {
            r = snap.changed() => if r.is_err() { return failed("the agent is stopping".into()) },
            r = view.changed() => if r.is_err() { return failed("the agent is stopping".into()) },
            _ = tokio::time::sleep_until(deadline) => {
                return failed(format!("not decided after {:.1}s: {reason}", started.elapsed().as_secs_f64()));
            }
        }
    }
}

/// The pod's fate as far as it is known: `Ok` enrolled or not meshed, `Err` why it is not
/// known yet.
fn decide(
    node: &str,
    snap: &Snapshot,
    view: &ControlView,
    id: &ObjectRef,
    netns: &Path,
) -> Result<Reply, String> {
    if !view.config_synced {
        return Err("the agent has not finished its first sync with the API server".into());
    }
    let not_meshed = |reason: String| Ok(Reply::NotMeshed { reason });
    let namespace = snap.namespaces.get(&id.namespace);
    if namespace.is_some_and(|n| !n.enrolled()) {
        return not_meshed(format!(
            "namespace {} is not labelled {ENROLL_LABEL}=true",
            id.namespace
        ));
    }
    let Some(pod) = snap
        .pods
        .get(id)
        .filter(|p| p.node.as_deref() == Some(node))
    else {
        return Err(format!(
            "pod {id} is not in the agent's config for node {node} (its API watch may be \
             behind, or the pod's spec.nodeName is another node)"
        ));
    };
    if pod.host_network {
        return not_meshed("hostNetwork pod".into());
    }
    if pod.opted_out() {
        return not_meshed(format!("the pod opted out with label {ENROLL_LABEL}=false"));
    }
    if namespace.is_none() {
        return Err(format!(
            "namespace {} is not in the agent's config yet",
            id.namespace
        ));
    }
    let workload = view
        .workloads
        .iter()
        .find(|w| w.namespace == id.namespace && w.name == id.name);
    match workload {
        Some(w) if w.state == "enrolled" && w.netns == netns => Ok(Reply::Enrolled {
            netns_cookie: w.netns_cookie,
        }),
        Some(w) if w.state == "enrolled" => Err(format!(
            "still enrolled in its previous sandbox's namespace {}",
            w.netns.display()
        )),
        Some(w) if w.state == "failed" => Err(format!(
            "enrolling failed (retried): {}",
            w.error.as_deref().unwrap_or("unknown error")
        )),
        _ => Err("waiting for the agent to enroll it".into()),
    }
}

fn save(shared: &Shared) {
    let pods = shared.pods.borrow().clone();
    if let Err(e) = pods.save(&shared.pods_file) {
        warn!(path = %shared.pods_file.display(), error = %e, "cannot record the CNI pod sandboxes; a restarted agent will not know them");
    }
}

/// Keeps the namespace list of the fail-closed rule current, once the config is complete.
async fn write_namespaces(shared: Arc<Shared>) {
    let path = super::namespaces_file(&shared.socket);
    let (mut snap, mut view) = (shared.snapshot.clone(), shared.view.clone());
    let mut last = None;
    loop {
        if view.borrow_and_update().config_synced {
            let cache = NamespaceCache::from_snapshot(&shared.node, &snap.borrow_and_update());
            if last.as_ref() != Some(&cache.namespaces) {
                match cache.save(&path) {
                    Ok(()) => {
                        debug!(path = %path.display(), namespaces = cache.namespaces.len(), "namespace list for the CNI plugin written");
                        last = Some(cache.namespaces);
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot write the namespace list for the CNI plugin")
                    }
                }
            }
        }
        tokio::select! {
            r = snap.changed() => if r.is_err() { return },
            r = view.changed() => if r.is_err() { return },
        }
    }
}

/// Forgets sandboxes whose network namespace is gone (a DEL that never reached the agent).
async fn prune(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tick.tick().await;
        let mut next = (**shared.pods.borrow()).clone();
        let gone = next.prune();
        if gone.is_empty() {
            continue;
        }
        for (id, why) in &gone {
            info!(pod = %id, %why, "forgetting a pod sandbox");
        }
        shared.pods.send_replace(Arc::new(next));
        save(&shared);
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
