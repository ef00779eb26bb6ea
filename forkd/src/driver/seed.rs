//! `vm` snapshots between forkd hosts: a template's portable snapshot served as a streamed
//! HTTP body, and a template made from a peer's (see [`microvm::portable`] for the format).
//!
//! Both ends run the blocking snapshot code on a blocking thread and move the bytes through
//! a bounded channel of [`CHUNK`]-sized pieces, so neither holds more than a few of them: the
//! RAM goes from the peer's RAM file to this host's RAM file as it arrives, never whole in
//! memory. A peer that stops sending for [`IDLE_LIMIT`] is given up on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

use crate::api::{SnapshotSource, TemplateSpec};

/// The size of each piece of a snapshot sent through the channel.
const CHUNK: usize = 256 << 10;
/// Pieces in flight between the network and the snapshot code.
const PIECES: usize = 4;
/// How long a peer may send nothing before the transfer is given up.
pub(crate) const IDLE_LIMIT: Duration = Duration::from_secs(15);
/// Snapshots one daemon sends at once.
pub(crate) const MAX_EXPORTS: usize = 2;
/// The annotation that carries the template's spec in the snapshot's header.
const SPEC: &str = "spec";

/// A snapshot being written, as an HTTP response body.
pub(crate) struct SnapshotBody {
    pieces: mpsc::Receiver<io::Result<Bytes>>,
}

impl Body for SnapshotBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.pieces
            .poll_recv(cx)
            .map(|piece| piece.map(|r| r.map(Frame::data)))
    }
}

/// Starts writing `template`'s snapshot, with `spec` in its header, and returns the body
/// that streams it. If the client goes away, the writing stops; if the writing fails, the
/// body ends with an error (the connection is cut, and the reader refuses what it got).
pub(crate) fn export(
    template: Arc<microvm::Template>,
    spec: &TemplateSpec,
    metrics: &crate::metrics::Metrics,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> SnapshotBody {
    let (transfers, bytes) = (
        metrics.snapshot_transfers.clone(),
        metrics.snapshot_bytes.clone(),
    );
    let (tx, pieces) = mpsc::channel(PIECES);
    let annotations = serde_json::json!({ SPEC: spec.portable() });
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        // Held until the snapshot is written or given up.
        let _permit = permit;
        let started = std::time::Instant::now();
        let mut out = ChannelWriter {
            tx: tx.clone(),
            buf: BytesMut::with_capacity(CHUNK),
            runtime,
        };
        match template.export(annotations, &mut out) {
            Ok(stats) => {
                tracing::info!(
                    template = template.name(),
                    stream_bytes = stats.stream_bytes,
                    ram_bytes = stats.ram_bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "vm: snapshot sent"
                );
                transfers.with_label_values(&["sent", "ok"]).inc();
                bytes
                    .with_label_values(&["sent"])
                    .inc_by(stats.stream_bytes);
            }
            Err(e) => {
                tracing::warn!(template = template.name(), error = %e, "vm: snapshot not sent");
                transfers.with_label_values(&["sent", "failed"]).inc();
                // The body ends with the error if there is room for it; if the reader has
                // stalled, the channel is full and ending it is enough (a stream without its
                // digest is refused).
                let _ = tx.try_send(Err(e));
            }
        }
    });
    SnapshotBody { pieces }
}

