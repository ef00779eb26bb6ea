//! Prometheus metrics in a registry of a part's own (the balancer's, the scaler's, forkd's),
//! so that several parts live in one process and `squall up` serves them on one page:
//! registering a metric, and a registry's text exposition.

use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};

/// Registers `metric` (or fails with the error building it gave) in `registry`; returns it,
/// for the caller to keep.
pub fn try_register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> Result<M, prometheus::Error> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// [`try_register`] for a metric built from constant, valid options, under a name that is
/// registered once: neither step can fail.
///
/// # Panics
///
/// If one does after all: a bug (an invalid name or label, or a name used twice).
pub fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: Result<M, prometheus::Error>,
) -> M {
    try_register(registry, metric).expect("constant, valid metric options, each name once")
}

/// The metrics in `registry`, in Prometheus's text format.
pub fn render(registry: &Registry) -> String {
    let mut text = Vec::new();
    // Encoding into a Vec cannot fail for I/O; an error would mean a malformed metric, which
    // then shows as a short page rather than a crash.
    if let Err(error) = TextEncoder::new().encode(&registry.gather(), &mut text) {
        tracing::error!(%error, "encoding metrics");
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use prometheus::{IntCounter, IntGauge};

    use super::*;

    #[test]
    fn a_registered_metric_renders_and_a_second_of_its_name_is_refused() {
        let registry = Registry::new();
        let counter = register(&registry, IntCounter::new("a_total", "A counter."));
        counter.inc();
        assert!(render(&registry).contains("a_total 1\n"));
        let again = try_register(&registry, IntGauge::new("a_total", "The same name."));
        assert!(again.is_err());
        let invalid = try_register(&registry, IntGauge::new("a name", "Not a name."));
        assert!(invalid.is_err());
    }
}
