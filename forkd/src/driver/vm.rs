//! The `vm` driver: the template's command is the app of a microVM ([`microvm`]). forkd
//! builds a bootable image around it, boots it, lets it warm up, snapshots it, and keeps a
//! pool of standby QEMUs restored from the snapshot; each clone is one of them resumed.
//!
//! Each clone's QEMU is owned by one task, which kills it when asked and notices when it
//! exits on its own (the guest crashed or powered off).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Ids, Life, Lifeline, Started};
use crate::api::{ExitStatus, TemplateSpec};
use crate::config::Config;

/// Standby QEMUs kept restored and paused per template: a flash crowd's first clones need
/// only a resume.
const POOL_SIZE: usize = 4;

/// How many requests the template's app answers before it is snapshotted, so that the code
/// serving them is warm in the snapshot.
const WARM_REQUESTS: u32 = 20;

/// Why a `vm` template could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("building the image in {dir} failed")]
    Build {
        dir: PathBuf,
        #[source]
        source: Box<microvm::BuildImageError>,
    },
    #[error("building the image in {dir} stopped")]
    BuildAborted {
        dir: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("booting and snapshotting the template failed")]
    Boot(#[source] Box<microvm::CreateTemplateError>),
    #[error("building the image's root filesystem failed")]
    Rootfs(#[source] Box<microvm::BuildRootfsError>),
    #[error(transparent)]
    Seed(Box<super::seed::SeedError>),
    #[error("the template made from the peer's snapshot does not restore here")]
    SeedRestore(#[source] Box<microvm::CloneError>),
    #[error("the image cache {dir} cannot be used")]
    ImageCache {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a `vm` clone could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneError {
    #[error("restoring a clone failed")]
    Restore(#[source] Box<microvm::CloneError>),
    #[error("the clone's QEMU exited at once")]
    ExitedAtOnce,
}

/// A warm `vm` template: its pool, and the image built for it.
pub(crate) struct VmTemplate {
    // Fields drop in order: the pool (and with it the template, whose snapshot files are in
    // the run directory) before the image and the run directory are removed.
    pool: Arc<microvm::Pool>,
    /// None for a template made from a peer's snapshot: a restore needs no image.
    _image: Option<BuiltImage>,
    /// What came from the peer, for a template made from a peer's snapshot.
    received: Option<microvm::TransferStats>,
}

/// The image built for one template (a kernel and an initramfs, tens of megabytes), removed
/// when dropped, and the daemon's run directory with it once nothing else is in it. Clones
/// never read the image (they restore the template's state), so this is safe even if one
/// outlives it.
struct BuiltImage {
    template: String,
    dir: PathBuf,
    run_dir: PathBuf,
}

impl Drop for BuiltImage {
    fn drop(&mut self) {
        remove_image(&self.template, &self.dir, &self.run_dir);
    }
}

/// Where `vm` templates' images and QEMU run files go: one directory per daemon.
fn run_dir(config: &Config) -> PathBuf {
    config
        .runtime_dir
        .join(format!("squall-forkd-vm-{}", std::process::id()))
}

/// Removes an image built for template `name` (a kernel and an initramfs, tens of
/// megabytes), and the run directory once nothing else is in it. Clones never read the
/// image (they restore the template's state), so this is safe even if one outlives it.
fn remove_image(name: &str, image_dir: &Path, run_dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(image_dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(template = name, dir = %image_dir.display(), error = %e, "cannot remove a vm template's image");
    }
    // Fails, harmlessly, while other templates' files are in it.
    let _ = std::fs::remove_dir(run_dir);
}

/// Makes `dir` (0700) if it is missing, and refuses it unless it belongs to this process's
/// user and no one else may write it: disks found there are trusted as built.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    // /proc/self belongs to the process's effective user.
    let user = std::fs::metadata("/proc/self")?.uid();
    if meta.uid() != user || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "it must belong to uid {user} and be writable by no one else (it is uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// The root filesystem disk of the container image `image` (built into forkd's image cache,
/// or found there already built), with the spec's arguments replacing the image's `Cmd` and
/// its `app_port` put first among the ports.
async fn rootfs(
    spec: &TemplateSpec,
    image: &Path,
    config: &Config,
) -> Result<microvm::Rootfs, TemplateError> {
    let source = microvm::RootfsSource::Oci(image.to_owned());
    let options = microvm::RootfsOptions {
        args: (!spec.command.is_empty()).then(|| spec.command.clone()),
        ..microvm::RootfsOptions::default()
    };
    let cache = config.image_cache.clone();
    private_dir(&cache).map_err(|source| TemplateError::ImageCache {
        dir: cache.clone(),
        source,
    })?;
    let started = std::time::Instant::now();
    let built =
        tokio::task::spawn_blocking(move || microvm::build_rootfs(&source, &options, &cache)).await;
    let mut rootfs = match built {
        Ok(Ok(rootfs)) => rootfs,
        Ok(Err(source)) => return Err(TemplateError::Rootfs(Box::new(source))),
        Err(source) => {
            return Err(TemplateError::BuildAborted {
                dir: config.image_cache.clone(),
                source,
            });
        }
    };
    tracing::info!(
        template = %spec.name,
        image = %image.display(),
        digest = %rootfs.digest,
        disk = %rootfs.disk.display(),
        seconds = started.elapsed().as_secs_f64(),
        "root filesystem ready"
    );
    // The port is not part of the disk: a different port reuses the same disk.
    if let Some(port) = spec.app_port {
        rootfs.app.ports.retain(|&p| p != port);
        rootfs.app.ports.insert(0, port);
    }
    Ok(rootfs)
}

/// Where and how a template's microVMs run.
fn vm_config(spec: &TemplateSpec, config: &Config) -> microvm::VmConfig {
    microvm::VmConfig {
        run_dir: run_dir(config),
        health_path: spec.health_path.clone(),
        boot_timeout: Duration::from_millis(spec.start_timeout_ms),
        // Clones listen where fork and spawn clones do, and report that address.
        clone_ip: config.clone_ip,
        merge_memory: config.vm_merge_memory,
        accel: config.vm_accel,
        ..microvm::VmConfig::default()
    }
}

impl VmTemplate {
    /// Builds the image (the command is the app and its arguments, or the arguments of a
    /// container image's app), boots and snapshots it, and starts the pool of standby QEMUs.
    pub(crate) async fn start(
        spec: &TemplateSpec,
        config: &Config,
        ids: &Ids,
    ) -> Result<VmTemplate, TemplateError> {
        if let Some(source) = &spec.source {
            return Self::seed(spec, source, config, ids).await;
        }
        let app = match &spec.image {
            None => microvm::AppSource::Executable {
                path: PathBuf::from(&spec.command[0]),
                args: spec.command[1..].to_vec(),
            },
            Some(image) => microvm::AppSource::Rootfs(rootfs(spec, image, config).await?),
        };
        let run_dir = run_dir(config);
        // Each build gets its own directory, so deleting a template never touches the image
        // of a successor of the same name.
        let image_dir = run_dir.join(format!("{}-image-{}", spec.name, ids.next()));
        let image_spec = microvm::ImageSpec {
            app,
            kernel: None,
            busybox: None,
            files: Vec::new(),
        };
        let build_dir = image_dir.clone();
        let built =
            tokio::task::spawn_blocking(move || microvm::image::build(&image_spec, &build_dir))
                .await;
        let image = match built {
            Ok(Ok(image)) => image,
            Ok(Err(source)) => {
                remove_image(&spec.name, &image_dir, &run_dir);
                return Err(TemplateError::Build {
                    dir: image_dir,
                    source: Box::new(source),
                });
            }
            Err(source) => {
                remove_image(&spec.name, &image_dir, &run_dir);
                return Err(TemplateError::BuildAborted {
                    dir: image_dir,
                    source,
                });
            }
        };
        let vm_config = vm_config(spec, config);
        let template =
            match microvm::Template::create(&spec.name, &image, &vm_config, WARM_REQUESTS).await {
                Ok(template) => template,
                Err(source) => {
                    remove_image(&spec.name, &image_dir, &run_dir);
                    return Err(TemplateError::Boot(Box::new(source)));
                }
            };
        tracing::info!(template = %spec.name, accel = %template.accel(), "vm template ready");
        let name = spec.name.clone();
        let ids = ids.clone();
        let pool = microvm::Pool::start(
            Arc::new(template),
            POOL_SIZE,
            microvm::PoolMode::Restored,
            move || ids.clone_id(&name),
        );
        Ok(VmTemplate {
            pool,
            _image: Some(BuiltImage {
                template: spec.name.clone(),
                dir: image_dir,
                run_dir,
            }),
            received: None,
        })
    }

    /// Makes the template from a peer's snapshot (see [`super::seed`]) instead of booting
    /// it, restores one standby from it to show that it runs here, and starts the pool with
    /// that standby first.
    async fn seed(
        spec: &TemplateSpec,
        source: &crate::api::SnapshotSource,
        config: &Config,
        ids: &Ids,
    ) -> Result<VmTemplate, TemplateError> {
        let rootfs = match &spec.image {
            Some(image) => Some(rootfs(spec, image, config).await?),
            None => None,
        };
        let started = std::time::Instant::now();
        let (template, stats) =
            super::seed::import(source, spec, &config.token, vm_config(spec, config), rootfs)
                .await
                .map_err(|e| TemplateError::Seed(Box::new(e)))?;
        let received = started.elapsed();
        let template = Arc::new(template);
        let mut first = template
            .launch(&ids.clone_id(&spec.name))
            .await
            .map_err(|e| TemplateError::SeedRestore(Box::new(e)))?;
        if let Err(e) = first.restore_paused(&template).await {
            first.kill().await;
            return Err(TemplateError::SeedRestore(Box::new(e)));
        }
        tracing::info!(
            template = %spec.name,
            peer = %source.url,
            accel = %template.accel(),
            stream_bytes = stats.stream_bytes,
            ram_bytes = stats.ram_bytes,
            received_s = received.as_secs_f64(),
            restored_s = started.elapsed().as_secs_f64(),
            "vm template made from a peer's snapshot"
        );
        let name = spec.name.clone();
        let ids = ids.clone();
        let pool = microvm::Pool::start_with(
            template,
            POOL_SIZE,
            microvm::PoolMode::Restored,
            move || ids.clone_id(&name),
            vec![first],
        );
        Ok(VmTemplate {
            pool,
            _image: None,
            received: Some(stats),
        })
    }

    /// The bytes of the peer's snapshot it was made from, if it was.
    pub(crate) fn received_bytes(&self) -> Option<u64> {
        self.received.map(|stats| stats.stream_bytes)
    }

    /// The template itself, for its snapshot.
    pub(crate) fn template(&self) -> &Arc<microvm::Template> {
        self.pool.template()
    }

    /// Resumes a standby QEMU (or starts one if none is ready) and starts watching it.
    pub(crate) async fn start_clone(&self) -> Result<Started, CloneError> {
        let vm = self
            .pool
            .clone_vm()
            .await
            .map_err(|e| CloneError::Restore(Box::new(e)))?;
        let (id, addr) = (vm.id().to_owned(), vm.addr());
        let clone = RunningClone::watch(vm)?;
        Ok(Started {
            id,
            addr,
            handle: super::CloneHandle::Vm(clone),
        })
    }

    /// Stops the pool (killing its standby QEMUs).
    /// The image and the run directory go when the template is dropped, after its files.
    pub(crate) async fn stop(&self) {
        self.pool.shutdown().await;
    }
}

/// A running `vm` clone: the task that owns its QEMU, and what that task says of it.
pub(crate) struct RunningClone {
    pid: Option<u32>,
    /// Set to ask the task to kill the QEMU; dropping it asks too.
    kill: watch::Sender<bool>,
    life: Lifeline,
}

impl RunningClone {
    /// Hands `vm` to a task of its own, which kills it when asked and notices when its QEMU
    /// exits on its own.
    fn watch(mut vm: microvm::VmClone) -> Result<RunningClone, CloneError> {
        let pid = vm.pid().ok_or(CloneError::ExitedAtOnce)?;
        let (kill, mut killed) = watch::channel(false);
        let (life, lifeline) = Lifeline::new();
        tokio::spawn(async move {
            // Asked to, or nobody holds the clone any more: either way it must go.
            let kill_requested = async {
                let _ = killed.wait_for(|kill| *kill).await;
            };
            let status = tokio::select! {
                () = kill_requested => {
                    vm.kill().await;
                    ExitStatus::Signal(libc::SIGKILL)
                }
                exit = vm.exited() => {
                    drop(vm); // removes its files
                    super::exit_status(exit)
                }
            };
            life.send_replace(Life::Ended(status));
        });
        Ok(RunningClone {
            pid: Some(pid),
            kill,
            life: lifeline,
        })
    }

    /// QEMU's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Kills QEMU and returns once it is gone and its files are removed.
    pub(crate) async fn kill(&self) {
        self.kill.send_replace(true);
        self.life.gone().await;
    }

    /// Returns how QEMU ended, once it has.
    pub(crate) async fn ended(&self) -> ExitStatus {
        self.life.ended().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_image_cache_is_made_private_and_one_others_may_write_is_refused() {
        let scratch = test_support::Scratch::new("image-cache");
        let cache = scratch.join("a/b/images");
        private_dir(&cache).unwrap();
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = private_dir(&cache).unwrap_err();
        assert!(
            err.to_string().contains("be writable by no one else"),
            "{err}"
        );
    }
}
