//! Point-in-time views of the registry, for the status server's debug page
//! and for tests.
//!
//! A snapshot is taken by the owner between two steps, after flushing its
//! outbox, so it is internally consistent (no subscription without its
//! connection, pending bytes include everything already queued) and
//! reflects every request and control message sent before it was asked for.

use serde::Serialize;

use crate::ids::KvApi;
use crate::subscription::SubscriptionState;

/// Every connection and its subscriptions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DebugSnapshot {
    /// Registered connections, each with the subscriptions it carries.
    pub connections: Vec<ConnectionSnapshot>,
}

impl DebugSnapshot {
    /// Subscriptions across all connections.
    pub fn subscription_count(&self) -> usize {
        self.connections.iter().map(|c| c.subscriptions.len()).sum()
    }
}

/// One connection.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionSnapshot {
    /// The connection id the registry assigned; unique for the life of the feed.
    pub id: u64,
    /// The client's address as the transport reported it.
    pub peer: String,
    /// The protocol version fixed by the first request; `None` before it.
    pub version: Option<String>,
    /// Names of the optional protocol features the client announced in its
    /// `features` metadata (e.g. `stream-multiplexing`).
    pub features: Vec<&'static str>,
    /// Whole seconds since the connection was registered.
    pub age_secs: u64,
    /// Bytes queued for the connection and not yet taken by its stream.
    pub pending_bytes: u64,
    /// The connection's live subscriptions (stopped ones are already gone).
    pub subscriptions: Vec<SubscriptionSnapshot>,
}

/// One subscription.
#[derive(Clone, Debug, Serialize)]
pub struct SubscriptionSnapshot {
    /// The client-chosen id that, with the region, names the subscription
    /// on its connection.
    pub request_id: u64,
    /// The region the subscription watches.
    pub region_id: u64,
    /// Where the subscription is in its life (catch-up scan or live).
    pub state: SubscriptionState,
    /// The effective range (request ∩ region), hex.
    pub start_key: String,
    /// Exclusive end of the effective range, hex; empty means unbounded.
    pub end_key: String,
    /// Which key space the subscription watches: transactional or raw.
    pub kv_api: KvApi,
    /// The Register's checkpoint: the catch-up scan reports later commits.
    pub checkpoint_ts: u64,
    /// The last resolved ts sent (0 before the first).
    pub resolved_ts: u64,
    /// Locks holding its resolved ts back (transactional, once initialized).
    pub tracked_locks: usize,
}

/// Registry totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FeedCounts {
    /// Registered connections.
    pub connections: usize,
    /// Subscriptions across all connections.
    pub subscriptions: usize,
    /// Bytes queued for connections (including ones the registry has already
    /// let go of whose streams still hold events) and not yet taken.
    pub pending_bytes: u64,
    /// Catch-up scans queued or running (including ones winding down after
    /// their subscription went away).
    pub scans: usize,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}
