//! The balancer's configuration: limits, timeouts and measurement windows.
//!
//! Every field has a default (see [`Config::default`]) chosen for a web app behind the
//! balancer on the same host or network; [`Config::validate`] rejects combinations that
//! cannot work, so the rest of the crate handles only valid values.

use std::time::Duration;

use crate::tls::TlsFiles;
use crate::upstream::WorkerProtocol;

/// How the balancer behaves: admission, limits, timeouts, ejection and telemetry windows.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Most requests one worker serves at once; further requests wait in the queue.
    pub max_concurrency_per_worker: usize,
    /// Most requests waiting for a worker when every worker is at its concurrency limit;
    /// beyond it requests are answered `503` with `Retry-After`. Zero turns the queue off.
    pub queue_capacity: usize,
    /// Longest a request waits in the queue before it is answered `503`.
    pub queue_timeout: Duration,
    /// The `Retry-After` value sent with a `503`.
    pub retry_after: Duration,
    /// Largest request head (request line and headers) accepted, in bytes; larger ones are
    /// answered `431`. HTTP/1 applies it to its read buffer, so it cannot go below 8 KiB.
    pub max_header_bytes: usize,
    /// Most HTTP/2 streams (requests) one client connection may have open at once; a client
    /// must wait for one to finish before opening another.
    pub max_concurrent_streams: u32,
    /// Largest request body accepted, in bytes; larger ones are answered `413`.
    pub max_body_bytes: u64,
    /// Longest a client may take to send a request head; a slower client is disconnected.
    pub header_read_timeout: Duration,
    /// Longest a client may pause while sending a request body; beyond it, `408`.
    pub body_timeout: Duration,
    /// Longest a worker may pause while sending a response body; the response is then cut
    /// off (nginx's `proxy_read_timeout`). Long-polling or event-stream apps need it longer
    /// than their quietest gap.
    pub worker_body_timeout: Duration,
    /// Longest a client may go without taking any of what the balancer sends it (a response
    /// it does not read, say); the connection is then closed (nginx's `send_timeout`), which
    /// frees the worker's slot. Without it, a client that stops reading holds a worker's
    /// slot for as long as it keeps the connection open. An HTTP/2 client that stops
    /// reading one stream (its flow-control window stays shut) while the connection moves
    /// has that stream reset after the same time; its other streams go on.
    pub client_write_timeout: Duration,
    /// Longest a TCP connect to a worker may take before it counts as a failed connect.
    pub connect_timeout: Duration,
    /// How many other workers a request is tried on when its worker could not be reached
    /// (nothing was sent, so trying again is always safe) or was lost before it answered (the
    /// connection closed or reset before any byte of the response: tried again only when the
    /// request may be sent twice, its method being idempotent or its `Idempotency-Key`
    /// header saying so, and its body, if any, was at most 64 KiB). Each worker that failed is
    /// ejected, so a host that died with several workers costs its clients a retry, not an
    /// error.
    pub retries: u32,
    /// Most retries, as a share of the requests that arrived over the last 10 s, on top of
    /// [`Config::min_retries_per_second`]: retries cannot multiply the load when workers fail
    /// under it. Beyond it, a request that needed a retry gets its `502`.
    pub retry_budget: f64,
    /// Retries allowed every second whatever the traffic (counted over the last 10 s), so
    /// that a quiet balancer can still retry.
    pub min_retries_per_second: u32,
    /// Longest a worker may take to answer with a response head, counted from when the
    /// balancer starts sending the request (an upload the worker reads whole before
    /// answering counts too); beyond it, `504`.
    pub response_timeout: Duration,
    /// How long a worker whose connections fail is left out before it is probed again.
    /// Repeated failures double it, up to [`Config::max_ejection`].
    pub ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// Decay time of the peak-EWMA latency estimate: how quickly a worker's cost forgets a
    /// slow response.
    pub latency_decay: Duration,
    /// Most keep-alive connections kept open to one worker, idle or in use; a request that
    /// finds none idle opens one more, which is closed after its response if the limit is
    /// reached. For an h2c worker, the most connections opened to it; each carries many
    /// requests.
    pub max_idle_connections_per_worker: usize,
    /// The protocol of the workers added with [`crate::Pool::add_worker`]
    /// ([`crate::Pool::add_worker_speaking`] names one per worker): HTTP/1.1 by default.
    pub worker_protocol: WorkerProtocol,
    /// Period of the telemetry ticker: the width of one window bucket.
    pub tick: Duration,
    /// Length of the stable window (the one the scaler steers by).
    pub stable_window: Duration,
    /// Length of the panic window (the short one that detects a flash crowd).
    pub panic_window: Duration,
    /// Longest a shutdown waits for in-flight requests to finish.
    pub shutdown_timeout: Duration,
    /// Terminate TLS on the client-facing listener with this certificate and key (reloaded
    /// when the files change or on SIGHUP); `None` serves plaintext HTTP/1.1 and h2c.
    pub tls: Option<TlsFiles>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_concurrency_per_worker: 256,
            queue_capacity: 1024,
            queue_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 200,
            max_body_bytes: 1024 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            worker_body_timeout: Duration::from_secs(60),
            client_write_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            retries: 3,
            retry_budget: 0.2,
            min_retries_per_second: 10,
            response_timeout: Duration::from_secs(60),
            ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            latency_decay: Duration::from_secs(10),
            max_idle_connections_per_worker: 256,
            worker_protocol: WorkerProtocol::Http1,
            tick: Duration::from_millis(100),
            stable_window: Duration::from_secs(10),
            panic_window: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// A configuration the balancer cannot run with; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// `{0}` must be greater than zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// The panic window is longer than the stable window.
    #[error("panic_window ({panic:?}) must not be longer than stable_window ({stable:?})")]
    PanicLongerThanStable {
        /// The configured panic window.
        panic: Duration,
        /// The configured stable window.
        stable: Duration,
    },
    /// A window is not a whole number of ticks.
    #[error("{field} ({window:?}) must be a whole multiple of tick ({tick:?})")]
    NotMultipleOfTick {
        /// Which window.
        field: &'static str,
        /// Its length.
        window: Duration,
        /// The tick.
        tick: Duration,
    },
    /// The retry budget is negative or not a number.
    #[error("retry_budget ({0}) must be a number of at least 0")]
    RetryBudget(f64),
}

