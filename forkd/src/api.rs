//! The JSON types of forkd's HTTP API v1, shared by the daemon and the [`crate::Client`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// How clones of a template are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Start the command afresh for each clone (a cold start: the baseline).
    Spawn,
    /// Start the command once as a zygote and fork each clone from it, warm.
    Fork,
    /// Boot the command as the app of a microVM, snapshot it warm, and restore each clone
    /// from the snapshot with copy-on-write memory (QEMU; KVM where it can run the guest,
    /// TCG otherwise). The app listens on port 80 in the guest (`PORT`), or, run from a
    /// container image, on the port the image exposes.
    Vm,
}

impl Driver {
    /// The name used in the API and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Spawn => "spawn",
            Driver::Fork => "fork",
            Driver::Vm => "vm",
        }
    }
}

/// The protocol a template's app serves its clients with, which a `spawn` clone's readiness
/// check speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1: a clone is ready once `GET health_path` answers 200.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (gRPC servers): a clone is ready once it answers the
    /// HTTP/2 connection preface with its SETTINGS; a gRPC server has no page to `GET`.
    H2c,
}

impl Protocol {
    fn is_http1(&self) -> bool {
        *self == Self::Http1
    }
}

/// `POST /v1/templates`: what to run and how to clone it. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The template's name: 1 to 63 of `[a-z0-9-]`, starting with a letter or digit.
    pub name: String,
    /// How clones are made.
    pub driver: Driver,
    /// The program and its arguments. With `spawn`, `{port}` and `{host}` in an argument are
    /// replaced by the clone's port and address (also given as `PORT` and `HOST`). With
    /// `image`, the arguments that replace the image's `Cmd` (may be empty: the image's own).
    pub command: Vec<String>,
    /// `vm` only: a container image on forkd's host to run instead of a single executable,
    /// an OCI image layout directory or an image archive (`docker save`, OCI archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// With `image`: the port the app listens on in the guest, instead of the first port the
    /// image exposes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_port: Option<u16>,
    /// Extra environment variables for the command: names non-empty and without `=`, and no
    /// NUL in a name, a value or a word of `command`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `spawn` only: the path that answers 200 once a clone is ready. Default `/healthz`; a
    /// request target of visible ASCII starting with `/` (no space, no `#`).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// The protocol the app serves: how a `spawn` clone's readiness is checked (`fork` clones
    /// say they are ready themselves). Default `http1`; `h2c` is not for `vm`, whose check
    /// is `GET health_path`.
    #[serde(default, skip_serializing_if = "Protocol::is_http1")]
    pub protocol: Protocol,
    /// How long a `fork` template may take to warm up, a `spawn` clone to become ready, a
    /// `vm` template to boot, or its snapshot to come from a `source`, in milliseconds.
    /// Default 30 000.
    #[serde(default = "default_start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// `vm` only: make the template from the snapshot of the same template on a peer forkd
    /// instead of booting it (see [`SnapshotSource`]). Not kept in the template's spec: the
    /// template lists where it came from in [`TemplateInfo::seeded_from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SnapshotSource>,
}

/// Where a `vm` template's snapshot comes from: a peer forkd that has a template of the same
/// name and spec (its `image` may be another path, if the image's root filesystem has the
/// same digest). The peer is asked with this daemon's own token: every forkd of a cluster
/// shares one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSource {
    /// The peer's base URL, such as `http://10.0.0.7:7070`: `http`, a host and a port (80 if
    /// none), no path. This daemon sends its own token there.
    pub url: String,
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}

fn default_start_timeout_ms() -> u64 {
    30_000
}

impl TemplateSpec {
    /// A spec with the defaults for everything but name, driver and command.
    pub fn new(name: impl Into<String>, driver: Driver, command: Vec<String>) -> TemplateSpec {
        TemplateSpec {
            name: name.into(),
            driver,
            command,
            image: None,
            app_port: None,
            env: BTreeMap::new(),
            health_path: default_health_path(),
            protocol: Protocol::Http1,
            start_timeout_ms: default_start_timeout_ms(),
            source: None,
        }
    }

    /// The spec without its `source` and `image` path: what two hosts' templates of one
    /// app have in common, whichever way each was made.
    pub fn portable(&self) -> TemplateSpec {
        TemplateSpec {
            source: None,
            image: self.image.as_ref().map(|_| PathBuf::new()),
            ..self.clone()
        }
    }
}

