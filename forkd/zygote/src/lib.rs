//! The app side of forkd's zygote protocol: link this crate to make a server forkable.
//!
//! Two calls. [`warm_up`] runs the expensive start-up (loading models, building caches) while
//! the process is still single-threaded. [`Warm::serve`] then hands a listener to the app's
//! serve function. Started by forkd (with `SQUALL_ZYGOTE` set), the process becomes a template:
//! it tells forkd it is ready and forks one child per clone request, each of which returns from
//! `serve` with the listening socket forkd bound for it, its clone id, and freshly seeded
//! randomness. Started any other way, `serve` binds a plain listener and runs the app once.
//!
//! ```no_run
//! let warm = zygote::warm_up(|| vec![0u64; 1 << 20])?; // build the cache, single-threaded
//! warm.serve("127.0.0.1:8080".parse()?, |worker| {
//!     // Only now start threads: build the runtime and serve on `worker.listener`.
//!     let _ = (worker.state.len(), worker.listener, worker.clone_id);
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The wire protocol is specified in `PROTOCOL.md` for apps in other languages.
#![forbid(unsafe_code)]

pub mod protocol;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use kernel::{Forked, Pidfd};
use protocol::{FromTemplate, LIFELINE_ENV, MAX_MESSAGE, SOCKET_ENV, ToTemplate};

