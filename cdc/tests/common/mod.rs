//! Shared harness: a memory-engine store with the transaction and raw
//! libraries on top, a running feed, request builders and an event reader.
//!
//! Nothing here sleeps. Ordering comes from the feed's guarantee that a
//! query (`counts`, `debug_snapshot`) is answered after every request,
//! control message and scan message sent before it, and after the events
//! they produced were queued; `Env::settle` also waits for catch-up scans
//! to finish (`Feed::scans_idle`). Waiting for an event is bounded by a
//! timeout only as a hang guard: tests run with paused time, where a
//! timeout fires only once nothing else can make progress (a running
//! blocking task holds time still).
//!
//! Resolved timestamps are not items: `Events` records them apart (see
//! `Events::resolved`), so tests about rows are not disturbed by the
//! periodic resolved-ts round that paused time lets run. Every `Events`
//! checks the resolved-ts promises on everything it reads, in every test:
//! a resolved ts only for an initialized subscription, strictly increasing,
//! and never followed by a commit row at or below it.

#![allow(dead_code)] // each test binary uses part of the harness

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kvfeed_cdc::{
    ConnInfo, Connection, EventStream, Features, Feed, FeedConfig, FeedCounts, FeedDeps, TryNext,
};
use kvfeed_proto::cdcpb::change_data_request::{self, Register};
use kvfeed_proto::cdcpb::event::{self, LogType, Row};
use kvfeed_proto::cdcpb::{self, ChangeDataRequest, Header};
use kvfeed_proto::metapb;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::Engine;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::mvcc::{MutationOp, PrewriteRequest, TxnMutation, TxnStore};
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::region::{Region, RegionMap, Regions, STORE_ID};
use kvfeed_storage::safepoint::SafePoints;
use kvfeed_storage::store::{Durability, Store};
use kvfeed_storage::tso::{Clock, ManualClock, Tso};

pub const CLUSTER_ID: u64 = 7;
/// A current client version: batched resolved ts, cluster id checked.
pub const VERSION: &str = "8.5.0";
const T0_MS: u64 = 1_700_000_000_000;
/// Hang guard for awaited events (instant under paused time).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Env {
    pub store: Arc<Store>,
    pub clock: Arc<ManualClock>,
    pub tso: Arc<Tso>,
    pub txn: Arc<TxnStore>,
    pub raw: Arc<RawStore>,
    pub regions: Arc<Regions>,
    pub feed: Feed,
    /// `Arc::strong_count(&store)` before the feed took its references.
    pub store_refs_without_feed: usize,
}

pub fn env() -> Env {
    env_with(FeedConfig::default())
}

pub fn env_with(config: FeedConfig) -> Env {
    env_before_feed(config, |_| {})
}

/// An environment where `before_feed` runs on the store before the feed
/// starts (e.g. to add an observer that is called before the feed's).
pub fn env_before_feed(config: FeedConfig, before_feed: impl FnOnce(&Arc<Store>)) -> Env {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let store = Arc::new(Store::open(engine, Durability::NoSync).expect("store"));
    before_feed(&store);
    let clock = Arc::new(ManualClock::new(T0_MS));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let tso = Arc::new(Tso::open(Arc::clone(&store), dyn_clock).expect("tso"));
    let txn = Arc::new(TxnStore::new(Arc::clone(&store)));
    let raw = Arc::new(RawStore::new(Arc::clone(&store), Arc::clone(&tso)));
    let regions = Arc::new(
        Regions::open(
            Arc::clone(&store),
            RegionMap::default_split_keys(),
            &[STORE_ID],
        )
        .expect("layout"),
    );
    let store_refs_without_feed = Arc::strong_count(&store);
    let feed = Feed::start(FeedDeps {
        store: Arc::clone(&store),
        regions: Arc::clone(&regions),
        cluster_id: CLUSTER_ID,
        config,
        tso: Arc::clone(&tso),
        txn: Arc::clone(&txn),
        raw: Arc::clone(&raw),
    })
    .expect("feed");
    Env {
        store,
        clock,
        tso,
        txn,
        raw,
        regions,
        feed,
        store_refs_without_feed,
    }
}

impl Env {
    pub fn ts(&self) -> TimeStamp {
        self.tso.get(1).expect("timestamp")
    }

    /// The region holding ordinary keys (raw and encoded).
    pub fn region_a(&self) -> Region {
        self.regions.current().regions()[0].clone()
    }

    /// The region above the default split key.
    pub fn region_b(&self) -> Region {
        self.regions.current().regions()[1].clone()
    }

    pub fn connect(&self) -> (Connection, Events) {
        self.connect_with(Features::default())
    }

