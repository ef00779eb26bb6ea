//! An open-loop load generator: requests go out on a schedule whether or not earlier ones
//! were answered, as a real crowd's do, so a struggling server shows as latency and errors
//! rather than as a politely lowered rate (the "coordinated omission" a closed loop suffers).
//! Bounded in count (the schedule), in time (a timeout per request) and in requests in flight.
//!
//! Every outcome is booked twice: by the second it completed in ([`Second`], the demo's
//! per-second table, for people) and by the 100 ms slot it was sent in ([`Slot`], for the
//! summary: which requests a surge's first moments hurt). A request that failed, timed out or
//! was not sent because too many were in flight is booked as a failure in both, never
//! dropped. The slots cover the schedule and are allocated up front, so the record's memory
//! is bounded by the schedule (750 slots for the demo's 75 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The length of one [`Slot`].
pub(crate) const SLOT: Duration = Duration::from_millis(100);

/// One stretch of the schedule: `rate` requests per second for `duration`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stage {
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
}

/// What happened during one second of the run (by completion time).
#[derive(Debug, Clone, Default)]
pub(crate) struct Second {
    /// Requests sent.
    pub(crate) sent: u64,
    /// Answered with a 2xx.
    pub(crate) ok: u64,
    /// Answered otherwise, failed or timed out.
    pub(crate) errors: u64,
    /// Not sent because too many were already in flight.
    pub(crate) skipped: u64,
    /// Latency of each request that completed in this second.
    pub(crate) latencies: Vec<Duration>,
}

/// The requests sent during one [`SLOT`] of the run, by send time, and how each ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The latency of each request answered with a 2xx.
    pub(crate) latencies: Vec<Duration>,
    /// Requests that failed: answered otherwise, broken, timed out, or not sent at all
    /// because too many were already in flight.
    pub(crate) failed: u64,
}

impl Slot {
    /// Requests booked in this slot, answered or not.
    pub(crate) fn requests(&self) -> u64 {
        self.latencies.len() as u64 + self.failed
    }
}

/// The run so far: one entry per second since the start (by completion time), and one slot
/// per [`SLOT`] of the schedule (by send time).
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) seconds: Vec<Second>,
    pub(crate) slots: Vec<Slot>,
}

impl Record {
    /// An empty record with a slot for every [`SLOT`] of `schedule`.
    pub(crate) fn for_schedule(schedule: &[Stage]) -> Record {
        let total: Duration = schedule.iter().map(|stage| stage.duration).sum();
        let slots = total.as_nanos().div_ceil(SLOT.as_nanos()).max(1) as usize;
        Record {
            seconds: Vec::new(),
            slots: vec![Slot::default(); slots],
        }
    }

    fn at(&mut self, second: usize) -> &mut Second {
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, Second::default);
        }
        &mut self.seconds[second]
    }

    /// The slot of a request sent `since_start` into the run. A request sent after the
    /// schedule's end (the generator ran late) is booked in the last slot.
    fn slot(&mut self, since_start: Duration) -> &mut Slot {
        if self.slots.is_empty() {
            self.slots.push(Slot::default());
        }
        let last = self.slots.len() - 1;
        let index = (since_start.as_nanos() / SLOT.as_nanos()).min(last as u128) as usize;
        &mut self.slots[index]
    }
}

/// Locks `record`. It holds counts only, so one that a panicking task left half-written is
/// still worth reporting: a poisoned lock is taken anyway.
pub(crate) fn lock(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `q` quantile of `samples`.
pub(crate) fn quantile(samples: &mut [Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
    Some(samples[rank])
}

/// Sends one GET `url` on a connection of its own and reads the whole answer; its latency,
/// or why it failed (an answer other than 2xx, a broken connection, no answer within
/// `timeout`).
pub(crate) async fn one_request(url: &hyper::Uri, timeout: Duration) -> anyhow::Result<Duration> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let sent_at = Instant::now();
    let answered = tokio::time::timeout(timeout, async {
        let response = client
            .get(url.clone())
            .await
            .context("sending the request")?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .context("reading the answer")?;
        anyhow::ensure!(status.is_success(), "answered {status}");
        Ok(())
    })
    .await;
    let latency = sent_at.elapsed();
    match answered {
        Ok(Ok(())) => Ok(latency),
        Ok(Err(e)) => Err(e.context(format!("after {latency:?}"))),
        Err(_) => anyhow::bail!("no answer within {timeout:?}"),
    }
}

/// Sends GET `url` on `schedule`, starting now, and records every outcome in `record`
/// (made with [`Record::for_schedule`]). Returns when the schedule is over and every request
/// has ended.
pub(crate) async fn run(
    url: hyper::Uri,
    schedule: Vec<Stage>,
    max_in_flight: usize,
    timeout: Duration,
    record: Arc<Mutex<Record>>,
) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_in_flight)
        .build_http();
    let start = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stage_start = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for stage in schedule {
        let mut sent = 0u64;
        loop {
            tick.tick().await;
            let elapsed = start
                .elapsed()
                .saturating_sub(stage_start)
                .min(stage.duration);
            let due = (elapsed.as_secs_f64() * stage.rate).floor() as u64;
            for _ in sent..due {
                let sent_at = Instant::now();
                let since_start = sent_at.duration_since(start);
                let second = since_start.as_secs() as usize;
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    let mut r = lock(&record);
                    r.at(second).skipped += 1;
                    r.slot(since_start).failed += 1;
                    continue;
                };
                lock(&record).at(second).sent += 1;
                let (client, url, record) = (client.clone(), url.clone(), Arc::clone(&record));
                tasks.spawn(async move {
                    let outcome = tokio::time::timeout(timeout, async {
                        let response = client.get(url).await.ok()?;
                        let ok = response.status().is_success();
                        response.into_body().collect().await.ok()?;
                        Some(ok)
                    })
                    .await;
                    let done = Instant::now();
                    let latency = done - sent_at;
                    let second = done.duration_since(start).as_secs() as usize;
                    let mut r = lock(&record);
                    if let Ok(Some(true)) = outcome {
                        let s = r.at(second);
                        s.ok += 1;
                        s.latencies.push(latency);
                        r.slot(since_start).latencies.push(latency);
                    } else {
                        r.at(second).errors += 1;
                        r.slot(since_start).failed += 1;
                    }
                    drop(permit);
                });
            }
            sent = due;
            // Reap finished tasks as we go, so the set stays small.
            while tasks.try_join_next().is_some() {}
            if elapsed >= stage.duration {
                break;
            }
        }
        stage_start += stage.duration;
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is a failed test.

    use super::*;

    #[test]
    fn the_record_has_a_slot_per_100_ms_of_the_schedule_and_books_late_sends_in_the_last() {
        let schedule = [
            Stage {
                rate: 50.0,
                duration: Duration::from_secs(10),
            },
            Stage {
                rate: 2000.0,
                duration: Duration::from_millis(20_050),
            },
        ];
        let mut record = Record::for_schedule(&schedule);
        assert_eq!(record.slots.len(), 301, "30.05 s rounds up to 301 slots");
        record.slot(Duration::from_millis(99)).failed += 1;
        record.slot(Duration::from_millis(100)).failed += 2;
        record.slot(Duration::from_secs(3600)).failed += 3;
        let failed: Vec<u64> = record.slots.iter().map(|s| s.failed).collect();
        assert_eq!((failed[0], failed[1], failed[300]), (1, 2, 3));
        assert_eq!(failed.iter().sum::<u64>(), 6);
    }
}
