//! The two value types a policy writes as strings: durations (`150ms`, `10s`, `2m`) and steps
//! (`2` workers, or `100%` of the current count).

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration a policy may name: a day. Anything longer is a typo, and the bound
/// keeps every arithmetic on durations far from overflow.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A span of time written with a unit: `250ms`, `10s`, `1.5s`, `2m`, `1h`.
///
/// A bare number is rejected: `10` could mean seconds or milliseconds, and a policy must not
/// be ambiguous. Values are whole milliseconds and at most [`MAX_DURATION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

impl Duration {
    /// Builds a duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// Builds a duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    /// The standard-library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// The duration in seconds, as a float.
    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }

    /// True for a zero-length duration.
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Why a string is not a [`Duration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// A number without a unit.
    #[error("`{0}` has no unit: write it as, for example, {0}ms or {0}s")]
    NoUnit(String),
    /// Not a number followed by a unit.
    #[error(
        "`{0}` is not a duration: expected a number and a unit (ms, s, m or h), such as 150ms, 10s or 2m"
    )]
    Malformed(String),
    /// A unit this language does not have.
    #[error("`{value}` has an unknown unit `{unit}`: expected ms, s, m or h")]
    UnknownUnit {
        /// The whole value as written.
        value: String,
        /// The unit as written.
        unit: String,
    },
    /// Finer than a millisecond.
    #[error("`{0}` is not a whole number of milliseconds")]
    SubMillisecond(String),
    /// Longer than [`MAX_DURATION`].
    #[error("`{0}` is longer than the limit of 24h")]
    TooLong(String),
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim_start();
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(DurationError::Malformed(text.to_owned()));
        }
        let value: f64 = number
            .parse()
            .map_err(|_| DurationError::Malformed(text.to_owned()))?;
        let ms_per_unit = match unit {
            "" => return Err(DurationError::NoUnit(number.to_owned())),
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ if unit.chars().all(|c| c.is_ascii_alphabetic()) => {
                return Err(DurationError::UnknownUnit {
                    value: text.to_owned(),
                    unit: unit.to_owned(),
                });
            }
            _ => return Err(DurationError::Malformed(text.to_owned())),
        };
        let ms = value * ms_per_unit;
        if ms > MAX_DURATION.as_millis() as f64 {
            return Err(DurationError::TooLong(text.to_owned()));
        }
        if ms.fract() != 0.0 {
            return Err(DurationError::SubMillisecond(text.to_owned()));
        }
        // `ms` is a whole, non-negative number no larger than a day in milliseconds.
        Ok(Self::from_millis(ms as u64))
    }
}

impl fmt::Display for Duration {
    /// The shortest exact spelling: `2m`, `10s`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms != 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms != 0 && ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            if ms == 0 {
                f.write_str("0s")
            } else {
                write!(f, "{ms}ms")
            }
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 150ms, 10s or 2m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(DurationError::NoUnit(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "`{v}` is negative: a duration is a number and a unit, such as 150ms"
                )))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(DurationError::NoUnit(v.to_string())))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// How far one decision may move the worker count: a number of workers (`2`) or a share of
/// the current count (`100%`). A step always allows at least one worker, so a percentage
/// of a small pool still moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// At most this many workers per decision.
    Workers(u32),
    /// At most this percentage of the current count per decision.
    Percent(f64),
}

impl Step {
    /// The largest change this step allows from `current` workers: at least one.
    pub fn allowance(self, current: u32) -> u32 {
        let n = match self {
            Step::Workers(n) => n,
            // `percent` is validated finite and positive; the product is capped at u32::MAX
            // by the saturating float-to-int conversion.
            Step::Percent(p) => (f64::from(current) * p / 100.0).floor() as u32,
        };
        n.max(1)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Workers(n) => write!(f, "{n}"),
            Step::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Step::Workers(n) => serializer.serialize_u32(*n),
            Step::Percent(_) => serializer.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl Visitor<'_> for StepVisitor {
            type Value = Step;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers such as 2, or a percentage such as 100%")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Step, E> {
                u32::try_from(v)
                    .map(Step::Workers)
                    .map_err(|_| E::custom(format!("`{v}` workers is too many")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Step, E> {
                Err(E::custom(format!(
                    "`{v}` is negative: expected a number of workers such as 2, or a percentage such as 100%"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Step, E> {
                let bad = || {
                    E::custom(format!(
                        "`{v}` is not a step: expected a number of workers such as 2, or a percentage such as 100%"
                    ))
                };
                let t = v.trim();
                if let Some(number) = t.strip_suffix('%') {
                    let p: f64 = number.trim().parse().map_err(|_| bad())?;
                    if !p.is_finite() {
                        return Err(bad());
                    }
                    Ok(Step::Percent(p))
                } else {
                    t.parse::<u64>()
                        .map_err(|_| bad())
                        .and_then(|n| self.visit_u64(n))
                }
            }
        }
        deserializer.deserialize_any(StepVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        let cases = [
            ("150ms", 150),
            ("10s", 10_000),
            ("1.5s", 1_500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("0s", 0),
            (" 7 ms ", 7),
        ];
        for (text, ms) in cases {
            assert_eq!(
                text.parse::<Duration>(),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_reject_what_is_ambiguous_or_malformed() {
        let error_of = |text: &str| text.parse::<Duration>().expect_err(text);
        assert!(matches!(error_of("10"), DurationError::NoUnit(_)));
        assert!(matches!(error_of("10x"), DurationError::UnknownUnit { .. }));
        for text in ["ms", "-5s", "1.5.s"] {
            assert!(
                matches!(error_of(text), DurationError::Malformed(_)),
                "{text}"
            );
        }
        assert!(matches!(
            error_of("0.1ms"),
            DurationError::SubMillisecond(_)
        ));
        for text in ["25h", "99999999999999999999999s"] {
            assert!(
                matches!(error_of(text), DurationError::TooLong(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_print_in_their_shortest_exact_form() {
        for (ms, text) in [
            (150, "150ms"),
            (10_000, "10s"),
            (1_500, "1500ms"),
            (120_000, "2m"),
            (0, "0s"),
        ] {
            assert_eq!(Duration::from_millis(ms).to_string(), text);
            assert_eq!(text.parse::<Duration>(), Ok(Duration::from_millis(ms)));
        }
    }

    #[test]
    fn steps_allow_at_least_one_worker() {
        assert_eq!(Step::Percent(100.0).allowance(0), 1);
        assert_eq!(Step::Percent(100.0).allowance(7), 7);
        assert_eq!(Step::Percent(50.0).allowance(3), 1);
        assert_eq!(Step::Workers(2).allowance(100), 2);
        assert_eq!(Step::Percent(1e300).allowance(10), u32::MAX);
    }
}
