//! The HTTP/JSON API v1 in front of the [`Daemon`]: routing, bearer-token auth, bounded
//! bodies, JSON errors, and the graceful shutdown of [`serve`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::api::{CloneRequest, ErrorBody, TemplateSpec};
use crate::daemon::{CloneError, Config, Daemon, KillError, TemplateError};

/// The largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener's address could not be read.
    #[error("could not read the listening address")]
    Address(#[source] std::io::Error),
}

type Body = Full<Bytes>;

/// Runs the daemon on `listener` until `shutdown` completes, then kills every clone, stops
/// every template, and waits (briefly) for open connections to finish.
///
/// This is how `squall forkd` runs it, and how to embed it in another process:
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let daemon = tokio::spawn(forkd::serve(listener, forkd::Config::new("secret"), async move {
///     let _ = stopped.await;
/// }));
/// let client = forkd::Client::new(&format!("http://{addr}"), "secret")?;
/// client.health().await?;
/// let _ = stop.send(());
/// daemon.await??;
/// # Ok(()) }
/// ```
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(ServeError::Address)?;
    tracing::info!(%addr, "forkd listening");
    let daemon = Daemon::new(config);
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Bound how long a client may take to send its headers, so idle sockets cannot pile up.
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let daemon = daemon.clone();
                let service = hyper::service::service_fn(move |request| {
                    let daemon = daemon.clone();
                    // Each request runs in a task of its own, to completion even if the client
                    // goes away: a clone or template abandoned half-made would be left behind.
                    let handled = tokio::spawn(async move { route(&daemon, request).await });
                    async move {
                        Ok::<_, Infallible>(handled.await.unwrap_or_else(|e| {
                            tracing::error!(error = %e, "request handler failed");
                            message(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
                        }))
                    }
                });
                let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(connection);
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("forkd shutting down: killing clones and templates");
    daemon.shut_down().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A JSON error whose message is the error and its sources, joined by ": ".
fn error(status: StatusCode, error: &(dyn std::error::Error + 'static)) -> Response<Body> {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    json(status, &ErrorBody { error: message })
}

fn message(status: StatusCode, text: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: text.to_owned(),
        },
    )
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

fn authorized(daemon: &Daemon, request: &Request<Incoming>) -> bool {
    let Some(header) = request.headers().get(AUTHORIZATION) else {
        return false;
    };
    let Some(token) = header.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    constant_time_eq(token, daemon.config.token.as_bytes())
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes into `T`, or the error response to send.
async fn body<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(message(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {MAX_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(message(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| message(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

async fn route(daemon: &Arc<Daemon>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            return json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(daemon.metrics.render())));
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
        return message(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}"));
    }
    if !authorized(daemon, &request) {
        let mut response = message(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return response;
    }
    match (&method, &segments[1..]) {
        (&Method::POST, ["templates"]) => {
            let spec: TemplateSpec = match body(request).await {
                Ok(spec) => spec,
                Err(response) => return response,
            };
            match daemon.create_template(spec).await {
                Ok(info) => json(StatusCode::CREATED, &info),
                Err(e) => error(template_status(&e), &e),
            }
        }
        (&Method::GET, ["templates"]) => json(StatusCode::OK, &daemon.template_list()),
        (&Method::DELETE, ["templates", name]) => match daemon.delete_template(name).await {
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(e) => error(template_status(&e), &e),
        },
        (&Method::POST, ["templates", name, "clones"]) => {
            let clone: CloneRequest = match body(request).await {
                Ok(clone) => clone,
                Err(response) => return response,
            };
            match daemon.create_clones(name, clone.count).await {
                Ok(list) => json(StatusCode::CREATED, &list),
                Err(e) => error(clone_status(&e), &e),
            }
        }
        (&Method::GET, ["clones"]) => json(StatusCode::OK, &daemon.clone_list()),
        (&Method::DELETE, ["clones", id]) => match daemon.kill(id).await {
            Ok(()) => empty(StatusCode::NO_CONTENT),
            Err(e @ KillError::NotFound(_)) => error(StatusCode::NOT_FOUND, &e),
            Err(e @ KillError::Starting(_)) => error(StatusCode::CONFLICT, &e),
        },
        (
            _,
            ["templates"]
            | ["templates", _]
            | ["templates", _, "clones"]
            | ["clones"]
            | ["clones", _],
        ) => message(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => message(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

fn template_status(e: &TemplateError) -> StatusCode {
    match e {
        TemplateError::BadName(_)
        | TemplateError::EmptyCommand
        | TemplateError::BadHealthPath(_)
        | TemplateError::BadTimeout => StatusCode::UNPROCESSABLE_ENTITY,
        TemplateError::Exists(_) | TemplateError::Warming(_) => StatusCode::CONFLICT,
        TemplateError::NotFound(_) => StatusCode::NOT_FOUND,
        TemplateError::Start { .. } | TemplateError::Vm { .. } => StatusCode::BAD_GATEWAY,
    }
}

fn clone_status(e: &CloneError) -> StatusCode {
    match e {
        CloneError::NotFound(_) => StatusCode::NOT_FOUND,
        CloneError::BadCount { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        CloneError::Capacity { .. } => StatusCode::SERVICE_UNAVAILABLE,
        CloneError::Bind(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CloneError::AllFailed(_) => StatusCode::BAD_GATEWAY,
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }
}
