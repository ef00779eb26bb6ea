//! The OCI layer unpacker (tar, gzip, zstd, whiteouts, links) on arbitrary layers, into a
//! scratch directory, checking that nothing is written outside the root (see
//! `microvm::rootfs::fuzzing::check_unpack`).
//!
//! The unpacker runs as whoever runs the fuzzer, often root, on inputs made to reach outside
//! the root. So before the first input the process confines its own writes with Landlock to
//! the scratch directory and to `fuzz/` (the corpus and the artifacts): should the unpacker
//! ever escape, the write is refused, and the check reports the refusal, instead of the host
//! being changed. Without Landlock the target refuses to run.
#![no_main]

use std::path::Path;

use landlock::{
    ABI, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
};

fn confine() {
    let scratch = microvm::rootfs::fuzzing::scratch_base();
    std::fs::create_dir_all(&scratch).expect("the scratch directory");
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let abi = ABI::V2;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_write(abi))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                [&scratch, fuzz_dir],
                AccessFs::from_write(abi),
            ))
        })
        .and_then(|r| r.restrict_self())
        .expect("a Landlock ruleset");
    assert_eq!(
        status.ruleset,
        RulesetStatus::FullyEnforced,
        "Landlock is not fully enforced here: not fuzzing the unpacker unconfined"
    );
}

libfuzzer_sys::fuzz_target!(
    init: confine(),
    |data: &[u8]| microvm::rootfs::fuzzing::check_unpack(data)
);
