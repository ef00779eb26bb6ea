//! `TCP_NODELAY` on accepted connections, in one system call per listener where the kernel
//! allows.

use socket2::SockRef;

/// How accepted connections get `TCP_NODELAY` (responses are small writes that must leave at
/// once). Set on the listening socket, Linux gives it to every connection it accepts, which
/// saves a system call per connection; the first connection is asked whether it did, and
/// where it did not (or the listener refused the option) each connection is set on its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NoDelay {
    /// Set on the listener; whether connections inherit it is not known yet.
    Unchecked,
    /// Connections inherit it from the listener.
    Inherited,
    /// Each connection is set on its own.
    PerConnection,
}

impl NoDelay {
    pub(crate) fn on_listener(listener: SockRef<'_>) -> Self {
        match listener.set_tcp_nodelay(true) {
            Ok(()) => Self::Unchecked,
            Err(_) => Self::PerConnection,
        }
    }

    /// Makes sure the accepted `stream` has `TCP_NODELAY`.
    pub(crate) fn set(&mut self, stream: SockRef<'_>, listener: &str) {
        if *self == Self::Unchecked {
            *self = if stream.tcp_nodelay().unwrap_or(false) {
                Self::Inherited
            } else {
                Self::PerConnection
            };
        }
        if *self == Self::PerConnection
            && let Err(error) = stream.set_tcp_nodelay(true)
        {
            tracing::debug!(listener, %error, "setting TCP_NODELAY");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut nodelay = NoDelay::on_listener(SockRef::from(&listener));
        for _ in 0..2 {
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            nodelay.set(SockRef::from(&stream), "test");
            assert!(stream.nodelay().expect("getsockopt"), "{nodelay:?}");
        }
        // Linux hands the listener's option to the connections it accepts.
        assert_eq!(nodelay, NoDelay::Inherited);
    }
}
