//! The proxy: one client request in, one worker response out, with HTTP proxy semantics.
//!
//! What it does to a request, in order (RFC 9110 §7.6, and what nginx and Envoy do):
//! - refuses a body declared larger than `max_body_bytes` (`413`), and stops one that
//!   grows past it while streaming;
//! - removes hop-by-hop headers (`Connection` and every header it names, `Keep-Alive`,
//!   `TE`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`, `Trailer`), except that an `Upgrade`
//!   request keeps `Connection: upgrade` and `Upgrade`;
//! - answers `Expect: 100-continue` itself and does not pass it on;
//! - keeps `Host` (or makes it from the HTTP/2 `:authority`), appends the client address to
//!   `X-Forwarded-For` and sets `X-Forwarded-Proto: http`;
//! - sends it as HTTP/1.1 in origin form, whatever the client spoke (HTTP/1.1 or h2c).
//!
//! Bodies are streamed both ways and never collected. A connect that fails before any byte
//! reached the worker ejects that worker and is retried on another (up to `connect_retries`
//! times); any later failure is final, since the worker may have acted on the request. The balancer's own answers are
//! short plain-text bodies: `502` (no worker could be reached, or it broke the exchange),
//! `503` with `Retry-After` (every worker busy and the queue full, or the wait too long),
//! `504` (the worker did not answer in `response_timeout`); and `408` when the client
//! pauses its request body for longer than `body_timeout`. A worker that pauses its
//! response body for longer than `worker_body_timeout` has the response cut off; a client
//! that takes nothing of its response for `client_write_timeout` is disconnected.
//!
//! The worker slot is held until the response body has been sent to the end (or the client
//! went away), so in-flight counts what workers are really doing; an upgraded connection
//! holds it until the tunnel closes.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::Core;
use crate::admission::{Admission, AdmissionError, Lease};
use crate::body::{BodyTimeout, IdleTimeout, Leased, Sender};
use crate::upstream::{BoxError, ProxyBody, SendError};

/// Why the balancer answers a request itself; the message is the body it sends.
#[derive(Debug, thiserror::Error, PartialEq)]
enum Refusal {
    /// `413`: the body is, or grew, larger than `max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// `408`: the client paused its body for longer than `body_timeout`.
    #[error("request body too slow")]
    BodyTooSlow,
    /// `503`: every worker is busy and the queue is full.
    #[error("all workers busy")]
    QueueFull,
    /// `503`: the request waited `queue_timeout` in the queue.
    #[error("no worker became free in time")]
    QueueTimeout,
    /// `502`: no worker accepted a connection, retry included.
    #[error("no worker could be reached")]
    Unreachable,
    /// `502`: the worker broke the exchange after the request had been sent.
    #[error("the worker failed to answer")]
    WorkerFailed,
    /// `504`: the worker did not answer within `response_timeout`.
    #[error("the worker did not answer in time")]
    WorkerTimeout,
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::QueueFull | Self::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreachable | Self::WorkerFailed => StatusCode::BAD_GATEWAY,
            Self::WorkerTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl From<AdmissionError> for Refusal {
    fn from(error: AdmissionError) -> Self {
        match error {
            AdmissionError::QueueFull => Self::QueueFull,
            AdmissionError::QueueTimeout => Self::QueueTimeout,
        }
    }
}

/// Handles one client request and records what it measured.
pub(crate) async fn handle(
    core: Arc<Core>,
    request: Request<Incoming>,
    client: SocketAddr,
) -> Response<ProxyBody> {
    let arrived = Instant::now();
    let response = forward(&core, request, client)
        .await
        .unwrap_or_else(|refusal| local(&core, &refusal));
    let latency = arrived.elapsed();
    core.windows.record(latency, response.status());
    core.metrics.record(latency, response.status());
    response
}

async fn forward(
    core: &Arc<Core>,
    mut request: Request<Incoming>,
    client: SocketAddr,
) -> Result<Response<ProxyBody>, Refusal> {
    let max_body = core.config.max_body_bytes;
    if declared_length(request.headers()).is_some_and(|length| length > max_body) {
        return Err(Refusal::BodyTooLarge);
    }
    let upgrade = upgrade_protocol(&request);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));

    let (mut parts, body) = request.into_parts();
    prepare_request_head(&mut parts, client, upgrade.clone());
    let body = if body.is_end_stream() {
        // No body (most GETs): nothing to limit or time, and no timer to arm.
        Empty::new().map_err(BoxError::from).boxed()
    } else {
        let body = IdleTimeout::new(body, Sender::Client, core.config.body_timeout);
        Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX)).boxed()
    };
    let request = Request::from_parts(parts, body);
    let lease = Admission::acquire(core, None).await?;
    let (mut response, lease) = exchange(core, lease, request).await?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let worker_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, worker_upgrade, lease));
            let (mut parts, _) = response.into_parts();
            let protocol = parts.headers.get(header::UPGRADE).cloned();
            remove_hop_by_hop(&mut parts.headers);
            restore_upgrade(&mut parts.headers, protocol.or(upgrade));
            return Ok(Response::from_parts(parts, empty()));
        }
    }
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    let body = IdleTimeout::new(body, Sender::Worker, core.config.worker_body_timeout);
    let body = Leased::new(body.boxed(), lease);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Sends the request to the leased worker and waits for its response head, retrying on
