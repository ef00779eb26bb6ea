//! The driver seam: how a template is started, and how clones are made from it, killed and
//! waited for, behind the one small interface the daemon calls. Each driver has a module:
//!
//! * [`spawn`]: the command started afresh for each clone (a cold start: the baseline);
//! * [`fork`]: the command started once as a zygote, each clone forked from it warm;
//! * [`vm`]: the command booted in a microVM and snapshotted, each clone restored from it.
//!
//! The daemon ([`crate::daemon`]) keeps the maps, validates requests and reserves capacity;
//! a driver only starts and stops processes. A clone is made in two steps, so that it is
//! listed (`starting`) and counted while it starts: [`TemplateKind::place_clone`] says where
//! it will serve (a `spawn` or `fork` clone gets its id and socket from forkd before it
//! starts; a `vm` clone's standby QEMU has both already), then [`TemplateKind::start_clone`]
//! starts it and hands back a [`CloneHandle`], to kill it or to wait for its end.
//!
//! Every clone's end is learnt from the kernel, never by polling: `spawn` clones are our
//! children (`wait`), `fork` clones are watched through a pidfd and their template reports
//! how they ended, and `vm` clones' QEMU processes are our children too, awaited through
//! [`microvm::VmClone::exited`].

pub(crate) mod fork;
pub(crate) mod seed;
pub(crate) mod spawn;
pub(crate) mod vm;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kernel::Pidfd;
use tokio::sync::watch;

use crate::api::{Driver, ExitStatus, TemplateSpec};
use crate::config::Config;

/// Numbers for clone ids (`<template>-<n>`) and vm image directories, unique on this daemon.
/// One counter for every driver: the vm pool names its standby QEMUs with it too, so the id
/// a guest learns when its QEMU starts is the one the API reports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ids(Arc<AtomicU64>);

impl Ids {
    /// The next number, from 1.
    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A new clone id for `template`.
    pub(crate) fn clone_id(&self, template: &str) -> String {
        format!("{template}-{}", self.next())
    }
}

/// A warm template, as its driver keeps it.
pub(crate) enum TemplateKind {
    /// Nothing runs until a clone is asked for.
    Spawn,
    /// The template process, warm, waiting to fork.
    Fork(fork::Zygote),
    /// The snapshot of the warm guest and its pool of standby QEMUs.
    Vm(vm::VmTemplate),
}

