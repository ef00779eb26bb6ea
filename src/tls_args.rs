//! `--tls-cert` and `--tls-key`, shared by `squall balance` and `squall up`: parsed at the
//! edge into a [`balancer::TlsFiles`], read and checked before anything starts, so a bad
//! file stops the command with an error that names it.

use std::path::PathBuf;

use anyhow::Context as _;
use balancer::{TlsError, TlsFiles};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// TLS on the client-facing listener.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TlsArgs {
    /// Terminate TLS on the client listener with this certificate chain (PEM: the server's
    /// certificate first, then any intermediates); needs --tls-key. Clients then speak
    /// HTTP/2 or HTTP/1.1 as ALPN settles. Both files are read again when they change and on
    /// SIGHUP; a pair that does not load is logged and the old one kept.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The certificate and key, loaded and checked; `None` without the flags.
    pub(crate) fn files(&self) -> Result<Option<TlsFiles>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsFiles::load(cert, key).map(Some),
            // clap requires both or neither.
            _ => Ok(None),
        }
    }
}

/// With TLS or an admin token file, SIGHUP reloads the certificate or the token (`reloads`):
/// caught from the call on (while the returned handle lives, and in fact for the rest of the
/// process), so that one sent right after start-up, before a reloader watches it, cannot end
/// the process (SIGHUP's default action). Without either nothing changes.
pub(crate) fn catch_hangup(reloads: bool) -> anyhow::Result<Option<Signal>> {
    reloads
        .then(|| signal(SignalKind::hangup()))
        .transpose()
        .context("watching SIGHUP")
}
