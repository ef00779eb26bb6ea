//! The balancer's own HTTP/1.1 client to workers, for requests without a body that ask for
//! no upgrade (most GETs): the request's own task writes the head and reads the answer on
//! the worker connection, with no connection task between them.
//!
//! Through hyper's client, every request crossed to the connection's task and back (a
//! dispatch channel, a oneshot for the answer, a channel for the body, and a wake-up of each
//! task at each step). Here the exchange ([`Exchange`]) writes the head, reads the response
//! head ([`super::wire`]) and hands back a [`Body`] that reads the rest straight from the
//! socket when the client's connection polls it; the connection goes back to its [`Pool`]
//! once the body has been read to the end. The read buffer and the head buffer live with
//! the connection and are reused: a small answer costs no allocation for them.
//!
//! Requests with a body, upgrades and `CONNECT` still go through hyper's client
//! ([`super::http1`]), which streams a body while it reads the answer.
//!
//! A read that has to wait for the rest of an answer first acknowledges what came, so that
//! a worker whose next bytes wait for that acknowledgement does not stall until the kernel's
//! delayed-ACK timer ([`super::acking`]).
//!
//! A connection idle in the pool is not watched by any task: taking it polls its socket once
//! (no system call unless the socket reported something since) and drops it if the worker
//! closed it or sent anything unasked. A worker that closes it just as a request goes out is
//! the keep-alive race, which [`super::http1`] handles as it does for hyper's connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::acking;
use super::closing::{Closable, Closing};
use super::wire::{self, Chunked, Decoded, Framing, Parsed, WireError};
use super::{ConnectError, connect_tcp, shard_index};

/// How much room a read into a connection's buffer asks for at first; it doubles, up to
/// [`BODY_READ_MAX`], each time a read fills all the room it had (a worker sending large
/// answers), so that a large answer comes in few reads and reaches the client in few
/// frames.
const READ_SIZE: usize = 8 * 1024;
/// The most a read of a long body takes at once, straight into the buffer it is sent from.
const BODY_READ_MAX: usize = 64 * 1024;

/// Whether `request` goes over the balancer's own client: it has no body, and it is not an
/// upgrade or a `CONNECT`, which hand the connection over.
pub(crate) fn suits<B: http_body::Body>(request: &Request<B>) -> bool {
    request.body().is_end_stream()
        && request.method() != Method::CONNECT
        && !request.headers().contains_key(http::header::UPGRADE)
}

/// One keep-alive connection to a worker, with its buffers.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: Closable<TcpStream>,
    /// What has been read and not yet consumed.
    buf: BytesMut,
    /// The request head being written.
    out: Vec<u8>,
    /// How much room the next read asks for (see [`READ_SIZE`]).
    read_size: usize,
    /// Bytes of the answer have been read since the socket last had to wait for more, so
    /// their acknowledgement may still be held back (see [`Conn::poll_read`]).
    unacked: bool,
}

