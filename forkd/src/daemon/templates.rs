//! Templates: validating a spec, warming it through its driver, listing and deleting it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use super::Daemon;
use crate::api::{Driver, Protocol, TemplateInfo, TemplateList, TemplateSpec};
use crate::driver::TemplateKind;
use crate::driver::seed::{self, SnapshotBody};
use crate::error::{CreateTemplateError, DeleteTemplateError, SnapshotError};

/// A warm template: what it was created from, and what its driver keeps of it.
pub(super) struct Template {
    pub(super) spec: TemplateSpec,
    pub(super) kind: TemplateKind,
    /// Set under the clone map's lock once the template is deleted: a request that found it
    /// before may not list clones of it any more, and a `vm` clone started for it meanwhile
    /// is killed rather than recorded (nobody would kill it later).
    pub(super) retired: AtomicBool,
    /// The peer whose snapshot it was made from, if it was not booted here.
    pub(super) seeded_from: Option<String>,
}

impl Template {
    pub(super) fn new(spec: TemplateSpec, kind: TemplateKind) -> Self {
        Self {
            spec,
            kind,
            retired: AtomicBool::new(false),
            seeded_from: None,
        }
    }
}

/// A template's place in the map: taken while it warms up, so that its name is reserved but
/// nothing waits on it. The warming request holds the watch's sender until it is done, so
/// the watch closing says the template is ready, failed or stopped.
pub(super) enum TemplateSlot {
    Warming(watch::Receiver<()>),
    Ready(Arc<Template>),
}

impl TemplateSlot {
    /// The watch that closes when the template is done warming up, while it does.
    pub(super) fn warming(&self) -> Option<&watch::Receiver<()>> {
        match self {
            Self::Warming(done) => Some(done),
            Self::Ready(_) => None,
        }
    }

    /// The template, once it is warm.
    pub(super) fn ready(&self) -> Option<&Arc<Template>> {
        match self {
            Self::Ready(template) => Some(template),
            Self::Warming(_) => None,
        }
    }
}

/// Every template by name, behind one lock.
#[derive(Default)]
pub(super) struct Templates {
    pub(super) map: HashMap<String, TemplateSlot>,
    /// Set by shutdown: no template is created any more.
    pub(super) closing: bool,
}

/// Checks what the types cannot: the spec of `POST /v1/templates`, before anything starts.
pub(crate) fn validate(spec: &TemplateSpec) -> Result<(), CreateTemplateError> {
    let name = &spec.name;
    let valid_name = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !valid_name {
        return Err(CreateTemplateError::InvalidName(name.clone()));
    }
    match (&spec.image, spec.driver) {
        // An image names its own command; arguments given replace its `Cmd`.
        (Some(_), Driver::Vm) => {}
        (Some(_), driver) => return Err(CreateTemplateError::ImageNeedsVm(driver)),
        (None, _) if spec.command.first().is_none_or(|p| p.is_empty()) => {
            return Err(CreateTemplateError::EmptyCommand);
        }
        (None, _) => {}
    }
    if let Some(port) = spec.app_port
        && (port == 0 || spec.image.is_none())
    {
        return Err(CreateTemplateError::InvalidAppPort(port));
    }
    // Each becomes a C string for execve (or the image's path for open).
    let nul = |s: &str| s.contains('\0');
    if spec.command.iter().any(|word| nul(word)) {
        return Err(CreateTemplateError::NulByte("command"));
    }
    if let Some((name, _)) = spec
        .env
        .iter()
        .find(|(name, _)| name.is_empty() || name.contains('='))
    {
        return Err(CreateTemplateError::InvalidEnvName(name.clone()));
    }
    if spec.env.iter().any(|(name, value)| nul(name) || nul(value)) {
        return Err(CreateTemplateError::NulByte("env"));
    }
    if spec
        .image
        .as_ref()
        .is_some_and(|image| image.as_os_str().as_encoded_bytes().contains(&0))
    {
        return Err(CreateTemplateError::NulByte("image"));
    }
    // One request target: the readiness check sends `GET {health_path} HTTP/1.1`.
    let target = |path: &str| {
        path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
    };
    if !target(&spec.health_path) {
        return Err(CreateTemplateError::InvalidHealthPath(
            spec.health_path.clone(),
        ));
    }
    if spec.protocol == Protocol::H2c && spec.driver == Driver::Vm {
        return Err(CreateTemplateError::H2cOnVm);
    }
    if !(1..=600_000).contains(&spec.start_timeout_ms) {
        return Err(CreateTemplateError::InvalidTimeout(spec.start_timeout_ms));
    }
    if let Some(source) = &spec.source {
        validate_source(spec.driver, &source.url)?;
    }
    Ok(())
}

