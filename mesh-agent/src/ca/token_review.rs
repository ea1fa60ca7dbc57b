//! Cluster mode's [`NodeAuthenticator`]: the agent's projected service-account token,
//! validated by the API server with a TokenReview, names the node the agent runs on.
//!
//! The CA asks `POST /apis/authentication.k8s.io/v1/tokenreviews` with the token and its own
//! audience, then requires, in this order: `status.authenticated`, the audience in
//! `status.audiences` (so a token minted for another service, or an API server that ignores
//! `spec.audiences`, is refused), and the agent's service account as `status.user.username`.
//! The node is `status.user.extra["authentication.kubernetes.io/node-name"]` (Kubernetes
//! 1.30 and later put it in every pod-bound token); without it the CA reads the bound pod
//! (`…/pod-name`, in the agent's namespace), checks its uid against `…/pod-uid` and takes its
//! `spec.nodeName`. A token without either is not pod-bound and is refused.
//!
//! Answers are cached by the token's SHA-256 for [`CACHE_TTL`] (at most [`CACHE_ENTRIES`]),
//! so an agent's burst of CSRs costs one review. Refusals are not cached. An API server that
//! fails or does not answer within [`API_TIMEOUT`] makes the request fail with 503: the CA
//! never signs what it could not check.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::debug;

use super::auth::{AuthError, AuthFuture, NodeAuthenticator, digest};

pub const DEFAULT_AUDIENCE: &str = "nodemesh-ca";
pub const DEFAULT_AGENT_ACCOUNT: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";
/// `user.extra` keys of a pod-bound service-account token.
pub const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
/// How long an accepted token's node is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Most tokens remembered (one or two per node in a cluster).
pub const CACHE_ENTRIES: usize = 4096;
/// Longest wait for the API server per request.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

const SA_PREFIX: &str = "system:serviceaccount:";

/// A service account's username, `system:serviceaccount:<namespace>:<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountUser {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccountUser {
    /// Parses `system:serviceaccount:<namespace>:<name>`.
    pub fn parse(s: &str) -> Result<ServiceAccountUser, String> {
        let rest = s.strip_prefix(SA_PREFIX);
        match rest.and_then(|r| r.split_once(':')) {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(ServiceAccountUser {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not a service account's username ({SA_PREFIX}<namespace>:<name>)"
            )),
        }
    }

    pub fn username(&self) -> String {
        format!("{SA_PREFIX}{}:{}", self.namespace, self.name)
    }
}

/// What a token must be to be an agent's.
#[derive(Clone, Debug)]
pub struct Expect {
    pub audience: String,
    pub agent: ServiceAccountUser,
}

/// Who a reviewed token belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum Caller {
    /// The token names its node.
    Node(String),
    /// The token names only its pod: the CA reads the pod for its node.
    Pod {
        namespace: String,
        name: String,
        uid: String,
    },
}

fn extra<'a>(status: &'a TokenReviewStatus, key: &str) -> Option<&'a str> {
    let values = status.user.as_ref()?.extra.as_ref()?.get(key)?;
    values.iter().map(String::as_str).find(|v| !v.is_empty())
}

