//! The HTTP load balancer: it proxies client requests to the worker pool, picks a worker
//! with power-of-two-choices, and measures every request so the scaler can decide from it.
//!
//! The balancer knows nothing of scaling policy; the scaler adds, drains and removes workers.
#![forbid(unsafe_code)]
