//! The demo's summary numbers, as pure functions of what the load generator booked: the p95
//! of each 100 ms slot (by send time), the worst slot of a surge, how long after the surge
//! began p95 was back under the SLO for good, and the static pool a surge really needs
//! (Little's law: arrival rate × service time, divided by what one worker serves at once).
//!
//! A failed request is slower than any answer: a slot's p95 is [`SlotP95::Failed`] when more
//! than 5 % of its requests failed, so failures can never make a slot look fast.

use std::fmt;
use std::time::Duration;

use crate::loadgen::{SLOT, Slot};

/// The 95th percentile of one slot's requests, failures ranked worse than any answer.
/// Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SlotP95 {
    /// At least 95 % of the slot's requests were answered; the 95th percentile latency.
    Answered(Duration),
    /// More than 5 % of the slot's requests failed.
    Failed,
}

impl SlotP95 {
    /// Whether this p95 meets `slo`.
    pub(crate) fn meets(self, slo: Duration) -> bool {
        matches!(self, SlotP95::Answered(p95) if p95 <= slo)
    }
}

impl fmt::Display for SlotP95 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlotP95::Answered(p95) => write!(f, "{}", Ms(*p95)),
            SlotP95::Failed => write!(f, "failed (over 5% of a slot's requests failed)"),
        }
    }
}

/// A duration shown in milliseconds, whole from 10 ms up, with a tenth below.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ms(pub(crate) Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_secs_f64() * 1e3;
        if ms < 10.0 {
            write!(f, "{ms:.1} ms")
        } else {
            write!(f, "{ms:.0} ms")
        }
    }
}

/// The p95 of the requests sent in `slot`; `None` when none were.
pub(crate) fn slot_p95(slot: &Slot) -> Option<SlotP95> {
    let total = slot.requests();
    if total == 0 {
        return None;
    }
    // The same rank as `loadgen::quantile`, over answers followed by failures.
    let rank = ((0.95 * total as f64).ceil() as u64).clamp(1, total) - 1;
    let mut answered = slot.latencies.clone();
    answered.sort_unstable();
    Some(
        answered
            .get(rank as usize)
            .map_or(SlotP95::Failed, |&p95| SlotP95::Answered(p95)),
    )
}

/// The worst p95 among `slots` that saw requests; `None` if none did.
pub(crate) fn worst_p95(slots: &[Slot]) -> Option<SlotP95> {
    slots.iter().filter_map(slot_p95).max()
}

/// How many slots into `slots` (the first being the surge's first) p95 came back under `slo`
/// and stayed there for `hold` consecutive slots; `None` if it never did for that long before
/// the record ends. A slot nobody sent a request in breaks no streak (nobody waited).
pub(crate) fn back_under_slo(slots: &[Slot], slo: Duration, hold: usize) -> Option<usize> {
    let hold = hold.max(1);
    let mut streak_start = None;
    for (index, slot) in slots.iter().enumerate() {
        if slot_p95(slot).is_none_or(|p95| p95.meets(slo)) {
            let start = *streak_start.get_or_insert(index);
            if index + 1 - start >= hold {
                return Some(start);
            }
        } else {
            streak_start = None;
        }
    }
    None
}

/// The slots among `slots` whose p95 missed `slo` (failed ones included): how many, and the
/// index of the last. `back_under_slo` tells when p95 recovered for good; this tells whether
/// a later slot went over again.
pub(crate) fn over_slo(slots: &[Slot], slo: Duration) -> (usize, Option<usize>) {
    let over = slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| slot_p95(slot).is_some_and(|p95| !p95.meets(slo)));
    over.fold((0, None), |(count, _), (index, _)| (count + 1, Some(index)))
}

/// The duration of `slots` slots.
pub(crate) fn slots_duration(slots: usize) -> Duration {
    SLOT * u32::try_from(slots).unwrap_or(u32::MAX)
}

