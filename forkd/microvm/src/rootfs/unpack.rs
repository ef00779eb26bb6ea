//! Unpacking an image's layers, lowest first, into one directory tree, without ever writing
//! outside it.
//!
//! A layer is a tar archive, gzip- or zstd-compressed or plain (told apart by their magic
//! bytes, whatever the media type says). OCI whiteouts apply: `.wh.NAME` removes NAME of the
//! layers below (NAME taken as bytes, UTF-8 or not), and `.wh..wh..opq` empties its
//! directory of everything the layers below put there (what the same layer puts there
//! stays, in either order).
//!
//! **Safety.** Entries are untrusted:
//! - an absolute entry path, or one with a `..` component, is refused;
//! - the directories on an entry's path are resolved here, one component at a time, inside
//!   the root, the way the guest will see them: a symlink a lower layer planted is followed
//!   as if the root were `/` (an absolute target starts again at the root, `..` stops at the
//!   root), so it can redirect a write only to elsewhere inside the root. The file system
//!   calls then get paths with no symlink left in them, and the entry itself is created with
//!   calls that never follow a symlink (an existing file or link in its place is removed
//!   first). Nothing else writes into the tree while it is unpacked;
//! - a symlink whose target, relative, climbs above the root with `..` is refused (an
//!   absolute target is fine: it means the root in the guest);
//! - a hard link must name an existing non-directory entry inside the root;
//! - device nodes, FIFOs and sockets are refused (the guest's `/dev` is its own devtmpfs);
//! - the bytes unpacked (file contents, plus 512 for every entry, which bounds a flood of
//!   empty files, and 4096 for a directory or a symlink whose target is 60 bytes or more,
//!   which take a block each on ext4) may not exceed a limit, checked before a file is
//!   written, so a decompression bomb stops early;
//! - an image may hold at most 1,000,000 entries, all layers together, which bounds the
//!   inodes its disk needs (see [`limits`]);
//! - the bytes the layers decompress to, all together, may not exceed that same limit
//!   either, counted as tar reads them: tar holds a PAX or GNU long-name header's data in
//!   memory, and a tiny layer could declare a huge one (see [`limits`]);
//! - a layer that ends early (a truncated compressed stream or tar) is an error;
//! - a directory's mode, owner and mtime, applied at the end (see below), are forgotten
//!   when an entry or whiteout removes or replaces it or a directory above it, and are
//!   applied only to a directory reached from the root through real directories (never a
//!   symlink), through a handle opened with `O_NOFOLLOW`: a layer that replaces `a` by a
//!   symlink to a host directory after `a/sub/` cannot change the host's `sub` (see
//!   [`dirs`]).
//!
//! Modes, mtimes and symlinks are kept; owners are kept when the build runs as root (when
//! not, every file belongs to the user who builds). Extended attributes are not. Directory
//! modes and mtimes are applied at the very end, so that a read-only directory from one layer
//! does not stop the next layer from writing into it.

use std::cell::Cell;
use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use super::store::{BlobError, blob_error};

mod dirs;
mod limits;
#[cfg(test)]
mod tests;

use dirs::{DirMeta, Dirs};
use limits::Decompressed;

/// How many symlinks one path may pass through.
const MAX_SYMLINKS: usize = 40;

pub(crate) use limits::ENTRY_COST;