/// A template as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// The spec it was created from.
    pub spec: TemplateSpec,
    /// The warm template process (`fork` only).
    pub pid: Option<u32>,
    /// Whether the template can still make clones (a `fork` template whose process died cannot).
    pub alive: bool,
    /// How many of its clones the daemon tracks.
    pub clones: usize,
    /// The peer it was made from (`source` when it was created), if not booted here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeded_from: Option<String>,
}

/// `POST /v1/templates/{name}/clones`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// How many clones to make: at least 1, at most the daemon's `--max-clones`.
    pub count: usize,
}

/// Where a clone is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneState {
    /// Started, not yet ready.
    Starting,
    /// Accepting connections on its address.
    Ready,
    /// Being killed on request.
    Stopping,
    /// Ended on its own (crashed or exited); `exit` says how. Stays listed until deleted.
    Exited,
    /// Could not be started; `error` says why. Not kept by the daemon.
    Failed,
}

/// How a clone's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
    /// It is gone, but how it ended is unknown (yet).
    Unknown,
}

/// One clone as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneInfo {
    /// Unique on this daemon: `<template>-<n>`.
    pub id: String,
    /// The template it was cloned from.
    pub template: String,
    /// The driver that made it.
    pub driver: Driver,
    /// Where it serves HTTP.
    pub addr: SocketAddr,
    /// Its process id, once known.
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub state: CloneState,
    /// `state == Ready`: it accepts connections. For `fork` clones the socket is listening
    /// before the fork, so connections made now are served as soon as the child runs.
    pub ready: bool,
    /// How it ended, when `state == Exited`.
    pub exit: Option<ExitStatus>,
    /// Why it failed, when `state == Failed`.
    pub error: Option<String>,
}

/// The answer to a clone request and to `GET /v1/clones`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneList {
    /// The clones.
    pub clones: Vec<CloneInfo>,
    /// The daemon's `--max-clones`: at most this many clones live (starting, ready or
    /// stopping) at once, so a scaler can place clones by the room each host has left.
    /// 0 from a daemon too old to say.
    #[serde(default)]
    pub max_clones: usize,
}

/// The answer to `GET /v1/templates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateList {
    /// The templates.
    pub templates: Vec<TemplateInfo>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human: the error and its causes, joined by ": ".
    pub error: String,
    /// What went wrong, for a program: act on this, not on the HTTP status or the message.
    /// [`ErrorCode::Unknown`] from a daemon too old to send one.
    #[serde(default)]
    pub code: ErrorCode,
}

