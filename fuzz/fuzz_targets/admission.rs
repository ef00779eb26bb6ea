//! The balancer's admission layer (per-worker limit, bounded FIFO queue, queue timeout)
//! driven by scripts of arrivals, answers, cancellations, time, new workers, drains and
//! re-tunings (see `balancer::fuzzing::check_admission` for the script and the checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balancer::fuzzing::check_admission(data));
