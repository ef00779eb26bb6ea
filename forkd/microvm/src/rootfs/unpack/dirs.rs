//! The directories' final mode, owner and mtime: recorded as their entries come, forgotten
//! when what is at their path is removed or replaced, and applied at the very end without
//! ever following a symlink.
//!
//! A recorded path can go stale: a later entry (of the same layer or another) may replace
//! one of its ancestors by a symlink, which could lead anywhere on the host. So the record
//! of a path, and of everything under it, is dropped when the path is removed; and at the
//! end each path is checked again from the root down, every component a real directory
//! (never a symlink), and is then changed only through a handle opened with `O_NOFOLLOW`,
//! which must be the very directory checked. Anything else is skipped, untouched.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{UnpackError, write_error};

/// The final mode, owner and mtime of a directory.
#[derive(Clone, Copy, Debug)]
pub(super) struct DirMeta {
    pub(super) mode: u32,
    pub(super) owner: Option<(u32, u32)>,
    pub(super) mtime: i64,
}

/// The directories unpacked so far, by real path (under the root), with their final
/// attributes.
#[derive(Debug, Default)]
pub(super) struct Dirs(BTreeMap<PathBuf, DirMeta>);

impl Dirs {
    /// Notes that the real directory `path` gets `meta` at the end.
    pub(super) fn record(&mut self, path: PathBuf, meta: DirMeta) {
        self.0.insert(path, meta);
    }

    /// Forgets `path` and everything under it, which are gone.
    pub(super) fn forget(&mut self, path: &Path) {
        // Paths order by component, so a path and those under it are one run of keys.
        let gone: Vec<PathBuf> = self
            .0
            .range::<Path, _>((Bound::Included(path), Bound::Unbounded))
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(path))
            .cloned()
            .collect();
        for key in gone {
            self.0.remove(&key);
        }
    }

    /// Gives every directory still there its attributes, deepest first (setting a child's
    /// mtime does not touch its parent's, but creating it did).
    pub(super) fn apply(&self, root: &Path) -> Result<(), UnpackError> {
        for (path, meta) in self.0.iter().rev() {
            let Some(dir) = open_real_dir(root, path)? else {
                continue; // removed or replaced since
            };
            if let Some((uid, gid)) = meta.owner {
                std::os::unix::fs::fchown(&dir, Some(uid), Some(gid)).map_err(write_error(path))?;
            }
            dir.set_permissions(fs::Permissions::from_mode(meta.mode))
                .map_err(write_error(path))?;
            let time = filetime::FileTime::from_unix_time(meta.mtime, 0);
            filetime::set_file_handle_times(&dir, Some(time), Some(time))
                .map_err(write_error(path))?;
        }
        Ok(())
    }
}

/// Opens `path` if it is a directory under `root` reached through real directories only
/// (no symlink in any component); `None` if it is not.
fn open_real_dir(root: &Path, path: &Path) -> Result<Option<fs::File>, UnpackError> {
    let Ok(relative) = path.strip_prefix(root) else {
        return Ok(None);
    };
    let mut walked = root.to_owned();
    let mut last = None;
    for component in relative.components() {
        let Component::Normal(part) = component else {
            return Ok(None);
        };
        walked.push(part);
        match fs::symlink_metadata(&walked) {
            // `symlink_metadata` does not follow a symlink: `is_dir` means a real directory.
            Ok(metadata) if metadata.is_dir() => last = Some(metadata),
            Ok(_) => return Ok(None),
            Err(error) if gone(&error) => return Ok(None),
            Err(error) => return Err(write_error(&walked)(error)),
        }
    }
    let Some(checked) = last else {
        return Ok(None);
    };
    let dir = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
    {
        Ok(dir) => dir,
        Err(error) if gone(&error) => return Ok(None),
        Err(error) => return Err(write_error(path)(error)),
    };
    let opened = dir.metadata().map_err(write_error(path))?;
    // The handle must be the directory checked, not one that took its place meanwhile.
    Ok((opened.dev() == checked.dev() && opened.ino() == checked.ino()).then_some(dir))
}

/// Whether an error says the path is not (or no longer) a directory reached without a
/// symlink.
fn gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
        || matches!(error.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR))
}
