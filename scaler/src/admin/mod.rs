//! `squall up`'s admin listener: the live page, the merged Prometheus metrics, the status
//! JSON and the recent history the live page draws.
//!
//! - `GET /` (with `/live.js` and `/live.css`): the live page. Everything it needs is served
//!   from here (no external assets), and its Content-Security-Policy forbids anything else.
//! - `GET /metrics`: the balancer's, the scaler's and (when embedded) forkd's metrics.
//! - `GET /status`: the balancer's status JSON plus the scaler's last decision.
//! - `GET /api/history[?since=T]`: one sample per second for the last ten minutes, newer
//!   than `T` (seconds since the Unix epoch) when given.
//! - `GET /healthz`: `ok`, for probes.
//!
//! Nothing here changes state: the page and the endpoints only read.
//!
//! With a token ([`lifecycle::AdminAuth`], `squall up --admin-token-file`), `/status`,
//! `/api/history` and `/metrics` (unless left open) need `Authorization: Bearer <token>`; a
//! refusal is a `401` counted in the balancer's `squall_admin_unauthorized_total`. The page,
//! its script and style and `/healthz` show nothing of the process and stay open: the page
//! asks for the token when `/api/history` answers `401`, keeps it in the tab's
//! `sessionStorage` and sends it with every request.
//!
//! The listener runs on [`lifecycle::HttpServer`] with [`lifecycle::Limits::control`]: at
//! most 64 connections, 10 s to send a request head, 60 s per connection (a polling page or a
//! scraper simply reconnects).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use balancer::Balancer;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use lifecycle::{AdminAuth, HttpServer, Limits, Shows, Shutdown};
use policies::Policy;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{Metrics, Status};

/// How often the history takes a sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: ten minutes at one a second.
const HISTORY_LEN: usize = 600;
/// How long `/metrics` waits for an embedded forkd's metrics.
const FORKD_METRICS_TIMEOUT: Duration = Duration::from_secs(2);

const PAGE: &str = include_str!("live/index.html");
const SCRIPT: &str = include_str!("live/live.js");
const STYLE: &str = include_str!("live/live.css");
/// The page may load only what this listener serves.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// One second of `squall up`, as the live page draws it.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the Unix epoch.
    t: f64,
    desired: Option<u32>,
    ready: usize,
    pending: u32,
    draining: u32,
    panic: bool,
    /// Latency quantiles over the panic window, seconds; `None` without requests.
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
    /// Requests per second over the panic window.
    rate: f64,
    /// Share of requests answered 5xx over the panic window.
    error_rate: f64,
    queue: usize,
    in_flight: usize,
    /// Mean time from asking for a clone to it joining the pool, over this sample's second.
    clone_seconds: Option<f64>,
}

/// What the admin page of a running `squall up` reads from.
pub struct Sources {
    /// The balancer, for its signals, status and metrics.
    pub balancer: Balancer,
    /// The scaler's status.
    pub status: Arc<ArcSwap<Status>>,
    /// The scaler's metrics.
    pub metrics: Metrics,
    /// The policy in force.
    pub policy: Arc<ArcSwap<Policy>>,
    /// The driver clones are made with.
    pub driver: forkd::Driver,
    /// The embedded forkd, if any, whose metrics `/metrics` includes.
    pub forkd: Option<forkd::Client>,
}

/// The admin listener's state; built once `squall up` has all its parts.
pub struct Admin {
    sources: Sources,
    history: Mutex<History>,
}

#[derive(Default)]
struct History {
    samples: VecDeque<Sample>,
    /// The clone-latency totals at the previous sample.
    clones: (f64, u64),
}

impl Admin {
    /// The admin page of a running `squall up`, with no history yet.
    pub fn new(sources: Sources) -> Self {
        Self {
            sources,
            history: Mutex::new(History::default()),
        }
    }

