//! [`CertManager`]: one certificate per wanted identity, issued by the mesh CA and renewed
//! at half-life.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::client::CaAddr;
use super::{Identity, pki};

/// Certificate lifetime asked for by default.
#[cfg(test)]
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// First retry delay after a failure; doubles up to [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Never renew sooner than this after an issuance (guards against hot loops with tiny TTLs
/// or skewed clocks).
const MIN_RENEW_DELAY: Duration = Duration::from_millis(500);

/// How to reach the mesh CA and what to ask it for.
#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    pub ca_addr: CaAddr,
    /// DNS name in the CA's serving certificate (e.g. `nodemesh-ca.nodemesh-system.svc`).
    pub ca_server_name: String,
    /// PEM file with the mesh root certificate(s).
    pub ca_root: PathBuf,
    /// The node credential, sent as `Authorization: Bearer <trimmed content>`; re-read for
    /// every request, so a rotated token is picked up.
    pub token_file: PathBuf,
    pub trust_domain: String,
    /// Requested certificate lifetime (the CA may clamp it).
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read the mesh root file {path}: {source}")]
    RootRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the mesh root file {path} is not usable: {reason}")]
    RootInvalid { path: PathBuf, reason: String },
    #[error("cannot set up TLS to the CA: {source}")]
    TlsConfig { source: rustls::Error },
    #[error("invalid CA server name {name:?}")]
    ServerName { name: String },
    #[error("cannot read the node credential {path}: {source}")]
    TokenRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the node credential {path} is empty or has characters not allowed in a header")]
    TokenInvalid { path: PathBuf },
    #[error("cannot make a key or CSR for {identity}: {source}")]
    Csr {
        identity: String,
        source: rcgen::Error,
    },
    #[error("cannot load the new key of {identity}: {source}")]
    Key {
        identity: String,
        source: rustls::Error,
    },
    #[error("cannot connect to the CA at {addr}: {source}")]
    Connect {
        addr: CaAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with the CA at {addr} failed: {source}")]
    Tls {
        addr: CaAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange with the CA at {addr} failed: {source}")]
    Http { addr: CaAddr, source: hyper::Error },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: CaAddr, timeout: Duration },
    #[error("the CA at {addr} refused {identity} (HTTP {status}): {reason}")]
    Refused {
        addr: CaAddr,
        identity: String,
        status: u16,
        reason: String,
    },
    #[error("the CA at {addr} sent a malformed reply for {identity}: {reason}")]
    BadReply {
        addr: CaAddr,
        identity: String,
        reason: String,
    },
    #[error("the certificate the CA at {addr} issued for {identity} is not acceptable: {reason}")]
    BadChain {
        addr: CaAddr,
        identity: String,
        reason: String,
    },
}

/// An issued certificate with its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf and chain up to, not including, the root; key from the provider's key_provider.
    pub certified: Arc<CertifiedKey>,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A cheap, cloneable view of one identity's certificate slot; [`CertHandle::current`] is
/// lock-free and always returns the newest certificate, so a TLS resolver holding a handle
/// rotates certificates without touching established connections.
#[derive(Clone, Debug)]
pub struct CertHandle {
    slot: Arc<ArcSwap<WorkloadCert>>,
}

impl CertHandle {
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.slot.load_full()
    }

    /// A handle holding `cert`, outside any manager (tests of the TLS configs).
    #[cfg(test)]
    pub fn new(cert: WorkloadCert) -> CertHandle {
        CertHandle {
            slot: Arc::new(ArcSwap::from_pointee(cert)),
        }
    }

    /// Replaces the certificate, as a renewal does.
    #[cfg(test)]
    pub fn store(&self, cert: WorkloadCert) {
        self.slot.store(Arc::new(cert));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// No certificate issued yet.
    Pending,
    /// A certificate is in use and not due for renewal.
    Valid,
    /// A certificate is in use and being renewed (or the renewal is failing and retried).
    Renewing,
    /// The last certificate expired and no new one could be had.
    Expired,
}

/// One identity's certificate as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub identity: String,
    pub serial: Option<String>,
    /// RFC 3339 UTC.
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub state: CertState,
    pub last_error: Option<String>,
    /// When the next issuance attempt is planned (renewal or retry), RFC 3339 UTC.
    pub next_renewal: Option<String>,
}

