//! Graceful shutdown: one signal that every long-lived task subscribes to,
//! and a way to wait until all of them have finished.
//!
//! A [`Shutdown`] owns the sending side of a `watch` channel; each task holds
//! a [`ShutdownSignal`] (a receiver). Triggering flips the value once, so a
//! task that subscribes late still sees it. Because every holder keeps a
//! receiver alive, "all receivers dropped" means "every task that subscribed
//! has ended", which is what [`Shutdown::wait_for_holders`] waits for before
//! the store is flushed and the data-dir lock released. Hence the invariant a
//! component must keep: hold the signal for as long as it may touch the node,
//! and drop it when done.
//!
//! [`OsSignals`] turns SIGINT / SIGTERM into that trigger. It registers its
//! handlers when created, not when first awaited: a signal that arrives right
//! after the startup line must be caught, not take the default action.

use std::time::Duration;

use tokio::sync::watch;

/// The shutdown trigger, owned by the node.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

/// Some holders still held their signal when the grace period ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{holders} task(s) still running after the shutdown grace period")]
pub struct StillRunning {
    pub holders: usize,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Shutdown { tx }
    }

    /// A signal for one task. Hold it while the task runs; dropping it tells
    /// [`Shutdown::wait_for_holders`] that the task is done.
    pub fn subscribe(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    /// Starts shutting down. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    #[cfg(test)]
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Waits until every [`ShutdownSignal`] has been dropped, at most `grace`.
    pub async fn wait_for_holders(&self, grace: Duration) -> Result<(), StillRunning> {
        match tokio::time::timeout(grace, self.tx.closed()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(StillRunning {
                holders: self.tx.receiver_count(),
            }),
        }
    }
}

/// One task's view of the shutdown trigger. Cloning creates another holder.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl ShutdownSignal {
    /// Completes once shutdown has been triggered (at once if it already was).
    /// Cancel-safe, so it can sit in a `select!` loop.
    pub async fn recv(&mut self) {
        // An error means the trigger itself is gone: the node is being torn
        // down, which is a shutdown too.
        let _ = self.rx.wait_for(|triggered| *triggered).await;
    }

    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere), registered at creation.
pub struct OsSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl OsSignals {
    /// Installs the handlers. Needs a running tokio runtime.
    pub fn install() -> std::io::Result<OsSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(OsSignals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(OsSignals {})
        }
    }

    /// Waits for the next signal and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            // On failure to listen, never report a signal rather than report
            // one that did not happen.
            match tokio::signal::ctrl_c().await {
                Ok(()) => "Ctrl-C",
                Err(_) => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signal_fires_for_early_and_late_subscribers() {
        let shutdown = Shutdown::new();
        let mut early = shutdown.subscribe();
        assert!(!early.is_shutdown());
        assert!(!shutdown.is_triggered());
        shutdown.trigger();
        early.recv().await;
        let mut late = shutdown.subscribe();
        assert!(late.is_shutdown());
        late.recv().await;
        shutdown.trigger();
        assert!(shutdown.is_triggered());
    }

    #[tokio::test]
    async fn waits_until_every_holder_is_done() {
        let shutdown = Shutdown::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for id in 0..3 {
            let mut signal = shutdown.subscribe();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                signal.recv().await;
                // Report before dropping the signal: the waiter must not
                // return until the drop below.
                let _ = done_tx.send(id);
                drop(signal);
            });
        }
        drop(done_tx);
        shutdown.trigger();
        shutdown
            .wait_for_holders(Duration::from_secs(3600))
            .await
            .expect("all holders finish");
        let mut finished = Vec::new();
        while let Some(id) = done_rx.recv().await {
            finished.push(id);
        }
        finished.sort_unstable();
        assert_eq!(finished, vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_grace_period() {
        let shutdown = Shutdown::new();
        let _stuck = shutdown.subscribe();
        let _also_stuck = _stuck.clone();
        shutdown.trigger();
        let started = tokio::time::Instant::now();
        let err = shutdown
            .wait_for_holders(Duration::from_secs(5))
            .await
            .expect_err("holders never drop");
        assert_eq!(err.holders, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn no_holders_means_nothing_to_wait_for() {
        let shutdown = Shutdown::new();
        shutdown
            .wait_for_holders(Duration::ZERO)
            .await
            .expect("no holders");
    }
}
