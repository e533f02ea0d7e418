//! The feed's Prometheus metrics, plus the two guards that keep gauges
//! honest.
//!
//! Gauges here are only ever moved by values whose lifetime matches what
//! they count: the registry moves the connection and subscription gauges in
//! the same functions that insert and remove entries; `PendingBytes` moves
//! the pending-bytes gauge together with its connection's own counter;
//! [`TaskGuard`] moves the task gauge in `new` and `Drop`; `ScanTaskGuard`
//! moves the ongoing-scan gauge the same way and counts each scan as
//! finished or aborted exactly once, in `Drop`. So a gauge cannot drift
//! from the state it describes on any path, including panics and
//! cancellation, and "all gauges are 0" is a meaningful leak check.
//!
//! Each [`FeedMetrics`] is its own set of collectors (not prometheus'
//! process-wide registry), so two feeds in one test process never mix.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;

use crate::error::FeedError;
use crate::quota::MemoryQuota;

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
    pub(crate) scan_tasks: IntGaugeVec,
    pub(crate) scanned_bytes: IntCounter,
    pub(crate) scanned_rows: IntCounter,
    pub(crate) resolved_ts_lag: Gauge,
    pub(crate) min_ts_interval: Gauge,
    pub(crate) memory_quota: IntGaugeVec,
    pub(crate) congested: IntCounter,
    pub(crate) observed_queue_bytes: IntGauge,
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
            scan_tasks: IntGaugeVec::new(
                Opts::new(
                    "kvfeed_cdc_scan_tasks",
                    "Catch-up scans: ongoing (queued or running) now, and finished or \
                     aborted since start.",
                ),
                &["state"],
            )
            .map_err(FeedError::Metrics)?,
            scanned_bytes: counter(
                "kvfeed_cdc_scanned_bytes_total",
                "Bytes (keys and values) read from the store by catch-up scans.",
            )?,
            scanned_rows: counter(
                "kvfeed_cdc_scanned_rows_total",
                "Change rows (committed versions and locks) found by catch-up scans.",
            )?,
            resolved_ts_lag: Gauge::new(
                "kvfeed_cdc_resolved_ts_lag_seconds",
                "Physical time between the latest min ts and the lowest resolved ts of any \
                 initialized subscription (0 without one).",
            )
            .map_err(FeedError::Metrics)?,
            min_ts_interval: Gauge::new(
                "kvfeed_cdc_min_ts_interval_seconds",
                "The configured min-ts-interval: how often resolved timestamps are computed.",
            )
            .map_err(FeedError::Metrics)?,
            memory_quota: IntGaugeVec::new(
                Opts::new(
                    "kvfeed_cdc_memory_quota_bytes",
                    "The sink memory quota: bytes charged for events queued for connections \
                     and rows held back by initializing subscriptions (used), and its size \
                     (capacity).",
                ),
                &["kind"],
            )
            .map_err(FeedError::Metrics)?,
            congested: counter(
                "kvfeed_cdc_congested_total",
                "Subscriptions stopped with the congested error (memory quota, queue full, \
                 held-back rows over their cap, or a stalled reader during a catch-up scan).",
            )?,
            observed_queue_bytes: gauge(
                "kvfeed_cdc_observed_queue_bytes",
                "Bytes of applied store batches announced to the feed and not yet routed \
                 (the unbounded control channel; not part of the memory quota).",
            )?,
        })
    }

    /// Registers every collector into `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), FeedError> {
        let collectors: [Box<dyn prometheus::core::Collector>; 15] = [
            Box::new(self.connections.clone()),
            Box::new(self.subscriptions.clone()),
            Box::new(self.pending_bytes.clone()),
            Box::new(self.events_sent.clone()),
            Box::new(self.sent_bytes.clone()),
            Box::new(self.aborted.clone()),
            Box::new(self.connection_tasks.clone()),
            Box::new(self.scan_tasks.clone()),
            Box::new(self.scanned_bytes.clone()),
            Box::new(self.scanned_rows.clone()),
            Box::new(self.resolved_ts_lag.clone()),
            Box::new(self.min_ts_interval.clone()),
            Box::new(self.memory_quota.clone()),
            Box::new(self.congested.clone()),
            Box::new(self.observed_queue_bytes.clone()),
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

    /// Catch-up scans in `state` (`ongoing`, `finished` or `aborted`).
    pub fn scan_tasks(&self, state: &str) -> i64 {
        self.scan_tasks.with_label_values(&[state]).get()
    }

    /// Bytes read from the store by catch-up scans so far.
    pub fn scanned_bytes(&self) -> u64 {
        self.scanned_bytes.get()
    }

    /// Rows (committed versions and locks) found by catch-up scans.
    pub fn scanned_rows(&self) -> u64 {
        self.scanned_rows.get()
    }

    /// The configured `min-ts-interval`, seconds.
    pub fn min_ts_interval_seconds(&self) -> f64 {
        self.min_ts_interval.get()
    }

    /// The last resolved-ts lag, in seconds.
    pub fn resolved_ts_lag_seconds(&self) -> f64 {
        self.resolved_ts_lag.get()
    }

    /// Bytes charged to the sink memory quota now.
    pub fn memory_quota_used(&self) -> i64 {
        self.memory_quota.with_label_values(&["used"]).get()
    }

    /// The sink memory quota's size in bytes.
    pub fn memory_quota_capacity(&self) -> i64 {
        self.memory_quota.with_label_values(&["capacity"]).get()
    }

    /// Subscriptions stopped with `congested` so far.
    pub fn congested(&self) -> u64 {
        self.congested.get()
    }

    /// Bytes of observed store batches not yet routed by the owner.
    pub fn observed_queue_bytes(&self) -> i64 {
        self.observed_queue_bytes.get()
    }
}

