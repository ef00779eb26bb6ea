//! Squall's scaling policies: the YAML language, its validation, the pure decider and an
//! offline simulator.
#![forbid(unsafe_code)]
