//! forkd, the per-host fork daemon: it warms templates and clones workers from them through a
//! driver, and kills clones when asked.
//!
//! * [`serve`] runs the daemon (the HTTP/JSON API v1) on a listener until a
//!   [`lifecycle::Shutdown`] comes; `squall forkd` wraps it, and anything else can embed it.
//! * [`Client`] is the typed client for that API.
//! * Drivers: `spawn` starts the command afresh per clone (the cold-start baseline); `fork`
//!   starts it once as a zygote (the [`zygote`] crate) and forks warm clones from it; `vm`
//!   boots it in a microVM, snapshots it warm, and restores each clone from the snapshot.
//!
//! What a scaler does with it:
//!
//! ```no_run
//! use forkd::{Client, Driver, ErrorCode, TemplateSpec};
//! # async fn scale() -> Result<(), forkd::ClientError> {
//! let forkd = Client::new("http://127.0.0.1:7070", "token")?;
//! let command = vec!["warm-app".to_owned(), "--warmup-ms".to_owned(), "2000".to_owned()];
//! forkd.create_template(&TemplateSpec::new("web", Driver::Fork, command)).await?; // warms once
//! let listed = forkd.clones().await?;
//! let room = listed.max_clones.saturating_sub(listed.clones.len()); // exited ones count too
//! match forkd.create_clones("web", room.min(4)).await {
//!     Ok(clones) => {
//!         for clone in clones.iter().filter(|c| c.ready) {
//!             // Add `clone.addr` to the balancer's pool; remember `clone.id` to kill it later.
//!         }
//!     }
//!     Err(e) if e.code() == Some(ErrorCode::NoCapacity) => { /* another host, or fewer */ }
//!     Err(e) => return Err(e),
//! }
//! for clone in forkd.clones().await?.clones {
//!     if clone.state == forkd::CloneState::Exited {
//!         forkd.kill(&clone.id).await?; // crashed: take it out of the pool, then forget it
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # API v1
//!
//! JSON over HTTP/1.1 (or h2c); every `/v1` request carries `Authorization: Bearer <token>`.
//! The types are in [`api`].
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/templates` [`TemplateSpec`] | 201 [`TemplateInfo`], once the template is warm |
//! | `GET /v1/templates` | 200 `{"templates": [`[`TemplateInfo`]`]}` |
//! | `DELETE /v1/templates/{name}` | 204, once its clones are killed and it is stopped |
//! | `GET /v1/templates/{name}/snapshot` | 200 the `vm` template's portable snapshot, streamed (`application/vnd.squall.vm-snapshot`, see [`microvm::portable`]) |
//! | `POST /v1/templates/{name}/clones` `{"count": n}` | 201 [`CloneList`]: each clone ready or failed; an error only if all failed |
//! | `GET /v1/clones` | 200 [`CloneList`]: every clone, and the daemon's `max_clones` |
//! | `DELETE /v1/clones/{id}` | 204, once it is gone |
//! | `GET /healthz`, `GET /metrics` | 200, without the token |
//!
//! A `vm` template made on one host can be made on another without booting: `POST
//! /v1/templates` with `"source": {"url": "http://peer:7070"}` fetches the peer's snapshot of
//! the template of the same name (with this daemon's token), checks that the peer's spec is
//! the same and that the guest was saved on the same QEMU, machine, accelerator and CPU,
//! writes its RAM into a new RAM file as it arrives, and restores one standby from it before
//! answering 201. Whatever fails, nothing is left behind, and the request can be tried again
//! (or the template booted here, without `source`).
//!
//! At most `max_clones` (`--max-clones`) clones live at once, starting, ready or stopping: a
//! clone request reserves its slots before anything starts, so concurrent requests never
//! exceed it, whatever the driver.
//!
//! The listener takes up to 512 connections at once, each with 10 s to send a request head
//! (an idle keep-alive connection is closed after as long), and no fixed connection life: a
//! request may take as long as a template takes to warm up.
//!
//! ## Errors
//!
//! Every error is answered with `{"error": "<message and its causes>", "code": "<code>"}`.
//! Act on the code ([`ErrorCode`], or [`ClientError::code`]), not on the status or the
//! message; each code has one status. Codes may be added; clients decode an unknown one as
//! [`ErrorCode::Unknown`].
//!
//! | code | status | meaning |
//! |---|---|---|
//! | `bad_request` | 400 | the body is not the JSON the endpoint takes |
//! | `unauthorized` | 401 | the bearer token is missing or wrong |
//! | `not_found` | 404 | no such endpoint |
//! | `method_not_allowed` | 405 | the endpoint does not take that method |
//! | `body_too_large` | 413 | the body is larger than [`MAX_BODY`] |
//! | `invalid_template` | 422 | the template's name, command, environment, image path, health path or timeout is invalid |
//! | `invalid_count` | 422 | a clone count of 0, or above `max_clones`: never possible |
//! | `template_not_found` | 404 | no template of that name |
//! | `template_exists` | 409 | a template of that name exists (or is warming up) |
//! | `template_warming` | 409 | the template is still warming up (or again, after its process died): not yet cloned or deleted |
//! | `template_failed` | 502 | the template could not start, or its process has just died (it is started again at once) |
//! | `clone_not_found` | 404 | no clone of that id |
//! | `clone_starting` | 409 | the clone is still starting: kill it once it is ready |
//! | `no_capacity` | 503 | that many more clones would exceed `max_clones` now, or two snapshots are being sent already |
//! | `clones_failed` | 502 | every clone of the request failed to start |
//! | `shutting_down` | 503 | the daemon is shutting down and starts nothing more |
//! | `internal` | 500 | the daemon itself failed (it could not bind a clone's socket) |
//! | `not_portable` | 409 | the template has no portable snapshot (it is not a `vm` template) |
#![forbid(unsafe_code)]

pub mod api;
mod client;
mod config;
mod daemon;
mod driver;
mod error;
// The checks the fuzz targets in `fuzz/` run, for them and for this crate's tests.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod server;

pub use api::{
    CloneInfo, CloneList, CloneState, Driver, ErrorCode, ExitStatus, Protocol, SnapshotSource,
    TemplateInfo, TemplateSpec,
};
pub use client::{Client, ClientError};
pub use config::Config;
pub use server::{MAX_BODY, ServeError, serve};
