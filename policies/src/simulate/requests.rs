//! Where a run's requests come from: drawn from the trace as the run goes (a Poisson process
//! by thinning, and a service time when each starts), or replayed from an earlier run, so
//! that the autoscalers a comparison runs on one trace and seed serve the very same requests.

use std::time::Duration;

use super::Trace;

/// SplitMix64: small, fast, good enough for arrivals, and the same on every platform.
pub(super) struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A request waiting in the queue, or in service.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Request {
    pub(super) arrived: Duration,
    /// The trace's mean service time when it arrived (drawn), or the time it took (replayed).
    pub(super) service: Duration,
}

/// The requests of one run.
pub(super) enum Source<'a> {
    /// Drawn from one random stream, in the order the run asks: each arrival, and each
    /// service time as its request starts. With a log, every request is written down as it
    /// starts, with its service time: in arrival order, since the queue is FIFO.
    Drawn {
        rng: Rng,
        /// The trace's highest rate, for thinning.
        peak_rate: f64,
        log: Option<Vec<Request>>,
    },
    /// The log of an earlier run.
    Replayed(std::slice::Iter<'a, Request>),
}

impl<'a> Source<'a> {
    /// Requests drawn from `trace` with `seed`; written down when `log`.
    pub(super) fn drawn(seed: u64, trace: &Trace, log: bool) -> Self {
        Source::Drawn {
            rng: Rng(seed),
            peak_rate: trace.points().iter().map(|p| p.rate).fold(0.0, f64::max),
            log: log.then(Vec::new),
        }
    }

    /// The requests an earlier run wrote down.
    pub(super) fn replayed(requests: &'a [Request]) -> Self {
        Source::Replayed(requests.iter())
    }

    /// The next request, arriving after `t` and before the trace's end.
    pub(super) fn next_after(&mut self, trace: &Trace, t: Duration) -> Option<Request> {
        let (rng, peak) = match self {
            Source::Replayed(rest) => return rest.next().copied(),
            Source::Drawn { rng, peak_rate, .. } => (rng, *peak_rate),
        };
        // Thinning against the trace's peak rate gives an exact non-homogeneous Poisson
        // process.
        if peak <= 0.0 {
            return None;
        }
        let mut at = t;
        loop {
            let gap = -(1.0 - rng.next_f64()).ln() / peak;
            at += Duration::from_secs_f64(gap);
            if at >= trace.end() {
                return None;
            }
            let (rate, service) = trace.at(at);
            if rng.next_f64() * peak < rate {
                return Some(Request {
                    arrived: at,
                    service,
                });
            }
        }
    }

    /// How long `request`, starting now, takes: its mean scaled by a uniform factor in
    /// [0.5, 1.5] (drawn), or as it took before (replayed).
    pub(super) fn service(&mut self, request: Request) -> Duration {
        match self {
            Source::Replayed(_) => request.service,
            Source::Drawn { rng, log, .. } => {
                let service = request.service.mul_f64(0.5 + rng.next_f64());
                if let Some(log) = log {
                    log.push(Request {
                        arrived: request.arrived,
                        service,
                    });
                }
                service
            }
        }
    }

    /// The requests written down, if any; `unstarted` (still queued when the run ended) are
    /// given their service times and added, so a replay has every request.
    pub(super) fn into_log(
        mut self,
        unstarted: impl Iterator<Item = Request>,
    ) -> Option<Vec<Request>> {
        for request in unstarted {
            self.service(request);
        }
        match self {
            Source::Drawn { log, .. } => log,
            Source::Replayed(_) => None,
        }
    }
}
