//! Which certificates upstream TLS trusts: Mozilla's roots built in, the operating system's
//! store, or both, plus the PEM files a user adds (`SSL_CERT_FILE`, `SSL_CERT_DIR`, `ca_file`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsConnector;

/// Largest certificate file read: a full public bundle is about 220 KB.
const MAX_CA_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most files read from one certificate directory.
const MAX_DIR_FILES: usize = 10_000;

/// The base set of roots (`tls_roots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsRoots {
    /// Mozilla's roots, compiled in: the same everywhere, distroless images included.
    #[default]
    Webpki,
    /// The operating system's store (what `update-ca-certificates` or the keychain holds).
    System,
    /// Both.
    Both,
}

impl TlsRoots {
    /// Reads `webpki`, `system` or `both`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "webpki" => Some(Self::Webpki),
            "system" => Some(Self::System),
            "both" => Some(Self::Both),
            _ => None,
        }
    }
}

/// Everything one upstream's TLS trusts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trust {
    /// The base set.
    pub roots: TlsRoots,
    /// PEM files whose certificates are added (`SSL_CERT_FILE`, then `ca_file`s).
    pub files: Vec<PathBuf>,
    /// Directories of PEM files whose certificates are added (`SSL_CERT_DIR`).
    pub dirs: Vec<PathBuf>,
}

/// Why the trusted certificates could not be loaded: a start-up error, never a request's.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A certificate file or directory could not be read.
    #[error("cannot read the CA certificates in {path}: {reason}")]
    Unreadable {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate file holds no PEM certificate.
    #[error("{0} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate(PathBuf),
    /// The system store was asked for and has no certificate.
    #[error(
        "tls_roots = \"system\", and the operating system's certificate store is empty or unreadable{0}"
    )]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS connectors of one trust: one offering only HTTP/1.1 by ALPN, one offering HTTP/2
/// first.
#[derive(Clone)]
pub struct TlsClients {
    /// ALPN `http/1.1`.
    pub http1: TlsConnector,
    /// ALPN `h2`, `http/1.1`.
    pub http2: TlsConnector,
}

impl std::fmt::Debug for TlsClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsClients")
    }
}

impl TlsClients {
    /// Loads what `trust` names (files are read now, once) and builds its connectors.
    pub fn new(trust: &Trust) -> Result<Self, TrustError> {
        let roots = Arc::new(root_store(trust)?);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = |alpn: &[&[u8]]| -> Result<TlsConnector, TrustError> {
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(Arc::clone(&roots))
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(Self {
            http1: config(&[b"http/1.1"])?,
            http2: config(&[b"h2", b"http/1.1"])?,
        })
    }
}

/// A TLS client configuration of `trust` without ALPN, for connections that are not HTTP (the
/// PostgreSQL ledger's).
pub fn plain_config(trust: &Trust) -> Result<rustls::ClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(trust)?)
        .with_no_client_auth())
}

/// The roots `trust` names, read now.
fn root_store(trust: &Trust) -> Result<RootCertStore, TrustError> {
    let mut store = RootCertStore::empty();
    if matches!(trust.roots, TlsRoots::Webpki | TlsRoots::Both) {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if matches!(trust.roots, TlsRoots::System | TlsRoots::Both) {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 && trust.roots == TlsRoots::System {
            let why = found
                .errors
                .first()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            return Err(TrustError::NoSystemRoots(why));
        }
    }
    // Each file is read once, however many names lead to it: a certificate directory names
    // every certificate twice (its file and OpenSSL's hashed link to it), and SSL_CERT_FILE is
    // often the bundle in that same directory.
    let mut read = std::collections::HashSet::new();
    // A path that cannot be resolved is read anyway, so that `add_file` reports it.
    let mut first_time =
        |path: &Path| std::fs::canonicalize(path).map_or(true, |real| read.insert(real));
    for file in &trust.files {
        if first_time(file) {
            add_file(&mut store, file, true)?;
        }
    }
    for dir in &trust.dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| unreadable(dir, &e))?;
        for entry in entries.take(MAX_DIR_FILES).flatten() {
            // Anything that is not PEM is skipped by `add_file`.
            let path = entry.path();
            if path.is_file() && first_time(&path) {
                add_file(&mut store, &path, false)?;
            }
        }
    }
    Ok(store)
}

/// Adds the PEM certificates of `path`; with `required`, a file without one is an error.
fn add_file(store: &mut RootCertStore, path: &Path, required: bool) -> Result<(), TrustError> {
    let size = std::fs::metadata(path)
        .map_err(|e| unreadable(path, &e))?
        .len();
    if size > MAX_CA_FILE_BYTES {
        return Err(TrustError::Unreadable {
            path: path.to_owned(),
            reason: format!("larger than {MAX_CA_FILE_BYTES} bytes"),
        });
    }
    let pem = std::fs::read(path).map_err(|e| unreadable(path, &e))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 && required {
        return Err(TrustError::NoCertificate(path.to_owned()));
    }
    Ok(())
}

fn unreadable(path: &Path, err: &std::io::Error) -> TrustError {
    TrustError::Unreadable {
        path: path.to_owned(),
        reason: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_roots_need_no_file() {
        let store = root_store(&Trust::default()).unwrap();
        assert!(store.len() > 100, "{}", store.len());
    }

    #[test]
    fn a_file_without_a_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("company.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let trust = Trust {
            files: vec![path],
            ..Trust::default()
        };
        let err = root_store(&trust).unwrap_err().to_string();
        assert!(
            err.contains("company.pem") && err.contains("no PEM"),
            "{err}"
        );
        let missing = Trust {
            files: vec![dir.path().join("absent.pem")],
            ..Trust::default()
        };
        assert!(
            root_store(&missing)
                .unwrap_err()
                .to_string()
                .contains("absent.pem")
        );
    }

    #[test]
    fn a_certificate_reached_by_several_names_is_read_once() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corp.pem");
        std::fs::write(&file, pem).unwrap();
        std::os::unix::fs::symlink(&file, dir.path().join("1a2b3c4d.0")).unwrap();
        let trust = Trust {
            files: vec![file],
            dirs: vec![dir.path().to_owned()],
            ..Trust::default()
        };
        let built_in = root_store(&Trust::default()).unwrap().len();
        assert_eq!(root_store(&trust).unwrap().len(), built_in + 1);
        // A missing file is still reported, whatever was read before it.
        let missing = Trust {
            files: vec![dir.path().join("a.pem"), dir.path().join("b.pem")],
            ..Trust::default()
        };
        assert!(
            root_store(&missing)
                .unwrap_err()
                .to_string()
                .contains("a.pem")
        );
    }

    #[test]
    fn names_of_the_root_sets_are_read() {
        assert_eq!(TlsRoots::parse("both"), Some(TlsRoots::Both));
        assert_eq!(TlsRoots::parse("System"), None);
    }
}
