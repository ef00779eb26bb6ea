//! The bodies the proxy streams, as concrete types rather than boxes, so that a request
//! allocates none for them: the client's request body on its way to a worker (or sent once
//! more, after an h2c worker refused it unprocessed: the one boxed case), a worker's
//! response body that holds its slot until it has been sent, the idle timeout that gives up
//! on a side that stops sending, and what a client receives (a worker's body or one of the
//! balancer's own short answers).

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::stack::admission::Lease;

/// The error type of bodies the balancer streams.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// A client's request body on its way to a worker.
#[derive(Debug)]
pub(crate) enum RequestBody {
    /// Nothing (most GETs: nothing to limit or time).
    Empty,
    /// The client's body with its pauses bounded by `body_timeout` and its size by
    /// `max_body_bytes`.
    Streamed(Limited<IdleTimeout<Incoming>>),
    /// A body sent once more after an h2c worker refused its stream unprocessed.
    Replayed(Box<Replayed>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Streamed(body) => Pin::new(body).poll_frame(cx),
            Self::Replayed(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Streamed(body) => body.is_end_stream(),
            Self::Replayed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Streamed(body) => body.size_hint(),
            Self::Replayed(body) => body.size_hint(),
        }
    }
}

/// A client's request body as it reaches the proxy: hyper's, or none at all (a request the
/// own HTTP/1 path read, [`lifecycle::http1`]).
pub(crate) trait ClientBody {
    /// The body to send on: its pauses bounded by `timeout`, its size by `max` bytes.
    fn forward(self, timeout: Duration, max: u64) -> RequestBody;
}

impl ClientBody for Incoming {
    fn forward(self, timeout: Duration, max: u64) -> RequestBody {
        if self.is_end_stream() {
            // No body (most GETs): nothing to limit or time, and no timer to arm.
            RequestBody::Empty
        } else {
            let body = IdleTimeout::new(self, Sender::Client, timeout);
            RequestBody::Streamed(Limited::new(
                body,
                usize::try_from(max).unwrap_or(usize::MAX),
            ))
        }
    }
}

impl ClientBody for () {
    fn forward(self, _: Duration, _: u64) -> RequestBody {
        RequestBody::Empty
    }
}

/// A request body sent again: copies of the frames the first sending took, then what it had
/// not taken yet.
#[derive(Debug)]
pub(crate) struct Replayed {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<RequestBody>,
}

impl Replayed {
    pub(crate) fn new(frames: VecDeque<Frame<Bytes>>, rest: Option<RequestBody>) -> Self {
        Self { frames, rest }
    }
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let copied: u64 = self
            .frames
            .iter()
            .filter_map(|frame| frame.data_ref())
            .map(|data| data.len() as u64)
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(copied));
        }
        hint.set_lower(rest.lower().saturating_add(copied));
        hint
    }
}

/// What a client receives: a worker's body streamed through, or one of the balancer's own
/// (a refusal's text, or nothing after an upgrade).
pub(crate) type ResponseBody<B> = Either<B, Full<Bytes>>;

/// A worker's response body that holds its worker slot until it has been sent or dropped.
#[derive(Debug)]
pub(crate) struct Leased<B> {
    inner: B,
    _lease: Lease,
}

impl<B> Leased<B> {
    pub(crate) fn new(inner: B, lease: Lease) -> Self {
        Self {
            inner,
            _lease: lease,
        }
    }
}

impl<B> Body for Leased<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Which end of the proxy stopped sending a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    /// The client, uploading a request body.
    Client,
    /// The worker, sending a response body.
    Worker,
}

/// A body's sender sent nothing for longer than its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the {} sent nothing of its body for {after:?}", match .from {
    Sender::Client => "client",
    Sender::Worker => "worker",
})]
pub(crate) struct BodyTimeout {
    pub(crate) from: Sender,
    pub(crate) after: Duration,
}

/// A body that fails with [`BodyTimeout`] when no frame arrives for `timeout`, so a client
/// that stalls its upload, or a worker that stalls its response, cannot hold a worker slot
/// for ever.
///
/// The timer is armed only when the body actually has to wait: a body whose frames are
/// already buffered (most small ones) never touches the timer wheel.
#[derive(Debug)]
pub(crate) struct IdleTimeout<B> {
    inner: B,
    from: Sender,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the timer was set: push its deadline on the next wait.
    stale: bool,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, from: Sender, timeout: Duration) -> Self {
        Self {
            inner,
            from,
            timeout,
            sleep: None,
            stale: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(frame)) => {
                this.stale = true;
                Poll::Ready(Some(frame.map_err(Into::into)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = Instant::now() + this.timeout;
                let sleep = match &mut this.sleep {
                    Some(sleep) => {
                        if this.stale {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.stale = false;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout {
                        from: this.from,
                        after: this.timeout,
                    }
                    .into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use http_body_util::channel::Channel;

    #[tokio::test]
    async fn a_replayed_body_gives_the_copied_frames_then_the_rest() {
        let copied = VecDeque::from([
            Frame::data(Bytes::from_static(b"hel")),
            Frame::data(Bytes::from_static(b"lo")),
        ]);
        let rest = RequestBody::Replayed(Box::new(Replayed::new(
            VecDeque::from([Frame::data(Bytes::from_static(b", world"))]),
            Some(RequestBody::Empty),
        )));
        let body = Replayed::new(copied, Some(rest));
        assert_eq!(body.size_hint().exact(), Some(12));
        assert!(!body.is_end_stream());
        let whole = body.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"hello, world"));
        assert!(Replayed::new(VecDeque::new(), None).is_end_stream());
        assert!(RequestBody::Empty.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_a_steady_one_does_not() {
        let (mut tx, channel) = Channel::<Bytes>::new(4);
        let mut body = IdleTimeout::new(channel, Sender::Client, Duration::from_secs(5));
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(4)).await;
            tx.send_data(Bytes::from_static(b"x")).await.expect("open");
            let frame = body.frame().await.expect("a frame").expect("data");
            assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"x")));
        }
        // Nothing more is sent: the paused clock runs to the timeout.
        let stalled = body.frame().await.expect("an error frame");
        let error = stalled.expect_err("timed out");
        let timeout = error.downcast_ref::<BodyTimeout>().expect("a body timeout");
        assert_eq!(timeout.from, Sender::Client);
        drop(tx);
    }
}
