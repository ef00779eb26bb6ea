//! One call from an image (or a directory) to a disk in an output directory: name it, reuse
//! it if it is already there, else unpack, work out the app, make the disk and describe it.
//!
//! The output directory holds, for each disk built, `<hex>.ext4` or `<hex>.erofs` and its
//! description `<hex>.json` (a [`Rootfs`]), where `<hex>` is the disk's digest; and
//! `rootfs.json`, the description of the last one built, which [`Rootfs::open`] reads. A
//! disk whose description is there is reused without reading the image again (past its
//! manifest). Everything is written under a temporary name and moved into place, the
//! description after the disk, so a description always means a whole disk; a disk already
//! in place is never replaced (two builds of one digest at once both end with the first
//! one's disk, so a template made with it keeps finding the disk it recorded).
//!
//! Work happens in a private (0700) staging directory inside the output directory
//! (`.rootfs-staging-PID-N`), removed on success and on error, as is the output directory
//! itself if the build made it and fails: a failed build leaves things as they were. (A
//! build that was killed leaves its staging directory; the next build in the same output
//! directory removes it.)
//!
//! The digest is sha256 over a small JSON document: a format version, the kind of source,
//! the image's manifest digest (or the digest of the directory's walk, see `tree`), the
//! filesystem, the arguments replacing `Cmd`, and the user, working directory and port
//! overrides.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::app::{self, AppConfigError, Overrides};
use super::disk::{self, MakeDiskError};
use super::oci::{self, RunConfig};
use super::store::{ReadImageError, Store, Verified, sha256_hex};
use super::unpack::{UnpackError, Unpacker};
use super::{Filesystem, Rootfs};

/// Bumped when the same inputs would make a different disk.
const FORMAT: u32 = 3;

/// How staging directories in an output directory are named: `PREFIX<pid>-<n>`.
const STAGING_PREFIX: &str = ".rootfs-staging-";

/// The default limit on what an image unpacks to: 8 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 8 << 30;

/// What a root filesystem is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootfsSource {
    /// An OCI image layout directory, an OCI archive, or a `docker save` / `podman save`
    /// archive (or its extracted directory).
    Oci(PathBuf),
    /// A plain directory tree, taken as is.
    Dir(PathBuf),
}

/// How to build a root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsOptions {
    /// The disk's filesystem.
    pub fs: Filesystem,
    /// Arguments replacing the image's `Cmd`; for a directory, the whole command (required).
    pub args: Option<Vec<String>>,
    /// The most the tree may hold, in bytes (contents plus 512 per entry).
    pub max_size: u64,
    /// The user to run as (`name`, `uid`, `name:group`, `uid:gid`), replacing the image's.
    pub user: Option<String>,
    /// The working directory, replacing the image's.
    pub workdir: Option<String>,
    /// The TCP ports the app serves, replacing the image's `ExposedPorts`.
    pub ports: Vec<u16>,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        Self {
            fs: Filesystem::default(),
            args: None,
            max_size: DEFAULT_MAX_SIZE,
            user: None,
            workdir: None,
            ports: Vec::new(),
        }
    }
}

/// Why a root filesystem could not be built.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BuildRootfsError {
    /// cannot read the image at {path}
    Image {
        /// The image.
        path: PathBuf,
        /// The reason.
        #[source]
        source: ReadImageError,
    },
    /// cannot unpack layer {layer}
    Layer {
        /// The layer's digest.
        layer: String,
        /// The reason.
        #[source]
        source: UnpackError,
    },
    /// cannot use the directory {path} as a root filesystem
    Tree {
        /// The directory.
        path: PathBuf,
        /// The reason.
        #[source]
        source: UnpackError,
    },
    /// {0} is not a directory
    NotADirectory(PathBuf),
    /// the output directory {out_dir} is inside the directory {tree} it would be built from
    OutInsideTree {
        /// The output directory.
        out_dir: PathBuf,
        /// The directory tree.
        tree: PathBuf,
    },
    /// a root filesystem from a directory needs the app's command after `--`
    NoCommand,
    /// cannot work out how to start the app
    App(#[source] AppConfigError),
    /// cannot make the disk
    Disk(#[source] MakeDiskError),
    /// cannot describe the disk in JSON
    Describe(#[source] serde_json::Error),
    /// cannot write {path}
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The reason.
        #[source]
        source: io::Error,
    },
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> BuildRootfsError + '_ {
    move |source| BuildRootfsError::Write {
        path: path.to_owned(),
        source,
    }
}

/// What the disk's digest is taken over.
#[derive(Serialize)]
struct Key<'a> {
    format: u32,
    source: &'static str,
    content: &'a str,
    fs: Filesystem,
    args: Option<&'a [String]>,
    user: Option<&'a str>,
    workdir: Option<&'a str>,
    ports: &'a [u16],
}

