//! The Secrets Gateways name, and only those: one watch per Secret, with the field selector
//! `metadata.name=NAME` in its namespace, started when a Gateway comes to name it and stopped
//! when none does. Each Secret is inspected as it arrives ([`inspect`]) and dropped: the
//! agent keeps what it says (valid until, names, or why it is unusable), never its key.
//!
//! RBAC cannot list the names in advance (they are in Gateways, written by users), so the
//! ClusterRole grants `list`/`watch` on secrets; what the agent actually asks for is this
//! narrow set, as `/status` shows (`Secret` objects = credentials watched).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{debug, info};

use super::watchers::{Kind, Note, error_chain};
use crate::config::convert::gateway::inspect;
use crate::config::gateway::{Credential, CredentialState};
use crate::config::model::ObjectRef;
use crate::identity::pki;

type States = Arc<Mutex<BTreeMap<ObjectRef, CredentialState>>>;

/// The running credential watches, owned by the rebuild task.
pub struct CredentialWatches {
    client: Client,
    notes: mpsc::Sender<Note>,
    running: BTreeMap<ObjectRef, AbortHandle>,
    /// What each watched Secret holds, once its first list is in.
    states: States,
}

impl CredentialWatches {
    pub fn new(client: Client, notes: mpsc::Sender<Note>) -> Self {
        CredentialWatches {
            client,
            notes,
            running: BTreeMap::new(),
            states: States::default(),
        }
    }

    /// Watches exactly `wanted`: starts the new ones, stops (and forgets) the others.
    pub fn want(&mut self, wanted: &BTreeSet<&ObjectRef>) {
        let gone: Vec<ObjectRef> = self
            .running
            .keys()
            .filter(|id| !wanted.contains(id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(task) = self.running.remove(&id) {
                task.abort();
            }
            lock(&self.states).remove(&id);
            info!(secret = %id, "no Gateway names this Secret any more; watch stopped");
        }
        for &id in wanted {
            if self.running.contains_key(id) {
                continue;
            }
            info!(secret = %id, "a Gateway names this Secret; watching it");
            let api = Api::namespaced(self.client.clone(), &id.namespace);
            let task = tokio::spawn(watch_one(
                id.clone(),
                api,
                self.states.clone(),
                self.notes.clone(),
            ));
            self.running.insert(id.clone(), task.abort_handle());
        }
    }

    /// The credentials whose first list is in (a Secret still being listed is left out,
    /// which [`build`](crate::config::convert::build) reports as missing until it is).
    pub fn states(&self) -> Vec<Credential> {
        lock(&self.states)
            .iter()
            .map(|(id, state)| Credential {
                id: id.clone(),
                state: state.clone(),
            })
            .collect()
    }

    /// Secrets watched now.
    pub fn watched(&self) -> usize {
        self.running.len()
    }
}

impl Drop for CredentialWatches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

fn lock(states: &States) -> std::sync::MutexGuard<'_, BTreeMap<ObjectRef, CredentialState>> {
    states.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The field selector of one Secret's watch.
pub fn selector(name: &str) -> String {
    format!("metadata.name={name}")
}

/// Watches one Secret by name until aborted, keeping its inspected state in `states`. A valid
/// certificate turns invalid when it expires, without waiting for the Secret to change.
async fn watch_one(id: ObjectRef, api: Api<Secret>, states: States, notes: mpsc::Sender<Note>) {
    let cfg = watcher::Config::default().fields(&selector(&id.name));
    let stream = watcher(api, cfg).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // During a (re)list: what the list has said so far.
    let mut listing: Option<CredentialState> = None;
    // When the certificate in force expires.
    let mut expires: Option<SystemTime> = None;
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(e) => e,
                None => return,
            },
            () = sleep_until(expires) => {
                let at = expires.take().map(pki::rfc3339).unwrap_or_default();
                let reason = format!("the certificate (tls.crt or cert) expired at {at}");
                if !publish(&id, CredentialState::Invalid { reason }, &states, &notes).await {
                    return;
                }
                continue;
            }
        };
        let now = SystemTime::now();
        let state = match event {
            Ok(watcher::Event::Init) => {
                listing = None;
                continue;
            }
            Ok(watcher::Event::InitApply(secret)) => {
                listing = Some(inspect(&secret, now));
                continue;
            }
            Ok(watcher::Event::InitDone) => listing.take().unwrap_or(CredentialState::Missing),
            Ok(watcher::Event::Apply(secret)) => inspect(&secret, now),
            Ok(watcher::Event::Delete(_)) => CredentialState::Missing,
            Err(e) => {
                let error = format!(
                    "{id}: {}",
                    super::access::explain(Kind::Secret, error_chain(&e))
                );
                if notes.send(Note::Error(Kind::Secret, error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        expires = match &state {
            CredentialState::Valid { not_after, .. } => humantime::parse_rfc3339(not_after).ok(),
            _ => None,
        };
        if !publish(&id, state, &states, &notes).await {
            return;
        }
    }
}

/// Until `at` (never for `None`).
async fn sleep_until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// Records a credential's state and tells the rebuild task if it changed; false once the
/// rebuild task is gone.
async fn publish(
    id: &ObjectRef,
    state: CredentialState,
    states: &States,
    notes: &mpsc::Sender<Note>,
) -> bool {
    let changed = lock(states).insert(id.clone(), state.clone()) != Some(state);
    if changed && notes.send(Note::Changed(Kind::Secret)).await.is_err() {
        debug!(secret = %id, "config rebuild task gone; watch stops");
        return false;
    }
    true
}
