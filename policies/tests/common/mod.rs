//! What the policies crate's integration tests share.
#![allow(dead_code)] // Each test binary uses its own part.

use std::path::Path;

use policies::Trace;

/// The example trace `name` (in `policies/examples/traces`).
pub(crate) fn trace(name: &str) -> Trace {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/traces")
        .join(name);
    Trace::parse_csv(name, &std::fs::read_to_string(path).unwrap()).unwrap()
}
