//! The `spawn` driver: a cold start of the template's command for every clone, the baseline
//! that the `fork` driver is measured against. The clone learns its port from the `PORT`
//! environment variable and from `{port}` in its arguments (its address from `HOST` and
//! `{host}`), and is ready once its health path answers 200.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kernel::Pidfd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Life, Lifeline, Process, exit_status};
use crate::api::TemplateSpec;

/// Why a `spawn` clone could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneError {
    #[error("could not start {program:?}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the clone exited at once")]
    ExitedAtOnce,
    #[error("could not open a pidfd for the clone")]
    Pidfd(#[source] std::io::Error),
    #[error("the clone exited before it was ready ({status})")]
    ExitedEarly { status: std::process::ExitStatus },
    #[error("waiting for the clone failed")]
    Wait(#[source] std::io::Error),
    #[error("the clone was not ready within {0:?}")]
    NotReady(Duration),
}

/// Picks a free port on `ip`. Another process could take it before the clone binds it; the
/// clone then fails its health check and the clone request fails.
pub(crate) fn free_port(ip: std::net::IpAddr) -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind((ip, 0))?.local_addr()
}

/// Starts clone `id` serving on `addr` and waits until it is healthy; a clone that fails is
/// killed before this returns.
pub(crate) async fn start_clone(
    spec: &TemplateSpec,
    id: &str,
    addr: SocketAddr,
) -> Result<Process, CloneError> {
    let mut child = command(spec, id, addr).map_err(|source| CloneError::Start {
        program: spec.command[0].clone(),
        source,
    })?;
    let pid = child.id().ok_or(CloneError::ExitedAtOnce)?;
    // Our own unreaped child: the pid cannot have been reused.
    let pidfd = Arc::new(Pidfd::open(pid).map_err(CloneError::Pidfd)?);
    let timeout = Duration::from_millis(spec.start_timeout_ms);
    let ready = tokio::select! {
        () = wait_healthy(addr, &spec.health_path) => Ok(()),
        status = child.wait() => Err(match status {
            Ok(status) => CloneError::ExitedEarly { status },
            Err(source) => CloneError::Wait(source),
        }),
        () = tokio::time::sleep(timeout) => Err(CloneError::NotReady(timeout)),
    };
    if let Err(error) = ready {
        let _ = child.kill().await;
        return Err(error);
    }
    let (life, lifeline) = Lifeline::new();
    // This task owns the child: it reaps it, and kills it if the runtime goes away first.
    tokio::spawn(async move {
        let status = child.wait().await;
        life.send_replace(Life::Ended(exit_status(status)));
    });
    Ok(Process::new(pidfd, lifeline))
}

/// The clone's process, started.
fn command(
    spec: &TemplateSpec,
    id: &str,
    addr: SocketAddr,
) -> std::io::Result<tokio::process::Child> {
    let port = addr.port().to_string();
    let host = addr.ip().to_string();
    let mut command = std::process::Command::new(&spec.command[0]);
    command
        .args(
            spec.command[1..]
                .iter()
                .map(|arg| arg.replace("{port}", &port).replace("{host}", &host)),
        )
        .envs(&spec.env)
        .env("PORT", &port)
        .env("HOST", &host)
        .env("SQUALL_CLONE_ID", id)
        .env_remove(zygote::protocol::SOCKET_ENV)
        .stdin(Stdio::null());
    kernel::die_with_parent(&mut command);
    tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
}

/// Asks `GET path` on `addr` every few milliseconds until it answers 200. The app's own
/// server is the only one who knows when it is ready, and it says so only when asked.
async fn wait_healthy(addr: SocketAddr, path: &str) {
    loop {
        if let Ok(Ok(200)) =
            tokio::time::timeout(Duration::from_secs(1), get_status(addr, path)).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One `GET` over a fresh connection; returns the response's status code.
async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}
