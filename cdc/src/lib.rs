//! kvfeed's change feed: TiKV's `cdcpb.ChangeData` semantics without the
//! transport.
//!
//! A subscriber opens one connection, subscribes to regions (optionally a
//! sub-range of each) and receives every change the store applies inside
//! them: PREWRITE / COMMIT / ROLLBACK rows for two-phase commits, COMMITTED
//! rows for one-phase commits and raw writes. This crate owns the registry
//! of connections and subscriptions, turns applied store batches into rows,
//! and hands each connection a bounded stream of `ChangeDataEvent`s. It
//! knows the generated `cdcpb` messages but nothing of gRPC: the server's
//! `ChangeData` service only moves requests into [`Connection::handle`] and
//! events out of [`EventStream`].
//!
//! # Shape
//!
//! One *owner* task exclusively owns all mutable state (module `owner`):
//! the registry, the lock tracker, the per-step outbox. Everything else
//! talks to it through typed messages. There is no shared lock over the
//! registry, so no handler can observe it half-updated and no two code paths
//! can race to clean the same entry up.
//!
//! - [`Feed`] (module [`feed`]) starts the owner, registers the store
//!   observer, opens connections and answers queries.
//! - [`Connection`] / [`EventStream`] (module [`connection`]) are the two
//!   halves a server holds per client stream; [`connection::ConnGuard`] makes
//!   deregistration unconditional.
//! - [`subscription`] holds the per-subscription state machine.
//! - [`protocol`] parses the client's version and feature list.
//! - [`metrics`] and [`debug`] make the registry observable.
//!
//! # Channels and why they differ
//!
//! - Requests from [`Connection::handle`] travel over a *bounded* channel
//!   and are sent with `send().await`: a client that floods requests is
//!   slowed down to the owner's pace instead of growing a queue.
//! - Deregistrations (sent from `Drop`, which cannot await) and observed
//!   store batches (sent from inside the store's publish lock, which must not
//!   block) travel over an *unbounded* channel. Its growth is bounded by the
//!   store's own write rate; a memory quota on it is planned.
//! - Events to a client travel over a bounded per-connection channel that
//!   the owner only ever `try_send`s to: one slow reader cannot stall the
//!   owner, it gets a `congested` error instead.
//!
//! Because the two inbound channels are separate, the owner applies one
//! ordering rule: before it handles a request it drains every control
//! message already queued. Anything a handler did before sending a request
//! (opening its connection, or another connection's drop) is therefore
//! applied before the request is.

pub mod config;
pub mod connection;
pub mod debug;
pub mod error;
pub mod feed;
pub mod ids;
pub mod metrics;
mod owner;
pub mod protocol;
pub mod subscription;

pub use config::FeedConfig;
pub use connection::{
    CloseReason, ConnGuard, ConnInfo, Connection, EventStream, RequestSource, ServeEnd, TryNext,
};
pub use debug::{ConnectionSnapshot, DebugSnapshot, FeedCounts, SubscriptionSnapshot};
pub use error::FeedError;
pub use feed::{Feed, FeedDeps};
pub use ids::{ConnId, KvApi, RegionId, RequestId};
pub use metrics::{FeedMetrics, TaskGuard};
pub use protocol::{Features, ProtocolVersion};
pub use subscription::SubscriptionState;

/// Upper bound on the row payload (sum of encoded rows) of one `Event`, as
/// TiKV batches them. A single row larger than this travels alone.
pub const EVENT_MAX_ROW_BYTES: usize = 32 * 1024;

/// Upper bound on the encoded size of one `ChangeDataEvent` (TiKV's cap), so
/// a message stays well inside a client's receive limit.
pub const CHANGE_DATA_EVENT_MAX_BYTES: usize = 6 * 1024 * 1024;
