//! A self-contained SVG chart of a simulated run: load and workers on top, p95 against the
//! SLO below, panic periods shaded. No scripts, no external assets.

use std::fmt::Write as _;

use crate::simulate::Run;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 60.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;

fn polyline(out: &mut String, points: impl Iterator<Item = (f64, f64)>, color: &str, dashed: bool) {
    let mut coords = String::new();
    for (x, y) in points {
        let _ = write!(coords, "{x:.1},{y:.1} ");
    }
    let dash = if dashed {
        r#" stroke-dasharray="6 4""#
    } else {
        ""
    };
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.5"{dash} points="{}"/>"#,
        coords.trim_end()
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Run {
    /// The run as an SVG document titled `title`.
    pub fn to_svg(&self, title: &str) -> String {
        let height = TOP + 2.0 * PANEL + GAP + 40.0;
        let plot_w = WIDTH - LEFT - RIGHT;
        let end = self
            .ticks
            .last()
            .map_or(1.0, |r| r.at.as_secs_f64())
            .max(1e-3);
        let x = |t: f64| LEFT + plot_w * t / end;
        let max_rate = self.ticks.iter().map(|r| r.rate).fold(1.0, f64::max);
        let max_workers = self
            .ticks
            .iter()
            .map(|r| {
                r.decision
                    .desired
                    .max(r.workers.ready + r.workers.pending + r.workers.draining)
            })
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let slo_ms = self.summary.slo.map(|d| d.as_secs_f64() * 1e3);
        let max_p95 = self
            .ticks
            .iter()
            .filter_map(|r| r.p95)
            .map(|d| d.as_secs_f64() * 1e3)
            .fold(slo_ms.unwrap_or(1.0) * 1.5, f64::max)
            .min(slo_ms.map_or(f64::INFINITY, |s| s * 10.0));
        let top_y = |v: f64, max: f64| TOP + PANEL * (1.0 - v / max);
        let low_top = TOP + PANEL + GAP;
        let low_y = |v: f64| low_top + PANEL * (1.0 - (v / max_p95).min(1.0));

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="20" font-size="15">{}</text>"#,
            escape(title)
        );

        // Panic periods, shaded across both panels.
        let mut panic_start = None;
        let tick = self.ticks.first().map_or(0.1, |r| r.at.as_secs_f64());
        for (i, r) in self.ticks.iter().enumerate() {
            let last = i + 1 == self.ticks.len();
            match (r.decision.panic && !last, panic_start) {
                (true, None) => panic_start = Some(r.at.as_secs_f64() - tick),
                (false, Some(start)) => {
                    let (x0, x1) = (x(start), x(r.at.as_secs_f64()));
                    let _ = writeln!(
                        out,
                        r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#f6c9c9" opacity="0.6"/>"##,
                        (x1 - x0).max(1.0),
                        2.0 * PANEL + GAP
                    );
                    panic_start = None;
                }
                _ => {}
            }
        }

        for top in [TOP, low_top] {
            let _ = writeln!(
                out,
                r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#999"/>"##
            );
        }
        // Axes labels.
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" fill="#1f77b4">requests/s (max {max_rate:.0})</text>"##,
            LEFT + 5.0,
            TOP + 14.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#2ca02c">workers: desired (dashed), ready (max {max_workers:.0})</text>"##,
            WIDTH - RIGHT - 5.0,
            TOP + 14.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" fill="#d62728">p95 of arriving requests, ms (top {max_p95:.0}){}</text>"##,
            LEFT + 5.0,
            low_top + 14.0,
            slo_ms.map_or(String::new(), |s| format!("; SLO {s:.0}ms dashed"))
        );
        for i in 0..=4 {
            let t = end * f64::from(i) / 4.0;
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.0}s</text>"#,
                x(t),
                low_top + PANEL + 16.0
            );
        }

        let at = |r: &crate::TickRecord| x(r.at.as_secs_f64());
        polyline(
            &mut out,
            self.ticks.iter().map(|r| (at(r), top_y(r.rate, max_rate))),
            "#1f77b4",
            false,
        );
        polyline(
            &mut out,
            self.ticks
                .iter()
                .map(|r| (at(r), top_y(f64::from(r.decision.desired), max_workers))),
            "#2ca02c",
            true,
        );
        polyline(
            &mut out,
            self.ticks
                .iter()
                .map(|r| (at(r), top_y(f64::from(r.workers.ready), max_workers))),
            "#2ca02c",
            false,
        );
        polyline(
            &mut out,
            self.ticks
                .iter()
                .filter_map(|r| Some((at(r), low_y(r.p95?.as_secs_f64() * 1e3)))),
            "#d62728",
            false,
        );
        if let Some(slo) = slo_ms {
            let y = low_y(slo);
            polyline(
                &mut out,
                [(LEFT, y), (WIDTH - RIGHT, y)].into_iter(),
                "#333",
                true,
            );
        }
        out.push_str("</svg>\n");
        out
    }
}
