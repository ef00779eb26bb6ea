//! One HTTP/1.1 exchange over a fresh connection, written out by hand so that a test sees
//! exactly what went over the wire: blocking for tests without a runtime, async for the rest.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: its status code, its head as text, and its body as text.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The status code (0 if the response could not be read).
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body (chunked bodies are left as they came).
    pub body: String,
}

impl Reply {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        Self {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// The request as it goes over the wire (`Connection: close`, so the reply ends with EOF).
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// How long a blocking exchange may take before it fails the test.
const BLOCKING_LIMIT: Duration = Duration::from_secs(30);

/// Sends one request and reads the whole reply, blocking the thread; `Err` if the exchange
/// fails (for a test that expects the server to go away).
pub fn try_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, BLOCKING_LIMIT)?;
    stream.set_read_timeout(Some(BLOCKING_LIMIT))?;
    stream.write_all(&request_bytes(addr, method, path, headers, body))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(Reply::parse(&raw))
}

/// `GET path`, blocking the thread; `Err` if the exchange fails (for a test that expects the
/// server to go away).
pub fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    try_exchange(addr, "GET", path, &[], b"")
}

/// `GET path` with the header `Authorization: Bearer <token>` when a token is given,
/// blocking the thread; panics if the exchange fails.
pub fn get_bearer(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|value| ("Authorization", value.as_str()))
        .collect();
    try_exchange(addr, "GET", path, &headers, b"")
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `GET path`, blocking the thread; panics if the exchange fails.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// Sends one request and reads the whole reply; panics if the exchange fails.
pub async fn exchange_async(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(&request_bytes(addr, method, path, headers, body))
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(Reply::parse(&raw))
    };
    exchange
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// `GET path`; panics if the exchange fails.
pub async fn get_async(addr: SocketAddr, path: &str) -> Reply {
    exchange_async(addr, "GET", path, &[], b"").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_split_into_status_head_and_body() {
        let reply = Reply::parse(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\nbusy");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.header("missing"), None);
        assert_eq!(reply.body, "busy");
        assert_eq!(Reply::parse(b"").status, 0);
    }

    #[tokio::test]
    async fn both_clients_speak_to_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                let path = String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_owned();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                    path.len()
                );
                stream.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        assert_eq!(get_async(addr, "/a").await.body, "/a");
        let blocking = tokio::task::spawn_blocking(move || get(addr, "/b"))
            .await
            .unwrap();
        assert_eq!((blocking.status, blocking.body.as_str()), (200, "/b"));
    }
}
