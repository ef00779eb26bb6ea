//! A forkd host, as the scaler acts on it: make sure it has the template, clone it, kill a
//! clone, list what runs there. One small trait that [`forkd::Client`] implements and the
//! scaler's tests fake, and the one place where forkd's errors become what the scaler does
//! about them.

use std::future::Future;

use forkd::{CloneInfo, CloneState, TemplateInfo, TemplateSpec};

/// What a host runs, as one listing: every clone (of any template) and its clone limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    /// The clones the host knows.
    pub clones: Vec<CloneInfo>,
    /// The most clones it runs at once (`squall forkd --max-clones`); `None` if it does not
    /// say.
    pub max_clones: Option<usize>,
}

impl Listing {
    /// Clones of templates other than `template` that hold a slot (starting, ready or
    /// stopping).
    pub fn live_except(&self, template: &str) -> usize {
        self.clones
            .iter()
            .filter(|c| c.template != template && holds_slot(c.state))
            .count()
    }
}

/// Whether a clone in `state` holds one of its host's slots.
pub(crate) fn holds_slot(state: CloneState) -> bool {
    matches!(
        state,
        CloneState::Starting | CloneState::Ready | CloneState::Stopping
    )
}

/// Why a host did not do what was asked, sorted by what the scaler does about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HostError {
    /// The host has no such template (its daemon restarted without it): it is down until a
    /// check finds it again and creates the template again.
    #[error("the host has no such template: {0}")]
    NoTemplate(String),
    /// The host has no room for that many clones: it is asked for fewer.
    #[error("the host has no room for that many clones: {0}")]
    Full(String),
    /// A template of that name is there already.
    #[error("the host has a template of that name already: {0}")]
    Exists(String),
    /// The template is warming up (started again after its process died): the host is
    /// asked again shortly.
    #[error("the host's template is warming up: {0}")]
    Warming(String),
    /// The host tried and failed (the app did not start), or refused the request.
    #[error("the host failed the request: {0}")]
    Failed(String),
    /// The host could not be reached, or its answer could not be read.
    #[error("the host did not answer: {0}")]
    Unreachable(String),
}

/// A host the scaler clones on.
pub trait CloneHost: Clone + Send + Sync + 'static {
    /// Creates (and warms) a template.
    fn create_template(
        &self,
        spec: &TemplateSpec,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The templates the host has.
    fn templates(&self) -> impl Future<Output = Result<Vec<TemplateInfo>, HostError>> + Send;
    /// Deletes a template and its clones.
    fn delete_template(&self, name: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Makes `count` clones of `template`; every clone asked for is in the answer, ready or
    /// failed.
    fn clone_workers(
        &self,
        template: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<CloneInfo>, HostError>> + Send;
    /// Kills a clone.
    fn kill(&self, clone: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// What runs on the host.
    fn list(&self) -> impl Future<Output = Result<Listing, HostError>> + Send;
}

/// The answer to `request`, or [`HostError::Unreachable`] if none came within `limit`.
pub(crate) async fn within<T>(
    limit: std::time::Duration,
    request: impl Future<Output = Result<T, HostError>>,
) -> Result<T, HostError> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            Err(HostError::Unreachable(format!(
                "no answer within {limit:?}"
            )))
        })
}

/// What a forkd error means to the scaler, by the error's code (never its HTTP status).
fn host_error(error: forkd::ClientError) -> HostError {
    use forkd::ErrorCode;
    let text = error.to_string();
    match error.code() {
        Some(ErrorCode::TemplateNotFound) => HostError::NoTemplate(text),
        Some(ErrorCode::TemplateExists) => HostError::Exists(text),
        Some(ErrorCode::TemplateWarming) => HostError::Warming(text),
        Some(ErrorCode::NoCapacity | ErrorCode::InvalidCount) => HostError::Full(text),
        // A daemon on its way out is as good as gone; its next check says so.
        Some(ErrorCode::ShuttingDown) | None => HostError::Unreachable(text),
        Some(_) => HostError::Failed(text),
    }
}

impl CloneHost for forkd::Client {
    async fn create_template(&self, spec: &TemplateSpec) -> Result<(), HostError> {
        forkd::Client::create_template(self, spec)
            .await
            .map(drop)
            .map_err(host_error)
    }

    async fn templates(&self) -> Result<Vec<TemplateInfo>, HostError> {
        forkd::Client::templates(self).await.map_err(host_error)
    }

    async fn delete_template(&self, name: &str) -> Result<(), HostError> {
        forkd::Client::delete_template(self, name)
            .await
            .map_err(host_error)
    }

    async fn clone_workers(&self, template: &str, count: u32) -> Result<Vec<CloneInfo>, HostError> {
        self.create_clones(template, count as usize)
            .await
            .map_err(host_error)
    }

    async fn kill(&self, clone: &str) -> Result<(), HostError> {
        match forkd::Client::kill(self, clone).await {
            // Gone already: what a kill wants.
            Err(e) if e.code() == Some(forkd::ErrorCode::CloneNotFound) => Ok(()),
            result => result.map_err(host_error),
        }
    }

    async fn list(&self) -> Result<Listing, HostError> {
        let list = self.clones().await.map_err(host_error)?;
        Ok(Listing {
            clones: list.clones,
            // 0: a daemon too old to say.
            max_clones: (list.max_clones > 0).then_some(list.max_clones),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: forkd::ErrorCode) -> forkd::ClientError {
        forkd::ClientError::Api {
            status: code.status(),
            code,
            message: "m".into(),
        }
    }

    #[test]
    fn forkd_errors_are_sorted_by_their_code() {
        use forkd::ErrorCode::*;
        let kind = |e| match host_error(e) {
            HostError::NoTemplate(_) => "down",
            HostError::Full(_) => "full",
            HostError::Exists(_) => "exists",
            HostError::Warming(_) => "soon",
            HostError::Failed(_) => "rest",
            HostError::Unreachable(_) => "unreachable",
        };
        let cases = [
            (TemplateNotFound, "down"),
            (NoCapacity, "full"),
            (InvalidCount, "full"),
            (TemplateExists, "exists"),
            (TemplateWarming, "soon"),
            (ClonesFailed, "rest"),
            (TemplateFailed, "rest"),
            (Internal, "rest"),
            (Unauthorized, "rest"),
            (ShuttingDown, "unreachable"),
            (Unknown, "rest"),
        ];
        for (code, expected) in cases {
            assert_eq!(kind(api(code)), expected, "{code:?}");
        }
        let undecodable = serde_json::from_str::<u8>("not json").unwrap_err();
        assert_eq!(kind(forkd::ClientError::Decode(undecodable)), "unreachable");
    }
}
