//! What an applied batch means as feed rows.
//!
//! A batch is one command's effect (see `MvccChange` for the shapes), so
//! its meaning is read from the whole batch, in apply order:
//!
//! - A lock put of type Put or Delete is a PREWRITE. Its value is inline in
//!   the lock or, when large, the default-family put at `(key, start_ts)`
//!   in the same batch. Lock and Pessimistic locks produce no row.
//! - A Put/Delete write whose key's lock the same batch deletes is a COMMIT
//!   (a large value already travelled with the PREWRITE, so only a short
//!   value is attached, as TiKV does). One without a lock deletion is a
//!   one-phase commit, reported COMMITTED with its value. A pessimistic
//!   transaction's 1PC deletes its *pessimistic* lock, for which no
//!   PREWRITE was ever sent; the tracker below recognizes it, as does a
//!   value written in the same batch, and reports COMMITTED too.
//! - A Rollback write with a lock deletion is a ROLLBACK (commit_ts 0). A
//!   rollback without one only protects against a late prewrite; a Lock
//!   write commits a read lock. Neither produces a row.
//! - A rollback whose timestamp is taken by another transaction's commit
//!   record (a one-phase or async commit may pick a commit_ts that equals
//!   a start_ts the oracle handed out) is stored by *rewriting* that record
//!   with `has_overlapped_rollback`. The rewrite is a Put/Delete write put,
//!   but not a commit: when the batch deletes a tracked lock whose start_ts
//!   is the record's position and whose transaction is not the record's,
//!   it is the ROLLBACK of that lock. Without a tracked lock (a rewrite with
//!   no lock, or a lock older than the feed) the batch cannot tell a
//!   rewrite from a one-phase commit that met a rollback mark at its
//!   commit_ts: the store does not mark rewrites (TiKV sets `gc_fence`).
//!   It is then reported as a commit: a repeated row is preferable to a
//!   lost one.
//! - A raw write is COMMITTED with `start_ts = commit_ts = ts`.
//!
//! # The lock tracker
//!
//! Heartbeats and `min_commit_ts` pushes rewrite an existing lock. Reported
//! naively they repeat a PREWRITE, and for a large value the repeat would
//! carry no value (the value is not rewritten), which a subscriber could
//! mistake for the real one. [`LockTracker`] remembers `(start_ts, type)`
//! of every lock put it has seen until the lock is deleted, so a rewrite of
//! a known lock is not reported again. It tracks every key (not only
//! subscribed ones) so that a subscription made later still benefits; its
//! size is bounded by the locks the store holds. A Put lock seen for the
//! first time with no value anywhere is a rewrite of a lock that predates
//! the feed: skipped for the same reason.
//!
//! # Lock changes
//!
//! Besides rows, decoding reports every change to a key's lock as a
//! [`LockChange`], in apply order: a Put/Delete lock put (its start_ts), or
//! a lock deleted or replaced by a lock that writes no data. Subscriptions
//! keep their resolved-ts lock sets with these, independent of which rows
//! were reported (a rewrite reported no row but still names its lock; a
//! loop-filtered transaction's locks still hold resolved ts back).
//!
//! A mutation that fails to decode is corrupt storage, not client input: it
//! is logged and skipped, never allowed to stop the feed.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use kvfeed_proto::cdcpb::event::{LogType, Row, row::OpType};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::Cf;
use kvfeed_storage::mvcc::{self, Lock, LockType, MvccChange, WriteType, encode_bytes};
use kvfeed_storage::raw::{self, RawChange, RawOp};
use kvfeed_storage::store::ChangeBatch;

use crate::subscription::RowKind;
use crate::ts_sampler::LockChange;

/// One row and how to route it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DecodedRow {
    pub kind: RowKind,
    /// The key compared with regions and ranges: the encoded user key for
    /// transactional rows, the raw key for raw rows.
    pub routing_key: Vec<u8>,
    /// The row, without `old_value`.
    pub row: Row,
    /// For subscribers that want old values: read the newest committed
    /// value with `commit_ts <=` this.
    pub old_value_ts: Option<TimeStamp>,
}

/// Everything one batch means to the feed.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub rows: Vec<DecodedRow>,
    pub locks: Vec<LockChange>,
}

