//! The feed's Prometheus metrics, plus the two guards that keep gauges
//! honest.
//!
//! Gauges here are only ever moved by values whose lifetime matches what
//! they count: the registry moves the connection and subscription gauges in
//! the same functions that insert and remove entries; `PendingBytes` moves
//! the pending-bytes gauge together with its connection's own counter;
//! [`TaskGuard`] moves the task gauge in `new` and `Drop`. So a gauge cannot
//! drift from the state it describes on any path, including panics and
//! cancellation, and "all gauges are 0" is a meaningful leak check.
//!
//! Each [`FeedMetrics`] is its own set of collectors (not prometheus'
//! process-wide registry), so two feeds in one test process never mix.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::FeedError;

/// The feed's collectors. Cloning shares them.
#[derive(Clone, Debug)]
pub struct FeedMetrics {
    pub(crate) connections: IntGauge,
    pub(crate) subscriptions: IntGauge,
    pub(crate) pending_bytes: IntGauge,
    pub(crate) events_sent: IntCounter,
    pub(crate) sent_bytes: IntCounter,
    pub(crate) aborted: IntCounterVec,
    pub(crate) connection_tasks: IntGauge,
}

impl FeedMetrics {
    /// Fresh, unregistered collectors.
    pub fn new() -> Result<FeedMetrics, FeedError> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).map_err(FeedError::Metrics);
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).map_err(FeedError::Metrics);
        Ok(FeedMetrics {
            connections: gauge("kvfeed_cdc_connections", "Open change-feed connections.")?,
            subscriptions: gauge(
                "kvfeed_cdc_subscriptions",
                "Region subscriptions across all change-feed connections.",
            )?,
            pending_bytes: gauge(
                "kvfeed_cdc_pending_bytes",
                "Encoded bytes of events queued for connections and not yet taken by them.",
            )?,
            events_sent: counter(
                "kvfeed_cdc_events_sent_total",
                "ChangeDataEvent messages taken by connections' event streams.",
            )?,
            sent_bytes: counter(
                "kvfeed_cdc_sent_bytes_total",
                "Encoded bytes of ChangeDataEvent messages taken by connections' event streams.",
            )?,
            aborted: IntCounterVec::new(
                Opts::new(
                    "kvfeed_cdc_aborted_connections_total",
                    "Change-feed connections ended, by reason (half_close is the clean end).",
                ),
                &["reason"],
            )
            .map_err(FeedError::Metrics)?,
            connection_tasks: gauge(
                "kvfeed_cdc_connection_tasks",
                "Live per-connection server tasks (each holds a TaskGuard).",
            )?,
        })
    }

    /// Registers every collector into `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), FeedError> {
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(self.connections.clone()),
            Box::new(self.subscriptions.clone()),
            Box::new(self.pending_bytes.clone()),
            Box::new(self.events_sent.clone()),
            Box::new(self.sent_bytes.clone()),
            Box::new(self.aborted.clone()),
            Box::new(self.connection_tasks.clone()),
        ];
        for c in collectors {
            registry.register(c).map_err(FeedError::Metrics)?;
        }
        Ok(())
    }

    /// Open connections.
    pub fn connections(&self) -> i64 {
        self.connections.get()
    }

    /// Live subscriptions.
    pub fn subscriptions(&self) -> i64 {
        self.subscriptions.get()
    }

    /// Bytes queued for connections and not yet taken.
    pub fn pending_bytes(&self) -> i64 {
        self.pending_bytes.get()
    }

    /// ChangeDataEvents taken by event streams so far.
    pub fn events_sent(&self) -> u64 {
        self.events_sent.get()
    }

    /// Bytes of ChangeDataEvents taken by event streams so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.get()
    }

    /// Connections ended with `reason` (a `CloseReason` label) so far.
    pub fn aborted(&self, reason: &str) -> u64 {
        self.aborted.with_label_values(&[reason]).get()
    }

    /// Live connection tasks (held [`TaskGuard`]s).
    pub fn connection_tasks(&self) -> i64 {
        self.connection_tasks.get()
    }
}

/// Counts one live per-connection task while held. The server creates one
/// (`Feed::task_guard`) at the top of each connection task; because it is
/// released by `Drop`, an aborted or panicking task is uncounted as surely
/// as one that returns.
#[derive(Debug)]
pub struct TaskGuard {
    gauge: IntGauge,
}

impl TaskGuard {
    pub(crate) fn new(metrics: &FeedMetrics) -> TaskGuard {
        metrics.connection_tasks.inc();
        TaskGuard {
            gauge: metrics.connection_tasks.clone(),
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Bytes queued in one connection's event channel and not yet taken by its
/// `EventStream`, mirrored into the global gauge.
///
/// The owner adds *before* it tries to queue an event (and subtracts again
/// if that fails); the stream subtracts when it takes one, and when it is
/// dropped it drains what is left. So every byte added is subtracted exactly
/// once, whichever side goes first.
#[derive(Debug)]
pub(crate) struct PendingBytes {
    conn: AtomicI64,
    gauge: IntGauge,
}

impl PendingBytes {
    pub(crate) fn new(metrics: &FeedMetrics) -> PendingBytes {
        PendingBytes {
            conn: AtomicI64::new(0),
            gauge: metrics.pending_bytes.clone(),
        }
    }

    pub(crate) fn add(&self, bytes: usize) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.conn.fetch_add(bytes, Ordering::Relaxed);
        self.gauge.add(bytes);
    }

    pub(crate) fn sub(&self, bytes: usize) {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.conn.fetch_sub(bytes, Ordering::Relaxed);
        self.gauge.sub(bytes);
    }

    /// The connection's pending bytes. An add happens before the queueing
    /// that makes the matching take possible, so the count is never
    /// negative; the conversion clamps anyway rather than trust that.
    pub(crate) fn get(&self) -> u64 {
        u64::try_from(self.conn.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_register_once_per_registry() {
        let registry = Registry::new();
        let metrics = FeedMetrics::new().expect("valid definitions");
        metrics.register(&registry).expect("first registration");
        assert!(matches!(
            metrics.register(&registry),
            Err(FeedError::Metrics(_))
        ));
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("kvfeed_cdc_")),
            "{names:?}"
        );
        let guard = TaskGuard::new(&metrics);
        assert_eq!(metrics.connection_tasks(), 1);
        drop(guard);
        assert_eq!(metrics.connection_tasks(), 0);
    }
}
