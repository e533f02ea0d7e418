//! kvfeed's change feed: TiKV's `cdcpb.ChangeData` semantics without the
//! transport.
//!
//! A subscriber opens one connection, subscribes to regions (optionally a
//! sub-range of each) from a checkpoint, and receives: a catch-up scan of
//! everything committed after the checkpoint, exactly one INITIALIZED row,
//! then every change the store applies inside its range (PREWRITE / COMMIT
//! / ROLLBACK rows for two-phase commits, COMMITTED rows for one-phase
//! commits and raw writes) and periodic resolved timestamps. This crate owns
//! the registry of connections and subscriptions, the catch-up scans, turns
//! applied store batches into rows, computes resolved timestamps, and hands
//! each connection a bounded stream of `ChangeDataEvent`s. It knows the
//! generated `cdcpb` messages but nothing of gRPC: the server's
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
//! - [`Feed`] (module [`feed`]) starts the owner, the resolved-ts task and
//!   the scan pool, registers the store observer, opens connections and
//!   answers queries.
//! - [`Connection`] / [`EventStream`] (module [`connection`]) are the two
//!   halves a server holds per client stream; [`connection::ConnGuard`] makes
//!   deregistration unconditional.
//! - [`subscription`] holds the per-subscription state machine
//!   (Initializing → Normal → Stopped).
//! - Module `scan` runs catch-up scans on blocking threads and hands their
//!   batches to the owner; module `ts_sampler` samples the inputs of
//!   resolved timestamps.
//! - [`protocol`] parses the client's version and feature list.
//! - [`metrics`] and [`debug`] make the registry observable.
//!
//! # Channels and why they differ
//!
//! - Requests from [`Connection::handle`] travel over a *bounded* channel
//!   and are sent with `send().await`: a client that floods requests is
//!   slowed down to the owner's pace instead of growing a queue.
//! - Deregistrations (sent from `Drop`, which cannot await), observed store
//!   batches (sent from inside the store's publish lock, which must not
//!   block) and resolved-ts samples travel over an *unbounded* channel. Its
//!   growth is bounded by the store's own write rate and by the owner's
//!   pace; it is the one unbounded path left, measured (not limited) by
//!   `kvfeed_cdc_observed_queue_bytes`. Samples share it with batches on
//!   purpose: FIFO order is what makes resolved timestamps honest (below).
//! - Catch-up scans hand batches over a *bounded* channel and wait for
//!   their connection to have room first, so a scan runs at its reader's
//!   pace.
//! - Events to a client travel over a bounded per-connection queue that
//!   the owner never waits on, charged (with the rows initializing
//!   subscriptions hold back) to a per-connection cap and the feed-wide
//!   `sink_memory_quota` (module `quota`): one slow reader cannot stall the
//!   owner or the writers, it gets a `congested` error instead and what it
//!   had not read is freed.
//!
//! Because the inbound channels are separate, the owner applies one
//! ordering rule: before it handles a request it drains every control and
//! scan message already queued. Anything a handler did before sending a
//! request (opening its connection, or another connection's drop) is
//! therefore applied before the request is.
//!
//! # Delivery guarantee
//!
//! Within one subscription with checkpoint C over range R, every commit of
//! a key in R with `commit_ts > C` is delivered exactly once — as a
//! COMMITTED row of the catch-up scan, or live as a COMMIT (two-phase) or
//! COMMITTED (one-phase, raw) row — and the rows of one key come in
//! commit_ts order. This is stronger than TiKV's at-least-once. Why:
//!
//! 1. The store numbers every applied batch, and a snapshot taken at seq S
//!    contains exactly the batches with seq ≤ S (`kvfeed_storage::store`).
//! 2. The scan reads one such snapshot, reporting every Put/Delete version
//!    with `commit_ts > C` in R, oldest first per key.
//! 3. Live batches are matched against S: before the scan task arms the
//!    subscription they are ignored (they are in the snapshot, taken
//!    later); once armed they are held back with their seq; those with
//!    seq ≤ S are dropped, the rest are delivered after INITIALIZED, and so
//!    are all later ones. Each batch therefore reaches the subscription once:
//!    through the snapshot or live (the argument in detail is in `scan`).
//! 4. Per key the store applies commits in commit_ts order (latches plus
//!    Percolator's conflict rules; raw writes take their timestamp under
//!    the key's latch), the snapshot's versions precede every later batch,
//!    and the owner keeps apply order per subscription.
//!
//! Live rows are not filtered by the checkpoint (as in TiKV): a transaction
//! whose commit_ts was allocated before C but applied after S is also
//! delivered live. Subscribers that hold resolved timestamps honest (TiCDC
//! picks checkpoints at or below a resolved ts it received) never see one.
//!
//! A subscription registered with a checkpoint below the effective GC safe
//! point (checked against the snapshot, so GC cannot slip in between) is
//! answered with the `compatibility` error, whose `required_version` text
//! names the checkpoint and the safe point: the protocol has no dedicated
//! field, and `compatibility` is the one TiCDC treats as fatal rather than
//! retrying (module `owner::validate` lists every refusal).
//!
//! # Resolved timestamps
//!
//! A resolved ts `t` for a subscription promises that no row with
//! `commit_ts ≤ t` follows for it. Every `min-ts-interval` a task takes a
//! sample: `min_ts` from the oracle; then it raises the concurrency
//! manager's `max_ts` to `min_ts` and reads its oldest in-memory lock; then
//! the raw store's oldest write in flight; and sends the sample on the
//! control channel. For each initialized (Normal) subscription the owner
//! computes `min(min_ts, oldest Put/Delete lock in its range, oldest
//! in-memory lock)` (transactional) or `min(min_ts, raw in-flight − 1)`
//! (raw), and sends it only if it exceeds what it sent before. Why no
//! commit at or below `t` can follow:
//!
//! - *Two-phase commit*: the client asks for its commit_ts after every
//!   prewrite was applied, so a commit with `commit_ts ≤ t ≤ min_ts` (the
//!   oracle hands each timestamp out once) had its locks applied, hence
//!   announced on the control channel, before the sample was. When the
//!   owner applies the sample, either the commit was routed too (its row
//!   is already queued, ahead of the resolved ts) or the lock is in the
//!   subscription's lock set — the scan's locks at S plus every lock change
//!   routed after S — and `t ≤ start_ts < commit_ts`.
//! - *Async commit and one-phase commit* pick their commit_ts on the server,
//!   above `max_ts`, under the concurrency manager's lock. A prewrite that
//!   registered after we raised `max_ts` commits above `min_ts`; one that
//!   registered before is either still in the table (then `t ≤` its
//!   start_ts `<` its commit_ts) or was applied, and announced, before the
//!   sample.
//! - *Raw writes* register a lower bound of their timestamp before taking
//!   it and unregister after the store announced them; a write with
//!   `ts ≤ min_ts` is therefore either in flight (`t < ts`) or already
//!   routed.
//! - *The catch-up boundary*: only Normal subscriptions are resolved, and
//!   INITIALIZED is queued with the scan's last rows and the held-back live
//!   rows in the step that makes the subscription Normal; a flush queues
//!   rows before resolved timestamps.
//!
//! Values are batched per connection as `ChangeDataEvent.resolved_ts` for
//! clients ≥ 4.0.8 (one message per distinct ts, per request id with
//! `stream-multiplexing`), and sent as per-region `Event.resolved_ts` to
//! older ones. A value that finds no room waits, replaced by newer ones,
//! until the connection has room: never queued twice, never dropped, and
//! never the cause of congestion.

