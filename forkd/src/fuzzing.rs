//! What the `forkd_api` fuzz target (`fuzz/`) checks on every input, kept here so that the
//! normal test suite checks it too, over the seeds in `fuzz/seeds/forkd_api/` (bodies from
//! the API's tests, and every input a fuzzer once failed on). Not part of the crate's API:
//! built for this crate's tests and with the `fuzzing` feature only.

use crate::api::{CloneList, CloneRequest, ErrorBody, ErrorCode, TemplateList, TemplateSpec};
use crate::error::ApiError;
use crate::server::decode;

/// Takes `bytes` as the body of each request that has one, through what the server does
/// with it before anything starts, and as each answer a [`crate::Client`] decodes; panics if
/// that breaks the API's contract:
///
/// - a body that is not the endpoint's JSON is answered `bad_request`, a spec that the
///   daemon refuses `invalid_template`;
/// - a spec decodes to what a client sending it would encode (and a clone request too);
/// - a spec the daemon accepts is safe to act on: see [`check_accepted`].
pub fn check_api_body(bytes: &[u8]) {
    // POST /v1/templates
    match decode::<TemplateSpec>(bytes) {
        Ok(spec) => {
            round_trip(&spec);
            match crate::daemon::validate(&spec) {
                Ok(()) => check_accepted(&spec),
                Err(e) => assert_eq!(e.code(), ErrorCode::InvalidTemplate, "{e}"),
            }
        }
        Err(e) => assert_eq!(e.code(), ErrorCode::BadRequest, "{e}"),
    }
    // POST /v1/templates/{name}/clones
    match decode::<CloneRequest>(bytes) {
        Ok(request) => round_trip(&request),
        Err(e) => assert_eq!(e.code(), ErrorCode::BadRequest, "{e}"),
    }
    // What a client reads from a daemon (perhaps a newer one): decoded or refused, never a panic.
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) {
        round_trip(&body);
    }
    if let Ok(list) = serde_json::from_slice::<CloneList>(bytes) {
        round_trip(&list);
    }
    if let Ok(list) = serde_json::from_slice::<TemplateList>(bytes) {
        round_trip(&list);
    }
}

/// `value` encoded as a client or the daemon sends it decodes to itself.
fn round_trip<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let sent = match serde_json::to_vec(value) {
        Ok(sent) => sent,
        Err(e) => panic!("{value:?} does not encode: {e}"),
    };
    let received = serde_json::from_slice::<T>(&sent);
    assert_eq!(
        received.as_ref().ok(),
        Some(value),
        "{value:?} is sent as {}, which decodes as {received:?}",
        String::from_utf8_lossy(&sent)
    );
}

/// What the drivers take for granted of a spec the daemon accepted:
///
/// - its name is 1 to 63 of `[a-z0-9-]`, not starting with `-` (it names sockets, files and
///   the clone ids the zygote protocol carries);
/// - every string that becomes a C string for `execve` (the program, its arguments, the
///   environment, the image's path) holds no NUL, and every environment name is non-empty
///   without `=`: otherwise the template could not start, or its app would see another
///   variable than the one asked for;
/// - its `health_path` is one request target, so that `GET {health_path} HTTP/1.1` is one
///   valid request line: visible ASCII after the `/`, nothing that ends the line or the
///   target;
/// - its start timeout is 1 ms to 10 minutes;
/// - a snapshot `source` is a `vm` template's, and an `http://host[:port]` URL (not port 0)
///   with no user information, path or query: forkd connects there with its own token.
pub fn check_accepted(spec: &TemplateSpec) {
    let name = &spec.name;
    assert!(
        (1..=63).contains(&name.len())
            && !name.starts_with('-')
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "template name {name:?} accepted"
    );
    assert!(
        spec.image.is_some() || spec.command.first().is_some_and(|p| !p.is_empty()),
        "no program to run: {spec:?}"
    );
    let c_string = |s: &str| !s.contains('\0');
    for arg in &spec.command {
        assert!(c_string(arg), "command word {arg:?} accepted");
    }
    for (key, value) in &spec.env {
        assert!(
            !key.is_empty() && !key.contains('=') && c_string(key) && c_string(value),
            "environment variable {key:?}={value:?} accepted"
        );
    }
    if let Some(image) = &spec.image {
        let image = image.to_string_lossy();
        assert!(c_string(&image), "image path {image:?} accepted");
    }
    let path = &spec.health_path;
    assert!(
        path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic() && b != b'#'),
        "health_path {path:?} accepted, which is no request target"
    );
    assert!(
        (1..=600_000).contains(&spec.start_timeout_ms),
        "start_timeout_ms {} accepted",
        spec.start_timeout_ms
    );
    if let Some(source) = &spec.source {
        let uri: http::Uri = source
            .url
            .parse()
            .expect("a source URL accepted that is no URI");
        assert!(
            spec.driver == crate::Driver::Vm
                && uri.scheme_str() == Some("http")
                && uri.host().is_some()
                && uri.port_u16() != Some(0)
                && !uri.authority().is_some_and(|a| a.as_str().contains('@'))
                && matches!(uri.path(), "" | "/")
                && uri.query().is_none(),
            "source {:?} accepted for a {} template",
            source.url,
            spec.driver.as_str()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed of the fuzz target, and every input it once failed on, passes the checks.
    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        test_support::check_fuzz_seeds("forkd_api", check_api_body);
    }
}
