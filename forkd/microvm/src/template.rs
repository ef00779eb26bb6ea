//! Templates: a warm guest saved once, for every clone to start from.
//!
//! A **template** boots the image with its guest RAM in a shared file (`memory-backend-file`,
//! `share=on`), waits until the app answers its health check, optionally warms it with
//! requests, then pauses it and saves only the device state (`x-ignore-shared`: the RAM stays
//! in the file, the state file is a few tens of KB). The template's QEMU then exits; the RAM
//! file and the state file are the template. Its clones (see [`crate::clone`]) map that RAM
//! file privately and load that state.
//!
//! A template of an image that boots a root filesystem records its disk's identity when it
//! is created (see [`crate::disk`]); every clone's QEMU is started only after the disk has
//! been found to be that same disk.
//!
//! The accelerator is chosen here: KVM is tried first where `/dev/kvm` is usable (for
//! [`VmConfig::kvm_trial`]) and TCG is used when the guest does not come up under it; the
//! outcome holds for every later template of the process (see [`crate::host`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::clone::{CloneError, Standby, VmClone};
use crate::command_line::Machine;
use crate::config::{ConfigError, VmConfig};
use crate::disk::{DiskError, DiskIdentity};
use crate::guest::{WaitError, answers_200, wait_healthy, wait_reseeded};
use crate::host::{self, Accel, KvmSupport, MemoryMerging};
use crate::image::Image;
use crate::launch::{Launch, LaunchError, Launched, Role};
use crate::portable::{self, Compatibility, ReadError, SnapshotHeader, TransferStats};
use crate::qmp::QmpError;
use crate::rootfs::Rootfs;
use crate::run_files::{unique, usable_name};

/// The clone id a template's guest boots with.
const TEMPLATE_ID: &str = "template";

/// How long a booted template's guest agent gets to show its reseed line: it printed it at
/// boot, before the app started, so it is normally there already.
const RESEED_CHECK: Duration = Duration::from_secs(5);

/// How long saving the device state may take (a few milliseconds, normally).
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(30);

