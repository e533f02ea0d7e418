//! Resolved timestamps: the inputs of one round ([`MinTs`]), the task that
//! samples them, and the lock set each transactional subscription keeps.
//!
//! A resolved ts `t` promises that no row with `commit_ts ≤ t` will follow
//! for that subscription. The argument that the values computed here keep
//! that promise is in the crate docs (`lib.rs`, "Resolved timestamps"); this
//! module supplies its three ingredients:
//!
//! - **min_ts**, a fresh oracle timestamp: every commit timestamp handed out
//!   before it is smaller, every later one larger.
//! - **in-flight bounds**, read *after* min_ts: the concurrency manager's
//!   oldest in-memory lock (async-commit and 1PC prewrites choose their
//!   commit ts on the server, above `max_ts`, which we raise to min_ts
//!   first) and the raw store's oldest write that has a timestamp but has
//!   not been handed to the store's observers yet.
//! - the subscription's **lock set**: every Put/Delete lock in its range,
//!   as of the last batch the owner routed. A lock's transaction commits
//!   above its start_ts, so the oldest start_ts bounds what may still come.
//!
//! The sample is sent to the owner on the same FIFO channel as observed
//! batches, after the in-flight bounds were read: every batch announced
//! before that point is routed before the sample is used.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::TxnStore;
use kvfeed_storage::mvcc::reader::MvccReader;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::store::Store;
use kvfeed_storage::tso::Tso;

use crate::metrics::FeedMetrics;
use crate::owner::Control;

/// A change to the lock of one key, in apply order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockChange {
    /// The encoded user key (the routing key of transactional rows).
    pub key: Vec<u8>,
    /// The start_ts of the Put/Delete lock now on the key; `None` when the
    /// key's lock was removed or replaced by one that writes no data
    /// (a read or pessimistic lock can never commit a row).
    pub start_ts: Option<TimeStamp>,
}

impl LockChange {
    /// Bytes held while buffered.
    pub(crate) fn size(&self) -> usize {
        self.key.len() + std::mem::size_of::<Option<TimeStamp>>()
    }
}

/// The Put/Delete locks in one subscription's range, by key and by start_ts.
#[derive(Debug, Default)]
pub(crate) struct LockSet {
    by_key: HashMap<Vec<u8>, TimeStamp>,
    /// start_ts → how many keys hold a lock of that transaction.
    by_ts: BTreeMap<TimeStamp, usize>,
}

impl LockSet {
    pub(crate) fn insert(&mut self, key: Vec<u8>, start_ts: TimeStamp) {
        if let Some(old) = self.by_key.insert(key, start_ts) {
            self.forget(old);
        }
        *self.by_ts.entry(start_ts).or_insert(0) += 1;
    }

    pub(crate) fn remove(&mut self, key: &[u8]) {
        if let Some(old) = self.by_key.remove(key) {
            self.forget(old);
        }
    }

    pub(crate) fn apply(&mut self, change: LockChange) {
        match change.start_ts {
            Some(ts) => self.insert(change.key, ts),
            None => self.remove(&change.key),
        }
    }

    /// The oldest start_ts held.
    pub(crate) fn min(&self) -> Option<TimeStamp> {
        self.by_ts.keys().next().copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    fn forget(&mut self, ts: TimeStamp) {
        if let Some(n) = self.by_ts.get_mut(&ts) {
            *n -= 1;
            if *n == 0 {
                self.by_ts.remove(&ts);
            }
        }
    }
}

/// The inputs of one resolved-ts round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MinTs {
    pub min_ts: TimeStamp,
    /// Oldest start_ts of an in-flight async-commit/1PC prewrite.
    pub txn_in_flight: Option<TimeStamp>,
    /// Lower bound of the oldest raw write not yet announced.
    pub raw_in_flight: Option<TimeStamp>,
}

impl MinTs {
    /// The candidate for a transactional subscription whose oldest lock
    /// has `oldest_lock` as start_ts. A lock's or in-memory lock's
    /// transaction commits strictly above its start_ts, so the start_ts
    /// itself may be resolved.
    pub(crate) fn for_txn(&self, oldest_lock: Option<TimeStamp>) -> TimeStamp {
        [Some(self.min_ts), self.txn_in_flight, oldest_lock]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.min_ts)
    }

    /// The candidate for a raw subscription. A raw write may carry exactly
    /// its in-flight bound, so the candidate stays strictly below it.
    pub(crate) fn for_raw(&self) -> TimeStamp {
        match self.raw_in_flight {
            Some(bound) => self.min_ts.min(bound.prev()),
            None => self.min_ts,
        }
    }
}

