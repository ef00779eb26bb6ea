//! What a finished simulation says: the per-tick records judged against the SLO, the
//! summary, and the CSV and text the `squall policy simulate` command prints.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Compared, Run, Sim, Summary, TickRecord, Trace, percentile};

pub(super) fn summarize(
    mut sim: Sim<'_>,
    mut records: Vec<TickRecord>,
    trace: &Trace,
    slo: Option<Duration>,
) -> Run {
    for r in &mut records {
        let i = sim.tick_of(r.at).saturating_sub(1);
        r.p95 = sim.by_arrival.get_mut(i).and_then(|l| percentile(l, 0.95));
    }
    let over = |r: &TickRecord| matches!((r.p95, slo), (Some(p), Some(s)) if p > s);
    let ticks_over_slo = records.iter().filter(|r| over(r)).count();
    let per_second = (Duration::from_secs(1).as_nanos() / sim.policy.tick.get().as_nanos().max(1))
        .max(1) as usize;
    let recoveries = trace
        .surges()
        .into_iter()
        .map(|start| {
            let recovered = slo.and_then(|_| {
                let from = records.iter().position(|r| r.at > start)?;
                (from..records.len())
                    .find(|&k| {
                        let stretch = &records[k..(k + per_second).min(records.len())];
                        stretch.len() == per_second && !stretch.iter().any(over)
                    })
                    .map(|k| records[k].at.saturating_sub(start + sim.policy.tick.get()))
            });
            (start, recovered)
        })
        .collect();
    let mut all: Vec<f64> = sim.by_arrival.iter().flatten().copied().collect();
    let completed = all.len() as u64;
    let summary = Summary {
        slo,
        recoveries,
        ticks_over_slo,
        ticks: records.len(),
        worker_seconds: sim.worker_seconds,
        peak_workers: sim.peak_workers,
        completed,
        failed: sim.failed,
        activations: sim.activations,
        p50: percentile(&mut all, 0.50),
        p95: percentile(&mut all, 0.95),
        p99: percentile(&mut all, 0.99),
    };
    sim.by_arrival.clear();
    Run {
        ticks: records,
        summary,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0}", d.as_secs_f64() * 1e3),
    )
}

impl Run {
    /// The tick-by-tick record as CSV, one row per tick.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "time_s,rate_rps,demand,desired,ready,pending,draining,panic,p95_ms,reason\n",
        );
        for r in &self.ticks {
            let reason = r.decision.reason.to_string().replace('"', "'");
            let _ = writeln!(
                out,
                "{:.3},{:.1},{},{},{},{},{},{},{},\"{}\"",
                r.at.as_secs_f64(),
                r.rate,
                r.demand,
                r.decision.desired,
                r.workers.ready,
                r.workers.pending,
                r.workers.draining,
                u8::from(r.decision.panic),
                ms(r.p95),
                reason
            );
        }
        out
    }

    /// The summary as a few lines of text.
    pub fn summary_text(&self) -> String {
        let s = &self.summary;
        let mut out = String::new();
        match s.slo {
            Some(slo) => {
                for (start, recovered) in &s.recoveries {
                    let _ = writeln!(
                        out,
                        "surge at {:.1}s: p95 back under the {:.0}ms SLO {}",
                        start.as_secs_f64(),
                        slo.as_secs_f64() * 1e3,
                        recovered.map_or_else(
                            || "never (within the trace)".to_owned(),
                            |d| format!("after {:.1}s", d.as_secs_f64())
                        )
                    );
                }
                let _ = writeln!(out, "ticks over SLO: {} of {}", s.ticks_over_slo, s.ticks);
            }
            None => {
                let _ = writeln!(
                    out,
                    "no latency SLO: recovery not judged (pass --slo to judge one)"
                );
            }
        }
        let _ = writeln!(
            out,
            "worker-seconds: {:.1}   peak workers: {}   scale-ups between ticks: {}",
            s.worker_seconds, s.peak_workers, s.activations
        );
        let _ = writeln!(
            out,
            "requests: {} completed, {} failed   latency p50 {}ms  p95 {}ms  p99 {}ms",
            s.completed,
            s.failed,
            ms(s.p50),
            ms(s.p95),
            ms(s.p99)
        );
        out
    }
}

/// Runs of several autoscalers on one trace, side by side: a legend of what each column is,
/// a row per measure, and the notes on how each was run.
pub fn comparison_text(compared: &[Compared]) -> String {
    let mut out = String::new();
    let Some(first) = compared.first() else {
        return out;
    };
    let name_width = compared.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in compared {
        let startup = if c.name == "squall" {
            "clone delay"
        } else {
            "cold start"
        };
        let _ = writeln!(
            out,
            "  {:<name_width$}  {}, {startup} {}",
            c.name,
            c.label,
            crate::Duration::from_millis(c.startup.as_millis() as u64)
        );
    }
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let column = |f: &dyn Fn(&Summary) -> String| -> Vec<String> {
        compared.iter().map(|c| f(&c.run.summary)).collect()
    };
    match first.run.summary.slo {
        Some(slo) => {
            for (i, (start, _)) in first.run.summary.recoveries.iter().enumerate() {
                rows.push((
                    format!(
                        "p95 back under the {:.0}ms SLO after the surge at {:.1}s",
                        slo.as_secs_f64() * 1e3,
                        start.as_secs_f64()
                    ),
                    column(&|s| match s.recoveries.get(i) {
                        Some((_, Some(d))) => format!("{:.1}s", d.as_secs_f64()),
                        _ => "never".to_owned(),
                    }),
                ));
            }
            // Every run is recorded at the policy's tick, whatever the autoscaler's period.
            let tick = first.run.ticks.first().map_or(0, |r| r.at.as_millis());
            rows.push((
                format!(
                    "{tick}ms ticks over the SLO (of {})",
                    first.run.summary.ticks
                ),
                column(&|s| s.ticks_over_slo.to_string()),
            ));
        }
        None => rows.push((
            "no latency SLO: recovery not judged (pass --slo)".to_owned(),
            column(&|_| "-".to_owned()),
        )),
    }
    rows.push((
        "worker-seconds".to_owned(),
        column(&|s| format!("{:.1}", s.worker_seconds)),
    ));
    rows.push((
        "peak workers".to_owned(),
        column(&|s| s.peak_workers.to_string()),
    ));
    rows.push((
        "scale-ups between ticks".to_owned(),
        column(&|s| s.activations.to_string()),
    ));
    rows.push((
        "requests completed".to_owned(),
        column(&|s| s.completed.to_string()),
    ));
    rows.push((
        "requests failed".to_owned(),
        column(&|s| s.failed.to_string()),
    ));
    rows.push((
        "latency p95".to_owned(),
        column(&|s| format!("{}ms", ms(s.p95))),
    ));
    rows.push((
        "latency p99".to_owned(),
        column(&|s| format!("{}ms", ms(s.p99))),
    ));
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let width = rows
        .iter()
        .flat_map(|(_, v)| v.iter().map(String::len))
        .chain(compared.iter().map(|c| c.name.len()))
        .max()
        .unwrap_or(0)
        + 2;
    let _ = write!(out, "\n{:label_width$}", "");
    for c in compared {
        let _ = write!(out, "{:>width$}", c.name);
    }
    out.push('\n');
    for (label, values) in &rows {
        let _ = write!(out, "{label:<label_width$}");
        for v in values {
            let _ = write!(out, "{v:>width$}");
        }
        out.push('\n');
    }
    let notes: Vec<&String> = compared.iter().flat_map(|c| &c.notes).collect();
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            let _ = writeln!(out, "{note}");
        }
    }
    out
}
