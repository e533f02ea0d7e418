//! One subscription: a (connection, request id, region) triple, what it
//! asked to see, and where it is in its life.
//!
//! # State machine
//!
//! ```text
//!   Register accepted, scan queued
//!          |
//!          v
//!   Initializing --(scan Done: INITIALIZED queued)--> Normal
//!          |                                            |
//!          +----------------> Stopped <-----------------+
//!   (deregister, connection end, congestion, scan failure, shutdown)
//! ```
//!
//! - **Initializing**: the subscription exists (it counts against the
//!   connection's cap and makes a second Register with the same request id
//!   and region a duplicate) and its catch-up scan is queued or running.
//!   Until the scan task *arms* it, live batches are ignored (the snapshot,
//!   taken later, contains them). Once armed, each routed batch's rows and
//!   lock changes are held back with the batch's seq. When the scan reports
//!   its snapshot seq S, held-back batches with seq ≤ S are dropped (the
//!   snapshot has them). The scan's rows go straight to the connection.
//!   The held-back bytes are capped: beyond the cap the subscription is
//!   stopped with `congested`.
//! - **Normal**: entered when the scan reports Done, in the owner step that
//!   queues the one INITIALIZED row (after every scanned row) followed by
//!   the held-back rows with seq > S. From then on live rows of
//!   batches with seq > S flow directly, and the lock set (the scan's locks
//!   at S, then every held-back and later lock change in apply order) is
//!   exact, so resolved timestamps may be computed. The protocol forbids
//!   rows and resolved timestamps before INITIALIZED, which is why only
//!   Normal receives them.
//! - **Stopped**: terminal. Set on every removal path; a stopped
//!   subscription is out of the registry and gets nothing more. If it
//!   stopped because of an error, that error is the last event sent for it.
//!   Dropping the subscription cancels its scan (see `scan`).
//!
//! Transitions only go forward: `complete` and `mark_initialized` refuse
//! to revive a stopped subscription, and nothing leaves Stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use serde::Serialize;
use tokio::sync::watch;

use kvfeed_proto::cdcpb::event::Row;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::store::SeqNo;

use crate::ids::{KvApi, RegionId, RequestId};
use crate::owner::is_loop;
use crate::quota::HeldCharge;
use crate::scan::ScanId;
use crate::ts_sampler::{LockChange, LockSet};

/// Where a subscription is in its life; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Registered; the catch-up scan has not reported Done yet, so only scanned
    /// rows are sent.
    Initializing,
    /// The scan finished and INITIALIZED was queued; live rows and resolved
    /// timestamps flow.
    Normal,
    /// Terminal: removed from the registry, nothing more is sent for it.
    Stopped,
}

/// A validated Register request: everything a subscription needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SubscriptionSpec {
    pub request_id: RequestId,
    pub region_id: RegionId,
    pub kv_api: KvApi,
    /// The requested range intersected with the region: encoded keys for
    /// TiDB, raw keys for RawKV. Empty end = unbounded.
    pub start_key: Vec<u8>,
    pub end_key: Vec<u8>,
    /// `extra_op == ReadOldValue`.
    pub old_value: bool,
    /// Drop rows written by a change feed (`txn_source & 0xFF != 0`).
    pub filter_loop: bool,
    /// The catch-up scan reports versions committed after it.
    pub checkpoint_ts: u64,
}

/// What kind of write a row reports; a subscription takes only its own kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKind {
    Txn,
    Raw,
}

/// The held-back live data exceeded the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Overflow;

/// What an initializing subscription keeps for its scan.
#[derive(Debug)]
struct Init {
    scan: ScanId,
    /// Dropping it cancels the scan.
    _cancel: watch::Sender<()>,
    armed: Arc<AtomicBool>,
    held: Vec<Held>,
    held_bytes: usize,
    /// `held_bytes`, charged to the connection and the memory quota while
    /// this lives (none in unit tests).
    charge: Option<HeldCharge>,
    scanned_locks: Vec<(Vec<u8>, TimeStamp)>,
}

/// One routed batch, held back while the scan runs.
#[derive(Debug)]
struct Held {
    seq: SeqNo,
    rows: Vec<Row>,
    locks: Vec<LockChange>,
}

