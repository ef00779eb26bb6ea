//! The accept loop every HTTP listener in Squall runs.
//!
//! It accepts connections until the [`Shutdown`] comes, serving each with hyper (HTTP/1.1, or
//! HTTP/2 with prior knowledge) in a task of its own. Then it closes the listener, tells every
//! connection to finish (HTTP/1 after its current response, HTTP/2 with GOAWAY) and returns
//! once they all have, or once [`Limits::drain_timeout`] has passed.
//!
//! The limits bound what a client can hold: the time to send a request head, the head's
//! size, HTTP/2 streams per connection, and, for listeners that must stay reachable under
//! abuse (admin pages, forkd's API), the number of connections at once and the life of each.
//! A connection over the count waits in the kernel's accept queue, not in our memory.
//!
//! hyper's header-read timeout starts once it reads a request head, but the connection first
//! reads the opening bytes to tell HTTP/1 from HTTP/2; a client that connects and sends
//! nothing would wait there for ever. So the first byte of every connection must come
//! within the same timeout ([`FirstByte`]); later request heads are hyper's to time.
//!
//! With [`HttpServer::tls`], each connection's task first runs the TLS handshake (bounded by
//! the same timeout; see [`Tls`]) and then speaks the protocol ALPN chose.

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::HttpServerConnExec;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::Shutdown;
use crate::Transport;
use crate::first_byte::{FirstByte, Opening};
use crate::http1::{Bodiless, Bounds};
use crate::nodelay::NoDelay;
use crate::protocols::{Drain, Hyper, Own, Path, Protocol, Protocols};
use crate::tls::{Negotiated, Tls};

/// Pause after a failed `accept` (out of file descriptors, typically) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// hyper's floor for its HTTP/1 read buffer, which caps the request head; the own path
/// ([`crate::http1`]) keeps the same cap.
const MIN_HEAD_BUFFER: usize = 8192;

/// What one listener allows a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// How long a client may take to send a request head (HTTP/1) before the connection is
    /// closed, so that idle sockets cannot pile up.
    pub header_read_timeout: Duration,
    /// The largest request head, in bytes (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// At most this many HTTP/2 streams at once on one connection.
    pub max_concurrent_streams: u32,
    /// At most this many connections at once; `None` for no limit. Further connections wait
    /// in the kernel's accept queue until one closes.
    pub max_connections: Option<usize>,
    /// A connection is closed this long after it was accepted, whatever it is doing; `None`
    /// for no limit.
    pub connection_lifetime: Option<Duration>,
    /// How long shutdown waits for open connections to finish.
    pub drain_timeout: Duration,
}

impl Limits {
    /// For listeners a few people or scrapers use (admin pages, forkd's API): 64 connections,
    /// 10 s to send a request head, 60 s per connection, 16 streams, 5 s to drain.
    pub fn control() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_concurrent_streams: 16,
            max_connections: Some(64),
            connection_lifetime: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// An HTTP server: the connection settings and the limits. Build one per listener with
/// [`HttpServer::new`] (or [`HttpServer::with_executor`], to run HTTP/2 streams another
/// way), then [`HttpServer::serve`].
#[derive(Debug)]
pub struct HttpServer<E = TokioExecutor> {
    protocols: Arc<Protocols<E>>,
    limits: Limits,
    name: &'static str,
    /// Serve HTTP/1.1 only (no HTTP/2, no upgrades).
    http1_only: bool,
    /// Terminate TLS on every connection.
    tls: Option<Tls>,
}

/// How a served connection ended.
type ConnectionResult = Result<(), Box<dyn StdError + Send + Sync>>;

/// A connection being told its protocol (or its TLS handshake), then served in it: boxed, so
/// that the task running it under its lifetime stays small. It holds what it needs until
/// then, and the connection hyper serves in a box of its own (`Protocols::serve`).
type Served = Pin<Box<dyn Future<Output = ConnectionResult> + Send>>;

impl HttpServer {
    /// A server with `limits`; `name` says which listener it is in logs.
    pub fn new(name: &'static str, limits: Limits) -> Self {
        Self::with_executor(name, limits, TokioExecutor::new())
    }
}

impl<E> HttpServer<E> {
    /// A server whose HTTP/2 streams, each a task of its own, are started by `executor`.
    pub fn with_executor(name: &'static str, limits: Limits, executor: E) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // hyper's floor for its read buffer; it caps the request head.
            .max_buf_size(limits.max_header_bytes.max(MIN_HEAD_BUFFER));
        let mut http2 = http2::Builder::new(executor);
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            protocols: Arc::new(Protocols { http1, http2 }),
            limits,
            name,
            http1_only: false,
            tls: None,
        }
    }

