//! The HTTP/JSON API v1 in front of the [`Daemon`]: routing, bearer-token auth, bounded
//! bodies, JSON errors with their codes, and [`serve`], which runs it on
//! [`lifecycle::HttpServer`] until the [`Shutdown`] comes.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use lifecycle::{HttpServer, Limits, Shutdown};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::api::{CloneRequest, ErrorBody, ErrorCode, TemplateSpec};
use crate::config::Config;
use crate::daemon::Daemon;
use crate::driver::seed::SnapshotBody;
use crate::error::ApiError;

/// The largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener's address could not be read.
    #[error("could not read the listening address")]
    Address(#[source] std::io::Error),
}

/// A JSON (or text) answer, or a streamed snapshot.
type Body = http_body_util::Either<Full<Bytes>, SnapshotBody>;

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Either::Left(Full::new(bytes.into()))
}

/// forkd's listener limits: [`Limits::control`], but with room for 512 connections and no
/// fixed connection life. A scaler sends its clone requests in parallel, each on a
/// connection of its own, and a request may rightly take as long as a template takes to warm
/// up (`start_timeout_ms`, up to 10 minutes, plus building a `vm` image). forkd speaks
/// HTTP/1.1 only, so idle connections close after the header-read timeout whatever a client
/// sends (an idle HTTP/2 connection would have no such bound).
pub(crate) fn limits() -> Limits {
    Limits {
        max_connections: Some(512),
        connection_lifetime: None,
        ..Limits::control()
    }
}

/// Runs the daemon on `listener` until `shutdown` comes. Then it starts nothing new, lets
/// what is starting finish, kills every clone and stops every template, while open
/// connections finish (for at most [`Limits::drain_timeout`]), and returns.
///
/// This is how `squall forkd` runs it, and how to embed it in another process:
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let stop = lifecycle::Stop::new();
/// let daemon = tokio::spawn(forkd::serve(listener, forkd::Config::new("secret"), stop.shutdown()));
/// let client = forkd::Client::new(&format!("http://{addr}"), "secret")?;
/// client.health().await?;
/// stop.stop();
/// daemon.await??;
/// # Ok(()) }
/// ```
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Address)?;
    tracing::info!(%addr, "forkd listening");
    let daemon = Daemon::new(config);
    let server = HttpServer::new("forkd", limits()).http1_only();
    let serving = server.serve(listener, &shutdown, |stream, _peer| {
        let daemon = daemon.clone();
        let service = hyper::service::service_fn(move |request| {
            let daemon = daemon.clone();
            // Each request runs in a task of its own, to completion even if the client goes
            // away: a clone or template abandoned half-made would be left behind.
            let handled = tokio::spawn(async move { route(&daemon, request).await });
            async move {
                Ok::<_, Infallible>(handled.await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "request handler failed");
                    error_body(ErrorCode::Internal, "internal error".to_owned())
                }))
            }
        });
        (stream, service)
    });
    let stopping = async {
        shutdown.wait().await;
        tracing::info!("forkd shutting down: killing clones and templates");
        daemon.shut_down().await;
    };
    let (drained, ()) = tokio::join!(serving, stopping);
    if !drained {
        tracing::warn!("forkd: connections still open after the drain timeout");
    }
    Ok(())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    // Our API types serialize infallibly (no maps with non-string keys, no custom code).
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_body(code: ErrorCode, error: String) -> Response<Body> {
    let mut response = json(code.status(), &ErrorBody { error, code });
    if code == ErrorCode::Unauthorized {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    response
}

/// The response for `error`: its message with its sources, and its code.
fn error(error: &(dyn ApiError + 'static)) -> Response<Body> {
    error_body(error.code(), crate::error::message(error))
}

/// Why a request was refused before it reached the daemon.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: Method, path: String },
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("reading the request body failed")]
    ReadBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid JSON body")]
    InvalidJson(#[source] serde_json::Error),
}

impl ApiError for RequestError {
    fn code(&self) -> ErrorCode {
        match self {
            RequestError::Unauthorized => ErrorCode::Unauthorized,
            RequestError::NoRoute(_) => ErrorCode::NotFound,
            RequestError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            RequestError::BodyTooLarge => ErrorCode::BodyTooLarge,
            RequestError::ReadBody(_) | RequestError::InvalidJson(_) => ErrorCode::BadRequest,
        }
    }
}

/// The answer to a request that made something: `201 Created` with what it made, or why not.
fn created<T: Serialize>(outcome: Result<T, impl ApiError + 'static>) -> Response<Body> {
    match outcome {
        Ok(made) => json(StatusCode::CREATED, &made),
        Err(e) => error(&e),
    }
}

/// The answer to a request that ended something: `204 No Content`, or why not.
fn deleted(outcome: Result<(), impl ApiError + 'static>) -> Response<Body> {
    match outcome {
        Ok(()) => {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Err(e) => error(&e),
    }
}

fn authorized(daemon: &Daemon, request: &Request<Incoming>) -> bool {
    lifecycle::bearer_matches(request.headers(), daemon.config.token.as_bytes())
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes into `T`.
async fn body<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, RequestError> {
    let bytes = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(RequestError::BodyTooLarge);
        }
        Err(e) => return Err(RequestError::ReadBody(e)),
    };
    decode(&bytes)
}

/// A request body as `T`, or why it is not one.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(bytes).map_err(RequestError::InvalidJson)
}

async fn route(daemon: &Arc<Daemon>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            return json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(full(daemon.metrics.render()));
            response.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return response;
        }
        _ => {}
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments.first() != Some(&"v1") {
        return error(&RequestError::NoRoute(path));
    }
    if !authorized(daemon, &request) {
        return error(&RequestError::Unauthorized);
    }
    match (&method, &segments[1..]) {
        (&Method::POST, ["templates"]) => match body::<TemplateSpec>(request).await {
            Ok(spec) => created(daemon.create_template(spec).await),
            Err(e) => error(&e),
        },
        (&Method::GET, ["templates"]) => json(StatusCode::OK, &daemon.template_list()),
        (&Method::DELETE, ["templates", name]) => deleted(daemon.delete_template(name).await),
        (&Method::POST, ["templates", name, "clones"]) => {
            match body::<CloneRequest>(request).await {
                Ok(clone) => created(daemon.create_clones(name, clone.count).await),
                Err(e) => error(&e),
            }
        }
        (&Method::GET, ["templates", name, "snapshot"]) => match daemon.snapshot(name) {
            Ok(body) => {
                let mut response = Response::new(http_body_util::Either::Right(body));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static(microvm::portable::CONTENT_TYPE),
                );
                response
            }
            Err(e) => error(&e),
        },
        (&Method::GET, ["clones"]) => json(StatusCode::OK, &daemon.clone_list()),
        (&Method::DELETE, ["clones", id]) => deleted(daemon.kill(id).await),
        (
            _,
            ["templates"]
            | ["templates", _]
            | ["templates", _, "clones" | "snapshot"]
            | ["clones"]
            | ["clones", _],
        ) => error(&RequestError::MethodNotAllowed { method, path }),
        _ => error(&RequestError::NoRoute(path)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn forkd_limits_keep_long_requests_and_many_connections() {
        let limits = limits();
        assert_eq!(limits.connection_lifetime, None);
        assert!(limits.max_connections >= Some(512));
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
    }
}
