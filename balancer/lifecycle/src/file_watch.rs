//! Noticing that files a process read at start have changed, without reading them: their
//! fingerprints (modification time, size, device and inode) looked at every so often, and
//! SIGHUP.
//!
//! Fingerprints follow symlinks: a Kubernetes Secret or ConfigMap volume updates a file by
//! swapping the `..data` symlink its path goes through, which changes the inode the path
//! leads to but not the path. The TLS certificate (`balancer`) and the admin token
//! ([`TokenFile`](crate::TokenFile)) are reloaded this way; what to do with a change (read,
//! check, keep the old contents if the new ones are bad) is their owner's business.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::Signal;
use tokio::time::{Interval, MissedTickBehavior};

use crate::Shutdown;

/// How often watched files are looked at, unless their owner says otherwise.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// What identifies a file's contents without reading them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    device: u64,
    inode: u64,
}

impl Fingerprint {
    /// The fingerprint of what `path` leads to now (symlinks followed); `None` for a file
    /// that cannot be looked at.
    pub fn of(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self {
            modified: m.modified().ok(),
            len: m.len(),
            device: m.dev(),
            inode: m.ino(),
        })
    }

    /// The fingerprints of `paths`, in order.
    pub fn of_all(paths: &[PathBuf]) -> Vec<Option<Self>> {
        paths.iter().map(|path| Self::of(path)).collect()
    }
}

/// The reasons to read some files again: SIGHUP, or a change of their fingerprints.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    seen: Vec<Option<Fingerprint>>,
    polls: Interval,
    hangup: Option<Signal>,
}

impl FileWatch {
    /// Watches `paths`, whose contents in force were read when they had the fingerprints
    /// `seen` (taken just before the read, so that a change made between the read and now
    /// is seen at the first look), looking every `poll` and, when given, on `hangup`.
    /// Must be called on a tokio runtime.
    pub fn new(
        paths: Vec<PathBuf>,
        seen: Vec<Option<Fingerprint>>,
        poll: Duration,
        hangup: Option<Signal>,
    ) -> Self {
        let mut polls = tokio::time::interval(poll.max(Duration::from_millis(1)));
        polls.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            paths,
            seen,
            polls,
            hangup,
        }
    }

    /// Waits for the next reason to read the files again and says it (`"SIGHUP"` or `"the
    /// files changed"`); `None` once `shutdown` comes. The fingerprints are taken again
    /// before this returns, so a change made while the caller reads is seen next time.
    pub async fn changed(&mut self, shutdown: &Shutdown) -> Option<&'static str> {
        let why = loop {
            let hung_up = async {
                match &mut self.hangup {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.wait() => return None,
                // A signal stream that ended (`None`) is dropped; polling goes on.
                received = hung_up => match received {
                    Some(()) => break "SIGHUP",
                    None => self.hangup = None,
                },
                _ = self.polls.tick() => {
                    if Fingerprint::of_all(&self.paths) != self.seen {
                        break "the files changed";
                    }
                }
            }
        };
        self.seen = Fingerprint::of_all(&self.paths);
        Some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stop;

    #[test]
    fn a_fingerprint_follows_a_swapped_symlink() {
        let dir = test_support::Scratch::new("fingerprint");
        for (name, text) in [("a", "one"), ("b", "two")] {
            std::fs::create_dir(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("token"), text).unwrap();
        }
        // As a Secret volume lays it out: token -> ..data/token, ..data -> a.
        std::os::unix::fs::symlink("a", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
        let before = Fingerprint::of(&dir.join("token"));
        assert!(before.is_some());
        assert_eq!(Fingerprint::of(&dir.join("token")), before);
        std::os::unix::fs::symlink("b", dir.join("..data.new")).unwrap();
        std::fs::rename(dir.join("..data.new"), dir.join("..data")).unwrap();
        assert_ne!(Fingerprint::of(&dir.join("token")), before);
        assert_eq!(Fingerprint::of(&dir.join("missing")), None);
    }

    #[tokio::test]
    async fn a_watch_reports_a_change_once_and_ends_at_shutdown() {
        let dir = test_support::Scratch::new("file-watch");
        let path = dir.join("file");
        std::fs::write(&path, "one").unwrap();
        let paths = vec![path.clone()];
        let mut watch = FileWatch::new(
            paths.clone(),
            Fingerprint::of_all(&paths),
            Duration::from_millis(5),
            None,
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "a new file").unwrap();
        let stop = Stop::new();
        let shutdown = stop.shutdown();
        assert_eq!(watch.changed(&shutdown).await, Some("the files changed"));
        // Nothing changed since: only the shutdown ends the next wait.
        let waiting = tokio::spawn(async move { watch.changed(&shutdown).await });
        tokio::task::yield_now().await;
        stop.stop();
        assert_eq!(waiting.await.unwrap(), None);
    }
}
