//! The balancer's own HTTP/1 path reading request heads: what it takes must be exactly what
//! httparse reads, and what it leaves for hyper must be left untouched (see
//! `lifecycle::fuzzing::check_head` for the checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lifecycle::fuzzing::check_head(data));
