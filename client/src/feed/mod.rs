//! The feed client: one ordered stream of committed changes of a key range,
//! over TiKV's `cdcpb.ChangeData` feed, whatever the region layout.
//!
//! [`Feed::open`] takes a [`Cluster`] and a [`FeedSpec`] (key mode, user-key
//! range, start ts). The range is looked up in PD and split along regions;
//! each piece is registered (its own request id) on the stream of the store
//! that leads its region — one stream per store, `EventFeedV2` with stream
//! multiplexing when the server offers it, `EventFeed` when it answers
//! UNIMPLEMENTED. [`Feed::next`] then yields [`FeedEvent`]s:
//! - [`FeedEvent::Row`]: a committed change. PREWRITE rows stage a value;
//!   COMMIT becomes one row, with the prewritten value when the COMMIT row
//!   carries none (large values travel only with the PREWRITE); ROLLBACK
//!   drops the staged value; COMMITTED rows (one-phase commits, raw writes,
//!   catch-up) are delivered as they are.
//! - [`FeedEvent::ResolvedTs`]: every change of the whole range committed at
//!   or below it has been delivered. It is the minimum over the range's
//!   pieces and never moves back.
//! - [`FeedEvent::CatchUp`] and [`FeedEvent::Initialized`]: progress of the
//!   catch-up from the start ts.
//! - [`FeedEvent::RegionRetry`] and [`FeedEvent::StreamLost`]: recovery in
//!   progress, for the consumer to report if it likes.
//!
//! Following a prefix from now on:
//!
//! ```no_run
//! use kvfeed_client::feed::{Feed, FeedEvent, FeedSpec};
//! use kvfeed_client::{Cluster, KeyMode};
//!
//! # async fn follow() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = Cluster::connect("127.0.0.1:20160").await?;
//! let spec = FeedSpec {
//!     mode: KeyMode::Txn,
//!     start: b"user/".to_vec(),
//!     end: b"user0".to_vec(), // '0' follows '/': every key under user/
//!     start_ts: cluster.tso().await?,
//!     old_value: false,
//! };
//! let mut feed = Feed::open(&cluster, &spec);
//! loop {
//!     match feed.next().await? {
//!         FeedEvent::Row(row) => println!("{:?} {:?} at {}", row.op, row.key, row.commit_ts),
//!         // Everything committed at or below `ts` has been printed: a
//!         // place to resume from after a restart.
//!         FeedEvent::ResolvedTs(ts) => eprintln!("resolved {ts}"),
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! Recovery, as TiCDC's kv client does it, all bounded: a retryable region
//! error (`epoch_not_match`, `region_not_found`, `not_leader`,
//! `server_is_busy`, `congested`) ends one subscription, and a lost stream
//! ends every subscription on that store; their ranges are looked up in PD
//! again after a backoff and registered anew from their last resolved ts,
//! giving up after [`REGION_ATTEMPTS`] (region errors) or
//! [`RECONNECT_ATTEMPTS`] (lost streams, PD unreachable) tries in a row.
//! Rows that come again after a re-registration are dropped (see the
//! invariants of `state`): no committed change is lost or repeated (within
//! the one bound given below).
//!
//! # What a consumer can rely on
//!
//! These hold on top of what the server promises per subscription (for
//! kvfeed: every commit above the checkpoint exactly once, a key's rows in
//! commit_ts order, honest resolved timestamps; see "Our guarantee" in the
//! repository's README):
//! - **Order.** A key lives in one region at a time, and its rows come in
//!   the order its subscription delivers them. Rows of different keys, and
//!   of different regions, are interleaved as they arrive.
//! - **Exactly once across re-registration.** A range is subscribed again
//!   from its floor (the start ts, raised by every resolved ts received
//!   after its INITIALIZED row), so nothing above the floor is missed. What the server
//!   sends again is dropped: rows at or below the floor outright, rows above
//!   it by their (commit_ts, key) pair, remembered from delivery until every
//!   floor has passed it. That memory is capped at [`MAX_REMEMBERED`] pairs,
//!   lowest commit_ts forgotten first: only when more changes than that lie
//!   above the lowest floor at a re-registration can one of the oldest be
//!   delivered twice.
//! - **Resolved ts never moves back.** [`FeedEvent::ResolvedTs`] is the
//!   minimum floor over every subscribed and parked range and is handed
//!   out only when it rises; a re-registration keeps its range's floor, so
//!   recovery holds the span's resolved ts still rather than lowering it.
//!   It means "complete up to here" only because each floor comes from a
//!   resolved ts the server sent after the subscription's catch-up.
//! - **Bounded recovery.** Every retry budget is finite: a feed that keeps
//!   failing to recover ends with a [`FeedError`]. A stream that stays open
//!   but silent is not a failure, though: the feed waits on it.

