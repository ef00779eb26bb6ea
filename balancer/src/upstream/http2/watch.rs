//! What a worker says of an HTTP/2 connection as a whole, read off the bytes it sends: the
//! most streams it lets the balancer open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`) and
//! whether it is going away (`GOAWAY`).
//!
//! hyper's HTTP/2 client enforces the worker's stream limit itself, by queueing requests
//! beyond it on the connection, but does not tell the limit; the balancer needs it to open
//! another connection instead of queueing. So the connection's read side is wrapped in
//! [`Watched`], which follows the frame boundaries (RFC 9113 §4.1: a 9-byte header, then
//! `length` bytes of payload) and decodes just those two frame types. It copies nothing but
//! frame headers and settings entries, and hyper sees the bytes unchanged.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The streams a client may open before the worker's first SETTINGS arrive: hyper's
/// default too, and the least RFC 9113 §6.5.2 recommends a server allow.
const INITIAL_MAX_STREAMS: u32 = 100;

/// What the worker has said of the connection so far; shared by the reader and the pool.
#[derive(Debug)]
pub(crate) struct PeerState {
    max_streams: AtomicU32,
    going_away: AtomicBool,
    /// Given once the worker's first SETTINGS frame has been read.
    settled: Notify,
}

impl Default for PeerState {
    fn default() -> Self {
        Self {
            max_streams: AtomicU32::new(INITIAL_MAX_STREAMS),
            going_away: AtomicBool::new(false),
            settled: Notify::new(),
        }
    }
}

impl PeerState {
    /// Returns once the worker's first SETTINGS frame has been read (at once if it has):
    /// the worker speaks HTTP/2, and its stream limit is known.
    pub(crate) async fn settled(&self) {
        self.settled.notified().await;
        // For any later caller too.
        self.settled.notify_one();
    }

    /// Most streams the worker lets the balancer have open at once on this connection.
    pub(crate) fn max_streams(&self) -> u32 {
        self.max_streams.load(Ordering::Relaxed)
    }

    /// Whether the worker sent `GOAWAY`: no new stream may start on the connection.
    pub(crate) fn going_away(&self) -> bool {
        self.going_away.load(Ordering::Relaxed)
    }
}

