//! The policy loader (YAML to a validated `Policy`) on arbitrary files, and the decider on
//! whatever it accepts (see `policies::fuzzing::check_policy`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| policies::fuzzing::check_policy(data));