#![warn(missing_docs)]

pub mod config;
pub mod connection;
pub mod debug;
pub mod error;
pub mod feed;
pub mod ids;
pub mod meta;
pub mod metrics;
mod owner;
pub mod protocol;
mod queue;
mod quota;
mod scan;
pub mod subscription;
mod ts_sampler;

pub use config::{FeedConfig, MIN_TS_INTERVAL_FLOOR};
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
pub use ts_sampler::store_safe_ts;

/// Upper bound on the row payload (sum of encoded rows) of one `Event`, as
/// TiKV batches them. A single row larger than this travels alone.
pub const EVENT_MAX_ROW_BYTES: usize = 32 * 1024;

/// Upper bound on the encoded size of one `ChangeDataEvent` (TiKV's cap), so
/// a message stays well inside a client's receive limit.
pub const CHANGE_DATA_EVENT_MAX_BYTES: usize = 6 * 1024 * 1024;

/// Upper bound on the rows of one catch-up scan batch (TiKV's). Each batch
/// travels as a `ChangeDataEvent` of its own.
pub const SCAN_BATCH_MAX_ROWS: usize = 1024;

/// Upper bound on the encoded rows of one catch-up scan batch (TiKV's); a
/// single larger row travels alone.
pub const SCAN_BATCH_MAX_BYTES: usize = 1024 * 1024;
