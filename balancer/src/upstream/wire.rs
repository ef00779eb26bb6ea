//! The HTTP/1.1 wire format of the balancer's own client to workers ([`super::direct`]):
//! the head of a request without a body, a response head (informational answers skipped),
//! how the response body is delimited (RFC 9112 §6.3) and the chunked coding (§7.1).
//!
//! It reads what hyper's client reads and refuses what it refuses: at most 100 header
//! lines, no obsolete line folding, one valid `Content-Length` (repeats must agree),
//! `Transfer-Encoding` only on HTTP/1.1 and taking precedence, a body read to the end of the
//! connection when neither says how long it is. Heads are bounded ([`MAX_HEAD`]), and so are
//! a chunk's size line and the trailers.

use std::io;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};

/// The largest response head read, status line and header lines: hyper's client's limit too.
pub(crate) const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The most header lines in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// The largest trailer section.
const MAX_TRAILERS: usize = 64 * 1024;

/// What went wrong reading from or writing to a worker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The connection ended before any byte of the response.
    #[error("the worker closed the connection before it answered")]
    Closed,
    /// The connection ended in the middle of the response head.
    #[error("the worker closed the connection in the middle of its response head")]
    ClosedInHead,
    /// The connection ended before the end of a delimited response body.
    #[error("the worker closed the connection before the end of its response body")]
    ClosedInBody,
    /// Writing the request failed.
    #[error("writing the request to the worker")]
    Write(#[source] io::Error),
    /// Reading the response failed.
    #[error("reading the worker's response")]
    Read(#[source] io::Error),
    /// The response head is not HTTP/1.x.
    #[error("malformed response head from the worker: {0}")]
    Parse(#[from] httparse::Error),
    /// The response head is larger than [`MAX_HEAD`].
    #[error("the worker's response head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A header name or value that HTTP does not allow.
    #[error("an invalid header in the worker's response")]
    BadHeader,
    /// A status code outside 100–999.
    #[error("an invalid status code in the worker's response")]
    BadStatus,
    /// `Content-Length` that is not one number, or HTTP/1.0 with `Transfer-Encoding`.
    #[error("the worker's response does not say soundly how long its body is")]
    BadLength,
    /// A `101 Switching Protocols` to a request that asked for no upgrade.
    #[error("the worker switched protocols without being asked")]
    UnaskedUpgrade,
    /// A chunked body that breaks the chunked coding.
    #[error("a malformed chunked body from the worker")]
    BadChunk,
}

/// Writes the head of `request`, which has no body, to `out` (cleared first), as hyper's
/// client writes it: names in lower case, the target as given (the proxy has made it origin
/// form), and no `Transfer-Encoding` (there is no body to code).
pub(crate) fn encode_head<B>(request: &Request<B>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let uri = request.uri();
    match uri.path_and_query() {
        Some(path) if uri.scheme().is_none() && uri.authority().is_none() => {
            out.extend_from_slice(path.as_str().as_bytes());
        }
        _ => out.extend_from_slice(uri.to_string().as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes (none for `HEAD`, `204` and `304`).
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Everything until the worker closes the connection.
    UntilClose,
}

/// A response head read whole, and taken off the buffer.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// An informational (1xx) answer, skipped: the final one follows.
    Informational,
    /// The final answer.
    Final {
        response: Response<()>,
        framing: Framing,
        /// Whether the connection may carry another request once the body is read.
        keep_alive: bool,
    },
}

/// Reads a response head from the start of `buf` and takes it off: `None` while it is
/// incomplete. `method` is the request's (a `HEAD` answer has no body). `scanned` is how much
/// of `buf` earlier calls found without the blank line that ends a head (0 to start with):
/// only what came since is searched, and the head is parsed once, when it is whole, so a
/// worker sending its head a byte at a time costs no more than one sending it at once.
///
/// Header values share the head's bytes instead of each being copied; once they are dropped
/// (the client's connection drops them as it writes the head) the buffer is the connection's
/// alone again, and the next read reuses it.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    scanned: &mut usize,
    method: &Method,
) -> Result<Option<Parsed>, WireError> {
    let from = scanned.saturating_sub(3);
    if find(&buf[from..], b"\r\n\r\n").is_none() && find(&buf[from..], b"\n\n").is_none() {
        *scanned = buf.len();
        return if buf.len() > MAX_HEAD {
            Err(WireError::HeadTooLarge)
        } else {
            Ok(None)
        };
    }
    *scanned = buf.len();
    // Left uninitialised: zeroing 100 header lines costs more than parsing a small head.
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut lines,
    )? {
        httparse::Status::Complete(len) if len <= MAX_HEAD => len,
        httparse::Status::Partial if buf.len() <= MAX_HEAD => return Ok(None),
        _ => return Err(WireError::HeadTooLarge),
    };
    let code = parsed.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| WireError::BadStatus)?;
    match code {
        101 => return Err(WireError::UnaskedUpgrade),
        100..=199 => {
            buf.advance(len);
            *scanned = 0;
            return Ok(Some(Parsed::Informational));
        }
        _ => {}
    }
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let reason = parsed
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
    // Where each name and value lies in the head, so that the values can be cut from it
    // once it is taken off the buffer.
    // Offsets fit in 32 bits: a head is at most `MAX_HEAD` long.
    let start = buf.as_ptr() as usize;
    let offset = |at: *const u8| (at as usize - start) as u32;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, line) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = offset(line.name.as_ptr());
        let value = offset(line.value.as_ptr());
        *span = (
            name,
            name + line.name.len() as u32,
            value,
            value + line.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    *scanned = 0;
    let mut keep_alive = version == Version::HTTP_11;
    let mut said_close = false;
    let mut headers = HeaderMap::with_capacity(count);
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| WireError::BadHeader)?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| WireError::BadHeader)?;
        if name == header::CONNECTION {
            // Once any `Connection` line says close, a later `keep-alive` does not undo it.
            if said_close || has_token(&value, "close") {
                said_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(&value, "keep-alive");
            }
        }
        headers.append(name, value);
    }
    let framing = framing(status, method, version, &headers)?;
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The coding delimits the body; a length beside it is wrong and must not be passed
        // on (RFC 9112 §6.3).
        headers.remove(header::CONTENT_LENGTH);
    }
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    if let Some(reason) = reason {
        // A reason phrase of the worker's own reaches the client, as through hyper's client.
        response.extensions_mut().insert(reason);
    }
    *response.headers_mut() = headers;
    Ok(Some(Parsed::Final {
        response,
        framing,
        keep_alive,
    }))
}

