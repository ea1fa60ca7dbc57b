//! The signing key and its certificates: loaded from a Kubernetes TLS Secret's layout (files
//! of a mounted Secret, or the Secret's data read through the API, both through
//! [`Authority::from_pem`]) or generated once into a state directory; issues workload leaves
//! and the CA's own serving certificate.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::identity::{Identity, pki};

/// State-dir mode: the generated root certificate and key.
pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
/// Root-dir mode: a `kubernetes.io/tls` Secret mounted as files (cert-manager's layout).
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const TLS_CA: &str = "ca.crt";
/// Name of a generated root.
pub const ROOT_NAME: &str = "nodemesh root CA";
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are back-dated by this much against clock skew.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of the CA's own serving certificate (re-made at every start).
const SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what`: a file's path, or `secret NS/NAME: tls.key`.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("state directory {dir} has {present} but not {missing}; restore it or remove both")]
    HalfState {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("generating the root CA: {source}")]
    Generate { source: rcgen::Error },
    #[error("signing a certificate for {subject}: {source}")]
    Sign {
        subject: String,
        source: rcgen::Error,
    },
    #[error("the system random generator failed")]
    Random,
}

/// A signing CA: key, certificate, the intermediates that follow a leaf, and the roots.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    signer_not_after: SystemTime,
    /// Certificates sent after a leaf: the signer and its parents, except roots.
    chain_tail: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("chain_tail", &self.chain_tail.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthorityError> {
    std::fs::read(path).map_err(|source| AuthorityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One PEM part of a root (certificates or key), named for errors: a file's path, or a
/// Secret's key (`secret nodemesh-system/nodemesh-ca-root: tls.key`).
#[derive(Clone, Copy, Debug)]
pub struct Pem<'a> {
    pub what: &'a str,
    pub bytes: &'a [u8],
}

fn invalid(part: &Pem<'_>, reason: impl Into<String>) -> AuthorityError {
    AuthorityError::Invalid {
        what: part.what.to_owned(),
        reason: reason.into(),
    }
}

fn certs(part: &Pem<'_>) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let certs = pki::certs_from_pem(part.bytes).map_err(|r| invalid(part, r))?;
    if certs.is_empty() {
        return Err(invalid(part, "no PEM CERTIFICATE in it"));
    }
    Ok(certs)
}

/// PEM labels of private keys that are not PKCS#8, with the format's name.
const NOT_PKCS8: &[(&str, &str)] = &[
    ("-----BEGIN EC PRIVATE KEY-----", "SEC1 \"EC PRIVATE KEY\""),
    (
        "-----BEGIN RSA PRIVATE KEY-----",
        "PKCS#1 \"RSA PRIVATE KEY\"",
    ),
    ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "encrypted PKCS#8"),
];

fn key(part: &Pem<'_>) -> Result<KeyPair, AuthorityError> {
    let text = std::str::from_utf8(part.bytes).map_err(|_| invalid(part, "not a PEM file"))?;
    if let Some((_, format)) = NOT_PKCS8.iter().find(|(label, _)| text.contains(label)) {
        return Err(invalid(
            part,
            format!(
                "not PKCS#8 (a {format} key); convert it with `openssl pkcs8 -topk8 -nocrypt` \
                 (cert-manager: privateKey.encoding: PKCS8)"
            ),
        ));
    }
    KeyPair::from_pem(text).map_err(|e| {
        invalid(
            part,
            format!("unusable private key ({e}); PKCS#8 ECDSA P-256/P-384 or Ed25519 expected (cert-manager: privateKey.encoding: PKCS8)"),
        )
    })
}

/// A newly generated root: certificate and PKCS#8 key, PEM.
pub struct GeneratedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Writes a file atomically (temporary file + rename) with `mode`.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), AuthorityError> {
    let err = |source| AuthorityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn self_signed(cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
    cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok()
}

impl Authority {
    /// Root-dir mode: `tls.crt` (signing certificate first, then its chain), `tls.key`
    /// (PKCS#8), optional `ca.crt` (the trust bundle; without it, `tls.crt` must end with a
    /// self-signed root).
    pub fn load_root_dir(dir: &Path) -> Result<Authority, AuthorityError> {
        let (crt, key, ca) = (dir.join(TLS_CERT), dir.join(TLS_KEY), dir.join(TLS_CA));
        let ca_bytes = if ca.exists() { Some(read(&ca)?) } else { None };
        let (crt_bytes, key_bytes) = (read(&crt)?, read(&key)?);
        let (crt_name, key_name, ca_name) = (
            crt.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
        );
        Self::from_pem(
            Pem {
                what: &crt_name,
                bytes: &crt_bytes,
            },
            Pem {
                what: &key_name,
                bytes: &key_bytes,
            },
            ca_bytes.as_deref().map(|bytes| Pem {
                what: &ca_name,
                bytes,
            }),
        )
    }

    /// State-dir mode: loads `root.crt` / `root.key`, generating them first (ECDSA P-256,
    /// 10 years, CA:true, "nodemesh root CA"; key mode 0600) when the directory has neither.
    pub fn load_or_generate(dir: &Path) -> Result<Authority, AuthorityError> {
        let (crt, key) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        match (crt.exists(), key.exists()) {
            (true, true) => {}
            (false, false) => Self::generate_root_into(dir)?,
            (true, false) => {
                return Err(AuthorityError::HalfState {
                    dir: dir.to_path_buf(),
                    present: ROOT_CERT,
                    missing: ROOT_KEY,
                });
            }
            (false, true) => {
                return Err(AuthorityError::HalfState {
                    dir: dir.to_path_buf(),
                    present: ROOT_KEY,
                    missing: ROOT_CERT,
                });
            }
        }
        let (crt_bytes, key_bytes) = (read(&crt)?, read(&key)?);
        let (crt_name, key_name) = (crt.display().to_string(), key.display().to_string());
        Self::from_pem(
            Pem {
                what: &crt_name,
                bytes: &crt_bytes,
            },
            Pem {
                what: &key_name,
                bytes: &key_bytes,
            },
            None,
        )
    }

    /// A new root CA: ECDSA P-256, 10 years, CA:true, "nodemesh root CA", random serial.
    pub fn generate_root() -> Result<GeneratedRoot, AuthorityError> {
        let gen_err = |source| AuthorityError::Generate { source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "nodemesh");
        dn.push(DnType::CommonName, ROOT_NAME);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = pki::to_offset(now - Duration::from_secs(3600));
        params.not_after = pki::to_offset(now + ROOT_LIFETIME);
        params.serial_number = Some(pki::random_serial().map_err(|_| AuthorityError::Random)?);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(GeneratedRoot {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn generate_root_into(dir: &Path) -> Result<(), AuthorityError> {
        std::fs::create_dir_all(dir).map_err(|source| AuthorityError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let root = Self::generate_root()?;
        // Key first: a crash in between leaves a key without a certificate, reported clearly.
        write_file(&dir.join(ROOT_KEY), root.key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join(ROOT_CERT), root.cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "generated a new mesh root CA");
        Ok(())
    }

    /// A root in a Kubernetes TLS Secret's layout, whether files or the Secret's data:
    /// `cert` (`tls.crt`: the signing CA certificate first, then its chain), `key` (`tls.key`,
    /// PKCS#8), optional `ca` (`ca.crt`, the trust bundle; empty counts as absent, as
    /// cert-manager writes it when the issuer does not know the CA). Without it the chain must
    /// end with a self-signed root. Errors name the part at fault.
    pub fn from_pem(
        cert: Pem<'_>,
        key: Pem<'_>,
        ca: Option<Pem<'_>>,
    ) -> Result<Authority, AuthorityError> {
        let ca = ca.filter(|c| !c.bytes.iter().all(u8::is_ascii_whitespace));
        let roots = ca.as_ref().map(certs).transpose()?;
        let chain = certs(&cert)?;
        let key_pair = self::key(&key)?;
        let (_, signer) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| invalid(&cert, format!("cannot parse the certificate: {e}")))?;
        if !signer.is_ca() {
            return Err(invalid(
                &cert,
                "the first certificate is not a CA (CA:true)",
            ));
        }
        if signer.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(invalid(
                &key,
                format!("the key does not match the certificate in {}", cert.what),
            ));
        }
        let roots = match roots {
            Some(r) => r,
            None => {
                let last = chain.last().cloned().unwrap_or_else(|| chain[0].clone());
                let (_, parsed) = x509_parser::parse_x509_certificate(&last)
                    .map_err(|e| invalid(&cert, format!("cannot parse: {e}")))?;
                if !self_signed(&parsed) {
                    return Err(invalid(
                        &cert,
                        "no ca.crt and the chain does not end with a self-signed root",
                    ));
                }
                vec![last]
            }
        };
        let chain_tail: Vec<_> = chain
            .iter()
            .filter(|c| !roots.contains(c))
            .cloned()
            .collect();
        let (_, signer_not_after) = pki::validity(&signer);
        let issuer = Issuer::from_ca_cert_der(&chain[0], key_pair)
            .map_err(|e| invalid(&cert, format!("cannot use as issuer: {e}")))?;
        Ok(Authority {
            issuer,
            signer_not_after,
            chain_tail,
            roots,
        })
    }

    /// The trust bundle agents must be configured with.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// PEM of the trust bundle.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|c| pki::cert_to_pem(c)).collect()
    }

    /// Issues a workload leaf for `id` and `public_key`: only the SPIFFE URI SAN, key usage
    /// digitalSignature + keyEncipherment, EKU serverAuth + clientAuth, CA:false, random
    /// serial, valid from `not_before` to `not_after` (clamped to the signer's notAfter).
    /// Returns leaf + chain tail.
    pub fn issue_between(
        &self,
        id: &Identity,
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
        let sign_err = |source| AuthorityError::Sign {
            subject: id.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(sign_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.leaf_params(&mut params, not_before, not_after)?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(sign_err)?;
        Ok(self.with_tail(cert.der().clone()))
    }

    /// [`Authority::issue_between`] from now (back-dated a minute) for `ttl`.
    pub fn issue(
        &self,
        id: &Identity,
        public_key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
        let now = SystemTime::now();
        self.issue_between(id, public_key, now - BACKDATE, now + ttl)
    }

    fn leaf_params(
        &self,
        params: &mut CertificateParams,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(), AuthorityError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(pki::random_serial().map_err(|_| AuthorityError::Random)?);
        params.not_before = pki::to_offset(not_before);
        params.not_after = pki::to_offset(not_after.min(self.signer_not_after));
        Ok(())
    }

    fn with_tail(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![leaf];
        chain.extend(self.chain_tail.iter().cloned());
        chain
    }

    /// A fresh key and serving certificate for the CA itself (DNS SAN `server_name`,
    /// serverAuth): returns the chain (without the root) and the PKCS#8 key.
    pub fn serving_cert(
        &self,
        server_name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), AuthorityError> {
        let sign_err = |source| AuthorityError::Sign {
            subject: server_name.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::new(vec![server_name.to_string()]).map_err(sign_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, server_name);
        params.distinguished_name = dn;
        let now = SystemTime::now();
        self.leaf_params(&mut params, now - BACKDATE, now + SERVING_LIFETIME)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok((self.with_tail(cert.der().clone()), key.serialize_der()))
    }
}
