//! forkd's API request bodies (a template spec, a clone request) through what the server does
//! with them before anything starts, and the answers a client decodes (see
//! `forkd::fuzzing::check_api_body`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forkd::fuzzing::check_api_body(data));