/// Whether a comma-separated header value lists `token` (case-insensitively).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|value| {
        value
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// How the body of a response with this head is delimited (RFC 9112 §6.3).
fn framing(
    status: StatusCode,
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Framing, WireError> {
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(WireError::BadLength);
        }
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let value = value.to_str().map_err(|_| WireError::BadLength)?;
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(WireError::BadLength);
            }
            let parsed: u64 = part.parse().map_err(|_| WireError::BadLength)?;
            if length.is_some_and(|earlier| earlier != parsed) {
                return Err(WireError::BadLength);
            }
            length = Some(parsed);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Default)]
pub(crate) enum Chunked {
    /// A chunk-size line is next.
    #[default]
    Size,
    /// This many bytes of chunk data are still to come.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// The trailer section (maybe empty) after the last chunk is next; `scanned` bytes of it
    /// have been searched for its end already.
    Trailers { scanned: usize },
    /// The body has ended.
    Done,
}

/// What decoding a chunked body's buffered bytes gave.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    /// Data, cut from the buffer.
    Data(Bytes),
    /// The trailers, which end the body.
    Trailers(HeaderMap),
    /// The end of the body, without trailers.
    End,
    /// More bytes are needed.
    More,
}

impl Chunked {
    /// Decodes what it can from the front of `buf`, consuming it.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match *self {
                Self::Size => {
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
                    let Some(end) = find(window, b"\r\n") else {
                        return more(buf.len() > MAX_CHUNK_LINE);
                    };
                    let size = chunk_size(&buf[..end]).ok_or(WireError::BadChunk)?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Self::Trailers { scanned: 0 }
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
                    let data = buf.split_to(take).freeze();
                    let left = remaining - take as u64;
                    *self = if left == 0 {
                        Self::DataEnd
                    } else {
                        Self::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::BadChunk);
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers { scanned } => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Self::Done;
                        return Ok(Decoded::End);
                    }
                    let from = scanned.saturating_sub(3);
                    let Some(end) = find(&buf[from..], b"\r\n\r\n").map(|at| at + from) else {
                        *self = Self::Trailers { scanned: buf.len() };
                        return more(buf.len() > MAX_TRAILERS);
                    };
                    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let len = match httparse::parse_headers(&buf[..end + 4], &mut lines)? {
                        httparse::Status::Complete((len, _)) => len,
                        httparse::Status::Partial => return Err(WireError::BadChunk),
                    };
                    let mut trailers = HeaderMap::new();
                    for line in lines.iter().take_while(|line| !line.name.is_empty()) {
                        let name = HeaderName::from_bytes(line.name.as_bytes())
                            .map_err(|_| WireError::BadHeader)?;
                        let value = HeaderValue::from_bytes(line.value)
                            .map_err(|_| WireError::BadHeader)?;
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    *self = Self::Done;
                    return Ok(Decoded::Trailers(trailers));
                }
                Self::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// `More`, unless what is buffered is already `too_long` for what it should hold.
fn more(too_long: bool) -> Result<Decoded, WireError> {
    if too_long {
        Err(WireError::BadChunk)
    } else {
        Ok(Decoded::More)
    }
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The size a chunk-size line (without its CRLF) gives: hexadecimal digits (at most 16
/// once leading zeros are set aside), then maybe spaces or tabs, then maybe `;` and chunk
/// extensions, which are ignored; no CR or LF anywhere.
fn chunk_size(line: &[u8]) -> Option<u64> {
    if line.iter().any(|&b| b == b'\r' || b == b'\n') {
        return None;
    }
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = size.trim_ascii_end();
    if size[digits.len()..]
        .iter()
        .any(|&b| b != b' ' && b != b'\t')
    {
        return None;
    }
    parse_hex(digits)
}

/// A chunk size: hexadecimal digits, at most 16 after any leading zeros.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    let first = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len());
    let digits = &digits[first..];
    if digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &digit| {
        let value = char::from(digit).to_digit(16)?;
        Some(size << 4 | u64::from(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], method: &Method) -> Result<Option<Parsed>, WireError> {
        parse_head(&mut BytesMut::from(bytes), &mut 0, method)
    }

    /// The response, its framing, whether it keeps the connection, and what follows it.
    fn head(bytes: &str, method: &Method) -> (Response<()>, Framing, bool, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        match parse_head(&mut buf, &mut 0, method).expect("valid") {
            Some(Parsed::Final {
                response,
                framing,
                keep_alive,
            }) => (response, framing, keep_alive, buf),
            other => panic!("not a final head: {other:?}"),
        }
    }

    #[test]
    fn a_request_head_is_written_as_hyper_writes_it() {
        let request = Request::get("/a?b=c")
            .header("host", "example")
            .header("x-two", "1")
            .header("x-two", "2")
            .header("transfer-encoding", "chunked")
            .body(())
            .expect("request");
        let mut out = b"left over".to_vec();
        encode_head(&request, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "GET /a?b=c HTTP/1.1\r\nhost: example\r\nx-two: 1\r\nx-two: 2\r\n\r\n"
        );
    }

    #[test]
    fn a_response_head_gives_its_status_headers_and_framing() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello";
        let (response, framing, keep_alive, rest) = head(text, &Method::GET);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_11);
        assert_eq!(response.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(framing, Framing::Length(5));
        assert!(keep_alive);
        assert_eq!(&rest[..], b"hello");
        assert!(
            response
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );

        let (response, framing, keep_alive, _) =
            head("HTTP/1.1 404 Gone Fishing\r\n\r\n", &Method::GET);
        assert_eq!(framing, Framing::UntilClose);
        assert!(!keep_alive, "a body read to the close ends the connection");
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Gone Fishing"[..]));
    }

    #[test]
    fn the_framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n",
                Method::GET,
                Framing::Length(0),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\n\r\n",
                Method::GET,
                Framing::Length(0),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
                Method::HEAD,
                Framing::Length(0),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
                Method::GET,
                Framing::Chunked,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::GET,
                Framing::UntilClose,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\ncontent-length: 7\r\n\r\n",
                Method::GET,
                Framing::Length(7),
            ),
        ];
        for (text, method, expected) in cases {
            assert_eq!(head(text, &method).1, expected, "{text:?}");
        }
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +7\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            let error = parse(bad.as_bytes(), &Method::GET).expect_err(bad);
            assert!(matches!(error, WireError::BadLength), "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_head_fed_a_byte_at_a_time_is_read_once_whole() {
        let text =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\nx: y\r\n\r\n0";
        let (mut buf, mut scanned) = (BytesMut::new(), 0);
        for (fed, &byte) in text.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            match parse_head(&mut buf, &mut scanned, &Method::GET).expect("valid so far") {
                None => assert_eq!(scanned, fed + 1, "what is searched is remembered"),
                Some(Parsed::Final {
                    response, framing, ..
                }) => {
                    assert_eq!(fed, text.len() - 2, "whole at the blank line");
                    assert_eq!(framing, Framing::Chunked);
                    assert!(
                        response.headers().get("content-length").is_none(),
                        "a length beside a transfer coding is not passed on"
                    );
                    assert_eq!(
                        response.headers().get("x").map(|v| v.as_bytes()),
                        Some(&b"y"[..])
                    );
                    assert_eq!(scanned, 0);
                    return;
                }
                Some(Parsed::Informational) => panic!("not informational"),
            }
        }
        panic!("never whole");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\nconnection: keep-alive\r\n\r\n",
                false,
            ),
            ("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: Keep-Alive\r\n\r\n",
                true,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(head(text, &Method::GET).2, expected, "{text:?}");
        }
    }

    #[test]
    fn partial_informational_and_broken_heads() {
        let partial = parse(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET);
        assert!(matches!(partial, Ok(None)));
        let mut early =
            BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1"[..]);
        let mut scanned = 0;
        let parsed = parse_head(&mut early, &mut scanned, &Method::GET);
        assert!(matches!(parsed, Ok(Some(Parsed::Informational))));
        assert_eq!(
            &early[..],
            b"HTTP/1.1",
            "the informational answer is taken off"
        );
        assert_eq!(scanned, 0);
        let upgrade = parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &Method::GET);
        assert!(matches!(upgrade, Err(WireError::UnaskedUpgrade)));
        let folded = parse(b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n", &Method::GET);
        assert!(matches!(folded, Err(WireError::Parse(_))));
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        while huge.len() <= MAX_HEAD {
            huge.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let error = parse(&huge, &Method::GET).expect_err("too large");
        assert!(matches!(
            error,
            WireError::HeadTooLarge | WireError::Parse(_)
        ));
    }

    #[test]
    fn a_head_may_have_100_header_lines_and_each_keeps_its_own_name_and_value() {
        let lines = |count: usize| {
            let mut text = String::from("HTTP/1.1 200 OK\r\n");
            for line in 0..count {
                text.push_str(&format!("x-line-{line}: value {line}\r\n"));
            }
            text + "\r\n"
        };
        let (response, ..) = head(&lines(MAX_HEADERS), &Method::GET);
        assert_eq!(response.headers().len(), MAX_HEADERS);
        for line in 0..MAX_HEADERS {
            let value = response.headers().get(format!("x-line-{line}"));
            assert_eq!(
                value.map(HeaderValue::as_bytes),
                Some(format!("value {line}").as_bytes())
            );
        }
        let error = parse(lines(MAX_HEADERS + 1).as_bytes(), &Method::GET);
        assert!(matches!(error, Err(WireError::Parse(_))), "{error:?}");
    }

    /// Decodes `input` fed in pieces of `step` bytes.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), WireError> {
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match chunked.decode(&mut buf)? {
                Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                Decoded::Trailers(trailers) => return Ok((data, Some(trailers))),
                Decoded::End => return Ok((data, None)),
                Decoded::More => {
                    assert!(fed < input.len(), "ran out of input");
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn a_chunked_body_decodes_whatever_the_pieces() {
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n";
        for step in [1, 2, 3, 7, body.len()] {
            let (data, trailers) = decode_in_steps(body, step).expect("valid");
            assert_eq!(data, b"hello, world");
            let trailers = trailers.expect("trailers");
            assert_eq!(
                trailers.get("grpc-status").map(HeaderValue::as_bytes),
                Some(&b"0"[..])
            );
            assert_eq!(trailers.len(), 2);
        }
        let (data, trailers) = decode_in_steps(b"3\r\nabc\r\n0\r\n\r\n", 1).expect("valid");
        assert_eq!((data.as_slice(), trailers), (&b"abc"[..], None));
        let (data, _) = decode_in_steps(b"00000000000000000003 ;x\r\nabc\r\n0\r\n\r\n", 1)
            .expect("leading zeros and a space before the extension");
        assert_eq!(data, b"abc");
        let mut long_line = b"3;".to_vec();
        long_line.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        long_line.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
        for bad in [
            &b"x\r\n"[..],
            b"3\r\nabcd\r\n",
            b"11111111111111111\r\n",
            b"5\n\r\n",
            b" 5\r\n",
            b"5 x\r\n",
            &long_line,
        ] {
            assert!(decode_in_steps(bad, 1).is_err(), "{bad:?}");
            assert!(decode_in_steps(bad, bad.len()).is_err(), "{bad:?}");
        }
    }
}
