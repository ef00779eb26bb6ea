//! A small client for QMP, QEMU's JSON control protocol: one JSON object per line; the
//! server greets, the client sends `qmp_capabilities`, then each command gets a `return` or
//! an `error`, with asynchronous events interleaved (and skipped here).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A QMP reply longer than this is refused: no command used here returns more.
const MAX_LINE: usize = 1 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum QmpError {
    /// cannot connect to QMP at {path}
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: std::io::Error,
    },
    /// QMP connection failed
    Io(#[from] std::io::Error),
    /// QMP protocol error: {0}
    Protocol(String),
    /// QEMU refused {command}: {class}: {desc}
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// An open, negotiated QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, retrying until `deadline` passes (QEMU creates the
    /// socket a few milliseconds after it starts), and negotiates capabilities.
    pub async fn connect(path: &Path, deadline: Duration) -> Result<Self, QmpError> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if start.elapsed() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer: write,
            line: String::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = AsyncReadExt::take(&mut self.reader, MAX_LINE as u64)
            .read_line(&mut self.line)
            .await?;
        if n == 0 {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP connection",
            )));
        }
        serde_json::from_str(&self.line)
            .map_err(|e| QmpError::Protocol(format!("{e}: {}", self.line.trim())))
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes =
            serde_json::to_vec(&request).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        loop {
            let mut message = self.read_message().await?;
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                let text = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            // An asynchronous event: not what we wait for.
        }
    }

    /// Forwards TCP `host` (IPv4) to the guest's `guest_port` on the user-mode network
    /// `netdev` (HMP's `hostfwd_add`: QMP has no command for it). From then on the guest
    /// can be reached on that address.
    pub async fn forward_port(
        &mut self,
        netdev: &str,
        host: std::net::SocketAddr,
        guest_port: u16,
    ) -> Result<(), QmpError> {
        let rule = format!(
            "hostfwd_add {netdev} tcp:{}:{}-:{guest_port}",
            host.ip(),
            host.port()
        );
        let reply = self
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": rule })),
            )
            .await?;
        // HMP reports success with no output and a failure as text.
        match reply.as_str().map(str::trim) {
            Some("") => Ok(()),
            Some(text) => Err(QmpError::Command {
                command: rule,
                class: "HMP".to_owned(),
                desc: text.to_owned(),
            }),
            None => Err(QmpError::Protocol(format!(
                "{rule}: unexpected reply {reply}"
            ))),
        }
    }

    /// Polls `query-migrate` until the migration completes; an error if it fails or `deadline`
    /// passes.
    pub async fn wait_for_migration(&mut self, deadline: Duration) -> Result<(), QmpError> {
        let start = tokio::time::Instant::now();
        loop {
            let info = self.execute("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some(status @ ("failed" | "cancelled")) => {
                    let detail = info.get("error-desc").and_then(Value::as_str).unwrap_or("");
                    return Err(QmpError::Protocol(format!("migration {status}: {detail}")));
                }
                _ if start.elapsed() > deadline => {
                    return Err(QmpError::Protocol(format!(
                        "migration did not complete within {deadline:?}: {info}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_micros(500)).await,
            }
        }
    }

    /// Turns on `x-ignore-shared`: RAM in a shared backend is not migrated, only device state.
    pub async fn ignore_shared_ram(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
        )
        .await
        .map(drop)
    }
}
