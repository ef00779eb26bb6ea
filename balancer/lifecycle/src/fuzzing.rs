//! What the `http1_head` fuzz target (`fuzz/`) checks on every input, kept here so that the
//! normal test suite checks it too, over the seeds in `fuzz/seeds/http1_head/`. Not part of
//! the crate's API: built for this crate's tests and with the `fuzzing` feature only.
//!
//! The own HTTP/1 path ([`crate::http1`]) parses request heads itself and hands everything
//! it does not take to hyper; a head it read differently from httparse, or bytes it lost or
//! moved on the way to hyper, would let two readers disagree about where a request ends.
//! [`check_head`] holds it to that.

use bytes::BytesMut;
use http::{Method, StatusCode, Version};

use crate::http1::head::{self, Length, Parsed, Spans};

/// Parses `data` as the front of a connection's buffer and panics unless:
///
/// - a head it leaves for hyper, or one not yet whole, leaves the buffer exactly as it was;
/// - a head it takes is exactly what httparse reads as a whole request head at the front of
///   `data`, with the same method, target, version and fields (name and value, in order),
///   no `Content-Length`, `Transfer-Encoding` or `Upgrade` and not `CONNECT`; what follows
///   it stays in the buffer, untouched;
/// - keep-alive is what RFC 9112 §9.3 says for that version and `Connection`;
/// - a response head written for it (status from the input) is one httparse reads whole,
///   with exactly one framing field unless it has no body.
pub fn check_head(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let (request, asked) = match head::parse(&mut buf, &mut Spans::new()) {
        Parsed::Partial | Parsed::Hyper => {
            assert_eq!(
                &buf[..],
                data,
                "a head not taken leaves the buffer as it was"
            );
            return;
        }
        Parsed::Request(request, asked) => (request, asked),
    };
    let taken = data.len() - buf.len();
    assert_eq!(&buf[..], &data[taken..], "what follows the head stays");

    let mut fields = [httparse::EMPTY_HEADER; head::MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let status = parsed.parse(data).expect("httparse reads the head taken");
    assert_eq!(status, httparse::Status::Complete(taken), "the same length");
    assert_eq!(Some(request.method().as_str()), parsed.method);
    assert_ne!(request.method(), Method::CONNECT);
    let target = parsed.path.expect("a target");
    assert_eq!(
        request.uri(),
        &target.parse::<http::Uri>().expect("a target http reads")
    );
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        other => panic!("a head of version {other:?} was taken"),
    };
    assert_eq!(request.version(), version);
    assert_eq!(asked.version, version);
    assert_eq!(asked.head, request.method() == Method::HEAD);

    // A map keeps each name's values together, in the order they came (as hyper's does).
    assert_eq!(
        request.headers().len(),
        parsed.headers.len(),
        "every field, once"
    );
    let mut close = false;
    let mut keep_alive_token = false;
    for raw in parsed.headers.iter() {
        let values: Vec<&[u8]> = request
            .headers()
            .get_all(raw.name)
            .iter()
            .map(|value| value.as_bytes())
            .collect();
        let raw_values: Vec<&[u8]> = parsed
            .headers
            .iter()
            .filter(|other| other.name.eq_ignore_ascii_case(raw.name))
            .map(|other| other.value)
            .collect();
        assert_eq!(values, raw_values, "the values of {:?}, in order", raw.name);
        for framing in ["content-length", "transfer-encoding", "upgrade"] {
            assert!(
                !raw.name.eq_ignore_ascii_case(framing),
                "a field for hyper was taken"
            );
        }
        if raw.name.eq_ignore_ascii_case("connection") {
            for token in raw.value.split(|&b| b == b',') {
                close |= token.trim_ascii().eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.trim_ascii().eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive_token);
    assert_eq!(asked.keep_alive, keep_alive);

    // A response head for it: status and body length from the input's first bytes.
    let code = 200 + u16::from(data[0] % 4) * 100 + u16::from(data[1] % 5);
    let status = StatusCode::from_u16(code).expect("a valid status");
    let length = match data[2] % 3 {
        0 => Length::Empty,
        1 => Length::Exact(u64::from(data[3])),
        _ => Length::Unknown,
    };
    let mut out = Vec::new();
    let encoded = head::encode(
        &mut out,
        status,
        request.headers(),
        &asked,
        length,
        asked.keep_alive,
        0,
    );
    let mut fields = [httparse::EMPTY_HEADER; head::MAX_HEADERS + 8];
    let mut response = httparse::Response::new(&mut fields);
    assert_eq!(
        response.parse(&out).expect("the response head parses"),
        httparse::Status::Complete(out.len()),
        "one whole head"
    );
    assert_eq!(response.code, Some(code));
    let framing_fields = response
        .headers
        .iter()
        .filter(|field| {
            field.name.eq_ignore_ascii_case("content-length")
                || field.name.eq_ignore_ascii_case("transfer-encoding")
        })
        .count();
    match encoded.framing {
        head::Framing::Length(_) if code != 204 => assert_eq!(framing_fields, 1),
        head::Framing::Chunked => assert_eq!(framing_fields, 1),
        head::Framing::Close => assert_eq!(framing_fields, 0),
        _ => assert!(framing_fields <= 1),
    }
}

#[cfg(test)]
mod tests {
    use super::check_head;

    #[test]
    fn the_fuzz_seeds_pass_the_checks() {
        test_support::check_fuzz_seeds("http1_head", check_head);
    }
}
