//! An HTTP/2 stream whose client stopped taking its response is reset after
//! `client_write_timeout`, while the connection's other streams go on.
//!
//! An HTTP/2 client that stops reading one stream stops opening that stream's flow-control
//! window; the socket keeps moving for the other streams, so [`WriteStall`](super::WriteStall)
//! never sees it. Meanwhile the stream holds the worker's slot and its worker connection.
//!
//! A wrapper around the response body alone cannot notice: hyper's HTTP/2 server
//! (`PipeToSendStream`) polls the body for the next frame only once the previous one got
//! send capacity, so during the stall the body is never polled. What is polled is the
//! stream's task, which hyper starts through the connection's executor: so the executor is
//! ours ([`StreamExecutor`]), and each stream's task runs inside [`CutOnStall`]:
//!
//! 1. the task polls the stream with a per-stream [`ClientWait`] set in a task-local, where
//!    the response body ([`ClientPaced`], made while the service's future is polled in that
//!    task) finds it;
//! 2. when the body yields a data frame it marks the wait as started, and the next time
//!    hyper polls it (the frame was sent: the client had opened its window) the mark is
//!    cleared. hyper polls again only once nearly all of the frame before has gone out, and
//!    a worker's frames can be hundreds of KiB, which a slow but steady client may take
//!    longer than the limit to read; so the body hands frames out in pieces of at most
//!    [`PIECE`] bytes (shares of the frame, not copies), and the mark restarts with each;
//! 3. after each poll that leaves the stream pending with the mark set, the task arms a
//!    timer for `mark + limit`; when it fires, the task ends and drops the stream: hyper's
//!    send half goes, and h2 resets the stream (`RST_STREAM(CANCEL)`, freeing the client's
//!    stream slot), and the response body goes with it: the worker's slot is released and
//!    the worker connection, with a response half read, is closed.
//!
//! HTTP/1 requests are served in their connection's task, where no `ClientWait` is set, so
//! their bodies do nothing more than pass frames on. The timer is made only when a stream
//! is left waiting for the client, so a client that reads keeps the timer wheel untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The most data an HTTP/2 stream's response hands hyper at once: a client must take this
/// much within the limit (16 KiB in 60 s is under 300 bytes a second), and it is HTTP/2's
/// default frame size, so no more DATA frames are sent than before.
pub(crate) const PIECE: usize = 16 * 1024;

tokio::task_local! {
    /// The wait of the HTTP/2 stream whose task is being polled.
    static STREAM_WAIT: Arc<ClientWait>;
}

/// Since when a stream's response has waited for the client to open its window; `None`
/// while it does not wait on the client.
#[derive(Debug, Default)]
pub(crate) struct ClientWait {
    since: Mutex<Option<Instant>>,
}

impl ClientWait {
    fn set(&self, since: Option<Instant>) {
        // A poisoned lock held only an instant: its value is as good as any.
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = since;
    }