/// The machine-readable `code` of an error response. Each code has one HTTP status
/// ([`ErrorCode::status`]); the crate docs list them. New codes may be added: a client
/// decodes one it does not know as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not the JSON the endpoint takes (syntax, a missing or unknown field,
    /// a wrong type).
    BadRequest,
    /// 401: the bearer token is missing or wrong.
    Unauthorized,
    /// 404: no such endpoint.
    NotFound,
    /// 405: the endpoint exists, the method is not allowed on it.
    MethodNotAllowed,
    /// 413: the body is larger than [`crate::MAX_BODY`].
    BodyTooLarge,
    /// 422: the template spec is well-formed JSON but invalid (its name, command,
    /// environment, image path, health path or start timeout).
    InvalidTemplate,
    /// 422: a clone count of 0, or more than the daemon's `--max-clones`: never possible.
    InvalidCount,
    /// 404: no template of that name.
    TemplateNotFound,
    /// 409: a template of that name exists already (or is warming up).
    TemplateExists,
    /// 409: the template is still warming up: it cannot be cloned or deleted yet.
    TemplateWarming,
    /// 502: the template could not be started, or (when cloning) its process has died.
    TemplateFailed,
    /// 404: no clone of that id.
    CloneNotFound,
    /// 409: the clone is still starting; kill it once it is ready.
    CloneStarting,
    /// 503: that many more clones would exceed `--max-clones` now (fewer may fit, or later),
    /// or the daemon is sending as many snapshots as it sends at once.
    NoCapacity,
    /// 502: every clone of the request failed to start (the app did not come up).
    ClonesFailed,
    /// 503: the daemon is shutting down and starts nothing more.
    ShuttingDown,
    /// 500: the daemon itself failed (it could not bind a clone's socket, say).
    Internal,
    /// 409: the template has no portable snapshot: only `vm` templates have one.
    NotPortable,
    /// A code this client does not know (from a newer daemon), or none at all.
    #[default]
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code a daemon sends (all but [`ErrorCode::Unknown`]).
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BodyTooLarge,
        ErrorCode::InvalidTemplate,
        ErrorCode::InvalidCount,
        ErrorCode::TemplateNotFound,
        ErrorCode::TemplateExists,
        ErrorCode::TemplateWarming,
        ErrorCode::TemplateFailed,
        ErrorCode::CloneNotFound,
        ErrorCode::CloneStarting,
        ErrorCode::NoCapacity,
        ErrorCode::ClonesFailed,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::NotPortable,
    ];

    /// The HTTP status a daemon answers with this code (500 for [`ErrorCode::Unknown`]).
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NotFound | ErrorCode::TemplateNotFound | ErrorCode::CloneNotFound => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidTemplate | ErrorCode::InvalidCount => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::TemplateExists
            | ErrorCode::TemplateWarming
            | ErrorCode::CloneStarting
            | ErrorCode::NotPortable => StatusCode::CONFLICT,
            ErrorCode::TemplateFailed | ErrorCode::ClonesFailed => StatusCode::BAD_GATEWAY,
            ErrorCode::NoCapacity | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal | ErrorCode::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code as it appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::InvalidTemplate => "invalid_template",
            ErrorCode::InvalidCount => "invalid_count",
            ErrorCode::TemplateNotFound => "template_not_found",
            ErrorCode::TemplateExists => "template_exists",
            ErrorCode::TemplateWarming => "template_warming",
            ErrorCode::TemplateFailed => "template_failed",
            ErrorCode::CloneNotFound => "clone_not_found",
            ErrorCode::CloneStarting => "clone_starting",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::ClonesFailed => "clones_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::NotPortable => "not_portable",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_on_the_wire_and_unknown_ones_decode_as_unknown() {
        for code in ErrorCode::ALL.into_iter().chain([ErrorCode::Unknown]) {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{code}\""));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        let newer: ErrorBody =
            serde_json::from_str(r#"{"error":"x","code":"quota_exceeded"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
        let older: ErrorBody = serde_json::from_str(r#"{"error":"x"}"#).unwrap();
        assert_eq!(older.code, ErrorCode::Unknown);
    }

    #[test]
    fn every_code_is_documented_in_the_crate_docs_with_its_status() {
        let docs = include_str!("lib.rs");
        for code in ErrorCode::ALL {
            let row = format!("| `{code}` | {} |", code.status().as_u16());
            assert!(docs.contains(&row), "the crate docs lack the row {row:?}");
        }
    }

    #[test]
    fn all_lists_every_code_a_daemon_sends() {
        // A new code fails to compile here until it is sorted: add it to `ALL` (and to the
        // table in the crate docs, which the test above checks).
        let sent = |code: ErrorCode| match code {
            ErrorCode::BadRequest
            | ErrorCode::Unauthorized
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::BodyTooLarge
            | ErrorCode::InvalidTemplate
            | ErrorCode::InvalidCount
            | ErrorCode::TemplateNotFound
            | ErrorCode::TemplateExists
            | ErrorCode::TemplateWarming
            | ErrorCode::TemplateFailed
            | ErrorCode::CloneNotFound
            | ErrorCode::CloneStarting
            | ErrorCode::NoCapacity
            | ErrorCode::ClonesFailed
            | ErrorCode::ShuttingDown
            | ErrorCode::Internal
            | ErrorCode::NotPortable => true,
            ErrorCode::Unknown => false,
        };
        let distinct: std::collections::HashSet<_> = ErrorCode::ALL.into_iter().collect();
        assert_eq!(distinct.len(), ErrorCode::ALL.len());
        assert!(ErrorCode::ALL.into_iter().all(sent));
    }

    #[test]
    fn a_clone_list_from_an_older_daemon_has_no_max_clones() {
        let list: CloneList = serde_json::from_str(r#"{"clones":[]}"#).unwrap();
        assert_eq!(list.max_clones, 0);
    }
}