/// How a catch-up scan ended, for `kvfeed_cdc_scan_tasks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanOutcome {
    /// Every row and the end of the scan were handed to the owner.
    Finished,
    /// Cancelled (its subscription or connection went away, or the feed
    /// stopped) or failed.
    Aborted,
}

/// Counts one catch-up scan as ongoing while held, and as finished or
/// aborted when dropped. A scan is aborted unless it declared otherwise, so
/// a scan task dropped mid-way (cancellation, shutdown, panic) is counted
/// as aborted without any code having to run "after an await".
#[derive(Debug)]
pub(crate) struct ScanTaskGuard {
    metrics: FeedMetrics,
    outcome: ScanOutcome,
}

impl ScanTaskGuard {
    pub(crate) fn new(metrics: &FeedMetrics) -> ScanTaskGuard {
        metrics.scan_tasks.with_label_values(&["ongoing"]).inc();
        ScanTaskGuard {
            metrics: metrics.clone(),
            outcome: ScanOutcome::Aborted,
        }
    }

    pub(crate) fn set_outcome(&mut self, outcome: ScanOutcome) {
        self.outcome = outcome;
    }
}

impl Drop for ScanTaskGuard {
    fn drop(&mut self) {
        let tasks = &self.metrics.scan_tasks;
        tasks.with_label_values(&["ongoing"]).dec();
        let state = match self.outcome {
            ScanOutcome::Finished => "finished",
            ScanOutcome::Aborted => "aborted",
        };
        tasks.with_label_values(&[state]).inc();
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

/// Bytes queued in one connection's event queue and not yet taken by its
/// `EventStream`, mirrored into the global gauge, plus the bytes its
/// initializing subscriptions hold back; both are charged to the feed's
/// [`MemoryQuota`] (see module `quota`). It also wakes catch-up scans of
/// the connection that wait for the client to take events (`drained`),
/// which is how a scan is paced by its reader.
///
/// The queue adds under its lock when it accepts an event and subtracts
/// when the event leaves it (taken, purged, or dropped with the queue), so
/// every byte added is subtracted exactly once. Held bytes are added and
/// subtracted by `quota::HeldCharge`, whose `Drop` returns them.
#[derive(Debug)]
pub(crate) struct PendingBytes {
    conn: AtomicI64,
    held: AtomicI64,
    gauge: IntGauge,
    quota: Arc<MemoryQuota>,
    drained: Notify,
}

fn signed(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl PendingBytes {
    pub(crate) fn new(metrics: &FeedMetrics, quota: Arc<MemoryQuota>) -> PendingBytes {
        PendingBytes {
            conn: AtomicI64::new(0),
            held: AtomicI64::new(0),
            gauge: metrics.pending_bytes.clone(),
            quota,
            drained: Notify::new(),
        }
    }

    pub(crate) fn add(&self, bytes: usize) {
        let bytes = signed(bytes);
        self.conn.fetch_add(bytes, Ordering::Relaxed);
        self.gauge.add(bytes);
        self.quota.add(bytes);
    }

    pub(crate) fn sub(&self, bytes: usize) {
        let bytes = signed(bytes);
        self.conn.fetch_sub(bytes, Ordering::Relaxed);
        self.gauge.sub(bytes);
        self.quota.sub(bytes);
        // Only waiters registered now are woken; a scan registers before it
        // checks for room (see `scan::pace`), so it cannot miss this.
        self.drained.notify_waiters();
    }

    /// Charges bytes held back by an initializing subscription.
    pub(crate) fn hold(&self, bytes: usize) {
        let bytes = signed(bytes);
        self.held.fetch_add(bytes, Ordering::Relaxed);
        self.quota.add(bytes);
    }

    /// Returns bytes charged by [`PendingBytes::hold`].
    pub(crate) fn release(&self, bytes: usize) {
        let bytes = signed(bytes);
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.quota.sub(bytes);
    }

    /// Notified whenever queued events are taken (or dropped).
    pub(crate) fn drained(&self) -> &Notify {
        &self.drained
    }

    /// The connection's pending bytes. An add happens before the queueing
    /// that makes the matching take possible, so the count is never
    /// negative; the conversion clamps anyway rather than trust that.
    pub(crate) fn get(&self) -> u64 {
        u64::try_from(self.conn.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Everything charged to the connection: queued plus held back.
    pub(crate) fn charged(&self) -> u64 {
        let held = u64::try_from(self.held.load(Ordering::Relaxed)).unwrap_or(0);
        self.get().saturating_add(held)
    }

    /// Whether `bytes` more fit both the connection's cap and the feed's
    /// quota.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.quota.fits_conn(self.charged(), bytes) && self.quota.fits(bytes)
    }

    /// Whether `bytes` more fit the connection's own cap.
    pub(crate) fn fits_conn(&self, bytes: usize) -> bool {
        self.quota.fits_conn(self.charged(), bytes)
    }

    pub(crate) fn quota(&self) -> &Arc<MemoryQuota> {
        &self.quota
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

    #[test]
    fn a_scan_counts_once_as_finished_or_aborted() {
        let metrics = FeedMetrics::new().expect("valid definitions");
        let mut done = ScanTaskGuard::new(&metrics);
        let dropped = ScanTaskGuard::new(&metrics);
        assert_eq!(metrics.scan_tasks("ongoing"), 2);
        done.set_outcome(ScanOutcome::Finished);
        drop(done);
        drop(dropped);
        assert_eq!(
            (
                metrics.scan_tasks("ongoing"),
                metrics.scan_tasks("finished"),
                metrics.scan_tasks("aborted")
            ),
            (0, 1, 1)
        );
    }
}
