//! Root filesystems for microVMs: the app's whole file tree (a container image's layers, or
//! a plain directory) as one read-only disk that the template and every clone attach, and
//! how the guest starts the app in it.
//!
//! The guest mounts the disk read-only as the lower layer of an overlay whose upper layer is
//! a tmpfs, so the app can write anywhere (`/tmp`, `/var/run`, …) while the disk never
//! changes: no guest write to it can be pending in a snapshot, and one file serves every
//! clone. A disk is named by its content digest, which is also its identity: a snapshot taken
//! with one disk is restored only with that same disk.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the guest mounts the disk as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// ext4, mounted `ro,noload` (no journal replay: nothing is ever written).
    Ext4,
    /// EROFS, read-only by design.
    Erofs,
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