mod request;
pub mod staging;
mod state;

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest};
use kvfeed_types::TimeStamp;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub use request::{
    FEATURES_METADATA, Registration, STREAM_MULTIPLEXING, TICDC_VERSION, describe, kv_api,
};
pub use state::MAX_REMEMBERED;

use crate::{ClientError, Cluster, KeyMode};
use state::{Parked, State};

/// Tries in a row to re-subscribe one range after region errors; the
/// counter restarts when a subscription reaches INITIALIZED. Waits between
/// them start at 10 ms and double up to 1 s.
pub const REGION_ATTEMPTS: u32 = 10;
/// Tries in a row to reach a store again after its stream was lost (or
/// PD could not be asked where its ranges went); waits start at 100 ms and
/// double up to 2 s, time enough for a server to restart.
pub const RECONNECT_ATTEMPTS: u32 = 10;
/// Items made from a received message at a time: the feed holds one
/// message and at most this many of its rows as items (see
/// `State::pump`).
const PUMP_ITEMS: usize = 256;
/// The largest `ChangeDataEvent` accepted, in bytes (the gRPC decoding
/// limit); kvfeed's server batches well below it.
pub const MAX_EVENT_SIZE: usize = 32 * 1024 * 1024;

/// What to follow.
#[derive(Debug, Clone)]
pub struct FeedSpec {
    /// Which key space: transactional changes (`kv_api` TiDB) or raw writes
    /// (`kv_api` RawKV). One feed follows one of them.
    pub mode: KeyMode,
    /// Inclusive lower bound, a user key; empty = from the first key.
    pub start: Vec<u8>,
    /// Exclusive upper bound, a user key; empty = unbounded.
    pub end: Vec<u8>,
    /// Changes committed after it are delivered (strictly above: a commit
    /// at exactly `start_ts` is not). A fresh timestamp from the oracle
    /// means "from now on"; an older one replays what was committed since
    /// (the catch-up). kvfeed refuses a start below its GC safe point with
    /// `compatibility`, which ends the feed with [`FeedError::Refused`].
    pub start_ts: TimeStamp,
    /// Whether rows carry the value the key had before the change
    /// ([`Row::old_value`]): the Register requests then ask for
    /// `extra_op = ReadOldValue`, which costs the server a read per change.
    pub old_value: bool,
}

/// A change's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The key was set; [`Row::value`] holds the new value.
    Put,
    /// The key was deleted; [`Row::value`] is empty.
    Delete,
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The writing transaction's start ts, as the server reported it.
    pub start_ts: TimeStamp,
    /// The version the change became visible at; a key's rows come in
    /// increasing commit_ts.
    pub commit_ts: TimeStamp,
    /// Set or delete.
    pub op: Op,
    /// The user key (not the memcomparable form).
    pub key: Bytes,
    /// The value written: for a two-phase commit, the COMMIT row's value or,
    /// when that is empty, the one staged by its PREWRITE. Empty for a
    /// delete.
    pub value: Bytes,
    /// The value before the change, when [`FeedSpec::old_value`] asked for
    /// it; empty otherwise, and empty when the key had no value (TiKV's
    /// feed does not tell an empty value from none).
    pub old_value: Bytes,
}

