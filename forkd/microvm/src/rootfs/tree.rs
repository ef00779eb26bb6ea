//! A plain directory tree as a root filesystem: checked with the rules layers are held to
//! (no symlink that climbs out with `..`, no device node, FIFO or socket, at most the size
//! limit) and named by a digest over a walk of it, in sorted order: each entry's path, type,
//! mode, owner, link target and contents. The disk is then made from the directory itself,
//! owners and modes as they are (only the root directory becomes root's); the tree must
//! not change while it is built.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::unpack::{ENTRY_COST, UnpackError, symlink_stays_inside};

/// Walks `root`, checking every entry, and feeds the walk into `hasher`.
pub(crate) fn check_and_hash(
    root: &Path,
    limit: u64,
    hasher: &mut Sha256,
) -> Result<(), UnpackError> {
    let mut used = 0u64;
    walk(root, Path::new(""), limit, &mut used, hasher)
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::ReadTree {
        path: path.to_owned(),
        source,
    }
}

fn walk(
    root: &Path,
    relative: &Path,
    limit: u64,
    used: &mut u64,
    hasher: &mut Sha256,
) -> Result<(), UnpackError> {
    let dir = root.join(relative);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(read_error(&dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(read_error(&dir))?;
    names.sort();
    for name in names {
        let relative: PathBuf = relative.join(&name);
        let path = root.join(&relative);
        let shown = relative.display().to_string();
        let metadata = fs::symlink_metadata(&path).map_err(read_error(&path))?;
        *used = used.saturating_add(ENTRY_COST);
        let kind = metadata.file_type();
        hasher.update(relative.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(format!(
            "{:o} {} {}\0",
            metadata.mode(),
            metadata.uid(),
            metadata.gid()
        ));
        if kind.is_dir() {
            walk(root, &relative, limit, used, hasher)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).map_err(read_error(&path))?;
            let depth = relative.components().count() - 1;
            if !symlink_stays_inside(depth, &target) {
                return Err(UnpackError::SymlinkEscape {
                    path: shown,
                    target: target.display().to_string(),
                });
            }
            hasher.update(target.as_os_str().as_encoded_bytes());
            hasher.update([0]);
        } else if kind.is_file() {
            *used = used.saturating_add(metadata.len());
            if *used > limit {
                return Err(UnpackError::TooLarge { limit });
            }
            hasher.update(metadata.len().to_le_bytes());
            let mut file = fs::File::open(&path).map_err(read_error(&path))?;
            io::copy(&mut file, hasher).map_err(read_error(&path))?;
        } else {
            use std::os::unix::fs::FileTypeExt;
            if kind.is_block_device() || kind.is_char_device() {
                return Err(UnpackError::Device(shown));
            }
            return Err(UnpackError::Fifo(shown));
        }
        if *used > limit {
            return Err(UnpackError::TooLarge { limit });
        }
    }
    Ok(())
}
