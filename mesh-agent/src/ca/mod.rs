//! `mesh-agent ca`: the mesh certificate authority.
//!
//! Agents send a CSR for each service account with pods on their node; the CA signs it when
//! the caller's credential maps to a node that has such a pod (see [`policy`]). The root
//! comes from a Kubernetes TLS Secret's files (`--root-dir`, bring your own, e.g. from
//! cert-manager), from a TLS Secret read through the API server and generated into it when
//! absent (`--root-secret`, cluster mode, see [`root_secret`]), or is generated once into
//! `--state-dir`.

pub mod auth;
pub mod authority;
pub mod cluster;
pub mod policy;
pub mod root_secret;
pub mod server;
#[cfg(test)]
pub mod testing;
pub mod token_review;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use clap::{ArgGroup, Args, Subcommand};
use tracing::info;

use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};

use crate::config::kube::{ApiAccess, WATCH};
use crate::config::model::ROOT_NAMESPACE;
use crate::identity::{Identity, pki};
use auth::NodeAuthenticator;
use authority::{Authority, write_file};
use policy::Pods;
use root_secret::{DEFAULT_ROOT_CONFIGMAP, DEFAULT_ROOT_SECRET, SecretRef};
use token_review::{DEFAULT_AGENT_ACCOUNT, DEFAULT_AUDIENCE, ServiceAccountUser};

/// `mesh-agent ca --help`.
pub const LONG_ABOUT: &str = "The nodemesh certificate authority.\n\n\
Without a subcommand, serves the signing API over TLS 1.3 (POST /v1/sign, GET /v1/roots, \
GET /healthz/ready). An agent authenticates with its node credential (`Authorization: Bearer \
<token>`) and sends a CSR whose only SAN is spiffe://<trust-domain>/ns/<ns>/sa/<sa>; the CA \
signs it only if a pod of that namespace and service account is scheduled on the agent's node.\n\n\
Local mode (--manifests, --node-credentials) learns pods from a directory of YAML and agents \
by static node tokens. Cluster mode (--kubernetes) learns pods from the API server and \
authenticates each agent by a TokenReview of its projected service-account token (audience \
--audience, service account --agent-service-account); the node is the one the token is bound \
to. API errors refuse the request (503), never sign.\n\n\
The root is either a Kubernetes TLS Secret's files (--root-dir: tls.crt, tls.key as PKCS#8, \
optional ca.crt; cert-manager compatible), or that Secret read through the API server \
(--root-secret NAMESPACE/NAME, cluster mode; when it does not exist the CA generates a root \
and creates it, and a Secret it cannot use is an error, never overwritten), or generated once \
into --state-dir (root.crt, root.key mode 0600) and reused. With --root-secret the CA also \
publishes the root certificate for the agents in the ConfigMap --root-configmap (same \
namespace, key root-cert.pem) before it serves.\n\n\
`ca issue` signs a certificate offline with the root on disk (tests, break-glass); `ca root` \
prints the root, generating it if the state directory is empty.";