/// Why a layer (or a directory tree) could not be unpacked.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum UnpackError {
    /// it cannot be read
    Read(#[source] io::Error),
    /// it ends early: the archive is truncated
    Truncated,
    /// it is not the blob the image names
    Blob(#[source] BlobError),
    /// entry {0} is an absolute path
    Absolute(String),
    /// entry {0} climbs out of the root with `..`
    ParentDir(String),
    /// symlink {path} points outside the root (to {target})
    SymlinkEscape {
        /// The symlink.
        path: String,
        /// Its target.
        target: String,
    },
    /// hard link {path} points to {target}, which is not a file inside the root
    HardLink {
        /// The hard link.
        path: String,
        /// What it names.
        target: String,
    },
    /// {0} is a device node; device nodes are refused (the guest has its own /dev)
    Device(String),
    /// {0} is a FIFO or socket; they are refused (the app makes its own at run time)
    Fifo(String),
    /// entry {path} has a type this builder does not handle ({kind})
    Unsupported {
        /// The entry.
        path: String,
        /// Its tar type.
        kind: String,
    },
    /// {0} passes through a file where a directory is needed
    NotADirectory(String),
    /// {0} passes through more than 40 symlinks
    SymlinkLoop(String),
    /// the image unpacks to more than {limit} bytes, the limit (raise it with --max-size)
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// the image has more than {limit} entries, the limit
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// the layers decompress to more than {limit} bytes, the limit (raise it with --max-size)
    DecompressedTooLarge {
        /// The limit.
        limit: u64,
    },
    /// cannot read {path}
    ReadTree {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// cannot write {path}
    Write {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Maps a read error of a layer: a digest mismatch and a truncation get their own variants.
fn read_error(error: io::Error) -> UnpackError {
    match blob_error(error) {
        Ok(blob) => UnpackError::Blob(blob),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => UnpackError::Truncated,
        Err(error) => UnpackError::Read(error),
    }
}

/// Whether a relative symlink target, in a link at `depth` directories below the root, stays
/// inside the root when read lexically.
pub(crate) fn symlink_stays_inside(depth: usize, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut depth = depth as isize;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// A reader that notes when its inner reader has reached its end (without error).
struct EndWatch<R> {
    inner: R,
    ended: Rc<Cell<bool>>,
}

impl<R: Read> Read for EndWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ended.set(true);
        }
        Ok(n)
    }
}

/// Unpacks layers into a root directory.
#[derive(Debug)]
pub(crate) struct Unpacker {
    root: PathBuf,
    limit: u64,
    used: u64,
    /// The bytes all the layers so far decompressed to, counted by [`Decompressed`].
    decompressed: Rc<Cell<u64>>,
    /// The entries so far, and how many there may be.
    entries: u64,
    max_entries: u64,
    as_root: bool,
    dirs: Dirs,
    /// What the layer being unpacked has written, by real path: what an opaque directory keeps.
    this_layer: HashSet<PathBuf>,
}

impl Unpacker {
    /// Unpacks into `root` (an existing empty directory), up to `limit` bytes.
    pub(crate) fn new(root: &Path, limit: u64) -> Result<Self, UnpackError> {
        let metadata = fs::metadata(root).map_err(write_error(root))?;
        Ok(Self {
            root: root.to_owned(),
            limit,
            used: 0,
            decompressed: Rc::default(),
            entries: 0,
            max_entries: limits::DEFAULT_MAX_ENTRIES,
            // The staging root is ours: it belongs to root only if we are root.
            as_root: metadata.uid() == 0,
            dirs: Dirs::default(),
            this_layer: HashSet::new(),
        })
    }

    /// Applies one layer, read to its very end (so that a [`super::store::Verified`] reader
    /// under it checks its digest).
    pub(crate) fn apply(&mut self, layer: impl Read) -> Result<(), UnpackError> {
        self.this_layer.clear();
        let ended = Rc::new(Cell::new(false));
        let layer = EndWatch {
            inner: layer,
            ended: ended.clone(),
        };
        // A read error (from the decompressor or from tar) once the layer's bytes have all
        // been read means they stopped too soon.
        self.unpack(layer).map_err(|error| match error {
            UnpackError::Read(_) if ended.get() => UnpackError::Truncated,
            error => error,
        })
    }

    fn unpack(&mut self, layer: impl Read) -> Result<(), UnpackError> {
        let mut buffered = BufReader::new(layer);
        let magic = buffered.fill_buf().map_err(read_error)?;
        let stream: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(read_error)?)
        } else {
            Box::new(buffered)
        };
        let stream = Decompressed::new(stream, self.decompressed.clone(), self.limit);
        self.read_archive(stream).map_err(|error| {
            if self.decompressed.get() > self.limit {
                UnpackError::DecompressedTooLarge { limit: self.limit }
            } else {
                error
            }
        })
    }

    fn read_archive(&mut self, stream: impl Read) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(stream);
        for entry in archive.entries().map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            self.entry(entry)?;
        }
        // Whatever follows the end of the archive must be read for the digest to be
        // checked; it counts against the limit as decompressed bytes.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(read_error)?;
        Ok(())
    }

    fn charge_entry(&mut self, cost: u64) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: self.max_entries,
            });
        }
        self.charge(cost)
    }

    fn charge(&mut self, bytes: u64) -> Result<(), UnpackError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit {
            return Err(UnpackError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    fn entry(&mut self, mut entry: tar::Entry<'_, impl Read>) -> Result<(), UnpackError> {
        let raw = entry.path().map_err(read_error)?.into_owned();
        let shown = raw.display().to_string();
        let mut parts: Vec<OsString> = Vec::new();
        for component in raw.components() {
            match component {
                Component::RootDir | Component::Prefix(_) => {
                    return Err(UnpackError::Absolute(shown));
                }
                Component::ParentDir => return Err(UnpackError::ParentDir(shown)),
                Component::CurDir => {}
                Component::Normal(part) => parts.push(part.to_owned()),
            }
        }
        let header = entry.header();
        let kind = header.entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let link = entry.link_name_bytes().map_or(0, |target| target.len());
        self.charge_entry(limits::entry_cost(kind, link))?;
        let Some(name) = parts.pop() else {
            return Ok(()); // the root itself: it keeps the staging directory's attributes
        };
        let mode = header.mode().map_err(read_error)? & 0o7777;
        let owner = match (header.uid(), header.gid()) {
            (Ok(uid), Ok(gid)) if self.as_root => Some((
                u32::try_from(uid).unwrap_or(0),
                u32::try_from(gid).unwrap_or(0),
            )),
            _ => None,
        };
        let mtime = header.mtime().map_or(0, |t| i64::try_from(t).unwrap_or(0));
        // On the name's bytes: a name that is not UTF-8 can be whited out too.
        if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
            let Ok(parent) = self.resolve(&parts, &shown, false) else {
                return Ok(()); // whiting out inside a directory that is not there
            };
            if hidden == b".wh..opq" {
                return self.make_opaque(&parent);
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(UnpackError::ParentDir(shown));
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            if !self.this_layer.contains(&target) {
                self.remove(&target)?;
            }
            return Ok(());
        }

        if kind.is_block_special() || kind.is_character_special() {
            return Err(UnpackError::Device(shown));
        }
        if kind.is_fifo() {
            return Err(UnpackError::Fifo(shown));
        }
        let parent = self.resolve(&parts, &shown, true)?;
        let path = parent.join(&name);
        if kind.is_dir() {
            match fs::symlink_metadata(&path) {
                Ok(existing) if existing.is_dir() => {}
                _ => {
                    self.remove(&path)?;
                    fs::create_dir(&path).map_err(write_error(&path))?;
                }
            }
            self.dirs
                .record(path.clone(), DirMeta { mode, owner, mtime });
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            let size = entry.size();
            if self.used.saturating_add(size) > self.limit {
                return Err(UnpackError::TooLarge { limit: self.limit });
            }
            self.remove(&path)?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(write_error(&path))?;
            let written = io::copy(&mut entry, &mut file).map_err(read_error)?;
            self.charge(written)?;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(write_error(&path))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(write_error(&path))?;
                // chown clears set-id bits: put them back.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(write_error(&path))?;
            }
            let time = filetime::FileTime::from_unix_time(mtime, 0);
            filetime::set_file_handle_times(&file, Some(time), Some(time))
                .map_err(write_error(&path))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(read_error)?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            // Judged from where the link really is: the entry's path may pass through a
            // symlink, so its own depth can be more or less than the real one.
            let depth = parent
                .strip_prefix(&self.root)
                .map_or(parts.len(), |inside| inside.components().count());
            if target.as_os_str().is_empty() || !symlink_stays_inside(depth, &target) {
                return Err(UnpackError::SymlinkEscape {
                    path: shown,
                    target: target.display().to_string(),
                });
            }
            self.remove(&path)?;
            std::os::unix::fs::symlink(&target, &path).map_err(write_error(&path))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                    .map_err(write_error(&path))?;
            }
            let time = filetime::FileTime::from_unix_time(mtime, 0);
            filetime::set_symlink_file_times(&path, time, time).map_err(write_error(&path))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(read_error)?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let source = self
                .hard_link_source(&target)
                .ok_or_else(|| UnpackError::HardLink {
                    path: shown.clone(),
                    target: target.display().to_string(),
                })?;
            if source != path {
                self.remove(&path)?;
                fs::hard_link(&source, &path).map_err(write_error(&path))?;
            }
        } else {
            return Err(UnpackError::Unsupported {
                path: shown,
                kind: format!("{kind:?}"),
            });
        }
        // The directories above it come from this layer too, whether or not it names them:
        // an opaque directory keeps them (and empties them of what lower layers put there).
        let mut marked = Some(path.as_path());
        while let Some(path) = marked.filter(|p| *p != self.root) {
            if !self.this_layer.insert(path.to_owned()) {
                break;
            }
            marked = path.parent();
        }
        Ok(())
    }

    /// The real path of a hard link's target, if it is an existing non-directory inside the
    /// root.
    fn hard_link_source(&self, target: &Path) -> Option<PathBuf> {
        let mut parts = Vec::new();
        for component in target.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_owned()),
                Component::CurDir => {}
                _ => return None,
            }
        }
        let name = parts.pop()?;
        let path = self.resolve(&parts, "", false).ok()?.join(name);
        let metadata = fs::symlink_metadata(&path).ok()?;
        (!metadata.is_dir()).then_some(path)
    }

    /// The real path of the directory `parts` inside the root, following symlinks as the
    /// guest would with the root as `/`; missing directories are made when `create`.
    fn resolve(
        &self,
        parts: &[OsString],
        shown: &str,
        create: bool,
    ) -> Result<PathBuf, UnpackError> {
        let lookup = if create { Lookup::Create } else { Lookup::Dir };
        resolve_in(&self.root, parts, shown, lookup)
    }

    /// Empties `dir` of what lower layers put there.
    fn make_opaque(&mut self, dir: &Path) -> Result<(), UnpackError> {
        let entries = fs::read_dir(dir).map_err(write_error(dir))?;
        for entry in entries {
            let path = entry.map_err(write_error(dir))?.path();
            if !self.this_layer.contains(&path) {
                self.remove(&path)?;
            } else if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                self.make_opaque(&path)?;
            }
        }
        Ok(())
    }

    /// Removes whatever is at `path` (see [`remove`]), forgetting the directories that were
    /// there.
    fn remove(&mut self, path: &Path) -> Result<(), UnpackError> {
        self.dirs.forget(path);
        remove(path)
    }

    /// Gives every directory still there its mode, owner and mtime. Returns the bytes
    /// unpacked.
    pub(crate) fn finish(self) -> Result<u64, UnpackError> {
        self.dirs.apply(&self.root)?;
        Ok(self.used)
    }
}