/// Why a template could not be started (the driver's own error, whole).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartTemplateError {
    #[error(transparent)]
    Fork(#[from] fork::StartError),
    #[error(transparent)]
    Vm(#[from] vm::TemplateError),
}

/// Where a clone will serve, decided before it starts.
#[derive(Debug)]
pub(crate) enum Placement {
    /// A `spawn` clone: a free port it binds itself.
    Port { id: String, addr: SocketAddr },
    /// A `fork` clone: its listening socket, bound by forkd and handed to the template, so
    /// connections made as soon as the clone is listed wait in its backlog.
    Listener {
        id: String,
        addr: SocketAddr,
        listener: TcpListener,
    },
    /// A `vm` clone: the pool's standby QEMU has its id and port already.
    Pool,
}

impl Placement {
    /// The clone's id and address, when known before it starts.
    pub(crate) fn known(&self) -> Option<(&str, SocketAddr)> {
        match self {
            Placement::Port { id, addr } | Placement::Listener { id, addr, .. } => {
                Some((id, *addr))
            }
            Placement::Pool => None,
        }
    }
}

/// A clone that started: ready to serve on `addr`.
pub(crate) struct Started {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    pub(crate) handle: CloneHandle,
}

/// Why one clone could not be started (the driver's own error, whole).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartCloneError {
    #[error(transparent)]
    Spawn(#[from] spawn::CloneError),
    #[error(transparent)]
    Fork(#[from] fork::CloneError),
    #[error(transparent)]
    Vm(#[from] vm::CloneError),
    /// The daemon placed the clone for another driver: a bug, reported rather than panicked.
    #[error("a {driver} template was given a clone placed for another driver")]
    Misplaced { driver: &'static str },
}

impl TemplateKind {
    /// Starts (and warms) a template for `spec`, which the daemon has validated.
    pub(crate) async fn start(
        spec: &TemplateSpec,
        config: &Config,
        ids: &Ids,
        lifeline: Option<BorrowedFd<'_>>,
    ) -> Result<TemplateKind, StartTemplateError> {
        Ok(match spec.driver {
            Driver::Spawn => TemplateKind::Spawn,
            Driver::Fork => {
                TemplateKind::Fork(fork::Zygote::start(spec, &config.runtime_dir, lifeline).await?)
            }
            Driver::Vm => TemplateKind::Vm(vm::VmTemplate::start(spec, config, ids).await?),
        })
    }

    pub(crate) fn driver(&self) -> Driver {
        match self {
            TemplateKind::Spawn => Driver::Spawn,
            TemplateKind::Fork(_) => Driver::Fork,
            TemplateKind::Vm(_) => Driver::Vm,
        }
    }

    /// The bytes of the peer's snapshot a `vm` template was made from, if it was.
    pub(crate) fn received_bytes(&self) -> Option<u64> {
        match self {
            TemplateKind::Vm(vm) => vm.received_bytes(),
            TemplateKind::Spawn | TemplateKind::Fork(_) => None,
        }
    }

    /// The warm template process (`fork` only).
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            TemplateKind::Fork(zygote) => zygote.pid(),
            TemplateKind::Spawn | TemplateKind::Vm(_) => None,
        }
    }

    /// Whether it can still make clones (a `fork` template whose process died cannot).
    pub(crate) fn alive(&self) -> bool {
        match self {
            TemplateKind::Fork(zygote) => zygote.alive(),
            TemplateKind::Spawn | TemplateKind::Vm(_) => true,
        }
    }

    /// Waits until a template process ends: `true` if it ended on its own, `false` if forkd
    /// stopped it or the driver has no template process (`spawn`; a `vm` template is a
    /// snapshot on disk, and a clone starts a QEMU when no standby is ready), at once.
    pub(crate) async fn died(&self) -> bool {
        match self {
            TemplateKind::Fork(zygote) => zygote.died().await,
            TemplateKind::Spawn | TemplateKind::Vm(_) => false,
        }
    }

    /// Where the next clone will serve, on `ip`; `id` names it when its driver lets forkd
    /// choose. Binds a socket (`fork`, and briefly `spawn` to find a free port).
    pub(crate) fn place_clone(
        &self,
        ip: IpAddr,
        id: impl FnOnce() -> String,
    ) -> io::Result<Placement> {
        Ok(match self {
            TemplateKind::Spawn => Placement::Port {
                addr: spawn::free_port(ip)?,
                id: id(),
            },
            TemplateKind::Fork(_) => {
                let listener = TcpListener::bind((ip, 0))?;
                Placement::Listener {
                    addr: listener.local_addr()?,
                    id: id(),
                    listener,
                }
            }
            TemplateKind::Vm(_) => Placement::Pool,
        })
    }

    /// Starts one clone where [`TemplateKind::place_clone`] placed it; returns once it is
    /// ready or has failed (and is gone).
    ///
    /// Call from a task on a runtime worker thread: a process started here gets SIGKILL when
    /// the thread that started it exits (see [`kernel::die_with_parent`]).
    pub(crate) async fn start_clone(
        &self,
        spec: &TemplateSpec,
        placement: Placement,
    ) -> Result<Started, StartCloneError> {
        match (self, placement) {
            (TemplateKind::Spawn, Placement::Port { id, addr }) => {
                let process = spawn::start_clone(spec, &id, addr).await?;
                Ok(Started {
                    id,
                    addr,
                    handle: CloneHandle::Process(process),
                })
            }
            (TemplateKind::Fork(zygote), Placement::Listener { id, addr, listener }) => {
                let timeout = Duration::from_millis(spec.start_timeout_ms);
                let process = fork::start_clone(zygote, &id, listener, timeout).await?;
                Ok(Started {
                    id,
                    addr,
                    handle: CloneHandle::Process(process),
                })
            }
            (TemplateKind::Vm(template), Placement::Pool) => Ok(template.start_clone().await?),
            (kind, _) => Err(StartCloneError::Misplaced {
                driver: kind.driver().as_str(),
            }),
        }
    }

    /// Stops the template (a `fork` template's process, a `vm` template's pool and image);
    /// returns once it has. Its clones are the daemon's to kill first.
    pub(crate) async fn stop(&self) {
        match self {
            TemplateKind::Spawn => {}
            TemplateKind::Fork(zygote) => zygote.stop().await,
            TemplateKind::Vm(template) => template.stop().await,
        }
    }
}

/// A running clone, as far as killing it and learning of its end go.
pub(crate) enum CloneHandle {
    /// A `spawn` or `fork` clone: one process.
    Process(Process),
    /// A `vm` clone: its QEMU.
    Vm(vm::RunningClone),
}

impl CloneHandle {
    /// Its process id (QEMU's for a `vm` clone), if known.
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            CloneHandle::Process(process) => Some(process.pidfd.pid()),
            CloneHandle::Vm(vm) => vm.pid(),
        }
    }

    /// Kills it (a process gets SIGTERM, then SIGKILL after `grace`; a QEMU is killed at
    /// once) and returns once it is gone.
    pub(crate) async fn kill(&self, grace: Duration) {
        match self {
            CloneHandle::Process(process) => process.terminate(grace).await,
            CloneHandle::Vm(vm) => vm.kill().await,
        }
    }

    /// Returns how it ended, once it has and that is known.
    pub(crate) async fn ended(&self) -> ExitStatus {
        match self {
            CloneHandle::Process(process) => process.life.ended().await,
            CloneHandle::Vm(vm) => vm.ended().await,
        }
    }
}