/// A snapshot source: a `vm` template's, and a plain `http://host[:port]` base URL.
fn validate_source(driver: Driver, url: &str) -> Result<(), CreateTemplateError> {
    let invalid = |why: &str| {
        Err(CreateTemplateError::InvalidSource(
            url.to_owned(),
            why.to_owned(),
        ))
    };
    if driver != Driver::Vm {
        return invalid("only vm templates are made from a peer's snapshot");
    }
    if url.len() > 2048 {
        return invalid("longer than 2048 bytes");
    }
    let Ok(uri) = url.parse::<http::Uri>() else {
        return invalid("not a URL");
    };
    if uri.scheme_str() != Some("http") {
        return invalid("expected http://");
    }
    match uri.authority() {
        None => invalid("expected a host"),
        Some(a) if a.as_str().contains('@') => invalid("no user information"),
        Some(a) if a.port_u16() == Some(0) => invalid("port 0"),
        Some(_) => match uri.path_and_query().map(|p| p.as_str()) {
            None | Some("" | "/") => Ok(()),
            Some(_) => invalid("expected no path or query"),
        },
    }
}

impl Daemon {
    pub(crate) async fn create_template(
        self: &Arc<Self>,
        spec: TemplateSpec,
    ) -> Result<TemplateInfo, CreateTemplateError> {
        validate(&spec)?;
        // Held until this returns: shutdown waits for it to close.
        let (_warming, done) = watch::channel(());
        {
            let mut templates = self.templates();
            if templates.closing {
                return Err(CreateTemplateError::ShuttingDown);
            }
            if templates.map.contains_key(&spec.name) {
                return Err(CreateTemplateError::Exists(spec.name));
            }
            templates
                .map
                .insert(spec.name.clone(), TemplateSlot::Warming(done));
        }
        let started = TemplateKind::start(&spec, &self.config, &self.ids, self.lifeline()).await;
        if spec.source.is_some() {
            let outcome = if started.is_ok() { "ok" } else { "failed" };
            let received = started.as_ref().ok().and_then(TemplateKind::received_bytes);
            self.metrics
                .snapshot_transfers
                .with_label_values(&["received", outcome])
                .inc();
            self.metrics
                .snapshot_bytes
                .with_label_values(&["received"])
                .inc_by(received.unwrap_or(0));
        }
        let kind = match started {
            Ok(kind) => kind,
            Err(source) => {
                self.templates().map.remove(&spec.name);
                return Err(CreateTemplateError::Start {
                    name: spec.name,
                    source,
                });
            }
        };
        let mut spec = spec;
        // Where it came from is reported beside the spec: two hosts' templates of one app
        // have the same spec however each was made.
        let seeded_from = spec.source.take().map(|s| s.url);
        let template = Arc::new(Template {
            seeded_from,
            ..Template::new(spec, kind)
        });
        let name = template.spec.name.clone();
        let closing = {
            let mut templates = self.templates();
            if templates.closing {
                templates.map.remove(&name);
            } else {
                templates
                    .map
                    .insert(name, TemplateSlot::Ready(template.clone()));
            }
            templates.closing
        };
        if closing {
            // Shutdown began while it warmed up, and waits for this.
            template.kind.stop().await;
            return Err(CreateTemplateError::ShuttingDown);
        }
        self.supervise(Arc::clone(&template));
        Ok(self.template_info(&template))
    }

    fn template_info(&self, template: &Template) -> TemplateInfo {
        let clones = self
            .clones()
            .records
            .values()
            .filter(|r| r.info.template == template.spec.name)
            .count();
        TemplateInfo {
            spec: template.spec.clone(),
            pid: template.kind.pid(),
            alive: template.kind.alive(),
            clones,
            seeded_from: template.seeded_from.clone(),
        }
    }

    pub(super) fn ready_templates(&self) -> Vec<Arc<Template>> {
        let templates = self.templates();
        let slots = templates.map.values();
        slots.filter_map(TemplateSlot::ready).cloned().collect()
    }

    pub(crate) fn template_list(&self) -> TemplateList {
        let ready = self.ready_templates();
        let mut templates: Vec<_> = ready.iter().map(|t| self.template_info(t)).collect();
        templates.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        TemplateList { templates }
    }

    /// The `vm` template `name`'s snapshot, streamed as it is written.
    pub(crate) fn snapshot(&self, name: &str) -> Result<SnapshotBody, SnapshotError> {
        let template = match self.templates().map.get(name) {
            Some(TemplateSlot::Ready(template)) => Arc::clone(template),
            Some(TemplateSlot::Warming(_)) => {
                return Err(SnapshotError::Warming(name.to_owned()));
            }
            None => return Err(SnapshotError::NotFound(name.to_owned())),
        };
        match &template.kind {
            TemplateKind::Vm(vm) => {
                let permit = Arc::clone(&self.exports).try_acquire_owned().map_err(|_| {
                    SnapshotError::Busy {
                        name: name.to_owned(),
                        max: seed::MAX_EXPORTS,
                    }
                })?;
                Ok(seed::export(
                    Arc::clone(vm.template()),
                    &template.spec,
                    &self.metrics,
                    permit,
                ))
            }
            other => Err(SnapshotError::NotPortable {
                name: name.to_owned(),
                driver: other.driver(),
            }),
        }
    }

