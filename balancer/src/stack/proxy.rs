//! The proxy layer: HTTP proxy semantics, applied once per request however many attempts it
//! takes.
//!
//! What it does to a request, in order (RFC 9110 §7.6, and what nginx and Envoy do):
//! - refuses a body declared larger than `max_body_bytes` (`413`), and stops one that
//!   grows past it while streaming;
//! - removes hop-by-hop headers (`Connection` and every header it names, `Keep-Alive`,
//!   `TE`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`), except that an `Upgrade` request
//!   keeps `Connection: upgrade` and `Upgrade`, and a client that accepts trailers says so
//!   to the worker as `TE: trailers` with `Connection: te` (the one `TE` RFC 9110 §7.6.1
//!   lets a proxy forward, and what gRPC servers require). `Trailer`, which names the
//!   trailer fields to come, is end to end (RFC 9110 §6.6.2) and passes, so that an HTTP/1.1
//!   peer is sent the trailers it announces;
//! - answers `Expect: 100-continue` itself and does not pass it on;
//! - keeps `Host` (or makes it from the HTTP/2 `:authority`), appends the client address to
//!   `X-Forwarded-For` and sets `X-Forwarded-Proto` to `https` when the client came over
//!   TLS and to `http` otherwise, replacing whatever the client sent;
//! - sends it in origin form, whatever the client spoke (HTTP/1.1 or h2c): as HTTP/1.1, or
//!   as HTTP/2 to an h2c worker (the upstream module makes the target absolute then).
//!
//! Bodies are streamed both ways and never collected; the request body is wrapped here, once,
//! with its idle timeout (`408` when the client pauses it longer than `body_timeout`) and its
//! size limit (`413`), so a retry sends the very same body on.
//!
//! A worker's `101 Switching Protocols` answer to an upgrade request starts a tunnel that
//! copies bytes both ways; the worker's response body, which holds the worker's slot, is
//! moved into the tunnel so the slot is held until the tunnel closes.

use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::Config;
use crate::body::{ClientBody, RequestBody, ResponseBody};
use crate::stack::Refusal;

/// The client's address, and its `X-Forwarded-For` value made once per connection: cloning a
/// header value shares its bytes, so a request from a client that sent no `X-Forwarded-For`
/// of its own allocates nothing for it.
#[derive(Debug, Clone)]
struct ClientAddr {
    ip: IpAddr,
    header: HeaderValue,
}

impl ClientAddr {
    fn new(client: SocketAddr) -> Self {
        let ip = client.ip();
        let header = match ip {
            IpAddr::V4(v4) => {
                let (text, len) = ipv4_text(v4);
                HeaderValue::from_bytes(&text[..len]).ok()
            }
            IpAddr::V6(v6) => {
                // Written on the stack and copied once into the value (`to_string` would
                // allocate twice more). The longest IPv6 text is 45 bytes.
                let mut text = [0_u8; 64];
                let mut cursor = std::io::Cursor::new(&mut text[..]);
                write!(cursor, "{v6}")
                    .ok()
                    .and_then(|()| usize::try_from(cursor.position()).ok())
                    .and_then(|len| HeaderValue::from_bytes(&text[..len]).ok())
            }
        };
        // An IP address in text is always a valid header value.
        let header = header.unwrap_or_else(|| HeaderValue::from_static("unknown"));
        Self { ip, header }
    }
}

/// An IPv4 address in dotted-decimal text, and its length: the same text as its `Display`,
/// written by hand because it is made for every client connection and `fmt`'s machinery
/// costs more than the rest of making the `X-Forwarded-For` value.
fn ipv4_text(ip: Ipv4Addr) -> ([u8; 15], usize) {
    let mut text = [0_u8; 15];
    let mut len = 0;
    for (index, octet) in ip.octets().into_iter().enumerate() {
        if index > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    (text, len)
}

/// Rewrites requests and responses as an HTTP proxy does, for the requests of one client
/// connection; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Proxy<S> {
    inner: S,
    client: ClientAddr,
    /// `X-Forwarded-Proto`: how the client reached the balancer.
    scheme: HeaderValue,
    max_body_bytes: u64,
    body_timeout: Duration,
}

