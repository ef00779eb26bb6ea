//! Where an image's files are read from: a directory (an OCI image layout, or a `docker save`
//! archive someone extracted) or a tar archive of one (an OCI archive, a `docker save` /
//! `podman save` archive), behind one interface that opens a file by its path in the image.
//!
//! An archive is never extracted: it is read once to index its members (with seeks over
//! their data, so the index costs one pass over the headers), then each file is read in place
//! by seeking to its data. Symbolic and hard links between members (older `docker save`
//! writes a layer used twice as a symlink to the first) are followed inside the archive.
//!
//! Every blob is read through [`Verified`], which hashes what passes through it and, when the
//! reader reaches the end, fails unless the sha256 digest (and the size, when the image gives
//! one) match: a blob is never trusted before it has been read to its end.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The most a JSON document of an image (index, manifest, config) may hold.
const MAX_JSON: u64 = 4 << 20;

/// A `sha256:` content digest, checked to be 64 lowercase hex digits (so that it is safe to
/// use as a file name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 hex digits>`.
    pub(crate) fn parse(text: &str) -> Result<Self, ReadImageError> {
        let hex = text
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| ReadImageError::BadDigest {
                digest: text.to_owned(),
            })?;
        Ok(Self(hex.to_ascii_lowercase()))
    }

    /// The 64 hex digits.
    pub(crate) fn hex(&self) -> &str {
        &self.0
    }

    /// Where an OCI layout keeps the blob.
    pub(crate) fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.0)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why an image could not be read.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ReadImageError {
    /// {path} is neither an OCI image layout (a directory with oci-layout and index.json) nor an image archive (an OCI archive, or one written by docker save or podman save)
    NotAnImage {
        /// The path given.
        path: PathBuf,
    },
    /// {path} is a compressed archive: decompress it first (gunzip or unzstd)
    Compressed {
        /// The archive.
        path: PathBuf,
    },
    /// cannot read {path}
    Open {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// {path} is not a readable tar archive
    Archive {
        /// The archive.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
    /// the image has no file {name}
    MissingFile {
        /// Its path in the image.
        name: String,
    },
    /// {name} is not what the image format expects there
    Json {
        /// Its path in the image.
        name: String,
        /// The reason.
        #[source]
        source: serde_json::Error,
    },
    /// {name} is larger than the 4 MiB allowed for an image's JSON document
    JsonTooLarge {
        /// Its path in the image.
        name: String,
    },
    /// `{digest}` is not a sha256 digest: expected sha256:<64 hex digits>
    BadDigest {
        /// The digest as written.
        digest: String,
    },
    /// cannot read blob {name}
    Blob {
        /// Its path in the image.
        name: String,
        /// The reason.
        #[source]
        source: BlobError,
    },
    /// the image's index lists no image manifest
    NoManifest,
    /// the image has no manifest for linux/amd64, only for {found}
    Platform {
        /// The platforms it has, comma-separated.
        found: String,
    },
    /// image indexes are nested deeper than 8 levels
    TooDeep,
    /// the archive's manifest names {name}, which is not a path inside the archive
    BadPath {
        /// The path as written.
        name: String,
    },
    /// {name} in the image is not a regular file inside it (a link out of it, a device, …)
    NotAFile {
        /// The path as written.
        name: String,
    },
    /// the image config lists {diff_ids} layer digests for {layers} layers
    LayerCount {
        /// How many `rootfs.diff_ids` the config has.
        diff_ids: usize,
        /// How many layers the manifest has.
        layers: usize,
    },
}

/// A blob that is not what its descriptor says.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BlobError {
    /// its content does not match its digest: expected {expected}, got {actual}
    Digest {
        /// The digest the image names.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// it holds more than the {expected} bytes its descriptor says
    TooLong {
        /// The size the image names.
        expected: u64,
    },
    /// it holds {actual} bytes, not the {expected} its descriptor says
    Size {
        /// The size the image names.
        expected: u64,
        /// The bytes read.
        actual: u64,
    },
}

/// Reads a blob while hashing it; the read that reaches the end fails with a [`BlobError`]
/// (inside an `io::Error`, see [`blob_error`]) unless digest and size match.
pub(crate) struct Verified<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    digest: Digest,
    size: Option<u64>,
}

impl<R: Read> Verified<R> {
    pub(crate) fn new(inner: R, digest: Digest, size: Option<u64>) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
            digest,
            size,
        }
    }

    fn check_end(&self) -> Result<(), BlobError> {
        if let Some(expected) = self.size.filter(|&size| size != self.read) {
            return Err(BlobError::Size {
                expected,
                actual: self.read,
            });
        }
        let actual = sha256_hex(self.hasher.clone());
        if actual != self.digest.hex() {
            return Err(BlobError::Digest {
                expected: self.digest.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok(())
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.check_end().map_err(io::Error::other)?;
            return Ok(0);
        }
        self.read += n as u64;
        if let Some(expected) = self.size.filter(|&size| self.read > size) {
            return Err(io::Error::other(BlobError::TooLong { expected }));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The [`BlobError`] inside an `io::Error` from a [`Verified`] reader, or the `io::Error`.
pub(crate) fn blob_error(error: io::Error) -> Result<BlobError, io::Error> {
    if error.get_ref().is_some_and(|e| e.is::<BlobError>()) {
        if let Some(inner) = error.into_inner() {
            return inner
                .downcast::<BlobError>()
                .map(|b| *b)
                .map_err(io::Error::other);
        }
        // Unreachable: `get_ref` said there was an inner error.
        return Err(io::Error::other("blob error without its cause"));
    }
    Err(error)
}

/// A member of an archive: where its data starts and how long it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    offset: u64,
    size: u64,
}

/// The files of an image, in a directory or in a tar archive.
#[derive(Debug)]
pub(crate) enum Store {
    /// A directory.
    Dir(PathBuf),
    /// A tar archive, indexed by normalised member path.
    Archive {
        path: PathBuf,
        members: HashMap<String, Member>,
    },
}

/// `path` with `.` and empty components dropped and `..` applied, or `None` if it is absolute
/// or climbs above its start.
pub(crate) fn normalize(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

impl Store {
    /// Opens a directory as is, or indexes a tar archive.
    pub(crate) fn open(path: &Path) -> Result<Self, ReadImageError> {
        let open_error = |source| ReadImageError::Open {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(open_error)?;
        if metadata.is_dir() {
            return Ok(Self::Dir(path.to_owned()));
        }
        let mut file = File::open(path).map_err(open_error)?;
        let mut magic = [0; 4];
        let magic = file
            .read(&mut magic)
            .map(|n| &magic[..n])
            .map_err(open_error)?;
        if magic.starts_with(&[0x1f, 0x8b]) || magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(ReadImageError::Compressed {
                path: path.to_owned(),
            });
        }
        file.rewind().map_err(open_error)?;
        let members = index(file).map_err(|_| ReadImageError::NotAnImage {
            path: path.to_owned(),
        })?;
        Ok(Self::Archive {
            path: path.to_owned(),
            members,
        })
    }

    /// Whether the image has a file at `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        match self {
            Self::Dir(dir) => normalize(name).is_some_and(|n| dir.join(n).is_file()),
            Self::Archive { members, .. } => {
                normalize(name).is_some_and(|n| members.contains_key(&n))
            }
        }
    }

    /// Opens the file at `name` (a path inside the image) and says its size.
    pub(crate) fn read(&self, name: &str) -> Result<(Box<dyn Read>, u64), ReadImageError> {
        let missing = || ReadImageError::MissingFile {
            name: name.to_owned(),
        };
        let normal = normalize(name).ok_or_else(|| ReadImageError::BadPath {
            name: name.to_owned(),
        })?;
        let (path, member) = match self {
            Self::Dir(dir) => (dir.join(&normal), None),
            Self::Archive { path, members } => (
                path.clone(),
                Some(*members.get(&normal).ok_or_else(missing)?),
            ),
        };
        let open_error = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => missing(),
            _ => ReadImageError::Open {
                path: path.clone(),
                source,
            },
        };
        if let Self::Dir(dir) = self {
            // A layout's files are its own: a link may not lead out of it, and only a regular
            // file has the size it says (a device or a FIFO would be read for ever).
            let inside = fs::canonicalize(&path)
                .and_then(|file| Ok(file.starts_with(fs::canonicalize(dir)?) && file.is_file()));
            if !inside.map_err(open_error)? {
                return Err(ReadImageError::NotAFile {
                    name: name.to_owned(),
                });
            }
        }
        let mut file = File::open(&path).map_err(open_error)?;
        match member {
            None => {
                let size = file.metadata().map_err(open_error)?.len();
                Ok((Box::new(BufReader::new(file)), size))
            }
            Some(member) => {
                file.seek(SeekFrom::Start(member.offset))
                    .map_err(open_error)?;
                Ok((
                    Box::new(BufReader::new(file).take(member.size)),
                    member.size,
                ))
            }
        }
    }

    /// Reads and parses the JSON document at `name`, checking it against `digest` and `size`
    /// when given.
    pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        digest: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<T, ReadImageError> {
        let (reader, actual_size) = self.read(name)?;
        if actual_size > MAX_JSON {
            return Err(ReadImageError::JsonTooLarge {
                name: name.to_owned(),
            });
        }
        let mut reader: Box<dyn Read> = match digest {
            Some(digest) => Box::new(Verified::new(reader, digest.clone(), size)),
            None => reader,
        };
        let mut bytes = Vec::new();
        // Bounded whatever the size said: a document never holds more than MAX_JSON.
        reader
            .by_ref()
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|error| match blob_error(error) {
                Ok(source) => ReadImageError::Blob {
                    name: name.to_owned(),
                    source,
                },
                Err(source) => ReadImageError::Open {
                    path: PathBuf::from(name),
                    source,
                },
            })?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(ReadImageError::JsonTooLarge {
                name: name.to_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| ReadImageError::Json {
            name: name.to_owned(),
            source,
        })
    }
}

/// Indexes a tar archive's regular files by normalised path, following links between members.
fn index(file: File) -> io::Result<HashMap<String, Member>> {
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    let mut links = Vec::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let Some(name) = entry.path()?.to_str().and_then(normalize) else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_file() || kind.is_contiguous() {
            let member = Member {
                offset: entry.raw_file_position(),
                size: entry.size(),
            };
            members.insert(name, member);
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name()? else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            // A symlink is relative to its directory; a hard link names a member.
            let target = if kind.is_symlink() {
                let dir = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                format!("{dir}/{target}")
            } else {
                target
            };
            links.push((name, target));
        }
    }
    if members.is_empty() {
        return Err(io::Error::other("no files"));
    }
    // Links to links resolve in as many rounds as the chain is long.
    for _ in 0..8 {
        let mut resolved_any = false;
        for (name, target) in &links {
            if members.contains_key(name) {
                continue;
            }
            if let Some(member) = normalize(target).and_then(|t| members.get(&t).copied()) {
                members.insert(name.clone(), member);
                resolved_any = true;
            }
        }
        if !resolved_any {
            break;
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_layout_file_that_links_out_or_is_no_regular_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("squall-store-{}", std::process::id()));
        let layout = dir.join("layout");
        fs::create_dir_all(layout.join("blobs")).unwrap();
        fs::write(dir.join("secret"), b"{}").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), layout.join("blobs/out")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", layout.join("blobs/zero")).unwrap();
        fs::write(layout.join("blobs/in"), b"{}").unwrap();
        let store = Store::Dir(layout);
        for name in ["blobs/out", "blobs/zero"] {
            let err = store
                .read_json::<serde_json::Value>(name, None, None)
                .unwrap_err();
            assert!(
                matches!(err, ReadImageError::NotAFile { .. }),
                "{name}: {err}"
            );
        }
        store
            .read_json::<serde_json::Value>("blobs/in", None, None)
            .unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn normalize_keeps_paths_inside() {
        assert_eq!(
            normalize("./blobs//sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../b"), None);
        assert_eq!(normalize("/etc/passwd"), None);
    }

    #[test]
    fn digests_are_sha256_hex_only() {
        let hex = "ab".repeat(32);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
    }

    #[test]
    fn verified_reader_fails_at_the_end_on_a_mismatch() {
        let good = Digest::parse(&format!(
            "sha256:{}",
            sha256_hex(Sha256::new_with_prefix(b"hi"))
        ))
        .unwrap();
        let mut out = Vec::new();
        Verified::new(&b"hi"[..], good.clone(), Some(2))
            .read_to_end(&mut out)
            .unwrap();
        let error = Verified::new(&b"ho"[..], good.clone(), None)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(matches!(blob_error(error), Ok(BlobError::Digest { .. })));
        let error = Verified::new(&b"hi!"[..], good, Some(2))
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(matches!(
            blob_error(error),
            Ok(BlobError::TooLong { expected: 2 })
        ));
    }
}
