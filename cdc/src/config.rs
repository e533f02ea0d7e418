//! Tunables of the feed. Every limit here exists so that one client cannot
//! make the server's memory or the owner's work unbounded.

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
    /// least 1. (A byte quota will replace this count.)
    pub sink_capacity: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            max_subscriptions_per_conn: 100_000,
            command_queue: 1024,
            sink_capacity: 1024,
        }
    }
}