impl<S> Proxy<S> {
    pub(crate) fn new(inner: S, config: &Config, client: SocketAddr) -> Self {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Self {
            inner,
            client: ClientAddr::new(client),
            scheme: HeaderValue::from_static(scheme),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        }
    }
}

impl<S, B, C> Service<Request<C>> for Proxy<S>
where
    C: ClientBody,
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Refusal>,
    B: Send + 'static,
{
    type Response = Response<ResponseBody<B>>;
    type Error = Refusal;
    type Future = Proxied<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<C>) -> Self::Future {
        if !host_is_sound(&request) {
            return Proxied::Refused {
                refusal: Some(Refusal::BadHost),
            };
        }
        let max_body = self.max_body_bytes;
        if declared_length(request.headers()).is_some_and(|length| length > max_body) {
            return Proxied::Refused {
                refusal: Some(Refusal::BodyTooLarge),
            };
        }
        let upgrade = upgrade_protocol(&request);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        prepare_request_head(&mut parts, &self.client, &self.scheme, upgrade.clone());
        let body = body.forward(self.body_timeout, max_body);
        Proxied::Forwarding {
            future: self.inner.call(Request::from_parts(parts, body)),
            client_upgrade,
            upgrade,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Proxy::call`].
    #[project = ProxiedProjection]
    pub(crate) enum Proxied<F> {
        Refused { refusal: Option<Refusal> },
        Forwarding {
            #[pin]
            future: F,
            // The client's side of an upgrade it asked for, and the protocol it named.
            client_upgrade: Option<OnUpgrade>,
            upgrade: Option<HeaderValue>,
        },
    }
}

impl<F, B> Future for Proxied<F>
where
    F: Future<Output = Result<Response<B>, Refusal>>,
    B: Send + 'static,
{
    type Output = Result<Response<ResponseBody<B>>, Refusal>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ProxiedProjection::Refused { refusal } => {
                Poll::Ready(Err(refusal.take().unwrap_or(Refusal::BodyTooLarge)))
            }
            ProxiedProjection::Forwarding {
                future,
                client_upgrade,
                upgrade,
            } => {
                let mut response = ready!(future.poll(cx))?;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade.take()
                {
                    let worker_upgrade = hyper::upgrade::on(&mut response);
                    let (mut parts, slot) = response.into_parts();
                    tokio::spawn(tunnel(client_upgrade, worker_upgrade, slot));
                    let protocol = parts.headers.get(header::UPGRADE).cloned();
                    remove_hop_by_hop(&mut parts.headers);
                    restore_connection_headers(
                        &mut parts.headers,
                        protocol.or(upgrade.take()),
                        false,
                    );
                    let body = Either::Right(Full::default());
                    return Poll::Ready(Ok(Response::from_parts(parts, body)));
                }
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Poll::Ready(Ok(Response::from_parts(parts, Either::Left(body))))
            }
        }
    }
}

/// Copies bytes both ways between an upgraded client and worker connection.
/// `slot` is the worker's response body, which holds the worker's slot until the tunnel
/// closes.
async fn tunnel<B>(client: hyper::upgrade::OnUpgrade, worker: hyper::upgrade::OnUpgrade, slot: B) {
    let (client, worker) = match tokio::try_join!(client, worker) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut worker) = (TokioIo::new(client), TokioIo::new(worker));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut worker).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
    drop(slot);
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
fn upgrade_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let asks = connection_tokens(request.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asks.then(|| request.headers().get(header::UPGRADE).cloned())
        .flatten()
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard `Proxy-Connection`; `Connection` first.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// `X-Forwarded-For` and `X-Forwarded-Proto`, named once: a name made from a `&str` at each
/// insert would be parsed and copied for every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Where `name` is in [`HOP_BY_HOP`], if it is there: one `match` on its text, which compares
/// lengths first, so most names cost a comparison or two (comparing each with the eight, or
/// looking each of the eight up by hash, cost more than the rest of this layer).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "proxy-authenticate" => 1,
        "proxy-authorization" => 2,
        "te" => 3,
        "transfer-encoding" => 4,
        "upgrade" => 5,
        "keep-alive" => 6,
        "proxy-connection" => 7,
        _ => return None,
    })
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the fields says which of the fixed names are there and reads what each
    // `Connection` lists; most messages carry none of them or only `Connection`.
    let mut present = [false; HOP_BY_HOP.len()];
    // The names `Connection` lists that are present and not removed below anyway: the usual
    // `keep-alive` or `close` allocates nothing (looking a `&str` up in the map does not;
    // making a `HeaderName` of it does).
    let mut named: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let Some(index) = hop_by_hop_index(name) else {
            continue;
        };
        present[index] = true;
        if index != 0 {
            continue;
        }
        let Ok(value) = value.to_str() else {
            continue;
        };
        for token in value.split(',').map(str::trim) {
            let fixed = HOP_BY_HOP
                .iter()
                .any(|hop| token.eq_ignore_ascii_case(hop.as_str()));
            if token.is_empty() || fixed || !headers.contains_key(token) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in &named {
        headers.remove(name);
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// Whether the client's `TE` lists `trailers` (RFC 9110 §10.1.4).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let name = coding.split(';').next().unwrap_or("").trim();
            name.eq_ignore_ascii_case("trailers")
        })
}

/// Puts back what the worker must see of the connection-level headers: `Upgrade` with
/// `Connection: upgrade` for an upgrade, and `TE: trailers`, which an HTTP/1.1 sender must
/// also list in `Connection` (RFC 9110 §10.1.4). (To an h2c worker the upstream module drops
/// `Connection`, which HTTP/2 forbids.)
fn restore_connection_headers(
    headers: &mut HeaderMap,
    upgrade: Option<HeaderValue>,
    accepts_trailers: bool,
) {
    let connection = match (upgrade, accepts_trailers) {
        (Some(protocol), trailers) => {
            headers.insert(header::UPGRADE, protocol);
            if trailers { "upgrade, te" } else { "upgrade" }
        }
        (None, true) => "te",
        (None, false) => return,
    };
    headers.insert(header::CONNECTION, HeaderValue::from_static(connection));
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request must carry one `Host` header, and no request may carry
/// two. (HTTP/1.0 may leave it out; HTTP/2 names the host in `:authority` instead.)
fn host_is_sound<B>(request: &Request<B>) -> bool {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => false,
        (None, _) => request.version() != Version::HTTP_11,
        (Some(_), None) => true,
    }
}

fn prepare_request_head(
    parts: &mut http::request::Parts,
    client: &ClientAddr,
    scheme: &HeaderValue,
    upgrade: Option<HeaderValue>,
) {
    let headers = &mut parts.headers;
    let accepts_trailers = accepts_trailers(headers);
    remove_hop_by_hop(headers);
    restore_connection_headers(headers, upgrade, accepts_trailers);
    // The client's `Expect: 100-continue` was answered on its own connection when the body
    // was first read; the worker gets the body without having to ask.
    headers.remove(header::EXPECT);
    if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => {
            HeaderValue::from_maybe_shared(Bytes::from(format!("{earlier}, {}", client.ip))).ok()
        }
        None => Some(client.header.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, scheme.clone());
    // An HTTP/1.1 request target is already in origin form (`/path?query`); only an absolute
    // form (HTTP/2's, or a proxy-style request) is rewritten.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let origin_form = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        parts.uri = origin_form
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    // What the client connection attached (its upgrade handle, h2 protocol) is not the
    // worker connection's business.
    parts.extensions = http::Extensions::new();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_is_rewritten_for_the_worker() {
        let request = Request::builder()
            .uri("http://app.example:8080/path?q=1")
            .version(Version::HTTP_2)
            .header("connection", "close, x-secret")
            .header("x-secret", "hop")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("proxy-authorization", "Basic abc")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-app", "kept")
            .header("trailer", "x-checksum")
            .header("expect", "100-continue")
            .body(())
            .expect("valid request");
        let (mut parts, ()) = request.into_parts();
        let client: SocketAddr = "192.0.2.7:5555".parse().expect("address");
        let http = HeaderValue::from_static("http");
        prepare_request_head(&mut parts, &ClientAddr::new(client), &http, None);
        let h = &parts.headers;
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(h["host"], "app.example:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-app"], "kept");
        // End to end (RFC 9110 §6.6.2): an HTTP/1.1 worker is sent the trailers it names.
        assert_eq!(h["trailer"], "x-checksum");
        assert_eq!(parts.uri, "/path?q=1");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn the_client_address_is_written_as_the_header_value() {
        for (client, text) in [
            ("192.0.2.7:5555", "192.0.2.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            ("[::ffff:255.255.255.255]:1", "::ffff:255.255.255.255"),
        ] {
            let client: SocketAddr = client.parse().expect("address");
            let addr = ClientAddr::new(client);
            assert_eq!(addr.header, text);
            assert_eq!(addr.ip, client.ip());
        }
    }

    #[test]
    fn each_hop_by_hop_name_is_found_where_it_is_and_no_other_name_is() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
        }
        for name in [
            "host",
            "trailer",
            "connections",
            "t",
            "x-upgrade",
            "keep-alive-x",
        ] {
            let name = HeaderName::from_static(name);
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
        }
    }

    #[test]
    fn every_connection_header_and_every_name_each_lists_is_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, X-One"),
            ("connection", " ,x-two ,,KEEP-ALIVE"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("x-two", "2 again"),
            ("keep-alive", "timeout=5"),
            ("x-three", "listed nowhere"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        remove_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-three"]);
    }

    #[test]
    fn an_ipv4_address_is_written_as_display_writes_it() {
        // Every octet value in every position (each of 0..=255 in each place, the other
        // places walking through values of one, two and three digits).
        for octet in 0..=255_u8 {
            let other = octet.wrapping_mul(37);
            for ip in [
                Ipv4Addr::new(octet, other, 9, 100),
                Ipv4Addr::new(10, octet, other, 255),
                Ipv4Addr::new(other, 0, octet, 1),
                Ipv4Addr::new(99, other, 250, octet),
            ] {
                let (text, len) = ipv4_text(ip);
                assert_eq!(&text[..len], ip.to_string().as_bytes(), "{ip}");
            }
        }
        let (text, len) = ipv4_text(Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!((&text[..len], len), (&b"255.255.255.255"[..], 15));
    }

    #[test]
    fn te_trailers_is_forwarded_and_nothing_else_of_te() {
        let client: SocketAddr = "192.0.2.7:5555".parse().expect("address");
        for (te, forwarded) in [
            ("trailers", Some("trailers")),
            ("gzip, Trailers", Some("trailers")),
            ("deflate;q=0.5, trailers", Some("trailers")),
            ("gzip", None),
            ("trailersx", None),
        ] {
            let request = Request::builder()
                .uri("/helloworld.Greeter/SayHello")
                .version(Version::HTTP_2)
                .header("te", te)
                .header("connection", "te")
                .body(())
                .expect("valid request");
            let (mut parts, ()) = request.into_parts();
            let http = HeaderValue::from_static("http");
            prepare_request_head(&mut parts, &ClientAddr::new(client), &http, None);
            let sent = parts.headers.get("te").map(|v| v.to_str().expect("ascii"));
            assert_eq!(sent, forwarded, "TE: {te}");
            // An HTTP/1.1 sender of TE lists it in Connection (RFC 9110 §10.1.4).
            let connection = parts
                .headers
                .get("connection")
                .map(|v| v.to_str().expect("ascii"));
            assert_eq!(
                connection,
                forwarded.map(|_| "te"),
                "Connection with TE: {te}"
            );
        }
    }

    #[test]
    fn upgrade_requests_keep_their_upgrade_headers() {
        let request = Request::builder()
            .uri("/chat")
            .header("host", "app")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("valid request");
        let upgrade = upgrade_protocol(&request);
        assert_eq!(upgrade, Some(HeaderValue::from_static("websocket")));
        let (mut parts, ()) = request.into_parts();
        let client = ClientAddr::new("127.0.0.1:1".parse().expect("address"));
        let https = HeaderValue::from_static("https");
        prepare_request_head(&mut parts, &client, &https, upgrade);
        assert_eq!(parts.headers["connection"], "upgrade");
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(parts.headers["host"], "app");
        assert_eq!(parts.headers["x-forwarded-proto"], "https");
    }
}
