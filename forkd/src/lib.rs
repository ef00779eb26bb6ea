//! forkd, the per-host fork daemon: it warms templates and clones workers from them through a
//! driver, and kills clones when asked.
//!
//! * [`serve`] runs the daemon (the HTTP/JSON API v1) on a listener until a shutdown future
//!   completes; `squall forkd` wraps it, and anything else can embed it.
//! * [`Client`] is the typed client for that API.
//! * Drivers: `spawn` starts the command afresh per clone (the cold-start baseline); `fork`
//!   starts it once as a zygote (the [`zygote`] crate) and forks warm clones from it.
//!
//! What a scaler does with it:
//!
//! ```no_run
//! use forkd::{Client, Driver, TemplateSpec};
//! # async fn scale() -> Result<(), forkd::ClientError> {
//! let forkd = Client::new("http://127.0.0.1:7070", "token")?;
//! let command = vec!["warm-app".to_owned(), "--warmup-ms".to_owned(), "2000".to_owned()];
//! forkd.create_template(&TemplateSpec::new("web", Driver::Fork, command)).await?; // warms once
//! for clone in forkd.create_clones("web", 4).await? {
//!     if clone.ready {
//!         // Add `clone.addr` to the balancer's pool; remember `clone.id` to kill it later.
//!     }
//! }
//! for clone in forkd.clones().await? {
//!     if clone.state == forkd::CloneState::Exited {
//!         forkd.kill(&clone.id).await?; // crashed: take it out of the pool, then forget it
//!     }
//! }
//! # Ok(()) }
//! ```
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
