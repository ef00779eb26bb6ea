//! The policy a user writes: its fields, their defaults, and the checks that go beyond types.
//!
//! Every default lives in this file, in the `Default` impls and the `DEFAULT_*` constants, and
//! is listed in the crate documentation.

use serde::{Deserialize, Serialize};

use crate::units::{Duration, Step};

/// Default `target.concurrency`: in-flight requests per worker.
pub const DEFAULT_CONCURRENCY: f64 = 8.0;
/// Default `panic_threshold`: panic when short-window demand reaches twice the ready capacity.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 2.0;
/// The most workers a policy may ask for; a guard against typos such as `max: 10000000`.
pub const MAX_WORKERS: u32 = 10_000;
/// The shortest tick a policy may ask for.
pub const MIN_TICK: Duration = Duration::from_millis(10);

/// A scaling policy: which template to clone, and how many workers to keep for the load the
/// balancer measures. Build one with [`crate::load`] (which reports mistakes with their
/// line and column) and only then use it; a `Policy` from elsewhere should go through
/// [`Policy::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy's name, used in logs and metrics.
    pub name: String,
    /// The forkd template new workers are cloned from.
    pub template: String,
    /// Bounds on the worker count.
    #[serde(default)]
    pub workers: Workers,
    /// What the scaler keeps true.
    #[serde(default)]
    pub target: Target,
    /// The measurement windows.
    #[serde(default)]
    pub window: Windows,
    /// Panic when panic-window demand is at least this multiple of the ready capacity.
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: f64,
    /// How fast to grow.
    #[serde(default)]
    pub scale_up: ScaleUp,
    /// How slowly to shrink.
    #[serde(default)]
    pub scale_down: ScaleDown,
    /// How often to decide.
    #[serde(default = "default_tick")]
    pub tick: Duration,
}

fn default_panic_threshold() -> f64 {
    DEFAULT_PANIC_THRESHOLD
}

fn default_tick() -> Duration {
    Duration::from_millis(100)
}

/// Bounds on the number of workers (ready and cloning; draining workers do not count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workers {
    /// Never fewer: default 1. Zero allows scaling to zero, with the balancer holding
    /// requests while the first worker is cloned.
    pub min: u32,
    /// Never more: default 32.
    pub max: u32,
}

impl Default for Workers {
    fn default() -> Self {
        Self { min: 1, max: 32 }
    }
}

/// What the scaler keeps true. At least one of the two must be given; with only
/// `latency_p95`, `concurrency` takes its default.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// In-flight requests per worker (queued requests included in the demand): default 8
    /// when not given.
    #[serde(default)]
    pub concurrency: Option<f64>,
    /// The 95th percentile latency the balancer should measure, queue wait included.
    /// Default: none. When it is exceeded while concurrency looks fine, the scaler adds
    /// workers in proportion to the overshoot.
    #[serde(default)]
    pub latency_p95: Option<Duration>,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            concurrency: Some(DEFAULT_CONCURRENCY),
            latency_p95: None,
        }
    }
}

impl Target {
    /// The concurrency per worker in force: the one given, or the default.
    pub fn concurrency(&self) -> f64 {
        self.concurrency.unwrap_or(DEFAULT_CONCURRENCY)
    }
}

/// The two measurement windows: a long one for steady decisions, a short one to notice a
/// flash crowd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Windows {
    /// Default 10s. Also how long things must stay calm before panic mode ends.
    pub stable: Duration,
    /// Default 1s.
    pub panic: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            stable: Duration::from_secs(10),
            panic: Duration::from_secs(1),
        }
    }
}

/// How fast to grow.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleUp {
    /// The most workers one decision adds: default `100%` (double), always at least one.
    pub max_step: Step,
    /// The least time between two scale-ups: default 0s.
    pub cooldown: Duration,
}

impl Default for ScaleUp {
    fn default() -> Self {
        Self {
            max_step: Step::Percent(100.0),
            cooldown: Duration::from_secs(0),
        }
    }
}