/// One item of the feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A committed change; see [`Row`].
    Row(Row),
    /// Everything committed at or below it has been delivered.
    ResolvedTs(TimeStamp),
    /// Change rows received while the catch-up lasts, one item per
    /// received batch. It lasts until every range has been initialized
    /// once, so the counts include live rows of regions already done and
    /// PREWRITE / ROLLBACK rows that yield no [`FeedEvent::Row`]. For
    /// progress reports, not for accounting.
    CatchUp {
        /// Rows in the batch, INITIALIZED rows not counted.
        rows: u64,
        /// Their protobuf-encoded size in bytes.
        bytes: u64,
    },
    /// A subscription finished its catch-up (its INITIALIZED row arrived).
    /// Also sent when a range subscribed again after recovery finishes.
    Initialized {
        /// Subscriptions initialized so far.
        regions_done: usize,
        /// Subscriptions plus ranges waiting to be subscribed; the catch-up
        /// is over when it equals `regions_done`.
        regions_total: usize,
    },
    /// A region refused its subscription for a while; its range is being
    /// looked up and subscribed again.
    RegionRetry {
        /// The region that sent the error.
        region: u64,
        /// The error in words (e.g. `epoch_not_match (2 current regions)`).
        reason: String,
    },
    /// The stream of a store was lost; its ranges are being subscribed again.
    StreamLost {
        /// The store whose stream ended.
        store: u64,
        /// Why: the gRPC status, or the server ending the stream.
        reason: String,
    },
}

/// Why a feed stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// A cluster call failed; the feed's own PD lookups and store
    /// connections are retried instead (they end in
    /// [`FeedError::Disconnected`]), so this comes from callers' `?`.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered a subscription with an error that subscribing
    /// again cannot fix (`cluster_id_mismatch`, `compatibility`,
    /// `duplicate_request`, or one this client does not know).
    #[error("the server refused to watch region {region}: {reason}")]
    Refused {
        /// The region whose subscription was refused.
        region: u64,
        /// The error in words.
        reason: String,
    },
    /// A range kept getting retryable region errors, without reaching
    /// INITIALIZED in between, for [`REGION_ATTEMPTS`] tries.
    #[error("region {region}: still {reason} after {attempts} attempts to subscribe")]
    RegionRetries {
        /// The region of the last error.
        region: u64,
        /// The last error in words.
        reason: String,
        /// Tries made in a row.
        attempts: u32,
    },
    /// The server does not serve the feed to this client: a stream was
    /// refused with a status no retry changes (UNIMPLEMENTED on both
    /// `EventFeedV2` and `EventFeed`, INVALID_ARGUMENT, PERMISSION_DENIED,
    /// ...). The text names the call and the status.
    #[error("the change feed is unavailable: {0}")]
    Unsupported(String),
    /// Streams kept being lost, or PD kept being unreachable, for
    /// [`RECONNECT_ATTEMPTS`] tries in a row.
    #[error("lost the change feed stream ({last}); gave up after {attempts} attempts to reconnect")]
    Disconnected {
        /// The last reason a stream or a lookup failed.
        last: String,
        /// Tries made in a row.
        attempts: u32,
    },
    /// PD reported no region for a range being subscribed, or nothing is
    /// left to follow: there is no stream to read and no range to retry.
    #[error("no region covers the watched range")]
    NoRegions,
    /// The staging store failed (see [`Feed::open_with_staging`]).
    #[error(transparent)]
    Staging(#[from] staging::StagingError),
}

/// Why a range waits to be subscribed again: decides its backoff and budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Region,
    Stream,
}

impl Cause {
    /// The wait before the `attempts`-th try: region errors 10 ms doubling
    /// to 1 s; lost streams 100 ms doubling to 2 s (a restarting server
    /// needs longer than a moved region).
    fn delay(self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(7);
        match self {
            _ if attempts == 0 => Duration::ZERO,
            Cause::Region => Duration::from_millis(10 << doublings).min(Duration::from_secs(1)),
            Cause::Stream => Duration::from_millis(100 << doublings).min(Duration::from_secs(2)),
        }
    }
}

/// One store's responses, ending with `None` when the stream ends.
type Responses = Pin<Box<dyn Stream<Item = Option<Result<ChangeDataEvent, tonic::Status>>> + Send>>;