/// What the tracker remembers of a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TrackedLock {
    start_ts: TimeStamp,
    lock_type: LockType,
    txn_source: u64,
}

/// Locks seen put and not yet seen deleted; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct LockTracker {
    locks: HashMap<Vec<u8>, TrackedLock>,
}

impl LockTracker {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.locks.len()
    }
}

enum Change {
    Txn(MvccChange),
    Raw(RawChange),
}

/// Decodes `batch` into rows and lock changes, in apply order, and updates
/// `locks`.
pub(crate) fn decode_batch(batch: &ChangeBatch, locks: &mut LockTracker) -> Decoded {
    let changes = decode_mutations(batch);

    // What the whole batch says about each key, needed before walking it.
    let mut lock_deleted: HashSet<&[u8]> = HashSet::new();
    let mut values: HashMap<(&[u8], TimeStamp), &[u8]> = HashMap::new();
    let mut deleted_lock: HashMap<&[u8], TrackedLock> = HashMap::new();
    for change in &changes {
        match change {
            Change::Txn(MvccChange::LockDeleted { key }) => {
                lock_deleted.insert(key);
                if let Some(lock) = locks.locks.get(key) {
                    deleted_lock.insert(key, *lock);
                }
            }
            Change::Txn(MvccChange::DefaultPut {
                key,
                start_ts,
                value,
            }) => {
                values.insert((key, *start_ts), value);
            }
            _ => {}
        }
    }

    let mut rows = Vec::new();
    let mut lock_changes = Vec::new();
    for change in &changes {
        match change {
            Change::Txn(MvccChange::LockPut { key, lock }) => {
                lock_changes.push(LockChange {
                    key: encode_bytes(key),
                    start_ts: matches!(lock.lock_type, LockType::Put | LockType::Delete)
                        .then_some(lock.start_ts),
                });
                let seen = locks.locks.insert(
                    key.clone(),
                    TrackedLock {
                        start_ts: lock.start_ts,
                        lock_type: lock.lock_type,
                        txn_source: lock.txn_source,
                    },
                );
                if seen
                    .is_some_and(|t| (t.start_ts, t.lock_type) == (lock.start_ts, lock.lock_type))
                {
                    continue;
                }
                let value = match lock.lock_type {
                    LockType::Put => {
                        match (&lock.short_value, values.get(&(&key[..], lock.start_ts))) {
                            (Some(v), _) => Bytes::copy_from_slice(v),
                            (None, Some(v)) => Bytes::copy_from_slice(v),
                            (None, None) => continue,
                        }
                    }
                    _ => Bytes::new(),
                };
                if let Some(row) = prewrite_row(Bytes::copy_from_slice(key), lock, value) {
                    rows.push(txn_row(key, row, Some(prewrite_old_value_ts(lock))));
                }
            }
            Change::Txn(MvccChange::LockDeleted { key }) => {
                locks.locks.remove(key);
                lock_changes.push(LockChange {
                    key: encode_bytes(key),
                    start_ts: None,
                });
            }
            Change::Txn(MvccChange::WritePut {
                key,
                commit_ts,
                write,
            }) => {
                if let Some(lock) = deleted_lock.get(&key[..])
                    && lock.start_ts == *commit_ts
                    && write.start_ts != lock.start_ts
                    && write.write_type != WriteType::Rollback
                {
                    // An overlapped rollback of the lock's transaction,
                    // marked on another one's record (see the module docs).
                    if matches!(lock.lock_type, LockType::Put | LockType::Delete) {
                        rows.push(rollback_row(key, lock.start_ts, lock.txn_source));
                    }
                    continue;
                }
                let op = match write.write_type {
                    WriteType::Put => OpType::Put,
                    WriteType::Delete => OpType::Delete,
                    WriteType::Rollback => {
                        if lock_deleted.contains(&key[..]) {
                            rows.push(rollback_row(key, write.start_ts, write.txn_source));
                        }
                        continue;
                    }
                    WriteType::Lock => continue,
                };
                let batch_value = values.get(&(&key[..], write.start_ts)).copied();
                let pessimistic_1pc = deleted_lock.get(&key[..]).is_some_and(|l| {
                    (l.start_ts, l.lock_type) == (write.start_ts, LockType::Pessimistic)
                });
                let one_pc =
                    !lock_deleted.contains(&key[..]) || batch_value.is_some() || pessimistic_1pc;
                let mut value = write
                    .short_value
                    .as_deref()
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_default();
                if one_pc
                    && write.short_value.is_none()
                    && op == OpType::Put
                    && let Some(v) = batch_value
                {
                    value = Bytes::copy_from_slice(v);
                }
                let (log_type, old_value_ts) = if one_pc {
                    (LogType::Committed, Some(commit_ts.prev()))
                } else {
                    (LogType::Commit, None)
                };
                rows.push(txn_row(
                    key,
                    Row {
                        start_ts: write.start_ts.into_inner(),
                        commit_ts: commit_ts.into_inner(),
                        r#type: log_type as i32,
                        op_type: op as i32,
                        key: Bytes::copy_from_slice(key),
                        value,
                        txn_source: write.txn_source,
                        ..Row::default()
                    },
                    old_value_ts,
                ));
            }
            Change::Txn(_) => {}
            Change::Raw(raw) => rows.push(raw_row(raw)),
        }
    }
    Decoded {
        rows,
        locks: lock_changes,
    }
}

