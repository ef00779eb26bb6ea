//! The JSON types of forkd's HTTP API v1, shared by the daemon and the [`crate::Client`].

use std::collections::BTreeMap;
use std::net::SocketAddr;

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
    /// TCG otherwise). The app listens on port 80 in the guest (`PORT`).
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

/// `POST /v1/templates`: what to run and how to clone it. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The template's name: 1 to 63 of `[a-z0-9-]`, starting with a letter or digit.
    pub name: String,
    /// How clones are made.
    pub driver: Driver,
    /// The program and its arguments. With `spawn`, `{port}` and `{host}` in an argument are
    /// replaced by the clone's port and address (also given as `PORT` and `HOST`).
    pub command: Vec<String>,
    /// Extra environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `spawn` only: the path that answers 200 once a clone is ready. Default `/healthz`.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// How long a `fork` template may take to warm up, or a `spawn` clone to become ready,
    /// in milliseconds. Default 30 000.
    #[serde(default = "default_start_timeout_ms")]
    pub start_timeout_ms: u64,
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
            env: BTreeMap::new(),
            health_path: default_health_path(),
            start_timeout_ms: default_start_timeout_ms(),
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
    /// What went wrong, for a human.
    pub error: String,
}
