//! Engine conformance: every property of the `Engine` contract is one
//! function, run against each engine by the `conformance!` macro below, so
//! the in-memory engine the other tests rely on behaves like the durable one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use kvfeed_storage::Error;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::engine::{Cf, Engine, EngineSnapshot, Op, WriteBatch};
use proptest::prelude::*;
use tempfile::TempDir;

/// An engine plus whatever must outlive it (the fjall directory).
struct Harness {
    engine: Arc<dyn Engine>,
    _dir: Option<TempDir>,
}

fn memory() -> Harness {
    Harness {
        engine: Arc::new(MemoryEngine::new()),
        _dir: None,
    }
}

fn fjall() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = FjallEngine::open(dir.path()).expect("open fjall");
    Harness {
        engine: Arc::new(engine),
        _dir: Some(dir),
    }
}

fn write(engine: &dyn Engine, f: impl FnOnce(&mut WriteBatch)) {
    let mut batch = WriteBatch::new();
    f(&mut batch);
    engine.write(&batch).expect("write");
}

fn scan(snap: &dyn EngineSnapshot, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
    snap.iter(cf, Bound::Unbounded, Bound::Unbounded, false)
        .collect::<Result<_, _>>()
        .expect("scan")
}

fn get(snap: &dyn EngineSnapshot, cf: Cf, key: &[u8]) -> Option<Vec<u8>> {
    snap.get(cf, key).expect("get")
}

fn atomic_batch_across_cfs(open: fn() -> Harness) {
    let h = open();
    let before = h.engine.snapshot();
    write(&*h.engine, |b| {
        for cf in Cf::ALL {
            b.put(cf, b"k".to_vec(), cf.name().as_bytes().to_vec());
        }
    });
    let after = h.engine.snapshot();
    for cf in Cf::ALL {
        assert_eq!(get(&*before, cf, b"k"), None, "{cf:?}");
        assert_eq!(
            get(&*after, cf, b"k"),
            Some(cf.name().as_bytes().to_vec()),
            "{cf:?}"
        );
        // Column families are separate namespaces.
        assert_eq!(scan(&*after, cf).len(), 1, "{cf:?}");
    }
}

fn snapshot_isolation(open: fn() -> Harness) {
    let h = open();
    write(&*h.engine, |b| {
        b.put(Cf::Write, b"a".to_vec(), b"1".to_vec());
        b.put(Cf::Write, b"b".to_vec(), b"1".to_vec());
    });
    let old = h.engine.snapshot();
    write(&*h.engine, |b| {
        b.put(Cf::Write, b"a".to_vec(), b"2".to_vec());
        b.delete(Cf::Write, b"b".to_vec());
        b.put(Cf::Write, b"c".to_vec(), b"2".to_vec());
    });
    // Dropping the engine handle must not invalidate the snapshot either.
    let new = h.engine.snapshot();
    drop(h.engine);
    assert_eq!(
        scan(&*old, Cf::Write),
        vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"1".to_vec())
        ]
    );
    assert_eq!(
        scan(&*new, Cf::Write),
        vec![
            (b"a".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), b"2".to_vec())
        ]
    );
}

fn delete_and_last_write_wins(open: fn() -> Harness) {
    let h = open();
    write(&*h.engine, |b| {
        b.put(Cf::Lock, b"gone".to_vec(), b"x".to_vec());
        b.put(Cf::Lock, b"kept".to_vec(), b"x".to_vec());
    });
    write(&*h.engine, |b| b.delete(Cf::Lock, b"gone".to_vec()));
    // Within one batch the later mutation of a key wins, whatever its kind.
    write(&*h.engine, |b| {
        b.put(Cf::Lock, b"p-d".to_vec(), b"x".to_vec());
        b.delete(Cf::Lock, b"p-d".to_vec());
        b.delete(Cf::Lock, b"d-p".to_vec());
        b.put(Cf::Lock, b"d-p".to_vec(), b"y".to_vec());
        b.put(Cf::Lock, b"p-p".to_vec(), b"1".to_vec());
        b.put(Cf::Lock, b"p-p".to_vec(), b"2".to_vec());
        b.delete(Cf::Lock, b"kept".to_vec());
        b.put(Cf::Lock, b"kept".to_vec(), b"z".to_vec());
    });
    // Deleting an absent key is fine.
    write(&*h.engine, |b| b.delete(Cf::Lock, b"never".to_vec()));
    let snap = h.engine.snapshot();
    assert_eq!(
        scan(&*snap, Cf::Lock),
        vec![
            (b"d-p".to_vec(), b"y".to_vec()),
            (b"kept".to_vec(), b"z".to_vec()),
            (b"p-p".to_vec(), b"2".to_vec()),
        ]
    );
}

