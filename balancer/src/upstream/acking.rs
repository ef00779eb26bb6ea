//! Acknowledging a worker's bytes at once when a read has to wait for the rest of an answer.
//!
//! While it sends a request and waits for the answer, a connection is in the kernel's
//! interactive mode, which holds an acknowledgement back (up to 40 ms) in the hope that it
//! rides on the next data sent. Until the answer is whole, nothing is sent, and a worker
//! whose next bytes wait for that acknowledgement stalls until the kernel gives up waiting:
//! one that writes its head and its body apart without `TCP_NODELAY` (as Python's
//! `http.server` does: Nagle's rule holds the body until the head is acknowledged), every
//! answer 44 ms late; or one whose send buffer is full (a static nginx serving 64 KiB files,
//! 3 answers in 1000, each 40-50 ms late). Asking for an immediate acknowledgement
//! (`TCP_QUICKACK`) as a read has to wait sends the one held back.
//!
//! [`super::direct`] knows where its answers end and asks only while one is unfinished;
//! [`Acking`] does it for hyper's connections.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::closing::Closable;

/// Sends the acknowledgement `stream` holds back, if any, now (see the module docs).
pub(super) fn acknowledge(stream: &Closable<TcpStream>) {
    if let Err(error) = SockRef::from(stream.get_ref()).set_tcp_quickack(true) {
        tracing::debug!(%error, "acknowledging a worker's answer at once (TCP_QUICKACK)");
    }
}

/// A worker connection whose reads acknowledge what came when they have to wait in the
/// middle of an answer: once per wait, after bytes of an answer that is not whole yet.
///
/// hyper reads on as soon as an answer is whole (to see the connection close while idle),
/// so a wait alone does not say that more is to come; acknowledging every time would cost
/// a system call and a segment for every request (measured: 12 % fewer requests with a
/// body a second). So the bytes read are followed just far enough to know where each
/// answer ends: the head's end, its status, `Content-Length` and whether it is chunked.
#[derive(Debug)]
pub(super) struct Acking {
    inner: Closable<TcpStream>,
    /// Bytes have been read since the last write or the last acknowledgement.
    unacked: bool,
    answer: Answer,
}

impl Acking {
    pub(super) fn new(inner: Closable<TcpStream>) -> Self {
        Self {
            inner,
            unacked: false,
            answer: Answer::Whole,
        }
    }
}

/// The longest answer head followed; past it, the connection acknowledges on every wait.
const MAX_HEAD: usize = 64 * 1024;

/// Where the answer being read stands.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Nothing is expected (no request is out), or the last answer is whole.
    Whole,
    /// Its head, so far (empty until it starts).
    Head(Vec<u8>),
    /// This many body bytes are still to come.
    Length(u64),
    /// A chunked body; the last bytes read, to see its end (`0\r\n\r\n`; trailers after
    /// the last chunk are not followed, so such an answer is taken as unfinished).
    Chunked(Vec<u8>),
    /// A body that ends with the connection, or a head past [`MAX_HEAD`].
    Open,
    /// The connection was handed over (`101`): what it carries is not HTTP, and is not
    /// followed.
    Upgraded,
}

impl Answer {
    /// Whether the answer has begun and is not whole.
    fn unfinished(&self) -> bool {
        match self {
            Answer::Whole | Answer::Upgraded => false,
            Answer::Head(head) => !head.is_empty(),
            Answer::Length(_) | Answer::Chunked(_) | Answer::Open => true,
        }
    }