impl Key<'_> {
    fn digest(&self) -> String {
        // Serialising plain strings and numbers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        sha256_hex(Sha256::new_with_prefix(json))
    }
}

/// The staging directory: removed when dropped, and the output directory too if the build
/// made it and did not finish.
struct Staging {
    path: PathBuf,
    made_out_dir: Vec<PathBuf>,
}

impl Staging {
    fn new(out_dir: &Path) -> Result<Self, BuildRootfsError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // The directories this build makes, deepest first.
        let made_out_dir: Vec<PathBuf> = out_dir
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && fs::symlink_metadata(dir).is_err())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(out_dir).map_err(write_error(out_dir))?;
        remove_abandoned(out_dir);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = out_dir.join(format!("{STAGING_PREFIX}{}-{n}", std::process::id()));
        let staging = Self { path, made_out_dir };
        // Private: a root build unpacks the image's set-user-id files and world-writable
        // directories here, which no other user may reach before the disk is made.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&staging.path)
            .map_err(write_error(&staging.path))?;
        Ok(staging)
    }

    /// The build finished: keep the output directory.
    fn keep_out_dir(&mut self) {
        self.made_out_dir.clear();
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if fs::remove_dir_all(&self.path).is_err() {
            // A directory without write permission (unpacked as a non-root user): open
            // everything up and try again.
            make_writable(&self.path);
            let _ = fs::remove_dir_all(&self.path);
        }
        for dir in &self.made_out_dir {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Removes the staging directories of builds whose process is gone (killed mid-build).
fn remove_abandoned(out_dir: &Path) {
    let Ok(entries) = fs::read_dir(out_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(STAGING_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            make_writable(&entry.path());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&entry.path());
        }
    }
}

/// Builds (or finds already built) the root filesystem disk for `source` in `out_dir`, and
/// makes it the one `out_dir/rootfs.json` describes.
pub fn build_rootfs(
    source: &RootfsSource,
    options: &RootfsOptions,
    out_dir: &Path,
) -> Result<Rootfs, BuildRootfsError> {
    let mut staging = Staging::new(out_dir)?;
    let out_dir = fs::canonicalize(out_dir).map_err(write_error(out_dir))?;
    let build = Build {
        options,
        overrides: Overrides {
            args: options.args.as_deref(),
            user: options.user.as_deref(),
            working_dir: options.workdir.as_deref(),
            ports: &options.ports,
        },
        out_dir: &out_dir,
        staging: &staging,
    };
    let rootfs = match source {
        RootfsSource::Oci(path) => from_image(path, &build)?,
        RootfsSource::Dir(path) => from_dir(path, &build)?,
    };
    let description = serde_json::to_vec_pretty(&rootfs).map_err(BuildRootfsError::Describe)?;
    write_atomically(
        &staging.path,
        &out_dir.join(super::DESCRIPTION),
        &description,
    )?;
    staging.keep_out_dir();
    Ok(rootfs)
}

fn key<'a>(source: &'static str, content: &'a str, options: &'a RootfsOptions) -> Key<'a> {
    Key {
        format: FORMAT,
        source,
        content,
        fs: options.fs,
        args: options.args.as_deref(),
        user: options.user.as_deref(),
        workdir: options.workdir.as_deref(),
        ports: &options.ports,
    }
}

/// What every step of one build needs.
struct Build<'a> {
    options: &'a RootfsOptions,
    overrides: Overrides<'a>,
    out_dir: &'a Path,
    staging: &'a Staging,
}

