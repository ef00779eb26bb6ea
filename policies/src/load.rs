//! Turning policy text into a validated [`Policy`], or into every mistake it holds, each
//! with its file, line, column and field.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::policy::Policy;
use crate::yaml::{self, DeErrorKind, Kind, Mark, Node, NodeDeserializer};

/// Policy files larger than this are refused before parsing.
pub const MAX_POLICY_BYTES: u64 = 256 * 1024;

/// The keys a policy must have.
const REQUIRED: &[&str] = &["name", "template"];

/// At most this many mistakes are reported for one document.
pub(crate) const MAX_DIAGNOSTICS: usize = 50;

/// One mistake in a policy document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where it was written (or, for a missing key, the mapping it is missing from).
    pub mark: Mark,
    /// The field as a dotted path (`scale_down.delay`); empty for the document itself.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: cannot read the policy: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_BYTES`].
    #[error("{path}: the policy is {size} bytes; the limit is {MAX_POLICY_BYTES}")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The document has mistakes; all independent ones are listed.
    #[error("{}", Mistakes { source_name, diagnostics })]
    Invalid {
        /// The file name (or another name for the text) used in every line.
        source_name: String,
        /// The mistakes, in document order.
        diagnostics: Vec<Diagnostic>,
    },
}

struct Mistakes<'a> {
    source_name: &'a str,
    diagnostics: &'a [Diagnostic],
}

impl fmt::Display for Mistakes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: ", self.source_name, d.mark)?;
            if !d.path.is_empty() {
                write!(f, "{}: ", d.path)?;
            }
            f.write_str(&d.message)?;
        }
        Ok(())
    }
}

/// Reads and validates the policy in `path`.
pub fn load_file(path: &Path) -> Result<Policy, LoadError> {
    use std::io::Read;
    let name = path.display().to_string();
    let io = |source| LoadError::Io {
        path: name.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        let size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(text.len() as u64);
        return Err(LoadError::TooLarge { path: name, size });
    }
    load(&name, &text)
}

/// Parses and validates policy `text`; `source_name` names it in error messages.
///
/// Every independent mistake is reported: after one, the loader drops the offending entry
/// (or fills in a missing key) and carries on, so a file with three typos gives three lines.
pub fn load(source_name: &str, text: &str) -> Result<Policy, LoadError> {
    let invalid = |diagnostics| LoadError::Invalid {
        source_name: source_name.to_owned(),
        diagnostics,
    };
    // A byte-order mark is an editor's habit, not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let syntax = |e: yaml::SyntaxError| Diagnostic {
        mark: e.mark,
        path: String::new(),
        message: format!("not valid YAML: {}", e.message),
    };
    let (mut tree, mistakes) = yaml::parse(text).map_err(|e| invalid(vec![syntax(e)]))?;
    if !matches!(tree.kind, Kind::Map(_)) {
        return Err(invalid(vec![Diagnostic {
            mark: tree.mark,
            path: String::new(),
            message: "expected a mapping of policy fields, at least `name:` and `template:`".into(),
        }]));
    }
    let original = tree.clone();

    let mut diagnostics: Vec<Diagnostic> = mistakes.into_iter().map(syntax).collect();
    // Fields dropped for a type error, which therefore took their defaults.
    let mut dropped: Vec<String> = Vec::new();
    let policy = loop {
        let error = match Policy::deserialize(NodeDeserializer::root(&tree)) {
            Ok(policy) => break Some(policy),
            Err(error) => error,
        };
        let (mark, location, path) =
            error
                .at
                .clone()
                .unwrap_or((Mark::START, Vec::new(), String::new()));
        let recovered = match &error.kind {
            DeErrorKind::UnknownField { field, expected } => {
                diagnostics.push(Diagnostic {
                    mark,
                    path: parent_of(&path).to_owned(),
                    message: unknown_key_message(field, expected),
                });
                yaml::remove_entry(&mut tree, &location)
            }
            DeErrorKind::MissingField(field) => {
                diagnostics.push(Diagnostic {
                    mark,
                    path: path.clone(),
                    message: format!("missing required key `{field}`"),
                });
                yaml::insert_placeholder(&mut tree, &location, field, "missing")
            }
            DeErrorKind::Other(message) => {
                diagnostics.push(Diagnostic {
                    mark,
                    path: path.clone(),
                    // serde's words for an empty YAML value.
                    message: message.replace("invalid type: unit value", "nothing given"),
                });
                dropped.push(path.clone());
                let removed = yaml::remove_entry(&mut tree, &location);
                // A required key keeps a stand-in, so it is not reported missing as well.
                match (REQUIRED.iter().find(|r| **r == path), location.split_last()) {
                    (Some(key), Some((_, parent))) if removed => {
                        yaml::insert_placeholder(&mut tree, parent, key, "missing")
                    }
                    _ => removed,
                }
            }
        };
        if !recovered || diagnostics.len() >= MAX_DIAGNOSTICS {
            break None;
        }
    };

    if let Some(policy) = &policy {
        for violation in policy.validate() {
            // A field dropped for a type error took its default, which may clash with its
            // neighbours; the type error is the mistake to report.
            let covers = |field: &str, gone: &str| {
                field == gone
                    || field
                        .strip_prefix(gone)
                        .is_some_and(|rest| rest.starts_with('.'))
            };
            if violation
                .fields
                .iter()
                .any(|f| dropped.iter().any(|gone| covers(f, gone)))
            {
                continue;
            }
            diagnostics.push(Diagnostic {
                mark: locate(&original, violation.path),
                path: violation.path.to_owned(),
                message: violation.message,
            });
        }
    }
    match policy {
        Some(policy) if diagnostics.is_empty() => Ok(policy),
        _ => {
            diagnostics.sort_by_key(|d| d.mark);
            diagnostics.truncate(MAX_DIAGNOSTICS);
            Err(invalid(diagnostics))
        }
    }
}

