//! The `fork` driver, forkd's side of the zygote protocol (`forkd/zygote/PROTOCOL.md`).
//!
//! forkd listens on a fresh `SOCK_SEQPACKET` socket in a private directory, starts the template
//! command with `SQUALL_ZYGOTE` naming it, and waits for the app to connect and say `ready`.
//! Then one task owns the connection: it sends each clone request with its listening socket
//! attached, matches `forked`/`failed` answers to the waiting requests by clone id, and passes
//! `exited` reports on. Dropping the connection tells the template to kill its clones and exit.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zygote::protocol::{FromTemplate, MAX_MESSAGE, SOCKET_ENV, ToTemplate};

use crate::api::{ExitStatus, TemplateSpec};

/// Why a `fork` template could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Creating the private directory or the zygote socket failed.
    #[error("could not create the zygote socket in {dir}")]
    Socket {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command could not be started.
    #[error("could not start {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The command exited before reporting ready.
    #[error("the template exited before it was ready ({status})")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// It did not report ready within the start timeout.
    #[error("the template was not ready within {0:?}")]
    Timeout(Duration),
    /// It spoke, but not the protocol.
    #[error("the template broke the zygote protocol: {0}")]
    Protocol(String),
}

/// Called with a clone id and its exit status when the template reports a clone's exit.
pub(crate) type ExitReport = Arc<dyn Fn(&str, ExitStatus) + Send + Sync>;

struct Request {
    id: String,
    listener: TcpListener,
    reply: oneshot::Sender<Result<u32, String>>,
}

/// A running, warm template process.
pub(crate) struct Zygote {
    requests: mpsc::Sender<Request>,
    pid: Option<u32>,
    task: JoinHandle<()>,
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
        on_exit: ExitReport,
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
                let mut guard = listener
                    .readable()
                    .await
                    .map_err(|e| StartError::Protocol(e.to_string()))?;
                match guard.try_io(|l| kernel::accept(l.as_fd())) {
                    Ok(Ok(conn)) => break conn,
                    Ok(Err(e)) => return Err(StartError::Protocol(format!("accept: {e}"))),
                    Err(_would_block) => continue,
                }
            };
            let conn = kernel::async_fd(conn).map_err(|e| StartError::Protocol(e.to_string()))?;
            let mut buf = [0u8; MAX_MESSAGE];
            match receive(&conn, &mut buf).await {
                Ok(Some(FromTemplate::Ready)) => Ok(conn),
                Ok(Some(other)) => Err(StartError::Protocol(format!(
                    "expected `ready`, got `{}`",
                    other.encode()
                ))),
                Ok(None) => Err(StartError::Protocol(
                    "closed the socket before `ready`".to_owned(),
                )),
                Err(e) => Err(StartError::Protocol(e)),
            }
        };
        let conn = tokio::select! {
            conn = handshake => conn?,
            status = child.wait() => {
                return Err(match status {
                    Ok(status) => StartError::Exited { status },
                    Err(e) => StartError::Protocol(format!("waiting for the template: {e}")),
                });
            }
            () = tokio::time::sleep(timeout) => return Err(StartError::Timeout(timeout)),
        };
        drop(listener);
        drop(dir); // the connection is made: nobody needs the socket's name any more

        let pid = child.id();
        let (requests, receiver) = mpsc::channel(1024);
        let task = tokio::spawn(run(conn, child, receiver, on_exit));
        Ok(Zygote {
            requests,
            pid,
            task,
        })
    }

    /// The template's process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether the template process and its connection are still up.
    pub(crate) fn alive(&self) -> bool {
        !self.task.is_finished()
    }

    /// Asks the template to fork clone `id` serving on `listener`; returns the clone's pid.
    /// Gives up after `timeout` (a clone forked later is killed).
    pub(crate) async fn fork(
        &self,
        id: String,
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<u32, String> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            id,
            listener,
            reply,
        };
        self.requests
            .send(request)
            .await
            .map_err(|_| "the template process has exited".to_owned())?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(answer) => answer.map_err(|_| "the template process has exited".to_owned())?,
            Err(_) => Err(format!("the template did not answer within {timeout:?}")),
        }
    }

    /// Closes the connection, which makes the template kill its clones and exit, and waits
    /// until it has.
    pub(crate) async fn stop(self) {
        drop(self.requests);
        let _ = self.task.await;
    }
}

/// Receives and parses one message; `None` at end of stream.
async fn receive(conn: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> Result<Option<FromTemplate>, String> {
    loop {
        let mut guard = conn.readable().await.map_err(|e| e.to_string())?;
        match guard.try_io(|c| kernel::recv_message(c.as_fd(), buf)) {
            Ok(Ok((0, _))) => return Ok(None),
            Ok(Ok((len, _))) => {
                return FromTemplate::parse(&buf[..len])
                    .map(Some)
                    .map_err(|e| e.to_string());
            }
            Ok(Err(e)) => return Err(e.to_string()),
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

/// Owns the connection to one template until forkd drops the [`Zygote`] or the template dies.
async fn run(
    conn: AsyncFd<OwnedFd>,
    mut child: tokio::process::Child,
    mut requests: mpsc::Receiver<Request>,
    on_exit: ExitReport,
) {
    let mut pending: HashMap<String, oneshot::Sender<Result<u32, String>>> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let reason = loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(Request { id, listener, reply }) = request else { break "forkd stopped the template".to_owned() };
                match send(&conn, &ToTemplate::Clone { id: id.clone() }, &listener).await {
                    Ok(()) => { pending.insert(id, reply); }
                    Err(e) => { let _ = reply.send(Err(format!("sending the clone request: {e}"))); }
                }
                // Our copy of the listener closes here; the template and its child hold theirs.
            }
            message = receive(&conn, &mut buf) => match message {
                Ok(Some(FromTemplate::Forked { id, pid })) => {
                    let delivered = pending.remove(&id).is_some_and(|reply| reply.send(Ok(pid)).is_ok());
                    if !delivered {
                        // Nobody waits for this clone any more (the request timed out): a clone
                        // nobody tracks must not live. The template has not reaped it yet, as it
                        // has not reported its exit, so the pid is still this clone.
                        tracing::warn!(clone = %id, pid, "killing a clone forked after its request gave up");
                        if let Ok(pidfd) = kernel::Pidfd::open(pid) { let _ = pidfd.send_signal(libc::SIGKILL); }
                    }
                }
                Ok(Some(FromTemplate::Failed { id, reason })) => {
                    if let Some(reply) = pending.remove(&id) { let _ = reply.send(Err(reason)); }
                }
                Ok(Some(FromTemplate::Exited { id, exit })) => on_exit(&id, match exit {
                    kernel::Exit::Code(code) => ExitStatus::Code(code),
                    kernel::Exit::Signal(signal) => ExitStatus::Signal(signal),
                }),
                Ok(Some(FromTemplate::Ready)) => tracing::warn!("template sent `ready` twice"),
                Ok(None) => break "the template closed its socket".to_owned(),
                Err(e) => break format!("zygote socket: {e}"),
            },
            status = child.wait() => break format!("the template exited ({})", status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
        }
    };
    tracing::debug!(%reason, "zygote connection closed");
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(reason.clone()));
    }
    // Closing the socket tells the template to kill its clones and exit; give it a moment to
    // reap them, then make sure.
    drop(conn);
    requests.close();
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
