//! How Squall's processes start and stop, written once for every part that serves or loops:
//!
//! - [`Shutdown`]: the one shutdown signal. Whoever starts a loop keeps its [`Stop`]; every
//!   loop holds a clone of the [`Shutdown`] and selects on [`Shutdown::wait`]. Dropping the
//!   `Stop` stops them too, so a part whose owner went away never runs on unseen (tokio's
//!   mini-redis does the same with a broadcast channel).
//! - [`HttpServer`]: the one accept loop behind every HTTP listener (the balancer's proxy and
//!   admin listeners, forkd's API, `squall up`'s admin page), with the limits each needs: a
//!   header-read timeout, at most so many connections, a bounded connection life, and a
//!   graceful end (HTTP/1 after the current response, HTTP/2 with GOAWAY) bounded in time,
//!   and, where the owner gives a [`Tls`], TLS termination with ALPN.
//! - [`Terminate`]: SIGTERM and SIGINT, which end every `squall` command that runs.
//! - [`init_logging`]: the one logging set-up of the `squall` binary's commands, and
//!   [`ErrorChain`], how an error and its causes are written on one line (in logs and in
//!   forkd's error bodies), so that each cause is said once, by the error that has it.
//! - [`metrics`]: registering Prometheus metrics in a part's own registry, and rendering it.
//! - [`AdminAuth`] and [`TokenFile`]: the optional bearer token of an admin listener (read
//!   from a file, checked, reloaded when it changes), and [`bearer_matches`], the
//!   constant-time token check forkd's API uses too.
//! - [`FileWatch`]: when to read files again (SIGHUP, or a change of what their paths lead
//!   to, as a Kubernetes Secret rotation makes), for the admin token and the TLS certificate.
//!
//! This crate sits under `balancer/` because serving HTTP is the balancer's trade, but it
//! knows nothing of balancing: forkd uses it too, and depends on nothing else of the balancer.
#![forbid(unsafe_code)]

mod auth;
mod file_watch;
mod first_byte;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http1;
pub mod metrics;
mod nodelay;
mod protocols;
mod server;
mod shutdown;
mod stream;
mod terminate;
mod tls;
mod transport;

pub use auth::{AdminAuth, MAX_TOKEN_LEN, Refused, Shows, TokenError, TokenFile, bearer_matches};
pub use file_watch::{FILE_POLL, FileWatch, Fingerprint};
pub use first_byte::FirstByte;
pub use http1::Bodiless;
pub use server::{HttpServer, Limits};
pub use shutdown::{Shutdown, Stop};
pub use stream::Stream;
pub use terminate::Terminate;
pub use tls::Tls;
pub use transport::Transport;

/// Logs to stderr at `default` (such as `"info"`) unless `RUST_LOG` says otherwise. Calling
/// it again does nothing, so every command and every test may call it.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files and journals.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// An error and its sources on one line, joined by ": ". Errors say only what they add and
/// keep their cause as their `source()`; this writes the whole chain.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let error = Layer(
            "clone web-3: cannot launch its QEMU",
            Some(Box::new(Layer(
                "QEMU's monitor did not answer",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(
            ErrorChain(&error).to_string(),
            "clone web-3: cannot launch its QEMU: QEMU's monitor did not answer: connection refused"
        );
        assert_eq!(ErrorChain(&Layer("alone", None)).to_string(), "alone");
    }
}
