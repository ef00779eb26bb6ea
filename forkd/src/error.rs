//! What can go wrong in each operation the API offers, one enum per operation, and the
//! [`ErrorCode`] each error is answered with. The HTTP status follows from the code
//! ([`ErrorCode::status`]), so it is decided in one place.

use std::error::Error;

use crate::api::{Driver, ErrorCode};
use crate::driver::{StartCloneError, StartTemplateError};

/// An error the API answers with: the message is the error and its sources, the code says
/// what it is to a program.
pub(crate) trait ApiError: Error {
    fn code(&self) -> ErrorCode;
}

/// An error and its sources, joined by ": ".
pub(crate) fn message(error: &(dyn Error + 'static)) -> String {
    lifecycle::ErrorChain(error).to_string()
}

/// Why `POST /v1/templates` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateTemplateError {
    #[error(
        "invalid template name {0:?}: expected 1 to 63 of [a-z0-9-], starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("invalid command: expected a non-empty list whose first element is the program")]
    EmptyCommand,
    #[error("an image is run by the vm driver only, not by {}", .0.as_str())]
    ImageNeedsVm(Driver),
    #[error("invalid app_port {0}: expected 1 to 65535, with an image")]
    InvalidAppPort(u16),
    #[error(
        "invalid health_path {0:?}: expected a path starting with '/', of visible ASCII (no spaces, no '#')"
    )]
    InvalidHealthPath(String),
    #[error("invalid environment variable name {0:?}: expected a non-empty name without '='")]
    InvalidEnvName(String),
    #[error("{0} holds a NUL byte, which no program can be given")]
    NulByte(&'static str),
    #[error(
        "protocol h2c is for the spawn and fork drivers: vm checks a clone's health over HTTP/1.1"
    )]
    H2cOnVm,
    #[error("invalid start_timeout_ms {0}: expected 1 to 600000")]
    InvalidTimeout(u64),
    #[error("invalid source {0:?}: {1}")]
    InvalidSource(String, String),
    #[error("template {0:?} already exists")]
    Exists(String),
    #[error("forkd is shutting down")]
    ShuttingDown,
    #[error("starting template {name:?} failed")]
    Start {
        name: String,
        #[source]
        source: StartTemplateError,
    },
}

impl ApiError for CreateTemplateError {
    fn code(&self) -> ErrorCode {
        match self {
            CreateTemplateError::InvalidName(_)
            | CreateTemplateError::EmptyCommand
            | CreateTemplateError::ImageNeedsVm(_)
            | CreateTemplateError::InvalidAppPort(_)
            | CreateTemplateError::InvalidHealthPath(_)
            | CreateTemplateError::InvalidEnvName(_)
            | CreateTemplateError::NulByte(_)
            | CreateTemplateError::H2cOnVm
            | CreateTemplateError::InvalidTimeout(_)
            | CreateTemplateError::InvalidSource(..) => ErrorCode::InvalidTemplate,
            CreateTemplateError::Exists(_) => ErrorCode::TemplateExists,
            CreateTemplateError::ShuttingDown => ErrorCode::ShuttingDown,
            CreateTemplateError::Start { .. } => ErrorCode::TemplateFailed,
        }
    }
}

/// Why `DELETE /v1/templates/{name}` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteTemplateError {
    #[error("template {0:?} not found")]
    NotFound(String),
    #[error("template {0:?} is still warming up")]
    Warming(String),
}

impl ApiError for DeleteTemplateError {
    fn code(&self) -> ErrorCode {
        match self {
            DeleteTemplateError::NotFound(_) => ErrorCode::TemplateNotFound,
            DeleteTemplateError::Warming(_) => ErrorCode::TemplateWarming,
        }
    }
}

/// Why `GET /v1/templates/{name}/snapshot` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
    #[error("template {0:?} not found")]
    NotFound(String),
    #[error("template {0:?} is still warming up")]
    Warming(String),
    #[error("template {name:?} is a {} template: only vm templates have a portable snapshot", .driver.as_str())]
    NotPortable { name: String, driver: Driver },
    #[error(
        "template {name:?}: {max} snapshots are being sent already; ask another peer, or later"
    )]
    Busy { name: String, max: usize },
}

impl ApiError for SnapshotError {
    fn code(&self) -> ErrorCode {
        match self {
            SnapshotError::NotFound(_) => ErrorCode::TemplateNotFound,
            SnapshotError::Warming(_) => ErrorCode::TemplateWarming,
            SnapshotError::NotPortable { .. } => ErrorCode::NotPortable,
            SnapshotError::Busy { .. } => ErrorCode::NoCapacity,
        }
    }
}

/// Why `POST /v1/templates/{name}/clones` failed as a whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateClonesError {
    #[error("invalid count {count}: expected 1 to {max} (the daemon's --max-clones)")]
    InvalidCount { count: usize, max: usize },
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    #[error("template {0:?} is still warming up")]
    TemplateWarming(String),
    #[error("template {0:?} cannot make clones: the template process has exited")]
    TemplateDead(String),
    #[error("{count} more clones would exceed --max-clones {max} ({used} live or starting)")]
    NoCapacity {
        count: usize,
        used: usize,
        max: usize,
    },
    #[error("forkd is shutting down")]
    ShuttingDown,
    #[error("could not bind a socket for a clone")]
    Bind(#[source] std::io::Error),
    #[error("all {count} clones failed; the first")]
    AllFailed {
        count: usize,
        #[source]
        first: CloneFailure,
    },
}

/// Why one clone of a request failed: its `error` in the answer, or the cause of
/// [`CreateClonesError::AllFailed`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneFailure {
    #[error(transparent)]
    Start(#[from] StartCloneError),
    #[error("its template was deleted while it started")]
    TemplateDeleted,
    #[error("forkd is shutting down")]
    ShuttingDown,
}

impl ApiError for CreateClonesError {
    fn code(&self) -> ErrorCode {
        match self {
            CreateClonesError::InvalidCount { .. } => ErrorCode::InvalidCount,
            CreateClonesError::TemplateNotFound(_) => ErrorCode::TemplateNotFound,
            CreateClonesError::TemplateWarming(_) => ErrorCode::TemplateWarming,
            CreateClonesError::TemplateDead(_) => ErrorCode::TemplateFailed,
            CreateClonesError::NoCapacity { .. } => ErrorCode::NoCapacity,
            CreateClonesError::ShuttingDown => ErrorCode::ShuttingDown,
            CreateClonesError::Bind(_) => ErrorCode::Internal,
            CreateClonesError::AllFailed { .. } => ErrorCode::ClonesFailed,
        }
    }
}

/// Why `DELETE /v1/clones/{id}` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KillError {
    #[error("clone {0:?} not found")]
    NotFound(String),
    #[error("clone {0:?} is still starting; kill it once it is ready")]
    Starting(String),
}

impl ApiError for KillError {
    fn code(&self) -> ErrorCode {
        match self {
            KillError::NotFound(_) => ErrorCode::CloneNotFound,
            KillError::Starting(_) => ErrorCode::CloneStarting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_every_source() {
        let error = CreateClonesError::Bind(std::io::Error::other("no ports left"));
        assert_eq!(
            message(&error),
            "could not bind a socket for a clone: no ports left"
        );
        assert_eq!(error.code(), ErrorCode::Internal);
    }
}