struct Entry {
    /// Distinguishes the task of this entry from an aborted predecessor.
    generation: u64,
    task: Option<AbortHandle>,
    handle: Option<CertHandle>,
    /// An issuance attempt is due or in progress while a certificate is in use.
    renewing: bool,
    last_error: Option<String>,
    next_renewal: Option<SystemTime>,
}

/// State shared by the manager and its per-identity tasks.
pub(super) struct Shared {
    pub(super) cfg: CertManagerConfig,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) roots: Arc<RootCertStore>,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) server_name: rustls_pki_types::ServerName<'static>,
    entries: Mutex<BTreeMap<Identity, Entry>>,
    next_generation: Mutex<u64>,
    changed: watch::Sender<u64>,
}

impl Shared {
    fn entries(&self) -> MutexGuard<'_, BTreeMap<Identity, Entry>> {
        // A panic while holding the lock cannot leave the map inconsistent (single updates).
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn update(&self, id: &Identity, generation: u64, f: impl FnOnce(&mut Entry)) -> bool {
        let mut entries = self.entries();
        match entries.get_mut(id) {
            Some(e) if e.generation == generation => {
                f(e);
                true
            }
            _ => false,
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for e in self.shared.entries().values() {
            if let Some(t) = &e.task {
                t.abort();
            }
        }
    }
}

/// Keeps a certificate for each wanted identity. Cloning is cheap; the tasks stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ca_addr", &self.inner.shared.cfg.ca_addr)
            .field("trust_domain", &self.inner.shared.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// Loads the mesh root(s) and prepares the TLS client to the CA. Starts nothing.
    pub fn new(cfg: CertManagerConfig) -> Result<CertManager, CertError> {
        let provider = pki::provider();
        let pem = std::fs::read(&cfg.ca_root).map_err(|source| CertError::RootRead {
            path: cfg.ca_root.clone(),
            source,
        })?;
        let invalid = |reason: String| CertError::RootInvalid {
            path: cfg.ca_root.clone(),
            reason,
        };
        let certs = pki::certs_from_pem(&pem).map_err(invalid)?;
        let roots = Arc::new(pki::root_store(&certs).map_err(invalid)?);
        let server_name = rustls_pki_types::ServerName::try_from(cfg.ca_server_name.clone())
            .map_err(|_| CertError::ServerName {
                name: cfg.ca_server_name.clone(),
            })?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| CertError::TlsConfig { source })?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (changed, _) = watch::channel(0);
        Ok(CertManager {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    cfg,
                    provider,
                    roots,
                    tls: Arc::new(tls),
                    server_name,
                    entries: Mutex::new(BTreeMap::new()),
                    next_generation: Mutex::new(0),
                    changed,
                }),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.shared().roots.clone()
    }

    pub fn trust_domain(&self) -> &str {
        &self.shared().cfg.trust_domain
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.shared().provider.clone()
    }

    /// Sets the wanted identities. New ones get a task (spawned on the current tokio
    /// runtime) that obtains and renews their certificate; removed ones have their task
    /// aborted and their certificate dropped. Must be called within a tokio runtime.
    pub fn want(&self, ids: BTreeSet<Identity>) {
        let shared = self.shared();
        let mut changed = false;
        {
            let mut entries = shared.entries();
            entries.retain(|id, e| {
                let keep = ids.contains(id);
                if !keep {
                    if let Some(t) = &e.task {
                        t.abort();
                    }
                    info!(identity = %id, "identity no longer wanted; certificate dropped");
                    changed = true;
                }
                keep
            });
            for id in ids {
                if entries.contains_key(&id) {
                    continue;
                }
                let generation = {
                    let mut g = shared
                        .next_generation
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *g += 1;
                    *g
                };
                // Spawned while holding the lock: the task's first update waits for the
                // entry to exist.
                let task = tokio::spawn(maintain(shared.clone(), id.clone(), generation));
                entries.insert(
                    id,
                    Entry {
                        generation,
                        task: Some(task.abort_handle()),
                        handle: None,
                        renewing: false,
                        last_error: None,
                        next_renewal: None,
                    },
                );
            }
        }
        if changed {
            shared.bump();
        }
    }

    /// The certificate slot of `id`, once a certificate was issued.
    pub fn handle(&self, id: &Identity) -> Option<CertHandle> {
        self.shared()
            .entries()
            .get(id)
            .and_then(|e| e.handle.clone())
    }

