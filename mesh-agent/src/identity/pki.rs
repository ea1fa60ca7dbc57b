//! Small PKI helpers shared by the CA client and the CA: the crypto provider, PEM, times,
//! serials, SANs and chain verification.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::SPIFFE_SCHEME;

/// The one crypto provider the mesh uses (ring), passed explicitly everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every `CERTIFICATE` block of a PEM text, in order (other blocks are skipped).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))
}

/// PEM text of one certificate.
pub fn cert_to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// One PEM block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(char::from(T[(n >> 18) as usize & 63]));
        out.push(char::from(T[(n >> 12) as usize & 63]));
        out.push(if chunk.len() > 1 {
            char::from(T[(n >> 6) as usize & 63])
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            char::from(T[n as usize & 63])
        } else {
            '='
        });
    }
    out
}

/// The URI SANs of a certificate that are SPIFFE IDs (scheme compared case-insensitively,
/// so that a `SPIFFE://` SAN counts, and then fails strict parsing).
pub fn spiffe_uris(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("invalid subjectAltName: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u)
                        if u.len() >= SPIFFE_SCHEME.len()
                            && u[..SPIFFE_SCHEME.len()].eq_ignore_ascii_case(SPIFFE_SCHEME) =>
                    {
                        Some((*u).to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The serial number as lowercase hex (no separators, leading zero bytes kept as DER has them).
pub fn serial_hex(cert: &X509Certificate<'_>) -> String {
    cert.tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// notBefore and notAfter of a certificate.
pub fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = cert.validity();
    (
        unix_to_system(v.not_before.timestamp()),
        unix_to_system(v.not_after.timestamp()),
    )
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// RFC 3339 UTC, seconds precision: `2025-01-02T03:04:05Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `time`'s type, as rcgen wants it.
pub fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Cryptographically random bytes.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ring::error::Unspecified> {
    let mut out = [0u8; N];
    SystemRandom::new().fill(&mut out)?;
    Ok(out)
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> Result<rcgen::SerialNumber, ring::error::Unspecified> {
    let mut b = random_bytes::<16>()?;
    b[0] &= 0x7f;
    b[0] |= 0x40; // no leading zero byte: always 16 bytes of DER content
    Ok(rcgen::SerialNumber::from_slice(&b))
}

/// Verifies that `chain[0]` chains to `roots` through `chain[1..]`, at `now`, and is valid
/// for client authentication (mesh leaves carry both clientAuth and serverAuth).
pub fn verify_chain(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("building the verifier: {e}"))?;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "clock before 1970".to_string())?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::since_unix_epoch(secs))
        .map(|_| ())
        .map_err(|e| format!("does not verify against the mesh root: {e}"))
}

/// Loads PEM certificates into a root store; fails when none is usable.
pub fn root_store(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(certs.iter().cloned());
    if added == 0 {
        return Err(format!(
            "no usable CA certificate ({} found, {ignored} unparsable)",
            certs.len()
        ));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = cert_to_pem(&der);
        let back = certs_from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), der.as_slice());
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400 + 3_661)),
            "1970-01-02T01:01:01Z"
        );
    }
}
