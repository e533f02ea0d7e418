//! Executor-level tests: concurrency through latches, range commands that
//! span several batches, batch sources seen by observers, and the change
//! decoding the feed relies on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::mvcc::{
    GC_BATCH_KEYS, LockType, MutationOp, MvccChange, PrewriteRequest, TxnError, TxnMutation,
    TxnStore, WriteType, decode_change,
};
use kvfeed_storage::store::{BatchSource, ChangeBatch, Durability, Observer, Store};
use parking_lot::Mutex;

fn txn_store() -> Arc<TxnStore> {
    let store = Store::open(Arc::new(MemoryEngine::new()), Durability::NoSync).expect("open");
    Arc::new(TxnStore::new(Arc::new(store)))
}

fn put_req(start: u64, primary: &[u8], kvs: &[(&[u8], &[u8])]) -> PrewriteRequest {
    PrewriteRequest {
        mutations: kvs
            .iter()
            .map(|(k, v)| TxnMutation::new(k.to_vec(), MutationOp::Put(v.to_vec())))
            .collect(),
        primary: primary.to_vec(),
        start_ts: TimeStamp::new(start),
        lock_ttl: 3000,
        ..PrewriteRequest::default()
    }
}

/// Records every applied batch.
#[derive(Default)]
struct Recorder(Mutex<Vec<Arc<ChangeBatch>>>);

impl Observer for Recorder {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        self.0.lock().push(Arc::clone(batch));
    }
}

#[test]
fn conflicting_prewrites_on_one_key_have_one_winner() {
    const THREADS: u64 = 8;
    for round in 0..20u64 {
        let txn = txn_store();
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (txn, barrier) = (Arc::clone(&txn), Arc::clone(&barrier));
                thread::spawn(move || {
                    let start = 100 + round * THREADS + i;
                    barrier.wait();
                    let out = txn.prewrite(&put_req(start, b"hot", &[(b"hot", b"v")]));
                    (start, out)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for h in handles {
            let (start, out) = h.join().expect("thread");
            let out = out.expect("prewrite must not fail with a rule error");
            if out.locks.is_empty() {
                winners.push(start);
            } else {
                assert_eq!(out.locks.len(), 1);
                assert_ne!(out.locks[0].start_ts, TimeStamp::new(start));
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let locks = txn
            .scan_lock(TimeStamp::MAX, b"", b"", 0)
            .expect("scan_lock");
        assert_eq!(locks.len(), 1);
        assert_eq!(locks[0].start_ts, TimeStamp::new(winners[0]));
    }
}

/// Read–modify–write increments from several threads, each a full
/// transaction with timestamps from a shared counter: no update may be lost.
#[test]
fn concurrent_increments_are_serializable() {
    const THREADS: usize = 4;
    const PER_THREAD: u64 = 25;
    let txn = txn_store();
    let tso = Arc::new(AtomicU64::new(1));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (txn, tso, barrier) = (Arc::clone(&txn), Arc::clone(&tso), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let mut done = 0;
                let mut attempts = 0u64;
                while done < PER_THREAD {
                    attempts += 1;
                    assert!(attempts < 1_000_000, "no progress");
                    let start = TimeStamp::new(tso.fetch_add(1, Ordering::SeqCst));
                    let current = match txn.get(b"counter", start, &[]) {
                        Ok(v) => v.map_or(0, |b| u64::from_be_bytes(b.try_into().expect("u64"))),
                        Err(TxnError::KeyIsLocked(_)) => {
                            thread::yield_now();
                            continue;
                        }
                        Err(e) => panic!("get: {e}"),
                    };
                    let next = (current + 1).to_be_bytes();
                    let req = put_req(start.into_inner(), b"counter", &[(b"counter", &next)]);
                    match txn.prewrite(&req) {
                        Ok(out) if out.locks.is_empty() => {}
                        Ok(_) | Err(TxnError::WriteConflict { .. }) => {
                            thread::yield_now();
                            continue;
                        }
                        Err(e) => panic!("prewrite: {e}"),
                    }
                    let commit = TimeStamp::new(tso.fetch_add(1, Ordering::SeqCst));
                    txn.commit(&[b"counter".to_vec()], start, commit)
                        .expect("commit");
                    done += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    let v = txn
        .get(b"counter", TimeStamp::MAX.prev(), &[])
        .expect("get")
        .expect("value");
    assert_eq!(
        u64::from_be_bytes(v.try_into().expect("u64")),
        THREADS as u64 * PER_THREAD
    );
}

#[test]
fn gc_and_resolve_span_batches() {
    let txn = txn_store();
    let recorder = Arc::new(Recorder::default());
    txn.store().add_observer(recorder.clone());
    let n = GC_BATCH_KEYS * 2 + 17;
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("key{i:05}").into_bytes()).collect();
    let large = vec![7u8; 1000];
    for (start, commit, value) in [(10, 11, &b"old"[..]), (20, 21, &large[..])] {
        let kvs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), value)).collect();
        let out = txn
            .prewrite(&put_req(start, &keys[0], &kvs))
            .expect("prewrite");
        assert!(out.locks.is_empty());
        txn.commit(&keys, TimeStamp::new(start), TimeStamp::new(commit))
            .expect("commit");
    }
    // A third transaction left locked, resolved over the whole range.
    let kvs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &b"new"[..])).collect();
    assert!(
        txn.prewrite(&put_req(30, &keys[0], &kvs))
            .expect("prewrite")
            .locks
            .is_empty()
    );
    recorder.0.lock().clear();
    let status = BTreeMap::from([(TimeStamp::new(30), TimeStamp::new(31))]);
    txn.resolve_locks_in_range(&status, b"", b"")
        .expect("resolve");
    let batches = recorder.0.lock().clone();
    assert_eq!(batches.len(), n.div_ceil(GC_BATCH_KEYS));
    assert!(batches.iter().all(|b| b.source == BatchSource::Client));
    assert!(
        txn.scan_lock(TimeStamp::MAX, b"", b"", 0)
            .expect("scan")
            .is_empty()
    );

    recorder.0.lock().clear();
    let stats = txn.gc(TimeStamp::new(25), b"", b"").expect("gc");
    assert_eq!(stats.keys, n as u64);
    assert_eq!(stats.deleted_writes, n as u64);
    assert_eq!(stats.deleted_values, 0);
    let batches = recorder.0.lock().clone();
    assert_eq!(batches.len(), n.div_ceil(GC_BATCH_KEYS));
    assert!(batches.iter().all(|b| b.source == BatchSource::Gc));

    let stats = txn.gc(TimeStamp::new(40), b"", b"").expect("gc");
    assert_eq!(stats.deleted_writes, n as u64);
    assert_eq!(stats.deleted_values, n as u64);
    for k in [&keys[0], &keys[n / 2], &keys[n - 1]] {
        assert_eq!(
            txn.get(k, TimeStamp::new(40), &[]).expect("get"),
            Some(b"new".to_vec())
        );
    }
    // A GC restricted to a range leaves the rest alone.
    let stats = txn
        .gc(TimeStamp::new(40), b"key00010", b"key00020")
        .expect("gc");
    assert_eq!(stats.keys, 10);
}

