//! A request body lent to hyper for one sending, so that a request that reached no
//! application, or whose worker was lost before it answered, can be sent again whole, its
//! body included.
//!
//! hyper's clients take the body of a request they send and drop it when they are done with
//! it, sent or not. [`Lent`] copies the data of each frame it hands out into one buffer of at
//! most [`REPLAY_LIMIT`] bytes (a copy, not a share of hyper's read buffers, so that a client
//! sending many tiny frames costs no more than the bytes themselves and pins none of those
//! buffers), and keeps the trailers. When hyper drops it, it gives the copy and the part of
//! the body hyper never took back through a channel. After a failure that allows sending
//! again, the caller awaits them and sends a [`Replayed`] body; a body past the limit (an
//! upload too large to keep) gives nothing back, and the failure stays final. Once the
//! worker's response head arrived the request can no longer be sent again, so the [`Lender`]
//! drops the copy then, and nothing more of the body is copied. This is Envoy's retry buffer.
//!
//! A body that may not be sent again (a request that is not idempotent) is lent
//! [`Lent::plain`]: nothing is copied and nothing allocated.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::body::{BoxError, Replayed, RequestBody};

/// The most bytes of a body kept for sending it again: gRPC messages and form posts fit.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// What a loan has copied of the body so far; `None` once it went past [`REPLAY_LIMIT`] or
/// the worker answered.
type Kept = Arc<Mutex<Option<Copies>>>;

#[derive(Debug, Default)]
struct Copies {
    /// The data of every frame handed out, in one buffer that never grows past the limit.
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
}

fn lock(kept: &Kept) -> MutexGuard<'_, Option<Copies>> {
    // Held only to copy a frame or drop the copies: what a panic left is as good as any.
    kept.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request body lent to hyper; see the module docs.
#[derive(Debug)]
pub(crate) struct Lent {
    body: Option<RequestBody>,
    /// `None` for a plain loan, which keeps nothing.
    kept: Option<Kept>,
    /// Whether `kept` may still take copies: cleared once it is found `None`, so that the
    /// rest of a large body takes no lock.
    keeping: bool,
    back: Option<oneshot::Sender<Replayed>>,
}

/// The lender's side of a [`Lent`] body.
#[derive(Debug)]
pub(crate) struct Lender {
    kept: Kept,
    returned: oneshot::Receiver<Replayed>,
}

impl Lender {
    /// The worker's response head arrived: the stream can no longer be refused, so the copies
    /// go now, and no more are made.
    pub(crate) fn answered(self) {
        lock(&self.kept).take();
    }

    /// The body given back, as a body to send again, once hyper dropped the lent one; an
    /// error if it grew past the limit.
    pub(crate) fn returned(self) -> oneshot::Receiver<Replayed> {
        self.returned
    }
}

impl Lent {
    /// Lends `body`; the lender gets it back, as a body to send again, once the lent one is
    /// dropped (unless it grew past the limit, or the worker answered).
    pub(crate) fn new(body: RequestBody) -> (Self, Lender) {
        let (back, returned) = oneshot::channel();
        let kept = Arc::new(Mutex::new(Some(Copies::default())));
        let lent = Self {
            body: Some(body),
            kept: Some(Arc::clone(&kept)),
            keeping: true,
            back: Some(back),
        };
        (lent, Lender { kept, returned })
    }

    /// Lends `body` keeping nothing: it cannot be sent again.
    pub(crate) fn plain(body: RequestBody) -> Self {
        Self {
            body: Some(body),
            kept: None,
            keeping: false,
            back: None,
        }
    }

    /// The body itself, when hyper hands the request back unsent.
    pub(crate) fn into_inner(mut self) -> RequestBody {
        self.back = None;
        self.body.take().unwrap_or(RequestBody::Empty)
    }

    fn keep_copy(&mut self, frame: &Frame<Bytes>) {
        if !self.keeping {
            return;
        }
        let Some(kept) = &self.kept else {
            return;
        };
        let mut kept = lock(kept);
        let Some(copies) = kept.as_mut() else {
            self.keeping = false;
            return;
        };
        if let Some(data) = frame.data_ref() {
            let len = copies.data.len() + data.len();
            if len > REPLAY_LIMIT {
                *kept = None;
                self.keeping = false;
                return;
            }
            if len > copies.data.capacity() {
                // Doubling, but never past the limit.
                let capacity = (copies.data.capacity() * 2).clamp(len, REPLAY_LIMIT);
                copies.data.reserve_exact(capacity - copies.data.len());
            }
            copies.data.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            copies.trailers = Some(trailers.clone());
        }
    }

    /// How many bytes the copies take now.
    #[cfg(test)]
    fn kept_capacity(&self) -> Option<usize> {
        lock(self.kept.as_ref()?)
            .as_ref()
            .map(|copies| copies.data.capacity())
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let (Some(back), Some(kept)) = (self.back.take(), &self.kept) else {
            return;
        };
        let Some(copies) = lock(kept).take() else {
            return;
        };
        let mut frames = VecDeque::new();
        if !copies.data.is_empty() {
            frames.push_back(Frame::data(Bytes::from(copies.data)));
        }
        if let Some(trailers) = copies.trailers {
            frames.push_back(Frame::trailers(trailers));
        }
        // Nobody waits unless the stream was refused.
        let _ = back.send(Replayed::new(frames, self.body.take()));
    }
}

