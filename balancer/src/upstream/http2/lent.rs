//! A request body lent to hyper for one HTTP/2 stream, so that a request the worker refused
//! unprocessed can be sent again whole, its body included.
//!
//! hyper's HTTP/2 client takes the body of a request it sends and drops it when the stream
//! ends, refused or not. [`Lent`] keeps a copy of each frame it hands out (the data is
//! shared, not copied) up to [`REPLAY_LIMIT`] bytes, and when hyper drops it, gives the copies
//! and the part of the body hyper never took back through a channel. After a refusal the
//! caller awaits them and sends a [`Replayed`] body; a body past the limit (an upload too
//! large to keep) gives nothing back, and its refusal stays final. This is Envoy's retry
//! buffer, for the one case HTTP/2 says is safe to retry.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::body::{BoxError, Replayed, RequestBody};

/// The most bytes of a body kept for sending it again: gRPC messages and form posts fit.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body lent to hyper; see the module docs.
#[derive(Debug)]
pub(crate) struct Lent {
    body: Option<RequestBody>,
    /// Copies of the frames handed out so far; `None` once they passed [`REPLAY_LIMIT`].
    handed_out: Option<VecDeque<Frame<Bytes>>>,
    handed_out_bytes: usize,
    back: Option<oneshot::Sender<Replayed>>,
}

impl Lent {
    /// Lends `body`; the receiver gets it back, as a body to send again, once the lent one
    /// is dropped (unless it grew past the limit).
    pub(crate) fn new(body: RequestBody) -> (Self, oneshot::Receiver<Replayed>) {
        let (back, returned) = oneshot::channel();
        let lent = Self {
            body: Some(body),
            handed_out: Some(VecDeque::new()),
            handed_out_bytes: 0,
            back: Some(back),
        };
        (lent, returned)
    }

    /// The body itself, when hyper hands the request back unsent.
    pub(crate) fn into_inner(mut self) -> RequestBody {
        self.back = None;
        self.body.take().unwrap_or(RequestBody::Empty)
    }

    fn keep_copy(&mut self, frame: &Frame<Bytes>) {
        let Some(handed_out) = &mut self.handed_out else {
            return;
        };
        let bytes = frame.data_ref().map_or(0, Bytes::len);
        self.handed_out_bytes += bytes;
        if self.handed_out_bytes > REPLAY_LIMIT {
            self.handed_out = None;
            return;
        }
        if let Some(data) = frame.data_ref() {
            handed_out.push_back(Frame::data(data.clone()));
        } else if let Some(trailers) = frame.trailers_ref() {
            handed_out.push_back(Frame::trailers(trailers.clone()));
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let (Some(handed_out), Some(back)) = (self.handed_out.take(), self.back.take()) {
            // Nobody waits unless the stream was refused.
            let _ = back.send(Replayed::new(handed_out, self.body.take()));
        }
    }
}

impl Body for Lent {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(body) = &mut this.body else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            this.keep_copy(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn replayed(frames: Vec<Bytes>) -> RequestBody {
        let frames = frames.into_iter().map(Frame::data).collect();
        RequestBody::Replayed(Box::new(Replayed::new(frames, None)))
    }

    #[tokio::test]
    async fn a_dropped_loan_gives_back_what_was_taken_and_what_was_not() {
        let frames = vec![
            Bytes::from("one "),
            Bytes::from("two "),
            Bytes::from("three"),
        ];
        let (mut lent, returned) = Lent::new(replayed(frames));
        let first = lent.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"one ")));
        drop(lent);
        let again = returned.await.expect("given back");
        let whole = again.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"one two three"));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_not_kept() {
        let frames = vec![
            Bytes::from(vec![b'x'; REPLAY_LIMIT]),
            Bytes::from("one more"),
        ];
        let (mut lent, returned) = Lent::new(replayed(frames));
        while lent.frame().await.is_some() {}
        drop(lent);
        assert!(returned.await.is_err(), "nothing to send again");
    }

    #[tokio::test]
    async fn a_body_handed_back_unsent_is_the_body_itself() {
        let (lent, returned) = Lent::new(replayed(vec![Bytes::from("kept")]));
        let body = lent.into_inner();
        assert!(returned.await.is_err(), "not given back twice");
        let whole = body.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"kept"));
    }
}
