//! The zygote protocol's parsers, both directions, on arbitrary datagrams
//! (see `zygote::fuzzing::check_protocol`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| zygote::fuzzing::check_protocol(data));