/// A running feed. Dropping it closes every stream.
///
/// Nothing happens in the background: streams are opened, read and
/// recovered only inside [`Feed::next`], so a consumer that stops calling
/// it stops reading (and a server with a memory quota, like kvfeed, will
/// in time report it `congested`, which the feed recovers from like any
/// retryable region error).
pub struct Feed {
    cluster: Cluster,
    state: State,
    /// Responses by store id.
    streams: StreamMap<u64, Responses>,
    /// Requests by store id.
    /// Unbounded because sending must never wait: responses are read only
    /// inside [`Feed::next`], so a send that waited for the transport while
    /// thousands of regions are registered would leave the server's answers
    /// unread until it queued them as congested. What is queued is bounded
    /// all the same: one Register per subscription the feed holds.
    senders: HashMap<u64, mpsc::UnboundedSender<ChangeDataRequest>>,
    /// `false` once a server answered `EventFeedV2` with UNIMPLEMENTED.
    try_v2: bool,
}

impl Feed {
    /// Starts following `spec` on `cluster`; the first subscriptions are
    /// made by the first [`Feed::next`].
    pub fn open(cluster: &Cluster, spec: &FeedSpec) -> Feed {
        Feed::open_with_staging(cluster, spec, Box::new(staging::MemoryStaging::default()))
    }

    /// Like [`Feed::open`], keeping prewritten values in `staging` until
    /// their COMMIT instead of in memory (see [`staging`]).
    pub fn open_with_staging(
        cluster: &Cluster,
        spec: &FeedSpec,
        staging: Box<dyn staging::Staging>,
    ) -> Feed {
        let range = spec.mode.region_range(&spec.start, &spec.end);
        let state = State::new(
            spec.mode,
            cluster.cluster_id(),
            range,
            spec.start_ts.into_inner(),
        )
        .with_old_value(spec.old_value)
        .with_staging(staging);
        Feed {
            cluster: cluster.clone(),
            state,
            streams: StreamMap::new(),
            senders: HashMap::new(),
            try_v2: true,
        }
    }

