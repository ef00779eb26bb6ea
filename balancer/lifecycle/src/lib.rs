//! How Squall's processes start and stop, written once for every part that serves or loops:
//!
//! - [`Shutdown`]: the one shutdown signal. Whoever starts a loop keeps its [`Stop`]; every
//!   loop holds a clone of the [`Shutdown`] and selects on [`Shutdown::wait`]. Dropping the
//!   `Stop` stops them too, so a part whose owner went away never runs on unseen (tokio's
//!   mini-redis does the same with a broadcast channel).
//! - [`HttpServer`]: the one accept loop behind every HTTP listener (the balancer's proxy and
//!   admin listeners, forkd's API, `squall up`'s admin page), with the limits each needs: a
//!   header-read timeout, at most so many connections, a bounded connection life, and a
//!   graceful end (HTTP/1 after the current response, HTTP/2 with GOAWAY) bounded in time.
//! - [`Terminate`]: SIGTERM and SIGINT, which end every `squall` command that runs.
//! - [`init_logging`]: the one logging set-up of the `squall` binary's commands.
//! - [`metrics`]: registering Prometheus metrics in a part's own registry, and rendering it.
//!
//! This crate sits under `balancer/` because serving HTTP is the balancer's trade, but it
//! knows nothing of balancing: forkd uses it too, and depends on nothing else of the balancer.
#![forbid(unsafe_code)]

pub mod metrics;
mod server;
mod shutdown;
mod terminate;

pub use server::{FirstByte, HttpServer, Limits};
pub use shutdown::{Shutdown, Stop};
pub use terminate::Terminate;

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