/// How far a clone's process is through its end. The driver's task that watches the process
/// moves it forward; `Gone` comes first only where the exit status arrives later (a `fork`
/// clone's, from its template).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    Running,
    /// The process no longer exists; how it ended is not known yet.
    Gone,
    /// It ended, like this.
    Ended(ExitStatus),
}

/// The receiving side of a clone's [`Life`]. If the watching task goes away without saying
/// (the runtime is shutting down), the process counts as ended, how unknown: the task owned
/// what kept the process alive.
#[derive(Debug, Clone)]
pub(crate) struct Lifeline(watch::Receiver<Life>);

impl Lifeline {
    /// A lifeline, and the sender the watching task keeps.
    pub(crate) fn new() -> (watch::Sender<Life>, Lifeline) {
        let (sender, receiver) = watch::channel(Life::Running);
        (sender, Lifeline(receiver))
    }

    /// Returns once the process is gone.
    pub(crate) async fn gone(&self) {
        let mut life = self.0.clone();
        let _ = life.wait_for(|life| *life != Life::Running).await;
    }

    /// Returns how the process ended, once that is known.
    pub(crate) async fn ended(&self) -> ExitStatus {
        let mut life = self.0.clone();
        match life.wait_for(|life| matches!(life, Life::Ended(_))).await {
            Ok(life) => match *life {
                Life::Ended(status) => status,
                Life::Running | Life::Gone => ExitStatus::Unknown,
            },
            Err(_) => ExitStatus::Unknown,
        }
    }
}

/// A clone that is one process (`spawn`, `fork`): signalled through its pidfd, so a reused
/// pid can never be hit.
pub(crate) struct Process {
    pidfd: Arc<Pidfd>,
    life: Lifeline,
}

impl Process {
    pub(crate) fn new(pidfd: Arc<Pidfd>, life: Lifeline) -> Process {
        Process { pidfd, life }
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`; returns once it is gone.
    async fn terminate(&self, grace: Duration) {
        // Sending fails only for a process that is gone already, which is what we want.
        let _ = self.pidfd.send_signal(libc::SIGTERM);
        if tokio::time::timeout(grace, self.life.gone()).await.is_err() {
            let _ = self.pidfd.send_signal(libc::SIGKILL);
            self.life.gone().await;
        }
    }
}

/// How a child process ended, as the API reports it.
pub(crate) fn exit_status(status: io::Result<std::process::ExitStatus>) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match status.map(|s| (s.code(), s.signal())) {
        Ok((Some(code), _)) => ExitStatus::Code(code),
        Ok((None, Some(signal))) => ExitStatus::Signal(signal),
        _ => ExitStatus::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lifeline_says_gone_before_ended_and_unknown_when_its_watcher_vanishes() {
        let (sender, life) = Lifeline::new();
        let gone = tokio::spawn({
            let life = life.clone();
            async move { life.gone().await }
        });
        let ended = tokio::spawn({
            let life = life.clone();
            async move { life.ended().await }
        });
        tokio::task::yield_now().await;
        assert!(!gone.is_finished() && !ended.is_finished());
        sender.send_replace(Life::Gone);
        gone.await.unwrap();
        tokio::task::yield_now().await;
        assert!(
            !ended.is_finished(),
            "gone is not ended: the status may follow"
        );
        sender.send_replace(Life::Ended(ExitStatus::Signal(9)));
        assert_eq!(ended.await.unwrap(), ExitStatus::Signal(9));

        let (sender, life) = Lifeline::new();
        drop(sender);
        life.gone().await;
        assert_eq!(life.ended().await, ExitStatus::Unknown);
    }

    #[test]
    fn ids_count_from_one_and_are_shared_by_clones_of_the_counter() {
        let ids = Ids::default();
        let shared = ids.clone();
        assert_eq!(ids.clone_id("web"), "web-1");
        assert_eq!(shared.clone_id("api"), "api-2");
        assert_eq!(ids.next(), 3);
    }

    #[test]
    fn exit_statuses_are_codes_or_signals() {
        use std::os::unix::process::ExitStatusExt;
        let code = std::process::ExitStatus::from_raw(3 << 8);
        let signal = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_status(Ok(code)), ExitStatus::Code(3));
        assert_eq!(exit_status(Ok(signal)), ExitStatus::Signal(9));
        assert_eq!(exit_status(Err(io::Error::other("x"))), ExitStatus::Unknown);
    }

    #[tokio::test]
    async fn a_clone_placed_for_one_driver_is_refused_by_another() {
        let placement = TemplateKind::Spawn
            .place_clone(IpAddr::from([127, 0, 0, 1]), || "web-1".to_owned())
            .unwrap();
        assert_eq!(placement.known().map(|(id, _)| id), Some("web-1"));
        let spec = TemplateSpec::new("web", Driver::Spawn, vec!["x".into()]);
        // A spawn template takes a port, never a place in a vm pool.
        let error = TemplateKind::Spawn
            .start_clone(&spec, Placement::Pool)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(error, StartCloneError::Misplaced { driver: "spawn" }),
            "{error}"
        );
    }
}
