//! The feed's memory quota: bytes of events waiting for slow consumers.
//!
//! # What is charged
//!
//! - Every `ChangeDataEvent` queued for a connection, at its encoded size,
//!   from the moment the owner queues it until its `EventStream` takes it
//!   (or the queue is purged or dropped). The connection's queue does the
//!   charging (module `queue`), under the same lock as the push and the
//!   pop, so a message is charged exactly once and uncharged exactly once.
//! - The live rows (and lock changes) an initializing subscription holds
//!   back while its catch-up scan runs, through a [`HeldCharge`] owned by
//!   the subscription: it moves with the held-back data and is released in
//!   `Drop`, so a subscription stopped on any path gives its bytes back.
//!
//! Both are charged to the connection ([`PendingBytes`]) and, through it,
//! to the feed-wide [`MemoryQuota`].
//!
//! # Limits
//!
//! A connection may hold at most `conn_memory_quota` bytes and all of them
//! together at most `sink_memory_quota`. Only the owner adds charges (the
//! stream, purges and drops only subtract), so what the owner sees as free
//! stays free until it uses it: admission checks cannot race. What
//! happens when an event does not fit is decided in `owner::outbound`
//! (congestion of the connection over its cap, or of the largest holders
//! when the feed-wide quota is full); writers are never blocked.
//!
//! # Honest gauges
//!
//! `kvfeed_cdc_memory_quota_bytes{kind="used"}` moves only together with the
//! atomic counter it mirrors, in the same calls, so it returns to 0 exactly
//! when nothing is charged.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::IntGauge;

use crate::config::FeedConfig;
use crate::metrics::{FeedMetrics, PendingBytes};

/// The feed-wide byte quota. Shared by every connection's [`PendingBytes`].
#[derive(Debug)]
pub(crate) struct MemoryQuota {
    capacity: u64,
    conn_capacity: u64,
    used: AtomicI64,
    used_gauge: IntGauge,
}

impl MemoryQuota {
    pub(crate) fn new(config: &FeedConfig, metrics: &FeedMetrics) -> MemoryQuota {
        let capacity = config.sink_memory_quota.max(1);
        let conn_capacity = config.effective_conn_memory_quota();
        metrics
            .memory_quota
            .with_label_values(&["capacity"])
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        MemoryQuota {
            capacity,
            conn_capacity,
            used: AtomicI64::new(0),
            used_gauge: metrics.memory_quota.with_label_values(&["used"]),
        }
    }

    pub(crate) fn add(&self, bytes: i64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.used_gauge.add(bytes);
    }

    pub(crate) fn sub(&self, bytes: i64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.used_gauge.sub(bytes);
    }

    /// Bytes charged feed-wide.
    pub(crate) fn used(&self) -> u64 {
        u64::try_from(self.used.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Whether `bytes` more still fit the feed-wide quota.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.used().saturating_add(bytes as u64) <= self.capacity
    }

    /// Whether a connection holding `charged` may take `bytes` more.
    pub(crate) fn fits_conn(&self, charged: u64, bytes: usize) -> bool {
        charged.saturating_add(bytes as u64) <= self.conn_capacity
    }

    pub(crate) fn conn_capacity(&self) -> u64 {
        self.conn_capacity
    }
}

/// Bytes an initializing subscription holds back, charged to its
/// connection (and the feed) for as long as this value lives.
#[derive(Debug)]
pub(crate) struct HeldCharge {
    pending: Arc<PendingBytes>,
    bytes: usize,
}

impl HeldCharge {
    pub(crate) fn new(pending: Arc<PendingBytes>) -> HeldCharge {
        HeldCharge { pending, bytes: 0 }
    }

    /// Sets the charge to `bytes`.
    pub(crate) fn set(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            self.pending.hold(bytes - self.bytes);
        } else {
            self.pending.release(self.bytes - bytes);
        }
        self.bytes = bytes;
    }

    /// Whether the connection is over its cap or the feed over its quota.
    pub(crate) fn over_quota(&self) -> bool {
        !self.pending.fits(0)
    }
}

impl Drop for HeldCharge {
    fn drop(&mut self) {
        self.pending.release(self.bytes);
    }
}
