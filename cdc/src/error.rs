//! The feed's error type.
//!
//! Only failures of the *caller's* operation are errors here. A refused
//! subscription (unknown region, stale epoch, duplicate, cluster mismatch...)
//! is not: the protocol answers it with an `Error` event on the stream for
//! that one subscription, and the connection goes on. What remains is what a
//! server must turn into a stream status or stop on, each kept distinct so
//! it can be mapped precisely (an unknown feature or an unsupported request
//! is UNIMPLEMENTED naming it; a shut-down feed ends streams cleanly).

use crate::ids::ConnId;

/// A failed feed operation.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The client asked for a protocol feature this server does not know.
    /// Servers answer UNIMPLEMENTED naming it, before connecting.
    #[error("unknown feature {0:?}")]
    UnknownFeature(String),
    /// A request kind the feed does not implement (e.g. NotifyTxnStatus).
    /// The connection should be ended; its guard cleans up.
    #[error("unsupported request: {0}")]
    Unsupported(String),
    /// The feed has been shut down (or its owner task has ended).
    #[error("the change feed is shut down")]
    ShuttingDown,
    /// The feed already ended this connection (its client stopped reading,
    /// was congested past recovery, or the feed shut down).
    #[error("connection {0} was ended by the feed")]
    ConnectionEnded(ConnId),
    /// The client's request stream failed (as reported by the transport).
    #[error("request stream failed: {0}")]
    RequestStream(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Registering the feed's metrics failed (e.g. a duplicate name).
    #[error("metric registration: {0}")]
    Metrics(#[source] prometheus::Error),
}