/// Why a template could not be created.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum CreateTemplateError {
    /// invalid template name `{name}`: use 1 to 64 letters, digits, '-' or '_'
    InvalidName {
        /// The name given.
        name: String,
    },
    /// the microVM configuration is invalid
    Config(#[from] ConfigError),
    /// cannot create the run directory {path}
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// template {name}: cannot use its root filesystem disk
    Disk {
        /// The template.
        name: String,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// template {name} under {accel}: cannot launch QEMU
    Launch {
        /// The template.
        name: String,
        /// The accelerator tried.
        accel: Accel,
        /// The failure.
        #[source]
        source: LaunchError,
    },
    /// template {name} under {accel}: the guest did not come up
    Boot {
        /// The template.
        name: String,
        /// The accelerator tried.
        accel: Accel,
        /// What the guest did instead.
        #[source]
        source: WaitError,
    },
    /// template {name}: cannot make it from the snapshot
    Import {
        /// The template.
        name: String,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// template {name}: cannot save its state to {state}
    Snapshot {
        /// The template.
        name: String,
        /// The state file.
        state: PathBuf,
        /// The failure.
        #[source]
        source: QmpError,
    },
}

/// The RAM file and device state file a template is made of, removed when dropped.
#[derive(Debug)]
struct Snapshot {
    /// Guest RAM, mapped by every clone.
    ram: PathBuf,
    /// The device state, loaded by every clone.
    state: PathBuf,
}

impl Snapshot {
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.ram);
        let _ = std::fs::remove_file(&self.state);
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The run directory, removed when dropped if this template made it and it is empty by then.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    made: bool,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.made {
            // Only once empty: this fails, harmlessly, while clones or other templates still
            // have files in it (a clone outliving its template leaves the directory behind).
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// A warm template: the RAM file and device state every clone starts from.
#[derive(Debug)]
pub struct Template {
    name: String,
    image: Image,
    config: VmConfig,
    accel: Accel,
    /// The root filesystem disk as the template booted it, if it boots one.
    disk: Option<DiskIdentity>,
    /// What the guest was saved on, taken when it was saved (or, for a template made from a
    /// peer's snapshot, what the snapshot said): what its own snapshot will say.
    saved_on: Option<Compatibility>,
    // Fields drop in order: the snapshot's files go before the directory that holds them.
    snapshot: Snapshot,
    /// Held for its `Drop`.
    _run_dir: RunDir,
}

impl Template {
    /// Boots `image`, waits for its app to answer, sends it `warm_requests` requests, and
    /// snapshots it. Tries KVM first when `/dev/kvm` is there (unless the config forces an
    /// accelerator) and falls back to TCG if the guest does not come up under it.
    pub async fn create(
        name: &str,
        image: &Image,
        config: &VmConfig,
        warm_requests: u32,
    ) -> Result<Self, CreateTemplateError> {
        let mut template = Self::prepare(name, image, config)?;
        template.accel = match config.accel {
            Some(accel) => {
                template
                    .boot_and_snapshot(accel, config.boot_timeout, warm_requests)
                    .await?;
                accel
            }
            None => template.boot_trying_kvm(warm_requests).await?,
        };
        // The guest read the disk while it booted: it must not have changed meanwhile.
        template.disk_unchanged()?;
        let accel = template.accel;
        template.saved_on = Compatibility::here(config, image, accel)
            .inspect_err(|e| {
                tracing::warn!(template = name, error = %e, "vm: cannot tell what the guest was saved on; its snapshot will say what the host is when it is sent");
            })
            .ok();
        if accel == Accel::Kvm {
            host::remember_kvm_trial(true);
        }
        tracing::info!(template = name, %accel, "vm: template ready, running guests under {accel}");
        if config.merge_memory {
            let merging = MemoryMerging::on_this_host();
            tracing::info!(template = name, "vm: {merging}");
        }
        Ok(template)
    }

    /// A template named `name` of `image` whose snapshot files are named but not made yet
    /// (they are removed, if made, when it is dropped), its disk's identity taken and its run
    /// directory made.
    fn prepare(name: &str, image: &Image, config: &VmConfig) -> Result<Self, CreateTemplateError> {
        if !usable_name(name) {
            return Err(CreateTemplateError::InvalidName {
                name: name.to_owned(),
            });
        }
        config.check()?;
        let disk = image
            .rootfs
            .as_ref()
            .map(DiskIdentity::of)
            .transpose()
            .map_err(|source| CreateTemplateError::Disk {
                name: name.to_owned(),
                source,
            })?;
        let made = !config.run_dir.exists();
        std::fs::create_dir_all(&config.run_dir).map_err(|source| CreateTemplateError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        let tag = format!("{name}-{}", unique());
        Ok(Self {
            name: name.to_owned(),
            image: image.clone(),
            config: config.clone(),
            accel: Accel::Tcg,
            disk,
            saved_on: None,
            snapshot: Snapshot {
                ram: config.ram_dir.join(format!("squall-{tag}.ram")),
                state: config.run_dir.join(format!("{tag}.state")),
            },
            _run_dir: RunDir {
                path: config.run_dir.clone(),
                made,
            },
        })
    }

    /// Boots under KVM if it is worth trying (for [`VmConfig::kvm_trial`]), else or then
    /// under TCG; returns the accelerator the template was saved under.
    async fn boot_trying_kvm(&self, warm_requests: u32) -> Result<Accel, CreateTemplateError> {
        let (name, config) = (&self.name, &self.config);
        let kvm = KvmSupport::probe();
        if host::kvm_worth_trying() {
            match self
                .boot_and_snapshot(Accel::Kvm, config.kvm_trial, warm_requests)
                .await
            {
                Ok(()) => return Ok(Accel::Kvm),
                Err(error) => {
                    host::remember_kvm_trial(false);
                    if kvm.expected_accel() == Accel::Kvm {
                        tracing::warn!(template = name, %error, "vm: KVM could not run the guest; falling back to TCG");
                    } else {
                        tracing::info!(template = name, %error, "vm: KVM could not run the guest, as expected ({kvm}); falling back to TCG");
                    }
                }
            }
        } else if kvm == KvmSupport::Unusable {
            tracing::info!(template = name, "vm: {kvm}; running guests under TCG");
        } else {
            tracing::info!(
                template = name,
                "vm: KVM could not run a guest earlier in this process; running guests under TCG"
            );
        }
        self.boot_and_snapshot(Accel::Tcg, config.boot_timeout, warm_requests)
            .await?;
        Ok(Accel::Tcg)
    }

    /// Boots the image under `accel`, waits up to `timeout` for its app, warms it and saves
    /// its state. On failure the RAM and state files are removed, ready for another try.
    async fn boot_and_snapshot(
        &self,
        accel: Accel,
        timeout: Duration,
        warm_requests: u32,
    ) -> Result<(), CreateTemplateError> {
        let name = &self.name;
        let launch = Launch {
            machine: Machine {
                config: &self.config,
                image: &self.image,
                accel,
                clone_id: TEMPLATE_ID,
            },
            role: Role::Template {
                name,
                ram: &self.snapshot.ram,
            },
        };
        let Launched {
            mut qemu,
            mut monitor,
            addr,
        } = launch
            .start()
            .await
            .map_err(|source| CreateTemplateError::Launch {
                name: name.clone(),
                accel,
                source,
            })?;
        let result = async {
            let booted = async {
                wait_healthy(&mut qemu, addr, &self.config.health_path, timeout).await?;
                // The agent reseeded at boot, before the app started; this shows it works
                // here before any clone depends on it.
                wait_reseeded(&mut qemu, TEMPLATE_ID, RESEED_CHECK).await
            };
            booted.await.map_err(|source| CreateTemplateError::Boot {
                name: name.clone(),
                accel,
                source,
            })?;
            for _ in 0..warm_requests {
                answers_200(addr, &self.config.health_path).await;
            }
            let state = &self.snapshot.state;
            let saved = async {
                monitor.execute("stop", None).await?;
                monitor.ignore_shared_ram().await?;
                let uri = format!("file:{}", state.display());
                monitor
                    .execute("migrate", Some(json!({ "uri": uri })))
                    .await?;
                monitor.wait_for_migration(SNAPSHOT_DEADLINE).await
            };
            saved
                .await
                .map_err(|source| CreateTemplateError::Snapshot {
                    name: name.clone(),
                    state: state.clone(),
                    source,
                })?;
            let _ = monitor.execute("quit", None).await;
            Ok(())
        }
        .await;
        qemu.kill().await;
        if result.is_err() {
            self.snapshot.remove();
        }
        result
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The accelerator its guests run under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The image the template booted.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// [`Template::check_disk`], as an error of making the template.
    fn disk_unchanged(&self) -> Result<(), CreateTemplateError> {
        self.check_disk()
            .map_err(|source| CreateTemplateError::Disk {
                name: self.name.clone(),
                source,
            })
    }

    /// Checks that the root filesystem disk, if the image has one, is the one the template
    /// was made with.
    pub(crate) fn check_disk(&self) -> Result<(), DiskError> {
        match (&self.disk, &self.image.rootfs) {
            (Some(disk), Some(rootfs)) => disk.check(rootfs),
            _ => Ok(()),
        }
    }

    /// The RAM file clones map.
    pub fn ram_path(&self) -> &Path {
        &self.snapshot.ram
    }

    /// The device state file clones load.
    pub(crate) fn state_path(&self) -> &Path {
        &self.snapshot.state
    }

    /// Where and how its clones run.
    pub(crate) fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Starts a QEMU for clone `id`, ready to receive the template's state: the slow part of
    /// a clone, which a pool does ahead of time.
    pub async fn launch(&self, id: &str) -> Result<Standby, CloneError> {
        Standby::launch(self, id).await
    }

    /// Clones the template: launch, restore, resume, and wait until the app answers.
    pub async fn clone_vm(&self, id: &str) -> Result<VmClone, CloneError> {
        self.launch(id).await?.start(self).await
    }

    /// Writes the template as a portable snapshot (see [`crate::portable`]) to `out`, with
    /// `annotations` in its header. Blocking: it reads the whole RAM file.
    pub fn export(
        &self,
        annotations: serde_json::Value,
        out: impl std::io::Write,
    ) -> std::io::Result<TransferStats> {
        let compat = match &self.saved_on {
            Some(saved_on) => saved_on.clone(),
            None => Compatibility::here(&self.config, &self.image, self.accel)?,
        };
        let header = SnapshotHeader {
            template: self.name.clone(),
            compat,
            image: self.image.clone(),
            ram_bytes: std::fs::metadata(&self.snapshot.ram)?.len(),
            annotations,
        };
        portable::write(&header, &self.snapshot.state, &self.snapshot.ram, out)
    }

    /// Makes template `name` from a portable snapshot read from `input`, without booting:
    /// its RAM is written to a new RAM file and its device state to a new state file, which
    /// every clone then restores like any template's. `rootfs` is this host's build of the
    /// image's root filesystem, if it boots one (its digest must be the snapshot's).
    /// `accept` sees the header before anything is written and may refuse it; the snapshot
    /// is refused too if it was saved on anything this host cannot restore (see
    /// [`Compatibility`]). Nothing is left behind on failure. Blocking.
    ///
    /// The template has no bootable image here: a restore needs none (the kernel booted
    /// long ago, on the peer), so the image's kernel and initramfs are empty paths.
    pub fn import(
        name: &str,
        config: &VmConfig,
        rootfs: Option<Rootfs>,
        input: impl std::io::Read,
        accept: impl FnOnce(&SnapshotHeader) -> Result<(), String>,
    ) -> Result<(Self, TransferStats), CreateTemplateError> {
        let local = Image {
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            kernel_release: String::new(),
            app: PathBuf::new(),
            guest_port: crate::image::GUEST_PORT,
            rootfs,
        };
        let mut template = Self::prepare(name, &local, config)?;
        let import_error = |source| CreateTemplateError::Import {
            name: name.to_owned(),
            source,
        };
        let check = |header: &SnapshotHeader| {
            accept(header).map_err(ReadError::Refused)?;
            let memory = u64::from(config.memory_mib) << 20;
            if header.ram_bytes != memory {
                return Err(ReadError::Corrupt(format!(
                    "its RAM is {} bytes, but the guest's memory is {memory}",
                    header.ram_bytes
                )));
            }
            let accel = header.compat.accel;
            let here = match config.accel {
                Some(forced) => forced,
                None if accel == Accel::Kvm && !host::kvm_worth_trying() => Accel::Tcg,
                None => accel,
            };
            let image = restored_image(header, local.rootfs.clone());
            Ok(Compatibility::here(config, &image, here)?)
        };
        let (header, stats) = portable::read(
            input,
            check,
            &template.snapshot.state,
            &template.snapshot.ram,
        )
        .map_err(import_error)?;
        template.accel = header.compat.accel;
        template.saved_on = Some(header.compat.clone());
        template.image = restored_image(&header, local.rootfs);
        // The disk must not have changed while the snapshot arrived.
        template.disk_unchanged()?;
        tracing::info!(
            template = name,
            peer_template = %header.template,
            accel = %template.accel,
            stream_bytes = stats.stream_bytes,
            ram_bytes = stats.ram_bytes,
            "vm: template made from a snapshot"
        );
        Ok((template, stats))
    }
}

/// The image of a template made from `header`'s snapshot, with this host's `rootfs`: nothing
/// to boot (a restore needs no kernel), the guest's port and app as the peer had them.
fn restored_image(header: &SnapshotHeader, rootfs: Option<Rootfs>) -> Image {
    Image {
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        rootfs,
        ..header.image.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[tokio::test]
    async fn an_unusable_name_is_refused_before_anything_is_made() {
        let config = VmConfig {
            run_dir: "/nonexistent/squall-run".into(),
            ..VmConfig::default()
        };
        let err = Template::create("a b", &Image::nowhere(), &config, 0)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid template name `a b`: use 1 to 64 letters, digits, '-' or '_'"
        );
    }

    #[test]
    fn a_failed_boot_names_the_template_and_the_accelerator_and_keeps_the_cause() {
        let err = CreateTemplateError::Boot {
            name: "web".into(),
            accel: Accel::Tcg,
            source: WaitError::Exited {
                status: "exit status: 1".into(),
                console: Default::default(),
            },
        };
        // The message says what failed; the cause is its source, said once.
        assert_eq!(
            lifecycle::ErrorChain(&err).to_string(),
            "template web under tcg: the guest did not come up: QEMU exited early (exit status: 1); the console is empty"
        );
    }
}