    /// Bumped whenever a certificate is issued, renewed or fails, or an identity is dropped.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.shared().changed.subscribe()
    }

    /// Every wanted identity with its certificate state, sorted by identity.
    pub fn view(&self) -> Vec<CertView> {
        let now = SystemTime::now();
        self.shared()
            .entries()
            .iter()
            .map(|(id, e)| {
                let cert = e.handle.as_ref().map(CertHandle::current);
                let state = match &cert {
                    None => CertState::Pending,
                    Some(c) if now >= c.not_after => CertState::Expired,
                    Some(_) if e.renewing => CertState::Renewing,
                    Some(_) => CertState::Valid,
                };
                CertView {
                    identity: id.to_string(),
                    serial: cert.as_ref().map(|c| c.serial.clone()),
                    not_before: cert.as_ref().map(|c| pki::rfc3339(c.not_before)),
                    not_after: cert.as_ref().map(|c| pki::rfc3339(c.not_after)),
                    state,
                    last_error: e.last_error.clone(),
                    next_renewal: e.next_renewal.map(pki::rfc3339),
                }
            })
            .collect()
    }
}

/// When to renew a certificate obtained by a request sent at `sent`: half-way from then to
/// its expiry (the CA back-dates notBefore, so that is not used).
fn renewal_time(sent: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(sent).unwrap_or_default();
    sent + (life / 2).max(MIN_RENEW_DELAY)
}

/// Exponential backoff with jitter: 1 s doubling to 60 s, each delay drawn in [75%, 100%].
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_START,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        let r = pki::random_bytes::<1>().map_or(255, |b| b[0]);
        base.mul_f64(0.75 + 0.25 * f64::from(r) / 255.0)
    }
}

async fn sleep_until(t: SystemTime) {
    let d = t.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(d).await;
}

/// The life of one identity: issue, sleep until half-life, renew; retry failures.
async fn maintain(shared: Arc<Shared>, id: Identity, generation: u64) {
    let mut backoff = Backoff::new();
    loop {
        if !shared.update(&id, generation, |e| e.renewing = e.handle.is_some()) {
            return;
        }
        let sent = SystemTime::now();
        match super::client::issue(&shared, &id).await {
            Ok(cert) => {
                backoff.reset();
                let renew_at = renewal_time(sent, cert.not_after);
                info!(
                    identity = %id,
                    serial = %cert.serial,
                    not_after = %pki::rfc3339(cert.not_after),
                    renew_at = %pki::rfc3339(renew_at),
                    "certificate issued"
                );
                let cert = Arc::new(cert);
                let stored = shared.update(&id, generation, |e| {
                    match &e.handle {
                        Some(h) => h.slot.store(cert),
                        None => {
                            e.handle = Some(CertHandle {
                                slot: Arc::new(ArcSwap::new(cert)),
                            })
                        }
                    }
                    e.renewing = false;
                    e.last_error = None;
                    e.next_renewal = Some(renew_at);
                });
                if !stored {
                    return;
                }
                shared.bump();
                sleep_until(renew_at).await;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                let retry_at = SystemTime::now() + delay;
                let mut expired = false;
                let recorded = shared.update(&id, generation, |e| {
                    e.last_error = Some(err.to_string());
                    e.next_renewal = Some(retry_at);
                    expired = e
                        .handle
                        .as_ref()
                        .is_some_and(|h| SystemTime::now() >= h.current().not_after);
                });
                if !recorded {
                    return;
                }
                if expired {
                    warn!(identity = %id, error = %err, retry_in = ?delay,
                        "certificate expired and renewal failed");
                } else {
                    warn!(identity = %id, error = %err, retry_in = ?delay,
                        "certificate request failed");
                }
                shared.bump();
                sleep_until(retry_at).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_from_the_request() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renewal_time(t, t + Duration::from_secs(3600)),
            t + Duration::from_secs(1800)
        );
        // Already expired or tiny: not sooner than the floor.
        assert_eq!(renewal_time(t, t), t + MIN_RENEW_DELAY);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new();
        let mut prev_base = Duration::ZERO;
        for i in 0..10 {
            let base = (BACKOFF_START * 2u32.pow(i)).min(BACKOFF_CAP);
            let d = b.next_delay();
            assert!(
                d <= base && d >= base.mul_f64(0.75),
                "{i}: {d:?} vs {base:?}"
            );
            assert!(base >= prev_base);
            prev_base = base;
        }
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }
}
