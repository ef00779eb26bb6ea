//! Building a bootable image for a microVM from stock Debian parts: the host's kernel, an
//! initramfs holding busybox, the kernel's virtio modules, the app with the shared libraries
//! it needs, and an `/init` that brings up the network and starts the app on port 80.
//!
//! No kernel is compiled: Debian's kernel has its virtio drivers as modules, so `/init` loads
//! them (virtio-mmio devices are found through ACPI, which is why the machine keeps ACPI on).
//!
//! Every image also carries the guest agent (`guest/agent.rs`, compiled by `build.rs` into a
//! static executable and embedded here), which `/init` starts before the app: it reseeds the
//! guest kernel's RNG from fw_cfg when the guest finds itself in a clone (see [`crate::clone`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::cpio::CpioWriter;

/// Kernel modules `/init` loads, in dependency order.
pub const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_mmio",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "drivers/firmware/qemu_fw_cfg",
];

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

/// The port the app listens on inside the guest (also in `$PORT`).
pub const GUEST_PORT: u16 = 80;

/// What to put in an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The app's executable.
    pub app: PathBuf,
    /// Arguments for the app.
    pub args: Vec<String>,
    /// The kernel; by default the newest `/boot/vmlinuz-*`.
    pub kernel: Option<PathBuf>,
    /// A statically linked busybox; by default `/bin/busybox` (Debian's busybox-static).
    pub busybox: Option<PathBuf>,
    /// More files for the guest: (file on the host, absolute path in the guest). They keep
    /// their permission bits.
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
    /// The app as given, for the record.
    pub app: PathBuf,
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

