//! What arrived lately: the fast reading behind [`crate::Now::arrived`].
//!
//! At each decision the scaler (and the simulator, the same way) reads the balancer's count
//! of arrivals since it started and its queue depth, and [`Recent::read`] turns the readings
//! into the requests that arrived since the newest earlier reading at least
//! [`crate::RECENT`] old, and the queue depth at that reading. The decider takes the arrivals
//! for a rate and, for a backlog, only the queue that was already there at that reading, so
//! a request is never counted twice.

use std::collections::VecDeque;
use std::time::Duration;

use crate::decide::RECENT;

/// Readings at recent decisions: when, arrivals so far, queue depth then; oldest first.
#[derive(Debug, Clone, Default)]
pub struct Recent {
    readings: VecDeque<(Duration, u64, u32)>,
}

/// What [`Recent::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Requests that arrived since the earlier reading.
    pub arrived: u64,
    /// The queue depth at the earlier reading.
    pub queued_before: u32,
    /// The time since the earlier reading.
    pub span: Duration,
}

impl Recent {
    /// No readings yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the reading at `now` (`arrivals` since the start, `queued` now) and compares it
    /// with the newest earlier reading at least [`RECENT`] old (or the oldest there is).
    /// Readings must come in time order; the first finds nothing over no time.
    pub fn read(&mut self, now: Duration, arrivals: u64, queued: u32) -> Reading {
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
                .map_or(Reading::default(), |&(at, before, queued_before)| Reading {
                    arrived: arrivals.saturating_sub(before),
                    queued_before,
                    span: now.saturating_sub(at),
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

    fn reading(arrived: u64, queued_before: u32, span: u64) -> Reading {
        Reading {
            arrived,
            queued_before,
            span: ms(span),
        }
    }

    #[test]
    fn counts_arrivals_since_the_newest_reading_at_least_recent_old() {
        let mut recent = Recent::new();
        assert_eq!(recent.read(ms(0), 100, 0), reading(0, 0, 0));
        // 10 arrivals in 5 ms, 3 of them queued.
        assert_eq!(recent.read(ms(5), 110, 3), reading(10, 0, 5));
        // 30 more by RECENT after that reading: counted from it, with its queue.
        assert_eq!(recent.read(ms(45), 140, 12), reading(30, 3, 40));
        // Still from that one: the one at 45 ms is too young.
        assert_eq!(recent.read(ms(50), 150, 0), reading(40, 3, 45));
        // Now from the one at 50 ms, exactly RECENT old: the one at 45 ms is older than needed.
        assert_eq!(recent.read(ms(90), 160, 0), reading(10, 0, 40));
    }
}