fn decode_mutations(batch: &ChangeBatch) -> Vec<Change> {
    let mut changes = Vec::with_capacity(batch.mutations.len());
    for m in &batch.mutations {
        let decoded = if m.cf == Cf::Raw {
            raw::decode_change(m).map(|c| c.map(Change::Raw))
        } else {
            mvcc::decode_change(m).map(|c| c.map(Change::Txn))
        };
        match decoded {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => {}
            Err(e) => tracing::error!(
                seq = batch.seq.0,
                cf = m.cf.name(),
                error = %e,
                "undecodable mutation skipped by the change feed"
            ),
        }
    }
    changes
}

fn txn_row(key: &[u8], row: Row, old_value_ts: Option<TimeStamp>) -> DecodedRow {
    DecodedRow {
        kind: RowKind::Txn,
        routing_key: encode_bytes(key),
        row,
        old_value_ts,
    }
}

/// The ROLLBACK row of transaction `start_ts` on `key` (commit_ts 0, as TiKV
/// sends it).
fn rollback_row(key: &[u8], start_ts: TimeStamp, txn_source: u64) -> DecodedRow {
    txn_row(
        key,
        Row {
            start_ts: start_ts.into_inner(),
            r#type: LogType::Rollback as i32,
            op_type: OpType::Unknown as i32,
            key: Bytes::copy_from_slice(key),
            txn_source,
            ..Row::default()
        },
        None,
    )
}

/// The PREWRITE row of `lock` on user key `key`, carrying `value` (a
/// Delete lock's row carries none); `None` for Lock and Pessimistic locks,
/// which change no value. Live rows and catch-up scans build it here alike.
pub(crate) fn prewrite_row(key: Bytes, lock: &Lock, value: Bytes) -> Option<Row> {
    let (op, value) = match lock.lock_type {
        LockType::Put => (OpType::Put, value),
        LockType::Delete => (OpType::Delete, Bytes::new()),
        LockType::Lock | LockType::Pessimistic => return None,
    };
    Some(Row {
        start_ts: lock.start_ts.into_inner(),
        r#type: LogType::Prewrite as i32,
        op_type: op as i32,
        key,
        value,
        txn_source: lock.txn_source,
        ..Row::default()
    })
}

/// Where a PREWRITE's old value is read: just below the transaction's
/// snapshot (its `for_update_ts` for a pessimistic transaction).
pub(crate) fn prewrite_old_value_ts(lock: &Lock) -> TimeStamp {
    lock.start_ts.max(lock.for_update_ts).prev()
}

/// Whether a row was written by a change feed (the low 8 bits of its
/// `txn_source` carry the loop mark), for the `filter_loop` option.
pub(crate) fn is_loop(txn_source: u64) -> bool {
    txn_source & 0xFF != 0
}

/// The COMMITTED row of a live raw write, with its routing key.
fn raw_row(change: &RawChange) -> DecodedRow {
    DecodedRow {
        kind: RowKind::Raw,
        routing_key: change.key.clone(),
        row: raw_committed_row(change.clone()),
        old_value_ts: None,
    }
}

