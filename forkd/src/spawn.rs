//! The `spawn` driver: a cold start of the template's command for every clone, the baseline
//! that the `fork` driver is measured against. The clone learns its port from the `PORT`
//! environment variable and from `{port}` in its arguments (its address from `HOST` and
//! `{host}`), and is ready once its health path answers 200.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::TemplateSpec;

/// Picks a free port on `ip`. Another process could take it before the clone binds it; the
/// clone then fails its health check and the clone request fails.
pub(crate) fn free_port(ip: std::net::IpAddr) -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind((ip, 0))?.local_addr()
}

/// Starts one clone serving on `addr`.
///
/// Call from a task on a runtime worker thread: the clone gets SIGKILL when the thread that
/// started it exits (see [`kernel::die_with_parent`]).
pub(crate) fn start(
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

/// Polls `GET path` on `addr` every few milliseconds until it answers 200.
pub(crate) async fn wait_healthy(addr: SocketAddr, path: &str) {
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
pub(crate) async fn get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
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