/// What the CA asks of the Kubernetes API in cluster mode (`--kubernetes`): TokenReviews of
/// agents' tokens, every running pod (list + watch, for the signing policy), for tokens
/// that name only their pod (clusters before 1.30) `get` of the agent's pod in its own
/// namespace, and with `--root-secret` (deploy/'s names) `get` of the root Secret and `get`,
/// `patch` of the agents' root ConfigMap, and `create` of both (RBAC cannot narrow a create
/// to a name: the request names no existing object). deploy/'s RBAC for the CA's service account is checked against this list (no
/// more, no less; `deploy_tests::rbac`), and this list against the requests the real binary
/// sends to the fake API server (mesh-agent/tests/ca_cluster.rs).
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "read by the deploy/ RBAC test (deploy_tests::rbac)"
    )
)]
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: <TokenReview as k8s_openapi::Resource>::GROUP,
        resource: <TokenReview as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: None,
        names: &[],
        verbs: &["create"],
    },
    ApiAccess {
        group: <Pod as k8s_openapi::Resource>::GROUP,
        resource: <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: None,
        names: &[],
        verbs: WATCH,
    },
    ApiAccess {
        group: <Pod as k8s_openapi::Resource>::GROUP,
        resource: <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: Some(ROOT_NAMESPACE),
        names: &[],
        verbs: &["get"],
    },
    ApiAccess {
        group: <Secret as k8s_openapi::Resource>::GROUP,
        resource: <Secret as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: Some(ROOT_NAMESPACE),
        names: &[DEFAULT_ROOT_SECRET],
        verbs: &["get"],
    },
    ApiAccess {
        group: <Secret as k8s_openapi::Resource>::GROUP,
        resource: <Secret as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: Some(ROOT_NAMESPACE),
        names: &[],
        verbs: &["create"],
    },
    ApiAccess {
        group: <ConfigMap as k8s_openapi::Resource>::GROUP,
        resource: <ConfigMap as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: Some(ROOT_NAMESPACE),
        names: &[DEFAULT_ROOT_CONFIGMAP],
        verbs: &["get", "patch"],
    },
    ApiAccess {
        group: <ConfigMap as k8s_openapi::Resource>::GROUP,
        resource: <ConfigMap as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        namespace: Some(ROOT_NAMESPACE),
        names: &[],
        verbs: &["create"],
    },
];

pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
pub const DEFAULT_SERVER_NAME: &str = "nodemesh-ca.nodemesh-system.svc";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Parses `90s`, `15m`, `1h`, `24h`, `1h 30m` (humantime syntax).
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: Option<CaCommand>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("root")
        .required(true)
        .args(["root_dir", "state_dir", "root_secret"])
))]
pub struct ServeArgs {
    /// Address to serve the signing API on.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Local mode: the directory of Kubernetes YAML the agents read; the CA learns pods,
    /// their spec.nodeName and serviceAccountName from it (re-read on change).
    #[arg(long, value_name = "DIR", required_unless_present = "kubernetes")]
    pub manifests: Option<PathBuf>,

    /// Cluster mode: learn pods from the Kubernetes API server (KUBECONFIG, else the pod's
    /// service account) and authenticate agents by a TokenReview of their projected
    /// service-account token. Replaces --manifests and --node-credentials.
    #[arg(long, conflicts_with_all = ["manifests", "node_credentials"])]
    pub kubernetes: bool,

    /// Cluster mode: the audience agents' projected tokens must carry.
    #[arg(long, value_name = "AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub audience: String,

