//! Starting a QEMU, the one way every QEMU of this crate starts: name its run files, pick
//! the port its app is forwarded from, write its seed, spawn it with the command line of
//! its role, and wait until its monitor answers (or it exits, whichever comes first).
//!
//! A template's boot, a clone's standby and a cold boot differ only in their `Role`: the
//! RAM file and whether it is shared, whether a kernel boots or state is awaited, and which
//! address the app is forwarded from. What comes after the launch — waiting for the guest,
//! snapshotting, restoring — is the caller's.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::process::Child;

use crate::command_line::{Machine, QemuCommand, Start};
use crate::guest::ConsoleTail;
use crate::image::SEED_BYTES;
use crate::qmp::{Qmp, QmpError};
use crate::run_files::{RunFiles, usable_name};

/// How long QEMU gets to open its monitor socket and answer on it.
const MONITOR_DEADLINE: Duration = Duration::from_secs(10);

/// What a QEMU is started for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role<'a> {
    /// A template's boot: guest RAM written through to the template's file `ram`, the app
    /// forwarded from a loopback port (nobody outside reaches a template). Its run files
    /// are named after the template `name`.
    Template {
        /// The template's name.
        name: &'a str,
        /// The template's RAM file, which outlives this QEMU.
        ram: &'a Path,
    },
    /// A clone's standby: the template's RAM file `ram` mapped privately, waiting for the
    /// template's state with `x-ignore-shared` on, no port forwarded yet.
    Standby {
        /// The template's RAM file.
        ram: &'a Path,
    },
    /// A cold boot: RAM of its own (removed with the QEMU), the app forwarded from the clone
    /// address.
    ColdBoot,
}

/// Why a QEMU could not be started.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum LaunchError {
    /// invalid clone id `{id}`: use 1 to 64 letters, digits, '-' or '_'
    InvalidId {
        /// The id given.
        id: String,
    },
    /// cannot create the run directory {path}
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// cannot read the guest's seed from /dev/urandom
    Entropy {
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// cannot write the guest's seed to {path}
    Seed {
        /// The seed file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// cannot find a free port on {ip} for the app
    Port {
        /// The address the app is forwarded from.
        ip: IpAddr,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// cannot start {qemu} (install Debian's qemu-system-x86)
    Spawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before its monitor answered ({status}); {console}
    Exited {
        /// Its exit status and the end of its standard error.
        status: String,
        /// The end of its serial console.
        console: ConsoleTail,
    },
    /// QEMU's monitor did not answer
    Monitor {
        /// The failure.
        #[source]
        source: QmpError,
    },
}

/// What to start.
pub(crate) struct Launch<'a> {
    pub(crate) machine: Machine<'a>,
    /// What for.
    pub(crate) role: Role<'a>,
}

/// A QEMU whose monitor answers.
pub(crate) struct Launched {
    /// The process and its files.
    pub(crate) qemu: Qemu,
    /// Its open, negotiated monitor.
    pub(crate) monitor: Qmp,
    /// Where its app answers: a standby's port is 0 until it is forwarded.
    pub(crate) addr: SocketAddr,
}

impl Launch<'_> {
    /// Starts QEMU and waits until its monitor answers. On any failure nothing is left: the
    /// process is killed and its run files removed.
    pub(crate) async fn start(self) -> Result<Launched, LaunchError> {
        let Machine {
            config, clone_id, ..
        } = self.machine;
        if !usable_name(clone_id) {
            return Err(LaunchError::InvalidId {
                id: clone_id.to_owned(),
            });
        }
        // A template's state file keeps the directory while the template lives; this
        // matters only for the first QEMU, or if someone removed it under us.
        std::fs::create_dir_all(&config.run_dir).map_err(|source| LaunchError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        let name = match self.role {
            Role::Template { name, .. } => name,
            Role::Standby { .. } | Role::ColdBoot => clone_id,
        };
        let mut files = RunFiles::new(&config.run_dir, name);
        let (start, addr) = match self.role {
            Role::Template { ram, .. } => {
                let forward = forward_from(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
                let ram = ram.to_owned();
                (Start::Boot { ram, forward }, forward)
            }
            Role::ColdBoot => {
                let forward = forward_from(config.clone_ip)?;
                let ram = files.add_own_ram(&config.ram_dir);
                (Start::Boot { ram, forward }, forward)
            }
            Role::Standby { ram } => {
                let ram = ram.to_owned();
                (
                    Start::Restore { ram },
                    SocketAddr::from((config.clone_ip, 0)),
                )
            }
        };
        write_seed(&files.seed)?;
        let mut child = QemuCommand {
            machine: self.machine,
            start: &start,
            files: &files,
        }
        .command()
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            qemu: config.qemu.clone(),
            source,
        })?;
        let restoring = matches!(start, Start::Restore { .. });
        let monitor = tokio::select! {
            monitor = open_monitor(&files.qmp, restoring) => monitor,
            status = child.wait() => {
                let mut qemu = Qemu { child, files };
                let status = match status {
                    Ok(status) => qemu.exit_report(status).await,
                    Err(e) => format!("cannot tell how: {e}"),
                };
                return Err(LaunchError::Exited { status, console: qemu.console_tail() });
            }
        };
        // QEMU read the seed into fw_cfg before its monitor answered.
        files.remove_seed();
        let mut qemu = Qemu { child, files };
        match monitor {
            Ok(monitor) => Ok(Launched {
                qemu,
                monitor,
                addr,
            }),
            Err(source) => match qemu.try_exit() {
                Some(status) => Err(LaunchError::Exited {
                    status: qemu.exit_report(status).await,
                    console: qemu.console_tail(),
                }),
                None => Err(LaunchError::Monitor { source }),
            },
        }
    }
}

