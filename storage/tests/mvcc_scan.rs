//! Range reads against a model: the transactional KV scan and the delta
//! scan, over random histories with locks, large values, long histories and
//! lock deletion markers, must report exactly what per-key reads say.
//!
//! Both readers take shortcuts for speed (the KV scan reads the write family
//! before the lock family and seeks past long histories; the delta scan
//! resumes its lock walk at the next live lock it remembered), so each is
//! checked against the plain definition: a point read per key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::sync::Arc;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::delta::{DeltaScanner, DeltaSpec, KeepLimits, versions_oldest_first};
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::mvcc::reader::blocking_lock;
use kvfeed_storage::mvcc::txn::MvccTxn;
use kvfeed_storage::mvcc::{
    Key, Lock, LockType, MvccReader, ScanItem, ScanOptions, Write, WriteType,
};
use kvfeed_storage::store::{BatchSource, Durability, Store};
use proptest::prelude::*;

/// One key's history: versions `(commit_ts, type, value)` and a lock.
#[derive(Clone, Debug)]
struct History {
    versions: Vec<(u64, WriteType, Vec<u8>)>,
    lock: Option<(LockType, u64, Vec<u8>)>,
    /// Locks that came and went before the current state: each leaves a
    /// deletion marker in the lock family.
    ended_locks: usize,
}

fn write_type() -> impl Strategy<Value = WriteType> {
    prop_oneof![
        4 => Just(WriteType::Put),
        2 => Just(WriteType::Delete),
        1 => Just(WriteType::Rollback),
        1 => Just(WriteType::Lock),
    ]
}

fn lock_type() -> impl Strategy<Value = LockType> {
    prop_oneof![
        Just(LockType::Put),
        Just(LockType::Delete),
        Just(LockType::Lock),
        Just(LockType::Pessimistic),
    ]
}

/// Values are short (inline) or large (in the default family).
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..8),
        1 => proptest::collection::vec(any::<u8>(), 300..310),
    ]
}

fn history() -> impl Strategy<Value = History> {
    let versions = prop_oneof![
        6 => proptest::collection::vec((write_type(), value()), 0..4),
        // Long enough for both scans' seek past a long history.
        1 => proptest::collection::vec((write_type(), value()), 40..80),
    ];
    let lock = proptest::option::of((lock_type(), 0..200u64, value()));
    (versions, lock, 0..3usize).prop_map(|(versions, lock, ended_locks)| History {
        versions: versions
            .into_iter()
            .enumerate()
            .map(|(i, (t, v))| (10 + 5 * i as u64, t, v))
            .collect(),
        lock,
        ended_locks,
    })
}

fn histories() -> impl Strategy<Value = BTreeMap<Vec<u8>, History>> {
    let key = proptest::collection::vec(0..4u8, 1..4);
    proptest::collection::btree_map(key, history(), 0..40)
}

/// Writes the histories: every version as a committed write (large values
/// in the default family), ended locks as a put then a delete, and the
/// current lock.
fn build(histories: &BTreeMap<Vec<u8>, History>) -> Store {
    let store = Store::open(Arc::new(MemoryEngine::new()), Durability::NoSync).expect("open");
    for (raw, h) in histories {
        let key = Key::from_raw(raw);
        for _ in 0..h.ended_locks {
            let mut txn = MvccTxn::new();
            txn.put_lock(
                &key,
                &Lock::new(LockType::Put, raw.clone(), TimeStamp::new(1), 9),
            );
            store
                .apply(txn.into_batch(), BatchSource::Client)
                .expect("apply");
            let mut txn = MvccTxn::new();
            txn.unlock_key(&key);
            store
                .apply(txn.into_batch(), BatchSource::Client)
                .expect("apply");
        }
        let mut txn = MvccTxn::new();
        for (commit_ts, write_type, value) in &h.versions {
            let start_ts = TimeStamp::new(commit_ts - 1);
            let short = (*write_type == WriteType::Put && value.len() < 255).then(|| value.clone());
            if *write_type == WriteType::Put && short.is_none() {
                txn.put_value(&key, start_ts, value.clone());
            }
            let write = Write::new(*write_type, start_ts, short);
            txn.put_write(&key, TimeStamp::new(*commit_ts), &write);
        }
        if let Some((lock_type, start_ts, value)) = &h.lock {
            let mut lock = Lock::new(*lock_type, raw.clone(), TimeStamp::new(*start_ts), 9);
            if *lock_type == LockType::Put {
                if value.len() < 255 {
                    lock.short_value = Some(value.clone());
                } else {
                    txn.put_value(&key, TimeStamp::new(*start_ts), value.clone());
                }
            }
            txn.put_lock(&key, &lock);
        }
        store
            .apply(txn.into_batch(), BatchSource::Client)
            .expect("apply");
    }
    store
}

