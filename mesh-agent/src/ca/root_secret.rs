//! Cluster mode's root from a Secret (`--root-secret NAMESPACE/NAME`), read through the API
//! server, and the root certificate published for the agents.
//!
//! At start the CA reads the Secret. If it exists it must be a `kubernetes.io/tls` Secret
//! (`tls.crt`, `tls.key` as PKCS#8, optional `ca.crt`: cert-manager's layout), parsed exactly
//! as `--root-dir` parses those files ([`Authority::from_pem`]); anything else is an error
//! and the CA exits: it never generates a root over a Secret it cannot use. If it does not
//! exist (404) the CA generates a root as `--state-dir` does and creates the Secret. When that
//! create answers 409 AlreadyExists another CA replica (or cert-manager) won the race: the CA
//! reads the Secret again and uses that root. An existing root is never overwritten.
//!
//! Then the root certificate(s), never the key, are put in the ConfigMap the agents mount
//! (`nodemesh-ca-root-cert`, key `root-cert.pem`, in the Secret's namespace): created if
//! absent, patched if it holds anything else, left alone if equal. All of this happens before
//! the CA serves, so it is never ready with a root the agents cannot see.
//!
//! The Secret is read once: a root rotated in it (cert-manager renewing the Certificate) is
//! used, and published, at the CA's next start.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tracing::info;

use crate::config::model::dns_name;

use super::authority::{Authority, AuthorityError, GeneratedRoot, Pem, TLS_CA, TLS_CERT, TLS_KEY};

/// The Secret deploy/ names (`--root-secret nodemesh-system/nodemesh-ca-root`).
pub const DEFAULT_ROOT_SECRET: &str = "nodemesh-ca-root";
/// The ConfigMap the agents mount (deploy/base/agent.yaml), in the Secret's namespace.
pub const DEFAULT_ROOT_CONFIGMAP: &str = "nodemesh-ca-root-cert";
/// The ConfigMap's key: the root certificate(s), PEM.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The only Secret type the CA reads or writes.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// The field manager of the CA's writes.
pub const FIELD_MANAGER: &str = "nodemesh-ca";
/// The label on what the CA creates.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "nodemesh");
/// Longest wait for the API server per request at start.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// `NAMESPACE/NAME` of a Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    /// Parses `NAMESPACE/NAME`.
    pub fn parse(s: &str) -> Result<SecretRef, String> {
        match s.split_once('/') {
            Some((ns, name)) if dns_name(ns, false, 63) && dns_name(name, true, 253) => {
                Ok(SecretRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is not NAMESPACE/NAME of a Secret (e.g. nodemesh-system/nodemesh-ca-root)"
            )),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootSecretError {
    #[error("{action}: {reason}")]
    Api { action: String, reason: String },
    #[error("{action}: no answer from the API server within {}s", API_TIMEOUT.as_secs())]
    Timeout { action: String },
    #[error(
        "secret {secret}: type {found:?}, not {TLS_SECRET_TYPE}; the CA neither uses nor \
         replaces it (point --root-secret at a TLS Secret, or delete this one to have a root \
         generated)"
    )]
    WrongType { secret: String, found: String },
    #[error(
        "secret {secret}: {key}: missing (a {TLS_SECRET_TYPE} Secret for the CA has {TLS_CERT}, \
         {TLS_KEY} as PKCS#8 and optionally {TLS_CA}); the CA will not replace it"
    )]
    MissingKey { secret: String, key: &'static str },
    /// Names the Secret and the key (see [`Pem::what`]).
    #[error(transparent)]
    Invalid(#[from] AuthorityError),
    #[error(
        "secret {secret}: creating it answered 409 AlreadyExists, yet reading it again found \
         nothing; start again"
    )]
    Vanished { secret: String },
}

/// How the CA came by its root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootOrigin {
    /// The Secret existed.
    Read,
    /// Generated and stored in a new Secret.
    Created,
    /// Another replica created the Secret between our read and our create: its root.
    Concurrent,
}

/// What publishing the root to the ConfigMap did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    Create,
    Patch,
    Unchanged,
}