    /// Cluster mode: the agents' service account; tokens of any other are refused.
    #[arg(
        long,
        value_name = "USERNAME",
        default_value = DEFAULT_AGENT_ACCOUNT,
        value_parser = ServiceAccountUser::parse
    )]
    pub agent_service_account: ServiceAccountUser,

    /// Trust domain of the identities signed.
    #[arg(long, value_name = "DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Directory with a Kubernetes TLS Secret's files: tls.crt (signing CA certificate first,
    /// then its chain), tls.key (PKCS#8), optional ca.crt (trust bundle).
    #[arg(long, value_name = "DIR")]
    pub root_dir: Option<PathBuf>,

    /// Directory where a root CA (ECDSA P-256, 10 years) is generated on first start and
    /// reused: root.crt, root.key (mode 0600).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Cluster mode: the root from this kubernetes.io/tls Secret, read through the API server
    /// (tls.crt, tls.key as PKCS#8, optional ca.crt: cert-manager's layout). When it does not
    /// exist a root (ECDSA P-256, 10 years) is generated and the Secret created; one that
    /// exists but cannot be used is an error, never overwritten.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        // Local mode's flags, which a run without --kubernetes needs.
        conflicts_with_all = ["manifests", "node_credentials"],
        value_parser = SecretRef::parse
    )]
    pub root_secret: Option<SecretRef>,

    /// With --root-secret: the ConfigMap, in the Secret's namespace, where the CA publishes
    /// the root certificate(s) for the agents (key root-cert.pem; created or updated at start).
    #[arg(
        long,
        value_name = "NAME",
        default_value = DEFAULT_ROOT_CONFIGMAP,
        conflicts_with_all = ["root_dir", "state_dir"]
    )]
    pub root_configmap: String,

    /// Local mode: YAML map of node name to bearer token (`node-1: s3cret`), one per agent.
    #[arg(long, value_name = "FILE", required_unless_present = "kubernetes")]
    pub node_credentials: Option<PathBuf>,

    /// DNS name in the CA's own serving certificate; agents verify it.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SERVER_NAME)]
    pub server_name: String,

    /// Longest certificate lifetime issued; longer requests are clamped (e.g. 24h, 90m).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Log filter (tracing EnvFilter syntax), overridden by RUST_LOG.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Sign a certificate for an identity offline, with the root on disk (tests and
    /// break-glass). Generates the root if --state-dir is empty.
    Issue(IssueArgs),
    /// Print the root certificate (or write it to --out), generating the root if the state
    /// directory is empty.
    Root(RootArgs),
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("root").required(true).args(["root_dir", "state_dir"])))]
pub struct IssueArgs {
    /// Root generated by `ca` / `ca root` (root.crt, root.key); created if empty.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A Kubernetes TLS Secret's files (tls.crt, tls.key, optional ca.crt).
    #[arg(long, value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// SPIFFE ID to certify: spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = Identity::parse)]
    pub identity: Identity,
    /// Where to write the certificate chain (leaf first, no root), PEM.
    #[arg(long, value_name = "FILE")]
    pub out_cert: PathBuf,
    /// Where to write the new private key (PKCS#8 PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub out_key: PathBuf,
    /// Lifetime (e.g. 1h, 30m, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Issue an already expired certificate: notAfter one hour ago, notBefore --ttl earlier.
    #[arg(long)]
    pub expired: bool,
}

#[derive(Args, Debug)]
pub struct RootArgs {
    /// State directory holding (or to hold) root.crt and root.key.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Write the root certificate here instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Entry point of `mesh-agent ca`.
pub fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        Some(CaCommand::Issue(a)) => issue(&a),
        Some(CaCommand::Root(a)) => root(&a),
        None => serve(args.serve),
    }
}

fn load_authority(root_dir: Option<&Path>, state_dir: Option<&Path>) -> anyhow::Result<Authority> {
    Ok(match (root_dir, state_dir) {
        (Some(dir), None) => Authority::load_root_dir(dir)?,
        (None, Some(dir)) => Authority::load_or_generate(dir)?,
        _ => bail!("give exactly one of --root-dir and --state-dir"),
    })
}

fn issue(a: &IssueArgs) -> anyhow::Result<()> {
    let authority = load_authority(a.root_dir.as_deref(), a.state_dir.as_deref())?;
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let now = SystemTime::now();
    let (not_before, not_after) = if a.expired {
        let end = now - Duration::from_secs(3600);
        (end - a.ttl, end)
    } else {
        (now - Duration::from_secs(60), now + a.ttl)
    };
    let chain = authority.issue_between(&a.identity, &key, not_before, not_after)?;
    let pem: String = chain.iter().map(|c| pki::cert_to_pem(c)).collect();
    write_file(&a.out_key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&a.out_cert, pem.as_bytes(), 0o644)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| anyhow::anyhow!("parsing the issued certificate: {e}"))?;
    let (_, not_after) = pki::validity(&leaf);
    println!(
        "issued {} serial {} notAfter {} -> {} {}",
        a.identity,
        pki::serial_hex(&leaf),
        pki::rfc3339(not_after),
        a.out_cert.display(),
        a.out_key.display()
    );
    Ok(())
}

fn root(a: &RootArgs) -> anyhow::Result<()> {
    let authority = Authority::load_or_generate(&a.state_dir)?;
    let pem = authority.roots_pem();
    match &a.out {
        Some(out) => write_file(out, pem.as_bytes(), 0o644)?,
        None => print!("{pem}"),
    }
    Ok(())
}

