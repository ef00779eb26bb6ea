//! Waiting for a guest: until its app answers the health check, until the guest agent's
//! line saying the kernel RNG was reseeded appears on its console, or until QEMU exits —
//! whichever comes first, each within a deadline. A failed wait carries the end of the
//! guest's console, which is usually where the reason is.
//!
//! **A clone's RNG is its own before it is ready.** A restored guest starts with the
//! template's kernel CRNG state, and on the `microvm` machine QEMU's `vmgenid` device is
//! invisible to the guest (no ACPI description, no fw_cfg file), so the guest is never told it
//! was restored and would go on producing the template's random bytes until its reseed
//! interval (seconds to a minute) ran out. So every QEMU gets 32 bytes from the host's
//! `/dev/urandom` as the fw_cfg file `opt/squall/seed` (through a 0600 file, not the command
//! line, which every local user can read), and the guest agent (see [`crate::image`]) notices
//! that the clone id in fw_cfg changed, mixes the seed in, forces a CRNG reseed
//! (`RNDRESEEDCRNG`) and prints `squall-guest: reseeded ID`. After every resume of a restored
//! guest, the host waits for that line in the clone's console (`wait_reseeded`) before
//! anything else: before the health check of a standby restored ahead of time, and before a
//! clone is returned. A clone is therefore never ready, and never answers a request of ours,
//! before its kernel RNG has been reseeded with fresh host entropy.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::image::RESEEDED_LINE;
use crate::launch::Qemu;

/// How many lines of a console an error shows.
const CONSOLE_TAIL_LINES: usize = 12;

/// The last lines of a guest's serial console, read when something failed. It displays as
/// `last console output:` and the lines, each on its own line below.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleTail(String);

impl ConsoleTail {
    /// The last lines of the console in `path` (none if it cannot be read).
    pub(crate) fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Self::of(&text)
    }

    /// The last lines of `text`.
    fn of(text: &str) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        Self(lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n"))
    }

    /// The lines.
    pub fn lines(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ConsoleTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.trim().is_empty() {
            f.write_str("the console is empty")
        } else {
            write!(f, "last console output:\n{}", self.0)
        }
    }
}

/// Why a guest did not get where it was waited for.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum WaitError {
    /// QEMU exited early ({status}); {console}
    Exited {
        /// Its exit status and the end of its standard error.
        status: String,
        /// The end of its serial console.
        console: ConsoleTail,
    },
    /// the app did not answer GET {path} with 200 within {timeout:?}; {console}
    Unhealthy {
        /// The health path.
        path: String,
        /// The time allowed.
        timeout: Duration,
        /// The end of its serial console.
        console: ConsoleTail,
    },
    /// the guest did not report reseeding its RNG (`{line}`) within {timeout:?} of
    /// resuming; is the image built by this version (its /init starts the guest agent)?
    /// {console}
    NotReseeded {
        /// The console line waited for.
        line: String,
        /// The time allowed.
        timeout: Duration,
        /// The end of its serial console.
        console: ConsoleTail,
    },
}

/// Asks `GET path` of `addr` once; true on a 200.
pub(crate) async fn answers_200(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: squall-health\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.") && &head[9..12] == b"200")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Checks `ready` every `every` until it holds; fails with [`WaitError::Exited`] if QEMU
/// exits first, or with `late()` once `timeout` has passed.
async fn wait_for_guest<Ready: Future<Output = bool>>(
    qemu: &mut Qemu,
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> Ready,
    late: impl FnOnce() -> WaitError,
) -> Result<(), WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some(status) = qemu.try_exit() {
            return Err(WaitError::Exited {
                status: qemu.exit_report(status).await,
                console: qemu.console_tail(),
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(late());
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `addr` answers `GET path` with 200, QEMU exits, or `timeout` passes.
pub(crate) async fn wait_healthy(
    qemu: &mut Qemu,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(), WaitError> {
    let console = qemu.console().to_owned();
    let ready = || answers_200(addr, path);
    let late = || WaitError::Unhealthy {
        path: path.to_owned(),
        timeout,
        console: ConsoleTail::read(&console),
    };
    wait_for_guest(qemu, timeout, Duration::from_millis(2), ready, late).await
}

/// Waits until the guest agent's line saying the RNG was reseeded for `id` is on the console,
/// QEMU exits, or `timeout` passes. The agent polls fw_cfg every
/// [`AGENT_POLL_MS`](crate::image::AGENT_POLL_MS) of guest time, so after a resume this takes
/// a few milliseconds.
pub(crate) async fn wait_reseeded(
    qemu: &mut Qemu,
    id: &str,
    timeout: Duration,
) -> Result<(), WaitError> {
    let console = qemu.console().to_owned();
    let line = format!("{RESEEDED_LINE} {id}");
    let ready = || std::future::ready(has_line(&console, &line));
    let late = || WaitError::NotReseeded {
        line: line.clone(),
        timeout,
        console: ConsoleTail::read(&console),
    };
    wait_for_guest(qemu, timeout, Duration::from_millis(1), ready, late).await
}

/// Whether the console in `path` has `line` on a line of its own.
fn has_line(path: &Path, line: &str) -> bool {
    let Ok(text) = std::fs::read(path) else {
        return false;
    };
    text.split(|&b| b == b'\n')
        .any(|l| l.trim_ascii() == line.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[test]
    fn a_console_tail_keeps_the_last_lines_below_a_heading() {
        let text: String = (1..=20).map(|i| format!("line {i}\n")).collect();
        let tail = ConsoleTail::of(&text);
        assert_eq!(tail.lines().lines().count(), CONSOLE_TAIL_LINES);
        assert!(tail.lines().ends_with("line 20"));
        assert!(
            tail.to_string()
                .starts_with("last console output:\nline 9\n")
        );
        assert_eq!(ConsoleTail::of("").to_string(), "the console is empty");
    }

    #[test]
    fn wait_errors_say_what_was_waited_for_and_show_the_console() {
        let unhealthy = WaitError::Unhealthy {
            path: "/healthz".into(),
            timeout: Duration::from_secs(20),
            console: ConsoleTail::of("Kernel panic"),
        };
        assert_eq!(
            unhealthy.to_string(),
            "the app did not answer GET /healthz with 200 within 20s; last console output:\nKernel panic"
        );
        let not_reseeded = WaitError::NotReseeded {
            line: format!("{RESEEDED_LINE} c1"),
            timeout: Duration::from_millis(500),
            console: ConsoleTail::default(),
        };
        assert_eq!(
            not_reseeded.to_string(),
            "the guest did not report reseeding its RNG (`squall-guest: reseeded c1`) within 500ms \
             of resuming; is the image built by this version (its /init starts the guest agent)? \
             the console is empty"
        );
    }

    #[test]
    fn the_reseed_line_must_be_a_whole_line_for_this_clone() {
        let path =
            std::env::temp_dir().join(format!("squall-console-{}", crate::run_files::unique()));
        std::fs::write(
            &path,
            "boot\r\nsquall-guest: reseeded c10\r\nsquall-guest: reseeded c1\r\n",
        )
        .unwrap();
        assert!(has_line(&path, "squall-guest: reseeded c1"));
        assert!(!has_line(&path, "squall-guest: reseeded c2"));
        assert!(!has_line(&path, "squall-guest: reseeded"));
        std::fs::remove_file(&path).unwrap();
        assert!(!has_line(&path, "boot"), "no console, no line");
    }
}
