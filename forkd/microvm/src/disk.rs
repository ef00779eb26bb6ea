//! A root filesystem disk's identity, as a template saw it: a snapshot is only good with the
//! very disk it was taken with (the guest's page cache, the overlay's view of the lower layer
//! and every open file are in the saved RAM), so every clone checks the disk before its QEMU
//! starts and refuses one that was replaced or changed.
//!
//! The identity is the [`Rootfs::digest`] the disk was built under plus what the file system
//! says of the file: its device and inode (a replaced file is another inode, even under the
//! same name), its size, its modification time (a file changed in place) and its status
//! change time, which no program can set back (a file changed in place whose modification
//! time was then restored, as `cp -p` or `touch -r` do). Hashing the disk would prove more,
//! but costs seconds per clone; `stat` costs microseconds. A pool's
//! restored standby is checked when it is launched, not when it is resumed: its QEMU has the
//! checked file open from then on.

use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::rootfs::Rootfs;

/// Why a root filesystem disk cannot be used.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum DiskError {
    /// cannot read the root filesystem disk {disk}
    Read {
        /// The disk.
        disk: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// the root filesystem disk {disk} is not the one the template was made with: its {what} was {was} and is now {now} (make the template again)
    Changed {
        /// The disk.
        disk: PathBuf,
        /// What differs: `digest`, `device`, `inode`, `size`, `modification time` or
        /// `status change time`.
        what: &'static str,
        /// What it was when the template was made.
        was: String,
        /// What it is now.
        now: String,
    },
}

/// What identifies a disk file: see the module's documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiskIdentity {
    disk: PathBuf,
    digest: String,
    device: u64,
    inode: u64,
    size: u64,
    /// Seconds and nanoseconds.
    modified: (i64, i64),
    /// Seconds and nanoseconds.
    changed: (i64, i64),
}

impl DiskIdentity {
    /// The identity of `rootfs`'s disk now.
    pub(crate) fn of(rootfs: &Rootfs) -> Result<Self, DiskError> {
        let meta = std::fs::metadata(&rootfs.disk).map_err(|source| DiskError::Read {
            disk: rootfs.disk.clone(),
            source,
        })?;
        Ok(Self {
            disk: rootfs.disk.clone(),
            digest: rootfs.digest.clone(),
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Checks that `rootfs`'s disk is still this one.
    pub(crate) fn check(&self, rootfs: &Rootfs) -> Result<(), DiskError> {
        let now = Self::of(rootfs)?;
        let changed = |what, was: String, now: String| DiskError::Changed {
            disk: self.disk.clone(),
            what,
            was,
            now,
        };
        let time = |(s, ns): (i64, i64)| format!("{s}.{ns:09}");
        if now.digest != self.digest {
            return Err(changed("digest", self.digest.clone(), now.digest));
        }
        let numbers = [
            ("device", self.device, now.device),
            ("inode", self.inode, now.inode),
            ("size", self.size, now.size),
        ];
        if let Some((what, was, is)) = numbers.into_iter().find(|(_, was, is)| was != is) {
            return Err(changed(what, was.to_string(), is.to_string()));
        }
        let times = [
            ("modification time", self.modified, now.modified),
            ("status change time", self.changed, now.changed),
        ];
        if let Some((what, was, is)) = times.into_iter().find(|(_, was, is)| was != is) {
            return Err(changed(what, time(was), time(is)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;
    use crate::rootfs::Filesystem;

    fn rootfs(disk: PathBuf) -> Rootfs {
        Rootfs {
            digest: "sha256:ab".into(),
            ..Rootfs::for_tests(disk, Filesystem::Ext4, vec![])
        }
    }

    #[test]
    fn a_disk_replaced_changed_or_gone_is_refused_and_an_untouched_one_passes() {
        let dir = std::env::temp_dir().join(format!("squall-disk-{}", crate::run_files::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("app.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let rootfs = rootfs(disk.clone());
        let identity = DiskIdentity::of(&rootfs).unwrap();
        identity.check(&rootfs).unwrap();

        let other_digest = Rootfs {
            digest: "sha256:cd".into(),
            ..rootfs.clone()
        };
        let err = identity.check(&other_digest).unwrap_err();
        assert!(
            matches!(err, DiskError::Changed { what: "digest", .. }),
            "{err}"
        );

        // Touched in place: same inode, another modification time.
        let file = std::fs::File::options().write(true).open(&disk).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        file.set_modified(later).unwrap();
        let err = identity.check(&rootfs).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Changed {
                    what: "modification time",
                    ..
                }
            ),
            "{err}"
        );

        // Written in place with the same size, its modification time put back: the status
        // change time still tells.
        let identity = DiskIdentity::of(&rootfs).unwrap();
        let modified = std::fs::metadata(&disk).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&disk, b"DISK").unwrap();
        let file = std::fs::File::options().write(true).open(&disk).unwrap();
        file.set_modified(modified).unwrap();
        let err = identity.check(&rootfs).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::Changed {
                    what: "status change time",
                    ..
                }
            ),
            "{err}"
        );

        // Replaced: another file renamed over it.
        let new = dir.join("new.ext4");
        std::fs::write(&new, b"disk").unwrap();
        std::fs::rename(&new, &disk).unwrap();
        let err = identity.check(&rootfs).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "the root filesystem disk {} is not the one the template was made with: its inode was",
                disk.display()
            )),
            "{err}"
        );

        std::fs::remove_file(&disk).unwrap();
        let err = identity.check(&rootfs).unwrap_err();
        assert!(matches!(err, DiskError::Read { .. }), "{err}");
        std::fs::remove_dir(&dir).unwrap();
    }
}