/// The part of an API error worth reading, with what RBAC must grant on a 403.
fn api_error(action: String, e: &kube::Error, rbac: &str) -> RootSecretError {
    let mut reason = crate::config::kube::error_chain(e);
    if matches!(e, kube::Error::Api(s) if s.is_forbidden()) {
        reason.push_str(&format!(
            " (the CA's service account needs {rbac}: the Role nodemesh-ca in \
             deploy/base/ca-rbac.yaml grants it)"
        ));
    }
    RootSecretError::Api { action, reason }
}

/// One API request, bounded by [`API_TIMEOUT`]; `Err(Err(e))` is the API's error.
async fn call<T>(
    action: &str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, RootSecretError> {
    tokio::time::timeout(API_TIMEOUT, fut)
        .await
        .map_err(|_| RootSecretError::Timeout {
            action: action.to_owned(),
        })
}

fn is_status(e: &kube::Error, test: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(e, kube::Error::Api(s) if test(s))
}

/// The root in a Secret read from the API: type `kubernetes.io/tls`, `tls.crt` and `tls.key`
/// present, parsed as `--root-dir` parses the same files.
pub fn authority_from_secret(r: &SecretRef, secret: &Secret) -> Result<Authority, RootSecretError> {
    let found = secret.type_.as_deref().unwrap_or("Opaque");
    if found != TLS_SECRET_TYPE {
        return Err(RootSecretError::WrongType {
            secret: r.to_string(),
            found: found.to_owned(),
        });
    }
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let part = |key: &'static str| {
        data.get(key)
            .filter(|b| !b.0.is_empty())
            .map(|b| (format!("secret {r}: {key}"), b.0.as_slice()))
    };
    let missing = |key| RootSecretError::MissingKey {
        secret: r.to_string(),
        key,
    };
    let (cert_what, cert) = part(TLS_CERT).ok_or_else(|| missing(TLS_CERT))?;
    let (key_what, key) = part(TLS_KEY).ok_or_else(|| missing(TLS_KEY))?;
    let ca = part(TLS_CA);
    Ok(Authority::from_pem(
        Pem {
            what: &cert_what,
            bytes: cert,
        },
        Pem {
            what: &key_what,
            bytes: key,
        },
        ca.as_ref().map(|(what, bytes)| Pem { what, bytes }),
    )?)
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(PART_OF.0.to_owned(), PART_OF.1.to_owned())])
}

/// The Secret a generated root is stored in.
pub fn new_secret(r: &SecretRef, root: &GeneratedRoot) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(r.name.clone()),
            namespace: Some(r.namespace.clone()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        type_: Some(TLS_SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([
            (
                TLS_CERT.to_owned(),
                ByteString(root.cert_pem.as_bytes().to_vec()),
            ),
            (
                TLS_KEY.to_owned(),
                ByteString(root.key_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}

/// Reads the root from the Secret, or generates it and creates the Secret when there is none.
pub async fn load_or_create(
    client: &Client,
    r: &SecretRef,
) -> Result<(Authority, RootOrigin), RootSecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
    let read = format!("reading secret {r}");
    let rbac_get = format!("get on secrets named {} in {}", r.name, r.namespace);
    let existing = call(&read, api.get_opt(&r.name))
        .await?
        .map_err(|e| api_error(read.clone(), &e, &rbac_get))?;
    if let Some(secret) = existing {
        let authority = authority_from_secret(r, &secret)?;
        info!(secret = %r, "mesh root read from the Secret");
        return Ok((authority, RootOrigin::Read));
    }
    let root = Authority::generate_root()?;
    let secret = new_secret(r, &root);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    let create = format!("creating secret {r}");
    match call(&create, api.create(&params, &secret)).await? {
        Ok(created) => {
            let authority = authority_from_secret(r, &created)?;
            info!(secret = %r, "generated a new mesh root CA and stored it in the Secret");
            Ok((authority, RootOrigin::Created))
        }
        Err(e) if is_status(&e, kube::core::Status::is_already_exists) => {
            let again = call(&read, api.get_opt(&r.name))
                .await?
                .map_err(|e| api_error(read.clone(), &e, &rbac_get))?;
            let secret = again.ok_or_else(|| RootSecretError::Vanished {
                secret: r.to_string(),
            })?;
            let authority = authority_from_secret(r, &secret)?;
            info!(secret = %r, "the Secret was created concurrently (another CA replica): using its root");
            Ok((authority, RootOrigin::Concurrent))
        }
        Err(e) => Err(api_error(
            create,
            &e,
            &format!("create on secrets in {}", r.namespace),
        )),
    }
}

/// What publishing `pem` needs, given the ConfigMap as it is.
pub fn publish_action(existing: Option<&ConfigMap>, pem: &str) -> Publish {
    match existing {
        None => Publish::Create,
        Some(cm) => {
            let current = cm.data.as_ref().and_then(|d| d.get(ROOT_CERT_KEY));
            if current.map(String::as_str) == Some(pem) {
                Publish::Unchanged
            } else {
                Publish::Patch
            }
        }
    }
}

/// The ConfigMap created for the agents.
pub fn new_config_map(namespace: &str, name: &str, pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(ROOT_CERT_KEY.to_owned(), pem.to_owned())])),
        ..ConfigMap::default()
    }
}

