//! Reading a body-less request head, and writing a response head, for [`super`]'s own path.
//!
//! A head is parsed by httparse, as hyper parses it; what the own path does not take (a
//! body, an upgrade, `CONNECT`, or anything httparse or `http` refuses) is left for hyper,
//! which answers it as it always has. A response head is written as hyper writes it:
//! lower-case names in the map's order, the framing decided from the body and the request,
//! `Date` added when missing, `Connection` saying `close` or `keep-alive` where the client
//! could not otherwise tell.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

/// At most this many header fields in a request head taken here; more go to hyper (which
/// allows as many, and answers beyond them with `431`).
pub(crate) const MAX_HEADERS: usize = 100;

/// What the connection must remember of a request after handing it to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asked {
    /// The method was `HEAD`: the response has no body.
    pub(crate) head: bool,
    /// HTTP/1.0 or HTTP/1.1.
    pub(crate) version: Version,
    /// The client will send another request on this connection (RFC 9112 §9.3).
    pub(crate) keep_alive: bool,
    /// The client's `TE` lists `trailers`: a chunked response may end with its trailers.
    pub(crate) trailers: bool,
}

/// What a buffer's opening bytes are.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "a box would be an allocation per request; the value is moved once"
)]
pub(crate) enum Parsed {
    /// A whole request head with no body, taken out of the buffer.
    Request(Request<()>, Asked),
    /// The start of a head: more bytes are needed.
    Partial,
    /// A request for hyper: a body, an upgrade, `CONNECT`, or a head that does not parse.
    Hyper,
}

/// Where each part of a head lies in the buffer, found while httparse borrows it (the
/// fields' in [`Spans`]).
struct Layout {
    len: usize,
    method: Method,
    target: Range<usize>,
    version: Version,
}

/// Where each field's name and value lie in the buffer: `[name start, name end, value
/// start, value end]`. Kept by the connection from head to head, so it is allocated once
/// (and not copied about, as an array for [`MAX_HEADERS`] fields would be).
pub(crate) type Spans = Vec<[usize; 4]>;

/// Fields a proxy adds to a request (`X-Forwarded-For`, `X-Forwarded-Proto`, ...): room is
/// made for them when the map is made, so that adding them does not grow it.
const ROOM: usize = 4;

/// Whether `buf` may hold the end of a head (an empty line, after CRLF or a bare LF, as
/// httparse takes either) beyond its first `scanned` bytes, which are known not to.
pub(crate) fn may_end(buf: &[u8], scanned: usize) -> bool {
    // An end is at most three bytes (`\n\r\n`): it may have begun among the last scanned.
    let from = scanned.saturating_sub(3).min(buf.len());
    let rest = &buf[from..];
    rest.iter().enumerate().any(|(at, &byte)| {
        byte == b'\n' && matches!(&rest[at + 1..], [b'\n', ..] | [b'\r', b'\n', ..])
    })
}

/// Takes a whole body-less request head from the front of `buf`; see [`Parsed`]. Header
/// values and the target share the buffer's memory rather than being copied. `spans` is
/// scratch space.
pub(crate) fn parse(buf: &mut BytesMut, spans: &mut Spans) -> Parsed {
    spans.clear();
    let layout = match locate(buf, spans) {
        Ok(Some(layout)) => layout,
        Ok(None) => return Parsed::Partial,
        Err(()) => return Parsed::Hyper,
    };
    let head = buf.split_to(layout.len).freeze();
    match build(&head, &layout, spans) {
        Some((request, asked)) => Parsed::Request(request, asked),
        None => {
            // Back in front of the buffer, for hyper to read and answer (a copy, but only
            // of a head that hyper will refuse).
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Parsed::Hyper
        }
    }
}

/// Finds the parts of the head at the front of `buf`: `None` if it is not whole yet,
/// `Err` if it is not one for the own path.
fn locate(buf: &[u8], spans: &mut Spans) -> Result<Option<Layout>, ()> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let base = buf.as_ptr().addr();
    let span = |part: &[u8]| {
        let start = part.as_ptr().addr() - base;
        start..start + part.len()
    };
    let method = Method::from_bytes(request.method.ok_or(())?.as_bytes()).map_err(|_| ())?;
    if method == Method::CONNECT {
        return Err(());
    }
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(()),
    };
    let target = span(request.path.ok_or(())?.as_bytes());
    for field in request.headers.iter() {
        let name = field.name.as_bytes();
        // A body (or its framing in doubt) and upgrades are hyper's.
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Err(());
        }
        let (name, value) = (span(name), span(field.value));
        spans.push([name.start, name.end, value.start, value.end]);
    }
    Ok(Some(Layout {
        len,
        method,
        target,
        version,
    }))
}

