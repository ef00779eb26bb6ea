//! Load traces: the rows a simulation replays (`time,rate,service` CSV), validated and
//! bounded at the edge, and interpolated between rows.

use std::time::Duration;

/// One row of a load trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TracePoint {
    /// Time since the trace began.
    pub at: Duration,
    /// Requests per second at that time.
    pub rate: f64,
    /// Mean time a worker takes to serve one request at that time.
    pub service: Duration,
}

/// A load trace: rows in time order, linearly interpolated; a step is two rows at the same
/// time. The trace ends at its last row.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    points: Vec<TracePoint>,
}

/// The most rows a trace may hold, and the highest rate and longest span it may describe:
/// bounds that keep a simulation's memory and time in check.
pub const MAX_TRACE_ROWS: usize = 100_000;
/// See [`MAX_TRACE_ROWS`].
pub const MAX_TRACE_RATE: f64 = 100_000.0;
/// See [`MAX_TRACE_ROWS`].
pub const MAX_TRACE_SPAN: Duration = Duration::from_secs(24 * 3600);

/// Why a trace could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    /// A row that is not `time,rate,service`.
    #[error("{source_name}:{line}: {message}")]
    Row {
        /// The file name.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// What is wrong and what was expected.
        message: String,
    },
    /// Fewer than two rows.
    #[error("{0}: a trace needs at least two rows (a start and an end), as `time,rate,service`")]
    TooShort(String),
}

impl Trace {
    /// Builds a trace from rows; see [`Trace::parse_csv`] for the rules.
    pub fn new(points: Vec<TracePoint>) -> Result<Self, TraceError> {
        let text: String = points
            .iter()
            .map(|p| {
                format!(
                    "{}ms,{},{}ms\n",
                    p.at.as_millis(),
                    p.rate,
                    p.service.as_millis()
                )
            })
            .collect();
        Self::parse_csv("<trace>", &text)
    }

    /// Parses CSV rows `time,rate,service` such as `10s,2000,20ms`: time since the start
    /// and service time with units, rate in requests per second. A first row of column names
    /// and lines starting with `#` are skipped. Times must not decrease.
    pub fn parse_csv(source_name: &str, text: &str) -> Result<Self, TraceError> {
        let mut points: Vec<TracePoint> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let row = raw.trim();
            if row.is_empty() || row.starts_with('#') {
                continue;
            }
            let bad = |message: String| TraceError::Row {
                source_name: source_name.to_owned(),
                line,
                message,
            };
            let fields: Vec<&str> = row.split(',').map(str::trim).collect();
            if points.is_empty()
                && fields
                    .first()
                    .is_some_and(|f| f.eq_ignore_ascii_case("time"))
            {
                continue;
            }
            let [at, rate, service] = fields[..] else {
                return Err(bad(format!(
                    "expected 3 fields `time,rate,service` (such as `10s,2000,20ms`), found {}",
                    fields.len()
                )));
            };
            let at: crate::Duration = at.parse().map_err(|e| bad(format!("time: {e}")))?;
            let service: crate::Duration =
                service.parse().map_err(|e| bad(format!("service: {e}")))?;
            let rate: f64 = rate.parse().map_err(|_| {
                bad(format!(
                    "rate: `{rate}` is not a number of requests per second"
                ))
            })?;
            if !(rate.is_finite() && (0.0..=MAX_TRACE_RATE).contains(&rate)) {
                return Err(bad(format!(
                    "rate: {rate} is outside 0..={MAX_TRACE_RATE} requests per second"
                )));
            }
            if service.is_zero() {
                return Err(bad("service: must be longer than 0ms".into()));
            }
            if at.get() > MAX_TRACE_SPAN {
                return Err(bad("time: a trace may span at most 24h".into()));
            }
            if let Some(last) = points.last()
                && at.get() < last.at
            {
                return Err(bad(format!(
                    "time: {at} comes before the previous row's {}",
                    crate::Duration::from_millis(last.at.as_millis() as u64)
                )));
            }
            if points.len() == MAX_TRACE_ROWS {
                return Err(bad(format!(
                    "a trace may have at most {MAX_TRACE_ROWS} rows"
                )));
            }
            points.push(TracePoint {
                at: at.get(),
                rate,
                service: service.get(),
            });
        }
        if points.len() < 2 || points.last().map(|p| p.at) == points.first().map(|p| p.at) {
            return Err(TraceError::TooShort(source_name.to_owned()));
        }
        Ok(Self { points })
    }

    /// The rows.
    pub fn points(&self) -> &[TracePoint] {
        &self.points
    }

    /// When the trace ends.
    pub fn end(&self) -> Duration {
        self.points.last().map_or(Duration::ZERO, |p| p.at)
    }

    /// Rate and mean service time at `t`, interpolated.
    pub fn at(&self, t: Duration) -> (f64, Duration) {
        let after = self.points.partition_point(|p| p.at <= t);
        match (
            after.checked_sub(1).map(|i| self.points[i]),
            self.points.get(after),
        ) {
            (Some(a), Some(b)) => {
                let span = (b.at - a.at).as_secs_f64();
                let f = if span > 0.0 {
                    (t - a.at).as_secs_f64() / span
                } else {
                    0.0
                };
                let service = a.service.as_secs_f64()
                    + f * (b.service.as_secs_f64() - a.service.as_secs_f64());
                (
                    a.rate + f * (b.rate - a.rate),
                    Duration::from_secs_f64(service),
                )
            }
            (Some(a), None) => (a.rate, a.service),
            (None, Some(b)) => (b.rate, b.service),
            (None, None) => (0.0, Duration::from_millis(1)),
        }
    }

    /// The number of requests the trace describes: its rate integrated over time.
    pub fn expected_requests(&self) -> f64 {
        self.points
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs_f64() * (w[0].rate + w[1].rate) / 2.0)
            .sum()
    }

    /// The surges: times where the rate at least doubles within a second.
    pub fn surges(&self) -> Vec<Duration> {
        self.points
            .windows(2)
            .filter(|w| {
                w[1].at - w[0].at <= Duration::from_secs(1)
                    && w[1].rate >= 2.0 * w[0].rate
                    && w[1].rate > 0.0
            })
            .map(|w| w[0].at)
            .collect()
    }
}