fn invalid_input_is_refused(open: fn() -> Harness) {
    let h = open();
    for bad in [Vec::new(), vec![b'k'; 65_536]] {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Raw, b"fine".to_vec(), b"v".to_vec());
        batch.put(Cf::Raw, bad, b"v".to_vec());
        let err = h.engine.write(&batch).expect_err("bad key accepted");
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
    // Nothing of a refused batch is applied.
    assert_eq!(scan(&*h.engine.snapshot(), Cf::Raw), vec![]);
    // The longest allowed key works.
    write(&*h.engine, |b| {
        b.put(Cf::Raw, vec![b'k'; 65_535], b"v".to_vec())
    });
    assert_eq!(scan(&*h.engine.snapshot(), Cf::Raw).len(), 1);
}

/// Keys stored by [`bounds_forward_and_reverse`]; probes include keys between
/// and around them, the empty key and prefixes.
const STORED: [&[u8]; 6] = [b"a", b"ab", b"b", b"b\x00", b"c", b"\xff\xff"];
const PROBES: [&[u8]; 9] = [
    b"",
    b"a",
    b"aa",
    b"ab",
    b"b",
    b"b\x00",
    b"bz",
    b"c",
    b"\xff\xff\xff",
];

fn in_bounds(key: &[u8], lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    let above = match lower {
        Bound::Included(l) => key >= l,
        Bound::Excluded(l) => key > l,
        Bound::Unbounded => true,
    };
    let below = match upper {
        Bound::Included(u) => key <= u,
        Bound::Excluded(u) => key < u,
        Bound::Unbounded => true,
    };
    above && below
}

fn bounds_forward_and_reverse(open: fn() -> Harness) {
    let h = open();
    write(&*h.engine, |b| {
        for key in STORED {
            b.put(Cf::Default, key.to_vec(), key.to_vec());
        }
        // Neighbouring families must not leak into the scan.
        b.put(Cf::Lock, b"aa".to_vec(), b"other".to_vec());
        b.put(Cf::Write, b"b".to_vec(), b"other".to_vec());
    });
    let snap = h.engine.snapshot();
    let bounds = |k: &'static [u8]| [Bound::Included(k), Bound::Excluded(k)];
    let mut all: Vec<Bound<&[u8]>> = vec![Bound::Unbounded];
    for probe in PROBES {
        all.extend(bounds(probe));
    }
    for &lower in &all {
        for &upper in &all {
            let expected: Vec<Vec<u8>> = STORED
                .iter()
                .filter(|k| in_bounds(k, lower, upper))
                .map(|k| k.to_vec())
                .collect();
            for reverse in [false, true] {
                let got: Vec<Vec<u8>> = snap
                    .iter(Cf::Default, lower, upper, reverse)
                    .map(|kv| {
                        let (k, v) = kv.expect("iter");
                        assert_eq!(k, v);
                        k
                    })
                    .collect();
                let mut want = expected.clone();
                if reverse {
                    want.reverse();
                }
                assert_eq!(got, want, "{lower:?}..{upper:?} reverse={reverse}");
            }
        }
    }
}

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod memory_engine {
            $(#[test] fn $property() { super::$property(super::memory); })*
        }
        mod fjall_engine {
            $(#[test] fn $property() { super::$property(super::fjall); })*
        }
    };
}

conformance!(
    atomic_batch_across_cfs,
    snapshot_isolation,
    delete_and_last_write_wins,
    invalid_input_is_refused,
    bounds_forward_and_reverse,
    random_batches_match_a_model,
);

#[derive(Clone, Debug)]
enum ModelOp {
    Put(usize, u8, u8),
    Delete(usize, u8),
}

type Model = BTreeMap<(usize, Vec<u8>), Vec<u8>>;

fn cf_at(i: usize) -> Cf {
    Cf::ALL[i % Cf::ALL.len()]
}