/// The scan by definition: each key of the range in order, read alone.
fn model_scan(
    histories: &BTreeMap<Vec<u8>, History>,
    reader: &MvccReader<'_>,
    opts: &ScanOptions<'_>,
) -> Vec<ScanItem> {
    let in_range = |k: &Vec<u8>| {
        k.as_slice() >= opts.start && (opts.end.is_empty() || k.as_slice() < opts.end)
    };
    let mut keys: Vec<&Vec<u8>> = histories.keys().filter(|k| in_range(k)).collect();
    if opts.reverse {
        keys.reverse();
    }
    let mut out = Vec::new();
    for raw in keys {
        if out.len() == opts.limit {
            break;
        }
        let key = Key::from_raw(raw);
        let lock = reader.load_lock(&key).expect("lock");
        if let Some(info) = lock.and_then(|l| blocking_lock(&l, raw, opts.ts, opts.bypass)) {
            out.push(Err(info));
        } else if let Some(value) = reader.get(&key, opts.ts).expect("get") {
            let value = if opts.key_only { Vec::new() } else { value };
            out.push(Ok((raw.clone(), value)));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn kv_scan_matches_point_reads(
        histories in histories(),
        ts in prop_oneof![0..250u64, Just(u64::MAX)],
        limit in 1..12usize,
        reverse in any::<bool>(),
        key_only in any::<bool>(),
        bounds in (proptest::collection::vec(0..4u8, 0..3), proptest::collection::vec(0..4u8, 0..3)),
    ) {
        let store = build(&histories);
        let snap = store.snapshot();
        let reader = MvccReader::new(&*snap);
        let (start, end) = bounds;
        let opts = ScanOptions {
            start: &start,
            end: &end,
            ts: TimeStamp::new(ts),
            limit,
            key_only,
            reverse: false,
            bypass: &[],
            max_bytes: usize::MAX,
        };
        // TiKV's reverse scan is over the same [start, end) range.
        let opts = ScanOptions { reverse, ..opts };
        let got = reader.scan(&opts).expect("scan");
        prop_assert_eq!(got, model_scan(&histories, &reader, &opts));
    }

    #[test]
    fn delta_scan_reports_every_newer_version_and_lock(
        histories in histories(),
        after in prop_oneof![0..100u64, 100..400u64],
        pause_every in 1..7usize,
        keep in 1..6usize,
    ) {
        let store = build(&histories);
        let mut scanner = DeltaScanner::new(
            store.snapshot(),
            DeltaSpec::txn(Vec::new(), Vec::new(), TimeStamp::new(after)),
        );
        let limits = KeepLimits { versions: keep, bytes: 1000 };
        let mut got: BTreeMap<Vec<u8>, (Vec<u64>, Option<u64>)> = BTreeMap::new();
        let mut kept = Vec::new();
        // Walks of a few keys each, as a catch-up scan pauses between
        // batches.
        while !scanner.is_finished() {
            let mut walk = scanner.walk().expect("walk");
            let snapshot = walk.snapshot();
            for _ in 0..pause_every {
                let Some(found) = walk.next_key(&mut kept, limits).expect("next") else {
                    break;
                };
                let versions: Vec<u64> = if found.complete {
                    kept.iter().rev().map(|(ts, _)| ts.into_inner()).collect()
                } else {
                    prop_assert!(kept.is_empty());
                    versions_oldest_first(
                        snapshot,
                        kvfeed_storage::delta::KeySpace::Txn,
                        &found.encoded,
                        TimeStamp::new(after),
                    )
                    .map(|v| v.expect("version").0.into_inner())
                    .collect()
                };
                let user_key = found.user_key().expect("key");
                let lock = found.lock.map(|l| l.start_ts.into_inner());
                prop_assert!(got.insert(user_key, (versions, lock)).is_none(), "a key twice");
            }
        }
        let want: BTreeMap<Vec<u8>, (Vec<u64>, Option<u64>)> = histories
            .iter()
            .map(|(k, h)| {
                let versions: Vec<u64> =
                    h.versions.iter().map(|v| v.0).filter(|&c| c > after).collect();
                (k.clone(), (versions, h.lock.as_ref().map(|l| l.1)))
            })
            .filter(|(k, _)| {
                let h = &histories[k];
                !h.versions.is_empty() || h.lock.is_some()
            })
            .collect();
        prop_assert_eq!(got, want);
    }
}