#[test]
fn applied_batches_decode_into_changes() {
    let txn = txn_store();
    let recorder = Arc::new(Recorder::default());
    txn.store().add_observer(recorder.clone());
    let large = vec![1u8; 400];
    let out = txn
        .prewrite(&put_req(10, b"a", &[(b"a", b"small"), (b"b", &large)]))
        .expect("prewrite");
    assert!(out.locks.is_empty());
    txn.commit(
        &[b"a".to_vec(), b"b".to_vec()],
        TimeStamp::new(10),
        TimeStamp::new(20),
    )
    .expect("commit");
    txn.batch_rollback(&[b"c".to_vec()], TimeStamp::new(30))
        .expect("rollback");

    let batches = recorder.0.lock().clone();
    assert_eq!(batches.len(), 3);
    let decode = |b: &ChangeBatch| -> Vec<MvccChange> {
        b.mutations
            .iter()
            .map(|m| decode_change(m).expect("decode").expect("transactional"))
            .collect()
    };
    let prewrite = decode(&batches[0]);
    assert!(prewrite.iter().any(|c| matches!(c,
        MvccChange::LockPut { key, lock } if key == b"a" && lock.lock_type == LockType::Put
            && lock.short_value.as_deref() == Some(&b"small"[..]))));
    assert!(prewrite.iter().any(|c| matches!(c,
        MvccChange::DefaultPut { key, start_ts, value }
            if key == b"b" && *start_ts == TimeStamp::new(10) && *value == large)));
    let commit = decode(&batches[1]);
    assert_eq!(commit.len(), 4);
    assert!(commit.iter().any(|c| matches!(c,
        MvccChange::WritePut { key, commit_ts, write }
            if key == b"b" && *commit_ts == TimeStamp::new(20)
            && write.write_type == WriteType::Put && write.short_value.is_none())));
    assert!(
        commit
            .iter()
            .any(|c| matches!(c, MvccChange::LockDeleted { key } if key == b"a"))
    );
    let rollback = decode(&batches[2]);
    assert!(
        matches!(&rollback[..], [MvccChange::WritePut { key, commit_ts, write }]
        if key == b"c" && *commit_ts == TimeStamp::new(30)
        && write.write_type == WriteType::Rollback)
    );
}

#[test]
fn failed_commands_write_nothing() {
    let txn = txn_store();
    let recorder = Arc::new(Recorder::default());
    txn.store().add_observer(recorder.clone());
    assert!(
        txn.prewrite(&put_req(10, b"a", &[(b"a", b"1")]))
            .expect("prewrite")
            .locks
            .is_empty()
    );
    let before = txn.store().last_seq();
    // b is free, a is locked: the whole prewrite is refused.
    let out = txn
        .prewrite(&put_req(11, b"b", &[(b"b", b"2"), (b"a", b"2")]))
        .expect("prewrite");
    assert_eq!(out.locks.len(), 1);
    // Commit of a and a never-prewritten key: aborted as a whole.
    let err = txn
        .commit(
            &[b"a".to_vec(), b"zz".to_vec()],
            TimeStamp::new(10),
            TimeStamp::new(12),
        )
        .expect_err("commit must fail");
    assert!(matches!(err, TxnError::TxnLockNotFound { .. }));
    assert_eq!(txn.store().last_seq(), before);
    assert_eq!(
        txn.scan_lock(TimeStamp::MAX, b"", b"", 0)
            .expect("scan")
            .len(),
        1
    );
}