/// What one sending keeps so that its request can be sent again.
#[derive(Debug)]
pub(crate) enum Resend {
    /// Nothing: the request may not be sent again.
    Never,
    /// A copy of a request without a body.
    Copy(Request<RequestBody>),
    /// The request's head, and the lender its lent body comes back to.
    Lent { head: Request<()>, lender: Lender },
}

impl Resend {
    /// The request to hand hyper, and what to keep: a copy of a bodiless request, or a loan
    /// of the body, when `may_resend`; nothing otherwise.
    pub(crate) fn lend(request: Request<RequestBody>, may_resend: bool) -> (Request<Lent>, Self) {
        if !may_resend {
            return (request.map(Lent::plain), Self::Never);
        }
        if request.body().is_end_stream() {
            let copy = head_of(&request).map(|()| RequestBody::Empty);
            return (request.map(Lent::plain), Self::Copy(copy));
        }
        let head = head_of(&request);
        let (parts, body) = request.into_parts();
        let (lent, lender) = Lent::new(body);
        (
            Request::from_parts(parts, lent),
            Self::Lent { head, lender },
        )
    }

    /// The worker's response head arrived: nothing needs keeping any more.
    pub(crate) fn answered(self) {
        if let Self::Lent { lender, .. } = self {
            lender.answered();
        }
    }

    /// The request to send again, once hyper gave its body back (waiting at most `within`
    /// for it); `None` if it may not be sent again or its body was too large to keep.
    pub(crate) async fn recover(self, within: Duration) -> Option<Request<RequestBody>> {
        match self {
            Self::Never => None,
            Self::Copy(copy) => Some(copy),
            Self::Lent { head, lender } => {
                let replayed = tokio::time::timeout(within, lender.returned())
                    .await
                    .ok()?
                    .ok()?;
                Some(head.map(|()| RequestBody::Replayed(Box::new(replayed))))
            }
        }
    }
}

/// A copy of `request`'s method, target, version and headers.
pub(crate) fn head_of<B>(request: &Request<B>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = request.method().clone();
    *head.uri_mut() = request.uri().clone();
    *head.version_mut() = request.version();
    *head.headers_mut() = request.headers().clone();
    head
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
        let (mut lent, lender) = Lent::new(replayed(frames));
        let first = lent.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"one ")));
        drop(lent);
        let again = lender.returned().await.expect("given back");
        let whole = again.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"one two three"));
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_not_kept() {
        let frames = vec![
            Bytes::from(vec![b'x'; REPLAY_LIMIT]),
            Bytes::from("one more"),
        ];
        let (mut lent, lender) = Lent::new(replayed(frames));
        while lent.frame().await.is_some() {}
        drop(lent);
        assert!(lender.returned().await.is_err(), "nothing to send again");
    }

    /// `len` one-byte frames cut from one buffer, as h2 cuts DATA frames from its read
    /// buffer; and that buffer.
    fn tiny_frames(len: usize) -> (Vec<Bytes>, Bytes) {
        let buffer = Bytes::from((0..len).map(|n| n as u8).collect::<Vec<_>>());
        let frames = (0..len).map(|n| buffer.slice(n..n + 1)).collect();
        (frames, buffer)
    }

    #[tokio::test]
    async fn tiny_frames_are_kept_as_their_bytes_alone_up_to_the_limit() {
        let (frames, buffer) = tiny_frames(REPLAY_LIMIT);
        let (mut lent, lender) = Lent::new(replayed(frames));
        // hyper takes each frame and drops it once sent.
        while lent.frame().await.is_some() {}
        assert!(
            buffer.is_unique(),
            "the copies hold on to the buffer the frames came from"
        );
        let kept = lent.kept_capacity().expect("kept");
        assert!(kept <= REPLAY_LIMIT, "{kept} bytes kept");
        drop(lent);
        let again = lender.returned().await.expect("given back");
        let whole = again.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, buffer);

        // One tiny frame more and nothing is kept.
        let (frames, _) = tiny_frames(REPLAY_LIMIT + 1);
        let (mut lent, lender) = Lent::new(replayed(frames));
        while lent.frame().await.is_some() {}
        assert_eq!(lent.kept_capacity(), None);
        drop(lent);
        assert!(lender.returned().await.is_err(), "nothing to send again");
    }

    #[tokio::test]
    async fn once_the_worker_answered_nothing_is_kept() {
        let frames = vec![Bytes::from("before "), Bytes::from("after")];
        let (mut lent, lender) = Lent::new(replayed(frames));
        let _first = lent.frame().await.expect("a frame").expect("data");
        assert_eq!(lent.kept_capacity().map(|kept| kept > 0), Some(true));
        lender.answered();
        assert_eq!(lent.kept_capacity(), None, "copies kept after the answer");
        let _second = lent.frame().await.expect("a frame").expect("data");
        assert_eq!(lent.kept_capacity(), None, "copies made after the answer");
    }

    #[tokio::test]
    async fn a_body_handed_back_unsent_is_the_body_itself() {
        let (lent, lender) = Lent::new(replayed(vec![Bytes::from("kept")]));
        let body = lent.into_inner();
        assert!(lender.returned().await.is_err(), "not given back twice");
        let whole = body.collect().await.expect("a body").to_bytes();
        assert_eq!(whole, Bytes::from_static(b"kept"));
    }
}