/// The COMMITTED row of a raw write (live or scanned). Takes the change by
/// value: a scan builds one row per stored version and moves its key and
/// value in (`Bytes::from` a `Vec` takes over its buffer without copying).
pub(crate) fn raw_committed_row(change: RawChange) -> Row {
    let (op, value) = match change.op {
        RawOp::Put(v) => (OpType::Put, v),
        RawOp::Delete => (OpType::Delete, Vec::new()),
    };
    let ts = change.ts.into_inner();
    Row {
        start_ts: ts,
        commit_ts: ts,
        r#type: LogType::Committed as i32,
        op_type: op as i32,
        key: Bytes::from(change.key),
        value: Bytes::from(value),
        expire_ts_unix_secs: change.expire_ts.unwrap_or(0),
        ..Row::default()
    }
}

#[cfg(test)]
mod tests {
    use kvfeed_storage::engine::{Mutation, Op};
    use kvfeed_storage::mvcc::{Key, Lock, Write};
    use kvfeed_storage::store::{BatchSource, SeqNo};

    use super::*;

    fn ts(t: u64) -> TimeStamp {
        TimeStamp::new(t)
    }

    fn lock_put(key: &[u8], lock: &Lock) -> Mutation {
        Mutation {
            cf: Cf::Lock,
            key: encode_bytes(key),
            op: Op::Put(lock.to_bytes()),
        }
    }

    fn lock_delete(key: &[u8]) -> Mutation {
        Mutation {
            cf: Cf::Lock,
            key: encode_bytes(key),
            op: Op::Delete,
        }
    }

    fn write_put(key: &[u8], commit_ts: u64, write: &Write) -> Mutation {
        Mutation {
            cf: Cf::Write,
            key: Key::from_raw(key).append_ts(ts(commit_ts)),
            op: Op::Put(write.to_bytes()),
        }
    }

    fn batch(mutations: Vec<Mutation>) -> ChangeBatch {
        ChangeBatch {
            seq: SeqNo(1),
            source: BatchSource::Client,
            mutations,
            regions: None,
        }
    }