/// Resolved-ts bookkeeping: what was sent, and what waits to be sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub sent: TimeStamp,
    /// Replaced (never queued twice) by a newer value until sent.
    pub pending: Option<TimeStamp>,
}

impl Resolved {
    /// The highest value sent or about to be.
    pub(crate) fn reached(&self) -> TimeStamp {
        self.pending.map_or(self.sent, |p| p.max(self.sent))
    }
}

/// A subscription in the registry.
#[derive(Debug)]
pub(crate) struct Subscription {
    spec: SubscriptionSpec,
    state: SubscriptionState,
    init: Option<Init>,
    /// The catch-up snapshot's seq: batches at or below it are in it.
    snapshot_seq: Option<SeqNo>,
    locks: LockSet,
    pub(crate) resolved: Resolved,
}

impl Subscription {
    /// An initializing subscription without a scan (tests).
    pub(crate) fn new(spec: SubscriptionSpec) -> Subscription {
        Subscription {
            spec,
            state: SubscriptionState::Initializing,
            init: None,
            snapshot_seq: None,
            locks: LockSet::default(),
            resolved: Resolved::default(),
        }
    }

    /// An initializing subscription whose scan `scan` runs with `armed`
    /// and stops when `cancel` is dropped.
    pub(crate) fn with_scan(
        spec: SubscriptionSpec,
        scan: ScanId,
        cancel: watch::Sender<()>,
        armed: Arc<AtomicBool>,
        charge: Option<HeldCharge>,
    ) -> Subscription {
        let mut sub = Subscription::new(spec);
        sub.init = Some(Init {
            scan,
            _cancel: cancel,
            armed,
            held: Vec::new(),
            held_bytes: 0,
            charge,
            scanned_locks: Vec::new(),
        });
        sub
    }

    pub(crate) fn spec(&self) -> &SubscriptionSpec {
        &self.spec
    }

    pub(crate) fn state(&self) -> SubscriptionState {
        self.state
    }

    pub(crate) fn scan_id(&self) -> Option<ScanId> {
        self.init.as_ref().map(|i| i.scan)
    }

    /// Locks currently tracked for resolved ts.
    pub(crate) fn tracked_locks(&self) -> usize {
        self.locks.len()
    }

    /// The oldest tracked lock's start_ts.
    pub(crate) fn oldest_lock(&self) -> Option<TimeStamp> {
        self.locks.min()
    }

    /// Whether batch `seq` concerns this subscription at all: not stopped,
    /// not already in its snapshot, and (while initializing) armed.
    pub(crate) fn accepts(&self, seq: SeqNo) -> bool {
        if self.snapshot_seq.is_some_and(|s| seq <= s) {
            return false;
        }
        match self.state {
            SubscriptionState::Normal => true,
            SubscriptionState::Initializing => self
                .init
                .as_ref()
                .is_some_and(|i| i.armed.load(Ordering::SeqCst)),
            SubscriptionState::Stopped => false,
        }
    }

    /// Whether a row of `kind` at `routing_key` (encoded user key for txn
    /// rows, raw key for raw rows) is for this subscription: kind, range
    /// and loop filter. State and seq are [`Subscription::accepts`]'s job.
    pub(crate) fn wants(&self, kind: RowKind, routing_key: &[u8], row: &Row) -> bool {
        if self.spec.filter_loop && is_loop(row.txn_source) {
            return false;
        }
        self.covers(kind, routing_key)
    }

    /// Kind and range only (lock changes are tracked whatever the filter).
    pub(crate) fn covers(&self, kind: RowKind, routing_key: &[u8]) -> bool {
        let kind_matches = matches!(
            (kind, self.spec.kv_api),
            (RowKind::Txn, KvApi::TiDb) | (RowKind::Raw, KvApi::RawKv)
        );
        kind_matches
            && routing_key >= self.spec.start_key.as_slice()
            && (self.spec.end_key.is_empty() || routing_key < self.spec.end_key.as_slice())
    }

    /// Normal: applies lock changes of a routed batch.
    pub(crate) fn apply_locks(&mut self, changes: Vec<LockChange>) {
        for change in changes {
            self.locks.apply(change);
        }
    }

