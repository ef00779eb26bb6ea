//! Building a bootable image for a microVM from stock Debian parts: the host's kernel, an
//! initramfs holding busybox, the kernel's virtio modules and an `/init` (`image/init.rs`) that
//! brings up the network and starts the app. The app is one of two things ([`AppSource`]):
//! - **an executable** of this host, copied into the initramfs with the shared libraries it
//!   needs (`ldd`), listening on port 80 ([`GUEST_PORT`]); its world is the initramfs;
//! - **a root filesystem** ([`Rootfs`]): a read-only disk (ext4 or EROFS) that every QEMU of
//!   the image attaches as `/dev/vda` and the guest boots into, under an overlay; the app is
//!   started as its [`AppConfig`](crate::AppConfig) says, listening on the first port the
//!   image exposes (or 80). The initramfs then holds no app, only what it takes to mount the
//!   disk: the block device, filesystem and overlay modules.
//!
//! No kernel is compiled: Debian's kernel has its virtio drivers and filesystems as modules,
//! so `/init` loads them, in the order the kernel's own tables give (`image/modules.rs`; virtio-mmio
//! devices are found through ACPI, which is why the machine keeps ACPI on).
//!
//! Every image also carries the guest agent (`guest/agent.rs`, compiled by `build.rs` into a
//! static executable and embedded here), which `/init` starts before the app: it reseeds the
//! guest kernel's RNG from fw_cfg when the guest finds itself in a clone (see [`crate::clone`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rootfs::{Filesystem, Rootfs};

mod init;
mod initramfs;
pub(crate) mod modules;

pub use initramfs::shared_libraries;
use initramfs::{Initramfs, add_executable, add_rootfs, rootfs_port};
use modules::{BASE_MODULES, ModuleTables, ROOTFS_MODULES};

/// The line `/init` prints on the serial console once the app has been started.
pub const READY_LINE: &str = "squall-guest: app started";

/// The fw_cfg entry that carries a clone's id into the guest.
pub const CLONE_ID_FW_CFG: &str = "opt/squall/clone_id";

/// fw_cfg entries keep the size they had when the guest booted, so every clone id is padded
/// to this width in [`CLONE_ID_FW_CFG`] (the guest trims trailing spaces): the longest
/// template name or clone id.
pub const CLONE_ID_WIDTH: usize = 64;

/// The fw_cfg entry that carries 32 fresh random bytes from the host into each guest (a
/// template, a clone, a cold boot: each QEMU has its own), for the guest agent to reseed the
/// kernel's RNG with.
pub const SEED_FW_CFG: &str = "opt/squall/seed";

/// The size of the seed in [`SEED_FW_CFG`].
pub const SEED_BYTES: usize = 32;

/// What the guest agent prints on the serial console, followed by the clone id, once the
/// kernel's RNG has been reseeded with the seed of the QEMU it runs in.
pub const RESEEDED_LINE: &str = "squall-guest: reseeded";

/// Where the guest agent is in the guest.
pub const AGENT_GUEST_PATH: &str = "/bin/squall-guest-agent";

/// How often the guest agent reads the clone id from fw_cfg, in milliseconds of guest time:
/// the most a restored guest can run before it starts reseeding. Each poll wakes the guest,
/// which under TCG costs the host CPU: an idle guest's QEMU used 1 % of a core without the
/// agent, 10 % with a 10 ms poll and 17 % with 2 ms. It is paid only while the clone id can
/// still change, in the template (for its boot and warm-up) and in cold boots: in a clone the
/// agent exits once it has reseeded, and a pool's restored standbys reseed before they are
/// paused, so their clones do not wait for a poll at all.
pub const AGENT_POLL_MS: u32 = 5;

/// The guest agent: a static x86-64 Linux executable built from `guest/agent.rs`.
const AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/squall-guest-agent"));

/// Inside the guest, where the app finds its clone id (also in `$SQUALL_CLONE_ID_FILE`).
pub const CLONE_ID_GUEST_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/squall/clone_id/raw";

/// The port an executable's app listens on inside the guest (also in `$PORT`), and a root
/// filesystem's when its image exposes none.
pub const GUEST_PORT: u16 = 80;

/// What the guest runs.
#[derive(Clone, Debug)]
pub enum AppSource {
    /// An executable of this host, copied into the initramfs with its shared libraries.
    Executable {
        /// The app's executable.
        path: PathBuf,
        /// Arguments for the app.
        args: Vec<String>,
    },
    /// A root filesystem disk, attached read-only to every QEMU and booted into.
    Rootfs(Rootfs),
}