    fn kinds(rows: &[DecodedRow]) -> Vec<(i32, u64, u64)> {
        rows.iter()
            .map(|r| (r.row.r#type, r.row.start_ts, r.row.commit_ts))
            .collect()
    }

    #[test]
    fn lock_rewrites_are_reported_once_and_tracking_ends_with_the_lock() {
        let mut tracker = LockTracker::default();
        let mut lock = Lock::new(LockType::Put, b"k".to_vec(), ts(10), 3000);
        lock.short_value = Some(b"v".to_vec());
        let first = decode_batch(&batch(vec![lock_put(b"k", &lock)]), &mut tracker).rows;
        assert_eq!(kinds(&first), vec![(LogType::Prewrite as i32, 10, 0)]);
        lock.ttl = 9000;
        let heartbeat = decode_batch(&batch(vec![lock_put(b"k", &lock)]), &mut tracker);
        assert_eq!(
            heartbeat.locks,
            vec![LockChange {
                key: encode_bytes(b"k"),
                start_ts: Some(ts(10))
            }],
            "a rewrite still names its lock"
        );
        let heartbeat = heartbeat.rows;
        assert!(heartbeat.is_empty());
        assert_eq!(tracker.len(), 1);
        let commit = decode_batch(
            &batch(vec![
                write_put(
                    b"k",
                    20,
                    &Write::new(WriteType::Put, ts(10), Some(b"v".to_vec())),
                ),
                lock_delete(b"k"),
            ]),
            &mut tracker,
        );
        assert_eq!(
            commit.locks,
            vec![LockChange {
                key: encode_bytes(b"k"),
                start_ts: None
            }]
        );
        let commit = commit.rows;
        assert_eq!(kinds(&commit), vec![(LogType::Commit as i32, 10, 20)]);
        assert_eq!(tracker.len(), 0);
    }

    #[test]
    fn a_valueless_put_lock_of_unknown_origin_is_skipped() {
        let mut tracker = LockTracker::default();
        let lock = Lock::new(LockType::Put, b"k".to_vec(), ts(10), 3000);
        assert!(
            decode_batch(&batch(vec![lock_put(b"k", &lock)]), &mut tracker)
                .rows
                .is_empty()
        );
    }

    #[test]
    fn pessimistic_one_pc_is_committed() {
        let mut tracker = LockTracker::default();
        let mut lock = Lock::new(LockType::Pessimistic, b"k".to_vec(), ts(10), 3000);
        lock.for_update_ts = ts(11);
        let pessimistic = decode_batch(&batch(vec![lock_put(b"k", &lock)]), &mut tracker);
        assert!(pessimistic.rows.is_empty());
        assert_eq!(pessimistic.locks[0].start_ts, None, "writes no data");
        let rows = decode_batch(
            &batch(vec![
                write_put(
                    b"k",
                    20,
                    &Write::new(WriteType::Put, ts(10), Some(b"v".to_vec())),
                ),
                lock_delete(b"k"),
            ]),
            &mut tracker,
        )
        .rows;
        assert_eq!(kinds(&rows), vec![(LogType::Committed as i32, 10, 20)]);
        assert_eq!(rows[0].row.value, b"v".to_vec());
        assert_eq!(rows[0].old_value_ts, Some(ts(19)));
    }

    #[test]
    fn an_overlapped_rollback_is_a_rollback_not_a_commit() {
        let mut tracker = LockTracker::default();
        // A one-phase commit at 20 (start 10), then a transaction whose
        // start_ts is 20 prewrites and is rolled back: its mark rewrites the
        // record at 20.
        let one_pc = Write::new(WriteType::Put, ts(10), Some(b"v".to_vec()));
        let rows = decode_batch(&batch(vec![write_put(b"k", 20, &one_pc)]), &mut tracker).rows;
        assert_eq!(kinds(&rows), vec![(LogType::Committed as i32, 10, 20)]);
        let mut lock = Lock::new(LockType::Put, b"k".to_vec(), ts(20), 3000);
        lock.short_value = Some(b"w".to_vec());
        lock.txn_source = 3;
        decode_batch(&batch(vec![lock_put(b"k", &lock)]), &mut tracker);
        let mut marked = one_pc.clone();
        marked.has_overlapped_rollback = true;
        let rows = decode_batch(
            &batch(vec![write_put(b"k", 20, &marked), lock_delete(b"k")]),
            &mut tracker,
        )
        .rows;
        assert_eq!(kinds(&rows), vec![(LogType::Rollback as i32, 20, 0)]);
        assert_eq!(rows[0].row.txn_source, 3);
        // A genuine commit that carries the flag is still a commit.
        let mut lock = Lock::new(LockType::Put, b"j".to_vec(), ts(30), 3000);
        lock.short_value = Some(b"x".to_vec());
        decode_batch(&batch(vec![lock_put(b"j", &lock)]), &mut tracker);
        let mut commit = Write::new(WriteType::Put, ts(30), Some(b"x".to_vec()));
        commit.has_overlapped_rollback = true;
        let rows = decode_batch(
            &batch(vec![write_put(b"j", 40, &commit), lock_delete(b"j")]),
            &mut tracker,
        )
        .rows;
        assert_eq!(kinds(&rows), vec![(LogType::Commit as i32, 30, 40)]);
    }

    #[test]
    fn undecodable_mutations_are_skipped() {
        let mut tracker = LockTracker::default();
        let garbage = Mutation {
            cf: Cf::Lock,
            key: b"not an encoding".to_vec(),
            op: Op::Put(vec![1, 2, 3]),
        };
        let mut lock = Lock::new(LockType::Delete, b"k".to_vec(), ts(5), 3000);
        lock.txn_source = 7;
        let rows = decode_batch(&batch(vec![garbage, lock_put(b"k", &lock)]), &mut tracker).rows;
        assert_eq!(kinds(&rows), vec![(LogType::Prewrite as i32, 5, 0)]);
        assert_eq!(rows[0].row.op_type, OpType::Delete as i32);
        assert_eq!(rows[0].row.txn_source, 7);
        assert_eq!(rows[0].routing_key, encode_bytes(b"k"));
    }
}
