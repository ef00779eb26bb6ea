//! Squall's own HTTP/1 server path, for the requests a proxy sees most: those without a
//! body.
//!
//! hyper's HTTP/1 connection is general, and pays for it on every request: a dispatcher
//! between the connection and the service, a timer armed and disarmed per request head, and
//! a read buffer made anew per request (hyper's check for the client closing reserves room
//! while the request in flight still shares the buffer). On a proxy's request path that was
//! about a third of the instructions per request (`bench/proxy/instructions`).
//!
//! The own path reads request heads itself. A head without a body is parsed here (by httparse,
//! as hyper parses it) and handed to the service's [`Bodiless`] side; its response is
//! written here, framed as hyper frames it. Everything else (a request with a body, an
//! upgrade, `CONNECT`, a head that does not parse, or one too large) goes to hyper: the
//! connection, with the bytes already read put back in front, is served by hyper from that
//! request on, so hyper answers it as it always has, errors included.
//!
//! What it keeps of hyper's behaviour:
//! - the header-read timeout runs from the start of every head, idle keep-alive included;
//!   here it is one timer per connection, pushed out only when it fires early;
//! - a client that closes its side while its request is in flight has left: the request's
//!   future is dropped (the balancer's admission queue relies on this). A connection that has
//!   never had to wait is not in the runtime's event loop yet ([`crate::Stream`]), and
//!   watching it would put it there; its answer gets `WATCH_AFTER` (10 ms) to come first, so a
//!   request answered that fast costs no registration, and a client that leaves is seen at
//!   most that much later;
//! - keep-alive as RFC 9112 §9.3 has it, `Connection: close` sent where the connection
//!   closes, HTTP/1.0 answered as HTTP/1.0;
//! - a drain closes an idle connection at once and a busy one after its response;
//! - a response body that fails, or ends short of its length, ends the connection.

pub(crate) mod head;
mod output;
#[cfg(test)]
mod tests;

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::server::conn::auto::HttpServerConnExec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use self::head::{Asked, Framing, Length, Parsed, Spans};
use self::output::{COPY_MAX, Output};
use crate::Transport;
use crate::first_byte::FirstByte;
use crate::protocols::{BoxError, Protocol, Protocols};

/// The side of a service that answers body-less HTTP/1 requests (see the module docs): the
/// request comes with `()` for a body, and the answer is always a response.
pub trait Bodiless {
    /// The response body.
    type ResponseBody: Body<Data = Bytes> + Send + 'static;
    /// What [`Bodiless::call_bodiless`] gives.
    type Answer: Future<Output = Response<Self::ResponseBody>> + Send + 'static;

    /// Answers `request`.
    fn call_bodiless(&self, request: Request<()>) -> Self::Answer;
}

/// A connection's bounds on request heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Time allowed from the start of a head to its end.
    pub(crate) header_read_timeout: Duration,
    /// The largest head, in bytes.
    pub(crate) max_head: usize,
}

/// Each read asks for at least this much room, and a connection's buffer starts this big.
const READ_SIZE: usize = 8 * 1024;

/// A read with less room than this left in the buffer first makes [`READ_SIZE`] more.
const MIN_ROOM: usize = 1024;

/// While a request is in flight, the client is watched with reads of at most this much.
const WATCH_SIZE: usize = 1024;

/// How long an answer may take before the client of a connection not yet in the event loop
/// is watched (see the module docs): far longer than a nearby worker takes to answer, far
/// shorter than anyone waits for.
const WATCH_AFTER: Duration = Duration::from_millis(10);

/// Body is written once this much is queued, rather than queueing more.
const WRITE_AT: usize = 64 * 1024;

/// Serves the HTTP/1 connection `io` with `service` as the module docs say, until it
/// closes, or, once `drain` changes, after its current response.
pub(crate) async fn serve<I, S, B, E>(
    protocols: Arc<Protocols<E>>,
    io: FirstByte<I>,
    service: S,
    mut drain: watch::Receiver<()>,
    bounds: Bounds,
) -> Result<(), BoxError>
where
    I: Transport,
    S: Service<Request<Incoming>, Response = Response<B>>
        + Bodiless<ResponseBody = B>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
{
    let mut connection = Connection {
        io,
        buf: BytesMut::with_capacity(READ_SIZE),
        output: Output::default(),
        spans: Spans::new(),
        timer: None,
        bounds,
    };
    loop {
        let (request, asked) = match connection.next_request(&mut drain).await? {
            Next::Request(request, asked) => (request, asked),
            Next::Closed => return Ok(()),
            Next::Hyper => {
                let Connection { mut io, buf, .. } = connection;
                io.unread(buf);
                return protocols
                    .serve(Protocol::Http1, true, io, service, drain)
                    .await;
            }
        };
        let answered = {
            // Pinned here, in this future's own state: a future of the service's is large,
            // and every move of it is a copy.
            let answering = pin!(service.call_bodiless(request));
            connection.answer(answering).await
        };
        let Some(response) = answered else {
            tracing::debug!("the client closed its connection while its request was in flight");
            return Ok(());
        };
        // A drain (or a dropped sender) lets the response finish, then closes.
        let keep_alive = asked.keep_alive && !drain.has_changed().unwrap_or(true);
        if !connection.respond(response, &asked, keep_alive).await? {
            // Shutting down the write side may fail on a connection already broken;
            // either way it closes when dropped.
            let _ = poll_fn(|cx| Pin::new(&mut connection.io).poll_shutdown(cx)).await;
            return Ok(());
        }
    }
}

