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
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::cpio::CpioWriter;
use crate::rootfs::{Filesystem, Rootfs};

#[path = "../guest/app_launch.rs"]
mod app_launch;
mod init;
pub(crate) mod modules;

use app_launch::AppLaunch;
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

/// The initramfs being written, and the directories already in it.
struct Initramfs {
    archive: CpioWriter<GzEncoder<Vec<u8>>>,
    made: std::collections::BTreeSet<String>,
    /// Where the image goes, named in errors.
    out_dir: PathBuf,
}

impl Initramfs {
    fn new(out_dir: &Path) -> Result<Self, BuildImageError> {
        let mut initramfs = Self {
            archive: CpioWriter::new(GzEncoder::new(Vec::new(), Compression::fast())),
            made: std::collections::BTreeSet::new(),
            out_dir: out_dir.to_owned(),
        };
        for dir in [
            "/bin",
            "/dev",
            "/proc",
            "/sys",
            "/tmp",
            "/etc",
            "/etc/squall",
            "/lib",
            "/lib/modules",
        ] {
            initramfs.made.insert(dir.to_owned());
            initramfs.archive.dir(dir).map_err(io_at(out_dir))?;
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        initramfs
            .archive
            .char_device("/dev/console", 0o600, 5, 1)
            .map_err(io_at(out_dir))?;
        Ok(initramfs)
    }

    /// Adds a file at `guest`, making its parent directories first.
    fn file(&mut self, guest: &str, mode: u32, bytes: &[u8]) -> Result<(), BuildImageError> {
        parents(&mut self.archive, &mut self.made, guest).map_err(io_at(&self.out_dir))?;
        self.archive
            .file(guest, mode, bytes)
            .map_err(io_at(&self.out_dir))
    }

    fn finish(self) -> Result<Vec<u8>, BuildImageError> {
        let gz = self.archive.finish().map_err(io_at(&self.out_dir))?;
        gz.finish().map_err(io_at(&self.out_dir))
    }
}

/// Puts an executable app and its libraries into the initramfs, with `/etc/squall/args`.
fn add_executable(
    initramfs: &mut Initramfs,
    app: &Path,
    args: &[String],
) -> Result<(), BuildImageError> {
    let bytes = read(app, "the app", "")?;
    let libraries = shared_libraries(app)?;
    // The app keeps its own name: some programs (busybox among them) look at argv[0].
    let app_name = app
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && !n.contains('\0'))
        .unwrap_or("app");
    let app_path = format!("/app/{app_name}");
    let mut arg_file = Vec::new();
    for arg in std::iter::once(&app_path).chain(args) {
        arg_file.extend_from_slice(arg.as_bytes());
        arg_file.push(0);
    }
    initramfs.file("/etc/squall/args", 0o644, &arg_file)?;
    initramfs.file(&app_path, 0o755, &bytes)?;
    for library in &libraries {
        let bytes = read(library, "a shared library", "")?;
        initramfs.file(&library.to_string_lossy(), 0o755, &bytes)?;
    }
    Ok(())
}

/// The port a root filesystem's app listens on: the first it exposes, or [`GUEST_PORT`].
fn rootfs_port(rootfs: &Rootfs) -> u16 {
    rootfs.app.ports.first().copied().unwrap_or(GUEST_PORT)
}

/// Checks that `rootfs`'s disk is there and writes how to start its app into the initramfs;
/// returns the root filesystem with its disk's path made absolute.
fn add_rootfs(initramfs: &mut Initramfs, rootfs: &Rootfs) -> Result<Rootfs, BuildImageError> {
    let disk = std::path::absolute(&rootfs.disk).map_err(io_at(&rootfs.disk))?;
    match std::fs::metadata(&disk) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) | Err(_) => {
            return Err(BuildImageError::Missing {
                what: "the root filesystem disk",
                path: disk,
                hint: "",
            });
        }
    }
    let app = &rootfs.app;
    // $PORT and $SQUALL_CLONE_ID_FILE are the guest's to say, whatever the image sets.
    let mut env: Vec<String> = app
        .env
        .iter()
        .filter(|e| !e.starts_with("PORT=") && !e.starts_with("SQUALL_CLONE_ID_FILE="))
        .cloned()
        .collect();
    env.push(format!("PORT={}", rootfs_port(rootfs)));
    env.push(format!("SQUALL_CLONE_ID_FILE={CLONE_ID_GUEST_PATH}"));
    let launch = AppLaunch {
        command: app.command.clone(),
        env,
        working_dir: app.working_dir.clone(),
        uid: app.uid,
        gid: app.gid,
    };
    let bytes = launch.encode().map_err(BuildImageError::AppConfig)?;
    initramfs.file(init::APP_LAUNCH_PATH, 0o600, &bytes)?;
    Ok(Rootfs {
        disk,
        ..rootfs.clone()
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
        let path = dir.join("image.json");
        let bytes = std::fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => OpenImageError::Missing { path: path.clone() },
            _ => OpenImageError::Read {
                path: path.clone(),
                source,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|source| OpenImageError::Manifest { path, source })
    }
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

    fn launch() -> AppLaunch {
        AppLaunch {
            command: ["httpd", "-f", "-p", "8000", "-h", "a b;$(reboot)"]
                .map(String::from)
                .to_vec(),
            env: ["PATH=/usr/bin:/bin", "GREETING=a=b\nc"]
                .map(String::from)
                .to_vec(),
            working_dir: "/srv".into(),
            uid: 1000,
            gid: 100,
        }
    }

    #[test]
    fn how_to_start_the_app_reads_back_as_written_byte_for_byte() {
        let bytes = launch().encode().unwrap();
        assert!(bytes.starts_with(b"uid\x001000\x00gid\x00100\x00cwd\x00/srv\x00arg\x00httpd\x00"));
        assert_eq!(AppLaunch::decode(&bytes).unwrap(), launch());
    }

    #[test]
    fn how_to_start_the_app_refuses_what_execve_could_not_take() {
        let mut nul = launch();
        nul.env.push("A=\0".into());
        assert_eq!(nul.encode().unwrap_err(), "`A=\\0` holds a NUL byte");
        let relative = AppLaunch {
            working_dir: "srv".into(),
            ..launch()
        };
        assert!(relative.encode().unwrap_err().contains("not absolute"));
        let empty = AppLaunch {
            command: vec![],
            ..launch()
        };
        assert_eq!(empty.encode().unwrap_err(), "the command is empty");
        assert_eq!(
            AppLaunch::decode(b"uid\0x\0").unwrap_err(),
            "uid `x` is not a number"
        );
        assert_eq!(AppLaunch::decode(b"").unwrap_err(), "no command");
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