    /// The next item, or the error that ended the feed. After an error part
    /// of the range is no longer followed, so the feed must not be used
    /// further; a new one opened from the last [`FeedEvent::ResolvedTs`]
    /// seen goes on without loss (rows above it already seen come again:
    /// the new feed does not know them).
    ///
    /// Not cancellation-safe: a future dropped while it looks ranges up in
    /// PD or sends their Register requests forgets those ranges. Drop the
    /// whole feed rather than an unfinished call.
    pub async fn next(&mut self) -> Result<FeedEvent, FeedError> {
        loop {
            if let Some(item) = self.state.out.pop_front() {
                return Ok(item);
            }
            // A message is worked through before anything else happens, as
            // if all at once, but only a few items at a time are made.
            if self.state.has_inbox() {
                self.state.pump(REGION_ATTEMPTS, PUMP_ITEMS)?;
                continue;
            }
            self.resolve_due().await?;
            if let Some(item) = self.state.out.pop_front() {
                return Ok(item);
            }
            let wake = self.state.parked.iter().map(|p| p.due).min();
            tokio::select! {
                next = self.streams.next(), if !self.streams.is_empty() => {
                    let Some((store, item)) = next else { continue };
                    match item {
                        Some(Ok(event)) => self.state.accept(event),
                        Some(Err(status)) => {
                            let reason = lost_or_fatal("the change feed stream", &status)?;
                            self.lose(store, reason).await?;
                        }
                        None => {
                            self.lose(store, "the server ended the stream".to_owned()).await?;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
                else => return Err(FeedError::NoRegions),
            }
        }
    }

    /// Parks every range of `store` after its stream was lost; the store's
    /// address is asked of PD again before the next stream to it.
    async fn lose(&mut self, store: u64, reason: String) -> Result<(), FeedError> {
        tracing::debug!(store, %reason, "feed stream lost");
        self.streams.remove(&store);
        self.senders.remove(&store);
        self.cluster.forget_store(store).await;
        self.state.store_lost(store, &reason, RECONNECT_ATTEMPTS)?;
        self.state
            .out
            .push_back(FeedEvent::StreamLost { store, reason });
        Ok(())
    }

    /// Looks the parked ranges whose backoff is over up in PD and registers
    /// their regions, each on its leader's store.
    async fn resolve_due(&mut self) -> Result<(), FeedError> {
        let now = Instant::now();
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.state.parked)
            .into_iter()
            .partition(|p| p.due <= now);
        self.state.parked = waiting;
        for parked in ready {
            self.resolve(parked).await?;
        }
        Ok(())
    }

    async fn resolve(&mut self, parked: Parked) -> Result<(), FeedError> {
        let regions = match self
            .cluster
            .regions_in_range(&parked.start, &parked.end)
            .await
        {
            Ok(regions) => regions,
            Err(e) => {
                // PD is unreachable: most likely so is the feed. Try again.
                return self.state.repark(parked, e.to_string(), RECONNECT_ATTEMPTS);
            }
        };
        if regions.is_empty() {
            return Err(FeedError::NoRegions);
        }
        for (store, request) in self.state.subscribe(&parked, regions) {
            // A failure earlier in this batch may have parked it again.
            if !self.state.is_subscribed(request.request_id) {
                continue;
            }
            if let Err(reason) = self.send(store, request).await? {
                self.lose(store, reason).await?;
            }
        }
        Ok(())
    }

    /// Sends `request` on `store`'s stream, opening it first if needed.
    /// `Ok(Err(reason))`: the stream could not be used (a transient loss).
    async fn send(
        &mut self,
        store: u64,
        request: ChangeDataRequest,
    ) -> Result<Result<(), String>, FeedError> {
        if !self.senders.contains_key(&store) {
            let channel = match self.cluster.store(store).await {
                Ok(conn) => conn.channel(),
                Err(e) => return Ok(Err(e.to_string())),
            };
            match self.open_stream(channel).await? {
                Ok((tx, responses)) => {
                    self.senders.insert(store, tx);
                    self.streams.insert(store, responses);
                }
                Err(reason) => return Ok(Err(reason)),
            }
        }
        let Some(tx) = self.senders.get(&store) else {
            return Ok(Err("the request stream closed".to_owned()));
        };
        if tx.send(request).is_err() {
            return Ok(Err("the request stream closed".to_owned()));
        }
        Ok(Ok(()))
    }

    /// Opens one feed stream: `EventFeedV2` with stream multiplexing, or
    /// `EventFeed` when the server does not offer it.
    async fn open_stream(
        &mut self,
        channel: Channel,
    ) -> Result<Result<(mpsc::UnboundedSender<ChangeDataRequest>, Responses), String>, FeedError>
    {
        let mut client = ChangeDataClient::new(channel).max_decoding_message_size(MAX_EVENT_SIZE);
        if self.try_v2 {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx));
            request.metadata_mut().insert(
                FEATURES_METADATA,
                MetadataValue::from_static(STREAM_MULTIPLEXING),
            );
            match client.event_feed_v2(request).await {
                Ok(response) => return Ok(Ok((tx, responses(response.into_inner())))),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::debug!("EventFeedV2 unimplemented; using EventFeed");
                    self.try_v2 = false;
                }
                Err(status) => return lost_or_fatal("EventFeedV2", &status).map(Err),
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        match client.event_feed(UnboundedReceiverStream::new(rx)).await {
            Ok(response) => Ok(Ok((tx, responses(response.into_inner())))),
            Err(status) => lost_or_fatal("EventFeed", &status).map(Err),
        }
    }
}

fn responses(stream: tonic::Streaming<ChangeDataEvent>) -> Responses {
    Box::pin(stream.map(Some).chain(tokio_stream::once(None)))
}

/// A failed call: the reason to reconnect for transient codes, an error
/// for the others.
fn lost_or_fatal(what: &str, status: &tonic::Status) -> Result<String, FeedError> {
    use tonic::Code;
    let text = format!("{what} failed: {} ({:?})", status.message(), status.code());
    match status.code() {
        Code::Unimplemented
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::OutOfRange => Err(FeedError::Unsupported(text)),
        _ => Ok(text),
    }
}