/// What comes next on a connection.
#[expect(
    clippy::large_enum_variant,
    reason = "a box would be an allocation per request; the value is moved once"
)]
enum Next {
    /// A body-less request, and what to remember of it.
    Request(Request<()>, Asked),
    /// The connection is done: the client closed it between requests, or it was idle when
    /// drained.
    Closed,
    /// A request for hyper, in the buffer.
    Hyper,
}

struct Connection<I> {
    io: FirstByte<I>,
    /// Bytes read and not yet parsed. Requests share its memory while they live; once they
    /// are gone it is reused.
    buf: BytesMut,
    output: Output,
    /// Scratch space for parsing heads.
    spans: Spans,
    /// The connection's one timer (header reads, and the wait before a client is watched),
    /// made the first time it is needed.
    timer: Option<Pin<Box<Sleep>>>,
    bounds: Bounds,
}

impl<I: Transport> Connection<I> {
    /// Reads until a whole head is buffered, the client closes, the header-read timeout
    /// passes (an error) or, while nothing is buffered, `drain` changes.
    async fn next_request(&mut self, drain: &mut watch::Receiver<()>) -> io::Result<Next> {
        let mut deadline = None;
        // How much of the buffer is known to hold no end of a head: a head that comes in
        // pieces is parsed once it has ended, not again from its start at every piece.
        let mut scanned = 0;
        loop {
            if head::may_end(&self.buf, scanned) {
                match head::parse(&mut self.buf, &mut self.spans) {
                    Parsed::Request(request, asked) => return Ok(Next::Request(request, asked)),
                    Parsed::Hyper => return Ok(Next::Hyper),
                    Parsed::Partial => {}
                }
            }
            scanned = self.buf.len();
            if self.buf.len() >= self.bounds.max_head {
                // Too large: hyper refuses it (with 431).
                return Ok(Next::Hyper);
            }
            let due =
                *deadline.get_or_insert_with(|| Instant::now() + self.bounds.header_read_timeout);
            let (io, buf) = (&mut self.io, &mut self.buf);
            tokio::select! {
                biased;
                read = poll_fn(|cx| read_into(io, buf, cx)) => {
                    if read? == 0 {
                        return Ok(Next::Closed);
                    }
                }
                () = Deadline { timer: &mut self.timer, due } => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no whole request head within the header-read timeout",
                    ));
                }
                // Idle, or with a head only begun: closed at once, as hyper does.
                _ = drain.changed() => return Ok(Next::Closed),
            }
        }
    }

    /// Runs `future` to its end while watching the client: `None` if the client closed
    /// its side (or the connection broke) first, while nothing else of it was buffered.
    async fn answer<F: Future>(&mut self, mut future: Pin<&mut F>) -> Option<F::Output> {
        if !self.io.in_event_loop() {
            let mut wait = Deadline {
                timer: &mut self.timer,
                due: Instant::now() + WATCH_AFTER,
            };
            let quick = poll_fn(|cx| {
                if let Poll::Ready(output) = future.as_mut().poll(cx) {
                    return Poll::Ready(Some(output));
                }
                Pin::new(&mut wait).poll(cx).map(|()| None)
            })
            .await;
            if quick.is_some() {
                return quick;
            }
        }
        let (io, buf) = (&mut self.io, &mut self.buf);
        poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            watch_client(io, buf, cx).map(|()| None)
        })
        .await
    }

    /// Writes `response` to a request `asked`; whether the connection may serve another.
    async fn respond<B>(
        &mut self,
        response: Response<B>,
        asked: &Asked,
        keep_alive: bool,
    ) -> Result<bool, BoxError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = response.into_parts();
        let mut length = if body.is_end_stream() {
            Length::Empty
        } else {
            body.size_hint()
                .exact()
                .map_or(Length::Unknown, Length::Exact)
        };
        let informational = parts.status.is_informational();
        if informational && parts.status != StatusCode::SWITCHING_PROTOCOLS {
            // A 1xx cannot be the final response (hyper answers one with an empty 500 and
            // closes the connection, and so does this path).
            tracing::warn!(status = %parts.status, "a 1xx response cannot be sent as the answer; sending 500");
            parts = Response::new(()).into_parts().0;
            parts.status = StatusCode::INTERNAL_SERVER_ERROR;
            length = Length::Empty;
        }
        let room = match length {
            Length::Exact(n) => usize::try_from(n).map_or(0, |n| if n <= COPY_MAX { n } else { 0 }),
            _ => 0,
        };
        let encoded = head::encode(
            self.output.buf(),
            parts.status,
            &parts.headers,
            asked,
            length,
            keep_alive && !informational,
            room,
        );
        drop(parts);
        let whole = match encoded.framing {
            // Not polled: what it has is not sent (nor anything of a 500 put in its place).
            Framing::None => true,
            _ if length == Length::Empty => self.end_body(encoded.framing, 0, None)?,
            framing => {
                let trailers = encoded.trailers.as_deref();
                self.send_body(pin!(body), framing, trailers).await?
            }
        };
        let again = encoded.keep_alive && whole;
        if !again {
            // The shutdown follows this write at once: the end of the response and the
            // close may leave in one packet.
            self.io.last_write();
        }
        let (output, io) = (&mut self.output, &mut self.io);
        poll_fn(|cx| output.poll_write_all(io, cx)).await?;
        poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx)).await?;
        Ok(again)
    }

    /// Sends `body` framed as `framing` (not [`Framing::None`]), writing as it goes, and
    /// those of its trailers that `trailers` names (and may be sent at all) if it is
    /// chunked; whether the connection is still fit for another request (a body delimited
    /// by the close is not).
    async fn send_body<B>(
        &mut self,
        mut body: Pin<&mut B>,
        framing: Framing,
        trailers: Option<&[HeaderName]>,
    ) -> Result<bool, BoxError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => u64::MAX,
        };
        let mut ending: Option<HeaderMap> = None;
        loop {
            let (output, io) = (&mut self.output, &mut self.io);
            let frame = poll_fn(|cx| {
                if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                    let frame = frame.map(|frame| frame.map_err(Into::<BoxError>::into));
                    return Poll::Ready(Ok::<_, io::Error>(frame));
                }
                // Nothing more for now: send what there is meanwhile.
                ready!(output.poll_write_all(io, cx))?;
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                Poll::Pending
            })
            .await?;
            let Some(frame) = frame else {
                break;
            };
            let frame = frame?;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => match framing {
                    Framing::Chunked => self.output.push_chunk(data),
                    _ => {
                        let n = data.len() as u64;
                        if n > left {
                            return Err("the response body is longer than its length".into());
                        }
                        left -= n;
                        self.output.push(data);
                    }
                },
                Err(frame) => {
                    if let (Ok(fields), Some(named)) = (frame.into_trailers(), trailers) {
                        let ending = ending.get_or_insert_with(HeaderMap::new);
                        let mut current = None;
                        for (name, value) in fields {
                            current = name.or(current);
                            if let Some(name) = &current
                                && named.contains(name)
                                && head::trailer_allowed(name)
                            {
                                ending.append(name.clone(), value);
                            }
                        }
                    }
                }
            }
            if self.output.len() >= WRITE_AT {
                let (output, io) = (&mut self.output, &mut self.io);
                poll_fn(|cx| output.poll_write_all(io, cx)).await?;
            }
        }
        self.end_body(framing, left, ending.as_ref())
    }

    /// Ends a body framed as `framing`, with `left` bytes of its length unsent and `trailers`
    /// to end a chunked one; whether the connection is still fit for another request.
    fn end_body(
        &mut self,
        framing: Framing,
        left: u64,
        trailers: Option<&HeaderMap>,
    ) -> Result<bool, BoxError> {
        match framing {
            Framing::Chunked => self.output.push_last_chunk(trailers),
            Framing::Length(_) if left != 0 => {
                return Err("the response body ended short of its length".into());
            }
            Framing::Close => return Ok(false),
            _ => {}
        }
        Ok(true)
    }
}