    fn since(&self) -> Option<Instant> {
        *self.since.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs each HTTP/2 stream hyper hands it as a task of its own inside [`CutOnStall`], so a
/// stream whose client takes nothing for `limit` is reset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamExecutor {
    limit: Duration,
}

impl StreamExecutor {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        tokio::spawn(CutOnStall {
            stream,
            wait: Arc::default(),
            limit: self.limit,
            timer: None,
        });
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 stream's task that ends, dropping the stream, once its response has waited
    /// `limit` for the client (see the module docs).
    pub(crate) struct CutOnStall<F> {
        #[pin]
        stream: F,
        wait: Arc<ClientWait>,
        limit: Duration,
        // Made at the first wait, reset at later ones.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future<Output = ()>> Future for CutOnStall<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let stream = this.stream;
        let polled = STREAM_WAIT.sync_scope(Arc::clone(this.wait), || stream.poll(cx));
        if polled.is_ready() {
            return Poll::Ready(());
        }
        let Some(since) = this.wait.since() else {
            return Poll::Pending;
        };
        let deadline = since + *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(
                    limit = ?this.limit,
                    "an HTTP/2 client took nothing of a response; resetting its stream"
                );
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A response body that tells its HTTP/2 stream's task when it waits on the client, handing
/// data out in pieces of at most [`PIECE`] bytes (see the module docs); elsewhere it only
/// passes frames on.
#[derive(Debug)]
pub(crate) struct ClientPaced<B> {
    inner: B,
    wait: Option<Arc<ClientWait>>,
    /// What is left of the last data frame, handed out before the next is polled.
    rest: Bytes,
}

impl<B> ClientPaced<B> {
    /// `inner`, paced by the client of the HTTP/2 stream whose task makes it, if any.
    pub(crate) fn new(inner: B) -> Self {
        Self {
            inner,
            wait: STREAM_WAIT.try_with(Arc::clone).ok(),
            rest: Bytes::new(),
        }
    }
}

/// The first [`PIECE`] bytes of `data`, leaving the rest there.
fn piece_of(data: &mut Bytes) -> Bytes {
    data.split_to(data.len().min(PIECE))
}

impl<B> Body for ClientPaced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(wait) = &this.wait else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // Polled again: the piece before was sent, so the client is not what we wait for.
        wait.set(None);
        let piece = if this.rest.is_empty() {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) if data.len() > PIECE => {
                        let piece = piece_of(&mut data);
                        this.rest = data;
                        piece
                    }
                    Ok(data) => data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return other,
            }
        } else {
            piece_of(&mut this.rest)
        };
        if !piece.is_empty() {
            wait.set(Some(Instant::now()));
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_stream_left_waiting_on_the_client_ends_after_the_limit() {
        let limit = Duration::from_secs(5);
        let (made, body) = tokio::sync::oneshot::channel();
        let stream = async move {
            let mut body = ClientPaced::new(Full::new(Bytes::from_static(b"data")));
            assert!(body.wait.is_some(), "made in a stream's task");
            // A frame is taken, and then the stream waits for capacity that never comes.
            let _frame = body.frame().await;
            let _ = made.send(());
            std::future::pending::<()>().await;
        };
        let started = Instant::now();
        let task = tokio::spawn(CutOnStall {
            stream,
            wait: Arc::default(),
            limit,
            timer: None,
        });
        body.await.expect("the body was polled");
        task.await.expect("the stream's task ends");
        assert!(started.elapsed() >= limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_slowly_but_steadily_gets_the_whole_body() {
        let limit = Duration::from_secs(5);
        // One frame from the worker, which the client reads at 8 KiB a second: 50 s in all,
        // ten times the limit, though it never stops.
        const FRAME: usize = 400 * 1024;
        const BYTES_PER_SECOND: f64 = 8.0 * 1024.0;
        let received = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&received);
        let stream = async move {
            let mut body = ClientPaced::new(Full::new(Bytes::from(vec![b'x'; FRAME])));
            // As hyper does: the next frame is polled once the one before has been sent,
            // which takes as long as the client takes to read it.
            while let Some(frame) = body.frame().await {
                let data = frame.expect("a frame").into_data().expect("data");
                assert!(data.len() <= PIECE, "a piece of {} bytes", data.len());
                let reading = data.len() as f64 / BYTES_PER_SECOND;
                tokio::time::sleep(Duration::from_secs_f64(reading)).await;
                counted.fetch_add(data.len(), Ordering::SeqCst);
            }
        };
        let started = Instant::now();
        CutOnStall {
            stream,
            wait: Arc::default(),
            limit,
            timer: None,
        }
        .await;
        assert_eq!(
            received.load(Ordering::SeqCst),
            FRAME,
            "cut after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn pieces_are_the_frame_whole_then_its_trailers() {
        let (mut sender, inner) = http_body_util::channel::Channel::<Bytes>::new(2);
        let frame = Bytes::from(vec![b'y'; 2 * PIECE + 1]);
        sender.send_data(frame.clone()).await.expect("sent");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        sender.send_trailers(trailers.clone()).await.expect("sent");
        drop(sender);
        let paced = STREAM_WAIT.scope(Arc::default(), async {
            let mut body = ClientPaced::new(inner);
            let mut sizes = Vec::new();
            let mut data = Vec::new();
            while let Some(frame) = body.frame().await {
                match frame.expect("a frame").into_data() {
                    Ok(piece) => {
                        sizes.push(piece.len());
                        data.extend_from_slice(&piece);
                    }
                    Err(last) => {
                        assert_eq!(last.into_trailers().ok(), Some(trailers.clone()));
                    }
                }
            }
            (sizes, data)
        });
        let (sizes, data) = paced.await;
        assert_eq!(sizes, [PIECE, PIECE, 1]);
        assert_eq!(data, frame);

        // The body ends with its last piece, not with the frame it was cut from.
        let ends = STREAM_WAIT.scope(Arc::default(), async {
            let mut body = ClientPaced::new(Full::new(Bytes::from(vec![b'z'; PIECE + 1])));
            let mut ends = Vec::new();
            while body.frame().await.is_some() {
                ends.push(body.is_end_stream());
            }
            ends
        });
        assert_eq!(ends.await, [false, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_its_worker_is_not_cut() {
        let stream = async {
            let (_sender, pending) = http_body_util::channel::Channel::<Bytes>::new(1);
            let mut body = ClientPaced::new(pending);
            // Nothing comes from the worker: that is the worker's timeout, not this one.
            let _ = body.frame().await;
        };
        let cut = tokio::time::timeout(
            Duration::from_secs(60),
            CutOnStall {
                stream,
                wait: Arc::default(),
                limit: Duration::from_secs(5),
                timer: None,
            },
        );
        assert!(
            cut.await.is_err(),
            "the stream was cut while the worker was silent"
        );
    }

    #[tokio::test]
    async fn outside_a_stream_task_the_body_only_passes_frames_on() {
        let mut body = ClientPaced::new(Full::new(Bytes::from_static(b"data")));
        assert!(body.wait.is_none());
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"data")));
    }
}