/// Where the samples come from.
#[derive(Clone)]
pub(crate) struct MinTsSource {
    pub tso: Arc<Tso>,
    pub txn: Arc<TxnStore>,
    pub raw: Arc<RawStore>,
}

impl MinTsSource {
    /// Takes one sample. Blocks (the oracle may persist its window).
    pub(crate) fn sample(&self) -> kvfeed_storage::Result<MinTs> {
        // Order matters; see the module docs.
        let min_ts = self.tso.get(1)?;
        let cm = self.txn.concurrency_manager();
        cm.update_max_ts(min_ts);
        let txn_in_flight = cm.global_min_lock_ts();
        let raw_in_flight = self.raw.min_in_flight_ts();
        Ok(MinTs {
            min_ts,
            txn_in_flight,
            raw_in_flight,
        })
    }
}

/// The store-wide safe ts: every change at or below it is applied, and no
/// transaction or raw write can still commit at or below it. It is the
/// resolved ts of one subscription covering every key of both key spaces,
/// computed without one: the same sample, then the oldest Put/Delete lock
/// of a store snapshot taken *after* the sample (where a subscription keeps
/// its lock set from routed batches). The argument is the crate docs'
/// "Resolved timestamps" with the snapshot in place of the control channel:
/// a two-phase commit at or below `min_ts` asked for its commit_ts after
/// its locks were applied, so the snapshot holds its lock or its commit;
/// async commit, 1PC and raw writes are bounded by the in-flight values as
/// for the feed. Blocks (the oracle may persist its window; every lock is
/// read), so callers run it on a blocking thread and not too often.
pub fn store_safe_ts(
    store: &Store,
    tso: &Arc<Tso>,
    txn: &Arc<TxnStore>,
    raw: &Arc<RawStore>,
) -> kvfeed_storage::Result<TimeStamp> {
    let source = MinTsSource {
        tso: Arc::clone(tso),
        txn: Arc::clone(txn),
        raw: Arc::clone(raw),
    };
    let sample = source.sample()?;
    let snap = store.snapshot();
    let oldest_lock = MvccReader::new(&*snap).oldest_data_lock_ts()?;
    Ok(sample.for_txn(oldest_lock).min(sample.for_raw()))
}

/// Samples every `interval` (tokio time) and sends each sample to the
/// owner, until the owner is gone. Skips rounds while nobody is subscribed,
/// so an idle server does not allocate timestamps (each window extension of
/// the oracle is an fsync). `_done` keeps `Feed::shutdown` waiting for it.
pub(crate) async fn run(
    source: MinTsSource,
    control: mpsc::UnboundedSender<Control>,
    interval: Duration,
    metrics: FeedMetrics,
    _done: Arc<watch::Sender<()>>,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = control.closed() => return,
        }
        if metrics.subscriptions() == 0 {
            continue;
        }
        let source = source.clone();
        match tokio::task::spawn_blocking(move || source.sample()).await {
            Ok(Ok(sample)) => {
                if control.send(Control::MinTs(sample)).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no timestamp for resolved ts; retrying next round")
            }
            Err(e) => tracing::error!(error = %e, "resolved-ts sampling panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(t: u64) -> TimeStamp {
        TimeStamp::new(t)
    }

    #[test]
    fn the_lock_set_tracks_the_oldest_lock() {
        let mut set = LockSet::default();
        set.insert(b"a".to_vec(), ts(10));
        set.insert(b"b".to_vec(), ts(10));
        set.insert(b"c".to_vec(), ts(7));
        assert_eq!(set.min(), Some(ts(7)));
        set.remove(b"c");
        assert_eq!(set.min(), Some(ts(10)));
        set.remove(b"a");
        assert_eq!(set.min(), Some(ts(10)), "b still holds 10");
        set.apply(LockChange {
            key: b"b".to_vec(),
            start_ts: Some(ts(12)),
        });
        assert_eq!((set.min(), set.len()), (Some(ts(12)), 1));
        set.apply(LockChange {
            key: b"b".to_vec(),
            start_ts: None,
        });
        set.remove(b"never");
        assert_eq!((set.min(), set.len()), (None, 0));
    }

    #[test]
    fn candidates_take_every_bound() {
        let m = MinTs {
            min_ts: ts(100),
            txn_in_flight: None,
            raw_in_flight: None,
        };
        assert_eq!(m.for_txn(None), ts(100));
        assert_eq!(m.for_txn(Some(ts(40))), ts(40));
        assert_eq!(m.for_raw(), ts(100));
        let m = MinTs {
            txn_in_flight: Some(ts(30)),
            raw_in_flight: Some(ts(50)),
            ..m
        };
        assert_eq!(m.for_txn(Some(ts(40))), ts(30));
        assert_eq!(m.for_raw(), ts(49), "strictly below a raw write in flight");
    }
}