    /// Takes one sample a second until `shutdown`.
    pub async fn sample(self: Arc<Self>, shutdown: Shutdown) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                _ = every.tick() => self.take_sample(SystemTime::now()),
            }
        }
    }

    fn take_sample(&self, now: SystemTime) {
        let signals = self.sources.balancer.signals();
        let status = self.sources.status.load();
        let panic = &signals.panic;
        let measured = |d: Duration| (panic.requests > 0).then_some(d.as_secs_f64());
        let totals = self
            .sources
            .metrics
            .clone_latency_totals(self.sources.driver);
        // A poisoned lock means a sampler panicked mid-update; the history is still usable.
        let mut history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (sum, count) = history.clones;
        let clone_seconds =
            (totals.1 > count).then(|| (totals.0 - sum) / (totals.1 - count) as f64);
        history.clones = totals;
        let sample = Sample {
            t: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            desired: status.decision.map(|d| d.desired),
            ready: signals.workers.ready,
            pending: status.pending,
            draining: status.draining,
            panic: status.decision.is_some_and(|d| d.panic),
            p50: measured(panic.latency_p50),
            p95: measured(panic.latency_p95),
            p99: measured(panic.latency_p99),
            rate: panic.request_rate,
            error_rate: panic.error_rate,
            queue: signals.queue_depth,
            in_flight: signals.in_flight,
            clone_seconds,
        };
        if history.samples.len() == HISTORY_LEN {
            history.samples.pop_front();
        }
        history.samples.push_back(sample);
    }

    /// Serves the admin endpoints on `listener` until `shutdown`, asking of each request what
    /// `auth` says (and reading its token file again when it changes and on SIGHUP).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        auth: AdminAuth,
        shutdown: Shutdown,
    ) {
        // One counter for both admin listeners: the balancer's metrics are on this page.
        let auth = auth.count_refusals(self.sources.balancer.admin_refusals());
        let server = HttpServer::new("admin", Limits::control());
        let serving = server.serve(listener, &shutdown, |stream, _| {
            let (admin, auth) = (Arc::clone(&self), auth.clone());
            let service = service_fn(move |request| {
                let (admin, auth) = (Arc::clone(&admin), auth.clone());
                async move { Ok::<_, Infallible>(admin.respond(&auth, &request).await) }
            });
            (stream, service)
        });
        tokio::join!(serving, auth.watch(&shutdown));
    }

    async fn respond(
        &self,
        auth: &AdminAuth,
        request: &Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "the admin listener only answers GET\n".into(),
            );
        }
        let path = request.uri().path();
        let shows = match path {
            // A browser asks for the icon with the page: a 404 either way, not a refusal.
            "/" | "/live.js" | "/live.css" | "/healthz" | "/favicon.ico" => Shows::Nothing,
            "/metrics" => Shows::Metrics,
            // Anything else too, so that an endpoint added later is protected by default.
            _ => Shows::Data,
        };
        if let Err(refused) = auth.check(shows, request.headers()) {
            let mut response = refused.response();
            harden(response.headers_mut());
            return response;
        }
        match path {
            "/" => page(PAGE, "text/html; charset=utf-8"),
            "/live.js" => page(SCRIPT, "text/javascript; charset=utf-8"),
            "/live.css" => page(STYLE, "text/css; charset=utf-8"),
            "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text().await,
            ),
            "/status" => reply(
                StatusCode::OK,
                "application/json",
                self.status_json().to_string(),
            ),
            "/api/history" => match since(request.uri().query()) {
                Ok(since) => reply(
                    StatusCode::OK,
                    "application/json",
                    self.history_json(since).to_string(),
                ),
                Err(message) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain; charset=utf-8",
                    format!("{message}\n"),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found: try /, /metrics, /status, /api/history or /healthz\n".into(),
            ),
        }
    }

    /// The balancer's, the scaler's and the embedded forkd's metrics on one page (their
    /// names do not overlap).
    async fn metrics_text(&self) -> String {
        let mut text = self.sources.balancer.metrics_text();
        text.push_str(&self.sources.metrics.render());
        if let Some(forkd) = &self.sources.forkd {
            match tokio::time::timeout(FORKD_METRICS_TIMEOUT, forkd.metrics()).await {
                Ok(Ok(more)) => text.push_str(&more),
                Ok(Err(error)) => tracing::warn!(%error, "reading the embedded forkd's metrics"),
                Err(_) => tracing::warn!("the embedded forkd's metrics did not come in time"),
            }
        }
        text
    }

    fn status_json(&self) -> serde_json::Value {
        let mut status = self.sources.balancer.status_json();
        status["scaler"] = self.scaler_json();
        status["policy"] = self.policy_json();
        status
    }

    fn scaler_json(&self) -> serde_json::Value {
        let scaler = self.sources.status.load();
        serde_json::json!({
            "desired": scaler.decision.map(|d| d.desired),
            "panic": scaler.decision.is_some_and(|d| d.panic),
            "reason": scaler.decision.map(|d| d.reason.to_string()),
            "pending": scaler.pending,
            "draining": scaler.draining,
        })
    }

    fn policy_json(&self) -> serde_json::Value {
        let policy = self.sources.policy.load();
        serde_json::json!({
            "name": policy.name,
            "template": policy.template,
            "driver": self.sources.driver.as_str(),
            "min": policy.workers.min,
            "max": policy.workers.max,
            "target_concurrency": policy.target.concurrency(),
            "latency_slo_seconds": policy.target.latency_p95.map(|d| d.get().as_secs_f64()),
        })
    }

    fn history_json(&self, since: Option<f64>) -> serde_json::Value {
        // Copy what is asked for and let the sampler go on; JSON is built without the lock.
        let samples: Vec<Sample> = {
            let history = self
                .history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            history
                .samples
                .iter()
                .filter(|s| since.is_none_or(|t| s.t > t))
                .cloned()
                .collect()
        };
        serde_json::json!({
            "interval_seconds": SAMPLE_EVERY.as_secs_f64(),
            "policy": self.policy_json(),
            "scaler": self.scaler_json(),
            "samples": samples,
        })
    }
}