    pub fn connect_with(&self, features: Features) -> (Connection, Events) {
        let (conn, stream) = self
            .feed
            .connect(ConnInfo {
                peer: "127.0.0.1:5000".to_owned(),
                features,
                store_id: STORE_ID,
            })
            .expect("connect");
        (conn, Events::new(stream))
    }

    /// Everything sent before is applied and its events are queued: a round
    /// trip through the owner (which starts the scans of Registers sent
    /// before), a wait for every catch-up scan to end, and another round
    /// trip (which applies their last messages). Only for tests whose scans
    /// can finish without the test reading (the default sink has room for
    /// every scan here unless a test says otherwise).
    pub async fn settle(&self) -> FeedCounts {
        self.feed.counts().await.expect("feed is running");
        self.feed.scans_idle().await;
        self.feed.counts().await.expect("feed is running")
    }

    /// Raises the GC safe point (as a client's `gc()` would through PD).
    pub fn set_gc_safe_point(&self, ts: TimeStamp) {
        let clock: Arc<dyn Clock> = self.clock.clone();
        SafePoints::new(Arc::clone(&self.store), clock)
            .update_gc_safe_point(ts)
            .expect("safe point");
    }

    /// A one-phase commit of `mutations`; returns (start_ts, commit_ts).
    pub fn commit_1pc(&self, mutations: Vec<TxnMutation>) -> (TimeStamp, TimeStamp) {
        let start_ts = self.ts();
        let mut commit_ts = TimeStamp::ZERO;
        let req = PrewriteRequest {
            primary: mutations[0].key.clone(),
            mutations,
            start_ts,
            lock_ttl: 3000,
            try_one_pc: true,
            ..PrewriteRequest::default()
        };
        let outcome = self.txn.prewrite(&req).expect("1pc");
        assert!(outcome.locks.is_empty(), "1pc met locks");
        if !outcome.one_pc_commit_ts.is_zero() {
            commit_ts = outcome.one_pc_commit_ts;
        }
        assert!(!commit_ts.is_zero(), "fell back to 2pc");
        (start_ts, commit_ts)
    }

    /// No connection, subscription, queued or charged byte or connection
    /// task is left,
    /// by the registry's own account and by every gauge.
    pub async fn assert_clean(&self) {
        let counts = self.settle().await;
        assert_eq!(counts, FeedCounts::default(), "registry not empty");
        let snapshot = self.feed.debug_snapshot().await.expect("snapshot");
        assert!(snapshot.connections.is_empty());
        let m = self.feed.metrics();
        assert_eq!(m.connections(), 0, "connections gauge");
        assert_eq!(m.subscriptions(), 0, "subscriptions gauge");
        assert_eq!(m.pending_bytes(), 0, "pending bytes gauge");
        assert_eq!(m.connection_tasks(), 0, "connection task gauge");
        assert_eq!(m.memory_quota_used(), 0, "memory quota used");
        assert_eq!(m.observed_queue_bytes(), 0, "observed queue bytes");
    }

    /// Prewrites `mutations` (primary = the first key) at a fresh start_ts.
    pub fn prewrite(&self, mutations: Vec<TxnMutation>) -> TimeStamp {
        let start_ts = self.ts();
        self.prewrite_at(start_ts, mutations, |_| {});
        start_ts
    }

    pub fn prewrite_at(
        &self,
        start_ts: TimeStamp,
        mutations: Vec<TxnMutation>,
        adjust: impl FnOnce(&mut PrewriteRequest),
    ) {
        let mut req = PrewriteRequest {
            primary: mutations[0].key.clone(),
            mutations,
            start_ts,
            lock_ttl: 3000,
            ..PrewriteRequest::default()
        };
        adjust(&mut req);
        let outcome = self.txn.prewrite(&req).expect("prewrite");
        assert!(outcome.locks.is_empty(), "prewrite met locks");
    }

    pub fn commit(&self, keys: &[&[u8]], start_ts: TimeStamp) -> TimeStamp {
        let commit_ts = self.ts();
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        self.txn.commit(&keys, start_ts, commit_ts).expect("commit");
        commit_ts
    }

    /// A committed two-phase put of one key; returns (start_ts, commit_ts).
    pub fn put(&self, key: &[u8], value: &[u8]) -> (TimeStamp, TimeStamp) {
        let start = self.prewrite(vec![put(key, value)]);
        let commit = self.commit(&[key], start);
        (start, commit)
    }
}

pub fn put(key: &[u8], value: &[u8]) -> TxnMutation {
    TxnMutation::new(key, MutationOp::Put(value.to_vec()))
}

pub fn delete(key: &[u8]) -> TxnMutation {
    TxnMutation::new(key, MutationOp::Delete)
}

