//! Clones, and the standby QEMUs they start from.
//!
//! A **standby** is a QEMU on the template's machine model that maps the template's RAM file
//! privately (`share=off`: copy-on-write, so untouched pages stay shared with every other
//! clone) and waits in `-incoming defer`. Starting it makes a **clone**: it loads the
//! template's device state, resumes, waits for the guest agent's reseed line (see
//! [`crate::guest`]), forwards its own host port (on [`VmConfig::clone_ip`]) to the image's
//! guest port ([`Image::guest_port`]), and waits for the app's answer. Each clone has its own
//! user-mode network stack, and its clone id and a fresh random seed in fw_cfg. A template's
//! root filesystem disk, if it has one, is attached read-only to every standby, shared and
//! never copied, after the disk has been checked to be the one the template was made with
//! ([`CloneError::DiskChanged`] otherwise; see [`crate::disk`]).
//!
//! A pool (see [`crate::pool`]) takes a standby further ahead of time with
//! [`Standby::restore_paused`], leaving only `cont` for the clone. A **cold boot**
//! ([`boot_cold`]) is the baseline every clone is compared with: the image booted from scratch,
//! sharing nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::command_line::{Machine, NETDEV};
use crate::config::{ConfigError, VmConfig};
use crate::disk::DiskError;
use crate::guest::{WaitError, wait_healthy, wait_reseeded};
use crate::host::Accel;
use crate::image::Image;
use crate::launch::{Launch, LaunchError, Launched, Qemu, Role, free_port};
use crate::qmp::{Qmp, QmpError};
use crate::template::Template;

/// How long loading the template's state may take (about a millisecond, normally).
const RESTORE_DEADLINE: Duration = Duration::from_secs(10);

/// How many ports are tried when one found free is taken before QEMU binds it.
const FORWARD_TRIES: u32 = 4;

/// Why a template could not be cloned: its standby not launched, or not started.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CloneError {
    /// clone {id}: refused before its QEMU started
    DiskChanged {
        /// The clone.
        id: String,
        /// How the template's root filesystem disk changed, or why it cannot be read.
        #[source]
        source: DiskError,
    },
    /// clone {id}: cannot launch its QEMU
    Launch {
        /// The clone.
        id: String,
        /// The failure.
        #[source]
        source: LaunchError,
    },
    /// clone {id}: cannot load the template's state from {state}
    Restore {
        /// The clone.
        id: String,
        /// The template's state file.
        state: PathBuf,
        /// The failure.
        #[source]
        source: QmpError,
    },
    /// clone {id}: cannot resume the guest
    Resume {
        /// The clone.
        id: String,
        /// The failure.
        #[source]
        source: QmpError,
    },
    /// clone {id}: cannot pause the restored guest
    Pause {
        /// The clone.
        id: String,
        /// The failure.
        #[source]
        source: QmpError,
    },
    /// clone {id}: the guest did not come up
    Guest {
        /// The clone.
        id: String,
        /// What the guest did instead.
        #[source]
        source: WaitError,
    },
    /// clone {id}: cannot find a free port on {ip}
    Port {
        /// The clone.
        id: String,
        /// The clone address.
        ip: IpAddr,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// clone {id}: cannot forward {addr} to the guest
    Forward {
        /// The clone.
        id: String,
        /// The last address tried.
        addr: SocketAddr,
        /// The failure.
        #[source]
        source: QmpError,
    },
}

/// Why a cold boot failed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum ColdBootError {
    /// the microVM configuration is invalid
    Config(#[from] ConfigError),
    /// cold boot {id}: cannot launch QEMU
    Launch {
        /// The VM's clone id.
        id: String,
        /// The failure.
        #[source]
        source: LaunchError,
    },
    /// cold boot {id} under {accel}: the guest did not come up
    Boot {
        /// The VM's clone id.
        id: String,
        /// Its accelerator.
        accel: Accel,
        /// What the guest did instead.
        #[source]
        source: WaitError,
    },
}

/// Why a clone's memory could not be measured.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum PssError {
    /// clone {id} has exited: it has no memory to measure
    Exited {
        /// The clone.
        id: String,
    },
    /// cannot read {path}
    Read {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// {path} has no Pss line
    NoPss {
        /// The file.
        path: PathBuf,
    },
}

/// A QEMU started for a clone and waiting for the template's state.
#[derive(Debug)]
pub struct Standby {
    clone: VmClone,
    monitor: Qmp,
    /// The template's state is loaded and the guest has run and answered once, then been
    /// paused: only `cont` is left.
    restored: bool,
}