/// The mark of the value at a dotted path, or of its nearest written ancestor.
fn locate(root: &Node, path: &str) -> Mark {
    let mut node = root;
    for key in path.split('.') {
        match node.get(key) {
            Some(next) => node = next,
            None => break,
        }
    }
    node.mark
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('.').map_or("", |(parent, _)| parent)
}

fn unknown_key_message(field: &str, expected: &[&str]) -> String {
    let closest = expected
        .iter()
        .map(|candidate| (edit_distance(field, candidate), *candidate))
        .min()
        .filter(|(distance, candidate)| *distance <= (candidate.len() / 3).max(2));
    let known = expected.join(", ");
    match closest {
        Some((_, candidate)) => {
            format!("unknown key `{field}`: did you mean `{candidate}`? (known keys: {known})")
        }
        None => format!("unknown key `{field}` (known keys: {known})"),
    }
}

/// Levenshtein distance, for suggesting the key a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mistakes(text: &str) -> Vec<String> {
        match load("p.yaml", text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn minimal_policy_takes_the_defaults() {
        let p = load("p.yaml", "name: web\ntemplate: web-t\n").unwrap();
        assert_eq!(p.name, "web");
        assert_eq!(p.template, "web-t");
        assert_eq!(p.workers.max, 32);
        assert_eq!(p.target.concurrency(), 8.0);
        assert_eq!(p.tick.get(), std::time::Duration::from_millis(100));
    }

    #[test]
    fn the_architecture_example_loads() {
        let text = "\
name: web
template: web            # forkd template to clone
workers: {min: 1, max: 32}
target:
  latency_p95: 150ms
  concurrency: 8
window: {stable: 10s, panic: 1s}
panic_threshold: 2.0
scale_up:   {max_step: 100%, cooldown: 0s}
scale_down: {delay: 30s, max_step: 2, drain_timeout: 30s}
tick: 100ms
";
        let p = load("p.yaml", text).unwrap();
        assert_eq!(
            p.target.latency_p95,
            Some(crate::Duration::from_millis(150))
        );
        assert_eq!(p.scale_up.max_step, crate::Step::Percent(100.0));
        assert_eq!(p.scale_down.max_step, crate::Step::Workers(2));
    }

    #[test]
    fn table_of_mistakes() {
        let cases: &[(&str, &str)] = &[
            (
                "name: a\ntemplate: b\nworkers: {min: 4, max: 2}\n",
                "p.yaml:3:16: workers.min: is 4, more than workers.max (2): expected min <= max",
            ),
            (
                "name: a\ntemplate: b\nwindow:\n  stabel: 5s\n",
                "p.yaml:4:3: window: unknown key `stabel`: did you mean `stable`? (known keys: stable, panic)",
            ),
            (
                "name: a\ntemplate: b\ntick: 10x\n",
                "p.yaml:3:7: tick: `10x` has an unknown unit `x`: expected ms, s, m or h",
            ),
            (
                "name: a\ntemplate: b\ntick: 100\n",
                "p.yaml:3:7: tick: `100` has no unit: write it as, for example, 100ms or 100s",
            ),
            (
                "name: a\ntemplate: b\nworkers: {max: -3}\n",
                "p.yaml:3:16: workers.max: invalid value: integer `-3`, expected u32",
            ),
            (
                "name: a\ntemplate: b\npanic_threshold: 1\n",
                "p.yaml:3:18: panic_threshold: is 1: expected a multiple of capacity above 1 (such as 2.0) and at most 1000",
            ),
            (
                "name: a\ntemplate: b\ntarget: {}\n",
                "p.yaml:3:9: target: has nothing to scale on: set concurrency, latency_p95, or both",
            ),
            (
                "name: a\ntemplate: b\nwindow: {stable: 1s, panic: 1s}\n",
                "p.yaml:3:29: window.panic: is 1s, not shorter than window.stable (1s): the panic window must be the shorter one",
            ),
            ("template: b\n", "p.yaml:1:1: missing required key `name`"),
            (
                "name: a\ntemplate: b\nworkers: 3\n",
                "p.yaml:3:10: workers: expected struct Workers, found a scalar",
            ),
            (
                "name: [a\n",
                "p.yaml:2:1: not valid YAML: while parsing a flow sequence, expected ',' or ']'",
            ),
            (
                "- a\n- b\n",
                "p.yaml:1:1: expected a mapping of policy fields, at least `name:` and `template:`",
            ),
            (
                "",
                "p.yaml:1:1: expected a mapping of policy fields, at least `name:` and `template:`",
            ),
            (
                "name: a\ntemplate: t\nname: b\n",
                "p.yaml:3:1: not valid YAML: duplicate key `name` (first given at line 1); the first is used",
            ),
            (
                "a: &x [1]\nb: *x\n",
                "p.yaml:2:4: not valid YAML: aliases (*name) are not supported in policies",
            ),
        ];
        for (text, expected) in cases {
            let got = mistakes(text);
            assert_eq!(got, [expected.to_string()], "for {text:?}");
        }
    }

    #[test]
    fn independent_mistakes_are_reported_together_in_document_order() {
        let text = "\
name: web
templat: web
workers: {min: 1, max: lots}
target: {concurrency: 0}
scale_down: {delay: 30, drain: 5s}
";
        let got = mistakes(text);
        assert_eq!(
            got,
            [
                "p.yaml:1:1: missing required key `template`",
                "p.yaml:2:1: unknown key `templat`: did you mean `template`? (known keys: name, template, workers, target, window, panic_threshold, scale_up, scale_down, tick)",
                "p.yaml:3:24: workers.max: invalid type: string \"lots\", expected u32",
                "p.yaml:4:23: target.concurrency: is 0: expected a number of in-flight requests per worker, above 0 and at most 1000000",
                "p.yaml:5:21: scale_down.delay: `30` has no unit: write it as, for example, 30ms or 30s",
                "p.yaml:5:25: scale_down: unknown key `drain` (known keys: delay, max_step, cooldown, drain_timeout)",
            ]
        );
    }

    #[test]
    fn a_dropped_field_hides_only_the_checks_that_read_it() {
        let cases: &[(&str, &[&str])] = &[
            (
                "workers: {min: 5, max: 2, mn: 1}\n",
                &[
                    "p.yaml:3:16: workers.min: is 5, more than workers.max (2): expected min <= max",
                    "p.yaml:3:27: workers: unknown key `mn`: did you mean `min`? (known keys: min, max)",
                ],
            ),
            (
                "target: {concurrency: 0, latency_p95: 10}\n",
                &[
                    "p.yaml:3:23: target.concurrency: is 0: expected a number of in-flight requests per worker, above 0 and at most 1000000",
                    "p.yaml:3:39: target.latency_p95: `10` has no unit: write it as, for example, 10ms or 10s",
                ],
            ),
            (
                "window: {panic: 5x}\ntick: 2s\n",
                &[
                    "p.yaml:3:17: window.panic: `5x` has an unknown unit `x`: expected ms, s, m or h",
                ],
            ),
        ];
        for (extra, expected) in cases {
            let got = mistakes(&format!("name: a\ntemplate: b\n{extra}"));
            assert_eq!(got, *expected, "for {extra:?}");
        }
    }

    #[test]
    fn an_empty_value_is_reported_once_at_its_key() {
        assert_eq!(
            mistakes("name: a\ntemplate:\n\n\n"),
            ["p.yaml:2:1: template: expected a string, found nothing (null)"]
        );
        assert_eq!(
            mistakes("name: a\ntemplate: b\ntick:\n\n\n"),
            ["p.yaml:3:1: tick: nothing given, expected a duration such as 150ms, 10s or 2m"]
        );
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        assert_eq!(
            load("p.yaml", "\u{feff}name: a\ntemplate: b\n")
                .unwrap()
                .name,
            "a"
        );
    }

    #[test]
    fn quoted_numbers_are_text_and_plain_numbers_are_numbers() {
        let p = load(
            "p.yaml",
            "name: 2024\ntemplate: \"7\"\nworkers: {max: \"4\"}\n",
        );
        let err = p.unwrap_err().to_string();
        assert!(
            err.contains("workers.max: invalid type: string \"4\", expected u32"),
            "{err}"
        );
    }

    /// Found by the check of the policy_load fuzz target (policies::fuzzing), on an input
    /// written for it: every duplicate key was reported, beyond the 50 mistakes a document
    /// gets, so a generated file could print thousands of lines.
    #[test]
    fn at_most_fifty_mistakes_are_reported() {
        let text = format!("name: a\ntemplate: b\n{}", "name: x\n".repeat(60));
        let got = mistakes(&text);
        assert_eq!(got.len(), MAX_DIAGNOSTICS);
        assert_eq!(
            got[0],
            "p.yaml:3:1: not valid YAML: duplicate key `name` (first given at line 1); the first is used"
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("stabel", "stable"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("tick", "tick"), 0);
    }
}