    /// Serves HTTP/1.1 only, for an API whose clients speak nothing else: an idle
    /// connection then closes after the header-read timeout, as HTTP/1 keep-alive does,
    /// where an idle HTTP/2 connection would be held until the end of its life.
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    /// Terminates TLS on every connection (see [`Tls`]): the handshake runs in the
    /// connection's task, bounded by the header-read timeout, and the connection then speaks
    /// what ALPN chose. Without it, connections speak HTTP/1.1 or HTTP/2 with prior knowledge.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The limits this server enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves `listener` until `shutdown`, then drains (see the module docs). `connection`
    /// turns each accepted stream into the I/O object to serve (the stream itself, or a
    /// wrapper) and the service that answers its requests. Returns whether every
    /// connection finished within the drain timeout.
    pub async fn serve<I, S, B>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        connection: impl FnMut(TcpStream, SocketAddr) -> (I, S),
    ) -> bool
    where
        I: Transport,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
    {
        self.accept(listener, shutdown, connection, Hyper).await
    }

    /// Like [`HttpServer::serve`], with HTTP/1 requests that have no body answered on
    /// Squall's own path by the service's [`Bodiless`] side, and the rest by hyper (see
    /// [`crate::http1`]). Not with [`HttpServer::http1_only`], which serves hyper alone.
    pub async fn serve_bodiless<I, S, B>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        connection: impl FnMut(TcpStream, SocketAddr) -> (I, S),
    ) -> bool
    where
        I: Transport,
        S: Service<Request<Incoming>, Response = Response<B>>
            + Bodiless<ResponseBody = B>
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
        E: HttpServerConnExec<S::Future, B> + Clone + Send + Sync + 'static,
    {
        let bounds = Bounds {
            header_read_timeout: self.limits.header_read_timeout,
            max_head: self.limits.max_header_bytes.max(MIN_HEAD_BUFFER),
        };
        self.accept(listener, shutdown, connection, Own(bounds))
            .await
    }

    /// The accept loop of both, serving each connection along `path`.
    async fn accept<I, S, B, P>(
        &self,
        listener: TcpListener,
        shutdown: &Shutdown,
        mut connection: impl FnMut(TcpStream, SocketAddr) -> (I, S),
        path: P,
    ) -> bool
    where
        I: Transport,
        S: Send + 'static,
        P: Path<S, B, E>,
        E: Send + Sync + 'static,
    {
        let drain = Drain::new();
        let slots = self
            .limits
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n)));
        let mut nodelay = NoDelay::on_listener(&listener);
        if let Err(error) = crate::transport::delay_acks(&listener) {
            tracing::debug!(listener = self.name, %error, "delaying ACKs (TCP_QUICKACK off)");
        }
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            // Wait for a free slot before accepting, so a full listener leaves connections
            // in the kernel's queue.
            let slot = match &slots {
                Some(slots) => tokio::select! {
                    slot = Arc::clone(slots).acquire_owned() => match slot {
                        Ok(slot) => Some(slot),
                        Err(_) => break, // never closed
                    },
                    () = &mut stop => break,
                },
                None => None,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(listener = self.name, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            nodelay.set(&stream, self.name);
            let (io, service) = connection(stream, peer);
            let (limit, upgrades, name) =
                (self.limits.header_read_timeout, !self.http1_only, self.name);
            let protocols = Arc::clone(&self.protocols);
            // Watched from now, so a shutdown waits for a handshake under way too.
            let mut watcher = drain.watcher();
            // Two futures, each boxed on its own, so that what is moved per connection is
            // only what it holds (see `Protocols::serve`).
            let served: Served = match self.tls.clone() {
                None => {
                    let mut io = FirstByte::new(io, limit);
                    Box::pin(async move {
                        let protocol = if upgrades {
                            // A connection that has not said what it speaks has nothing in
                            // flight: a drain closes it at once.
                            let opening = tokio::select! {
                                opening = io.opening() => opening?,
                                _ = watcher.changed() => return Ok(()),
                            };
                            match opening {
                                Opening::Speaks(protocol) => protocol,
                                Opening::Closed => return Ok(()),
                            }
                        } else {
                            Protocol::Http1
                        };
                        path.serve(&protocols, protocol, upgrades, io, service, watcher)
                            .await
                    })
                }
                Some(tls) => Box::pin(async move {
                    let Some((io, negotiated)) = tls.handshake(io, peer, limit, name).await else {
                        return Ok(());
                    };
                    let protocol = match negotiated {
                        Negotiated::Http2 if upgrades => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let io = FirstByte::new(io, limit);
                    path.serve(&protocols, protocol, upgrades, io, service, watcher)
                        .await
                }),
            };
            let lifetime = self.limits.connection_lifetime;
            tokio::spawn(async move {
                let result = match lifetime {
                    Some(lifetime) => match tokio::time::timeout(lifetime, served).await {
                        Ok(result) => result,
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "connection closed at the end of its life");
                            Ok(())
                        }
                    },
                    None => served.await,
                };
                if let Err(error) = result {
                    tracing::debug!(listener = name, %peer, %error, "connection ended");
                }
                drop(slot);
            });
        }
        drop(listener);
        let open = drain.open();
        if open > 0 {
            tracing::info!(
                listener = self.name,
                connections = open,
                "shutting down: finishing open connections"
            );
        }
        tokio::select! {
            () = drain.finish_all() => true,
            () = tokio::time::sleep(self.limits.drain_timeout) => {
                tracing::warn!(listener = self.name, "drain timeout passed with connections still open");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Instant;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    use super::*;

    use crate::Stop;

    /// Requests to `/hold` tell `arrived`, then wait for `release`.
    #[derive(Default)]
    struct Hold {
        arrived: Notify,
        release: Notify,
    }

    /// A server under test, serving on a loopback port until `stop` is stopped or dropped.
    struct Running {
        addr: SocketAddr,
        /// The task serving, which yields `serve`'s result.
        task: tokio::task::JoinHandle<bool>,
        stop: Stop,
        /// What holds its requests to `/hold`.
        hold: Arc<Hold>,
    }

    async fn start(limits: Limits) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = HttpServer::new("test", limits);
        let (stop, hold) = (Stop::new(), Arc::new(Hold::default()));
        let (shutdown, held) = (stop.shutdown(), Arc::clone(&hold));
        let task = tokio::spawn(async move {
            server
                .serve(listener, &shutdown, |stream, _| {
                    let hold = Arc::clone(&held);
                    let service = service_fn(move |request: Request<Incoming>| {
                        let hold = Arc::clone(&hold);
                        async move {
                            if request.uri().path() == "/hold" {
                                hold.arrived.notify_one();
                                hold.release.notified().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    });
                    (stream, service)
                })
                .await
        });
        Running {
            addr,
            task,
            stop,
            hold,
        }
    }

    fn limits() -> Limits {
        Limits {
            drain_timeout: Duration::from_secs(10),
            ..Limits::control()
        }
    }

    /// Sends one HTTP/1.1 request on `stream` and reads the response head's status line.
    async fn request(stream: &mut TcpStream, path: &str) -> String {
        let head = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// Reads until the server closes the connection; how long that took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
        start.elapsed()
    }

    #[tokio::test]
    async fn a_full_listener_takes_the_next_connection_only_when_one_closes() {
        let limits = Limits {
            max_connections: Some(2),
            ..limits()
        };
        let server = start(limits).await;
        let mut first = TcpStream::connect(server.addr).await.unwrap();
        let mut second = TcpStream::connect(server.addr).await.unwrap();
        assert!(request(&mut first, "/").await.contains("200"));
        assert!(request(&mut second, "/").await.contains("200"));
        // The third is queued by the kernel, not served: its request gets no answer while the
        // other two stay open...
        let mut third = TcpStream::connect(server.addr).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(500), request(&mut third, "/"));
        assert!(waiting.await.is_err(), "a third connection was served");
        // ...and is served as soon as one of them closes.
        drop(first);
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .expect("the queued connection was never served")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200"));
    }

    #[tokio::test]
    async fn a_client_that_sends_no_whole_head_is_closed_after_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..limits()
        };
        let server = start(limits).await;
        // One client starts a head and stops; the other sends nothing at all.
        for (client, sent) in [
            ("an idle client", &b"GET / HT"[..]),
            ("a silent client", b""),
        ] {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.write_all(sent).await.unwrap();
            let took = tokio::time::timeout(Duration::from_secs(10), closed_after(&mut stream))
                .await
                .unwrap_or_else(|_| panic!("{client} was never closed"));
            assert!(
                took >= Duration::from_millis(250),
                "{client} closed after {took:?}"
            );
        }
        // A client that speaks in time is served as usual, HTTP/1 or HTTP/2.
        let mut prompt = TcpStream::connect(server.addr).await.unwrap();
        assert!(request(&mut prompt, "/").await.contains("200"));
    }

    #[tokio::test]
    async fn a_busy_connection_ends_at_the_end_of_its_life() {
        let limits = Limits {
            connection_lifetime: Some(Duration::from_millis(500)),
            ..limits()
        };
        let server = start(limits).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let start = Instant::now();
        // Keep it busy: a request every 50 ms until the server closes it.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let head = "GET / HTTP/1.1\r\nhost: t\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 1024];
                if stream.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        ended.await.expect("the connection outlived its life");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(450), "ended after {took:?}");
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_request_in_flight_then_returns() {
        let Running {
            addr,
            task,
            stop,
            hold,
        } = start(limits()).await;
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        hold.arrived.notified().await;
        stop.stop();
        // New connections are refused once the listener is closed...
        let refused = async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("the listener stayed open after shutdown");
        // ...while the request in flight keeps serve from returning until it is answered: a
        // serve that did not wait would return within microseconds of the listener closing.
        let mut task = task;
        let returned = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
        assert!(returned.is_err(), "serve returned with a request in flight");
        hold.release.notify_one();
        let mut buf = vec![0u8; 1024];
        let n = held.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        let drained = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve did not return after its last request")
            .unwrap();
        assert!(drained, "every connection finished");
    }

    #[tokio::test]
    async fn connections_that_have_not_said_what_they_speak_do_not_hold_up_a_drain() {
        // Timeouts far longer than the test's own: only closing them at once passes.
        let limits = Limits {
            header_read_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(600),
            ..limits()
        };
        let Running {
            addr, task, stop, ..
        } = start(limits).await;
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        // Answered on a later connection: the two before it were accepted (the kernel hands
        // connections over in order).
        let mut later = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut later, "/").await.contains("200"));
        drop(later);
        stop.stop();
        let drained = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("serve waited for connections that had sent no request")
            .unwrap();
        assert!(drained, "every connection finished");
        drop((silent, partial));
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_request_after_the_drain_timeout() {
        let limits = Limits {
            drain_timeout: Duration::from_millis(500),
            ..limits()
        };
        let Running {
            addr,
            task,
            stop,
            hold,
        } = start(limits).await;
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        hold.arrived.notified().await;
        let start = Instant::now();
        stop.stop();
        let drained = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve never gave up")
            .unwrap();
        let took = start.elapsed();
        assert!(!drained, "the held request cannot have finished");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(5),
            "gave up after {took:?}, against a 500 ms drain timeout"
        );
    }
}