/// A Register for the whole of `region` as a current client sends it.
pub fn register(request_id: u64, region: &Region) -> ChangeDataRequest {
    ChangeDataRequest {
        header: Some(Header {
            cluster_id: CLUSTER_ID,
            ticdc_version: VERSION.to_owned(),
        }),
        region_id: region.id.0,
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: region.epoch.conf_ver,
            version: region.epoch.version,
        }),
        start_key: region.start_key.clone(),
        end_key: region.end_key.clone(),
        request_id,
        request: Some(change_data_request::Request::Register(Register {})),
        ..ChangeDataRequest::default()
    }
}

/// A RawKV Register for the raw-key range `[start, end)` of `region`.
pub fn register_raw(
    request_id: u64,
    region: &Region,
    start: &[u8],
    end: &[u8],
) -> ChangeDataRequest {
    ChangeDataRequest {
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        kv_api: change_data_request::KvApi::RawKv as i32,
        ..register(request_id, region)
    }
}

pub fn deregister(request_id: u64, region_id: u64) -> ChangeDataRequest {
    ChangeDataRequest {
        header: Some(Header {
            cluster_id: CLUSTER_ID,
            ticdc_version: VERSION.to_owned(),
        }),
        region_id,
        request_id,
        request: Some(change_data_request::Request::Deregister(
            change_data_request::Deregister {},
        )),
        ..ChangeDataRequest::default()
    }
}

/// One event of the stream, flattened.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Row {
        request_id: u64,
        region_id: u64,
        row: Row,
    },
    Error {
        request_id: u64,
        region_id: u64,
        error: cdcpb::Error,
    },
}

impl Item {
    pub fn row(&self) -> &Row {
        match self {
            Item::Row { row, .. } => row,
            Item::Error { error, .. } => panic!("expected a row, got error {error:?}"),
        }
    }

    pub fn error(&self) -> &cdcpb::Error {
        match self {
            Item::Error { error, .. } => error,
            Item::Row { row, .. } => panic!("expected an error, got row {row:?}"),
        }
    }

    pub fn ids(&self) -> (u64, u64) {
        match self {
            Item::Row {
                request_id,
                region_id,
                ..
            }
            | Item::Error {
                request_id,
                region_id,
                ..
            } => (*request_id, *region_id),
        }
    }

    pub fn is_initialized(&self) -> bool {
        matches!(self, Item::Row { row, .. } if row.r#type == LogType::Initialized as i32)
    }
}

/// A resolved ts as received: batched (`request_id` as sent, possibly 0)
/// or per region (old clients).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub batched: bool,
    pub request_id: u64,
    pub regions: Vec<u64>,
    pub ts: u64,
    /// How many items (rows, errors) had been received before it.
    pub after_items: usize,
}

/// Reads a connection's stream item by item.
pub struct Events {
    pub stream: EventStream,
    buf: VecDeque<Item>,
    /// Entries events seen, for batching checks.
    pub entries_events: Vec<cdcpb::Event>,
    /// Every message received (while `keep_messages`).
    pub messages: Vec<cdcpb::ChangeDataEvent>,
    /// Resolved timestamps received, in order.
    pub resolved: Vec<Resolved>,
    /// How many of `resolved` `next_resolved` returned.
    resolved_read: usize,
    /// Whether to keep every message in `messages` (large tests turn it off).
    pub keep_messages: bool,
    items: usize,
    /// Last resolved ts received per (request id, region); request id 0
    /// for a region-wide value (batched, without stream multiplexing).
    resolved_sent: HashMap<(u64, u64), u64>,
    /// The resolved ts each initialized subscription is bound by.
    resolved_at: HashMap<(u64, u64), u64>,
    initialized: HashSet<(u64, u64)>,
}

impl Events {
    pub fn new(stream: EventStream) -> Events {
        Events {
            stream,
            buf: VecDeque::new(),
            entries_events: Vec::new(),
            messages: Vec::new(),
            resolved: Vec::new(),
            resolved_read: 0,
            keep_messages: true,
            items: 0,
            resolved_sent: HashMap::new(),
            resolved_at: HashMap::new(),
            initialized: HashSet::new(),
        }
    }

