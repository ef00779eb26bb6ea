//! Making the read-only disk from an unpacked tree, with the stock tools: `mke2fs -d` for
//! ext4, `mkfs.erofs` for EROFS, each run with an argument vector (never a shell).
//!
//! **ext4** needs its size up front: the tree's blocks (each file rounded up to 4 KiB, a
//! block per directory and per long symlink), its inodes (256 bytes each) and 10 % + 4 MiB
//! for the file system's own metadata; if that is still too small, it is tried again 1.5
//! times larger. There is no journal (nothing ever writes the disk) and no reserved blocks.
//! `E2FSPROGS_FAKE_TIME`, a UUID and a hash seed derived from the disk's digest fix what
//! mke2fs would otherwise take from the clock or chance; the inodes' ctimes still come from
//! the unpacked tree, so two builds differ in those bytes.
//!
//! **EROFS** sizes itself. It keeps each file's mtime (`--preserve-mtime`; `-T` would
//! fix the superblock's build time too, but in erofs-utils 1.5 it also sets every file's
//! mtime, and Python's bytecode caches are checked against their sources' mtimes), and takes
//! the UUID from the digest. It is not compressed: the guest kernel then needs no
//! decompressor, and reads are plain page-cache reads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Filesystem;

/// Why the disk could not be made.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum MakeDiskError {
    /// {tool} not found: install {package}
    Missing {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// cannot run {tool}
    Run {
        /// The program.
        tool: &'static str,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// {tool} failed ({status}): {stderr}
    Failed {
        /// The program.
        tool: &'static str,
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// cannot measure the tree at {path}
    Measure {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
}

/// What a tree needs on an ext4 disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TreeSize {
    /// 4 KiB blocks of data.
    pub(crate) blocks: u64,
    /// Files, directories and links.
    pub(crate) inodes: u64,
}

const BLOCK: u64 = 4096;

/// Walks `tree` (never following a symlink) and adds up what it needs.
pub(crate) fn measure(tree: &Path) -> Result<TreeSize, MakeDiskError> {
    let mut size = TreeSize::default();
    let mut pending = vec![tree.to_owned()];
    let measure_error = |path: &Path| {
        let path = path.to_owned();
        move |source| MakeDiskError::Measure { path, source }
    };
    while let Some(dir) = pending.pop() {
        size.inodes += 1;
        let mut names = 0u64;
        for entry in fs::read_dir(&dir).map_err(measure_error(&dir))? {
            let entry = entry.map_err(measure_error(&dir))?;
            let metadata = entry.metadata().map_err(measure_error(&entry.path()))?;
            names += 16 + entry.file_name().len() as u64;
            if metadata.is_dir() {
                pending.push(entry.path());
                continue;
            }
            size.inodes += 1;
            if metadata.is_file() {
                size.blocks += metadata.len().div_ceil(BLOCK);
            } else if metadata.is_symlink() && metadata.len() >= 60 {
                size.blocks += 1;
            }
        }
        size.blocks += names.div_ceil(BLOCK).max(1);
    }
    Ok(size)
}

/// A UUID (text form) made from the first 16 bytes of a hex digest.
pub(crate) fn uuid_from(hex: &str) -> String {
    let h = |range: std::ops::Range<usize>| hex.get(range).unwrap_or("0");
    format!(
        "{}-{}-{}-{}-{}",
        h(0..8),
        h(8..12),
        h(12..16),
        h(16..20),
        h(20..32)
    )
}

/// Makes the disk `out` holding `tree`, with root owning its root directory.
pub(crate) fn make(
    tree: &Path,
    fs: Filesystem,
    digest_hex: &str,
    out: &Path,
) -> Result<(), MakeDiskError> {
    let uuid = uuid_from(digest_hex);
    match fs {
        Filesystem::Ext4 => make_ext4(tree, &uuid, out),
        Filesystem::Erofs => {
            let mut command = Command::new("mkfs.erofs");
            command
                .arg("--quiet")
                .arg("--preserve-mtime")
                .arg(format!("-U{uuid}"))
                .arg(out)
                .arg(tree);
            run("mkfs.erofs", "erofs-utils", &mut command)
        }
    }
}

fn make_ext4(tree: &Path, uuid: &str, out: &Path) -> Result<(), MakeDiskError> {
    let size = measure(tree)?;
    let inodes = size.inodes + size.inodes / 10 + 64;
    let bytes = (size.blocks * BLOCK + inodes * 256) * 11 / 10 + (4 << 20);
    let mut blocks = bytes.div_ceil(BLOCK);
    let mut attempt = 0;
    loop {
        let _ = fs::remove_file(out);
        let mut command = Command::new("mke2fs");
        command
            .env("E2FSPROGS_FAKE_TIME", "1")
            .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096"])
            .args(["-I", "256", "-m", "0"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-U")
            .arg(uuid)
            .arg("-E")
            .arg(format!("root_owner=0:0,hash_seed={uuid},nodiscard"))
            .arg("-d")
            .arg(tree)
            .arg(out)
            .arg(blocks.to_string());
        match run("mke2fs", "e2fsprogs", &mut command) {
            Err(MakeDiskError::Failed { .. }) if attempt < 2 => {
                // Most likely too small: the estimate is rough for trees of many tiny files.
                attempt += 1;
                blocks += blocks / 2;
            }
            result => return result,
        }
    }
}

/// Runs `command`, saying which tool and package when it is missing or fails.
fn run(
    tool: &'static str,
    package: &'static str,
    command: &mut Command,
) -> Result<(), MakeDiskError> {
    let output = command.output().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => MakeDiskError::Missing { tool, package },
        _ => MakeDiskError::Run { tool, source },
    })?;
    if !output.status.success() {
        return Err(MakeDiskError::Failed {
            tool,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn uuids_come_from_the_digest() {
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(uuid_from(hex), "01234567-89ab-cdef-0123-456789abcdef");
    }

    #[test]
    fn a_tree_is_measured_in_blocks_and_inodes() {
        let scratch = test_support::Scratch::new("measure");
        let tree = scratch.join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/one"), vec![0; 5000]).unwrap();
        fs::write(tree.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("a/one", tree.join("link")).unwrap();
        let size = measure(&tree).unwrap();
        assert_eq!(size.inodes, 6);
        assert_eq!(size.blocks, 2 + 3);
    }
}
