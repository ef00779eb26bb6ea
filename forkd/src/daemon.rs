//! The daemon's state: templates and their clones, and every operation the API offers on them.
//! HTTP lives in [`crate::server`]; the drivers in [`crate::spawn`] and [`crate::fork`].
//!
//! Every clone has one record in one map. A watcher task per clone notices its exit (through a
//! pidfd for `fork` clones, through `wait` for `spawn` clones, which are our children) and
//! updates the record; kill requests signal through the clone's pidfd, so a reused pid can
//! never be hit.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kernel::Pidfd;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::{
    CloneInfo, CloneList, CloneState, Driver, ExitStatus, TemplateInfo, TemplateList, TemplateSpec,
};
use crate::fork::{StartError, Zygote};
use crate::metrics::Metrics;
use crate::spawn;

/// How the daemon behaves; [`Config::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bearer token every `/v1` request must carry.
    pub token: String,
    /// At most this many live clones (starting, ready or stopping) at once. Default 256.
    pub max_clones: usize,
    /// How long a killed clone has between SIGTERM and SIGKILL. Default 5 s.
    pub kill_grace: Duration,
    /// Where private directories for zygote sockets are made. Default: the system temp dir.
    pub runtime_dir: PathBuf,
    /// The address clones listen on. Default loopback; a routable address lets balancers on
    /// other hosts reach them.
    pub clone_ip: IpAddr,
    /// Whether `vm` clones' QEMU processes may have identical pages merged by the host's
    /// KSM (see `microvm::VmConfig::merge_memory`). Default on; it takes effect only where
    /// the host runs KSM.
    pub vm_merge_memory: bool,
}

impl Config {
    /// The defaults, with `token`.
    pub fn new(token: impl Into<String>) -> Config {
        Config {
            token: token.into(),
            max_clones: 256,
            kill_grace: Duration::from_secs(5),
            runtime_dir: std::env::temp_dir(),
            clone_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            vm_merge_memory: true,
        }
    }
}

/// Why a template could not be created or deleted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error(
        "invalid template name {0:?}: expected 1 to 63 of [a-z0-9-], starting with a letter or digit"
    )]
    BadName(String),
    #[error("invalid command: expected a non-empty list whose first element is the program")]
    EmptyCommand,
    #[error("invalid health_path {0:?}: expected a path starting with '/'")]
    BadHealthPath(String),
    #[error("invalid start_timeout_ms: expected 1 to 600000")]
    BadTimeout,
    #[error("template {0:?} already exists")]
    Exists(String),
    #[error("template {0:?} not found")]
    NotFound(String),
    #[error("template {0:?} is still warming up")]
    Warming(String),
    #[error("starting microVM template {name:?} failed: {reason}")]
    Vm { name: String, reason: String },
    #[error("starting template {name:?} failed")]
    Start {
        name: String,
        #[source]
        source: StartError,
    },
}

/// Why a clone request failed as a whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneError {
    #[error("template {0:?} not found")]
    NotFound(String),
    #[error("invalid count {count}: expected 1 to {max} (the daemon's --max-clones)")]
    BadCount { count: usize, max: usize },
    #[error("{count} more clones would exceed --max-clones {max} ({live} live)")]
    Capacity {
        count: usize,
        live: usize,
        max: usize,
    },
    #[error("could not bind a listening socket")]
    Bind(#[source] std::io::Error),
    #[error("every clone failed; the first: {0}")]
    AllFailed(String),
}

/// Why a kill request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KillError {
    #[error("clone {0:?} not found")]
    NotFound(String),
    #[error("clone {0:?} is still starting; kill it once it is ready")]
    Starting(String),
}

/// A clone's running process, as far as killing and waiting go.
struct Process {
    pidfd: Arc<Pidfd>,
    gone: watch::Receiver<bool>,
}

