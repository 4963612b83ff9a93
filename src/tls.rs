//! DICOM over TLS (PS3.15 B.9, the BCP 195 profile's TLS 1.2 and 1.3): the server side's
//! certificate and key, and, when a CA is configured, the client certificates it accepts (mutual
//! TLS, as IHE ATNA secure nodes authenticate each other).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Destination, DicomConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} ({path}): {reason}")]
    File { key: &'static str, path: String, reason: String },
    #[error("{what}: {reason}")]
    Refused { what: &'static str, reason: String },
}

/// What went wrong with the file a configuration key names.
fn file_error<'p>(key: &'static str, path: &'p str) -> impl Fn(String) -> TlsError + 'p {
    move |reason| TlsError::File { key, path: path.to_string(), reason }
}

fn certificates(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = file_error(key, path);
    let certificates: Vec<_> = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    // An expired certificate (or one not valid yet) would only fail each handshake later, with
    // the peer's words for it; here the file and the date are named.
    let now = stamp_in(std::time::Duration::ZERO);
    for certificate in &certificates {
        let (not_before, not_after) =
            validity(certificate).ok_or_else(|| error("a certificate without dates".into()))?;
        if now.as_str() > not_after.as_str() {
            return Err(error(format!("a certificate in it expired on {}", readable(&not_after))));
        }
        if now.as_str() < not_before.as_str() {
            return Err(error(format!("a certificate in it is not valid before {}", readable(&not_before))));
        }
    }
    Ok(certificates)
}

/// How long before a certificate's end the agent starts saying so.
const EXPIRY_NOTICE_DAYS: u64 = 30;

/// The configured certificates (ours, the CAs we trust) that end within
/// [`EXPIRY_NOTICE_DAYS`], one sentence each. An expired one stops the start; one about to
/// expire would stop associations on a date nobody was told of, so `check-config`, the start and
/// a daily look while running name it ahead of time. Files that cannot be read are left to the
/// checks that refuse them.
pub fn expiring_soon(config: &crate::config::Config) -> Vec<String> {
    let mut files: Vec<(&'static str, &str)> = Vec::new();
    if config.dicom.tls_port != 0 {
        files.push(("dicom.tls_certificate", &config.dicom.tls_certificate));
        files.push(("dicom.tls_client_ca", &config.dicom.tls_client_ca));
    }
    for destination in config.destinations.iter().filter(|d| d.tls) {
        files.push(("destinations.tls_ca", &destination.tls_ca));
        files.push(("destinations.tls_certificate", &destination.tls_certificate));
    }
    let notice_from = stamp_in(std::time::Duration::from_secs(EXPIRY_NOTICE_DAYS * 86_400));
    let mut notices = Vec::new();
    for (key, path) in files.into_iter().filter(|(_, path)| !path.is_empty()) {
        let Ok(found) = CertificateDer::pem_file_iter(Path::new(path)) else { continue };
        for certificate in found.flatten() {
            if let Some((_, not_after)) = validity(&certificate)
                && not_after <= notice_from
            {
                notices.push(format!("{key} ({path}): a certificate in it expires on {}", readable(&not_after)));
            }
        }
    }
    notices
}

/// UTC `ahead` from now as YYYYMMDDHHMMSS, the form [`validity`] gives, so the two compare as text.
fn stamp_in(ahead: std::time::Duration) -> String {
    let then = std::time::SystemTime::now() + ahead;
    crate::common::rfc3339_before(then, std::time::Duration::ZERO).replace(['-', ':', 'T', 'Z'], "")
}

/// A certificate's validity (notBefore, notAfter) as YYYYMMDDHHMMSS in UTC, read from its DER
/// (RFC 5280 4.1: the fifth element of tbsCertificate, after an optional version, the serial
/// number, the signature algorithm and the issuer).
fn validity(certificate: &[u8]) -> Option<(String, String)> {
    /// One DER element at the start of `bytes`: (tag, contents, the rest).
    fn element(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = bytes.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (length, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            (rest[..count].iter().fold(0usize, |n, &b| (n << 8) | usize::from(b)), &rest[count..])
        };
        (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
    }
    fn time(tag: u8, contents: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(contents).ok()?.strip_suffix('Z')?;
        match (tag, text.len()) {
            // UTCTime: YYMMDDHHMMSS, years 50 to 99 being 19xx (RFC 5280 4.1.2.5.1).
            (0x17, 12) => Some(format!("{}{text}", if text[..2] >= *"50" { "19" } else { "20" })),
            // GeneralizedTime: YYYYMMDDHHMMSS.
            (0x18, 14) => Some(text.to_string()),
            _ => None,
        }
    }
    let (_, certificate, _) = element(certificate)?;
    let (_, tbs, _) = element(certificate)?;
    let (tag, _, mut rest) = element(tbs)?;
    if tag != 0xA0 {
        rest = tbs; // no version: the serial number comes first
    }
    for _ in 0..3 {
        rest = element(rest)?.2; // serial number, signature algorithm, issuer
    }
    let (_, validity, _) = element(rest)?;
    let (before_tag, before, rest) = element(validity)?;
    let (after_tag, after, _) = element(rest)?;
    Some((time(before_tag, before)?, time(after_tag, after)?))
}

/// YYYYMMDDHHMMSS as YYYY-MM-DD HH:MM:SS UTC.
fn readable(stamp: &str) -> String {
    format!(
        "{}-{}-{} {}:{}:{} UTC",
        &stamp[..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[8..10],
        &stamp[10..12],
        &stamp[12..14]
    )
}

fn private_key(key: &'static str, path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(Path::new(path)).map_err(|e| file_error(key, path)(e.to_string()))
}

fn refused(what: &'static str) -> impl Fn(rustls::Error) -> TlsError {
    move |e| TlsError::Refused { what, reason: e.to_string() }
}

/// The CA certificates in a PEM file, as trust anchors.
fn trust_anchors(key: &'static str, path: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(key, path)? {
        roots.add(certificate).map_err(|e| file_error(key, path)(e.to_string()))?;
    }
    Ok(roots)
}

/// The TLS listener's configuration, checked: files readable, PEM that parses, the key that of
/// the certificate, the CA a usable trust anchor. `None` when `dicom.tls_port` is 0.
pub fn server_config(dicom: &DicomConfig) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    if dicom.tls_port == 0 {
        return Ok(None);
    }
    let chain = certificates("dicom.tls_certificate", &dicom.tls_certificate)?;
    let key = private_key("dicom.tls_private_key", &dicom.tls_private_key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(refused("TLS versions"))?;
    let builder = if dicom.tls_client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = trust_anchors("dicom.tls_client_ca", &dicom.tls_client_ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| file_error("dicom.tls_client_ca", &dicom.tls_client_ca)(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config =
        builder.with_single_cert(chain, key).map_err(refused("dicom.tls_certificate and dicom.tls_private_key"))?;
    Ok(Some(Arc::new(config)))
}

/// A destination's TLS client: the CA its certificate must chain to (`tls_ca`; the peer's host
/// name must be in it, as TLS checks it), and our certificate and key when it asks for one
/// (mutual TLS). `None` for a destination without `tls`.
pub fn client_config(destination: &Destination) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    if !destination.tls {
        return Ok(None);
    }
    let roots = trust_anchors("destinations.tls_ca", &destination.tls_ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(refused("TLS versions"))?
        .with_root_certificates(roots);
    let config = if destination.tls_certificate.is_empty() {
        builder.with_no_client_auth()
    } else {
        let chain = certificates("destinations.tls_certificate", &destination.tls_certificate)?;
        let key = private_key("destinations.tls_private_key", &destination.tls_private_key)?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(refused("destinations.tls_certificate and destinations.tls_private_key"))?
    };
    Ok(Some(Arc::new(config)))
}