impl Conn {
    /// Opens a connection to `addr` (see [`connect_tcp`]).
    pub(crate) async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        closing: &Closing,
    ) -> Result<Self, ConnectError> {
        let stream = connect_tcp(addr, timeout, closing).await?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_SIZE),
            read_size: READ_SIZE,
            out: Vec::new(),
            unacked: false,
        })
    }

    /// Whether the connection is still open with nothing unread: one poll of the socket,
    /// which makes no system call unless it reported an event since the last read.
    fn is_open_and_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.buf.reserve(READ_SIZE);
        poll_read_buf(Pin::new(&mut self.stream), &mut cx, &mut self.buf).is_pending()
    }

    /// Reads what the socket has into the buffer: the count read, 0 at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        let read = ready!(Self::poll_read(
            &mut self.stream,
            &mut self.unacked,
            cx,
            &mut self.buf
        ))?;
        if read == room {
            self.read_size = (self.read_size * 2).min(BODY_READ_MAX);
        }
        Poll::Ready(Ok(read))
    }

    /// Reads part of an answer into `buf`; when the socket has nothing more yet, first
    /// acknowledges what came, once per wait ([`super::acking`]). Only reads of an answer
    /// come here, so an answer that comes in one read makes no system call for it.
    fn poll_read(
        stream: &mut Closable<TcpStream>,
        unacked: &mut bool,
        cx: &mut Context<'_>,
        buf: &mut impl BufMut,
    ) -> Poll<io::Result<usize>> {
        match poll_read_buf(Pin::new(&mut *stream), cx, buf) {
            Poll::Pending => {
                if std::mem::take(unacked) {
                    acking::acknowledge(stream);
                }
                Poll::Pending
            }
            Poll::Ready(Ok(read)) => {
                *unacked = read > 0;
                Poll::Ready(Ok(read))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

/// A worker's idle connections, sharded by thread like [`super::http1`]'s.
#[derive(Debug)]
pub(crate) struct Pool {
    max_per_shard: usize,
    /// Set once the worker left the pool: no connection is kept any more.
    closed: AtomicBool,
    shards: Box<[Mutex<Vec<Conn>>]>,
}

impl Pool {
    /// An empty pool keeping at most `max_per_shard` idle connections in each of `shards`.
    pub(crate) fn new(max_per_shard: usize, shards: usize) -> Self {
        Self {
            max_per_shard,
            closed: AtomicBool::new(false),
            shards: (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Conn>> {
        let shard = &self.shards[shard_index() % self.shards.len()];
        // A list of idle connections stays usable after a panic elsewhere.
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection that is still open; closed ones met on the
    /// way are dropped.
    pub(crate) fn take(&self) -> Option<Conn> {
        loop {
            let mut conn = self.lock().pop()?;
            if conn.is_open_and_idle() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request, unless the pool is full or closed.
    fn put(&self, conn: Conn) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut conns = self.lock();
        if conns.len() < self.max_per_shard {
            conns.push(conn);
        }
    }

    /// Closes every idle connection, and keeps none from now on: the worker left the pool.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.clear();
    }

    /// Closes every idle connection.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }
}

/// Why an exchange produced no response head, and how far it got.
#[derive(Debug)]
pub(crate) struct Failure {
    /// No byte of the request was written: it reached nobody.
    pub(crate) unsent: bool,
    /// The connection closed, reset or broke before the whole response head came.
    pub(crate) before_answer: bool,
    pub(crate) error: WireError,
}

/// Writing one request's head and reading the response head; see the module docs.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// Taken when the answer comes.
    conn: Option<Conn>,
    written: usize,
    /// How much of the read buffer has been searched for the end of the head.
    scanned: usize,
    method: Method,
    /// Whether any byte of the answer has arrived.
    answering: bool,
    pool: Arc<Pool>,
}

impl Exchange {
    /// Starts sending `request` (which has no body: [`suits`]) on `conn`, whose idle
    /// connections go back to `pool`.
    pub(crate) fn new<B>(mut conn: Conn, request: &Request<B>, pool: &Arc<Pool>) -> Self {
        wire::encode_head(request, &mut conn.out);
        // The request carries the acknowledgement of everything read before it; the wait
        // for its answer holds nothing back.
        conn.unacked = false;
        Self {
            conn: Some(conn),
            written: 0,
            scanned: 0,
            method: request.method().clone(),
            answering: false,
            pool: Arc::clone(pool),
        }
    }

    fn failed(&mut self, error: WireError, before_answer: bool) -> Poll<<Self as Future>::Output> {
        self.conn = None;
        Poll::Ready(Err(Failure {
            unsent: self.written == 0,
            before_answer,
            error,
        }))
    }
}

/// Whether an I/O error means the peer closed or reset the connection.
fn closed(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

impl Future for Exchange {
    type Output = Result<Response<Body>, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            // Only reachable if polled again after it completed.
            return Poll::Pending;
        };
        while this.written < conn.out.len() {
            let rest = &conn.out[this.written..];
            match ready!(Pin::new(&mut conn.stream).poll_write(cx, rest)) {
                Ok(0) => {
                    return this.failed(WireError::Write(io::ErrorKind::WriteZero.into()), true);
                }
                Ok(n) => this.written += n,
                Err(error) => {
                    let before_answer = closed(&error);
                    return this.failed(WireError::Write(error), before_answer);
                }
            }
        }
        loop {
            if !conn.buf.is_empty() {
                match wire::parse_head(&mut conn.buf, &mut this.scanned, &this.method) {
                    Ok(None) => {}
                    Ok(Some(Parsed::Informational)) => continue,
                    Ok(Some(Parsed::Final {
                        response,
                        framing,
                        keep_alive,
                    })) => {
                        let Some(conn) = this.conn.take() else {
                            return Poll::Pending;
                        };
                        let body = Body::new(conn, framing, keep_alive, Arc::clone(&this.pool));
                        return Poll::Ready(Ok(response.map(|()| body)));
                    }
                    Err(error) => return this.failed(error, false),
                }
            }
            // A connection that ends before the whole head has come lost the request (as
            // through hyper's client: the worker died, or closed a reused connection as the
            // request went out); one that fails any other way failed the exchange.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.answering => return this.failed(WireError::ClosedInHead, true),
                Ok(0) => return this.failed(WireError::Closed, true),
                Ok(_) => this.answering = true,
                Err(error) => {
                    let before_answer = closed(&error);
                    return this.failed(WireError::Read(error), before_answer);
                }
            }
        }
    }
}

/// A response body read straight from the worker's connection, which goes back to its pool
/// once the body has been read to the end (and is closed if the body is dropped before).
#[derive(Debug)]
pub(crate) struct Body {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// Where a long body's next bytes are read, to be sent without a copy.
    long: BytesMut,
}

#[derive(Debug)]
enum State {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl Body {
    fn new(conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<Pool>) -> Self {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::Chunked(Chunked::default()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            state,
            keep_alive,
            pool,
            long: BytesMut::new(),
        };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body has been read to the end: the connection is idle again, and goes back to
    /// the pool if it may carry another request and nothing more was sent on it.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }

    fn fail(&mut self, error: WireError) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }

    /// The next bytes of a body delimited by its length (`remaining`, if any) or by the end
    /// of the connection: what is buffered (shared with the buffer, which is the
    /// connection's alone again once they have been sent); else a read straight into a
    /// buffer of their own when much is still to come. `Ok(None)` at the end of the
    /// connection.
    fn poll_bytes(
        conn: &mut Conn,
        long: &mut BytesMut,
        remaining: Option<u64>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let limit = remaining.map_or(usize::MAX, |r| usize::try_from(r).unwrap_or(usize::MAX));
        if !conn.buf.is_empty() {
            let take = limit.min(conn.buf.len());
            return Poll::Ready(Ok(Some(conn.buf.split_to(take).freeze())));
        }
        if limit < READ_SIZE {
            return match ready!(conn.poll_fill(cx))? {
                0 => Poll::Ready(Ok(None)),
                _ => Self::poll_bytes(conn, long, remaining, cx),
            };
        }
        let want = limit.min(BODY_READ_MAX);
        if long.capacity() < READ_SIZE {
            // The last read's bytes are on their way out in a buffer of their own.
            long.reserve(want);
        }
        let room = want.min(long.capacity());
        let read = ready!(Conn::poll_read(
            &mut conn.stream,
            &mut conn.unacked,
            cx,
            &mut (&mut *long).limit(room)
        ))?;
        if read == 0 {
            return Poll::Ready(Ok(None));
        }
        Poll::Ready(Ok(Some(long.split().freeze())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        match &mut this.state {
            State::Done => Poll::Ready(None),
            State::Length(remaining) => {
                match ready!(Self::poll_bytes(conn, &mut this.long, Some(*remaining), cx)) {
                    Ok(Some(bytes)) => {
                        *remaining -= bytes.len() as u64;
                        if *remaining == 0 {
                            this.finish();
                        }
                        Poll::Ready(Some(Ok(Frame::data(bytes))))
                    }
                    Ok(None) => this.fail(WireError::ClosedInBody),
                    Err(error) => this.fail(WireError::Read(error)),
                }
            }
            State::UntilClose => match ready!(Self::poll_bytes(conn, &mut this.long, None, cx)) {
                Ok(Some(bytes)) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Err(error) => this.fail(WireError::Read(error)),
            },
            State::Chunked(chunked) => loop {
                match chunked.decode(&mut conn.buf) {
                    Ok(Decoded::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                    Ok(Decoded::Trailers(trailers)) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => match ready!(conn.poll_fill(cx)) {
                        Ok(0) => return this.fail(WireError::ClosedInBody),
                        Ok(_) => {}
                        Err(error) => return this.fail(WireError::Read(error)),
                    },
                    Err(error) => return this.fail(error),
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(remaining) => SizeHint::with_exact(remaining),
            State::Chunked(_) | State::UntilClose => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