fn from_image(path: &Path, build: &Build<'_>) -> Result<Rootfs, BuildRootfsError> {
    let image_error = |source| BuildRootfsError::Image {
        path: path.to_owned(),
        source,
    };
    let store = Store::open(path).map_err(image_error)?;
    let image = oci::resolve(&store, path).map_err(image_error)?;
    let hex = key("oci", &image.id.to_string(), build.options).digest();
    if let Some(rootfs) = cached(build.out_dir, &hex, build.options.fs) {
        return Ok(rootfs);
    }
    // Fail before unpacking anything if there is no command.
    app::command(&image.config, build.overrides.args).map_err(BuildRootfsError::App)?;
    let tree = build.staging.path.join("tree");
    fs::create_dir(&tree).map_err(write_error(&tree))?;
    let mut unpacker =
        Unpacker::new(&tree, build.options.max_size).map_err(|source| BuildRootfsError::Tree {
            path: tree.clone(),
            source,
        })?;
    for layer in &image.layers {
        let layer_error = |source| BuildRootfsError::Layer {
            layer: layer.digest.to_string(),
            source,
        };
        let (reader, _) = store.read(&layer.name).map_err(image_error)?;
        let verified = Verified::new(reader, layer.digest.clone(), layer.size);
        unpacker.apply(verified).map_err(layer_error)?;
    }
    unpacker.finish().map_err(|source| BuildRootfsError::Tree {
        path: tree.clone(),
        source,
    })?;
    let app =
        app::resolve(&tree, &image.config, &build.overrides).map_err(BuildRootfsError::App)?;
    make_disk(&tree, &hex, app, build)
}

fn from_dir(path: &Path, build: &Build<'_>) -> Result<Rootfs, BuildRootfsError> {
    let tree = fs::canonicalize(path)
        .ok()
        .filter(|tree| tree.is_dir())
        .ok_or_else(|| BuildRootfsError::NotADirectory(path.to_owned()))?;
    if build.out_dir.starts_with(&tree) {
        return Err(BuildRootfsError::OutInsideTree {
            out_dir: build.out_dir.to_owned(),
            tree,
        });
    }
    if build.options.args.as_ref().is_none_or(Vec::is_empty) {
        return Err(BuildRootfsError::NoCommand);
    }
    let mut hasher = Sha256::new();
    super::tree::check_and_hash(path, build.options.max_size, &mut hasher).map_err(|source| {
        BuildRootfsError::Tree {
            path: path.to_owned(),
            source,
        }
    })?;
    let hex = key("dir", &sha256_hex(hasher), build.options).digest();
    if let Some(rootfs) = cached(build.out_dir, &hex, build.options.fs) {
        return Ok(rootfs);
    }
    let config = RunConfig {
        env: Some(vec![app::DEFAULT_PATH.to_owned()]),
        ..RunConfig::default()
    };
    let app = app::resolve(path, &config, &build.overrides).map_err(BuildRootfsError::App)?;
    make_disk(path, &hex, app, build)
}

/// The disk's file name in the output directory.
fn disk_name(hex: &str, fs: Filesystem) -> String {
    format!("{hex}.{fs}")
}

/// The disk already built for `hex`, if its description and disk are there.
fn cached(out_dir: &Path, hex: &str, fs: Filesystem) -> Option<Rootfs> {
    let bytes = fs::read(out_dir.join(format!("{hex}.json"))).ok()?;
    let mut rootfs: Rootfs = serde_json::from_slice(&bytes).ok()?;
    rootfs.disk = out_dir.join(disk_name(hex, fs));
    (rootfs.fs == fs && rootfs.disk.is_file()).then_some(rootfs)
}

fn make_disk(
    tree: &Path,
    hex: &str,
    app: super::AppConfig,
    build: &Build<'_>,
) -> Result<Rootfs, BuildRootfsError> {
    let Build {
        out_dir, staging, ..
    } = build;
    let fs = build.options.fs;
    let staged = staging.path.join("disk");
    disk::make(tree, fs, hex, &staged).map_err(BuildRootfsError::Disk)?;
    let disk = out_dir.join(disk_name(hex, fs));
    // Linked, not renamed, into place: a build of the same digest that finished first (in
    // another process, or another template of the same daemon) keeps its disk, whose inode
    // its templates have recorded; that disk is whole, as only whole disks are linked.
    match fs::hard_link(&staged, &disk) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(write_error(&disk)(e)),
    }
    let rootfs = Rootfs {
        disk,
        fs,
        digest: format!("sha256:{hex}"),
        app,
    };
    let description = serde_json::to_vec_pretty(&rootfs).map_err(BuildRootfsError::Describe)?;
    write_atomically(
        &staging.path,
        &out_dir.join(format!("{hex}.json")),
        &description,
    )?;
    Ok(rootfs)
}

/// Writes `bytes` to `path` by way of a file in `staging` renamed into place.
fn write_atomically(staging: &Path, path: &Path, bytes: &[u8]) -> Result<(), BuildRootfsError> {
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let temporary = staging.join(name);
    fs::write(&temporary, bytes).map_err(write_error(&temporary))?;
    fs::rename(&temporary, path).map_err(write_error(path))
}
