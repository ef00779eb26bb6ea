//! The `fork` driver, forkd's side of the zygote protocol (`forkd/zygote/PROTOCOL.md`).
//!
//! forkd listens on a fresh `SOCK_SEQPACKET` socket in a private directory, starts the template
//! command with `SQUALL_ZYGOTE` naming it, and waits for the app to connect and say `ready`.
//! Then one task owns the connection: it sends each clone request with its listening socket
//! attached, matches `forked`/`failed` answers to the waiting requests by clone id, and hands
//! each `exited` report to the clone it is about. When the [`Zygote`] is stopped (or dropped)
//! the task ends the connection in order (it shuts down its sending half and reads until the
//! template closes), which tells the template to kill its clones and exit.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kernel::Pidfd;
use lifecycle::{Shutdown, Stop};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use zygote::protocol::{
    FromTemplate, LIFELINE_ENV, MAX_MESSAGE, ProtocolError, SOCKET_ENV, ToTemplate,
};

use super::{Life, Lifeline, Process};
use crate::api::{ExitStatus, TemplateSpec};

/// How long a template whose connection closed has to reap its clones and exit before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Why a `fork` template could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("could not create the zygote socket in {dir}")]
    Socket {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not start {program:?}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("the template exited before it was ready ({status})")]
    Exited { status: std::process::ExitStatus },
    #[error("waiting for the template failed")]
    Wait(#[source] io::Error),
    #[error("the template was not ready within {0:?}")]
    Timeout(Duration),
    #[error("accepting the template's connection failed")]
    Accept(#[source] io::Error),
    #[error("the template broke the zygote protocol")]
    Receive(#[source] ReceiveError),
    #[error("the template broke the zygote protocol: expected `ready`, got `{got}`")]
    NotReady { got: String },
    #[error("the template closed the zygote socket before `ready`")]
    Closed,
}

/// Why a message could not be received from the template.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiveError {
    #[error("reading the zygote socket failed")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Why a `fork` clone could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneError {
    #[error("the template process has exited")]
    TemplateExited,
    #[error("sending the clone request to the template failed")]
    Send(#[source] io::Error),
    #[error("the template could not fork the clone: {reason}")]
    Refused { reason: String },
    #[error("the template did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the clone exited at once")]
    ExitedAtOnce(#[source] io::Error),
    #[error("watching the clone failed")]
    Watch(#[source] io::Error),
}

/// What the template answered for one clone: its pid, and how it ends when it does (the
/// sender is dropped if the template goes away first).
struct Forked {
    pid: u32,
    exit: oneshot::Receiver<ExitStatus>,
}

struct Request {
    id: String,
    listener: TcpListener,
    reply: oneshot::Sender<Result<Forked, CloneError>>,
}

/// A running, warm template process.
pub(crate) struct Zygote {
    requests: mpsc::Sender<Request>,
    pid: Option<u32>,
    stop: Stop,
    /// The connection's task; taken by [`Zygote::stop`] to wait for it.
    task: Mutex<Option<JoinHandle<()>>>,
    /// Turns `true` once the template has ended on its own (crashed, killed, or closed its
    /// socket) and been reaped; the sender is dropped without it when forkd stopped it.
    died: watch::Receiver<bool>,
}

/// Removes the private socket directory when dropped, whether start-up worked or not.
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn socket_dir(runtime_dir: &Path, name: &str) -> io::Result<SocketDir> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = runtime_dir.join(format!(
        "squall-forkd-{}-{name}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(SocketDir(dir))
}

impl Zygote {
    /// Starts the template and waits until it reports ready.
    ///
    /// Call from a task on a runtime worker thread: the template gets SIGKILL when the thread
    /// that started it exits (see [`kernel::die_with_parent`]).
    pub(crate) async fn start(
        spec: &TemplateSpec,
        runtime_dir: &Path,
        lifeline: Option<BorrowedFd<'_>>,
    ) -> Result<Zygote, StartError> {
        let dir = socket_dir(runtime_dir, &spec.name).map_err(|source| StartError::Socket {
            dir: runtime_dir.to_owned(),
            source,
        })?;
        let path = dir.0.join("zygote.sock");
        let listener = kernel::seqpacket_listen(&path, true)
            .and_then(kernel::async_fd)
            .map_err(|source| StartError::Socket {
                dir: dir.0.clone(),
                source,
            })?;

        let mut command = std::process::Command::new(&spec.command[0]);
        command
            .args(&spec.command[1..])
            .envs(&spec.env)
            .env(SOCKET_ENV, &path)
            .stdin(Stdio::null());
        if let Some(lifeline) = lifeline {
            // The template passes it on to its clones, which die when it closes.
            let fd = lifeline.as_raw_fd();
            kernel::inherit_fd(&mut command, fd);
            command.env(LIFELINE_ENV, fd.to_string());
        }
        kernel::die_with_parent(&mut command);
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StartError::Spawn {
                program: spec.command[0].clone(),
                source,
            })?;

        let timeout = Duration::from_millis(spec.start_timeout_ms);
        let handshake = async {
            let conn = loop {
                let mut guard = listener.readable().await.map_err(StartError::Accept)?;
                match guard.try_io(|l| kernel::accept(l.as_fd())) {
                    Ok(accepted) => break accepted.map_err(StartError::Accept)?,
                    Err(_would_block) => continue,
                }
            };
            let conn = kernel::async_fd(conn).map_err(StartError::Accept)?;
            let mut buf = [0u8; MAX_MESSAGE];
            match receive(&conn, &mut buf)
                .await
                .map_err(StartError::Receive)?
            {
                Some(FromTemplate::Ready) => Ok(conn),
                Some(other) => Err(StartError::NotReady {
                    got: other.encode(),
                }),
                None => Err(StartError::Closed),
            }
        };
        let conn = tokio::select! {
            conn = handshake => conn?,
            status = child.wait() => {
                return Err(match status {
                    Ok(status) => StartError::Exited { status },
                    Err(source) => StartError::Wait(source),
                });
            }
            () = tokio::time::sleep(timeout) => return Err(StartError::Timeout(timeout)),
        };
        drop(listener);
        drop(dir); // the connection is made: nobody needs the socket's name any more

        let pid = child.id();
        let (requests, receiver) = mpsc::channel(1024);
        let stop = Stop::new();
        let (died_sender, died) = watch::channel(false);
        let task = tokio::spawn(run(conn, child, receiver, stop.shutdown(), died_sender));
        Ok(Zygote {
            requests,
            pid,
            stop,
            task: Mutex::new(Some(task)),
            died,
        })
    }

    fn task(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        // Every update is a single `take`: a panic elsewhere cannot leave it half-written.
        self.task.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The template's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the template process and its connection are still up.
    pub(crate) fn alive(&self) -> bool {
        self.task().as_ref().is_some_and(|task| !task.is_finished())
    }

    /// Waits until the template has ended: `true` if it ended on its own (crashed, was
    /// killed, closed its socket) and has been reaped, `false` if forkd stopped it.
    pub(crate) async fn died(&self) -> bool {
        let mut died = self.died.clone();
        died.wait_for(|died| *died).await.is_ok()
    }

    /// Asks the template to fork clone `id` serving on `listener`. Gives up after `timeout`
    /// (a clone forked later is killed).
    async fn fork(
        &self,
        id: String,
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<Forked, CloneError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            id,
            listener,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| CloneError::TemplateExited)?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(answer) => answer.map_err(|_| CloneError::TemplateExited)?,
            Err(_) => Err(CloneError::Timeout(timeout)),
        }
    }

    /// Closes the connection, which makes the template kill its clones and exit, and waits
    /// until it has.
    pub(crate) async fn stop(&self) {
        self.stop.stop();
        let task = self.task().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Forks clone `id` from `zygote`, serving on `listener`, and starts watching it.
pub(crate) async fn start_clone(
    zygote: &Zygote,
    id: &str,
    listener: TcpListener,
    timeout: Duration,
) -> Result<Process, CloneError> {
    let Forked { pid, exit } = zygote.fork(id.to_owned(), listener, timeout).await?;
    // The template has not reported this clone's exit, so it has not reaped it: the pid is
    // still the clone's. If it is gone already, the template's report tells how.
    let pidfd = Arc::new(Pidfd::open(pid).map_err(CloneError::ExitedAtOnce)?);
    let watched = kernel::async_pidfd(pidfd.clone()).map_err(CloneError::Watch)?;
    let (life, lifeline) = Lifeline::new();
    let own = Arc::clone(&pidfd);
    tokio::spawn(async move {
        // A pidfd turns readable when its process exits. An error here would mean epoll
        // refused the pidfd; treat it like an exit rather than track a clone blindly.
        let _ = watched.readable().await;
        drop(watched); // our share of the pidfd: do not hold it through the wait below
        life.send_replace(Life::Gone);
        // A clone that outlived its template was reparented; if to forkd (the first process
        // of its container), forkd reaps it and knows how it ended.
        let reaped = kernel::try_reap_pidfd(&own);
        drop(own);
        // Otherwise the template reaps it and reports how it ended at once. If the template
        // died, its connection's task drops the report's sender: how it ended stays unknown.
        let status = match reaped {
            Some(exit) => status_of(exit),
            None => exit.await.unwrap_or(ExitStatus::Unknown),
        };
        life.send_replace(Life::Ended(status));
    });
    Ok(Process::new(pidfd, lifeline))
}

fn status_of(exit: kernel::Exit) -> ExitStatus {
    match exit {
        kernel::Exit::Code(code) => ExitStatus::Code(code),
        kernel::Exit::Signal(signal) => ExitStatus::Signal(signal),
    }
}

/// Receives and parses one message; `None` at end of stream.
async fn receive(
    conn: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
) -> Result<Option<FromTemplate>, ReceiveError> {
    loop {
        let mut guard = conn.readable().await.map_err(ReceiveError::Io)?;
        match guard.try_io(|c| kernel::recv_message(c.as_fd(), buf)) {
            Ok(Ok((0, _))) => return Ok(None),
            Ok(Ok((len, _))) => return Ok(Some(FromTemplate::parse(&buf[..len])?)),
            Ok(Err(e)) => return Err(ReceiveError::Io(e)),
            Err(_would_block) => continue,
        }
    }
}

async fn send(
    conn: &AsyncFd<OwnedFd>,
    message: &ToTemplate,
    listener: &TcpListener,
) -> io::Result<()> {
    let payload = message.encode();
    loop {
        let mut guard = conn.writable().await?;
        match guard
            .try_io(|c| kernel::send_message(c.as_fd(), payload.as_bytes(), Some(listener.as_fd())))
        {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Why the connection to a template ended (for the log).
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("forkd stopped the template")]
    Stopped,
    #[error("the template closed its socket")]
    Closed,
    #[error("the zygote socket failed")]
    Socket(#[source] ReceiveError),
    #[error("the template exited ({0})")]
    Exited(std::process::ExitStatus),
    #[error("waiting for the template failed")]
    Wait(#[source] io::Error),
}

/// Owns the connection to one template until forkd stops the [`Zygote`] or the template dies.
async fn run(
    conn: AsyncFd<OwnedFd>,
    mut child: tokio::process::Child,
    mut requests: mpsc::Receiver<Request>,
    shutdown: Shutdown,
    died: watch::Sender<bool>,
) {
    let mut pending: HashMap<String, oneshot::Sender<Result<Forked, CloneError>>> = HashMap::new();
    // Where each live clone's exit report goes.
    let mut exits: HashMap<String, oneshot::Sender<ExitStatus>> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let ended = loop {
        tokio::select! {
            () = shutdown.wait() => break Ended::Stopped,
            request = requests.recv() => {
                let Some(Request { id, listener, reply }) = request else { break Ended::Stopped };
                match send(&conn, &ToTemplate::Clone { id: id.clone() }, &listener).await {
                    Ok(()) => { pending.insert(id, reply); }
                    Err(e) => { let _ = reply.send(Err(CloneError::Send(e))); }
                }
                // Our copy of the listener closes here; the template and its child hold theirs.
            }
            message = receive(&conn, &mut buf) => match message {
                Ok(Some(FromTemplate::Forked { id, pid })) => {
                    let (report, exit) = oneshot::channel();
                    let delivered = pending
                        .remove(&id)
                        .is_some_and(|reply| reply.send(Ok(Forked { pid, exit })).is_ok());
                    if delivered {
                        exits.insert(id, report);
                    } else {
                        // Nobody waits for this clone any more (the request timed out): a clone
                        // nobody tracks must not live. The template has not reaped it yet, as it
                        // has not reported its exit, so the pid is still this clone.
                        tracing::warn!(clone = %id, pid, "killing a clone forked after its request gave up");
                        if let Ok(pidfd) = Pidfd::open(pid) { let _ = pidfd.send_signal(libc::SIGKILL); }
                    }
                }
                Ok(Some(FromTemplate::Failed { id, reason })) => {
                    if let Some(reply) = pending.remove(&id) { let _ = reply.send(Err(CloneError::Refused { reason })); }
                }
                Ok(Some(FromTemplate::Exited { id, exit })) => {
                    if let Some(report) = exits.remove(&id) {
                        let _ = report.send(status_of(exit));
                    }
                }
                Ok(Some(FromTemplate::Ready)) => tracing::warn!("template sent `ready` twice"),
                Ok(None) => break Ended::Closed,
                Err(e) => break Ended::Socket(e),
            },
            status = child.wait() => break match status {
                Ok(status) => Ended::Exited(status),
                Err(e) => Ended::Wait(e),
            },
        }
    };
    tracing::debug!(reason = %crate::error::message(&ended), "zygote connection closed");
    // Waiting requests learn that the template is gone (their reply senders drop), and so do
    // the clones still waiting for an exit report.
    drop(pending);
    drop(exits);
    requests.close();
    // The end of the stream tells the template to kill its clones and exit; give it a moment
    // to reap them, then make sure.
    let ended_in_order = tokio::time::timeout(EXIT_GRACE, async {
        close_in_order(&conn).await;
        child.wait().await
    })
    .await;
    if ended_in_order.is_err() {
        let _ = child.kill().await;
    }
    if !matches!(ended, Ended::Stopped) {
        tracing::warn!(reason = %crate::error::message(&ended), "the template ended on its own");
        died.send_replace(true);
    }
}

/// Ends the connection so that the template reads the end of the stream, never a reset:
/// shuts down our sending half, then reads (and drops) whatever the template still sends,
/// such as the exits of the clones it reaps, until it closes its end. Closing the socket
/// with those reports unread would make the kernel fail the template's next read with
/// `ECONNRESET`, which the template takes for a broken connection and reports as an error.
async fn close_in_order(conn: &AsyncFd<OwnedFd>) {
    if let Err(e) = kernel::shutdown_write(conn.get_ref().as_fd()) {
        tracing::debug!(error = %e, "could not shut down the zygote socket's sending half");
        return;
    }
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let Ok(mut guard) = conn.readable().await else {
            return;
        };
        match guard.try_io(|c| kernel::recv_message(c.as_fd(), &mut buf)) {
            Ok(Ok((0, _))) => return,
            Ok(Err(e)) if e.kind() != io::ErrorKind::Interrupted => return,
            Ok(_) | Err(_) => continue, // a message, an interrupted read, or would block
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    /// forkd's end (non-blocking, registered with tokio) and the template's end (blocking)
    /// of one zygote connection.
    fn connection(name: &str) -> (AsyncFd<OwnedFd>, OwnedFd) {
        let dir = std::env::temp_dir().join(format!("fork-driver-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("zygote.sock");
        let listener = kernel::seqpacket_listen(&path, false).unwrap();
        let template = kernel::seqpacket_connect(&path).unwrap();
        let forkd = kernel::accept(listener.as_fd()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (kernel::async_fd(forkd).unwrap(), template)
    }

    #[tokio::test]
    async fn an_orderly_close_gives_the_template_the_end_of_the_stream_not_a_reset() {
        let (forkd, template) = connection("close");
        // The template reports a clone's exit that forkd has not read when it stops.
        let exited = FromTemplate::Exited {
            id: "app-1".into(),
            exit: kernel::Exit::Signal(libc::SIGKILL),
        };
        kernel::send_message(template.as_fd(), exited.encode().as_bytes(), None).unwrap();
        let closing = tokio::spawn(async move { close_in_order(&forkd).await });
        // The template's side, as forkd/zygote's loop does it: a blocking read, then more
        // reports while it reaps its clones, then its exit.
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; MAX_MESSAGE];
            let read = kernel::recv_message(template.as_fd(), &mut buf).map(|(len, _)| len);
            kernel::send_message(template.as_fd(), exited.encode().as_bytes(), None).unwrap();
            drop(template);
            read
        });
        assert_eq!(read.await.unwrap().unwrap(), 0, "the end of the stream");
        tokio::time::timeout(Duration::from_secs(10), closing)
            .await
            .expect("forkd's side returns once the template has closed its end")
            .unwrap();
    }
}
