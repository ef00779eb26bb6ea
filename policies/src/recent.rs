//! What the pool took in lately: the fast reading of the rate behind [`crate::Now::admitted`].
//!
//! At each decision the scaler (and the simulator, the same way) reads the balancer's count
//! of arrivals since it started and its queue depth, and [`Recent::read`] turns the readings
//! into the requests that arrived over about the last [`crate::RECENT`] *without adding to the
//! queue*. The ones that did add to it are the backlog's (`Now::queued`): a burst is counted
//! once, and a queue that grows while the pool catches up is not also taken for a rate.

use std::collections::VecDeque;
use std::time::Duration;

use crate::decide::RECENT;

/// Readings at recent decisions: when, arrivals so far, queue depth then; oldest first.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    readings: VecDeque<(Duration, u64, u32)>,
}

impl Recent {
    /// No readings yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the reading at `now` (`arrivals` since the start, `queued` now) and returns the
    /// requests that arrived since the newest earlier reading at least [`RECENT`] old (or the
    /// oldest there is) and did not add to the queue, with the time since that reading.
    /// Readings must come in time order; the first returns nothing over no time.
    pub fn read(&mut self, now: Duration, arrivals: u64, queued: u32) -> (u64, Duration) {
        while self
            .readings
            .get(1)
            .is_some_and(|&(at, _, _)| now.saturating_sub(at) >= RECENT)
        {
            self.readings.pop_front();
        }
        let seen =
            self.readings
                .front()
                .map_or((0, Duration::ZERO), |&(at, before, queued_before)| {
                    let arrived = arrivals.saturating_sub(before);
                    let grew = u64::from(queued.saturating_sub(queued_before));
                    (arrived.saturating_sub(grew), now.saturating_sub(at))
                });
        self.readings.push_back((now, arrivals, queued));
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_arrivals_since_a_reading_about_recent_ago_less_the_queue_they_added() {
        let mut recent = Recent::new();
        assert_eq!(recent.read(ms(0), 100, 0), (0, ms(0)));
        // 10 arrivals in 5 ms, none queued.
        assert_eq!(recent.read(ms(5), 110, 0), (10, ms(5)));
        // 30 more, of which 12 are still queued, counted from the reading 20 ms before (the
        // newest at least RECENT old).
        assert_eq!(recent.read(ms(25), 140, 12), (18, ms(20)));
        // Still from that one: the one at 25 ms is too young.
        assert_eq!(recent.read(ms(30), 150, 12), (28, ms(25)));
        // The queue drained: every arrival since took a worker, and the drain is not a rate.
        assert_eq!(recent.read(ms(45), 160, 0), (20, ms(20)));
    }
}
