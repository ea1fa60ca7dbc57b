//! Test support: a real CA served in-process on 127.0.0.1, and temporary directories.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::auth::StaticTokens;
use super::authority::{Authority, ROOT_CERT};
use super::server::{self, CaService};
use crate::config::model::{ObjectRef, Pod, Snapshot};

pub const SERVER_NAME: &str = super::DEFAULT_SERVER_NAME;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "nodemesh-{tag}-{}-{n}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A snapshot with pods given as (namespace, serviceAccount, node).
pub fn snapshot(pods: &[(&str, &str, &str)]) -> Snapshot {
    let mut s = Snapshot::default();
    for (i, (ns, sa, node)) in pods.iter().enumerate() {
        let id = ObjectRef {
            namespace: ns.to_string(),
            name: format!("{sa}-{i}"),
        };
        s.pods.insert(
            id.clone(),
            Pod {
                id,
                labels: BTreeMap::new(),
                node: Some(node.to_string()),
                ip: None,
                uid: None,
                host_network: false,
                ready: true,
                service_account: sa.to_string(),
                netns: None,
                ports: Vec::new(),
            },
        );
    }
    s
}

/// Tokens: `node-N` has token `token-node-N`.
pub fn tokens(nodes: &[&str]) -> StaticTokens {
    let map = nodes
        .iter()
        .map(|n| (n.to_string(), format!("token-{n}")))
        .collect();
    StaticTokens::new(map, Path::new("test")).unwrap()
}

pub fn service(dir: &Path, pods: &[(&str, &str, &str)], max_ttl: Duration) -> CaService {
    let authority = Arc::new(Authority::load_or_generate(dir).unwrap());
    let (_tx, rx) = watch::channel(Arc::new(snapshot(pods)));
    CaService {
        authority,
        auth: Arc::new(tokens(&["node-1", "node-2"])),
        pods: super::policy::Pods::Manifests(rx),
        trust_domain: "cluster.local".into(),
        max_ttl,
    }
}

/// A CA serving on 127.0.0.1 (state in a temporary directory).
pub struct TestCa {
    pub dir: TempDir,
    pub addr: SocketAddr,
    svc: Arc<CaService>,
    tls: Arc<rustls::ServerConfig>,
    task: Option<JoinHandle<()>>,
}

impl TestCa {
    pub async fn start(pods: &[(&str, &str, &str)]) -> TestCa {
        let dir = TempDir::new("ca");
        let svc = Arc::new(service(dir.path(), pods, Duration::from_secs(24 * 3600)));
        let tls = server::tls_config(&svc.authority, SERVER_NAME).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = Some(tokio::spawn(server::serve(
            listener,
            tls.clone(),
            svc.clone(),
        )));
        TestCa {
            dir,
            addr,
            svc,
            tls,
            task,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join(ROOT_CERT)
    }

    /// Writes `node`'s token to a file and returns its path.
    pub fn token_file(&self, node: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{node}.token"));
        std::fs::write(&p, format!("token-{node}\n")).unwrap();
        p
    }

    /// Stops serving (new connections are refused).
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serves again on the same address.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(server::serve(
            listener,
            self.tls.clone(),
            self.svc.clone(),
        )));
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
