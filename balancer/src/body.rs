//! The body wrappers the proxy streams through: one that holds a worker slot until the
//! response has been sent, and one that gives up on a client that stops sending.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::admission::Lease;
use crate::upstream::{BoxError, ProxyBody};

/// A response body that holds its worker slot until it has been sent or dropped.
pub(crate) struct Leased {
    inner: ProxyBody,
    _lease: Lease,
}

impl Leased {
    pub(crate) fn new(inner: ProxyBody, lease: Lease) -> Self {
        Self {
            inner,
            _lease: lease,
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client sent no part of its request body for `Config::body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
pub(crate) struct BodyTimeout(pub(crate) Duration);

/// A request body that fails with [`BodyTimeout`] when no frame arrives for `timeout`,
/// so a client that trickles or stalls its upload cannot hold a worker slot for ever.
pub(crate) struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
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
                this.sleep.as_mut().reset(Instant::now() + this.timeout);
                Poll::Ready(Some(frame.map_err(Into::into)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(this.timeout).into()))),
                Poll::Pending => Poll::Pending,
            },
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

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_and_a_steady_one_does_not() {
        let (mut tx, channel) = Channel::<Bytes>::new(4);
        let mut body = IdleTimeout::new(channel, Duration::from_secs(5));
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(4)).await;
            tx.send_data(Bytes::from_static(b"x")).await.expect("open");
            let frame = body.frame().await.expect("a frame").expect("data");
            assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"x")));
        }
        // Nothing more is sent: the paused clock runs to the timeout.
        let stalled = body.frame().await.expect("an error frame");
        let error = stalled.expect_err("timed out");
        assert!(error.is::<BodyTimeout>());
        drop(tx);
    }
}
