//! The retry budget: retries may add at most a fraction of the requests that arrived
//! recently, plus a small floor, so that when workers fail under load the retries cannot
//! multiply it (a request that crashes every worker it reaches, or a pool that is dying, gets
//! its `502`s at the rate of the floor instead of sending every request around the pool).
//! This is Envoy's retry budget and linkerd's per-second budget, counted over
//! [`WINDOW_SECONDS`].
//!
//! Requests are not deposited one by one: the budget reads the balancer's arrivals counter
//! (which every request bumps anyway), marking it once a second from the ticker, so the
//! request path pays nothing for it. Only a retry takes the budget's lock.

use std::sync::{Mutex, PoisonError};

use crate::load::Nanos;

/// The seconds over which retries are weighed against arrivals.
pub(crate) const WINDOW_SECONDS: u64 = 10;

const NANOS_PER_SECOND: Nanos = 1_000_000_000;

/// One second of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    /// Which second since the balancer started (`None`: never used).
    second: Option<u64>,
    /// The arrivals counter when this second was first seen.
    arrivals_mark: u64,
    /// Retries spent during this second.
    retries: u64,
}

/// How many retries the recent requests allow; see the module docs.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    floor_per_second: u32,
    seconds: Mutex<[Second; WINDOW_SECONDS as usize]>,
}

impl RetryBudget {
    /// Retries up to `ratio` of the requests that arrived over the window, plus
    /// `floor_per_second` a second whatever arrived.
    pub(crate) fn new(ratio: f64, floor_per_second: u32) -> Self {
        Self {
            ratio,
            floor_per_second,
            seconds: Mutex::new([Second::default(); WINDOW_SECONDS as usize]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Second; WINDOW_SECONDS as usize]> {
        // Counters only: whatever a panic left is as good as any.
        self.seconds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the arrivals counter at `now`, once a second (the ticker calls it every tick).
    pub(crate) fn mark(&self, now: Nanos, arrivals: u64) {
        let mut seconds = self.lock();
        current(&mut seconds, now, arrivals);
    }

    /// Spends one retry if the budget allows it at `now`, with `arrivals` requests arrived
    /// since the start.
    pub(crate) fn try_spend(&self, now: Nanos, arrivals: u64) -> bool {
        let mut seconds = self.lock();
        let this_second = current(&mut seconds, now, arrivals);
        let in_window = |second: &Second| {
            second
                .second
                .is_some_and(|s| s + WINDOW_SECONDS > this_second)
        };
        let oldest_mark = seconds
            .iter()
            .filter(|second| in_window(second))
            .map(|second| second.arrivals_mark)
            .min()
            .unwrap_or(arrivals);
        let spent: u64 = seconds
            .iter()
            .filter(|second| in_window(second))
            .map(|second| second.retries)
            .sum();
        let recent = arrivals.saturating_sub(oldest_mark) as f64;
        let allowed = u64::from(self.floor_per_second) * WINDOW_SECONDS
            + (self.ratio * recent).floor() as u64;
        if spent >= allowed {
            return false;
        }
        seconds[slot(this_second)].retries += 1;
        true
    }
}

fn slot(second: u64) -> usize {
    (second % WINDOW_SECONDS) as usize
}

/// The current second, its slot started afresh (with `arrivals` as its mark) if it held an
/// older second.
fn current(seconds: &mut [Second; WINDOW_SECONDS as usize], now: Nanos, arrivals: u64) -> u64 {
    let this_second = now / NANOS_PER_SECOND;
    let entry = &mut seconds[slot(this_second)];
    if entry.second != Some(this_second) {
        *entry = Second {
            second: Some(this_second),
            arrivals_mark: arrivals,
            retries: 0,
        };
    }
    this_second
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Nanos = NANOS_PER_SECOND;

    /// Spends retries at `now` until refused; how many were allowed.
    fn spend_all(budget: &RetryBudget, now: Nanos, arrivals: u64) -> u64 {
        let mut spent = 0;
        while budget.try_spend(now, arrivals) {
            spent += 1;
            assert!(spent < 1_000_000, "the budget never ran out");
        }
        spent
    }

    #[test]
    fn with_no_traffic_only_the_floor_is_allowed() {
        let budget = RetryBudget::new(0.2, 3);
        assert_eq!(spend_all(&budget, 0, 0), 3 * WINDOW_SECONDS);
        // A second later the window still holds them all.
        assert!(!budget.try_spend(SECOND, 0));
    }

    #[test]
    fn retries_grow_with_the_requests_that_arrived_in_the_window() {
        let budget = RetryBudget::new(0.2, 0);
        // 1000 requests a second for ten seconds, marked by the ticker.
        for second in 0..10 {
            budget.mark(second * SECOND, second * 1000);
        }
        // 9 000 arrived since the oldest mark still in the window: 1 800 retries.
        assert_eq!(spend_all(&budget, 9 * SECOND + 1, 9_000), 1_800);
        // Two seconds on, with no arrivals since, the window lost its two oldest
        // seconds' requests; the spent retries are still in it.
        assert!(!budget.try_spend(11 * SECOND, 9_000));
    }

    #[test]
    fn spent_retries_leave_the_window_after_it_passes() {
        let budget = RetryBudget::new(0.0, 1);
        assert_eq!(spend_all(&budget, 0, 0), WINDOW_SECONDS);
        assert!(!budget.try_spend((WINDOW_SECONDS - 1) * SECOND, 0));
        // The second they were spent in has left the window.
        assert_eq!(
            spend_all(&budget, WINDOW_SECONDS * SECOND, 0),
            WINDOW_SECONDS
        );
    }

    #[test]
    fn a_zero_budget_allows_nothing() {
        let budget = RetryBudget::new(0.0, 0);
        budget.mark(0, 0);
        assert!(!budget.try_spend(SECOND, 1_000_000));
    }
}
