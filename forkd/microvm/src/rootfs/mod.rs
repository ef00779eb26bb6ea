//! Root filesystems for microVMs: the app's whole file tree (a container image's layers, or
//! a plain directory) as one read-only disk that the template and every clone attach, and
//! how the guest starts the app in it.
//!
//! The guest mounts the disk read-only as the lower layer of an overlay whose upper layer is
//! a tmpfs, so the app can write anywhere (`/tmp`, `/var/run`, …) while the disk never
//! changes: no guest write to it can be pending in a snapshot, and one file serves every
//! clone. A disk is named by its content digest, which is also its identity: a snapshot taken
//! with one disk is restored only with that same disk.
//!
//! [`build_rootfs`] makes one, in this order: `store` reads the image's files (a
//! layout, or an archive read in place), `oci` finds the linux/amd64 manifest, its config and
//! layers, `unpack` applies the layers into a staging tree without writing outside it (or
//! `tree` checks and names a plain directory), `app` works out how to start the app, `disk`
//! runs `mke2fs` or `mkfs.erofs`, and `build` names, caches and writes the result.
//!
//! **ext4 or EROFS.** Both were measured on a Debian 12 root with python3-flask and
//! waitress (`tests/images/flask/build`: one 63 MB gzip layer, 175 MB in 7,700 entries
//! unpacked), with a release build on 2 shared (busy) cores:
//!
//! | | whole build, from the OCI layout | the mkfs alone, on the unpacked tree | disk |
//! |---|---|---|---|
//! | ext4  | 2.6–10.3 s | 0.51–0.67 s (`mke2fs -d`) | 229.3 MB |
//! | EROFS | 4.5–9.9 s | 0.43–0.53 s (`mkfs.erofs`) | 179.3 MB |
//! | EROFS, lz4hc (not offered) | — | 3.0 s | 98.5 MB |
//!
//! The whole build is mostly unpacking (gunzip and writing the tree) and varied with the
//! other work on the machine more than between filesystems; a cached build takes
//! milliseconds. **EROFS is the default**: its disk is the size of the tree (ext4's is
//! sized ahead with headroom), it is made a little faster, it is read-only by design, and
//! the guest needs fewer modules for it (`erofs` and `libcrc32c`, against `ext4`, `jbd2`, `mbcache` and
//! `crc16`). Compression would halve the disk but quintuple the mkfs time and cost the
//! guest decompression on every page-cache miss; the disk is shared by every clone, so its
//! size matters less than its speed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::{OpenImageError, read_description};

mod app;
mod build;
mod disk;
// The checks the fuzz targets in `fuzz/` run, for them and for this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod oci;
mod store;
mod tree;
mod unpack;

pub use app::{AppConfigError, DEFAULT_PATH};
pub use build::{BuildRootfsError, DEFAULT_MAX_SIZE, RootfsOptions, RootfsSource, build_rootfs};
pub use disk::MakeDiskError;
pub use store::{BlobError, ReadImageError};
pub use unpack::UnpackError;

/// The file in an output directory describing the disk built last (a [`Rootfs`] in JSON).
pub const DESCRIPTION: &str = "rootfs.json";

/// What the guest mounts the disk as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// ext4, mounted `ro,noload` (no journal replay: nothing is ever written).
    Ext4,
    /// EROFS, read-only by design: the default (see the module docs for why).
    #[default]
    Erofs,
}

impl Filesystem {
    /// Its name, as in `--fs` and in the disk's file name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Erofs => "erofs",
        }
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Filesystem {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "ext4" => Ok(Self::Ext4),
            "erofs" => Ok(Self::Erofs),
            _ => Err(format!(
                "`{name}` is not a filesystem: expected ext4 or erofs"
            )),
        }
    }
}

/// How the guest starts the app inside a root filesystem: what an OCI image's config says,
/// resolved at build time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppConfig {
    /// The program and its arguments: the image's `Entrypoint` followed by its `Cmd` (or the
    /// arguments given at build time, which replace `Cmd`). Never empty.
    pub command: Vec<String>,
    /// Environment variables, `KEY=VALUE`, in the image's order.
    pub env: Vec<String>,
    /// The working directory, absolute (`/` when the image names none).
    pub working_dir: String,
    /// The user and group the app runs as, numeric, resolved against the image's own
    /// `/etc/passwd` and `/etc/group` at build time (`0`, `0` when the image names none).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Supplementary groups, numeric: those the image's `/etc/group` lists the user in,
    /// as container runtimes give them.
    #[serde(default)]
    pub groups: Vec<u32>,
    /// The TCP ports the image exposes (`ExposedPorts`), in order.
    pub ports: Vec<u16>,
}

/// A root filesystem disk, built and ready to attach read-only to any number of QEMUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    /// The disk image file.
    pub disk: PathBuf,
    /// Its filesystem.
    pub fs: Filesystem,
    /// The disk's content digest, `sha256:<hex>`: its name in the cache and its identity.
    pub digest: String,
    /// How to start the app.
    pub app: AppConfig,
}

impl Rootfs {
    /// Reads the root filesystem described by `dir/rootfs.json`. The disk is looked for in
    /// `dir` under its recorded file name, so the directory may have moved since the build.
    pub fn open(dir: &Path) -> Result<Self, OpenImageError> {
        let mut rootfs: Self = read_description(&dir.join(DESCRIPTION))?;
        if let Some(name) = rootfs.disk.file_name() {
            rootfs.disk = dir.join(name);
        }
        Ok(rootfs)
    }
}

#[cfg(test)]
impl Rootfs {
    /// A root filesystem whose disk is `disk` (which need not exist) and whose app is `app`
    /// run as root in `/`, serving `ports`: enough for tests that never build or boot it.
    pub(crate) fn for_tests(disk: impl Into<PathBuf>, fs: Filesystem, ports: Vec<u16>) -> Self {
        Self {
            disk: disk.into(),
            fs,
            digest: "sha256:00".into(),
            app: AppConfig {
                command: vec!["app".into()],
                env: vec![],
                working_dir: "/".into(),
                uid: 0,
                gid: 0,
                groups: vec![],
                ports,
            },
        }
    }
}