/// The workers a steady `rate` (requests per second) needs when each request takes `service`
/// and a worker serves `concurrency` at once: `ceil(rate × service / concurrency)`, worked out
/// in whole microseconds and thousandths of a request so that an exact fit does not round up.
pub(crate) fn right_sized_pool(rate: f64, service: Duration, concurrency: usize) -> u32 {
    if rate <= 0.0 || service.is_zero() {
        return 0;
    }
    let milli_rate = (rate * 1000.0).round() as u128; // thousandths of a request per second
    let work = milli_rate * service.as_micros(); // (1/1000 request) × µs per second
    let per_worker = 1000 * 1_000_000 * concurrency.max(1) as u128;
    u32::try_from(work.div_ceil(per_worker)).unwrap_or(u32::MAX)
}

/// Workers alive: `ready` and `draining` as the balancer counts them now, plus the clones the
/// scaler last said were `pending`. The scaler publishes that count (and its `desired`) once
/// a tick, so a clone that became ready since is in both counts: pending is counted only up
/// to what `desired` still lacks, so that no worker is counted twice.
pub(crate) fn live_workers(ready: usize, draining: usize, pending: usize, desired: usize) -> usize {
    ready + draining + pending.min(desired.saturating_sub(ready))
}

/// `numerator / denominator`, or `None` when the denominator is zero.
pub(crate) fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A slot with answers of these latencies (ms) and `failed` failures.
    fn slot(latencies: &[u64], failed: u64) -> Slot {
        Slot {
            latencies: latencies.iter().map(|&l| ms(l)).collect(),
            failed,
        }
    }

    /// A slot of 20 answers that all took `p95` ms.
    fn steady(p95: u64) -> Slot {
        slot(&[p95; 20], 0)
    }

    #[test]
    fn slot_p95_ranks_failures_after_every_answer() {
        let cases: &[(&str, Slot, Option<SlotP95>)] = &[
            ("empty", slot(&[], 0), None),
            (
                "one answer",
                slot(&[40], 0),
                Some(SlotP95::Answered(ms(40))),
            ),
            (
                "20 answers: the 19th",
                slot(
                    &[
                        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                    ],
                    0,
                ),
                Some(SlotP95::Answered(ms(19))),
            ),
            (
                "unsorted",
                slot(&[90, 10, 50, 70, 30], 0),
                Some(SlotP95::Answered(ms(90))),
            ),
            (
                "one failure in 20 is within the 5 %",
                slot(&[50; 19], 1),
                Some(SlotP95::Answered(ms(50))),
            ),
            (
                "two failures in 20 are not",
                slot(&[50; 18], 2),
                Some(SlotP95::Failed),
            ),
            ("only failures", slot(&[], 3), Some(SlotP95::Failed)),
        ];
        for (name, slot, expected) in cases {
            assert_eq!(slot_p95(slot), *expected, "{name}");
        }
    }

    #[test]
    fn the_worst_slot_is_the_slowest_and_a_failed_one_is_worse_than_any() {
        let cases: &[(&str, Vec<Slot>, Option<SlotP95>)] = &[
            ("no slots", vec![], None),
            ("only empty slots", vec![slot(&[], 0), slot(&[], 0)], None),
            (
                "the slowest, empty slots ignored",
                vec![steady(40), slot(&[], 0), steady(400), steady(60)],
                Some(SlotP95::Answered(ms(400))),
            ),
            (
                "a failed slot",
                vec![steady(40), slot(&[], 5), steady(400)],
                Some(SlotP95::Failed),
            ),
        ];
        for (name, slots, expected) in cases {
            assert_eq!(worst_p95(slots), *expected, "{name}");
        }
    }

    #[test]
    fn back_under_the_slo_is_the_start_of_the_first_streak_long_enough() {
        let slo = ms(150);
        let ok = || steady(60);
        let slow = || steady(400);
        let failed = || slot(&[], 4);
        let empty = || slot(&[], 0);
        let cases: &[(&str, Vec<Slot>, usize, Option<usize>)] = &[
            ("never above", vec![ok(), ok(), ok()], 3, Some(0)),
            (
                "after two slow slots",
                vec![slow(), slow(), ok(), ok(), ok()],
                3,
                Some(2),
            ),
            (
                "a dip too short does not count",
                vec![slow(), ok(), slow(), ok(), ok(), ok()],
                3,
                Some(3),
            ),
            (
                "exactly at the SLO is under",
                vec![steady(150), steady(150)],
                2,
                Some(0),
            ),
            ("never recovers", vec![slow(), slow(), slow()], 2, None),
            (
                "recovers too late to hold",
                vec![slow(), slow(), ok()],
                2,
                None,
            ),
            (
                "failures are not under",
                vec![failed(), ok(), ok()],
                2,
                Some(1),
            ),
            (
                "an empty slot breaks no streak",
                vec![slow(), ok(), empty(), ok()],
                3,
                Some(1),
            ),
            ("only empty slots", vec![empty(), empty()], 2, Some(0)),
            ("no slots", vec![], 10, None),
            (
                "a hold of zero means one slot",
                vec![slow(), ok()],
                0,
                Some(1),
            ),
        ];
        for (name, slots, hold, expected) in cases {
            assert_eq!(back_under_slo(slots, slo, *hold), *expected, "{name}");
        }
    }

    #[test]
    fn slots_over_the_slo_are_counted_with_the_last_one() {
        let slo = ms(150);
        type Case = (&'static str, Vec<Slot>, (usize, Option<usize>));
        let cases: &[Case] = &[
            (
                "none",
                vec![steady(60), slot(&[], 0), steady(150)],
                (0, None),
            ),
            (
                "a slow start and a later spike",
                vec![steady(400), steady(60), steady(60), steady(210), steady(60)],
                (2, Some(3)),
            ),
            (
                "a failed slot is over",
                vec![steady(60), slot(&[], 2)],
                (1, Some(1)),
            ),
            ("no slots", vec![], (0, None)),
        ];
        for (name, slots, expected) in cases {
            assert_eq!(over_slo(slots, slo), *expected, "{name}");
        }
    }

    #[test]
    fn the_right_sized_pool_is_littles_law_rounded_up() {
        let cases: &[(&str, f64, u64, usize, u32)] = &[
            (
                "the demo's surge: 2000 × 50 ms ÷ 8 = 12.5",
                2000.0,
                50,
                8,
                13,
            ),
            (
                "an exact fit does not round up: 1600 × 50 ms ÷ 8",
                1600.0,
                50,
                8,
                10,
            ),
            ("the demo's calm", 50.0, 50, 8, 1),
            ("the from-zero crowd", 1000.0, 50, 8, 7),
            ("no traffic", 0.0, 50, 8, 0),
            ("no service time", 2000.0, 0, 8, 0),
            ("a concurrency of zero counts as one", 100.0, 50, 0, 5),
        ];
        for (name, rate, service, concurrency, expected) in cases {
            assert_eq!(
                right_sized_pool(*rate, ms(*service), *concurrency),
                *expected,
                "{name}"
            );
        }
    }

    #[test]
    fn live_workers_count_a_clone_that_became_ready_since_the_last_tick_once() {
        // (name, ready, draining, pending, desired, live)
        let cases: &[(&str, usize, usize, usize, usize, usize)] = &[
            ("steady", 13, 0, 0, 13, 13),
            ("growing, as published", 1, 0, 31, 32, 32),
            ("ten of the pending ready since", 11, 0, 31, 32, 32),
            ("all ready since", 32, 0, 31, 32, 32),
            ("draining ones count", 16, 16, 0, 16, 32),
            ("at zero", 0, 0, 0, 0, 0),
            ("the first clone from zero", 0, 0, 1, 1, 1),
            ("no decision yet", 1, 0, 0, 0, 1),
        ];
        for (name, ready, draining, pending, desired, live) in cases {
            assert_eq!(
                live_workers(*ready, *draining, *pending, *desired),
                *live,
                "{name}"
            );
        }
    }

    #[test]
    fn ratios_and_durations() {
        assert_eq!(ratio(32.0, 13.0).map(|r| (r * 100.0).round()), Some(246.0));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(slots_duration(13), ms(1300));
        assert_eq!(Ms(ms(171)).to_string(), "171 ms");
        assert_eq!(Ms(Duration::from_micros(1_640)).to_string(), "1.6 ms");
        assert_eq!(SlotP95::Answered(ms(412)).to_string(), "412 ms");
    }
}
