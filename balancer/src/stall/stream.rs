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
//!    cleared;
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

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

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

/// A response body that tells its HTTP/2 stream's task when it waits on the client (see the
/// module docs); elsewhere it only passes frames on.
#[derive(Debug)]
pub(crate) struct ClientPaced<B> {
    inner: B,
    wait: Option<Arc<ClientWait>>,
}

impl<B> ClientPaced<B> {
    /// `inner`, paced by the client of the HTTP/2 stream whose task makes it, if any.
    pub(crate) fn new(inner: B) -> Self {
        Self {
            inner,
            wait: STREAM_WAIT.try_with(Arc::clone).ok(),
        }
    }
}

impl<B> Body for ClientPaced<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let Some(wait) = &this.wait else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        // Polled again: the frame before was sent, so the client is not what we wait for.
        wait.set(None);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && frame.data_ref().is_some_and(bytes::Buf::has_remaining)
        {
            wait.set(Some(Instant::now()));
        }
        polled
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
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

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