/// Parses `since=T` from the query; other parameters are refused so typos are visible.
fn since(query: Option<&str>) -> Result<Option<f64>, String> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    let mut since = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("since", value)) => {
                let t: f64 = value.parse().map_err(|_| {
                    format!("since: expected seconds since the epoch, got {value:?}")
                })?;
                if !t.is_finite() {
                    return Err(format!("since: expected a finite number, got {value:?}"));
                }
                since = Some(t);
            }
            _ => {
                return Err(format!(
                    "unknown query parameter {pair:?}: only since=T is known"
                ));
            }
        }
    }
    Ok(since)
}

fn page(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = reply(StatusCode::OK, content_type, String::new());
    *response.body_mut() = Full::new(Bytes::from_static(body.as_bytes()));
    response
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    harden(headers);
    response
}

/// What every answer of this listener carries: not cached, not sniffed, and loading nothing
/// from elsewhere.
fn harden(headers: &mut hyper::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_one_number_and_refuses_the_rest() {
        assert_eq!(since(None), Ok(None));
        assert_eq!(since(Some("")), Ok(None));
        assert_eq!(since(Some("since=12.5")), Ok(Some(12.5)));
        assert!(since(Some("since=abc")).is_err());
        assert!(since(Some("since=inf")).is_err());
        assert!(since(Some("until=3")).is_err());
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", PAGE),
            ("live.js", SCRIPT),
            ("live.css", STYLE),
        ] {
            for needle in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(
                    !text.contains(needle),
                    "{name} refers to {needle:?}: the page must be self-contained"
                );
            }
        }
        assert!(PAGE.contains(r#"src="/live.js""#));
        assert!(PAGE.contains(r#"href="/live.css""#));
    }
}