    /// Follows `bytes`, the next ones read.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self {
                Answer::Whole | Answer::Open | Answer::Upgraded => return,
                Answer::Head(head) => {
                    let from = head.len().saturating_sub(3);
                    head.extend_from_slice(bytes);
                    let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") else {
                        if head.len() > MAX_HEAD {
                            *self = Answer::Open;
                        }
                        return;
                    };
                    let end = from + end + 4;
                    let rest = head.len() - end;
                    bytes = &bytes[bytes.len() - rest..];
                    *self = Answer::after_head(&head[..end]);
                }
                Answer::Length(remaining) => {
                    let take = u64::try_from(bytes.len())
                        .unwrap_or(u64::MAX)
                        .min(*remaining);
                    *remaining -= take;
                    if *remaining == 0 {
                        *self = Answer::Whole;
                    }
                    return;
                }
                Answer::Chunked(last) => {
                    last.extend_from_slice(&bytes[bytes.len().saturating_sub(7)..]);
                    let keep = last.len().saturating_sub(7);
                    last.drain(..keep);
                    if last.ends_with(b"\r\n0\r\n\r\n") || last.as_slice() == b"0\r\n\r\n" {
                        *self = Answer::Whole;
                    }
                    return;
                }
            }
        }
    }

    /// What follows the answer head `head` (status line to the empty line).
    fn after_head(head: &[u8]) -> Answer {
        let status = head.get(9..12).unwrap_or_default();
        match status {
            // An interim answer: the final one's head comes next.
            [b'1', ..] if status != b"101" => return Answer::Head(Vec::new()),
            b"101" => return Answer::Upgraded,
            // No body.
            b"204" | b"304" => return Answer::Whole,
            _ => {}
        }
        let mut length = None;
        for line in head.split(|&b| b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return if value.to_ascii_lowercase().ends_with(b"chunked") {
                    Answer::Chunked(Vec::new())
                } else {
                    Answer::Open
                };
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
            }
        }
        match length {
            Some(0) => Answer::Whole,
            Some(length) => Answer::Length(length),
            None => Answer::Open,
        }
    }
}

impl AsyncRead for Acking {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if this.answer.unfinished() && std::mem::take(&mut this.unacked) {
                    acknowledge(&this.inner);
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    this.unacked = true;
                    this.answer.advance(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }
}

impl Acking {
    /// Bytes of a request went out: they carry the acknowledgement of all read before, and
    /// an answer is expected (a new one, unless the last is still coming).
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written
            && *n > 0
        {
            self.unacked = false;
            if self.answer == Answer::Whole {
                self.answer = Answer::Head(Vec::new());
            }
        }
    }
}

