//! Peak-EWMA latency estimate of one worker, the cost P2C compares.
//!
//! The algorithm is Finagle's and linkerd2-proxy's (tower's `PeakEwma`): each response time
//! moves an exponentially weighted moving average whose weight decays with the time since
//! the previous sample, except that a sample *above* the average replaces it at once. The
//! estimate therefore jumps up on a slow response and forgets it gradually; a worker that
//! gets no traffic also decays towards zero, so a once-slow worker is eventually tried again.
//!
//! The estimate lives in two atomics (value and time stamp) so that recording a response
//! never takes a lock. Two responses recorded at the same instant may race and one of them
//! be lost; the estimate is a heuristic, and losing one sample does not matter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time in nanoseconds since the balancer's epoch (see `clock`).
pub(crate) type Nanos = u64;

/// A lock-free peak-EWMA latency estimate.
#[derive(Debug)]
pub(crate) struct PeakEwma {
    decay_ns: f64,
    /// The estimate in nanoseconds, as `f64` bits.
    estimate_bits: AtomicU64,
    /// When the estimate was last updated.
    stamp: AtomicU64,
    /// How many samples were recorded; zero means "no estimate yet".
    samples: AtomicU64,
}

impl PeakEwma {
    pub(crate) fn new(decay: Duration) -> Self {
        Self {
            decay_ns: decay.as_nanos() as f64,
            estimate_bits: AtomicU64::new(0f64.to_bits()),
            stamp: AtomicU64::new(0),
            samples: AtomicU64::new(0),
        }
    }

    /// Records one response time observed at `now`.
    pub(crate) fn observe(&self, rtt: Duration, now: Nanos) {
        let rtt = rtt.as_nanos() as f64;
        let updated = if self.samples.load(Ordering::Acquire) == 0 {
            rtt
        } else {
            let previous = self.decayed(now);
            if rtt > previous {
                rtt
            } else {
                let weight = self.weight(now);
                previous * weight + rtt * (1.0 - weight)
            }
        };
        self.estimate_bits
            .store(updated.to_bits(), Ordering::Release);
        self.stamp.store(now, Ordering::Release);
        self.samples.fetch_add(1, Ordering::AcqRel);
    }

    /// The estimate at `now`, or `None` before the first sample.
    pub(crate) fn estimate(&self, now: Nanos) -> Option<Duration> {
        if self.samples.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(Duration::from_nanos(self.decayed(now) as u64))
    }

    /// Weight of the old estimate after the time since the last sample.
    fn weight(&self, now: Nanos) -> f64 {
        let elapsed = now.saturating_sub(self.stamp.load(Ordering::Acquire)) as f64;
        (-elapsed / self.decay_ns).exp()
    }

    fn decayed(&self, now: Nanos) -> f64 {
        f64::from_bits(self.estimate_bits.load(Ordering::Acquire)) * self.weight(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn no_estimate_before_a_sample() {
        let ewma = PeakEwma::new(Duration::from_secs(10));
        assert_eq!(ewma.estimate(0), None);
        ewma.observe(Duration::from_millis(4), 0);
        assert_eq!(ewma.estimate(0), Some(Duration::from_millis(4)));
    }

    #[test]
    fn a_peak_replaces_the_estimate_and_then_decays() {
        let ewma = PeakEwma::new(Duration::from_secs(1));
        ewma.observe(Duration::from_millis(1), 0);
        ewma.observe(Duration::from_millis(100), 10 * MS);
        let peak = ewma.estimate(10 * MS).expect("has samples");
        assert_eq!(peak, Duration::from_millis(100));
        // Fast samples pull it down gradually, not at once.
        ewma.observe(Duration::from_millis(1), 110 * MS);
        let after_one = ewma.estimate(110 * MS).expect("has samples");
        assert!(after_one < peak && after_one > Duration::from_millis(50));
        // With no traffic at all it decays towards zero.
        let much_later = ewma.estimate(10_000 * MS).expect("has samples");
        assert!(much_later < Duration::from_millis(1));
    }
}