/// The request `layout` describes in `head`, and what to remember of it; `None` if `http`
/// refuses a part of it.
fn build(head: &Bytes, layout: &Layout, spans: &Spans) -> Option<(Request<()>, Asked)> {
    let uri = Uri::from_maybe_shared(head.slice(layout.target.clone())).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len() + ROOM);
    let mut asked = Asked {
        head: layout.method == Method::HEAD,
        version: layout.version,
        keep_alive: layout.version == Version::HTTP_11,
        trailers: false,
    };
    let mut close = false;
    for &[name_start, name_end, value_start, value_end] in spans {
        let name = HeaderName::from_bytes(&head[name_start..name_end]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end)).ok()?;
        if name == header::CONNECTION {
            close |= has_token(&value, "close");
            if layout.version == Version::HTTP_10 && has_token(&value, "keep-alive") {
                asked.keep_alive = true;
            }
        } else if name == header::TE {
            asked.trailers |= has_token(&value, "trailers");
        }
        headers.append(name, value);
    }
    asked.keep_alive &= !close;
    let mut request = Request::new(());
    *request.method_mut() = layout.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = layout.version;
    *request.headers_mut() = headers;
    Some((request, asked))
}

/// Whether a comma-separated header value lists `token` (in any case).
pub(crate) fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body is sent (`HEAD`, `204`, `304`, an empty body).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (HTTP/1.1).
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a known length).
    Close,
}

/// What a response body is known to be before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Length {
    /// It has ended already.
    Empty,
    /// Exactly this many bytes.
    Exact(u64),
    /// Not known until it ends.
    Unknown,
}

/// What [`encode`] decided about a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// How the body is delimited.
    pub(crate) framing: Framing,
    /// Whether the connection may serve another request after this response.
    pub(crate) keep_alive: bool,
    /// The trailer fields the body may end with: those the response's `Trailer` names,
    /// when the body is chunked and the client takes trailers; `None` for none at all.
    pub(crate) trailers: Option<Vec<HeaderName>>,
}