/// What [`resolve_in`] looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A directory; missing ones on the way are made.
    Create,
    /// An existing directory.
    Dir,
    /// An existing file (the last component may be a non-directory).
    File,
}

/// The real path of `parts` under `root`, each component resolved inside the root (see the
/// module docs), as `lookup` says.
pub(crate) fn resolve_in(
    root: &Path,
    parts: &[OsString],
    shown: &str,
    lookup: Lookup,
) -> Result<PathBuf, UnpackError> {
    let mut real: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<OsString> = parts.iter().cloned().collect();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            real.pop();
            continue;
        }
        if part.is_empty() || part == "." {
            continue;
        }
        let path: PathBuf = std::iter::once(root.as_os_str())
            .chain(real.iter().map(OsString::as_os_str))
            .chain(std::iter::once(part.as_os_str()))
            .collect();
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => real.push(part),
            Ok(metadata) if metadata.is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(UnpackError::SymlinkLoop(shown.to_owned()));
                }
                let target = fs::read_link(&path).map_err(write_error(&path))?;
                if target.is_absolute() {
                    real.clear();
                }
                let mut spliced: Vec<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(part) => Some(part.to_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                spliced.extend(pending.drain(..));
                pending = spliced.into();
            }
            Ok(_) if lookup == Lookup::File && pending.is_empty() => real.push(part),
            Ok(_) => return Err(UnpackError::NotADirectory(shown.to_owned())),
            Err(error) if error.kind() == io::ErrorKind::NotFound && lookup == Lookup::Create => {
                fs::create_dir(&path).map_err(write_error(&path))?;
                real.push(part);
            }
            Err(error) => return Err(write_error(&path)(error)),
        }
    }
    Ok(std::iter::once(root.as_os_str())
        .chain(real.iter().map(OsString::as_os_str))
        .collect())
}

/// Removes whatever is at `path` (a directory with its contents), never following a
/// symlink; nothing there is fine.
fn remove(path: &Path) -> Result<(), UnpackError> {
    let result = match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    };
    result.map_err(write_error(path))
}