/// How slowly to shrink.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleDown {
    /// Demand must stay low this long before any worker is removed: default 30s. The count
    /// never drops below the highest need seen over this delay.
    pub delay: Duration,
    /// The most workers one decision removes: default 2, always at least one.
    pub max_step: Step,
    /// The least time between two scale-downs: default 0s.
    pub cooldown: Duration,
    /// How long a draining worker may take to finish its requests before it is killed:
    /// default 30s. The scaler enforces it; the decider does not use it.
    pub drain_timeout: Duration,
}

impl Default for ScaleDown {
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(30),
            max_step: Step::Workers(2),
            cooldown: Duration::from_secs(0),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A mistake in a policy that the types alone do not catch, with the dotted path of the
/// field it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field, as a dotted path: `workers.min`.
    pub path: &'static str,
    /// Every field the check read (`path` and, for a comparison, the other side), so a
    /// loader can tell a real mistake from one caused by a field it had to drop.
    pub fields: &'static [&'static str],
    /// What is wrong and what was expected.
    pub message: String,
}

impl Policy {
    /// The policy with every implied value written out, as `squall policy check` prints it.
    pub fn normalized(&self) -> Policy {
        let mut p = self.clone();
        p.target.concurrency = Some(self.target.concurrency());
        p
    }

    /// Checks everything the types cannot, returning every independent mistake.
    pub fn validate(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        let mut compare = |path: &'static str, fields: &'static [&'static str], message: String| {
            out.push(Violation {
                path,
                fields,
                message,
            })
        };
        // Checks of one field name just that field.
        macro_rules! bad {
            ($path:literal, $message:expr $(,)?) => {
                compare($path, &[$path], $message)
            };
        }

        for (path, fields, value) in [
            ("name", &["name"], &self.name),
            ("template", &["template"], &self.template),
        ] {
            if value.trim().is_empty() {
                compare(path, fields, "must not be empty".into());
            } else if value.len() > 253 {
                compare(
                    path,
                    fields,
                    format!("is {} bytes long; the limit is 253", value.len()),
                );
            } else if value.chars().any(char::is_control) {
                compare(path, fields, "must not contain control characters".into());
            }
        }

        let Workers { min, max } = self.workers;
        if max == 0 {
            bad!("workers.max", "must be at least 1".into());
        } else if max > MAX_WORKERS {
            bad!(
                "workers.max",
                format!("is {max}; the limit is {MAX_WORKERS}"),
            );
        }
        if min > max && max != 0 {
            compare(
                "workers.min",
                &["workers.min", "workers.max"],
                format!("is {min}, more than workers.max ({max}): expected min <= max"),
            );
        }

        match self.target {
            Target {
                concurrency: None,
                latency_p95: None,
            } => bad!(
                "target",
                "has nothing to scale on: set concurrency, latency_p95, or both".into(),
            ),
            Target {
                concurrency,
                latency_p95,
            } => {
                if let Some(c) = concurrency
                    && !(c.is_finite() && c > 0.0 && c <= 1e6)
                {
                    bad!(
                        "target.concurrency",
                        format!(
                            "is {c}: expected a number of in-flight requests per worker, above 0 and at most 1000000"
                        ),
                    );
                }
                if latency_p95.is_some_and(Duration::is_zero) {
                    bad!("target.latency_p95", "must be longer than 0ms".into());
                }
            }
        }

        let Windows { stable, panic } = self.window;
        if panic.is_zero() {
            bad!("window.panic", "must be longer than 0ms".into());
        }
        if stable.is_zero() {
            bad!("window.stable", "must be longer than 0ms".into());
        } else if panic >= stable {
            compare(
                "window.panic",
                &["window.panic", "window.stable"],
                format!(
                    "is {panic}, not shorter than window.stable ({stable}): the panic window must be the shorter one"
                ),
            );
        }

        let t = self.panic_threshold;
        if !(t.is_finite() && t > 1.0 && t <= 1000.0) {
            bad!(
                "panic_threshold",
                format!(
                    "is {t}: expected a multiple of capacity above 1 (such as 2.0) and at most 1000"
                ),
            );
        }

        for (path, fields, step) in [
            (
                "scale_up.max_step",
                &["scale_up.max_step"],
                self.scale_up.max_step,
            ),
            (
                "scale_down.max_step",
                &["scale_down.max_step"],
                self.scale_down.max_step,
            ),
        ] {
            match step {
                Step::Workers(0) => compare(path, fields, "must be at least 1 worker".into()),
                Step::Percent(p) if !(p > 0.0 && p <= 100_000.0) => compare(
                    path,
                    fields,
                    format!("is {p}%: expected a percentage above 0% and at most 100000%"),
                ),
                _ => {}
            }
        }
        if let Step::Percent(p) = self.scale_down.max_step
            && p > 100.0
        {
            bad!(
                "scale_down.max_step",
                format!("is {p}%: a scale-down cannot remove more than 100% of the workers"),
            );
        }

        if self.tick < MIN_TICK {
            bad!(
                "tick",
                format!("is {}; the shortest tick is {MIN_TICK}", self.tick),
            );
        } else if self.tick > panic && !panic.is_zero() {
            compare(
                "tick",
                &["tick", "window.panic"],
                format!(
                    "is {}, longer than window.panic ({panic}): a flash crowd would go unseen",
                    self.tick
                ),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Policy {
        Policy {
            name: "web".into(),
            template: "web".into(),
            workers: Workers::default(),
            target: Target::default(),
            window: Windows::default(),
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            scale_up: ScaleUp::default(),
            scale_down: ScaleDown::default(),
            tick: default_tick(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(minimal().validate(), vec![]);
    }

    #[test]
    fn each_mistake_names_its_field() {
        type Edit = fn(&mut Policy);
        let cases: &[(Edit, &str, &str)] = &[
            (|p| p.name = " ".into(), "name", "empty"),
            (
                |p| p.workers = Workers { min: 5, max: 2 },
                "workers.min",
                "min <= max",
            ),
            (|p| p.workers.max = 0, "workers.max", "at least 1"),
            (|p| p.workers.max = 20_000, "workers.max", "limit"),
            (
                |p| {
                    p.target = Target {
                        concurrency: None,
                        latency_p95: None,
                    }
                },
                "target",
                "nothing to scale on",
            ),
            (
                |p| p.target.concurrency = Some(0.0),
                "target.concurrency",
                "above 0",
            ),
            (
                |p| p.target.concurrency = Some(f64::NAN),
                "target.concurrency",
                "above 0",
            ),
            (
                |p| p.target.latency_p95 = Some(Duration::from_millis(0)),
                "target.latency_p95",
                "longer",
            ),
            (
                |p| p.window.panic = Duration::from_secs(10),
                "window.panic",
                "shorter",
            ),
            (
                |p| p.window.stable = Duration::from_secs(0),
                "window.stable",
                "longer",
            ),
            (|p| p.panic_threshold = 1.0, "panic_threshold", "above 1"),
            (|p| p.panic_threshold = -3.0, "panic_threshold", "above 1"),
            (
                |p| p.scale_up.max_step = Step::Workers(0),
                "scale_up.max_step",
                "at least 1",
            ),
            (
                |p| p.scale_up.max_step = Step::Percent(0.0),
                "scale_up.max_step",
                "above 0%",
            ),
            (
                |p| p.scale_down.max_step = Step::Percent(150.0),
                "scale_down.max_step",
                "100%",
            ),
            (|p| p.tick = Duration::from_millis(1), "tick", "shortest"),
            (|p| p.tick = Duration::from_secs(2), "tick", "unseen"),
        ];
        for (edit, path, words) in cases {
            let mut p = minimal();
            edit(&mut p);
            let v = p.validate();
            assert_eq!(v.len(), 1, "{path}: {v:?}");
            assert_eq!(v[0].path, *path);
            assert!(v[0].message.contains(words), "{path}: {}", v[0].message);
        }
    }

    #[test]
    fn independent_mistakes_are_all_reported() {
        let mut p = minimal();
        p.workers = Workers { min: 9, max: 3 };
        p.panic_threshold = 0.5;
        p.window.panic = Duration::from_secs(20);
        let paths: Vec<_> = p.validate().iter().map(|v| v.path).collect();
        assert_eq!(paths, ["workers.min", "window.panic", "panic_threshold"]);
    }
}