/// What can go wrong while becoming or running as a zygote.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The process has more than one thread, so forking it would not be safe.
    #[error("the process has {threads} threads; a zygote must stay single-threaded until it forks")]
    Threaded {
        /// How many threads it has.
        threads: usize,
    },
    /// Counting the process's threads failed.
    #[error("could not count this process's threads in /proc/self/task")]
    CountThreads(#[source] io::Error),
    /// `SQUALL_ZYGOTE` names a socket we could not connect to.
    #[error("could not connect to forkd's zygote socket {path}")]
    Connect {
        /// The socket path from the environment.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Talking to forkd over the zygote socket failed.
    #[error("zygote socket I/O failed")]
    Socket(#[source] io::Error),
    /// `SQUALL_ZYGOTE_LIFELINE` names no descriptor this process inherited as a pipe.
    #[error("SQUALL_ZYGOTE_LIFELINE={value:?} is not an inherited pipe")]
    Lifeline {
        /// The variable's value.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Plain mode: binding the app's own listener failed.
    #[error("could not bind {addr}")]
    Bind {
        /// The address the app asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How many threads this process has.
pub fn thread_count() -> Result<usize, ZygoteError> {
    kernel::thread_count().map_err(ZygoteError::CountThreads)
}

fn ensure_single_threaded() -> Result<(), ZygoteError> {
    match thread_count()? {
        1 => Ok(()),
        threads => Err(ZygoteError::Threaded { threads }),
    }
}

/// A warmed-up app, not yet serving: the result of [`warm_up`].
#[derive(Debug)]
pub struct Warm<T> {
    state: T,
    socket: Option<PathBuf>,
}

/// One serving process: a forked clone, or the app itself in plain mode.
#[derive(Debug)]
pub struct Worker<T> {
    /// What the warm-up built, shared copy-on-write with the template and its other clones.
    pub state: T,
    /// The listening socket to serve on (blocking; set it non-blocking for an async runtime).
    pub listener: TcpListener,
    /// The clone id forkd gave this clone; `None` in plain mode.
    pub clone_id: Option<String>,
}

/// Call 1: runs `build` (the app's warm-up) and checks that it left the process
/// single-threaded, as forking requires. Start no threads, runtimes or thread pools before
/// [`Warm::serve`].
pub fn warm_up<T>(build: impl FnOnce() -> T) -> Result<Warm<T>, ZygoteError> {
    let socket = std::env::var_os(SOCKET_ENV).map(PathBuf::from);
    if socket.is_some() {
        ensure_single_threaded()?;
    }
    let state = build();
    if socket.is_some() {
        ensure_single_threaded()?;
    }
    Ok(Warm { state, socket })
}

impl<T> Warm<T> {
    /// Whether forkd started this process as a template.
    pub fn is_zygote(&self) -> bool {
        self.socket.is_some()
    }

    /// Call 2: serves. As a template, this reports ready to forkd and forks a child per clone
    /// request; `run` is called in each child with its listener and clone id, and `serve`
    /// returns `run`'s result there. In the template itself `serve` never returns: when forkd
    /// closes the socket (or dies) it kills its clones, reaps them and exits the process.
    /// In plain mode it binds `plain_addr` and calls `run` once.
    pub fn serve<R>(
        self,
        plain_addr: SocketAddr,
        run: impl FnOnce(Worker<T>) -> R,
    ) -> Result<R, ZygoteError> {
        let Some(path) = self.socket else {
            let listener = TcpListener::bind(plain_addr).map_err(|source| ZygoteError::Bind {
                addr: plain_addr,
                source,
            })?;
            return Ok(run(Worker {
                state: self.state,
                listener,
                clone_id: None,
            }));
        };
        let lifeline = inherited_lifeline()?;
        let socket = kernel::seqpacket_connect(&path)
            .map_err(|source| ZygoteError::Connect { path, source })?;
        let (clone_id, listener) = Template::new(socket, lifeline).run()?;
        Ok(run(Worker {
            state: self.state,
            listener: TcpListener::from(listener),
            clone_id: Some(clone_id),
        }))
    }
}

/// A clone forked by this template and not yet reaped.
struct Child {
    id: String,
    pidfd: Pidfd,
}

/// The template's side of the protocol: a single-threaded poll loop over the socket to forkd
/// and one pidfd per live clone.
struct Template {
    socket: OwnedFd,
    children: Vec<Child>,
    pid: u32,
    /// forkd's lifeline, when forkd gave one: clones watch it instead of dying with us.
    lifeline: Option<OwnedFd>,
}

/// forkd's lifeline, if `SQUALL_ZYGOTE_LIFELINE` names one.
fn inherited_lifeline() -> Result<Option<OwnedFd>, ZygoteError> {
    let Some(value) = std::env::var_os(LIFELINE_ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy().into_owned();
    let lifeline = value
        .parse::<i32>()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a descriptor number"))
        .and_then(|fd| {
            if fd < 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative"));
            }
            kernel::adopt_inherited_pipe(fd)
        });
    match lifeline {
        Ok(lifeline) => Ok(Some(lifeline)),
        Err(source) => Err(ZygoteError::Lifeline { value, source }),
    }
}

impl Template {
    fn new(socket: OwnedFd, lifeline: Option<OwnedFd>) -> Template {
        Template {
            socket,
            children: Vec::new(),
            pid: std::process::id(),
            lifeline,
        }
    }

    /// Sends a message to forkd. If forkd has closed its end (it is shutting down, and the
    /// message was, say, the exit of a clone it killed), the template shuts down as it does
    /// when it reads the end of the socket: there is nobody left to tell.
    fn send(&mut self, message: &FromTemplate) -> Result<(), ZygoteError> {
        match kernel::send_message(self.socket.as_fd(), message.encode().as_bytes(), None) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                self.shut_down()
            }
            sent => sent.map_err(ZygoteError::Socket),
        }
    }

    /// Runs the template loop; returns only in a freshly forked child, with its clone id and
    /// listening socket.
    fn run(mut self) -> Result<(String, OwnedFd), ZygoteError> {
        self.send(&FromTemplate::Ready)?;
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let ready = {
                let mut fds: Vec<BorrowedFd<'_>> = vec![self.socket.as_fd()];
                fds.extend(self.children.iter().map(|c| c.pidfd.as_fd()));
                kernel::poll_readable(&fds).map_err(ZygoteError::Socket)?
            };
            // Reap first, in reverse so removal keeps the other indices valid.
            for index in (0..self.children.len()).rev() {
                if ready[index + 1] {
                    self.reap(index)?;
                }
            }
            if !ready[0] {
                continue;
            }
            let (len, fd) = match kernel::recv_message(self.socket.as_fd(), &mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ZygoteError::Socket(e)),
            };
            if len == 0 {
                self.shut_down();
            }
            let ToTemplate::Clone { id } = match ToTemplate::parse(&buf[..len]) {
                Ok(message) => message,
                // A message we do not understand cannot be answered by id; forkd will time out.
                Err(_) => continue,
            };
            let Some(listener) = fd else {
                let reason = "no listening socket attached".to_owned();
                self.send(&FromTemplate::Failed { id, reason })?;
                continue;
            };
            if let Err(e) = ensure_single_threaded() {
                self.send(&FromTemplate::Failed {
                    id,
                    reason: e.to_string(),
                })?;
                continue;
            }
            match kernel::fork() {
                Ok(Forked::Child) => return Ok((id, self.become_clone(listener))),
                Ok(Forked::Parent(pid)) => {
                    drop(listener);
                    match Pidfd::open(pid) {
                        Ok(pidfd) => {
                            self.children.push(Child {
                                id: id.clone(),
                                pidfd,
                            });
                            self.send(&FromTemplate::Forked { id, pid })?;
                        }
                        Err(e) => {
                            // Without a pidfd we cannot track it: refuse it outright.
                            // SIGKILL through a plain pid is safe here: the child is unreaped.
                            let _ = kernel::kill_child(pid, libc::SIGKILL);
                            while let Ok(None) = kernel::try_reap(pid) {
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                            self.send(&FromTemplate::Failed {
                                id,
                                reason: format!("pidfd_open: {e}"),
                            })?;
                        }
                    }
                }
                Err(e) => self.send(&FromTemplate::Failed {
                    id,
                    reason: format!("fork: {e}"),
                })?,
            }
        }
    }

    /// In the child right after the fork: drops the template's resources and makes sure the
    /// clone dies with forkd (watching its lifeline), or else with its template.
    fn become_clone(mut self, listener: OwnedFd) -> OwnedFd {
        let template = self.pid;
        let lifeline = self.lifeline.take();
        drop(self); // closes our copy of forkd's socket and of the siblings' pidfds
        // Keeps the clone's own children from mistaking themselves for templates. The
        // process is single-threaded (checked before the fork), so this cannot fail.
        let _ = kernel::remove_env_var_single_threaded(SOCKET_ENV);
        let _ = kernel::remove_env_var_single_threaded(LIFELINE_ENV);
        let bound = match lifeline {
            // A thread from here on: the process is a clone, free to start them.
            Some(lifeline) => kernel::die_when_closed(lifeline).is_ok(),
            None => {
                kernel::set_parent_death_signal(libc::SIGKILL).is_ok()
                    && std::os::unix::process::parent_id() == template
            }
        };
        if !bound {
            // The template died before we could arrange to die with it, or the thread that
            // watches forkd's lifeline could not start.
            std::process::exit(1);
        }
        // The child shares its parent's random state: reseed so that clones do not produce the
        // same "random" numbers. Failure leaves the copied state, which is still a CSPRNG.
        let _ = rand::rng().reseed();
        listener
    }

    fn reap(&mut self, index: usize) -> Result<(), ZygoteError> {
        let pid = self.children[index].pidfd.pid();
        match kernel::try_reap(pid) {
            Ok(Some(exit)) => {
                let child = self.children.swap_remove(index);
                self.send(&FromTemplate::Exited { id: child.id, exit })
            }
            Ok(None) => Ok(()),
            Err(e) => Err(ZygoteError::Socket(e)),
        }
    }

    /// forkd closed the socket: kill every clone, reap them, and exit.
    fn shut_down(&mut self) -> ! {
        for child in &self.children {
            let _ = child.pidfd.send_signal(libc::SIGKILL);
        }
        for child in &self.children {
            while let Ok(None) = kernel::try_reap(child.pidfd.pid()) {
                let _ = kernel::poll_readable(&[child.pidfd.as_fd()]);
            }
        }
        std::process::exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_mode_binds_the_address_and_runs_once() {
        assert!(
            std::env::var_os(SOCKET_ENV).is_none(),
            "tests must not run under forkd"
        );
        let warm = warm_up(|| vec![7u8; 1024]).unwrap();
        assert!(!warm.is_zygote());
        let (len, id, addr) = warm
            .serve("127.0.0.1:0".parse().unwrap(), |worker| {
                (
                    worker.state.len(),
                    worker.clone_id,
                    worker.listener.local_addr().unwrap(),
                )
            })
            .unwrap();
        assert_eq!((len, id), (1024, None));
        assert!(addr.ip().is_loopback() && addr.port() != 0);
    }

    #[test]
    fn threads_are_counted() {
        let before = thread_count().unwrap();
        assert!(before >= 1);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || stopped.recv());
        assert!(thread_count().unwrap() >= 2);
        assert!(
            matches!(ensure_single_threaded(), Err(ZygoteError::Threaded { threads }) if threads >= 2)
        );
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }
}
