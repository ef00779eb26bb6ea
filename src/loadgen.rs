//! An open-loop load generator: requests go out on a schedule whether or not earlier ones
//! were answered, as a real crowd's do, so a struggling server shows as latency and errors
//! rather than as a politely lowered rate (the "coordinated omission" a closed loop suffers).
//! Bounded in count (the schedule), in time (a timeout per request) and in requests in flight.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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

/// The run so far, one entry per second since the start.
#[derive(Debug, Default)]
pub(crate) struct Record {
    pub(crate) seconds: Vec<Second>,
}

impl Record {
    fn at(&mut self, second: usize) -> &mut Second {
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, Second::default);
        }
        &mut self.seconds[second]
    }
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

/// Sends GET `url` on `schedule`, starting now, and records every outcome in `record`.
/// Returns when the schedule is over and every request has ended.
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
                let second = start.elapsed().as_secs() as usize;
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    let mut r = record
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    r.at(second).skipped += 1;
                    continue;
                };
                record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .at(second)
                    .sent += 1;
                let (client, url, record) = (client.clone(), url.clone(), Arc::clone(&record));
                tasks.spawn(async move {
                    let sent_at = Instant::now();
                    let outcome = tokio::time::timeout(timeout, async {
                        let response = client.get(url).await.ok()?;
                        let ok = response.status().is_success();
                        response.into_body().collect().await.ok()?;
                        Some(ok)
                    })
                    .await;
                    let done = Instant::now();
                    let second = done.duration_since(start).as_secs() as usize;
                    let mut r = record
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let s = r.at(second);
                    match outcome {
                        Ok(Some(true)) => {
                            s.ok += 1;
                            s.latencies.push(done - sent_at);
                        }
                        _ => s.errors += 1,
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