/// A stream whose incoming bytes are followed, frame by frame, into a [`PeerState`].
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    frames: FrameReader,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, state: Arc<PeerState>) -> Self {
        Self {
            inner,
            frames: FrameReader::new(state),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.frames.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, bytes)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

const FRAME_HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTING_LEN: usize = 6;

/// Follows frame boundaries over the bytes as they arrive, in pieces of any size.
#[derive(Debug)]
struct FrameReader {
    state: Arc<PeerState>,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// Whether the current frame is a SETTINGS frame (not an ACK) being decoded.
    in_settings: bool,
    /// Whether a first SETTINGS frame has been read whole.
    settled: bool,
    setting: [u8; SETTING_LEN],
    setting_len: usize,
}

impl FrameReader {
    fn new(state: Arc<PeerState>) -> Self {
        Self {
            state,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            in_settings: false,
            settled: false,
            setting: [0; SETTING_LEN],
            setting_len: 0,
        }
    }

    fn read(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.header_len < FRAME_HEADER_LEN {
                let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.start_frame();
                }
                continue;
            }
            let take = self.payload_left.min(bytes.len());
            if self.in_settings {
                for &byte in &bytes[..take] {
                    self.setting_byte(byte);
                }
            }
            self.payload_left -= take;
            bytes = &bytes[take..];
            if self.payload_left == 0 {
                self.end_frame();
            }
        }
    }

    /// A frame header is complete: note what it says, and what of its payload to decode.
    fn start_frame(&mut self) {
        let [l0, l1, l2, kind, flags, ..] = self.header;
        self.payload_left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        self.in_settings = kind == SETTINGS && flags & ACK == 0;
        self.setting_len = 0;
        if kind == GOAWAY {
            self.state.going_away.store(true, Ordering::Relaxed);
        }
        if self.payload_left == 0 {
            self.end_frame();
        }
    }

    fn end_frame(&mut self) {
        self.header_len = 0;
        if self.in_settings && !self.settled {
            self.settled = true;
            self.state.settled.notify_one();
        }
    }

    fn setting_byte(&mut self, byte: u8) {
        self.setting[self.setting_len] = byte;
        self.setting_len += 1;
        if self.setting_len < SETTING_LEN {
            return;
        }
        self.setting_len = 0;
        let [i0, i1, v0, v1, v2, v3] = self.setting;
        if u16::from_be_bytes([i0, i1]) == SETTINGS_MAX_CONCURRENT_STREAMS {
            let value = u32::from_be_bytes([v0, v1, v2, v3]);
            self.state.max_streams.store(value, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut bytes = vec![len[5], len[6], len[7], kind, flags, 0, 0, 0, 0];
        bytes.extend_from_slice(payload);
        bytes
    }

    fn setting(id: u16, value: u32) -> Vec<u8> {
        let mut bytes = id.to_be_bytes().to_vec();
        bytes.extend_from_slice(&value.to_be_bytes());
        bytes
    }

    /// What a worker sends: its SETTINGS (a window size, then the stream limit), a DATA
    /// frame whose payload looks like a SETTINGS frame, a SETTINGS ACK, a new limit.
    fn conversation() -> Vec<u8> {
        let mut bytes = Vec::new();
        let settings = [setting(0x4, 65_535), setting(0x3, 7)].concat();
        bytes.extend(frame(SETTINGS, 0, &settings));
        bytes.extend(frame(0x0, 0, &frame(SETTINGS, 0, &setting(0x3, 1))));
        bytes.extend(frame(SETTINGS, ACK, &[]));
        bytes.extend(frame(SETTINGS, 0, &setting(0x3, 250)));
        bytes
    }

    #[test]
    fn the_stream_limit_is_read_whatever_the_pieces_the_bytes_come_in() {
        let bytes = conversation();
        for piece in [1, 2, 5, 9, 10, 13, bytes.len()] {
            let state = Arc::new(PeerState::default());
            let mut reader = FrameReader::new(Arc::clone(&state));
            assert_eq!(state.max_streams(), INITIAL_MAX_STREAMS);
            let first_settings = FRAME_HEADER_LEN + 2 * SETTING_LEN;
            reader.read(&bytes[..first_settings]);
            assert_eq!(state.max_streams(), 7, "the first SETTINGS, whole");
            for chunk in bytes[first_settings..].chunks(piece) {
                reader.read(chunk);
            }
            // The DATA frame's payload was not taken for a frame.
            assert_eq!(state.max_streams(), 250, "in pieces of {piece}");
            assert!(!state.going_away());
        }
    }

    #[tokio::test]
    async fn the_first_settings_frame_settles_the_connection_once_read_whole() {
        let state = Arc::new(PeerState::default());
        let mut reader = FrameReader::new(Arc::clone(&state));
        let settings = frame(SETTINGS, 0, &setting(0x3, 7));
        reader.read(&settings[..settings.len() - 1]);
        let settled = state.settled();
        tokio::pin!(settled);
        assert!(
            futures_poll_once(settled.as_mut()).await.is_none(),
            "a byte is missing"
        );
        reader.read(&settings[settings.len() - 1..]);
        settled.await;
        // And for anyone who asks later.
        state.settled().await;
    }

    /// The future's output if it is ready at its first poll.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut future).poll(cx) {
                Poll::Ready(output) => Some(output),
                Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn goaway_marks_the_connection_as_going_away() {
        let state = Arc::new(PeerState::default());
        let mut reader = FrameReader::new(Arc::clone(&state));
        reader.read(&frame(SETTINGS, 0, &[]));
        assert!(!state.going_away());
        // Last stream id 5, NO_ERROR.
        reader.read(&frame(GOAWAY, 0, &[0, 0, 0, 5, 0, 0, 0, 0]));
        assert!(state.going_away());
    }
}
