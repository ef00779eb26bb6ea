//! The signals that end a Squall process: SIGTERM (from systemd, Kubernetes, `kill`) and
//! SIGINT (Ctrl-C). Watched from the moment [`Terminate::watch`] is called, so a signal that
//! comes right after start-up is not lost.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM and SIGINT, watched.
#[derive(Debug)]
pub struct Terminate {
    term: Signal,
    interrupt: Signal,
}

impl Terminate {
    /// Starts watching both signals (needs a tokio runtime).
    pub fn watch() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for either signal; returns its name for the log.
    pub async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }

    /// Waits for either signal, logs it, and gives `stop`.
    pub async fn stop(mut self, stop: crate::Stop) {
        let name = self.wait().await;
        tracing::info!("{name}: shutting down");
        stop.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sigterm_to_this_process_is_seen() {
        let mut terminate = Terminate::watch().unwrap();
        let pid = std::process::id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        let name = tokio::time::timeout(std::time::Duration::from_secs(10), terminate.wait())
            .await
            .expect("the signal arrives");
        assert_eq!(name, "SIGTERM");
    }
}