/// Makes the ConfigMap `namespace/name` hold `pem` under `root-cert.pem` (its other keys are
/// left as they are).
pub async fn publish_root(
    client: &Client,
    namespace: &str,
    name: &str,
    pem: &str,
) -> Result<Publish, RootSecretError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let read = format!("reading configmap {namespace}/{name}");
    let rbac_named = format!("get and patch on configmaps named {name} in {namespace}");
    // Twice at most: a create that lost a race to another replica reads the winner's.
    for _ in 0..2 {
        let existing = call(&read, api.get_opt(name))
            .await?
            .map_err(|e| api_error(read.clone(), &e, &rbac_named))?;
        let action = publish_action(existing.as_ref(), pem);
        match action {
            Publish::Unchanged => {}
            Publish::Create => {
                let create = format!("creating configmap {namespace}/{name}");
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PostParams::default()
                };
                let cm = new_config_map(namespace, name, pem);
                match call(&create, api.create(&params, &cm)).await? {
                    Ok(_) => {}
                    Err(e) if is_status(&e, kube::core::Status::is_already_exists) => continue,
                    Err(e) => {
                        let rbac = format!("create on configmaps in {namespace}");
                        return Err(api_error(create, &e, &rbac));
                    }
                }
            }
            Publish::Patch => {
                let patch = format!("patching configmap {namespace}/{name}");
                let body = serde_json::json!({ "data": { ROOT_CERT_KEY: pem } });
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..PatchParams::default()
                };
                call(&patch, api.patch(name, &params, &Patch::Merge(&body)))
                    .await?
                    .map_err(|e| api_error(patch.clone(), &e, &rbac_named))?;
            }
        }
        return Ok(action);
    }
    Err(RootSecretError::Api {
        action: format!("creating configmap {namespace}/{name}"),
        reason: "it was created and deleted concurrently, twice; start again".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> SecretRef {
        SecretRef::parse("nodemesh-system/nodemesh-ca-root").unwrap()
    }

    fn tls(data: &[(&str, &[u8])]) -> Secret {
        Secret {
            type_: Some(TLS_SECRET_TYPE.into()),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn secret_refs_parse() {
        assert_eq!(
            r(),
            SecretRef {
                namespace: "nodemesh-system".into(),
                name: "nodemesh-ca-root".into()
            }
        );
        assert_eq!(r().to_string(), "nodemesh-system/nodemesh-ca-root");
        assert!(SecretRef::parse("a/b.c-d").is_ok());
        for bad in [
            "nodemesh-ca-root",
            "/x",
            "x/",
            "a.b/c",
            "A/b",
            "a/b/c",
            "a/-b",
            "",
        ] {
            assert!(SecretRef::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_generated_secret_reads_back_as_the_same_root() {
        let root = Authority::generate_root().unwrap();
        let secret = new_secret(&r(), &root);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let labels = secret.metadata.labels.clone().unwrap();
        assert_eq!(labels["app.kubernetes.io/part-of"], "nodemesh");
        let a = authority_from_secret(&r(), &secret).unwrap();
        assert_eq!(a.roots_pem(), root.cert_pem);
    }

    #[test]
    fn unusable_secrets_are_errors_naming_the_secret_and_key() {
        let root = Authority::generate_root().unwrap();
        let (crt, key) = (root.cert_pem.as_bytes(), root.key_pem.as_bytes());
        let err = |s: &Secret| match authority_from_secret(&r(), s) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };

        let mut opaque = tls(&[("tls.crt", crt), ("tls.key", key)]);
        opaque.type_ = Some("Opaque".into());
        let e = err(&opaque);
        assert!(
            e.starts_with(
                "secret nodemesh-system/nodemesh-ca-root: type \"Opaque\", not kubernetes.io/tls"
            ),
            "{e}"
        );
        opaque.type_ = None;
        assert!(err(&opaque).contains("type \"Opaque\""));

        let e = err(&tls(&[("tls.crt", crt)]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: tls.key: missing"),
            "{e}"
        );
        let e = err(&tls(&[("tls.crt", b""), ("tls.key", key)]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: tls.crt: missing"),
            "{e}"
        );

        // A SEC1 key (openssl's `ec` default, cert-manager's without encoding: PKCS8).
        let sec1 = b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        let e = err(&tls(&[("tls.crt", crt), ("tls.key", sec1)]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: tls.key: not PKCS#8"),
            "{e}"
        );

        let other = Authority::generate_root().unwrap();
        let e = err(&tls(&[
            ("tls.crt", crt),
            ("tls.key", other.key_pem.as_bytes()),
        ]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: tls.key: the key does not match the certificate in secret nodemesh-system/nodemesh-ca-root: tls.crt"),
            "{e}"
        );
        let e = err(&tls(&[("tls.crt", b"junk"), ("tls.key", key)]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: tls.crt: no PEM CERTIFICATE"),
            "{e}"
        );
        let e = err(&tls(&[
            ("tls.crt", crt),
            ("tls.key", key),
            ("ca.crt", b"junk"),
        ]));
        assert!(
            e.starts_with("secret nodemesh-system/nodemesh-ca-root: ca.crt: no PEM CERTIFICATE"),
            "{e}"
        );
    }

    #[test]
    fn ca_crt_is_the_trust_bundle_and_empty_counts_as_absent() {
        let root = Authority::generate_root().unwrap();
        let other = Authority::generate_root().unwrap();
        let (crt, key) = (root.cert_pem.as_bytes(), root.key_pem.as_bytes());
        // cert-manager writes an empty ca.crt when its issuer does not know the CA.
        let a = authority_from_secret(
            &r(),
            &tls(&[("tls.crt", crt), ("tls.key", key), ("ca.crt", b"")]),
        )
        .unwrap();
        assert_eq!(a.roots_pem(), root.cert_pem);
        let bundle = format!("{}{}", root.cert_pem, other.cert_pem);
        let a = authority_from_secret(
            &r(),
            &tls(&[
                ("tls.crt", crt),
                ("tls.key", key),
                ("ca.crt", bundle.as_bytes()),
            ]),
        )
        .unwrap();
        assert_eq!(a.roots().len(), 2);
        assert_eq!(a.roots_pem(), bundle);
    }

    #[test]
    fn the_config_map_is_created_patched_or_left_alone() {
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        assert_eq!(publish_action(None, pem), Publish::Create);
        let cm = new_config_map("nodemesh-system", DEFAULT_ROOT_CONFIGMAP, pem);
        assert_eq!(
            cm.metadata.labels.as_ref().unwrap()["app.kubernetes.io/part-of"],
            "nodemesh"
        );
        assert_eq!(publish_action(Some(&cm), pem), Publish::Unchanged);
        assert_eq!(publish_action(Some(&cm), "stale"), Publish::Patch);
        assert_eq!(
            publish_action(Some(&ConfigMap::default()), pem),
            Publish::Patch
        );
    }
}
