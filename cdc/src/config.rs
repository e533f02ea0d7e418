//! Tunables of the feed. Every limit here exists so that one client cannot
//! make the server's memory or the owner's work unbounded.

use std::time::Duration;

/// The shortest resolved-ts interval the feed honours; a shorter configured
/// value is raised to it. Below it the loop would spend its time waking up
/// (and allocating timestamps) rather than resolving.
pub const MIN_TS_INTERVAL_FLOOR: Duration = Duration::from_millis(10);

/// Feed configuration. `Default` gives the production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedConfig {
    /// Subscriptions one connection may hold; a Register beyond it is
    /// answered with `server_is_busy`.
    pub max_subscriptions_per_conn: usize,
    /// Requests queued for the owner across all connections before
    /// `Connection::handle` waits (backpressure on clients). At least 1.
    pub command_queue: usize,
    /// `ChangeDataEvent`s queued per connection and not yet taken by its
    /// `EventStream`. When full, the connection's subscriptions are stopped
    /// with `congested`. One more slot is always kept for that error. At
    /// least 1. Bytes are bounded separately by the memory quota below.
    pub sink_capacity: usize,
    /// `sink-memory-quota`: bytes that all connections together may hold
    /// in events queued and not yet taken by their streams, plus the live
    /// rows their initializing subscriptions hold back. When an event does
    /// not fit, the connections holding the most are congested first (see
    /// `owner::outbound`). At least 1 is used. Default 512 MiB (TiKV's).
    pub sink_memory_quota: u64,
    /// The same bound for one connection; when an event would take the
    /// connection beyond it, that connection alone is congested. Capped at
    /// `sink_memory_quota`. Default 64 MiB.
    pub conn_memory_quota: u64,
    /// `min-ts-interval`: how often resolved timestamps are computed and
    /// sent. Values below [`MIN_TS_INTERVAL_FLOOR`] are raised to it.
    /// Default 1s (TiKV's).
    pub min_ts_interval: Duration,
    /// `incremental-scan-threads`: catch-up scan batches read at the same
    /// time, each on its own blocking thread. At least 1 is used. Default 4.
    pub incremental_scan_threads: usize,
    /// `incremental-scan-concurrency`: catch-up scans holding a snapshot at
    /// the same time; the others wait in a queue without one. At least 1 is
    /// used. Default 6.
    pub incremental_scan_concurrency: usize,
    /// `incremental-scan-concurrency-limit`: catch-up scans queued or
    /// running; a Register beyond it is answered with `server_is_busy`.
    /// Default 10000.
    pub incremental_scan_concurrency_limit: usize,
    /// `incremental-scan-speed-limit`: bytes per second read from the
    /// store by all catch-up scans together; 0 means unlimited.
    ///
    /// The default is 0, unlike TiKV's 128 MB/s: TiKV throttles scans to
    /// protect the foreground traffic of other tenants on a shared store,
    /// whereas one embedded node has no other tenant, and what a fast scan
    /// could otherwise pile up in memory is bounded separately (scan batches
    /// wait for the subscriber to take earlier ones).
    pub incremental_scan_speed_limit: u64,
    /// Encoded bytes of live rows (plus lock changes) one initializing
    /// subscription may hold back while its catch-up scan runs. Beyond it
    /// the subscription is stopped with `congested` instead of growing
    /// without limit. Default 16 MiB.
    pub scan_buffer_bytes: usize,
}

impl FeedConfig {
    /// [`FeedConfig::min_ts_interval`], raised to the floor.
    pub fn effective_min_ts_interval(&self) -> Duration {
        self.min_ts_interval.max(MIN_TS_INTERVAL_FLOOR)
    }

    /// [`FeedConfig::conn_memory_quota`], at least 1 and at most the
    /// feed-wide quota.
    pub fn effective_conn_memory_quota(&self) -> u64 {
        self.conn_memory_quota.min(self.sink_memory_quota).max(1)
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            max_subscriptions_per_conn: 100_000,
            command_queue: 1024,
            sink_capacity: 1024,
            sink_memory_quota: 512 << 20,
            conn_memory_quota: 64 << 20,
            min_ts_interval: Duration::from_secs(1),
            incremental_scan_threads: 4,
            incremental_scan_concurrency: 6,
            incremental_scan_concurrency_limit: 10_000,
            incremental_scan_speed_limit: 0,
            scan_buffer_bytes: 16 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_has_a_floor() {
        let fast = FeedConfig {
            min_ts_interval: Duration::from_millis(1),
            ..FeedConfig::default()
        };
        assert_eq!(fast.effective_min_ts_interval(), MIN_TS_INTERVAL_FLOOR);
        let slow = FeedConfig::default();
        assert_eq!(slow.effective_min_ts_interval(), Duration::from_secs(1));
    }

    #[test]
    fn the_connection_cap_is_at_most_the_global_quota() {
        let small = FeedConfig {
            sink_memory_quota: 1000,
            conn_memory_quota: 5000,
            ..FeedConfig::default()
        };
        assert_eq!(small.effective_conn_memory_quota(), 1000);
        let d = FeedConfig::default();
        assert_eq!(d.effective_conn_memory_quota(), 64 << 20);
    }
}
