//! Who is calling: the CA maps a bearer credential to a node name.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use subtle::ConstantTimeEq;

/// The future [`NodeAuthenticator::authenticate`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthError>> + Send + 'a>>;

/// Why a caller is not authenticated. Every message is safe to log and to send back: none
/// carries the credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer credential")]
    Missing,
    #[error("unknown node credential")]
    Unknown,
    /// The API server's TokenReview did not authenticate the token.
    #[error("the token is not authenticated by the Kubernetes API server: {error}")]
    NotAuthenticated { error: String },
    #[error(
        "the token is not for audience {want:?} (the API server reports audiences {got:?}); \
         the agent's projected token must have audience {want:?}"
    )]
    WrongAudience { want: String, got: Vec<String> },
    #[error("the token belongs to {username:?}, not to the agent's service account {want:?}")]
    WrongServiceAccount { username: String, want: String },
    #[error(
        "the token names neither a node nor a pod (user.extra has no \
         authentication.kubernetes.io/node-name or pod-name): not a pod-bound projected \
         service-account token"
    )]
    NotBound,
    #[error("the token's pod {pod}: {reason}")]
    BoundPod { pod: String, reason: String },
    /// The CA could not decide (the API server failed or is unreachable): fail closed.
    #[error("cannot authenticate the caller now: {reason}")]
    Unavailable { reason: String },
}

impl AuthError {
    /// HTTP status of the refusal: 503 when the CA could not decide (the agent retries),
    /// 401 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Unavailable { .. } => 503,
            _ => 401,
        }
    }
}

/// Maps the bearer credential of a signing request to the name of the node that sent it.
///
/// Local mode uses [`StaticTokens`]. In a cluster,
/// [`TokenReviewAuth`](super::token_review::TokenReviewAuth): the agent sends its projected
/// ServiceAccount token (audience `nodemesh-ca`), the CA POSTs an `authentication.k8s.io/v1`
/// TokenReview with that token and the audience, requires `status.authenticated`, the
/// audience and the agent's ServiceAccount
/// (`system:serviceaccount:nodemesh-system:nodemesh-agent`), and takes the node from
/// `status.user.extra["authentication.kubernetes.io/node-name"]` (set for tokens bound to a
/// pod since Kubernetes 1.30; older clusters: it reads the bound pod `…/pod-name`, checks its
/// uid and takes its spec.nodeName). Results are cached for a short time by token hash.
pub trait NodeAuthenticator: Send + Sync {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a>;
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read node credentials {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node credentials {path}: expected a YAML map of node name to token: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("node credentials {path}: node {node:?} has an empty token")]
    EmptyToken { path: PathBuf, node: String },
    #[error("node credentials {path}: nodes {first:?} and {second:?} share a token")]
    SharedToken {
        path: PathBuf,
        first: String,
        second: String,
    },
}

/// Fixed per-node tokens (local mode): a YAML map `node-name: token`. Tokens are compared in
/// constant time (over their SHA-256, so lengths do not leak either), and every entry is
/// compared on every request.
pub struct StaticTokens {
    /// (node, SHA-256 of the token).
    entries: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("StaticTokens")
            .field("nodes", &nodes)
            .finish()
    }
}

pub(super) fn digest(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl StaticTokens {
    /// From node name -> token (tokens are trimmed).
    pub fn new(map: BTreeMap<String, String>, source: &Path) -> Result<Self, CredentialsError> {
        let mut entries: Vec<(String, [u8; 32])> = Vec::new();
        for (node, token) in map {
            let token = token.trim();
            if token.is_empty() {
                return Err(CredentialsError::EmptyToken {
                    path: source.to_path_buf(),
                    node,
                });
            }
            let d = digest(token);
            if let Some((first, _)) = entries.iter().find(|(_, e)| *e == d) {
                return Err(CredentialsError::SharedToken {
                    path: source.to_path_buf(),
                    first: first.clone(),
                    second: node,
                });
            }
            entries.push((node, d));
        }
        Ok(StaticTokens { entries })
    }

    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let map: BTreeMap<String, String> = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_yaml::from_str(&text).map_err(|source| CredentialsError::Parse {
                path: path.to_path_buf(),
                source,
            })?
        };
        Self::new(map, path)
    }

    pub fn nodes(&self) -> usize {
        self.entries.len()
    }

    /// The node whose token is `bearer`; looks at every entry whatever matches.
    pub fn lookup(&self, bearer: &str) -> Result<String, AuthError> {
        let bearer = bearer.trim();
        if bearer.is_empty() {
            return Err(AuthError::Missing);
        }
        let d = digest(bearer);
        let mut found: Option<&str> = None;
        for (node, token) in &self.entries {
            let eq: bool = token.ct_eq(&d).into();
            if eq {
                found = Some(node);
            }
        }
        found.map(str::to_string).ok_or(AuthError::Unknown)
    }
}

impl NodeAuthenticator for StaticTokens {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.lookup(bearer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> StaticTokens {
        let map = BTreeMap::from([
            ("node-1".to_string(), "alpha-token\n".to_string()),
            ("node-2".to_string(), "beta-token".to_string()),
        ]);
        StaticTokens::new(map, Path::new("creds.yaml")).unwrap()
    }

    #[test]
    fn tokens_map_to_their_node() {
        let t = tokens();
        assert_eq!(t.lookup("alpha-token").unwrap(), "node-1");
        assert_eq!(t.lookup(" beta-token ").unwrap(), "node-2");
        assert_eq!(t.lookup("alpha-toke"), Err(AuthError::Unknown));
        assert_eq!(t.lookup("alpha-tokenx"), Err(AuthError::Unknown));
        assert_eq!(t.lookup(""), Err(AuthError::Missing));
    }

    #[test]
    fn comparison_is_constant_time_over_digests() {
        // Same-length digests whatever the token length; ct_eq is subtle's constant-time
        // comparison, and every entry is compared.
        let t = tokens();
        assert!(t.entries.iter().all(|(_, d)| d.len() == 32));
        let a = digest("x");
        let b = digest(&"x".repeat(1000));
        assert_eq!(a.len(), b.len());
        assert!(!bool::from(a.ct_eq(&b)));
        assert!(bool::from(a.ct_eq(&digest("x"))));
    }

    #[test]
    fn bad_credential_files_are_refused() {
        let dup = BTreeMap::from([
            ("a".to_string(), "same".to_string()),
            ("b".to_string(), "same".to_string()),
        ]);
        assert!(matches!(
            StaticTokens::new(dup, Path::new("f")),
            Err(CredentialsError::SharedToken { .. })
        ));
        let empty = BTreeMap::from([("a".to_string(), " ".to_string())]);
        assert!(matches!(
            StaticTokens::new(empty, Path::new("f")),
            Err(CredentialsError::EmptyToken { .. })
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn authenticator_trait_object_works() {
        let t: Box<dyn NodeAuthenticator> = Box::new(tokens());
        assert_eq!(t.authenticate("beta-token").await.unwrap(), "node-2");
        assert_eq!(
            t.authenticate("nope").await.unwrap_err(),
            AuthError::Unknown
        );
    }
}
