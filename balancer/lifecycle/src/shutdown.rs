//! The shutdown signal every loop selects on.

use std::future::Future;

use tokio::sync::watch;

/// The sending side of a shutdown: [`Stop::stop`] (or dropping it) tells every [`Shutdown`]
/// made from it.
#[derive(Debug)]
pub struct Stop {
    sender: watch::Sender<bool>,
}

/// The receiving side: cloned into every loop, which selects on [`Shutdown::wait`].
/// Cheap to clone; every clone sees the same signal.
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Stop {
    /// A new signal, not yet given.
    pub fn new() -> Self {
        let (sender, _) = watch::channel(false);
        Self { sender }
    }

    /// A receiver of this signal.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            receiver: self.sender.subscribe(),
        }
    }

    /// Gives the signal: every [`Shutdown::wait`] completes. Idempotent.
    pub fn stop(&self) {
        self.sender.send_replace(true);
    }
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown that comes only when `signal` completes: for callers (and tests) that
    /// already have a future that says when to stop.
    pub fn on(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let stop = Stop::new();
        let shutdown = stop.shutdown();
        tokio::spawn(async move {
            signal.await;
            stop.stop();
        });
        shutdown
    }

    /// A shutdown that never comes (for a part whose life is its process's).
    pub fn never() -> Self {
        // One sender for the life of the process, on which nothing is ever sent.
        static NEVER: std::sync::OnceLock<Stop> = std::sync::OnceLock::new();
        NEVER.get_or_init(Stop::new).shutdown()
    }

    /// Completes once the signal was given or its [`Stop`] dropped; at once if that has
    /// happened already.
    pub async fn wait(&self) {
        let mut receiver = self.receiver.clone();
        // An error means the `Stop` is gone, which also means stop.
        let _ = receiver.wait_for(|stop| *stop).await;
    }

    /// Whether the signal was given (or its [`Stop`] dropped).
    pub fn is_stopped(&self) -> bool {
        *self.receiver.borrow() || self.receiver.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_clone_hears_the_stop_even_if_it_came_first() {
        let stop = Stop::new();
        let early = stop.shutdown();
        let waiter = tokio::spawn({
            let early = early.clone();
            async move { early.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished() && !early.is_stopped());
        stop.stop();
        waiter.await.unwrap();
        // A receiver made after the stop sees it at once.
        let late = stop.shutdown();
        assert!(late.is_stopped());
        late.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stop_stops_too() {
        let stop = Stop::new();
        let shutdown = stop.shutdown();
        drop(stop);
        assert!(shutdown.is_stopped());
        shutdown.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_can_be_the_signal_and_never_never_comes() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async move {
            let _ = rx.await;
        });
        let never = Shutdown::never();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!shutdown.is_stopped());
        tx.send(()).unwrap();
        shutdown.wait().await;
        assert!(!never.is_stopped());
        let waited = tokio::time::timeout(Duration::from_secs(3600), never.wait()).await;
        assert!(waited.is_err(), "never stopped");
    }
}
