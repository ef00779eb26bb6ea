//! Models of other autoscalers' *published* algorithms, to compare with Squall's decider on
//! the same trace, seed and simulated pool: Knative's KPA ([`Kpa`]) and Kubernetes' HPA
//! ([`Hpa`]), each with its documented defaults.
//!
//! They are models, not the real controllers: each follows the algorithm as its project
//! documents it (the module of each says where, and what it leaves out), driven by the
//! simulator's measurements instead of a metrics pipeline, and acting on the simulator's
//! pool instead of a Deployment. Their new workers become ready after a cold start given by
//! the caller, not after the policy's clone delay: that is the point of the comparison. The
//! policy lends them only its target concurrency and its worker bounds.
//!
//! [`compare`] runs Squall's decider and the models asked for on one trace; `squall policy
//! simulate --compare kpa,hpa` prints the result side by side.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::requests::Source;
use super::{Autoscaler, Run, SimConfig, SimError, Squall, Trace, run};
use crate::policy::Policy;

pub mod hpa;
pub mod kpa;

pub use hpa::{Hpa, HpaReason};
pub use kpa::{Kpa, KpaReason};

/// A model of another autoscaler's published algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Model {
    /// Knative's Pod Autoscaler ([`Kpa`]).
    Kpa,
    /// Kubernetes' Horizontal Pod Autoscaler ([`Hpa`]).
    Hpa,
}

impl Model {
    /// Every model, in the order a comparison shows them.
    pub const ALL: [Model; 2] = [Model::Kpa, Model::Hpa];

    /// The name `--compare` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Model::Kpa => "kpa",
            Model::Hpa => "hpa",
        }
    }

    /// The model, set up with `policy`'s target concurrency and worker bounds.
    pub fn build(self, policy: &Policy) -> Box<dyn Autoscaler> {
        match self {
            Model::Kpa => Box::new(Kpa::new(policy)),
            Model::Hpa => Box::new(Hpa::new(policy)),
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A model name that is not one of [`Model::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown model `{0}`: expected one of kpa, hpa")]
pub struct UnknownModel(pub String);

impl FromStr for Model {
    type Err = UnknownModel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Model::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownModel(s.to_owned()))
    }
}

/// Why a model decided what it did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ModelReason {
    /// The KPA model's reason.
    Kpa(KpaReason),
    /// The HPA model's reason.
    Hpa(HpaReason),
}

impl fmt::Display for ModelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelReason::Kpa(r) => write!(f, "KPA model: {r}"),
            ModelReason::Hpa(r) => write!(f, "HPA model: {r}"),
        }
    }
}

/// One autoscaler's run in a comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    /// A short name for a column: `squall`, `kpa`, `hpa`.
    pub name: &'static str,
    /// What it is: `squall (policy web)`, `model of Knative KPA (published algorithm,
    /// defaults)`.
    pub label: String,
    /// From a scale-up decision to the new worker serving: the clone delay for Squall, the
    /// cold start for the models.
    pub startup: Duration,
    /// What a reader should know about how it was run.
    pub notes: Vec<String>,
    /// The run.
    pub run: Run,
}

/// Runs Squall's decider for `policy` (with `config`'s clone delay), then each of `models`
/// (once each, in the order given, with `cold_start` as their clone delay), on the same
/// trace, seed and pool model: the models are given the very requests Squall's run served
/// (arrival and service times), and Squall's run is the one [`super::simulate`] makes.
pub fn compare(
    policy: &Policy,
    trace: &Trace,
    config: &SimConfig,
    cold_start: Duration,
    models: &[Model],
) -> Result<Vec<Compared>, SimError> {
    let mut squall = Squall::new(policy);
    let source = Source::drawn(config.seed, trace, true);
    let (first, served) = run(policy, trace, config, &mut squall, source)?;
    let served = served.unwrap_or_default();
    let mut out = vec![Compared {
        name: "squall",
        label: squall.label(),
        startup: config.clone_delay,
        notes: squall.notes(),
        run: first,
    }];
    let cold = SimConfig {
        clone_delay: cold_start,
        ..*config
    };
    let mut seen = Vec::new();
    for &model in models {
        if seen.contains(&model) {
            continue;
        }
        seen.push(model);
        let mut autoscaler = model.build(policy);
        out.push(Compared {
            name: model.name(),
            label: autoscaler.label(),
            startup: cold_start,
            notes: autoscaler.notes(),
            run: run(
                policy,
                trace,
                &cold,
                autoscaler.as_mut(),
                Source::replayed(&served),
            )?
            .0,
        });
    }
    Ok(out)
}