/// Writes the head of a response to `asked` into `out` (with room for `room` bytes more:
/// a small body to follow), whose body is `length` long, and says how its body is framed,
/// whether the connection stays open after it (given `keep_alive`: the client's wish and
/// the connection's state) and which trailers it may carry. Response headers that frame the
/// body (`Content-Length`, `Transfer-Encoding`) are replaced by the framing chosen here. A
/// `101` ends the connection's HTTP (what follows is another protocol's), so it closes.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    asked: &Asked,
    length: Length,
    mut keep_alive: bool,
    room: usize,
) -> Encoded {
    let bodiless = asked.head
        || status.is_informational()
        || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    // One pass over the fields for what the head depends on: the declared length (the
    // first), what `Connection` lists, whether there is a `Date`, and the room they take.
    let mut declared: Option<&HeaderValue> = None;
    let mut connection = (false, false); // (lists close, lists keep-alive)
    let mut dated = false;
    let mut fields = 0;
    for (name, value) in headers {
        fields += name.as_str().len() + value.len() + 4;
        match *name {
            header::CONTENT_LENGTH => {
                declared.get_or_insert(value);
            }
            header::CONNECTION => {
                connection.0 |= has_token(value, "close");
                connection.1 |= has_token(value, "keep-alive");
            }
            header::DATE => dated = true,
            _ => {}
        }
    }
    let declared_length =
        declared.and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    let framing = match (bodiless, length) {
        (true, _) => Framing::None,
        (false, Length::Empty) => Framing::Length(0),
        (false, Length::Exact(n)) => Framing::Length(n),
        (false, Length::Unknown) => match declared_length {
            Some(n) => Framing::Length(n),
            None if asked.version == Version::HTTP_11 => Framing::Chunked,
            None => Framing::Close,
        },
    };
    if framing == Framing::Close || status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }
    // `Trailer` announces trailers, which only a chunked body can carry (hyper's rule: kept
    // wherever a body could be chunked).
    let may_chunk = !bodiless && asked.version == Version::HTTP_11;
    let mut trailers = None;
    keep_alive &= !connection.0;

    // Room for the whole head at once, rather than growing (and copying) it line by line
    // on a new connection's empty buffer.
    out.reserve(HEAD_EXTRA + fields + room);
    out.extend_from_slice(if asked.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING => continue,
            header::TRAILER if !may_chunk => continue,
            header::TRAILER if framing == Framing::Chunked && asked.trailers => {
                let names = trailers.get_or_insert_with(Vec::new);
                names.extend(
                    value
                        .as_bytes()
                        .split(|&b| b == b',')
                        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok()),
                );
            }
            _ => {}
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(n) if !status_forbids_length(status) => {
            line(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
        // A HEAD response says what a GET's would be.
        Framing::None if asked.head && !status_forbids_length(status) => {
            if let Some(n) = declared_length {
                line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            } else if let Length::Exact(n) = length {
                line(
                    out,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            }
        }
        _ => {}
    }
    if asked.version == Version::HTTP_10 && keep_alive && !connection.1 {
        line(out, b"connection", b"keep-alive");
    } else if asked.version == Version::HTTP_11 && !keep_alive && !connection.0 {
        line(out, b"connection", b"close");
    }
    if !dated {
        DATE.with_borrow_mut(|date| line(out, b"date", date.now()));
    }
    out.extend_from_slice(b"\r\n");
    Encoded {
        framing,
        keep_alive,
        trailers,
    }
}

/// Whether a trailer field may be sent at all: not one that frames, routes, authenticates
/// or describes the content, which a recipient must not take from trailers (RFC 9110
/// §6.5.1; hyper's list).
pub(crate) fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

/// Room in a response head for what is not a field of the map: the status line, the
/// framing, `Connection`, `Date` and the blank line.
const HEAD_EXTRA: usize = 160;

/// `1xx`, `204` and `304` responses carry no `Content-Length` (RFC 9110 §8.6).
fn status_forbids_length(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// This thread's `Date` value, made once a second.
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: u64::MAX, text: Vec::new() })
    };
}

