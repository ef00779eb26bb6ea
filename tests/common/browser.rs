//! Headless Chromium driven over the DevTools protocol, for a test that must act on a page
//! (fill a form, reload) and not only read the DOM it ends with (`--dump-dom`). The protocol
//! is JSON over a WebSocket; the client side of RFC 6455 that this needs (one connection,
//! text frames, masked when sent) is written out here rather than pulled in as a crate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{ChildGuard, Scratch};

/// How long one DevTools answer may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// The command of a headless Chromium keeping its profile in `profile`; the caller adds what
/// it shows and how.
pub(crate) fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// A headless Chromium with one page, closed when dropped.
pub(crate) struct Browser {
    socket: TcpStream,
    next_id: u64,
    // Dropped after the socket: the browser is killed last.
    _chromium: ChildGuard,
    _profile: Scratch,
}

impl Browser {
    /// Chromium showing `url`, its profile in a scratch directory of its own.
    pub(crate) fn open(url: &str) -> Browser {
        let profile = Scratch::new("chromium-profile");
        let mut child = chromium(profile.path())
            .arg("--remote-debugging-port=0")
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium (Debian's chromium package; scripts/install-deps installs it)");
        let stderr = child.stderr.take().unwrap();
        let chromium = ChildGuard(child);
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"; the rest of its
        // log is drained so it never blocks on a full pipe.
        let (found, endpoint) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = found.send(line[at + "ws://".len()..].to_owned());
                }
            }
        });
        let endpoint = endpoint
            .recv_timeout(ANSWER_LIMIT)
            .expect("chromium announces its DevTools endpoint");
        let addr: SocketAddr = endpoint.split('/').next().unwrap().parse().unwrap();
        let page = page_socket_path(addr);
        let socket = connect(addr, &page);
        Browser {
            socket,
            next_id: 0,
            _chromium: chromium,
            _profile: profile,
        }
    }

    /// The value of the JavaScript `expression` in the page (a promise is awaited); fails the
    /// test if it throws.
    pub(crate) fn evaluate(&mut self, expression: &str) -> serde_json::Value {
        self.try_evaluate(expression)
            .unwrap_or_else(|message| panic!("{expression} failed in the page: {message}"))
    }

    /// The value of `expression`, or what DevTools said instead (while the page navigates,
    /// say).
    fn try_evaluate(&mut self, expression: &str) -> Result<serde_json::Value, serde_json::Value> {
        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true, "awaitPromise": true},
        });
        send(&mut self.socket, command.to_string().as_bytes());
        loop {
            let message: serde_json::Value =
                serde_json::from_slice(&receive(&mut self.socket)).expect("DevTools sends JSON");
            if message["id"] != id {
                continue; // an event
            }
            let result = &message["result"];
            if message.get("error").is_some() || result.get("exceptionDetails").is_some() {
                return Err(message);
            }
            return Ok(result["result"]["value"].clone());
        }
    }

    /// Waits until `expression` is true in the page; fails the test after `deadline`, saying
    /// what the page held then (`describe`, another expression).
    pub(crate) fn wait_for(&mut self, expression: &str, deadline: Duration, describe: &str) {
        let start = Instant::now();
        while self.try_evaluate(expression) != Ok(serde_json::Value::Bool(true)) {
            assert!(
                start.elapsed() < deadline,
                "{expression} did not hold within {deadline:?}; the page: {:?}",
                self.try_evaluate(describe)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The WebSocket path of the browser's first page, from its `/json/list`.
fn page_socket_path(addr: SocketAddr) -> String {
    let url = test_support::wait_until("a page in chromium", ANSWER_LIMIT, || {
        let targets: Vec<serde_json::Value> = serde_json::from_str(&json_list(addr)).ok()?;
        let page = targets.iter().find(|t| t["type"] == "page")?;
        Some(page["webSocketDebuggerUrl"].as_str()?.to_owned())
    });
    let path = url.split_once("//").unwrap().1;
    path[path.find('/').unwrap()..].to_owned()
}

/// The body of `GET /json/list`, read up to its length: the DevTools server keeps the
/// connection open whatever the request says.
fn json_list(addr: SocketAddr) -> String {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(ANSWER_LIMIT)).unwrap();
    write!(socket, "GET /json/list HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reader = BufReader::new(socket);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// Opens a WebSocket to `path` at `addr` (the opening handshake; the server's key is not
/// checked: this is a test against a local browser).
fn connect(addr: SocketAddr, path: &str) -> TcpStream {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(ANSWER_LIMIT)).unwrap();
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        socket.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "no WebSocket: {head}");
    socket
}

/// Sends `payload` as one text frame, masked as a client must.
fn send(socket: &mut TcpStream, payload: &[u8]) {
    let mask = [0x5a, 0x17, 0xc3, 0x08];
    let mut frame = vec![0x81]; // FIN, text
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    socket.write_all(&frame).unwrap();
}

/// Receives one message (its frames joined), skipping pings.
fn receive(socket: &mut TcpStream) -> Vec<u8> {
    let mut message = Vec::new();
    loop {
        let mut head = [0u8; 2];
        socket.read_exact(&mut head).unwrap();
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        let len = match head[1] & 0x7f {
            126 => {
                let mut n = [0u8; 2];
                socket.read_exact(&mut n).unwrap();
                u64::from(u16::from_be_bytes(n))
            }
            127 => {
                let mut n = [0u8; 8];
                socket.read_exact(&mut n).unwrap();
                u64::from_be_bytes(n)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).unwrap()];
        socket.read_exact(&mut payload).unwrap();
        match opcode {
            0x8 => panic!("the browser closed the DevTools connection"),
            0x9 | 0xa => continue, // ping, pong
            _ => message.extend_from_slice(&payload),
        }
        if fin {
            return message;
        }
    }
}