fn check_against_model(snap: &dyn EngineSnapshot, model: &Model, lo: u8, hi: u8) {
    for (i, cf) in Cf::ALL.into_iter().enumerate() {
        let want: Vec<(Vec<u8>, Vec<u8>)> = model
            .iter()
            .filter(|((c, _), _)| *c == i)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(scan(snap, cf), want, "{cf:?}");
        let (lo, hi) = ([lo], [hi]);
        let lower = Bound::Included(&lo[..]);
        let upper = Bound::Excluded(&hi[..]);
        let mut ranged: Vec<_> = want
            .iter()
            .filter(|(k, _)| in_bounds(k, lower, upper))
            .cloned()
            .collect();
        let got: Vec<_> = snap
            .iter(cf, lower, upper, true)
            .collect::<Result<_, _>>()
            .expect("iter");
        ranged.reverse();
        assert_eq!(got, ranged, "{cf:?} reverse [{lo:?}, {hi:?})");
    }
}

fn random_batches_match_a_model(open: fn() -> Harness) {
    let op = prop_oneof![
        (0..5usize, 0..12u8, any::<u8>()).prop_map(|(c, k, v)| ModelOp::Put(c, k, v)),
        (0..5usize, 0..12u8).prop_map(|(c, k)| ModelOp::Delete(c, k)),
    ];
    let batches = prop::collection::vec(prop::collection::vec(op, 1..8), 1..12);
    let config = ProptestConfig {
        cases: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(batches in batches, lo in 0..12u8, hi in 0..12u8)| {
        let h = open();
        let mut model = Model::new();
        let mut snapshots = Vec::new();
        for ops in batches {
            let mut batch = WriteBatch::new();
            for op in ops {
                // Keys are two bytes so that single-byte bounds fall between them.
                match op {
                    ModelOp::Put(c, k, v) => {
                        batch.put(cf_at(c), vec![k, v % 3], vec![v]);
                    }
                    ModelOp::Delete(c, k) => batch.delete(cf_at(c), vec![k, 1]),
                }
            }
            h.engine.write(&batch).expect("write");
            for m in batch.mutations() {
                let i = Cf::ALL.iter().position(|c| *c == m.cf).expect("cf");
                match &m.op {
                    Op::Put(v) => model.insert((i, m.key.clone()), v.clone()),
                    Op::Delete => model.remove(&(i, m.key.clone())),
                };
            }
            snapshots.push((h.engine.snapshot(), model.clone()));
        }
        // Every snapshot still shows the state at its time.
        for (snap, model) in &snapshots {
            check_against_model(&**snap, model, lo, hi);
        }
    });
}

#[test]
fn fjall_persists_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = FjallEngine::open(dir.path()).expect("open");
        write(&engine, |b| {
            b.put(Cf::Raw, b"synced".to_vec(), b"1".to_vec());
            b.put(Cf::Meta, b"synced".to_vec(), b"2".to_vec());
        });
        engine.sync().expect("sync");
        write(&engine, |b| {
            b.put(Cf::Raw, b"buffered".to_vec(), b"3".to_vec())
        });
        write(&engine, |b| b.delete(Cf::Raw, b"synced".to_vec()));
    }
    for _ in 0..2 {
        let engine = FjallEngine::open(dir.path()).expect("reopen");
        let snap = engine.snapshot();
        assert_eq!(get(&*snap, Cf::Raw, b"synced"), None);
        assert_eq!(get(&*snap, Cf::Meta, b"synced"), Some(b"2".to_vec()));
        assert_eq!(get(&*snap, Cf::Raw, b"buffered"), Some(b"3".to_vec()));
    }
}

#[test]
fn fjall_refuses_a_second_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = FjallEngine::open(dir.path()).expect("open");
    let second = FjallEngine::open(dir.path());
    assert!(
        matches!(second, Err(Error::Engine { .. })),
        "second open succeeded"
    );
    drop(first);
    FjallEngine::open(dir.path()).expect("open after close");
}

#[test]
fn memory_failure_hooks_fire_once() {
    let engine = MemoryEngine::new();
    engine.fail_next_write();
    let mut batch = WriteBatch::new();
    batch.put(Cf::Raw, b"k".to_vec(), b"v".to_vec());
    assert!(matches!(engine.write(&batch), Err(Error::Engine { .. })));
    assert_eq!(get(&*engine.snapshot(), Cf::Raw, b"k"), None);
    engine.write(&batch).expect("second write");
    engine.fail_next_sync();
    assert!(matches!(engine.sync(), Err(Error::Engine { .. })));
    engine.sync().expect("second sync");
}