impl Standby {
    /// Launches a standby QEMU for clone `id` of `template`.
    /// The template's root filesystem disk, if it has one, is checked first: a QEMU is never
    /// started with a disk the snapshot was not taken with.
    pub(crate) async fn launch(template: &Template, id: &str) -> Result<Self, CloneError> {
        template
            .check_disk()
            .map_err(|source| CloneError::DiskChanged {
                id: id.to_owned(),
                source,
            })?;
        let launch = Launch {
            machine: Machine {
                config: template.config(),
                image: template.image(),
                accel: template.accel(),
                clone_id: id,
            },
            role: Role::Standby {
                ram: template.ram_path(),
            },
        };
        let Launched {
            qemu,
            monitor,
            addr,
        } = launch.start().await.map_err(|source| CloneError::Launch {
            id: id.to_owned(),
            source,
        })?;
        Ok(Self {
            clone: VmClone {
                id: id.to_owned(),
                // Port 0 until `forward_port`: nothing reads it before the clone starts.
                addr,
                qemu,
            },
            monitor,
            restored: false,
        })
    }

    /// The clone id it was launched for.
    pub fn id(&self) -> &str {
        &self.clone.id
    }

    /// Whether the template's state is already loaded (see [`Standby::restore_paused`]).
    pub fn is_restored(&self) -> bool {
        self.restored
    }

    /// Stops its QEMU and removes its files, returning once the process is gone.
    pub async fn kill(self) {
        self.clone.kill().await;
    }

    /// Loads the template's state, lets the guest answer its health check once, and pauses
    /// it again. Under TCG most of a clone's start-up is QEMU translating the guest's code
    /// anew in each process; doing that here, ahead of time, leaves only `cont` for the clone.
    /// The clone's identity is already its own: its clone id and seed are in fw_cfg, and the
    /// guest has reported reseeding its kernel RNG with that seed before its health check was
    /// sent, so the paused guest needs nothing more than `cont`.
    pub async fn restore_paused(&mut self, template: &Template) -> Result<(), CloneError> {
        if self.restored {
            return Ok(());
        }
        self.restore_and_run(template).await?;
        self.monitor
            .execute("stop", None)
            .await
            .map_err(|source| CloneError::Pause {
                id: self.clone.id.clone(),
                source,
            })?;
        self.restored = true;
        Ok(())
    }

    /// Makes it a running clone: loads the template's state (unless already loaded), resumes
    /// the guest and waits until its app answers. A restored standby's app answered before
    /// it was paused, so resuming it is enough: waiting for another answer would only add a
    /// round trip (and, with many clones resuming at once, load) to the critical path.
    pub async fn start(mut self, template: &Template) -> Result<VmClone, CloneError> {
        if self.restored {
            self.resume().await?;
        } else {
            self.restore_and_run(template).await?;
        }
        Ok(self.clone)
    }

    async fn restore_and_run(&mut self, template: &Template) -> Result<(), CloneError> {
        let state = template.state_path();
        let uri = format!("file:{}", state.display());
        let restored = async {
            self.monitor
                .execute("migrate-incoming", Some(json!({ "uri": uri })))
                .await?;
            self.monitor.wait_for_migration(RESTORE_DEADLINE).await
        };
        restored.await.map_err(|source| CloneError::Restore {
            id: self.clone.id.clone(),
            state: state.to_owned(),
            source,
        })?;
        self.resume().await?;
        let config = template.config();
        let id = self.clone.id.clone();
        let guest = |source| CloneError::Guest {
            id: id.clone(),
            source,
        };
        // Before anything talks to the guest: its RNG must be its own first.
        wait_reseeded(&mut self.clone.qemu, &id, config.clone_timeout)
            .await
            .map_err(guest)?;
        self.forward_port(template.image().guest_port).await?;
        let addr = self.clone.addr;
        wait_healthy(
            &mut self.clone.qemu,
            addr,
            &config.health_path,
            config.clone_timeout,
        )
        .await
        .map_err(guest)
    }

    async fn resume(&mut self) -> Result<(), CloneError> {
        self.monitor
            .execute("cont", None)
            .await
            .map(drop)
            .map_err(|source| CloneError::Resume {
                id: self.clone.id.clone(),
                source,
            })
    }