    /// Initializing: holds back one routed batch. Err when the held-back
    /// data now exceeds `cap` bytes, or takes the connection beyond its
    /// memory cap or the feed beyond its quota (the caller stops the
    /// subscription).
    pub(crate) fn hold_back(
        &mut self,
        seq: SeqNo,
        rows: Vec<Row>,
        locks: Vec<LockChange>,
        cap: usize,
    ) -> Result<(), Overflow> {
        let Some(init) = self.init.as_mut() else {
            return Ok(());
        };
        let bytes: usize = rows.iter().map(Message::encoded_len).sum::<usize>()
            + locks.iter().map(LockChange::size).sum::<usize>();
        init.held_bytes += bytes;
        init.held.push(Held { seq, rows, locks });
        let over_quota = init.charge.as_mut().is_some_and(|charge| {
            charge.set(init.held_bytes);
            charge.over_quota()
        });
        if init.held_bytes > cap || over_quota {
            Err(Overflow)
        } else {
            Ok(())
        }
    }

    /// The scan's snapshot reflects batches up to `seq`: drops what was
    /// held back for them.
    pub(crate) fn snapshot_taken(&mut self, seq: SeqNo) {
        if self.state != SubscriptionState::Initializing || self.snapshot_seq.is_some() {
            return;
        }
        self.snapshot_seq = Some(seq);
        if let Some(init) = self.init.as_mut() {
            init.held.retain(|h| h.seq > seq);
            init.held_bytes = init
                .held
                .iter()
                .map(|h| {
                    h.rows.iter().map(Message::encoded_len).sum::<usize>()
                        + h.locks.iter().map(LockChange::size).sum::<usize>()
                })
                .sum();
            if let Some(charge) = init.charge.as_mut() {
                charge.set(init.held_bytes);
            }
        }
    }

    /// Records locks the scan found at its snapshot.
    pub(crate) fn add_scanned_locks(&mut self, locks: Vec<(Vec<u8>, TimeStamp)>) {
        if let Some(init) = self.init.as_mut() {
            init.scanned_locks.extend(locks);
        }
    }

    /// Initializing → Normal after the scan's Done: builds the lock set and
    /// returns the held-back rows, in apply order. `None` (and no change)
    /// from any other state.
    pub(crate) fn complete(&mut self) -> Option<Vec<Row>> {
        if self.state != SubscriptionState::Initializing {
            return None;
        }
        let init = self.init.take()?;
        self.state = SubscriptionState::Normal;
        let mut locks = LockSet::default();
        for (key, ts) in init.scanned_locks {
            locks.insert(key, ts);
        }
        let mut rows = Vec::new();
        for held in init.held {
            rows.extend(held.rows);
            for change in held.locks {
                locks.apply(change);
            }
        }
        self.locks = locks;
        Some(rows)
    }

    /// Initializing → Normal without a scan (tests). Returns false (and
    /// changes nothing) from any other state.
    #[cfg(test)]
    pub(crate) fn mark_initialized(&mut self) -> bool {
        if self.state == SubscriptionState::Initializing {
            self.state = SubscriptionState::Normal;
            self.init = None;
            true
        } else {
            false
        }
    }

    /// Any state → Stopped; cancels a running scan.
    pub(crate) fn stop(&mut self) {
        self.state = SubscriptionState::Stopped;
        self.init = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kv_api: KvApi, start: &[u8], end: &[u8], filter_loop: bool) -> SubscriptionSpec {
        SubscriptionSpec {
            request_id: RequestId(1),
            region_id: RegionId(2),
            kv_api,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            old_value: false,
            filter_loop,
            checkpoint_ts: 0,
        }
    }

    fn row(start_ts: u64) -> Row {
        Row {
            start_ts,
            ..Row::default()
        }
    }

    fn lock(key: &[u8], ts: Option<u64>) -> LockChange {
        LockChange {
            key: key.to_vec(),
            start_ts: ts.map(TimeStamp::new),
        }
    }