/// The shared libraries `app` loads, as absolute paths (none for a static executable).
pub fn shared_libraries(app: &Path) -> Result<Vec<PathBuf>, BuildImageError> {
    let output = Command::new("ldd")
        .arg(app)
        .output()
        .map_err(|e| BuildImageError::Libraries {
            app: app.to_owned(),
            detail: format!("cannot run ldd: {e}"),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(BuildImageError::Libraries {
            app: app.to_owned(),
            detail: stderr.trim().to_owned(),
        });
    }
    let mut libraries = Vec::new();
    for line in stdout.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(BuildImageError::Libraries {
                app: app.to_owned(),
                detail: format!("missing library: {line}"),
            });
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = line.split("=>").nth(1).unwrap_or(line).trim();
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// The guest's `/init`. It takes nothing from the user: the app's path and arguments are read
/// from `/etc/squall/args` (NUL-separated) by `xargs -0` and passed on as `"$@"`, so no
/// part of them is ever parsed as shell.
fn init_script() -> String {
    let modules: Vec<String> = MODULES
        .iter()
        .map(|m| format!("/lib/modules/{}.ko", m.rsplit('/').next().unwrap_or(m)))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod "$m" || echo "squall-guest: insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do usleep 10000; i=$((i+1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2
export PORT={port} SQUALL_CLONE_ID_FILE={clone_id} HOME=/tmp
mkdir -p /tmp
{agent} {poll_ms} &
echo "{ready}"
xargs -0 sh -c 'exec "$@"' squall-app < /etc/squall/args
echo "squall-guest: app exited with status $?"
poweroff -f
"#,
        modules = modules.join(" "),
        port = GUEST_PORT,
        clone_id = CLONE_ID_GUEST_PATH,
        ready = READY_LINE,
        agent = AGENT_GUEST_PATH,
        poll_ms = AGENT_POLL_MS,
    )
}

/// Creates every parent directory of `path` in the archive, once.
fn parents(
    cpio: &mut CpioWriter<impl std::io::Write>,
    made: &mut std::collections::BTreeSet<String>,
    path: &str,
) -> std::io::Result<()> {
    let mut so_far = String::new();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        so_far.push('/');
        so_far.push_str(part);
        if made.insert(so_far.clone()) {
            cpio.dir(&so_far)?;
        }
    }
    Ok(())
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
/// `image.json`.
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
    let app = read(&spec.app, "the app", "")?;
    let libraries = shared_libraries(&spec.app)?;

    let mut archive = CpioWriter::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut made = std::collections::BTreeSet::new();
    for dir in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/etc",
        "/etc/squall",
        "/app",
        "/lib",
        "/lib/modules",
    ] {
        made.insert(dir.to_owned());
        archive.dir(dir).map_err(io_at(out_dir))?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    archive
        .char_device("/dev/console", 0o600, 5, 1)
        .map_err(io_at(out_dir))?;
    let busybox_bytes = read(&busybox, "busybox", " (install Debian's busybox-static)")?;
    archive
        .file("/bin/busybox", 0o755, &busybox_bytes)
        .map_err(io_at(out_dir))?;
    archive
        .file("/init", 0o755, init_script().as_bytes())
        .map_err(io_at(out_dir))?;
    archive
        .file(AGENT_GUEST_PATH, 0o755, AGENT)
        .map_err(io_at(out_dir))?;
    // The app keeps its own name: some programs (busybox among them) look at argv[0].
    let app_name = spec
        .app
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && !n.contains('\0'))
        .unwrap_or("app");
    let app_path = format!("/app/{app_name}");
    let mut args = Vec::new();
    for arg in std::iter::once(&app_path).chain(&spec.args) {
        args.extend_from_slice(arg.as_bytes());
        args.push(0);
    }
    archive
        .file("/etc/squall/args", 0o644, &args)
        .map_err(io_at(out_dir))?;
    archive
        .file(&app_path, 0o755, &app)
        .map_err(io_at(out_dir))?;
    let module_root = Path::new("/lib/modules").join(&release).join("kernel");
    for module in MODULES {
        let path = module_root.join(format!("{module}.ko"));
        let bytes = read(
            &path,
            "a kernel module",
            " (the kernel's modules must be installed)",
        )?;
        let name = module.rsplit('/').next().unwrap_or(module);
        archive
            .file(&format!("/lib/modules/{name}.ko"), 0o644, &bytes)
            .map_err(io_at(out_dir))?;
    }
    for (host, guest) in &spec.files {
        if !guest.starts_with('/')
            || guest.split('/').any(|part| part == "..")
            || guest.contains('\0')
        {
            return Err(BuildImageError::GuestPath(guest.clone()));
        }
        let bytes = read(host, "a file for the image", "")?;
        let mode = std::fs::metadata(host).map_err(io_at(host))?.permissions();
        parents(&mut archive, &mut made, guest).map_err(io_at(out_dir))?;
        archive
            .file(
                guest,
                std::os::unix::fs::PermissionsExt::mode(&mode),
                &bytes,
            )
            .map_err(io_at(out_dir))?;
    }
    for library in &libraries {
        let bytes = read(library, "a shared library", "")?;
        let name = library.to_string_lossy();
        parents(&mut archive, &mut made, &name).map_err(io_at(out_dir))?;
        archive.file(&name, 0o755, &bytes).map_err(io_at(out_dir))?;
    }
    let gz = archive.finish().map_err(io_at(out_dir))?;
    let initramfs_bytes = gz.finish().map_err(io_at(out_dir))?;

    std::fs::create_dir_all(out_dir).map_err(io_at(out_dir))?;
    let initramfs = out_dir.join("initramfs.img");
    std::fs::write(&initramfs, initramfs_bytes).map_err(io_at(&initramfs))?;
    let kernel = out_dir.join("vmlinuz");
    std::fs::copy(&kernel_src, &kernel).map_err(io_at(&kernel_src))?;
    let image = Image {
        kernel: std::path::absolute(&kernel).map_err(io_at(&kernel))?,
        initramfs: std::path::absolute(&initramfs).map_err(io_at(&initramfs))?,
        kernel_release: release,
        app: spec.app.clone(),
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