/// An IMF-fixdate (RFC 9110 §5.6.7) for the current second.
struct CachedDate {
    second: u64,
    text: Vec<u8>,
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(head);
        (parse(&mut buf, &mut Spans::new()), buf)
    }

    #[test]
    fn a_get_is_taken_with_its_fields_and_the_rest_stays() {
        let (parsed, rest) = parsed(
            b"GET /a?b=c HTTP/1.1\r\nHost: example\r\nX-Many: 1\r\nx-many: 2\r\nTE: gzip, Trailers\r\n\r\nGET /next",
        );
        let Parsed::Request(request, asked) = parsed else {
            panic!("not taken: {parsed:?}");
        };
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=c");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "example");
        let many: Vec<_> = request.headers().get_all("x-many").iter().collect();
        assert_eq!(many, ["1", "2"]);
        assert_eq!(
            asked,
            Asked {
                head: false,
                version: Version::HTTP_11,
                keep_alive: true,
                trailers: true
            }
        );
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn a_head_is_looked_for_only_where_it_may_have_ended() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for at in 0..head.len() {
            assert!(!may_end(&head[..at], 0), "{at}");
        }
        assert!(may_end(head, 0));
        // The end coming in the last piece, however the pieces split it.
        for scanned in 0..head.len() {
            assert!(may_end(head, scanned), "{scanned}");
        }
        assert!(may_end(b"GET / HTTP/1.1\nHost: a\n\n", 20));
        assert!(!may_end(b"", 0));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let asked = |head: &[u8]| match parsed(head).0 {
            Parsed::Request(_, asked) => asked,
            other => panic!("not taken: {other:?}"),
        };
        assert!(!asked(b"GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(!asked(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        let old = asked(b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(old.keep_alive && old.head);
        assert_eq!(old.version, Version::HTTP_10);
    }

    #[test]
    fn bodies_upgrades_connect_and_bad_heads_are_left_for_hyper_untouched() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT example:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let (parsed, rest) = parsed(head);
            assert!(matches!(parsed, Parsed::Hyper), "{head:?}: {parsed:?}");
            assert_eq!(&rest[..], head, "hyper reads it all");
        }
        let many: Vec<u8> = (0..=MAX_HEADERS)
            .flat_map(|i| format!("x-{i}: 1\r\n").into_bytes())
            .collect();
        let head = [&b"GET / HTTP/1.1\r\n"[..], &many, b"\r\n"].concat();
        assert!(matches!(parsed(&head).0, Parsed::Hyper));
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nHost: ex").0,
            Parsed::Partial
        ));
    }

    fn encoded(
        status: StatusCode,
        headers: &[(&str, &str)],
        asked: Asked,
        length: Length,
    ) -> (String, Framing, bool) {
        let mut map = HeaderMap::new();
        map.insert(header::DATE, HeaderValue::from_static("D"));
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut out = Vec::new();
        let encoded = encode(&mut out, status, &map, &asked, length, asked.keep_alive, 0);
        (
            String::from_utf8(out).unwrap(),
            encoded.framing,
            encoded.keep_alive,
        )
    }

    const GET11: Asked = Asked {
        head: false,
        version: Version::HTTP_11,
        keep_alive: true,
        trailers: false,
    };

    #[test]
    fn the_framing_comes_from_the_body_and_the_request() {
        let (text, framing, keep) = encoded(StatusCode::OK, &[], GET11, Length::Exact(20));
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 20\r\n\r\n"
        );
        assert_eq!((framing, keep), (Framing::Length(20), true));

        let (text, framing, _) = encoded(
            StatusCode::OK,
            &[("transfer-encoding", "chunked")],
            GET11,
            Length::Unknown,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: D\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);

        let (_, framing, _) = encoded(
            StatusCode::OK,
            &[("content-length", "7")],
            GET11,
            Length::Unknown,
        );
        assert_eq!(framing, Framing::Length(7));

        let (text, framing, _) = encoded(StatusCode::NOT_FOUND, &[], GET11, Length::Empty);
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ndate: D\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(0));

        let (text, framing, _) = encoded(StatusCode::NO_CONTENT, &[], GET11, Length::Empty);
        assert_eq!(text, "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n");
        assert_eq!(framing, Framing::None);
    }

    #[test]
    fn a_head_response_keeps_the_length_a_get_would_have() {
        let head = Asked {
            head: true,
            ..GET11
        };
        let (text, framing, _) = encoded(
            StatusCode::OK,
            &[("content-length", "512")],
            head,
            Length::Empty,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 512\r\n\r\n"
        );
        assert_eq!(framing, Framing::None);
    }

    #[test]
    fn connection_says_what_the_client_cannot_otherwise_tell() {
        let (text, _, keep) = encoded(
            StatusCode::OK,
            &[],
            Asked {
                keep_alive: false,
                ..GET11
            },
            Length::Exact(0),
        );
        assert!(text.contains("connection: close\r\n") && !keep, "{text}");

        let (text, _, keep) = encoded(
            StatusCode::OK,
            &[("connection", "close")],
            GET11,
            Length::Exact(0),
        );
        assert_eq!(text.matches("connection").count(), 1, "{text}");
        assert!(!keep);

        let old = Asked {
            version: Version::HTTP_10,
            ..GET11
        };
        let (text, framing, keep) = encoded(StatusCode::OK, &[], old, Length::Exact(3));
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(
            text.contains("connection: keep-alive\r\n") && keep,
            "{text}"
        );
        assert_eq!(framing, Framing::Length(3));

        let (text, framing, keep) = encoded(StatusCode::OK, &[], old, Length::Unknown);
        assert_eq!(framing, Framing::Close);
        assert!(!keep && !text.contains("connection"), "{text}");
    }

    #[test]
    fn a_date_is_added_when_missing() {
        let mut out = Vec::new();
        encode(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            &GET11,
            Length::Empty,
            true,
            0,
        );
        let text = String::from_utf8(out).unwrap();
        let date = text
            .lines()
            .find_map(|line| line.strip_prefix("date: "))
            .expect("a date");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    }
}