/// What to put in an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The app.
    pub app: AppSource,
    /// The kernel; by default the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    /// A statically linked busybox; by default `/bin/busybox` (Debian's busybox-static).
    pub busybox: Option<PathBuf>,
    /// More files for the guest: (file on the host, absolute path in the guest). They keep
    /// their permission bits. They go into the initramfs: a root filesystem's app, which runs
    /// in the disk's tree, does not see them.
    pub files: Vec<(PathBuf, String)>,
}

/// A built image: a kernel and an initramfs in one directory, described by `image.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The kernel to boot.
    pub kernel: PathBuf,
    /// The gzip-compressed newc initramfs.
    pub initramfs: PathBuf,
    /// The kernel's release, such as `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// The app as given, for the record: the executable, or the root filesystem's program.
    pub app: PathBuf,
    /// The port the app listens on inside the guest (`$PORT`): the one QEMU forwards to.
    #[serde(default = "default_guest_port")]
    pub guest_port: u16,
    /// The root filesystem the guest boots into, if it does: every QEMU of the image attaches
    /// its disk read-only.
    #[serde(default)]
    pub rootfs: Option<Rootfs>,
}

/// The guest port of an image described before images recorded it.
fn default_guest_port() -> u16 {
    GUEST_PORT
}

/// Why an image could not be built.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum BuildImageError {
    /// no kernel found in /boot (install Debian's linux-image-amd64, or pass --kernel)
    NoKernel,
    /// cannot tell the release of kernel {0}: expected a name like vmlinuz-6.1.0-56-amd64
    KernelRelease(PathBuf),
    /// {what} not found at {path}{hint}
    Missing {
        /// What it is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// cannot list the shared libraries of {app}: {detail}
    Libraries {
        /// The app.
        app: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// cannot write {path}
    Io {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// `{0}` is not a usable path in the guest: expected an absolute path without `..`
    GuestPath(String),
    /// the kernel has no module {name} (not in {dir}/modules.dep nor built in)
    NoModule {
        /// The module.
        name: String,
        /// The kernel's module directory.
        dir: PathBuf,
    },
    /// cannot decompress the kernel module {path}: {detail}
    Decompress {
        /// The module's file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// the root filesystem's app cannot be started: {0}
    AppConfig(String),
    /// cannot describe the image in {path}
    Manifest {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: serde_json::Error,
    },
}

/// Why a built image could not be opened.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum OpenImageError {
    /// no image description at {path} (build one with `squall image build`)
    Missing {
        /// The description looked for.
        path: PathBuf,
    },
    /// cannot read {path}
    Read {
        /// The description.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// {path}: not an image description
    Manifest {
        /// The description.
        path: PathBuf,
        /// The reason.
        #[source]
        source: serde_json::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BuildImageError + '_ {
    move |source| BuildImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The newest installed kernel, by file name.
fn default_kernel() -> Result<PathBuf, BuildImageError> {
    let entries = std::fs::read_dir("/boot").map_err(|_| BuildImageError::NoKernel)?;
    let mut kernels: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels.pop().ok_or(BuildImageError::NoKernel)
}

fn kernel_release(kernel: &Path) -> Result<String, BuildImageError> {
    kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| BuildImageError::KernelRelease(kernel.to_owned()))
}

fn read(path: &Path, what: &'static str, hint: &'static str) -> Result<Vec<u8>, BuildImageError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BuildImageError::Missing {
            what,
            path: path.to_owned(),
            hint,
        },
        _ => BuildImageError::Io {
            path: path.to_owned(),
            source: e,
        },
    })
}

/// Builds an image into `out_dir` (created if needed): `vmlinuz`, `initramfs.img` and
/// `image.json`. A root filesystem's disk stays where it is; the image names it.
pub fn build(spec: &ImageSpec, out_dir: &Path) -> Result<Image, BuildImageError> {
    let kernel_src = match &spec.kernel {
        Some(k) => k.clone(),
        None => default_kernel()?,
    };
    let release = kernel_release(&kernel_src)?;
    let busybox = spec
        .busybox
        .clone()
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    let tables = ModuleTables::read(&Path::new("/lib/modules").join(&release))?;

    let mut initramfs = Initramfs::new(out_dir)?;
    let busybox_bytes = read(&busybox, "busybox", " (install Debian's busybox-static)")?;
    initramfs.file("/bin/busybox", 0o755, &busybox_bytes)?;
    initramfs.file(AGENT_GUEST_PATH, 0o755, AGENT)?;
    let mut wanted = BASE_MODULES.to_vec();
    let (app, guest_port, rootfs) = match &spec.app {
        AppSource::Executable { path, args } => {
            add_executable(&mut initramfs, path, args)?;
            (path.clone(), GUEST_PORT, None)
        }
        AppSource::Rootfs(rootfs) => {
            let rootfs = add_rootfs(&mut initramfs, rootfs)?;
            wanted.extend(ROOTFS_MODULES);
            wanted.push(match rootfs.fs {
                Filesystem::Ext4 => "ext4",
                Filesystem::Erofs => "erofs",
            });
            let program = PathBuf::from(&rootfs.app.command[0]);
            (program, rootfs_port(&rootfs), Some(rootfs))
        }
    };
    let modules = tables.resolve(&wanted)?;
    for module in &modules {
        let bytes = modules::read_module(&module.path)?;
        initramfs.file(&format!("/lib/modules/{}.ko", module.name), 0o644, &bytes)?;
    }
    let names: Vec<String> = modules.into_iter().map(|m| m.name).collect();
    let init = match &rootfs {
        None => init::executable(&names, guest_port),
        Some(rootfs) => init::rootfs(&names, rootfs.fs),
    };
    initramfs.file("/init", 0o755, init.as_bytes())?;
    for (host, guest) in &spec.files {
        if !guest.starts_with('/')
            || guest.split('/').any(|part| part == "..")
            || guest.contains('\0')
        {
            return Err(BuildImageError::GuestPath(guest.clone()));
        }
        let bytes = read(host, "a file for the image", "")?;
        let mode = std::fs::metadata(host).map_err(io_at(host))?.permissions();
        initramfs.file(
            guest,
            std::os::unix::fs::PermissionsExt::mode(&mode),
            &bytes,
        )?;
    }
    let initramfs_bytes = initramfs.finish()?;

    std::fs::create_dir_all(out_dir).map_err(io_at(out_dir))?;
    let initramfs = out_dir.join("initramfs.img");
    std::fs::write(&initramfs, initramfs_bytes).map_err(io_at(&initramfs))?;
    let kernel = out_dir.join("vmlinuz");
    std::fs::copy(&kernel_src, &kernel).map_err(io_at(&kernel_src))?;
    let image = Image {
        kernel: std::path::absolute(&kernel).map_err(io_at(&kernel))?,
        initramfs: std::path::absolute(&initramfs).map_err(io_at(&initramfs))?,
        kernel_release: release,
        app,
        guest_port,
        rootfs,
    };
    let manifest = out_dir.join("image.json");
    let json = serde_json::to_vec_pretty(&image).map_err(|source| BuildImageError::Manifest {
        path: manifest.clone(),
        source,
    })?;
    let mut file = std::fs::File::create(&manifest).map_err(io_at(&manifest))?;
    file.write_all(&json).map_err(io_at(&manifest))?;
    Ok(image)
}

impl Image {
    /// Reads the image described by `dir/image.json`.
    pub fn open(dir: &Path) -> Result<Self, OpenImageError> {
        read_description(&dir.join("image.json"))
    }
}

/// Reads a JSON description written by a build (`image.json`, `rootfs.json`).
pub(crate) fn read_description<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<T, OpenImageError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => OpenImageError::Missing {
            path: path.to_owned(),
        },
        _ => OpenImageError::Read {
            path: path.to_owned(),
            source,
        },
    })?;
    serde_json::from_slice(&bytes).map_err(|source| OpenImageError::Manifest {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
impl Image {
    /// An image whose files are nowhere: enough for tests that never boot it.
    pub(crate) fn nowhere() -> Self {
        Self {
            kernel: "/nonexistent/vmlinuz".into(),
            initramfs: "/nonexistent/initramfs.img".into(),
            kernel_release: "none".into(),
            app: "/bin/true".into(),
            guest_port: GUEST_PORT,
            rootfs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[test]
    fn opening_a_directory_without_an_image_says_how_to_make_one() {
        let err = Image::open(Path::new("/nonexistent/image")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no image description at /nonexistent/image/image.json (build one with `squall image build`)"
        );
    }

    #[test]
    fn a_guest_path_outside_the_root_is_refused_with_the_path() {
        let err = BuildImageError::GuestPath("../etc".into());
        assert_eq!(
            err.to_string(),
            "`../etc` is not a usable path in the guest: expected an absolute path without `..`"
        );
    }
}
