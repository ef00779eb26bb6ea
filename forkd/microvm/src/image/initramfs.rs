//! Writing the initramfs: the gzip newc archive every image boots, with busybox, the guest
//! agent and the modules (written by [`super::build`]), and the app's part — an executable
//! with its shared libraries and `/etc/squall/args`, or, for a root filesystem, only
//! `/etc/squall/app`, how the guest agent's `run-app` starts the app on the disk (the format
//! is `guest/app_launch.rs`, compiled into the agent too).

use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use flate2::write::GzEncoder;

use super::{BuildImageError, CLONE_ID_GUEST_PATH, GUEST_PORT, init, io_at, read};
use crate::cpio::CpioWriter;
use crate::rootfs::Rootfs;

#[path = "../../guest/app_launch.rs"]
mod app_launch;

use app_launch::AppLaunch;

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

/// The initramfs being written, and the directories already in it.
pub(super) struct Initramfs {
    archive: CpioWriter<GzEncoder<Vec<u8>>>,
    made: std::collections::BTreeSet<String>,
    /// Where the image goes, named in errors.
    out_dir: PathBuf,
}

impl Initramfs {
    pub(super) fn new(out_dir: &Path) -> Result<Self, BuildImageError> {
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
    pub(super) fn file(
        &mut self,
        guest: &str,
        mode: u32,
        bytes: &[u8],
    ) -> Result<(), BuildImageError> {
        parents(&mut self.archive, &mut self.made, guest).map_err(io_at(&self.out_dir))?;
        self.archive
            .file(guest, mode, bytes)
            .map_err(io_at(&self.out_dir))
    }

    pub(super) fn finish(self) -> Result<Vec<u8>, BuildImageError> {
        let gz = self.archive.finish().map_err(io_at(&self.out_dir))?;
        gz.finish().map_err(io_at(&self.out_dir))
    }
}

/// Puts an executable app and its libraries into the initramfs, with `/etc/squall/args`.
pub(super) fn add_executable(
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
pub(super) fn rootfs_port(rootfs: &Rootfs) -> u16 {
    rootfs.app.ports.first().copied().unwrap_or(GUEST_PORT)
}

/// Checks that `rootfs`'s disk is there and writes how to start its app into the initramfs;
/// returns the root filesystem with its disk's path made absolute.
pub(super) fn add_rootfs(
    initramfs: &mut Initramfs,
    rootfs: &Rootfs,
) -> Result<Rootfs, BuildImageError> {
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
        groups: app.groups.clone(),
    };
    let bytes = launch.encode().map_err(BuildImageError::AppConfig)?;
    initramfs.file(init::APP_LAUNCH_PATH, 0o600, &bytes)?;
    Ok(Rootfs {
        disk,
        ..rootfs.clone()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

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
            groups: vec![4, 27],
        }
    }

    #[test]
    fn how_to_start_the_app_reads_back_as_written_byte_for_byte() {
        let bytes = launch().encode().unwrap();
        assert!(bytes.starts_with(
            b"uid\x001000\x00gid\x00100\x00cwd\x00/srv\x00group\x004\x00group\x0027\x00arg\x00httpd\x00"
        ));
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
}
