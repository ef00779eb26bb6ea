//! The admin endpoints: `GET /metrics` (Prometheus text format), `GET /status` (JSON: the
//! workers, the instantaneous counts and both windows) and `GET /healthz` (`ok`, for
//! probes).
//!
//! With a token ([`lifecycle::AdminAuth`]), every request but `/healthz` needs it, `/metrics`
//! too unless it was left open; a refusal is a `401` counted in
//! `squall_admin_unauthorized_total`.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use lifecycle::{AdminAuth, Shows};
use serde_json::json;

use crate::{Balancer, WindowSignals};

pub(crate) fn respond<B>(
    balancer: &Balancer,
    auth: &AdminAuth,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let shows = match request.uri().path() {
        "/healthz" => Shows::Nothing,
        "/metrics" => Shows::Metrics,
        _ => Shows::Data,
    };
    if let Err(refused) = auth.check(shows, request.headers()) {
        return refused.response();
    }
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            balancer.metrics_text(),
        ),
        (&Method::GET, "/status") => (
            StatusCode::OK,
            "application/json",
            status(balancer).to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /status or /healthz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

pub(crate) fn status(balancer: &Balancer) -> serde_json::Value {
    let signals = balancer.signals();
    let workers: Vec<_> = balancer
        .pool()
        .workers()
        .into_iter()
        .map(|w| {
            json!({
                "id": w.id.to_string(),
                "host": w.id.host(),
                "clone": w.id.id(),
                "addr": w.addr.to_string(),
                "protocol": w.protocol.as_str(),
                "state": w.state.as_str(),
                "in_flight": w.in_flight,
                "latency_seconds": w.latency.map(|l| l.as_secs_f64()),
                "responses": w.responses,
            })
        })
        .collect();
    json!({
        "workers": workers,
        "in_flight": signals.in_flight,
        "max_concurrency_per_worker": balancer.tuning().max_concurrency_per_worker,
        "queue_depth": signals.queue_depth,
        "worker_counts": {
            "ready": signals.workers.ready,
            "draining": signals.workers.draining,
            "ejected": signals.workers.ejected,
        },
        "stable": window(&signals.stable),
        "panic": window(&signals.panic),
    })
}

fn window(w: &WindowSignals) -> serde_json::Value {
    json!({
        "window_seconds": w.window.as_secs_f64(),
        "requests": w.requests,
        "request_rate": w.request_rate,
        "error_rate": w.error_rate,
        "mean_in_flight": w.mean_in_flight,
        "mean_queue_depth": w.mean_queue_depth,
        "latency_p50_seconds": w.latency_p50.as_secs_f64(),
        "latency_p95_seconds": w.latency_p95.as_secs_f64(),
        "latency_p99_seconds": w.latency_p99.as_secs_f64(),
        "worker_responses": w.worker_responses,
        "service_p95_seconds": w.service_p95.as_secs_f64(),
    })
}