    /// Makes the guest's `guest_port` reachable on a free port of the clone address, which
    /// becomes the clone's address. A port found free can be taken before QEMU binds it; then
    /// another is tried.
    async fn forward_port(&mut self, guest_port: u16) -> Result<(), CloneError> {
        let ip = self.clone.addr.ip();
        let mut tries = 0;
        loop {
            let addr = free_port(ip).map_err(|source| CloneError::Port {
                id: self.clone.id.clone(),
                ip,
                source,
            })?;
            tries += 1;
            match self.monitor.forward_port(NETDEV, addr, guest_port).await {
                Ok(()) => {
                    self.clone.addr = addr;
                    return Ok(());
                }
                Err(QmpError::Command { ref desc, .. })
                    if tries < FORWARD_TRIES
                        && desc.contains("Could not set up host forwarding rule") =>
                {
                    tracing::debug!(clone = %self.clone.id, %addr, "vm: port taken before QEMU bound it, trying another");
                }
                Err(source) => {
                    return Err(CloneError::Forward {
                        id: self.clone.id.clone(),
                        addr,
                        source,
                    });
                }
            }
        }
    }
}

/// Boots `image` from scratch, with nothing shared: the cold start every clone is compared
/// with. Returns once the app answers its health check.
pub async fn boot_cold(
    image: &Image,
    config: &VmConfig,
    accel: Accel,
    id: &str,
) -> Result<VmClone, ColdBootError> {
    config.check()?;
    let launch = Launch {
        machine: Machine {
            config,
            image,
            accel,
            clone_id: id,
        },
        role: Role::ColdBoot,
    };
    let Launched { qemu, addr, .. } =
        launch
            .start()
            .await
            .map_err(|source| ColdBootError::Launch {
                id: id.to_owned(),
                source,
            })?;
    let mut vm = VmClone {
        id: id.to_owned(),
        addr,
        qemu,
    };
    wait_healthy(&mut vm.qemu, addr, &config.health_path, config.boot_timeout)
        .await
        .map_err(|source| ColdBootError::Boot {
            id: id.to_owned(),
            accel,
            source,
        })?;
    Ok(vm)
}

/// A running clone. Dropping it kills its QEMU and removes its files; [`VmClone::kill`] does
/// the same and waits for the process to be gone.
#[derive(Debug)]
pub struct VmClone {
    id: String,
    addr: SocketAddr,
    qemu: Qemu,
}

impl VmClone {
    /// Its clone id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where its app answers.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The QEMU process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.qemu.pid()
    }

    /// Whether QEMU has exited (the guest crashed or powered off).
    pub fn has_exited(&mut self) -> bool {
        self.qemu.try_exit().is_some()
    }

    /// Resolves when QEMU exits (the guest crashed or powered off, or something killed the
    /// process), with its exit status; at once if it already has. Waiting on this instead of
    /// polling [`VmClone::has_exited`] learns of the exit the moment the process is reaped.
    /// Cancel-safe: dropping the future leaves the clone as it was, so it can be raced with a
    /// shutdown signal or a kill request in `tokio::select!`. An error means the exit status
    /// could not be collected.
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.qemu.exited().await
    }

    /// Proportional set size of its QEMU in bytes: private memory plus a fair share of what
    /// it shares with the template's other clones.
    pub fn pss_bytes(&self) -> Result<u64, PssError> {
        let pid = self.pid().ok_or_else(|| PssError::Exited {
            id: self.id.clone(),
        })?;
        let path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => return Err(PssError::Read { path, source }),
        };
        let kb = text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or(PssError::NoPss { path })?;
        Ok(kb * 1024)
    }

    /// Stops QEMU and removes every file it used, returning once the process is gone.
    pub async fn kill(self) {
        self.qemu.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_errors_name_the_clone_and_keep_the_cause() {
        let err = CloneError::Restore {
            id: "web-7".into(),
            state: "/run/squall/web.state".into(),
            source: QmpError::Protocol("migration failed: no space".into()),
        };
        assert_eq!(
            lifecycle::ErrorChain(&err).to_string(),
            "clone web-7: cannot load the template's state from /run/squall/web.state: \
             QMP protocol error: migration failed: no space"
        );
        let err = CloneError::Launch {
            id: "web-8".into(),
            source: LaunchError::InvalidId { id: "web-8".into() },
        };
        let chain = lifecycle::ErrorChain(&err).to_string();
        assert!(
            chain.starts_with("clone web-8: cannot launch its QEMU: invalid clone id"),
            "{chain}"
        );
    }

    #[test]
    fn a_pss_error_names_what_could_not_be_read() {
        let err = PssError::NoPss {
            path: "/proc/1/smaps_rollup".into(),
        };
        assert_eq!(err.to_string(), "/proc/1/smaps_rollup has no Pss line");
    }
}
