//! TLS on the client-facing listener: the certificate and key, read and checked once at the
//! edge ([`TlsFiles::load`]), the rustls server configuration built from them, and the
//! certificate in force, swapped whole when the files change.
//!
//! rustls with the `ring` provider and its defaults: TLS 1.3 and TLS 1.2 with ECDHE and AEAD
//! suites only, nothing older. ALPN offers `h2` and `http/1.1`; `lifecycle` serves what was
//! chosen. The certificate is found per handshake through [`Certificates`], one
//! `ArcSwap<CertifiedKey>`, so a reload ([`reload`]) changes what new handshakes get and
//! leaves established connections alone.

pub(crate) mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often the files are looked at for a change, unless [`TlsFiles::poll_every`] says.
pub const TLS_POLL: Duration = lifecycle::FILE_POLL;

/// A certificate chain and its private key, in PEM files: read and checked when made, and
/// read again when they change. The certificate file holds the leaf first, then any
/// intermediates; the key file one PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
#[derive(Clone)]
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    poll: Duration,
    /// What the files held when they were read.
    loaded: Arc<CertifiedKey>,
    /// The files' fingerprints from just before they were read, so that a change made
    /// between the read and the reloader's start is still seen.
    read_from: reload::Fingerprints,
}

/// A certificate or key that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{} is not valid PEM", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)", .0.display())]
    NoCertificate(PathBuf),
    /// The key file holds no private key.
    #[error(
        "{} holds no private key (expected a PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block)",
        .0.display()
    )]
    NoKey(PathBuf),
    /// The private key is not one rustls can sign with.
    #[error("{}: the private key cannot be used", .path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The first certificate (the leaf) does not parse.
    #[error("{}: the first certificate cannot be parsed", .path.display())]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The key is not the certificate's.
    #[error("the private key in {} does not match the certificate in {}", .key.display(), .cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration (its provider has no suite for the versions).
    #[error("setting up TLS")]
    Setup(#[source] rustls::Error),
}

impl TlsFiles {
    /// Reads the certificate chain at `cert` and the private key at `key`, and checks that
    /// the key is the leaf certificate's.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let read_from = reload::fingerprints(&cert, &key);
        let loaded = Arc::new(read_pair(&cert, &key)?);
        Ok(Self {
            cert,
            key,
            poll: TLS_POLL,
            loaded,
            read_from,
        })
    }

    /// Looks at the files for a change every `every` (at least every millisecond) instead
    /// of every [`TLS_POLL`].
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// The files read again (after a change).
    fn reread(&self) -> Result<CertifiedKey, TlsError> {
        read_pair(&self.cert, &self.key)
    }
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

/// Two `TlsFiles` are equal when they name the same files, poll alike and were read with
/// the same certificate chain.
impl PartialEq for TlsFiles {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.poll == other.poll
            && self.loaded.cert == other.loaded.cert
    }
}

/// The crypto provider: ring, with rustls' default suites and key exchange groups.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Pem { path, source }
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let private_key = match PrivateKeyDer::from_pem_slice(&read(key)?) {
        Ok(private_key) => private_key,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey(key.to_owned()));
        }
        Err(source) => return Err(pem_error(key)(source)),
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(private_key)
        .map_err(|source| TlsError::Key {
            path: key.to_owned(),
            source,
        })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        // A key type whose public half rustls cannot derive is taken on trust, as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(pair),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        Err(source) => Err(TlsError::Certificate {
            path: cert.to_owned(),
            source,
        }),
    }
}

/// The certificate new handshakes get: one whole [`CertifiedKey`], swapped by a reload.
#[derive(Debug)]
pub(crate) struct Certificates {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// TLS as the balancer runs it: the files, the certificate in force and the server
/// configuration whose resolver reads it.
#[derive(Debug)]
pub(crate) struct TlsState {
    pub(crate) files: TlsFiles,
    pub(crate) certificates: Arc<Certificates>,
    pub(crate) server: Arc<ServerConfig>,
}

impl TlsState {
    pub(crate) fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let certificates = Arc::new(Certificates {
            current: ArcSwap::new(Arc::clone(&files.loaded)),
        });
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificates) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            files,
            certificates,
            server: Arc::new(server),
        })
    }
}