/// Why a template could not be made from a peer's snapshot.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeedError {
    #[error("invalid source URL {0:?}")]
    Url(String, #[source] crate::ClientError),
    #[error("the peer {url} did not send the snapshot")]
    Fetch {
        url: String,
        #[source]
        source: crate::ClientError,
    },
    #[error("making the template from {url}'s snapshot failed")]
    Import {
        url: String,
        #[source]
        source: Box<microvm::CreateTemplateError>,
    },
    #[error("making the template from {url}'s snapshot stopped")]
    Aborted {
        url: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Makes template `spec.name` from the snapshot of the template of that name on the peer at
/// `source`, asked with `token`: the peer's spec must be `spec` (but for the image's path),
/// and `rootfs` is this host's build of the image's root filesystem, if it has one. The peer
/// has [`IDLE_LIMIT`] to answer, then the transfer has the spec's `start_timeout_ms`, as a
/// boot would (a peer that sends nothing for [`IDLE_LIMIT`] is given up on sooner).
pub(crate) async fn import(
    source: &SnapshotSource,
    spec: &TemplateSpec,
    token: &str,
    config: microvm::VmConfig,
    rootfs: Option<microvm::Rootfs>,
) -> Result<(microvm::Template, microvm::TransferStats), SeedError> {
    let url = source.url.clone();
    let client = crate::Client::new(&url, token).map_err(|e| SeedError::Url(url.clone(), e))?;
    let fetch = |source| SeedError::Fetch {
        url: url.clone(),
        source,
    };
    let body = tokio::time::timeout(IDLE_LIMIT, client.snapshot(&spec.name))
        .await
        .unwrap_or_else(|_| {
            Err(crate::ClientError::Api {
                status: http::StatusCode::GATEWAY_TIMEOUT,
                code: crate::ErrorCode::Unknown,
                message: format!("no answer within {IDLE_LIMIT:?}"),
            })
        })
        .map_err(fetch)?;
    let (tx, rx) = mpsc::channel(PIECES);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(spec.start_timeout_ms);
    let pump = tokio::spawn(pump(body, tx, deadline));
    let wanted = spec.portable();
    let name = spec.name.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let input = ChannelReader {
            rx,
            piece: Bytes::new(),
        };
        microvm::Template::import(&name, &config, rootfs, input, |header| {
            let theirs = header.annotations.get(SPEC).cloned().unwrap_or_default();
            match serde_json::from_value::<TemplateSpec>(theirs) {
                Ok(theirs) if theirs == wanted => Ok(()),
                Ok(theirs) => Err(format!(
                    "the peer's template has another spec: {}",
                    serde_json::to_string(&theirs).unwrap_or_default()
                )),
                Err(e) => Err(format!("its header has no usable spec: {e}")),
            }
        })
    })
    .await;
    // Stops reading from the peer if the import ended early.
    pump.abort();
    match imported {
        Ok(Ok((template, stats))) => Ok((template, stats)),
        Ok(Err(source)) => Err(SeedError::Import {
            url,
            source: Box::new(source),
        }),
        Err(source) => Err(SeedError::Aborted { url, source }),
    }
}

/// Moves the body's data into `tx` until it ends, fails, stalls for [`IDLE_LIMIT`], runs
/// past `deadline`, or the reader goes away.
async fn pump(
    mut body: hyper::body::Incoming,
    tx: mpsc::Sender<io::Result<Bytes>>,
    deadline: tokio::time::Instant,
) {
    loop {
        let limit = IDLE_LIMIT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let piece = match tokio::time::timeout(limit, body.frame()).await {
            Err(_) if limit < IDLE_LIMIT => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the transfer took longer than the template's start_timeout_ms",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer sent nothing for {IDLE_LIMIT:?}"),
            )),
            Ok(None) => return,
            Ok(Some(Err(e))) => Err(io::Error::other(e)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Ok(data),
                Err(_trailers) => continue,
            },
        };
        let failed = piece.is_err();
        if tx.send(piece).await.is_err() || failed {
            return;
        }
    }
}

/// A blocking writer that hands its bytes to a channel in [`CHUNK`]-sized pieces.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    /// The runtime whose timer bounds each send.
    runtime: tokio::runtime::Handle,
}

impl ChannelWriter {
    /// Hands the buffered bytes on; fails if the reader went away, or took none for
    /// [`IDLE_LIMIT`] (a peer that stopped reading must not hold this thread).
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = self.buf.split().freeze();
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(IDLE_LIMIT, self.tx.send(Ok(piece))));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reader went away",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the reader took nothing for {IDLE_LIMIT:?}"),
            )),
        }
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A blocking reader of the pieces a channel brings; the channel closing is the end.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    piece: Bytes,
}

impl io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.blocking_recv() {
                Some(piece) => self.piece = piece?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.piece.len());
        out[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}