/// The caller of a TokenReview's answer, or why it is refused.
pub fn interpret(status: Option<&TokenReviewStatus>, expect: &Expect) -> Result<Caller, AuthError> {
    let Some(status) = status else {
        return Err(AuthError::NotAuthenticated {
            error: "the TokenReview came back without a status".into(),
        });
    };
    if status.authenticated != Some(true) {
        let error = status.error.clone().filter(|e| !e.is_empty());
        return Err(AuthError::NotAuthenticated {
            error: error.unwrap_or_else(|| "no reason given".into()),
        });
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.contains(&expect.audience) {
        return Err(AuthError::WrongAudience {
            want: expect.audience.clone(),
            got: audiences,
        });
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .unwrap_or_default();
    let want = expect.agent.username();
    if username != want {
        return Err(AuthError::WrongServiceAccount { username, want });
    }
    if let Some(node) = extra(status, NODE_NAME_KEY) {
        return Ok(Caller::Node(node.to_owned()));
    }
    let Some(name) = extra(status, POD_NAME_KEY) else {
        return Err(AuthError::NotBound);
    };
    let pod = format!("{}/{name}", expect.agent.namespace);
    let Some(uid) = extra(status, POD_UID_KEY) else {
        return Err(AuthError::BoundPod {
            pod,
            reason: format!("the token has no {POD_UID_KEY}"),
        });
    };
    Ok(Caller::Pod {
        namespace: expect.agent.namespace.clone(),
        name: name.to_owned(),
        uid: uid.to_owned(),
    })
}

/// The node of the pod a token is bound to: the pod must exist with the token's uid (not a
/// later pod of the same name) and be scheduled.
pub fn node_of_bound_pod(pod: Option<&Pod>, name: &str, uid: &str) -> Result<String, String> {
    let Some(pod) = pod else {
        return Err("not found (deleted?)".into());
    };
    let found = pod.metadata.uid.as_deref().unwrap_or_default();
    if found != uid {
        return Err(format!(
            "uid {found:?} differs from the token's {uid:?}: the token was issued to an \
             earlier pod named {name}"
        ));
    }
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| "not scheduled on a node".to_owned())
}

/// Accepted tokens' nodes by token digest, each until its deadline.
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], (Instant, String)>,
}

impl Cache {
    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<String> {
        match self.entries.get(key) {
            Some((until, node)) if *until > now => Some(node.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: [u8; 32], node: String, now: Instant) {
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.retain(|_, (until, _)| *until > now);
        }
        if self.entries.len() >= CACHE_ENTRIES {
            let oldest = self.entries.iter().min_by_key(|(_, (until, _))| *until);
            if let Some(k) = oldest.map(|(k, _)| *k) {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, (now + CACHE_TTL, node));
    }
}

/// Authenticates agents by TokenReview (see the module documentation).
pub struct TokenReviewAuth {
    client: Client,
    expect: Expect,
    cache: Mutex<Cache>,
}

fn unavailable(what: &str, e: &kube::Error) -> AuthError {
    AuthError::Unavailable {
        reason: format!("{what}: {}", crate::config::kube::error_chain(e)),
    }
}

fn timed_out(what: &str) -> AuthError {
    AuthError::Unavailable {
        reason: format!("{what}: no answer from the API server within {API_TIMEOUT:?}"),
    }
}

impl TokenReviewAuth {
    pub fn new(client: Client, expect: Expect) -> TokenReviewAuth {
        TokenReviewAuth {
            client,
            expect,
            cache: Mutex::new(Cache::default()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn review(&self, token: &str) -> Result<String, AuthError> {
        let key = digest(token);
        if let Some(node) = self.cache().get(&key, Instant::now()) {
            debug!(%node, "agent token known (cached review)");
            return Ok(node);
        }
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.expect.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let what = "TokenReview";
        let reply = tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| timed_out(what))?
            .map_err(|e| unavailable(what, &e))?;
        let node = match interpret(reply.status.as_ref(), &self.expect)? {
            Caller::Node(node) => node,
            Caller::Pod {
                namespace,
                name,
                uid,
            } => self.node_of_pod(&namespace, &name, &uid).await?,
        };
        self.cache().put(key, node.clone(), Instant::now());
        Ok(node)
    }

    async fn node_of_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<String, AuthError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("reading the token's pod {namespace}/{name}");
        let pod = tokio::time::timeout(API_TIMEOUT, api.get_opt(name))
            .await
            .map_err(|_| timed_out(&what))?
            .map_err(|e| unavailable(&what, &e))?;
        node_of_bound_pod(pod.as_ref(), name, uid).map_err(|reason| AuthError::BoundPod {
            pod: format!("{namespace}/{name}"),
            reason,
        })
    }
}

impl NodeAuthenticator for TokenReviewAuth {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = bearer.trim();
            if token.is_empty() {
                return Err(AuthError::Missing);
            }
            self.review(token).await
        })
    }
}

#[cfg(test)]
mod tests;