/// A free port on `ip` for the app.
fn forward_from(ip: IpAddr) -> Result<SocketAddr, LaunchError> {
    free_port(ip).map_err(|source| LaunchError::Port { ip, source })
}

/// Connects to the monitor at `path`; for a restore, also has migration leave shared RAM
/// alone, as the template's did when it saved its state.
async fn open_monitor(path: &Path, restoring: bool) -> Result<Qmp, QmpError> {
    let mut monitor = Qmp::connect(path, MONITOR_DEADLINE).await?;
    if restoring {
        monitor.ignore_shared_ram().await?;
    }
    Ok(monitor)
}

/// A port on `ip` nobody is listening on right now, as the address to forward from.
pub(crate) fn free_port(ip: IpAddr) -> std::io::Result<SocketAddr> {
    let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
    Ok(SocketAddr::from((ip, port)))
}

/// Writes [`SEED_BYTES`] fresh bytes from the host's `/dev/urandom` to `path`, readable by
/// this user only: QEMU reads it into the fw_cfg file
/// [`SEED_FW_CFG`](crate::image::SEED_FW_CFG) when it starts.
fn write_seed(path: &Path) -> Result<(), LaunchError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; SEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|source| LaunchError::Entropy { source })?;
    let _ = std::fs::remove_file(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&seed));
    seed.fill(0);
    written.map_err(|source| LaunchError::Seed {
        path: path.to_owned(),
        source,
    })
}

/// A running QEMU and its run files. Dropping it kills the process (tokio reaps it) and
/// removes the files; [`Qemu::kill`] does the same and waits until the process is gone.
#[derive(Debug)]
pub(crate) struct Qemu {
    child: Child,
    files: RunFiles,
}

impl Qemu {
    /// Its process id, until it has been reaped.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Resolves when it exits. Cancel-safe.
    pub(crate) async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Its serial console.
    pub(crate) fn console(&self) -> &Path {
        &self.files.console
    }

    /// The end of its serial console, for error messages.
    pub(crate) fn console_tail(&self) -> ConsoleTail {
        ConsoleTail::read(&self.files.console)
    }

    /// `status`, with the end of what QEMU wrote to its standard error (the reason, when it
    /// refused its command line).
    pub(crate) async fn exit_report(&mut self, status: ExitStatus) -> String {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        if stderr.is_empty() {
            status.to_string()
        } else {
            format!("{status}: {}", stderr.trim())
        }
    }

    /// Kills it and removes its files, returning once the process is gone.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // kill_on_drop reaps the process; the run files remove themselves.
        let _ = self.child.start_kill();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;
    use crate::config::VmConfig;
    use crate::host::Accel;
    use crate::image::{CLONE_ID_WIDTH, Image};

    #[test]
    fn launch_errors_say_what_failed_and_where() {
        let err = LaunchError::InvalidId { id: "a/b".into() };
        assert_eq!(
            err.to_string(),
            format!(
                "invalid clone id `a/b`: use 1 to {CLONE_ID_WIDTH} letters, digits, '-' or '_'"
            )
        );
        let err = LaunchError::Spawn {
            qemu: "/opt/qemu".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            lifecycle::ErrorChain(&err).to_string(),
            "cannot start /opt/qemu (install Debian's qemu-system-x86): entity not found"
        );
    }

    #[tokio::test]
    async fn a_qemu_that_cannot_start_fails_the_launch_with_its_reason_and_leaves_no_files() {
        let run_dir =
            std::env::temp_dir().join(format!("squall-launch-{}", crate::run_files::unique()));
        let config = VmConfig {
            qemu: "/nonexistent/qemu-system-x86_64".into(),
            run_dir: run_dir.clone(),
            ..VmConfig::default()
        };
        let image = Image::nowhere();
        let launch = Launch {
            machine: Machine {
                config: &config,
                image: &image,
                accel: Accel::Tcg,
                clone_id: "c1",
            },
            role: Role::ColdBoot,
        };
        let err = match launch.start().await {
            Err(err) => err,
            Ok(_) => panic!("a QEMU that does not exist started"),
        };
        let text = err.to_string();
        assert!(matches!(err, LaunchError::Exited { .. }), "{text}");
        assert!(
            text.contains("/nonexistent/qemu-system-x86_64"),
            "names the binary: {text}"
        );
        let left: Vec<_> = std::fs::read_dir(&run_dir).unwrap().collect();
        assert!(left.is_empty(), "run files removed: {left:?}");
        std::fs::remove_dir(&run_dir).unwrap();
    }

    #[tokio::test]
    async fn an_invalid_clone_id_is_refused_before_anything_is_made() {
        let config = VmConfig {
            run_dir: "/nonexistent/run".into(),
            ..VmConfig::default()
        };
        let ram = Path::new("/dev/shm/x");
        let launch = Launch {
            machine: Machine {
                config: &config,
                image: &Image::nowhere(),
                accel: Accel::Tcg,
                clone_id: "../x",
            },
            role: Role::Standby { ram },
        };
        let err = launch.start().await.err().unwrap();
        assert!(matches!(err, LaunchError::InvalidId { .. }), "{err}");
    }
}
