//! What both sides share about TLS: reading PEM files with errors that name
//! the file and setting (never its contents), the crypto provider, and the
//! throwaway certificates of `ctmirror tls-selfsigned`.
//!
//! The receiver's serving side is `receiver::tls`, the agent's trust in a
//! receiver `agent::trust`.

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The crypto provider for every TLS configuration ctmirror builds. Named
/// explicitly because the dependency tree enables both of rustls' providers
/// (tiberius brings aws-lc-rs), and then rustls has no default to pick.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file that cannot be used. `setting` is the configuration key that
/// named the file (`tls_cert`, `tls_key`, `ca_file`), so that the operator
/// knows which line to fix. Messages never quote the file's contents: a key
/// file's text is the secret.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    #[error("cannot read {setting} {}: {source}", path.display())]
    Read { setting: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{setting} {} is not a valid PEM file: {problem}", path.display())]
    Malformed { setting: &'static str, path: PathBuf, problem: &'static str },
    #[error("{setting} {} holds no {expected}", path.display())]
    Missing { setting: &'static str, path: PathBuf, expected: &'static str },
}

/// Every `CERTIFICATE` block of a PEM file, in file order; at least one.
pub fn read_certificates(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let bytes = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(setting, path, &e))?;
    if certs.is_empty() {
        return Err(PemFileError::Missing {
            setting,
            path: path.to_owned(),
            expected: "certificate (a -----BEGIN CERTIFICATE----- block)",
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(setting: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemFileError> {
    let bytes = read(setting, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => PemFileError::Missing {
            setting,
            path: path.to_owned(),
            expected: "private key (a -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY block)",
        },
        e => malformed(setting, path, &e),
    })
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, PemFileError> {
    std::fs::read(path).map_err(|source| PemFileError::Read { setting, path: path.to_owned(), source })
}

/// Describes a PEM syntax error by its kind only: the variants carry lines
/// and decoder messages from the file, which for a key file are secret.
fn malformed(setting: &'static str, path: &Path, e: &pem::Error) -> PemFileError {
    let problem = match e {
        pem::Error::MissingSectionEnd { .. } => "a block has no -----END line",
        pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a block's body is not base64",
        pem::Error::SectionTooLarge => "a block is too large",
        _ => "it cannot be parsed",
    };
    PemFileError::Malformed { setting, path: path.to_owned(), problem }
}

/// The files `ctmirror tls-selfsigned` writes into one directory.
pub const SELF_SIGNED_FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];

/// Hosts a self-signed certificate is for when none are named: the demo and
/// tests reach the receiver on loopback.
pub const DEFAULT_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

#[derive(Debug, thiserror::Error)]
pub enum SelfSignedError {
    #[error("{0:?} is neither an IP address nor a DNS name")]
    BadHost(String),
    #[error("{} already exists; tls-selfsigned never overwrites (use a new directory)", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot generate the certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Writes a fresh CA (`ca.pem`, the file agents name as `ca_file`) and a
/// server certificate it signed for `hosts` (`cert.pem`, and `key.pem` with
/// mode 0600) into `dir`, for tests and demos: production receivers use a
/// certificate from a real CA. The CA's own key is thrown away, so the CA
/// can sign nothing else. Refuses to overwrite any of the three files.
pub fn write_self_signed(dir: &Path, hosts: &[String]) -> Result<[PathBuf; 3], SelfSignedError> {
    for host in hosts {
        rustls::pki_types::ServerName::try_from(host.as_str()).map_err(|_| SelfSignedError::BadHost(host.clone()))?;
    }
    let paths = SELF_SIGNED_FILES.map(|f| dir.join(f));
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(SelfSignedError::Exists(existing.clone()));
    }
    let (ca_pem, cert_pem, key_pem) = generate(hosts)?;
    std::fs::create_dir_all(dir).map_err(|source| SelfSignedError::Write { path: dir.to_owned(), source })?;
    for (path, text, mode) in [(&paths[0], ca_pem, 0o644), (&paths[1], cert_pem, 0o644), (&paths[2], key_pem, 0o600)] {
        crate::auth::create_new_file(path, &text, mode)
            .map_err(|source| SelfSignedError::Write { path: path.clone(), source })?;
    }
    Ok(paths)
}

/// (CA certificate, server certificate, server key), all PEM.
fn generate(hosts: &[String]) -> Result<(String, String, String), rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use chrono::Datelike;
    let (from, until) = validity();
    let day = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "ctmirror tls-selfsigned test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (ca.not_before, ca.not_after) = (day(from), day(until));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(hosts.to_vec())?;
    server.distinguished_name.push(DnType::CommonName, hosts.first().map(String::as_str).unwrap_or("ctmirror"));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.use_authority_key_identifier_extension = true;
    (server.not_before, server.not_after) = (day(from), day(until));
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;
    Ok((ca_cert.pem(), server_cert.pem(), server_key.serialize_pem()))
}

/// From yesterday (a clock slightly behind still accepts it) for two years:
/// long enough for a kept demo, short enough not to pass for a real one.
fn validity() -> (chrono::NaiveDate, chrono::NaiveDate) {
    let today = chrono::Utc::now().date_naive();
    (today - chrono::Days::new(1), today + chrono::Days::new(730))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctm-tls-{label}-{}", crate::auth::new_nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn pem_errors_name_the_setting_and_file_but_never_the_contents() {
        let dir = scratch("pem");
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==!!\n-----END PRIVATE KEY-----\n";
        let cases = [
            ("garbage", "this is not PEM at all\n", "holds no private key"),
            ("broken", secret, "not base64"),
            ("unterminated", "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n", "no -----END line"),
        ];
        for (name, text, expected) in cases {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let err = read_private_key("tls_key", &path).unwrap_err().to_string();
            assert!(err.contains("tls_key") && err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(expected), "{name}: {err}");
            assert!(!err.contains("c2VjcmV0"), "key material leaked: {err}");
        }
        let err = read_certificates("ca_file", &dir.join("garbage")).unwrap_err().to_string();
        assert!(err.contains("ca_file") && err.contains("holds no certificate"), "{err}");
        let err = read_certificates("tls_cert", &dir.join("absent.pem")).unwrap_err().to_string();
        assert!(err.starts_with("cannot read tls_cert") && err.contains("absent.pem"), "{err}");
    }

    #[test]
    fn self_signed_refuses_bad_hosts_and_existing_files() {
        let dir = scratch("selfsigned");
        let err = write_self_signed(&dir, &["not a host".into()]).unwrap_err();
        assert!(err.to_string().contains("neither an IP address nor a DNS name"), "{err}");
        assert!(!dir.join("ca.pem").exists(), "nothing is written for a bad host");
        let hosts: Vec<String> = DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
        let [ca, cert, key] = write_self_signed(&dir, &hosts).unwrap();
        assert_eq!(read_certificates("ca_file", &ca).unwrap().len(), 1);
        assert_eq!(read_certificates("tls_cert", &cert).unwrap().len(), 1);
        read_private_key("tls_key", &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let before = std::fs::read(&key).unwrap();
        let err = write_self_signed(&dir, &hosts).unwrap_err();
        assert!(err.to_string().contains("never overwrites"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), before);
    }
}
