//! The `spawn` driver: a cold start of the template's command for every clone, the baseline
//! that the `fork` driver is measured against. The clone learns its port from the `PORT`
//! environment variable and from `{port}` in its arguments (its address from `HOST` and
//! `{host}`), and is ready once its health path answers 200 — or, for an app that speaks h2c
//! (`Protocol::H2c`, such as a gRPC server, which has no page to `GET`), once it answers the
//! HTTP/2 connection preface with its SETTINGS frame, which a server sends only once it
//! serves.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kernel::Pidfd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Life, Lifeline, Process, exit_status};
use crate::api::{Protocol, TemplateSpec};

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
        () = wait_healthy(addr, spec) => Ok(()),
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

/// Asks the clone at `addr` every few milliseconds whether it is ready until it is: `GET
/// health_path` answers 200, or, for h2c, the HTTP/2 preface is answered. The app's own
/// server is the only one who knows when it is ready, and it says so only when asked.
async fn wait_healthy(addr: SocketAddr, spec: &TemplateSpec) {
    loop {
        let ready = async {
            match spec.protocol {
                Protocol::Http1 => Ok(get_status(addr, &spec.health_path).await? == 200),
                Protocol::H2c => answers_http2_preface(addr).await,
            }
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(1), ready).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether a server on a fresh connection answers HTTP/2's client connection preface (RFC
/// 9113 §3.4) with a SETTINGS frame, as its own preface must begin.
async fn answers_http2_preface(addr: SocketAddr) -> std::io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(PREFACE).await?;
    stream.write_all(&EMPTY_SETTINGS).await?;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await?;
    const SETTINGS: u8 = 4;
    Ok(header[3] == SETTINGS)
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