    /// Checks and records one resolved ts; see the module docs. A
    /// region-wide value (request id 0) covers the subscriptions of the
    /// region initialized when it arrives.
    fn note_resolved(&mut self, request_id: u64, region_id: u64, ts: u64) {
        let covered: Vec<(u64, u64)> = if request_id == 0 {
            self.initialized
                .iter()
                .filter(|(_, r)| *r == region_id)
                .copied()
                .collect()
        } else {
            self.initialized
                .iter()
                .filter(|k| **k == (request_id, region_id))
                .copied()
                .collect()
        };
        assert!(
            !covered.is_empty(),
            "resolved ts {ts} for ({request_id}, {region_id}) before INITIALIZED"
        );
        let last = self.resolved_sent.insert((request_id, region_id), ts);
        assert!(
            last.is_none_or(|l| l < ts),
            "resolved ts went from {last:?} to {ts} for ({request_id}, {region_id})"
        );
        for key in covered {
            self.resolved_at.insert(key, ts);
        }
    }

    /// Checks one row against the resolved timestamps received before it.
    fn note_row(&mut self, request_id: u64, region_id: u64, row: &Row) {
        if row.r#type == LogType::Initialized as i32 {
            self.initialized.insert((request_id, region_id));
            return;
        }
        let commits =
            row.r#type == LogType::Commit as i32 || row.r#type == LogType::Committed as i32;
        if !commits {
            return;
        }
        if let Some(&bound) = self.resolved_at.get(&(request_id, region_id)) {
            assert!(
                row.commit_ts > bound,
                "commit_ts {} of {:?} arrived after resolved ts {bound} for ({request_id}, {region_id})",
                row.commit_ts,
                row.key
            );
        }
    }

    fn absorb(&mut self, message: cdcpb::ChangeDataEvent) {
        if self.keep_messages {
            self.messages.push(message.clone());
        }
        if let Some(r) = &message.resolved_ts {
            for region in &r.regions {
                self.note_resolved(r.request_id, *region, r.ts);
            }
            self.resolved.push(Resolved {
                batched: true,
                request_id: r.request_id,
                regions: r.regions.clone(),
                ts: r.ts,
                after_items: self.items,
            });
        }
        for e in message.events {
            if let Some(event::Event::ResolvedTs(ts)) = &e.event {
                self.note_resolved(e.request_id, e.region_id, *ts);
                self.resolved.push(Resolved {
                    batched: false,
                    request_id: e.request_id,
                    regions: vec![e.region_id],
                    ts: *ts,
                    after_items: self.items,
                });
                continue;
            }
            self.items += match &e.event {
                Some(event::Event::Entries(entries)) => entries.entries.len(),
                _ => 1,
            };
            match &e.event {
                Some(event::Event::Entries(entries)) => {
                    if self.keep_messages {
                        self.entries_events.push(e.clone());
                    }
                    for row in &entries.entries {
                        self.note_row(e.request_id, e.region_id, row);
                        self.buf.push_back(Item::Row {
                            request_id: e.request_id,
                            region_id: e.region_id,
                            row: row.clone(),
                        });
                    }
                }
                Some(event::Event::Error(error)) => self.buf.push_back(Item::Error {
                    request_id: e.request_id,
                    region_id: e.region_id,
                    error: error.clone(),
                }),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    /// The next item, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some(item);
            }
            let message = tokio::time::timeout(PATIENCE, self.stream.next())
                .await
                .expect("timed out waiting for an event")?;
            self.absorb(message);
        }
    }

    pub async fn expect(&mut self) -> Item {
        self.next().await.expect("stream ended early")
    }

    /// The next resolved ts not yet returned by this method, reading more
    /// messages if needed (items read on the way are kept for `next`).
    pub async fn next_resolved(&mut self) -> Resolved {
        while self.resolved.len() <= self.resolved_read {
            let message = tokio::time::timeout(PATIENCE, self.stream.next())
                .await
                .expect("timed out waiting for a resolved ts")
                .expect("stream ended before a resolved ts");
            self.absorb(message);
        }
        self.resolved_read += 1;
        self.resolved[self.resolved_read - 1].clone()
    }

    /// The next item if one is already queued.
    pub fn try_next(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some(item);
            }
            match self.stream.try_next() {
                TryNext::Event(message) => self.absorb(message),
                TryNext::Empty | TryNext::Ended => return None,
            }
        }
    }

    /// Asserts nothing is queued (call after `Env::settle`).
    pub fn assert_quiet(&mut self) {
        if let Some(item) = self.try_next() {
            panic!("unexpected item {item:?}");
        }
    }

    pub async fn expect_initialized(&mut self, request_id: u64, region_id: u64) {
        let item = self.expect().await;
        assert!(item.is_initialized(), "expected INITIALIZED, got {item:?}");
        assert_eq!(item.ids(), (request_id, region_id));
    }

    /// Reads until the stream ends, returning what was left.
    pub async fn drain_to_end(&mut self) -> Vec<Item> {
        let mut rest = Vec::new();
        while let Some(item) = self.next().await {
            rest.push(item);
        }
        rest
    }
}