/// another worker (up to `connect_retries` times) if nothing could be sent. Returns the lease
/// of the worker that answered.
async fn exchange(
    core: &Arc<Core>,
    mut lease: Lease,
    mut request: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Lease), Refusal> {
    let mut retries = 0;
    loop {
        let sent = Instant::now();
        let exchange = lease.worker.connections.send(request);
        let unsent = match tokio::time::timeout(core.config.response_timeout, exchange).await {
            Ok(Ok(response)) => {
                let worker = &lease.worker;
                core.windows.record_service(sent.elapsed());
                worker.load.observe(sent.elapsed(), core.clock.now());
                worker.responses.fetch_add(1, Ordering::Relaxed);
                return Ok((response, lease));
            }
            Ok(Err(SendError::NotSent { request, source })) => {
                tracing::warn!(worker = %lease.worker.id, error = %source, "connect failed");
                core.eject(&lease.worker);
                request
            }
            Ok(Err(SendError::Exchange(error))) => {
                return Err(if caused_by::<LengthLimitError>(&error) {
                    Refusal::BodyTooLarge
                } else if caused_by::<BodyTimeout>(&error) {
                    Refusal::BodyTooSlow
                } else {
                    tracing::debug!(worker = %lease.worker.id, %error, "exchange failed");
                    Refusal::WorkerFailed
                });
            }
            Err(_elapsed) => return Err(Refusal::WorkerTimeout),
        };
        let failed = lease.worker.id.clone();
        drop(lease);
        // Wait in the queue for another worker only if one could take the request; with
        // no other worker up, the answer is known now.
        if retries >= core.config.connect_retries || !core.has_worker_besides(&failed) {
            return Err(Refusal::Unreachable);
        }
        retries += 1;
        core.metrics.retries.inc();
        lease = Admission::acquire(core, Some(&failed))
            .await
            .map_err(|_| Refusal::Unreachable)?;
        request = *unsent;
    }
}

/// Copies bytes both ways between an upgraded client and worker connection.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    worker: hyper::upgrade::OnUpgrade,
    lease: Lease,
) {
    let (client, worker) = match tokio::try_join!(client, worker) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut worker) = (TokioIo::new(client), TokioIo::new(worker));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut worker).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
    drop(lease);
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
fn upgrade_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let asks = connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asks.then(|| request.headers().get(header::UPGRADE).cloned())
        .flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard `Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

fn restore_upgrade(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

fn prepare_request_head(
    parts: &mut http::request::Parts,
    client: SocketAddr,
    upgrade: Option<HeaderValue>,
) {
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    restore_upgrade(headers, upgrade);
    // The client's `Expect: 100-continue` was answered on its own connection when the body
    // was first read; the worker gets the body without having to ask.
    headers.remove(header::EXPECT);
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let origin_form = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    parts.uri = origin_form
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    // What the client connection attached (its upgrade handle, h2 protocol) is not the
    // worker connection's business.
    parts.extensions = http::Extensions::new();
}

fn caused_by<E: StdError + 'static>(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<E>() {
            return true;
        }
        cause = current.source();
    }
    false
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new()).map_err(BoxError::from).boxed()
}

/// One of the balancer's own short answers.
fn local(core: &Core, refusal: &Refusal) -> Response<ProxyBody> {
    let status = refusal.status();
    let text = format!(
        "{} {}: {refusal}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(BoxError::from).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let seconds = core.config.retry_after.as_secs().max(1);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_is_rewritten_for_the_worker() {
        let request = Request::builder()
            .uri("http://app.example:8080/path?q=1")
            .version(Version::HTTP_2)
            .header("connection", "close, x-secret")
            .header("x-secret", "hop")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic abc")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-app", "kept")
            .header("expect", "100-continue")
            .body(())
            .expect("valid request");
        let (mut parts, ()) = request.into_parts();
        let client: SocketAddr = "192.0.2.7:5555".parse().expect("address");
        prepare_request_head(&mut parts, client, None);
        let h = &parts.headers;
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(h["host"], "app.example:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(parts.uri, "/path?q=1");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let request = Request::builder()
            .uri("/chat")
            .header("host", "app")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("valid request");
        let upgrade = upgrade_protocol(&request);
        assert_eq!(upgrade, Some(HeaderValue::from_static("websocket")));
        let (mut parts, ()) = request.into_parts();
        prepare_request_head(&mut parts, "127.0.0.1:1".parse().expect("address"), upgrade);
        assert_eq!(parts.headers["connection"], "upgrade");
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(parts.headers["host"], "app");
    }
}