impl Config {
    /// Checks the fields that must agree with each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            (
                "max_concurrency_per_worker",
                self.max_concurrency_per_worker == 0,
            ),
            ("max_header_bytes", self.max_header_bytes == 0),
            ("max_concurrent_streams", self.max_concurrent_streams == 0),
            ("tick", self.tick.is_zero()),
            ("stable_window", self.stable_window.is_zero()),
            ("panic_window", self.panic_window.is_zero()),
            ("latency_decay", self.latency_decay.is_zero()),
            ("client_write_timeout", self.client_write_timeout.is_zero()),
        ];
        if let Some((field, _)) = nonzero.iter().find(|(_, zero)| *zero) {
            return Err(ConfigError::Zero(field));
        }
        if self.panic_window > self.stable_window {
            return Err(ConfigError::PanicLongerThanStable {
                panic: self.panic_window,
                stable: self.stable_window,
            });
        }
        for (field, window) in [
            ("stable_window", self.stable_window),
            ("panic_window", self.panic_window),
        ] {
            if window.as_nanos() % self.tick.as_nanos() != 0 {
                return Err(ConfigError::NotMultipleOfTick {
                    field,
                    window,
                    tick: self.tick,
                });
            }
        }
        if !(self.retry_budget.is_finite() && self.retry_budget >= 0.0) {
            return Err(ConfigError::RetryBudget(self.retry_budget));
        }
        Ok(())
    }

    /// Number of ticks in a window; `validate` guarantees it divides evenly.
    pub(crate) fn ticks_in(&self, window: Duration) -> usize {
        (window.as_nanos() / self.tick.as_nanos()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_what_cannot_work() {
        let zero_limit = Config {
            max_concurrency_per_worker: 0,
            ..Config::default()
        };
        assert_eq!(
            zero_limit.validate(),
            Err(ConfigError::Zero("max_concurrency_per_worker"))
        );
        let long_panic = Config {
            panic_window: Duration::from_secs(20),
            ..Config::default()
        };
        assert!(matches!(
            long_panic.validate(),
            Err(ConfigError::PanicLongerThanStable { .. })
        ));
        let ragged = Config {
            panic_window: Duration::from_millis(150),
            ..Config::default()
        };
        assert!(matches!(
            ragged.validate(),
            Err(ConfigError::NotMultipleOfTick {
                field: "panic_window",
                ..
            })
        ));
        for budget in [-0.1, f64::NAN, f64::INFINITY] {
            let wrong = Config {
                retry_budget: budget,
                ..Config::default()
            };
            assert!(matches!(wrong.validate(), Err(ConfigError::RetryBudget(_))));
        }
    }
}
