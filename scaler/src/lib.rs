//! The scaler: every tick it reads the balancer's signals, asks the policy for a decision and
//! acts on it through forkd. It is the only place where measurement, policy and cloning meet.
#![forbid(unsafe_code)]
