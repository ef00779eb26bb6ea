//! The certificate reloaded without dropping a connection: on SIGHUP, and when the files
//! change.
//!
//! A change is seen by polling the files' metadata (modification time, size, device and
//! inode), following symlinks: a Kubernetes Secret volume updates a file by swapping the
//! `..data` symlink its path goes through, which changes the inode the path leads to but
//! not the path. A new pair is read and checked whole; if it cannot be used (unreadable,
//! malformed, a key that is not the certificate's, or a pair caught half-written) the error
//! is logged and the certificate in force stays. A good one is stored in
//! [`Certificates`](super::Certificates): new handshakes get it, established connections
//! keep theirs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use lifecycle::Shutdown;
use tokio::signal::unix::Signal;

use super::TlsState;
use crate::Core;

/// What identifies a file's contents without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    device: u64,
    inode: u64,
}

/// The certificate's and the key's fingerprints; `None` for a file that cannot be looked at.
pub(crate) type Fingerprints = [Option<Fingerprint>; 2];

/// The fingerprints of the files at `cert` and `key` now.
pub(crate) fn fingerprints(cert: &Path, key: &Path) -> Fingerprints {
    let of = |path: &Path| {
        // `metadata` follows symlinks: what the path leads to now.
        std::fs::metadata(path).ok().map(|m| Fingerprint {
            modified: m.modified().ok(),
            len: m.len(),
            device: m.dev(),
            inode: m.ino(),
        })
    };
    [of(cert), of(key)]
}

/// Reloads the certificate on `hangup` (when given) and when the files change, until
/// `shutdown`; counts each attempt in `squall_tls_reloads_total`.
pub(crate) async fn watch(core: Arc<Core>, mut hangup: Option<Signal>, shutdown: Shutdown) {
    let Some(tls) = &core.tls else { return };
    let (cert, key) = (tls.files.cert_path(), tls.files.key_path());
    let mut seen = tls.files.read_from.clone();
    let mut polls = tokio::time::interval(tls.files.poll);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hung_up = async |hangup: &mut Option<Signal>| match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    };
    loop {
        let why = tokio::select! {
            () = shutdown.wait() => return,
            // A signal stream that ended (`None`) only disables this branch.
            Some(()) = hung_up(&mut hangup) => "SIGHUP",
            _ = polls.tick() => {
                if fingerprints(cert, key) == seen {
                    continue;
                }
                "the files changed"
            }
        };
        // Taken before the read, so a change made while reading is seen at the next poll.
        seen = fingerprints(cert, key);
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