impl Process {
    async fn wait_gone(&self) {
        let mut gone = self.gone.clone();
        // An error means the watcher ended, which it does only once the process is gone.
        let _ = gone.wait_for(|gone| *gone).await;
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`; returns once it is gone.
    async fn terminate(&self, grace: Duration) {
        let _ = self.pidfd.send_signal(libc::SIGTERM);
        if tokio::time::timeout(grace, self.wait_gone()).await.is_err() {
            let _ = self.pidfd.send_signal(libc::SIGKILL);
            self.wait_gone().await;
        }
    }
}

/// A running microVM clone; `None` once it is being killed.
type VmHandle = Arc<tokio::sync::Mutex<Option<microvm::VmClone>>>;

struct CloneRecord {
    info: CloneInfo,
    process: Option<Arc<Process>>,
    vm: Option<VmHandle>,
}

struct Template {
    spec: TemplateSpec,
    zygote: Option<Zygote>,
    /// `vm` templates: the warm snapshot and its pool of standby QEMUs.
    vm: Option<Arc<microvm::Pool>>,
}

/// Standby QEMUs kept restored and paused per `vm` template: a flash crowd's first clones
/// need only a resume.
const VM_POOL_SIZE: usize = 4;

/// A template's place in the map: reserved while it warms up, so that its name is taken but
/// nothing waits on it.
enum Slot {
    Warming,
    Ready(Arc<Template>),
}

/// The daemon: configuration, templates, clones and metrics.
pub(crate) struct Daemon {
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    templates: Mutex<HashMap<String, Slot>>,
    clones: Mutex<HashMap<String, CloneRecord>>,
    next_id: AtomicU64,
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

fn live(state: CloneState) -> bool {
    matches!(
        state,
        CloneState::Starting | CloneState::Ready | CloneState::Stopping
    )
}

impl Daemon {
    pub(crate) fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            config,
            metrics: Metrics::new(),
            templates: Mutex::new(HashMap::new()),
            clones: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn templates(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // As for `clones`: every update is a single insert or remove.
        self.templates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn template(&self, name: &str) -> Option<Arc<Template>> {
        match self.templates().get(name) {
            Some(Slot::Ready(template)) => Some(template.clone()),
            Some(Slot::Warming) | None => None,
        }
    }

    fn clones(&self) -> MutexGuard<'_, HashMap<String, CloneRecord>> {
        // A panic while holding this lock would be a bug; the map itself stays consistent
        // (every update is a single insert, remove or field write), so keep going.
        self.clones
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Recounts live clones per driver into the gauge. Call with the clone map locked.
    fn update_live_gauge(&self, clones: &HashMap<String, CloneRecord>) {
        for driver in [Driver::Spawn, Driver::Fork, Driver::Vm] {
            let count = clones
                .values()
                .filter(|r| r.info.driver == driver && live(r.info.state))
                .count();
            self.metrics
                .live
                .with_label_values(&[driver.as_str()])
                .set(count as i64);
        }
    }

    pub(crate) async fn create_template(
        self: &Arc<Self>,
        spec: TemplateSpec,
    ) -> Result<TemplateInfo, TemplateError> {
        if !valid_name(&spec.name) {
            return Err(TemplateError::BadName(spec.name));
        }
        if spec
            .command
            .first()
            .is_none_or(|program| program.is_empty())
        {
            return Err(TemplateError::EmptyCommand);
        }
        if !spec.health_path.starts_with('/') {
            return Err(TemplateError::BadHealthPath(spec.health_path));
        }
        if !(1..=600_000).contains(&spec.start_timeout_ms) {
            return Err(TemplateError::BadTimeout);
        }
        {
            let mut templates = self.templates();
            if templates.contains_key(&spec.name) {
                return Err(TemplateError::Exists(spec.name));
            }
            templates.insert(spec.name.clone(), Slot::Warming);
        }
        let mut vm = None;
        let zygote = match spec.driver {
            Driver::Spawn => None,
            Driver::Vm => match self.start_vm_template(&spec).await {
                Ok(pool) => {
                    vm = Some(pool);
                    None
                }
                Err(reason) => {
                    self.templates().remove(&spec.name);
                    return Err(TemplateError::Vm {
                        name: spec.name,
                        reason,
                    });
                }
            },
            Driver::Fork => {
                let daemon = Arc::downgrade(self);
                let on_exit = Arc::new(move |id: &str, status: ExitStatus| {
                    if let Some(daemon) = Weak::upgrade(&daemon) {
                        daemon.clone_gone(id, Some(status));
                    }
                });
                match Zygote::start(&spec, &self.config.runtime_dir, on_exit).await {
                    Ok(zygote) => Some(zygote),
                    Err(source) => {
                        self.templates().remove(&spec.name);
                        return Err(TemplateError::Start {
                            name: spec.name,
                            source,
                        });
                    }
                }
            }
        };
        let template = Arc::new(Template { spec, zygote, vm });
        self.templates()
            .insert(template.spec.name.clone(), Slot::Ready(template.clone()));
        Ok(self.template_info(&template))
    }

    fn template_info(&self, template: &Template) -> TemplateInfo {
        let clones = self
            .clones()
            .values()
            .filter(|r| r.info.template == template.spec.name)
            .count();
        TemplateInfo {
            spec: template.spec.clone(),
            pid: template.zygote.as_ref().and_then(Zygote::pid),
            alive: template.zygote.as_ref().is_none_or(Zygote::alive),
            clones,
        }
    }

    pub(crate) fn template_list(&self) -> TemplateList {
        let ready: Vec<Arc<Template>> = self
            .templates()
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(template) => Some(template.clone()),
                Slot::Warming => None,
            })
            .collect();
        let mut templates: Vec<_> = ready.iter().map(|t| self.template_info(t)).collect();
        templates.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        TemplateList { templates }
    }

    /// Kills the template's clones, then stops the template.
    pub(crate) async fn delete_template(self: &Arc<Self>, name: &str) -> Result<(), TemplateError> {
        let template = {
            let mut templates = self.templates();
            match templates.remove(name) {
                Some(Slot::Ready(template)) => template,
                Some(Slot::Warming) => {
                    templates.insert(name.to_owned(), Slot::Warming);
                    return Err(TemplateError::Warming(name.to_owned()));
                }
                None => return Err(TemplateError::NotFound(name.to_owned())),
            }
        };
        let ids: Vec<String> = self
            .clones()
            .values()
            .filter(|r| r.info.template == name)
            .map(|r| r.info.id.clone())
            .collect();
        self.kill_all(ids).await;
        // This template's own image: a template of the same name created meanwhile has
        // another.
        let image_dir = template.vm.as_ref().and_then(|pool| {
            pool.template()
                .image()
                .initramfs
                .parent()
                .map(Path::to_owned)
        });
        if let Some(pool) = &template.vm {
            pool.shutdown().await;
        }
        if let Ok(template) = Arc::try_unwrap(template)
            && let Some(zygote) = template.zygote
        {
            zygote.stop().await;
        }
        if let Some(dir) = image_dir {
            self.remove_vm_image(name, &dir);
        }
        Ok(())
    }

    /// Where `vm` templates' images and QEMU run files go: one directory per daemon.
    fn vm_run_dir(&self) -> PathBuf {
        self.config
            .runtime_dir
            .join(format!("squall-forkd-vm-{}", std::process::id()))
    }

    /// A new directory name for an image of `vm` template `name`: each build gets its own,
    /// so deleting a template never touches the image of a successor of the same name.
    fn vm_image_dir(&self, name: &str) -> PathBuf {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.vm_run_dir().join(format!("{name}-image-{n}"))
    }

    /// Removes an image built for `vm` template `name` (a kernel and an initramfs, tens of
    /// megabytes), and the run directory once nothing else is in it. Clones never read the
    /// image (they restore the template's state), so this is safe even if one outlives it.
    fn remove_vm_image(&self, name: &str, image_dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(image_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(template = name, dir = %image_dir.display(), error = %e, "cannot remove a vm template's image");
        }
        // Fails, harmlessly, while other templates' files are in it.
        let _ = std::fs::remove_dir(self.vm_run_dir());
    }

    async fn kill_all(self: &Arc<Self>, ids: Vec<String>) {
        let mut kills = JoinSet::new();
        for id in ids {
            let daemon = self.clone();
            kills.spawn(async move { daemon.kill_when_started(&id).await });
        }
        while kills.join_next().await.is_some() {}
    }

    /// Kills a clone, waiting for it to finish starting first.
    async fn kill_when_started(self: &Arc<Self>, id: &str) {
        loop {
            match self.kill(id).await {
                Err(KillError::Starting(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
                Ok(()) | Err(KillError::NotFound(_)) => return,
            }
        }
    }

    pub(crate) async fn create_clones(
        self: &Arc<Self>,
        name: &str,
        count: usize,
    ) -> Result<CloneList, CloneError> {
        let requested = Instant::now();
        let max = self.config.max_clones;
        if count == 0 || count > max {
            return Err(CloneError::BadCount { count, max });
        }
        let template = self
            .template(name)
            .ok_or_else(|| CloneError::NotFound(name.to_owned()))?;
        let driver = template.spec.driver;
        if let Some(pool) = &template.vm {
            return self.create_vm_clones(name, pool, count, requested).await;
        }

        // Sockets first (fork: the listener itself; spawn: a free port), then reserve the slots.
        let mut sockets = Vec::with_capacity(count);
        for _ in 0..count {
            let socket = match driver {
                Driver::Fork => {
                    TcpListener::bind((self.config.clone_ip, 0)).map(|l| (l.local_addr(), Some(l)))
                }
                // (`vm` templates never get here: their pool makes the clones.)
                Driver::Spawn | Driver::Vm => {
                    spawn::free_port(self.config.clone_ip).map(|addr| (Ok(addr), None))
                }
            };
            let (addr, listener) = socket.map_err(CloneError::Bind)?;
            sockets.push((addr.map_err(CloneError::Bind)?, listener));
        }
        let mut ids = Vec::with_capacity(count);
        {
            let mut clones = self.clones();
            let live_count = clones.values().filter(|r| live(r.info.state)).count();
            if live_count + count > max {
                return Err(CloneError::Capacity {
                    count,
                    live: live_count,
                    max,
                });
            }
            for (addr, _) in &sockets {
                let id = format!("{name}-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
                let info = CloneInfo {
                    id: id.clone(),
                    template: name.to_owned(),
                    driver,
                    addr: *addr,
                    pid: None,
                    state: CloneState::Starting,
                    ready: false,
                    exit: None,
                    error: None,
                };
                clones.insert(
                    id.clone(),
                    CloneRecord {
                        info,
                        process: None,
                        vm: None,
                    },
                );
                ids.push(id);
            }
            self.update_live_gauge(&clones);
        }

        let mut starts = JoinSet::new();
        for (index, (id, (addr, listener))) in ids.into_iter().zip(sockets).enumerate() {
            let daemon = self.clone();
            let template = template.clone();
            starts.spawn(async move {
                (
                    index,
                    daemon
                        .start_clone(&template, id, addr, listener, requested)
                        .await,
                )
            });
        }
        let mut results = Vec::with_capacity(count);
        while let Some(joined) = starts.join_next().await {
            // A start task panicking is a bug; its clone stays `starting` and is visible.
            if let Ok(result) = joined {
                results.push(result);
            }
        }
        results.sort_by_key(|(index, _)| *index);
        let clones: Vec<CloneInfo> = results.into_iter().map(|(_, info)| info).collect();
        if !clones.is_empty() && clones.iter().all(|c| c.state == CloneState::Failed) {
            return Err(CloneError::AllFailed(
                clones[0].error.clone().unwrap_or_default(),
            ));
        }
        Ok(CloneList { clones })
    }

    /// Starts one reserved clone and returns how it went.
    async fn start_clone(
        self: &Arc<Self>,
        template: &Template,
        id: String,
        addr: SocketAddr,
        listener: Option<TcpListener>,
        requested: Instant,
    ) -> CloneInfo {
        let driver = template.spec.driver;
        let started = match (&template.zygote, listener) {
            (Some(zygote), Some(listener)) => {
                self.start_fork_clone(zygote, &template.spec, &id, listener)
                    .await
            }
            _ => self.start_spawn_clone(&template.spec, &id, addr).await,
        };
        let mut clones = self.clones();
        let outcome = match started {
            Ok(process) => {
                let Some(record) = clones.get_mut(&id) else {
                    // Deleted while starting (its template went away): it is someone else's to kill.
                    return failed_info(
                        &id,
                        &template.spec.name,
                        driver,
                        addr,
                        "deleted while starting",
                    );
                };
                record.info.pid = Some(process.pidfd.pid());
                record.process = Some(process);
                if record.info.state == CloneState::Starting {
                    record.info.state = CloneState::Ready;
                    record.info.ready = true;
                }
                self.metrics
                    .clone_duration
                    .with_label_values(&[driver.as_str()])
                    .observe(requested.elapsed().as_secs_f64());
                let info = record.info.clone();
                Ok(info)
            }
            Err(reason) => {
                clones.remove(&id);
                Err(reason)
            }
        };
        self.update_live_gauge(&clones);
        drop(clones);
        match outcome {
            Ok(info) => {
                self.metrics
                    .clones
                    .with_label_values(&[driver.as_str(), "ready"])
                    .inc();
                info
            }
            Err(reason) => {
                tracing::warn!(clone = %id, %reason, "clone failed");
                self.metrics
                    .clones
                    .with_label_values(&[driver.as_str(), "failed"])
                    .inc();
                failed_info(&id, &template.spec.name, driver, addr, &reason)
            }
        }
    }

    async fn start_fork_clone(
        self: &Arc<Self>,
        zygote: &Zygote,
        spec: &TemplateSpec,
        id: &str,
        listener: TcpListener,
    ) -> Result<Arc<Process>, String> {
        let timeout = Duration::from_millis(spec.start_timeout_ms);
        let pid = zygote.fork(id.to_owned(), listener, timeout).await?;
        let (gone_tx, gone) = watch::channel(false);
        let pidfd = match Pidfd::open(pid) {
            Ok(pidfd) => Arc::new(pidfd),
            // Already gone and reaped: the template's `exited` report tells how.
            Err(e) => return Err(format!("clone exited at once (pidfd_open: {e})")),
        };
        let watched =
            kernel::async_pidfd(pidfd.clone()).map_err(|e| format!("watching the clone: {e}"))?;
        let daemon = Arc::downgrade(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            // A pidfd turns readable when its process exits. An error here would mean epoll
            // refused the pidfd; treat it like an exit rather than track a clone blindly.
            let _ = watched.readable().await;
            let _ = gone_tx.send(true);
            drop(watched); // our share of the pidfd: do not hold it through the wait below
            // The template reports how the clone ended as soon as it reaps it, and that report
            // updates the record. Only if it never comes (the template died too) does the
            // record change here, without an exit status.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(daemon) = daemon.upgrade() {
                daemon.clone_gone(&id, None);
            }
        });
        Ok(Arc::new(Process { pidfd, gone }))
    }

    async fn start_spawn_clone(
        self: &Arc<Self>,
        spec: &TemplateSpec,
        id: &str,
        addr: SocketAddr,
    ) -> Result<Arc<Process>, String> {
        let mut child = spawn::start(spec, id, addr)
            .map_err(|e| format!("could not start {:?}: {e}", spec.command[0]))?;
        let pid = child.id().ok_or("the clone exited at once")?;
        // Our own unreaped child: the pid cannot have been reused.
        let pidfd = Arc::new(Pidfd::open(pid).map_err(|e| format!("pidfd_open: {e}"))?);
        let timeout = Duration::from_millis(spec.start_timeout_ms);
        let ready = tokio::select! {
            () = spawn::wait_healthy(addr, &spec.health_path) => Ok(()),
            status = child.wait() => Err(format!("the clone exited before it was ready ({})", describe(status))),
            () = tokio::time::sleep(timeout) => Err(format!("the clone was not ready within {timeout:?}")),
        };
        if let Err(reason) = ready {
            let _ = child.kill().await;
            return Err(reason);
        }
        let (gone_tx, gone) = watch::channel(false);
        let daemon = Arc::downgrade(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = gone_tx.send(true);
            if let Some(daemon) = daemon.upgrade() {
                let status = match status
                    .map(|s| (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)))
                {
                    Ok((Some(code), _)) => ExitStatus::Code(code),
                    Ok((None, Some(signal))) => ExitStatus::Signal(signal),
                    _ => ExitStatus::Unknown,
                };
                daemon.clone_gone(&id, Some(status));
            }
        });
        Ok(Arc::new(Process { pidfd, gone }))
    }

    /// Builds the image for a `vm` template (its command is the app and its arguments), boots
    /// and snapshots it, and starts its pool of standby QEMUs.
    async fn start_vm_template(
        self: &Arc<Self>,
        spec: &TemplateSpec,
    ) -> Result<Arc<microvm::Pool>, String> {
        let run_dir = self.vm_run_dir();
        let image_spec = microvm::ImageSpec {
            app: PathBuf::from(&spec.command[0]),
            args: spec.command[1..].to_vec(),
            kernel: None,
            busybox: None,
            files: Vec::new(),
        };
        let image_dir = self.vm_image_dir(&spec.name);
        let build_dir = image_dir.clone();
        let built =
            tokio::task::spawn_blocking(move || microvm::image::build(&image_spec, &build_dir))
                .await;
        let image = match built
            .map_err(|e| e.to_string())
            .and_then(|b| b.map_err(|e| e.to_string()))
        {
            Ok(image) => image,
            Err(e) => {
                self.remove_vm_image(&spec.name, &image_dir);
                return Err(format!("building the image: {e}"));
            }
        };
        let config = microvm::VmConfig {
            run_dir,
            health_path: spec.health_path.clone(),
            boot_timeout: Duration::from_millis(spec.start_timeout_ms),
            // Clones listen where fork and spawn clones do, and report that address.
            clone_ip: self.config.clone_ip,
            merge_memory: self.config.vm_merge_memory,
            ..microvm::VmConfig::default()
        };
        let template = match microvm::Template::create(&spec.name, &image, &config, 20).await {
            Ok(template) => template,
            Err(e) => {
                self.remove_vm_image(&spec.name, &image_dir);
                return Err(e.to_string());
            }
        };
        tracing::info!(template = %spec.name, accel = %template.accel(), "vm template ready");
        // Pool ids come from the daemon's own counter, so the id the guest learns when its
        // standby QEMU starts is the one the API reports.
        let name = spec.name.clone();
        let daemon = Arc::downgrade(self);
        Ok(microvm::Pool::start(
            Arc::new(template),
            VM_POOL_SIZE,
            microvm::PoolMode::Restored,
            move || {
                let n = daemon.upgrade().map_or_else(rand::random::<u32>, |d| {
                    d.next_id.fetch_add(1, Ordering::Relaxed) as u32
                });
                format!("{name}-{n}")
            },
        ))
    }

    /// Clones a `vm` template `count` times from its pool.
    async fn create_vm_clones(
        self: &Arc<Self>,
        name: &str,
        pool: &Arc<microvm::Pool>,
        count: usize,
        requested: Instant,
    ) -> Result<CloneList, CloneError> {
        let max = self.config.max_clones;
        {
            let clones = self.clones();
            let live_count = clones.values().filter(|r| live(r.info.state)).count();
            if live_count + count > max {
                return Err(CloneError::Capacity {
                    count,
                    live: live_count,
                    max,
                });
            }
        }
        let mut starts = JoinSet::new();
        for _ in 0..count {
            let pool = Arc::clone(pool);
            starts.spawn(async move { pool.clone_vm().await });
        }
        let mut infos = Vec::with_capacity(count);
        while let Some(joined) = starts.join_next().await {
            match joined {
                Ok(Ok(vm)) => {
                    let info = CloneInfo {
                        id: vm.id().to_owned(),
                        template: name.to_owned(),
                        driver: Driver::Vm,
                        addr: vm.addr(),
                        pid: vm.pid(),
                        state: CloneState::Ready,
                        ready: true,
                        exit: None,
                        error: None,
                    };
                    let id = info.id.clone();
                    let handle: VmHandle = Arc::new(tokio::sync::Mutex::new(Some(vm)));
                    {
                        let mut clones = self.clones();
                        clones.insert(
                            id.clone(),
                            CloneRecord {
                                info: info.clone(),
                                process: None,
                                vm: Some(Arc::clone(&handle)),
                            },
                        );
                        self.update_live_gauge(&clones);
                    }
                    self.watch_vm(id, handle);
                    self.metrics
                        .clone_duration
                        .with_label_values(&[Driver::Vm.as_str()])
                        .observe(requested.elapsed().as_secs_f64());
                    self.metrics
                        .clones
                        .with_label_values(&[Driver::Vm.as_str(), "ready"])
                        .inc();
                    infos.push(info);
                }
                Ok(Err(e)) => {
                    tracing::warn!(template = name, error = %e, "vm clone failed");
                    self.metrics
                        .clones
                        .with_label_values(&[Driver::Vm.as_str(), "failed"])
                        .inc();
                    let unknown = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                    infos.push(failed_info(name, name, Driver::Vm, unknown, &e.to_string()));
                }
                Err(e) => tracing::error!(template = name, error = %e, "vm clone task failed"),
            }
        }
        if !infos.is_empty() && infos.iter().all(|c| c.state == CloneState::Failed) {
            return Err(CloneError::AllFailed(
                infos[0].error.clone().unwrap_or_default(),
            ));
        }
        Ok(CloneList { clones: infos })
    }

    /// Notices a microVM clone whose QEMU exited on its own (the guest crashed or powered off).
    fn watch_vm(self: &Arc<Self>, id: String, handle: VmHandle) {
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let exited = match handle.lock().await.as_mut() {
                    None => return, // killed on request
                    Some(vm) => vm.has_exited(),
                };
                if exited {
                    if let Some(daemon) = daemon.upgrade() {
                        daemon.clone_gone(&id, Some(ExitStatus::Unknown));
                    }
                    return;
                }
            }
        });
    }

    /// Records that a clone's process is gone; `status` when known. Idempotent: a `fork`
    /// clone is reported twice (its pidfd, then its template's `exited` message).
    fn clone_gone(&self, id: &str, status: Option<ExitStatus>) {
        let mut clones = self.clones();
        let Some(record) = clones.get_mut(id) else {
            return;
        };
        if let Some(status) = status {
            record.info.exit = Some(status);
        }
        match record.info.state {
            CloneState::Starting | CloneState::Ready => {
                record.info.state = CloneState::Exited;
                record.info.ready = false;
                let cause = match record.info.exit {
                    Some(ExitStatus::Code(0)) => "exited",
                    _ => "crashed",
                };
                tracing::warn!(clone = %id, exit = ?record.info.exit, "clone exited on its own");
                self.metrics
                    .exits
                    .with_label_values(&[record.info.driver.as_str(), cause])
                    .inc();
                self.update_live_gauge(&clones);
            }
            _ => {}
        }
    }

    pub(crate) fn clone_list(&self) -> CloneList {
        let mut clones: Vec<CloneInfo> = self.clones().values().map(|r| r.info.clone()).collect();
        clones.sort_by(|a, b| {
            a.template
                .cmp(&b.template)
                .then(id_number(&a.id).cmp(&id_number(&b.id)))
        });
        CloneList { clones }
    }

    /// Kills a clone (SIGTERM, then SIGKILL after the grace period) and forgets it. A clone
    /// that already exited is just forgotten.
    pub(crate) async fn kill(&self, id: &str) -> Result<(), KillError> {
        let (process, driver) = {
            let mut clones = self.clones();
            let record = clones
                .get_mut(id)
                .ok_or_else(|| KillError::NotFound(id.to_owned()))?;
            match record.info.state {
                CloneState::Starting => return Err(KillError::Starting(id.to_owned())),
                CloneState::Exited | CloneState::Failed => {
                    clones.remove(id);
                    return Ok(());
                }
                CloneState::Ready | CloneState::Stopping => {}
            }
            record.info.state = CloneState::Stopping;
            record.info.ready = false;
            (
                (record.process.clone(), record.vm.clone()),
                record.info.driver,
            )
        };
        let (process, vm) = process;
        if let Some(process) = process {
            process.terminate(self.config.kill_grace).await;
        }
        if let Some(vm) = vm {
            let taken = vm.lock().await.take();
            if let Some(vm) = taken {
                vm.kill().await;
            }
        }
        let mut clones = self.clones();
        if clones.remove(id).is_some() {
            self.metrics
                .exits
                .with_label_values(&[driver.as_str(), "killed"])
                .inc();
        }
        self.update_live_gauge(&clones);
        Ok(())
    }

    /// Kills every clone and stops every template: what SIGTERM does to the daemon.
    pub(crate) async fn shut_down(self: &Arc<Self>) {
        let ids: Vec<String> = self.clones().keys().cloned().collect();
        self.kill_all(ids).await;
        let names: Vec<String> = self.templates().keys().cloned().collect();
        for name in names {
            let _ = self.delete_template(&name).await;
        }
    }
}

fn id_number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    }
}

fn failed_info(
    id: &str,
    template: &str,
    driver: Driver,
    addr: SocketAddr,
    reason: &str,
) -> CloneInfo {
    CloneInfo {
        id: id.to_owned(),
        template: template.to_owned(),
        driver,
        addr,
        pid: None,
        state: CloneState::Failed,
        ready: false,
        exit: None,
        error: Some(reason.to_owned()),
    }
}