    /// Kills the template's clones (waiting for those still starting), then stops it.
    pub(crate) async fn delete_template(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(), DeleteTemplateError> {
        let template = {
            let mut templates = self.templates();
            match templates.map.get(name) {
                Some(TemplateSlot::Ready(template)) => {
                    let template = template.clone();
                    templates.map.remove(name);
                    template
                }
                Some(TemplateSlot::Warming(_)) => {
                    return Err(DeleteTemplateError::Warming(name.to_owned()));
                }
                None => return Err(DeleteTemplateError::NotFound(name.to_owned())),
            }
        };
        let ids: Vec<String> = {
            let clones = self.clones();
            template.retired.store(true, Ordering::Release);
            clones
                .records
                .values()
                .filter(|r| r.info.template == name)
                .map(|r| r.info.id.clone())
                .collect()
        };
        self.kill_all(ids).await;
        template.kind.stop().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorCode;
    use crate::error::ApiError;

    fn source(url: &str) -> crate::api::SnapshotSource {
        crate::api::SnapshotSource { url: url.into() }
    }

    #[test]
    fn a_spec_is_validated_field_by_field() {
        let valid = TemplateSpec::new("web-1", Driver::Spawn, vec!["app".into()]);
        assert!(validate(&valid).is_ok());
        type Spoil = fn(&mut TemplateSpec);
        let cases: [(&str, Spoil); 22] = [
            ("a source for fork", |s| {
                s.source = Some(source("http://10.0.0.7:7070"));
            }),
            ("a source on port 0", |s| {
                s.driver = Driver::Vm;
                s.source = Some(source("http://peer:0"));
            }),
            ("a source with a path", |s| {
                s.driver = Driver::Vm;
                s.source = Some(source("http://peer:7070/v1"));
            }),
            ("a source with a password", |s| {
                s.driver = Driver::Vm;
                s.source = Some(source("http://a:b@peer:7070"));
            }),
            ("Web", |s| s.name = "Web".into()),
            ("-web", |s| s.name = "-web".into()),
            ("64 characters", |s| s.name = "a".repeat(64)),
            ("no command", |s| s.command.clear()),
            ("a relative health path", |s| {
                s.health_path = "healthz".into()
            }),
            ("a zero timeout", |s| s.start_timeout_ms = 0),
            ("an image for spawn", |s| {
                s.image = Some("/images/app".into())
            }),
            ("an app port without an image", |s| s.app_port = Some(8000)),
            ("h2c under vm", |s| {
                s.driver = Driver::Vm;
                s.protocol = Protocol::H2c;
            }),
            // Found by the forkd_api fuzz target, with the checks of what a driver takes
            // for granted (forkd::fuzzing::check_accepted): each was accepted, and failed
            // only when the template started, or misled the app.
            ("an empty environment name", |s| {
                s.env.insert(String::new(), "1".into());
            }),
            ("an environment name with '='", |s| {
                s.env.insert("A=B".into(), "1".into());
            }),
            ("a NUL in an environment value", |s| {
                s.env.insert("A".into(), "1\0".into());
            }),
            ("a NUL in the command", |s| s.command.push("a\0b".into())),
            ("a NUL in the image path", |s| {
                s.driver = Driver::Vm;
                s.image = Some("/images/a\0b".into());
            }),
            ("a space in the health path", |s| {
                s.health_path = "/healthz HTTP/1.0".into()
            }),
            ("a line break in the health path", |s| {
                s.health_path = "/\r\nX-Injected: 1".into()
            }),
            ("a fragment in the health path", |s| {
                s.health_path = "/healthz#top".into()
            }),
            ("app port 0", |s| {
                s.driver = Driver::Vm;
                s.image = Some("/images/app".into());
                s.app_port = Some(0);
            }),
        ];
        let mut seeded = TemplateSpec::new("web-1", Driver::Vm, vec!["app".into()]);
        seeded.source = Some(source("http://10.0.0.7:7070/"));
        assert!(validate(&seeded).is_ok(), "a vm template from a peer");
        seeded.source = Some(source("http://forkd-0.forkd"));
        assert!(validate(&seeded).is_ok(), "a peer on port 80");
        let mut image = TemplateSpec::new("web-1", Driver::Vm, Vec::new());
        image.image = Some("/images/app".into());
        image.app_port = Some(8000);
        assert!(
            validate(&image).is_ok(),
            "an image needs no command, and may name its port"
        );
        for (what, spoil) in cases {
            let mut spec = valid.clone();
            spoil(&mut spec);
            let error = validate(&spec).err();
            assert!(
                error
                    .as_ref()
                    .is_some_and(|e| e.code() == ErrorCode::InvalidTemplate),
                "{what}: {error:?}"
            );
        }
    }
}