    #[test]
    fn transitions_only_go_forward() {
        let mut s = Subscription::new(spec(KvApi::TiDb, b"", b"", false));
        assert_eq!(s.state(), SubscriptionState::Initializing);
        assert!(s.mark_initialized());
        assert_eq!(s.state(), SubscriptionState::Normal);
        assert!(!s.mark_initialized());
        assert!(s.complete().is_none());
        s.stop();
        assert!(!s.mark_initialized());
        assert!(s.complete().is_none());
        assert_eq!(s.state(), SubscriptionState::Stopped);
        assert!(!s.accepts(SeqNo(1)));
    }

    #[test]
    fn wants_checks_kind_range_and_loop_filter() {
        let row = Row::default();
        let s = Subscription::new(spec(KvApi::TiDb, b"b", b"d", true));
        assert!(s.wants(RowKind::Txn, b"b", &row));
        assert!(s.wants(RowKind::Txn, b"c", &row));
        assert!(!s.wants(RowKind::Txn, b"d", &row), "end is exclusive");
        assert!(!s.wants(RowKind::Txn, b"a", &row));
        assert!(!s.wants(RowKind::Raw, b"c", &row), "kind");
        let looped = Row {
            txn_source: 0x0100_0001,
            ..Row::default()
        };
        assert!(!s.wants(RowKind::Txn, b"c", &looped));
        assert!(s.covers(RowKind::Txn, b"c"), "locks are tracked anyway");
        let high_bits_only = Row {
            txn_source: 0x0100,
            ..Row::default()
        };
        assert!(s.wants(RowKind::Txn, b"c", &high_bits_only));
        let unbounded = Subscription::new(spec(KvApi::RawKv, b"", b"", false));
        assert!(unbounded.wants(RowKind::Raw, &[0xff; 40], &looped));
    }

    #[test]
    fn held_back_batches_meet_the_snapshot_without_gap_or_repeat() {
        let armed = Arc::new(AtomicBool::new(false));
        let (cancel, cancelled) = watch::channel(());
        let mut s = Subscription::with_scan(
            spec(KvApi::TiDb, b"", b"", false),
            ScanId(1),
            cancel,
            Arc::clone(&armed),
            None,
        );
        assert!(!s.accepts(SeqNo(3)), "not armed: the snapshot will have it");
        armed.store(true, Ordering::SeqCst);
        assert!(s.accepts(SeqNo(4)));
        let cap = 1 << 20;
        s.hold_back(SeqNo(4), vec![row(4)], vec![lock(b"x", Some(40))], cap)
            .expect("under the cap");
        s.hold_back(SeqNo(6), vec![row(6)], vec![lock(b"a", None)], cap)
            .expect("under the cap");
        s.snapshot_taken(SeqNo(5));
        assert!(!s.accepts(SeqNo(5)));
        s.hold_back(SeqNo(7), vec![row(7)], vec![lock(b"b", Some(70))], cap)
            .expect("under the cap");
        s.add_scanned_locks(vec![(b"a".to_vec(), TimeStamp::new(20))]);
        let rows = s.complete().expect("initializing");
        let starts: Vec<u64> = rows.iter().map(|r| r.start_ts).collect();
        assert_eq!(starts, vec![6, 7], "seq 4 was in the snapshot");
        assert_eq!(
            s.oldest_lock(),
            Some(TimeStamp::new(70)),
            "a was removed at 6"
        );
        assert_eq!(s.tracked_locks(), 1);
        assert!(s.accepts(SeqNo(8)) && !s.accepts(SeqNo(5)));
        assert!(
            cancelled.has_changed().is_err(),
            "the scan's cancel handle is released once complete"
        );
    }

    #[test]
    fn the_held_back_bytes_are_capped() {
        let (cancel, _) = watch::channel(());
        let armed = Arc::new(AtomicBool::new(true));
        let mut s = Subscription::with_scan(
            spec(KvApi::TiDb, b"", b"", false),
            ScanId(1),
            cancel,
            armed,
            None,
        );
        let big = Row {
            value: vec![0; 100].into(),
            ..Row::default()
        };
        assert!(
            s.hold_back(SeqNo(1), vec![big.clone()], Vec::new(), 150)
                .is_ok()
        );
        assert_eq!(
            s.hold_back(SeqNo(2), vec![big], Vec::new(), 150),
            Err(Overflow)
        );
    }
}
