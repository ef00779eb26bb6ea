//! What the `unpack_layers` fuzz target (`fuzz/`) checks on every input, kept here so that
//! the normal test suite checks it too, over the seeds in `fuzz/seeds/unpack_layers/` (small
//! layers of the kinds images hold, and every input a fuzzer once failed on). Not part of the
//! crate's API: built for this crate's tests and with the `fuzzing` feature only.
//!
//! An input is one or more layers, each a 4-byte little-endian length and that many bytes
//! (the last takes whatever is left). A plain tar layer gets its headers' checksums fixed
//! before it is unpacked, so that a mutation reaches the unpacker instead of tar's checksum
//! test; a gzip or zstd layer is taken as it is.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::unpack::{UnpackError, Unpacker, symlink_stays_inside};

/// Most bytes an input may unpack to: small, so that each run is quick.
const LIMIT: u64 = 1 << 20;

/// Where the checks make their scratch directories: one per process, under the temporary
/// directory. The fuzz target confines the process's writes to it (and to `fuzz/`).
pub fn scratch_base() -> PathBuf {
    std::env::temp_dir().join(format!("squall-fuzz-unpack-{}", std::process::id()))
}

/// Unpacks the layers of `input` (see the module docs) the way an image build does, into an
/// empty `root` beside a directory `outside` that holds a file, a directory and a symlink,
/// and panics if the unpacker broke its promises (see `unpack.rs`):
///
/// - nothing outside `root` changed: `outside` and the scratch directory are as they were,
///   and no write was refused for being outside the directories the process may write to
///   (which, under the fuzz target's confinement, is how a write elsewhere shows);
/// - once every layer is unpacked, the tree holds no device node, FIFO or socket, and no
///   symlink whose relative target climbs above the root from where the link really is.
pub fn check_unpack(input: &[u8]) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let scratch = scratch_base().join(RUNS.fetch_add(1, Ordering::Relaxed).to_string());
    let root = scratch.join("root");
    let outside = scratch.join("outside");
    let setup = || -> io::Result<()> {
        fs::create_dir_all(&root)?;
        fs::create_dir_all(outside.join("dir"))?;
        fs::write(outside.join("file"), b"not the image's")?;
        std::os::unix::fs::symlink("dir", outside.join("link"))
    };
    if let Err(e) = setup() {
        panic!("cannot set up {}: {e}", scratch.display());
    }
    // From the directory of every run: a `..` too many lands there.
    let before = snapshot(&scratch_base(), &root);

    let outcome = unpack(&root, &layers(input));

    assert_eq!(
        snapshot(&scratch_base(), &root),
        before,
        "unpacking changed something outside the root ({outcome:?})"
    );
    if let Err(UnpackError::Write { path, source }) = &outcome {
        assert!(
            source.kind() != io::ErrorKind::PermissionDenied || !running_as_root(),
            "a write to {} was refused: outside the root?",
            path.display()
        );
    }
    if outcome.is_ok() {
        check_tree(&root, 0);
    }
    remove(&scratch);
}

/// The layers of `input`: each a 4-byte little-endian length and its bytes.
fn layers(mut input: &[u8]) -> Vec<Vec<u8>> {
    let mut layers = Vec::new();
    while !input.is_empty() && layers.len() < 8 {
        let (len, rest) = match input.split_first_chunk::<4>() {
            Some((len, rest)) => (u32::from_le_bytes(*len) as usize, rest),
            None => (input.len(), input),
        };
        let (layer, rest) = rest.split_at(len.min(rest.len()));
        let mut layer = layer.to_vec();
        fix_checksums(&mut layer);
        layers.push(layer);
        input = rest;
    }
    layers
}

/// Sets the checksum of every header of a plain tar layer, walking it header by header.
fn fix_checksums(layer: &mut [u8]) {
    let compressed = layer.starts_with(&[0x1f, 0x8b]) || layer.starts_with(&[0x28, 0xb5]);
    let mut at = 0;
    while !compressed && at + 512 <= layer.len() {
        let block = &mut layer[at..at + 512];
        if block.iter().all(|&b| b == 0) {
            return;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = std::str::from_utf8(&block[124..136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c| c == ' ' || c == '\0'), 8).ok())
            .unwrap_or(0);
        let data = usize::try_from(size.div_ceil(512) * 512).unwrap_or(usize::MAX);
        at = at.saturating_add(512).saturating_add(data);
    }
}

/// What an image build does with its layers: each in turn, then the directories' attributes.
fn unpack(root: &Path, layers: &[Vec<u8>]) -> Result<u64, UnpackError> {
    let mut unpacker = Unpacker::new(root, LIMIT)?;
    for layer in layers {
        unpacker.apply(&layer[..])?;
    }
    unpacker.finish()
}

/// Everything under `dir` but `skip`, never following a symlink: each entry's type, mode,
/// owner, mtime, and contents or target.
fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, String> {
    let mut seen = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == skip {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let what = if meta.is_dir() {
                pending.push(path.clone());
                String::new()
            } else if meta.is_symlink() {
                format!("-> {:?}", fs::read_link(&path).ok())
            } else {
                format!("{:?}", fs::read(&path).ok())
            };
            let attributes = format!(
                "{:o} {}:{} {} {what}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime()
            );
            seen.insert(path, attributes);
        }
    }
    seen
}

/// No device, FIFO or socket under `dir`, and no symlink that climbs out of the root from
/// where it is (`dir` is `depth` directories below the root).
fn check_tree(dir: &Path, depth: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            check_tree(&path, depth + 1);
        } else if kind.is_symlink() {
            if let Ok(target) = fs::read_link(&path) {
                assert!(
                    symlink_stays_inside(depth, &target),
                    "{} -> {} climbs out of the root",
                    path.display(),
                    target.display()
                );
            }
        } else {
            assert!(
                kind.is_file(),
                "{} is a {kind:?}, not a file",
                path.display()
            );
        }
    }
}

fn running_as_root() -> bool {
    fs::metadata(scratch_base()).is_ok_and(|m| m.uid() == 0)
}

/// Removes a scratch directory, giving its directories back the permissions a layer took.
fn remove(dir: &Path) {
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed of the fuzz target, and every input it once failed on, passes the checks.
    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        test_support::check_fuzz_seeds("unpack_layers", check_unpack);
        remove(&scratch_base());
    }
}
