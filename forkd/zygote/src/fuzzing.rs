//! What the `zygote_protocol` fuzz target (`fuzz/`) checks on every input, kept here so that
//! the normal test suite checks it too, over the seeds in `fuzz/seeds/zygote_protocol/` (real
//! messages, and every input a fuzzer once failed on). Not part of the crate's API: built for
//! this crate's tests and with the `fuzzing` feature only.
//!
//! Both parsers read bytes from the other side: [`FromTemplate::parse`] is forkd's, reading
//! what an app's template sends; [`ToTemplate::parse`] is the template's, reading forkd.

use crate::protocol::{FromTemplate, ToTemplate};

/// Parses `bytes` as a message of either direction and panics if a parser breaks the
/// protocol's rules (`PROTOCOL.md`):
///
/// - a message it accepts has one spelling: its encoder writes back exactly the bytes
///   received, but for the two leniencies [`FromTemplate::parse`] documents (newlines at the
///   end, and a `failed` without its reason);
/// - what the encoder writes parses back to the same message;
/// - a `forked` pid can name a process (1 to `i32::MAX`, a `pid_t`), and every clone id is
///   one that forkd could have sent.
pub fn check_protocol(bytes: &[u8]) {
    if let Ok(message) = FromTemplate::parse(bytes) {
        let encoded = message.encode();
        let again = FromTemplate::parse(encoded.as_bytes());
        assert_eq!(
            again.as_ref().ok(),
            Some(&message),
            "{message:?} is written {encoded:?}, which parses as {again:?}"
        );
        let received = canonical_from_template(bytes);
        assert_eq!(
            encoded.as_bytes(),
            received,
            "{:?} was accepted as {message:?}, whose spelling is {encoded:?}",
            String::from_utf8_lossy(bytes)
        );
        match &message {
            FromTemplate::Forked { id, pid } => {
                assert!(crate::protocol::valid_id(id), "clone id {id:?}");
                assert!(
                    (1..=i32::MAX as u32).contains(pid),
                    "pid {pid} names no process"
                );
            }
            FromTemplate::Failed { id, .. } | FromTemplate::Exited { id, .. } => {
                assert!(crate::protocol::valid_id(id), "clone id {id:?}");
            }
            FromTemplate::Ready => {}
        }
    }
    if let Ok(message) = ToTemplate::parse(bytes) {
        let encoded = message.encode();
        let again = ToTemplate::parse(encoded.as_bytes());
        assert_eq!(
            again.as_ref().ok(),
            Some(&message),
            "{message:?} is written {encoded:?}, which parses as {again:?}"
        );
        assert_eq!(
            encoded.as_bytes(),
            bytes,
            "{:?} was accepted as {message:?}, whose spelling is {encoded:?}",
            String::from_utf8_lossy(bytes)
        );
        let ToTemplate::Clone { id } = &message;
        assert!(crate::protocol::valid_id(id), "clone id {id:?}");
    }
}

/// `bytes` as the encoder would write the message they hold: without newlines at the end,
/// and with a `failed` report's missing reason given as `unknown reason`.
fn canonical_from_template(bytes: &[u8]) -> Vec<u8> {
    let mut end = bytes.len();
    while end > 0 && bytes[end - 1] == b'\n' {
        end -= 1;
    }
    let mut canonical = bytes[..end].to_vec();
    let words = canonical.split(|&b| b == b' ').count();
    if canonical.starts_with(b"failed ") && words == 2 {
        canonical.extend_from_slice(b" unknown reason");
    }
    canonical
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every seed of the fuzz target, and every input it once failed on, passes the checks.
    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/zygote_protocol");
        if !dir.is_dir() {
            // The guest-kernel test runs this binary in a microVM, without the source tree.
            eprintln!(
                "skipped: no seeds at {} (not run from the source tree)",
                dir.display()
            );
            return;
        }
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("the seeds directory") {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a seed");
            eprintln!("checking {}", path.display());
            check_protocol(&bytes);
            checked += 1;
        }
        assert!(checked > 0, "no seeds in {}", dir.display());
    }
}