/// Reads more of the connection into `buf`, with room for [`READ_SIZE`] bytes (taking its
/// memory back if no request shares it any more); the count read, 0 at its end.
fn read_into<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < MIN_ROOM {
        buf.reserve(READ_SIZE);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Watches a client whose request is in flight: `Ready` once it has closed its side or its
/// connection has broken. Only while nothing of a next request is buffered: once something
/// is, it is left unread until the response has been sent, and a close after it is seen
/// then (as hyper does; a client that sends pipelined requests and closes its side gets
/// all its answers).
fn watch_client<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if !buf.is_empty() {
        return Poll::Pending;
    }
    // Not read into `buf`: the request in flight shares its memory, so making room there
    // would allocate anew.
    let mut space = [MaybeUninit::<u8>::uninit(); WATCH_SIZE];
    let mut read = ReadBuf::uninit(&mut space);
    match ready!(Pin::new(&mut *io).poll_read(cx, &mut read)) {
        Ok(()) if read.filled().is_empty() => Poll::Ready(()),
        Ok(()) => {
            buf.extend_from_slice(read.filled());
            Poll::Pending
        }
        Err(_) => Poll::Ready(()),
    }
}

/// Ready once `due` has passed, on a connection's one timer: made at the first wait, and
/// moved only when it fires for an earlier deadline than `due` or `due` is sooner than its.
struct Deadline<'a> {
    timer: &'a mut Option<Pin<Box<Sleep>>>,
    due: Instant,
}

impl Future for Deadline<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let due = this.due;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() > due {
            // Sooner than the timer's deadline (a head's timer is never that: each head's
            // deadline is later than the last).
            timer.as_mut().reset(due);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= due {
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
    }
}
