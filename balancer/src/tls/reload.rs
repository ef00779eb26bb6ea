//! The certificate reloaded without dropping a connection: on SIGHUP, and when the files
//! change.
//!
//! A change is seen by [`lifecycle::FileWatch`], which polls the files' metadata following
//! symlinks (a Kubernetes Secret volume updates a file by swapping the `..data` symlink its
//! path goes through). A new pair is read and checked whole; if it cannot be used (unreadable,
//! malformed, a key that is not the certificate's, or a pair caught half-written) the error
//! is logged and the certificate in force stays. A good one is stored in
//! [`Certificates`](super::Certificates): new handshakes get it, established connections
//! keep theirs.

use std::path::Path;
use std::sync::Arc;

use lifecycle::{FileWatch, Fingerprint, Shutdown};
use tokio::signal::unix::Signal;

use super::TlsState;
use crate::Core;

/// The certificate's and the key's fingerprints; `None` for a file that cannot be looked at.
pub(crate) type Fingerprints = Vec<Option<Fingerprint>>;

/// The fingerprints of the files at `cert` and `key` now.
pub(crate) fn fingerprints(cert: &Path, key: &Path) -> Fingerprints {
    vec![Fingerprint::of(cert), Fingerprint::of(key)]
}

/// Reloads the certificate on `hangup` (when given) and when the files change, until
/// `shutdown`; counts each attempt in `squall_tls_reloads_total`.
pub(crate) async fn watch(core: Arc<Core>, hangup: Option<Signal>, shutdown: Shutdown) {
    let Some(tls) = &core.tls else { return };
    let paths = vec![
        tls.files.cert_path().to_owned(),
        tls.files.key_path().to_owned(),
    ];
    let seen = tls.files.read_from.clone();
    let mut watch = FileWatch::new(paths, seen, tls.files.poll, hangup);
    while let Some(why) = watch.changed(&shutdown).await {
        let applied = reload(tls, why).await;
        core.metrics.tls_reloaded(applied);
    }
}

/// Reads the files again and puts the pair in force, or logs why not and keeps the old one.
/// Returns whether the new pair was put in force. The files are read on a blocking thread,
/// not on the serving thread this task may share with client connections.
async fn reload(tls: &TlsState, why: &str) -> bool {
    let (cert, key) = (tls.files.cert_path(), tls.files.key_path());
    let files = tls.files.clone();
    let reread = match tokio::task::spawn_blocking(move || files.reread()).await {
        Ok(reread) => reread,
        Err(error) => {
            tracing::error!(%error, "TLS certificate reload ({why}) failed to run");
            return false;
        }
    };
    match reread {
        Ok(pair) => {
            tls.certificates.current.store(Arc::new(pair));
            tracing::info!(cert = %cert.display(), key = %key.display(), "TLS certificate reloaded ({why})");
            true
        }
        Err(error) => {
            tracing::error!(
                cert = %cert.display(),
                key = %key.display(),
                "TLS certificate reload ({why}) refused; keeping the certificate in force: {}",
                lifecycle::ErrorChain(&error)
            );
            false
        }
    }
}
