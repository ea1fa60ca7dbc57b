//! Kubernetes mode (`mesh-agent run --kubernetes`): the API server's objects, kept current by
//! kube-runtime watchers and reflectors, turned into the same [`Snapshot`] as local mode by
//! the shared [`convert::build`](super::convert::build) and published on the same channel.
//!
//! ```text
//!  watchers (one task per kind) ──reflect──▶ stores ──notes──▶ rebuild task (debounced)
//!    list, watch from its resourceVersion,                      │ convert::build(Mode::Kubernetes)
//!    bookmarks, relist on 410, backoff                          ▼
//!                                                  watch::Sender<Arc<Snapshot>> + ConfigStatus
//! ```
//!
//! Everything runs on the control runtime; the data path only ever sees whole snapshots.
//! Nothing is published until every kind has finished its first list, so the agent never
//! acts on (or unenrolls pods because of) a half-known cluster. After that an invalid object
//! is skipped and logged with its kind, name, field and reason, and the others apply: unlike
//! a manifests directory there is no "last good" whole to fall back on, and one bad object in
//! a cluster must not freeze every other change.

mod access;
mod credentials;
mod rebuild;
mod watchers;

#[cfg(test)]
pub use access::agent_api_access;
pub use access::{ApiAccess, WATCH};
pub use watchers::error_chain;

use std::sync::Arc;

use kube::Client;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::model::Snapshot;
use super::watch::ConfigStatus;

/// Why the Kubernetes source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no Kubernetes client configuration (neither KUBECONFIG / ~/.kube/config nor an \
         in-cluster service account): {0}"
    )]
    Config(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `KUBECONFIG` (or `~/.kube/config`), else the pod's in-cluster service
/// account, as `kubectl` and client-go pick them.
pub async fn client() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await?;
    Ok(Client::try_from(config)?)
}

/// Sync state of one watched kind, for `/status` and `mesh-agent status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ResourceStatus {
    pub kind: &'static str,
    /// The API version watched; `None` while not known (PeerAuthentication: discovery).
    pub api_version: Option<String>,
    /// Field or label selector of the watch, if any.
    pub selector: Option<String>,
    /// The first full list arrived (stays true through later relists, which keep serving
    /// the previous objects until they complete).
    pub synced: bool,
    /// Objects in the store now.
    pub objects: usize,
    /// Of those, skipped as invalid.
    pub invalid: usize,
    /// Latest watch error or invalid object, with when (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Watch errors and invalid objects so far (a 410 Gone relist is not an error).
    pub errors_total: u64,
    /// E.g. that the API server does not serve the kind (Istio CRDs not installed).
    pub note: Option<String>,
}

/// Starts the watchers and the rebuild task on the current (control) runtime. Snapshots go
/// to `snapshots`, numbered after the one in it; the returned status says per kind how the
/// watches are doing and `synced` once the first full snapshot is published.
pub fn spawn(
    client: Client,
    node: String,
    snapshots: watch::Sender<Arc<Snapshot>>,
) -> watch::Receiver<ConfigStatus> {
    let (notes_tx, notes_rx) = mpsc::channel(1024);
    let credentials = credentials::CredentialWatches::new(client.clone(), notes_tx.clone());
    let stores = watchers::start(client, &node, notes_tx);
    let resources = stores.initial_status(&node);
    let status = ConfigStatus {
        source: "kubernetes".into(),
        synced: false,
        resources,
        ..ConfigStatus::default()
    };
    let (status_tx, status_rx) = watch::channel(status);
    let task = rebuild::Rebuild::new(node, stores, credentials, snapshots, status_tx);
    tokio::spawn(task.run(notes_rx));
    status_rx
}

#[cfg(test)]
mod tests;