/// How the CA learns pods and callers; `_status` keeps local mode's directory watch going.
struct Sources {
    auth: Arc<dyn NodeAuthenticator>,
    pods: Pods,
    _status: Option<tokio::sync::watch::Receiver<crate::config::watch::ConfigStatus>>,
}

/// Local mode: pods from the manifests directory, agents by static node tokens.
fn local_sources(manifests: &Path, creds: &Path) -> anyhow::Result<Sources> {
    let tokens = auth::StaticTokens::load(creds)?;
    let initial = crate::config::watch::initial(manifests)
        .map_err(|e| anyhow::anyhow!("invalid manifests in {}:\n{e}", manifests.display()))?;
    let fingerprint = initial.fingerprint;
    let (snap_tx, snap_rx) = tokio::sync::watch::channel(Arc::new(initial.snapshot));
    let status = crate::config::watch::spawn_from(manifests.to_path_buf(), snap_tx, fingerprint);
    info!(manifests = %manifests.display(), nodes = tokens.nodes(), "local mode: pods from the manifests, agents by node token");
    Ok(Sources {
        auth: Arc::new(tokens),
        pods: Pods::Manifests(snap_rx),
        _status: Some(status),
    })
}

/// Cluster mode: pods from the API server, agents by TokenReview.
fn cluster_sources(a: &ServeArgs, client: kube::Client) -> Sources {
    let pods = cluster::ClusterPods::spawn(client.clone());
    let expect = token_review::Expect {
        audience: a.audience.clone(),
        agent: a.agent_service_account.clone(),
    };
    info!(audience = %expect.audience, agent = %expect.agent.username(),
        "cluster mode: pods from the API server, agents by TokenReview");
    Sources {
        auth: Arc::new(token_review::TokenReviewAuth::new(client, expect)),
        pods: Pods::Cluster(pods),
        _status: None,
    }
}

/// The root: from `--root-secret` through the API server (and published to the agents'
/// ConfigMap), else from `--root-dir` or `--state-dir`.
async fn root_authority(a: &ServeArgs, client: Option<&kube::Client>) -> anyhow::Result<Authority> {
    let (Some(secret), Some(client)) = (&a.root_secret, client) else {
        return load_authority(a.root_dir.as_deref(), a.state_dir.as_deref());
    };
    let (authority, origin) = root_secret::load_or_create(client, secret).await?;
    let published = root_secret::publish_root(
        client,
        &secret.namespace,
        &a.root_configmap,
        &authority.roots_pem(),
    )
    .await?;
    info!(secret = %secret, ?origin, configmap = %a.root_configmap, ?published,
        "mesh root ready, its certificate published for the agents");
    Ok(authority)
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let _logging = crate::app::init_logging(&a.log_level);
    if !crate::identity::valid_trust_domain(&a.trust_domain) {
        bail!("invalid --trust-domain {:?}", a.trust_domain);
    }
    if a.root_secret.is_some() && !a.kubernetes {
        bail!("--root-secret reads the Secret through the API server: give --kubernetes");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let client = if a.kubernetes {
            Some(crate::config::kube::client().await?)
        } else {
            None
        };
        let authority = Arc::new(root_authority(&a, client.as_ref()).await?);
        let tls = server::tls_config(&authority, &a.server_name)?;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .map_err(|source| server::ServeError::Listen {
                addr: a.listen,
                source,
            })?;
        let sources = match (&a.manifests, &a.node_credentials, client) {
            (_, _, Some(client)) => cluster_sources(&a, client),
            (Some(manifests), Some(creds), None) => local_sources(manifests, creds)?,
            _ => bail!("give --kubernetes, or --manifests and --node-credentials"),
        };
        let authority_roots = authority.roots().len();
        let svc = Arc::new(server::CaService {
            authority,
            auth: sources.auth,
            pods: sources.pods,
            trust_domain: a.trust_domain.clone(),
            max_ttl: a.max_ttl,
        });
        info!(
            addr = %a.listen, trust_domain = %a.trust_domain, server_name = %a.server_name,
            max_ttl = ?a.max_ttl, roots = authority_roots, "CA serving"
        );
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            () = server::serve(listener, tls, svc) => {}
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests;
