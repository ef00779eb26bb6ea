//! forkd, the per-host fork daemon: it warms templates and clones workers from them through a
//! driver, and kills clones when asked.
//!
//! * [`serve`] runs the daemon (the HTTP/JSON API v1) on a listener until a shutdown future
//!   completes; `squall forkd` wraps it, and anything else can embed it.
//! * [`Client`] is the typed client for that API.
//! * Drivers: `spawn` starts the command afresh per clone (the cold-start baseline); `fork`
//!   starts it once as a zygote (the [`zygote`] crate) and forks warm clones from it.
#![forbid(unsafe_code)]

pub mod api;
mod client;
mod daemon;
mod fork;
mod metrics;
mod server;
mod spawn;

pub use api::{CloneInfo, CloneState, Driver, ExitStatus, TemplateInfo, TemplateSpec};
pub use client::{Client, ClientError};
pub use daemon::Config;
pub use fork::StartError;
pub use server::{MAX_BODY, ServeError, serve};
