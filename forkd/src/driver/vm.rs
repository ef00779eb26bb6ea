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
    #[error("this forkd cannot run container images yet ({0})")]
    ImagesUnsupported(PathBuf),
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
    _image: BuiltImage,
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

impl VmTemplate {
    /// Builds the image (the command is the app and its arguments), boots and snapshots it,
    /// and starts the pool of standby QEMUs.
    pub(crate) async fn start(
        spec: &TemplateSpec,
        config: &Config,
        ids: &Ids,
    ) -> Result<VmTemplate, TemplateError> {
        if let Some(image) = &spec.image {
            return Err(TemplateError::ImagesUnsupported(image.clone()));
        }
        let run_dir = run_dir(config);
        // Each build gets its own directory, so deleting a template never touches the image
        // of a successor of the same name.
        let image_dir = run_dir.join(format!("{}-image-{}", spec.name, ids.next()));
        let image_spec = microvm::ImageSpec {
            app: microvm::AppSource::Executable {
                path: PathBuf::from(&spec.command[0]),
                args: spec.command[1..].to_vec(),
            },
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
        let vm_config = microvm::VmConfig {
            run_dir: run_dir.clone(),
            health_path: spec.health_path.clone(),
            boot_timeout: Duration::from_millis(spec.start_timeout_ms),
            // Clones listen where fork and spawn clones do, and report that address.
            clone_ip: config.clone_ip,
            merge_memory: config.vm_merge_memory,
            ..microvm::VmConfig::default()
        };
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
            _image: BuiltImage {
                template: spec.name.clone(),
                dir: image_dir,
                run_dir,
            },
        })
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