impl AsyncWrite for Acking {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, bytes);
        this.wrote(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use socket2::SockRef;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{Acking, Answer};
    use crate::upstream::closing::{Closable, Closing};

    /// Whether `stream` is out of the kernel's interactive (delayed-ACK) mode: Linux reads
    /// `TCP_QUICKACK` back as that.
    pub(in crate::upstream) fn acks_at_once(stream: &Closable<TcpStream>) -> bool {
        SockRef::from(stream.get_ref())
            .tcp_quickack()
            .expect("TCP_QUICKACK")
    }

    /// Puts `stream` in the interactive mode a connection that sends requests and reads
    /// answers is in, where the kernel holds acknowledgements back.
    pub(in crate::upstream) fn delay_acks(stream: &Closable<TcpStream>) {
        SockRef::from(stream.get_ref())
            .set_tcp_quickack(false)
            .expect("TCP_QUICKACK");
        assert!(!acks_at_once(stream));
    }

    /// Polls `future` once.
    pub(in crate::upstream) async fn poll_once<F: Future + Unpin>(
        future: &mut F,
    ) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
    }

    #[tokio::test]
    async fn a_wait_in_the_middle_of_an_answer_acknowledges_and_one_after_it_does_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut worker, _) = listener.accept().await.expect("accept");
        let closing: &'static Closing = Box::leak(Box::default());
        let mut conn = Acking::new(closing.wrap(stream));
        let mut buf = [0u8; 256];

        for round in 0..2 {
            delay_acks(&conn.inner);
            let sent = b"POST / HTTP/1.1\r\ncontent-length: 1\r\n\r\nx";
            conn.write_all(sent).await.expect("request");
            let mut request = [0u8; 39];
            assert_eq!(request.len(), sent.len());
            worker.read_exact(&mut request).await.expect("request");
            // Nothing of the answer yet: a wait holds nothing back.
            assert!(
                poll_once(&mut Box::pin(conn.read(&mut buf)))
                    .await
                    .is_pending()
            );
            assert!(
                !acks_at_once(&conn.inner),
                "round {round}: nothing to acknowledge"
            );

            worker
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhe")
                .await
                .expect("head");
            let read = conn.read(&mut buf).await.expect("the head");
            assert!(read > 0);
            if conn.answer.unfinished() {
                // The rest has not come: the wait for it acknowledges what came.
                assert!(
                    poll_once(&mut Box::pin(conn.read(&mut buf)))
                        .await
                        .is_pending()
                );
                assert!(
                    acks_at_once(&conn.inner),
                    "round {round}: the head is acknowledged"
                );
            }
            delay_acks(&conn.inner);
            worker.write_all(b"llo").await.expect("body");
            while conn.answer.unfinished() {
                let read = conn.read(&mut buf).await.expect("the body");
                assert!(read > 0, "the connection ended in the body");
            }
            // The answer is whole: a wait now (hyper's, for the connection to close) leaves
            // the acknowledgement to ride on the next request.
            assert!(
                poll_once(&mut Box::pin(conn.read(&mut buf)))
                    .await
                    .is_pending()
            );
            assert!(
                !acks_at_once(&conn.inner),
                "round {round}: a whole answer waits"
            );
        }
    }

    /// Where an answer expected after a request stands once `pieces` have been read.
    fn after(pieces: &[&[u8]]) -> Answer {
        let mut answer = Answer::Head(Vec::new());
        for piece in pieces {
            answer.advance(piece);
        }
        answer
    }

    #[test]
    fn an_answer_is_followed_to_its_end_whatever_its_framing() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(after(&[]), Answer::Head(Vec::new()));
        assert!(!after(&[]).unfinished(), "nothing has come yet");
        assert!(after(&[&head[..7]]).unfinished());
        // The head's end split across reads, then the body.
        assert_eq!(after(&[&head[..35], &head[35..]]), Answer::Length(10));
        assert_eq!(after(&[head, b"hello"]), Answer::Length(5));
        assert_eq!(after(&[head, b"hello", b"world"]), Answer::Whole);
        let mut whole = head.to_vec();
        whole.extend_from_slice(b"helloworld");
        assert_eq!(after(&[&whole]), Answer::Whole);

        // Interim answers come before the final one; some answers have no body.
        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(after(&[interim]), Answer::Whole);
        assert_eq!(
            after(&[b"HTTP/1.1 100 Continue\r\n\r\n"]),
            Answer::Head(Vec::new())
        );
        assert_eq!(after(&[b"HTTP/1.1 204 No Content\r\n\r\n"]), Answer::Whole);
        let mut upgraded = after(&[b"HTTP/1.1 101 Switching\r\nupgrade: x\r\n\r\nframe"]);
        assert_eq!(upgraded, Answer::Upgraded);
        upgraded.advance(b"more of the tunnel");
        assert!(!upgraded.unfinished());
        assert_eq!(
            after(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]),
            Answer::Whole
        );

        // Chunked, its last chunk split across reads; and a body that ends with the connection.
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert_eq!(after(&[chunked]), Answer::Chunked(b"hello\r\n".to_vec()));
        assert!(after(&[chunked, b"0\r\n"]).unfinished());
        assert_eq!(after(&[chunked, b"0\r\n", b"\r\n"]), Answer::Whole);
        let empty = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(after(&[empty, b"0\r\n\r\n"]), Answer::Whole);
        assert_eq!(after(&[b"HTTP/1.1 200 OK\r\n\r\nabc"]), Answer::Open);
        assert_eq!(after(&[&vec![b'x'; super::MAX_HEAD + 1]]), Answer::Open);
    }
}
