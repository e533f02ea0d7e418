//! Raw key-value tests: CRUD and versions, batches, scans against a model,
//! delete_range, compare-and-swap, TTL, GC, limits, the feed decoder and the
//! in-flight tracker.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::sync::{Arc, Mutex};

use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::engine::{Cf, Engine, Mutation, Op};
use kvfeed_storage::mvcc::{MAX_KEY_SIZE, MAX_VALUE_SIZE};
use kvfeed_storage::raw::{RawChange, RawOp, RawStore, decode_change};
use kvfeed_storage::store::{BatchSource, ChangeBatch, Durability, Observer, Store};
use kvfeed_storage::tso::{Clock, ManualClock, Tso};
use kvfeed_storage::{Error, TimeStamp};
use proptest::prelude::*;

#[path = "raw/concurrency.rs"]
mod concurrency;
#[path = "raw/scan.rs"]
mod scan;

const T0_MS: u64 = 1_700_000_000_000;

struct Env {
    engine: Arc<MemoryEngine>,
    store: Arc<Store>,
    clock: Arc<ManualClock>,
    tso: Arc<Tso>,
    raw: Arc<RawStore>,
}

fn env() -> Env {
    let engine = Arc::new(MemoryEngine::new());
    let store = Arc::new(
        Store::open(
            Arc::clone(&engine) as Arc<dyn Engine>,
            Durability::SyncOnCommit,
        )
        .expect("store"),
    );
    let clock = Arc::new(ManualClock::new(T0_MS));
    let tso =
        Arc::new(Tso::open(Arc::clone(&store), Arc::clone(&clock) as Arc<dyn Clock>).expect("tso"));
    let raw = Arc::new(RawStore::new(Arc::clone(&store), Arc::clone(&tso)));
    Env {
        engine,
        store,
        clock,
        tso,
        raw,
    }
}

impl Env {
    fn advance_secs(&self, secs: u64) {
        self.clock.advance(secs * 1000);
    }

    /// Engine versions of every key in the raw family.
    fn version_count(&self) -> usize {
        let snap = self.store.snapshot();
        snap.iter(
            Cf::Raw,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            false,
        )
        .count()
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// Collects every raw change and every batch's source, in apply order.
#[derive(Default)]
struct Recorder {
    batches: Mutex<Vec<(BatchSource, Vec<Mutation>)>>,
}

impl Observer for Recorder {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        if let Ok(mut batches) = self.batches.lock() {
            batches.push((batch.source, batch.mutations.clone()));
        }
    }
}

impl Recorder {
    fn changes(&self) -> Vec<RawChange> {
        let batches = self.batches.lock().expect("lock");
        batches
            .iter()
            .filter(|(source, _)| *source == BatchSource::Client)
            .flat_map(|(_, ms)| ms.iter())
            .filter_map(|m| decode_change(m).expect("decode"))
            .collect()
    }
}

#[derive(Debug)]
enum Step {
    Put(&'static str, &'static str),
    PutTtl(&'static str, &'static str, u64),
    Delete(&'static str),
    AdvanceSecs(u64),
    Expect(&'static str, Option<&'static str>),
}

#[test]
fn crud_versions_tombstones_and_ttl() {
    use Step::*;
    let cases: &[(&str, &[Step])] = &[
        ("absent", &[Expect("k", None)]),
        ("put then get", &[Put("k", "v"), Expect("k", Some("v"))]),
        (
            "newer version shadows older",
            &[Put("k", "1"), Put("k", "2"), Expect("k", Some("2"))],
        ),
        (
            "tombstone hides value",
            &[Put("k", "1"), Delete("k"), Expect("k", None)],
        ),
        (
            "put after delete",
            &[
                Put("k", "1"),
                Delete("k"),
                Put("k", "3"),
                Expect("k", Some("3")),
            ],
        ),
        ("delete of absent key", &[Delete("k"), Expect("k", None)]),
        (
            "empty value is a value",
            &[Put("k", ""), Expect("k", Some(""))],
        ),
        (
            "ttl not yet expired",
            &[PutTtl("k", "v", 10), AdvanceSecs(9), Expect("k", Some("v"))],
        ),
        (
            "ttl expired",
            &[PutTtl("k", "v", 10), AdvanceSecs(10), Expect("k", None)],
        ),
        (
            "expired newest does not resurrect older",
            &[
                Put("k", "old"),
                PutTtl("k", "new", 5),
                AdvanceSecs(6),
                Expect("k", None),
            ],
        ),
        (
            "ttl 0 never expires",
            &[
                PutTtl("k", "v", 0),
                AdvanceSecs(1_000_000),
                Expect("k", Some("v")),
            ],
        ),
        (
            "rewrite after expiry",
            &[
                PutTtl("k", "v", 1),
                AdvanceSecs(2),
                Put("k", "w"),
                Expect("k", Some("w")),
            ],
        ),
        (
            "keys are independent",
            &[
                Put("a", "1"),
                Put("ab", "2"),
                Delete("a"),
                Expect("a", None),
                Expect("ab", Some("2")),
            ],
        ),
    ];
    for (name, steps) in cases {
        let env = env();
        let mut last_ts = TimeStamp::ZERO;
        for step in steps.iter() {
            let ts = match step {
                Put(k, v) => Some(env.raw.put(k.as_bytes(), v.as_bytes(), None)),
                PutTtl(k, v, ttl) => Some(env.raw.put(k.as_bytes(), v.as_bytes(), Some(*ttl))),
                Delete(k) => Some(env.raw.delete(k.as_bytes())),
                AdvanceSecs(s) => {
                    env.advance_secs(*s);
                    None
                }
                Expect(k, want) => {
                    let got = env.raw.get(k.as_bytes()).expect("get");
                    assert_eq!(got, want.map(b), "{name}: {step:?}");
                    None
                }
            };
            if let Some(ts) = ts {
                let ts = ts.expect("write");
                assert!(ts > last_ts, "{name}: timestamps increase");
                last_ts = ts;
            }
        }
    }
}

#[test]
fn every_write_keeps_a_version() {
    let env = env();
    env.raw.put(b"k", b"1", None).expect("put");
    env.raw.put(b"k", b"2", None).expect("put");
    env.raw.delete(b"k").expect("delete");
    env.raw.put(b"j", b"1", None).expect("put");
    assert_eq!(env.version_count(), 4);
}

#[test]
fn batch_operations() {
    let env = env();
    let pairs = vec![(b("a"), b("1")), (b("b"), b("2")), (b("a"), b("3"))];
    let ts = env.raw.batch_put(&pairs, &[]).expect("batch put");
    assert!(ts.is_some());
    // A key given twice keeps its last value.
    let got = env
        .raw
        .batch_get(&[b("b"), b("missing"), b("a")])
        .expect("batch get");
    assert_eq!(got, vec![(b("b"), b("2")), (b("a"), b("3"))]);

    assert_eq!(env.raw.batch_put(&[], &[]).expect("empty"), None);
    assert_eq!(env.raw.batch_delete(&[]).expect("empty"), None);

    env.raw
        .batch_delete(&[b("a"), b("nope")])
        .expect("batch delete");
    assert_eq!(
        env.raw.batch_get(&[b("a"), b("b")]).expect("get"),
        vec![(b("b"), b("2"))]
    );

    // TTL forms: one for all, one per pair, and a mismatch.
    let pairs = vec![(b("x"), b("1")), (b("y"), b("2"))];
    env.raw.batch_put(&pairs, &[5]).expect("ttl all");
    assert_eq!(env.raw.get_key_ttl(b"x").expect("ttl"), Some(5));
    assert_eq!(env.raw.get_key_ttl(b"y").expect("ttl"), Some(5));
    env.raw.batch_put(&pairs, &[0, 7]).expect("ttl each");
    assert_eq!(env.raw.get_key_ttl(b"x").expect("ttl"), Some(0));
    assert_eq!(env.raw.get_key_ttl(b"y").expect("ttl"), Some(7));
    assert!(matches!(
        env.raw.batch_put(&pairs, &[1, 2, 3]),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn get_key_ttl() {
    let env = env();
    env.raw.put(b"t", b"v", Some(30)).expect("put");
    env.raw.put(b"forever", b"v", None).expect("put");
    let cases: [(u64, &[u8], Option<u64>); 5] = [
        (0, b"t", Some(30)),
        (0, b"forever", Some(0)),
        (0, b"absent", None),
        (12, b"t", Some(18)),
        (18, b"t", None),
    ];
    for (advance, key, want) in cases {
        env.advance_secs(advance);
        assert_eq!(env.raw.get_key_ttl(key).expect("ttl"), want, "{key:?}");
    }
    // An expired key is gone for scans as well.
    let all = env.raw.scan(b"", b"", 10, false, false).expect("scan");
    assert_eq!(all, vec![(b("forever"), b("v"))]);
}

#[test]
fn compare_and_swap_table() {
    // (initial, expected, new, swapped, previous, final)
    type Case = (
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
        bool,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: &[Case] = &[
        (None, None, "n", true, None, Some("n")),
        (None, Some("x"), "n", false, None, None),
        (Some("x"), Some("x"), "n", true, Some("x"), Some("n")),
        (Some("x"), Some("y"), "n", false, Some("x"), Some("x")),
        (Some("x"), None, "n", false, Some("x"), Some("x")),
        (Some(""), Some(""), "n", true, Some(""), Some("n")),
        (Some(""), None, "n", false, Some(""), Some("")),
    ];
    for &(initial, expected, new, swapped, previous, fin) in cases {
        let env = env();
        if let Some(v) = initial {
            env.raw.put(b"k", v.as_bytes(), None).expect("put");
        }
        let out = env
            .raw
            .compare_and_swap(b"k", expected.map(b), b(new))
            .expect("cas");
        let case = format!("{initial:?} {expected:?} {new:?}");
        assert_eq!(out, (swapped, previous.map(b)), "{case}");
        assert_eq!(env.raw.get(b"k").expect("get"), fin.map(b), "{case}");
    }
}

#[test]
fn compare_and_swap_treats_deleted_and_expired_as_absent() {
    let env = env();
    env.raw.put(b"d", b"x", None).expect("put");
    env.raw.delete(b"d").expect("delete");
    assert_eq!(
        env.raw.compare_and_swap(b"d", None, b("n")).expect("cas"),
        (true, None)
    );
    env.raw.put(b"e", b"x", Some(1)).expect("put");
    env.advance_secs(1);
    assert_eq!(
        env.raw
            .compare_and_swap_with_ttl(b"e", None, b("n"), Some(9))
            .expect("cas"),
        (true, None)
    );
    assert_eq!(env.raw.get_key_ttl(b"e").expect("ttl"), Some(9));
}

#[test]
fn gc_keeps_what_is_visible_at_the_safe_point() {
    let env = env();
    let k1 = env.raw.put(b"k", b"1", None).expect("put");
    let k2 = env.raw.put(b"k", b"2", None).expect("put");
    env.raw.put(b"k", b"3", None).expect("put");
    let t1 = env.raw.put(b"t", b"1", None).expect("put");
    let t2 = env.raw.delete(b"t").expect("delete");
    let e = env.raw.put(b"e", b"1", Some(1)).expect("put");
    env.advance_secs(2);
    assert_eq!(env.version_count(), 6);

    // Below k2: nothing older than the visible version; t's tombstone is
    // above the safe point; the expired value is not visible at k1.
    let stats = env.raw.gc(k1).expect("gc");
    assert_eq!((stats.keys, stats.versions_removed), (3, 0));

    // At k2: k1 is shadowed by k2.
    assert_eq!(env.raw.gc(k2).expect("gc").versions_removed, 1);
    assert_eq!(env.version_count(), 5);
    assert_eq!(env.raw.get(b"k").expect("get"), Some(b("3")));

    // Between the value and tombstone of t: t1 is visible there, keep both.
    assert_eq!(env.raw.gc(t1).expect("gc").versions_removed, 1); // k2 by k3
    assert_eq!(env.version_count(), 4);

    // Above everything: t vanishes entirely, the expired e too, k keeps k3.
    assert!(t2 < e);
    let stats = env.raw.gc(e).expect("gc");
    assert_eq!(stats.versions_removed, 3);
    assert_eq!(env.version_count(), 1);
    assert_eq!(env.raw.get(b"k").expect("get"), Some(b("3")));
    assert_eq!(env.raw.get(b"t").expect("get"), None);
    assert_eq!(env.raw.get(b"e").expect("get"), None);
}

#[test]
fn gc_runs_in_bounded_batches_and_removes_tombstones_last() {
    let env = env();
    let recorder = Arc::new(Recorder::default());
    for i in 0..1_500u32 {
        env.raw
            .put(b"k", format!("{i}").as_bytes(), None)
            .expect("put");
    }
    let tomb = env.raw.delete(b"k").expect("delete");
    env.raw.put(b"other", b"v", None).expect("put");
    env.store
        .add_observer(Arc::clone(&recorder) as Arc<dyn Observer>);

    let stats = env.raw.gc(TimeStamp::MAX).expect("gc");
    assert_eq!(stats.versions_removed, 1_501);
    assert_eq!(env.version_count(), 1);

    let batches = recorder.batches.lock().expect("lock");
    assert!(batches.len() >= 2, "{} batches", batches.len());
    let mut deletes = Vec::new();
    for (source, mutations) in batches.iter() {
        assert_eq!(*source, BatchSource::Gc);
        assert!(mutations.len() <= 1_024);
        for m in mutations {
            assert_eq!(m.op, Op::Delete);
            deletes.push(m.key.clone());
        }
    }
    // The tombstone's engine key is the last delete of all.
    let last = deletes.last().expect("deletes");
    let tomb_change = decode_change(&Mutation {
        cf: Cf::Raw,
        key: last.clone(),
        op: Op::Put(vec![1, 2, 0]),
    })
    .expect("decode")
    .expect("raw");
    assert_eq!(tomb_change.ts, tomb);
    // GC produces no feed changes.
    drop(batches);
    assert!(recorder.changes().is_empty());
}

#[test]
fn invalid_input_is_refused() {
    let env = env();
    let long_key = vec![b'k'; MAX_KEY_SIZE + 1];
    let max_key = vec![b'k'; MAX_KEY_SIZE];
    let big_value = vec![0u8; MAX_VALUE_SIZE + 1];
    let cases: Vec<(&str, kvfeed_storage::Result<()>)> = vec![
        ("get empty", env.raw.get(b"").map(drop)),
        ("get long", env.raw.get(&long_key).map(drop)),
        ("put empty", env.raw.put(b"", b"v", None).map(drop)),
        ("put long", env.raw.put(&long_key, b"v", None).map(drop)),
        ("put big", env.raw.put(b"k", &big_value, None).map(drop)),
        ("delete empty", env.raw.delete(b"").map(drop)),
        (
            "batch put empty key",
            env.raw
                .batch_put(&[(b("a"), b("v")), (b(""), b("v"))], &[])
                .map(drop),
        ),
        (
            "batch put big",
            env.raw
                .batch_put(&[(b("a"), big_value.clone())], &[])
                .map(drop),
        ),
        ("batch get empty", env.raw.batch_get(&[b("")]).map(drop)),
        (
            "batch delete empty",
            env.raw.batch_delete(&[b("")]).map(drop),
        ),
        (
            "cas empty",
            env.raw.compare_and_swap(b"", None, b("v")).map(drop),
        ),
        (
            "cas big",
            env.raw
                .compare_and_swap(b"k", None, big_value.clone())
                .map(drop),
        ),
        ("ttl empty", env.raw.get_key_ttl(b"").map(drop)),
        (
            "scan long",
            env.raw.scan(&long_key, b"", 1, false, false).map(drop),
        ),
        (
            "delete_range long",
            env.raw.delete_range(b"a", &long_key).map(drop),
        ),
    ];
    for (name, result) in cases {
        assert!(
            matches!(result, Err(Error::InvalidInput(_))),
            "{name}: {result:?}"
        );
    }
    // Nothing was written by the refused batch, and limits are inclusive.
    assert_eq!(env.raw.get(b"a").expect("get"), None);
    env.raw.put(&max_key, b"v", None).expect("max key");
    assert_eq!(env.raw.get(&max_key).expect("get"), Some(b("v")));
}

#[test]
fn feed_decoder_reports_what_was_written() {
    let env = env();
    let recorder = Arc::new(Recorder::default());
    env.store
        .add_observer(Arc::clone(&recorder) as Arc<dyn Observer>);
    let t1 = env.raw.put(b"a", b"1", None).expect("put");
    let t2 = env.raw.put(b"b\xFF", b"2", Some(60)).expect("put");
    let t3 = env.raw.delete(b"a").expect("delete");
    let t4 = env
        .raw
        .compare_and_swap(b"c", None, b("3"))
        .map(|_| env.tso.current())
        .expect("cas");
    let now = T0_MS / 1000;
    let want = vec![
        RawChange {
            key: b("a"),
            ts: t1,
            op: RawOp::Put(b("1")),
            expire_ts: None,
        },
        RawChange {
            key: b"b\xFF".to_vec(),
            ts: t2,
            op: RawOp::Put(b("2")),
            expire_ts: Some(now + 60),
        },
        RawChange {
            key: b("a"),
            ts: t3,
            op: RawOp::Delete,
            expire_ts: None,
        },
        RawChange {
            key: b("c"),
            ts: t4,
            op: RawOp::Put(b("3")),
            expire_ts: None,
        },
    ];
    assert_eq!(recorder.changes(), want);

    // Other families and engine deletes are not raw changes.
    for m in [
        Mutation {
            cf: Cf::Default,
            key: b("x"),
            op: Op::Put(b("y")),
        },
        Mutation {
            cf: Cf::Raw,
            key: b("x"),
            op: Op::Delete,
        },
    ] {
        assert_eq!(decode_change(&m).expect("decode"), None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn decoding_garbage_never_panics(
        key in proptest::collection::vec(any::<u8>(), 0..40),
        value in proptest::collection::vec(any::<u8>(), 0..24),
    ) {
        let m = Mutation { cf: Cf::Raw, key, op: Op::Put(value) };
        // Either result is fine; reaching here without a panic is the test.
        let _ = decode_change(&m);
    }
}

#[test]
fn corrupt_records_are_reported() {
    let env = env();
    env.raw.put(b"k", b"v", None).expect("put");
    // Overwrite the stored record with garbage.
    let snap = env.store.snapshot();
    let (key, _) = snap
        .iter(
            Cf::Raw,
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
            false,
        )
        .next()
        .expect("one")
        .expect("ok");
    drop(snap);
    let mut batch = kvfeed_storage::engine::WriteBatch::new();
    batch.put(Cf::Raw, key, vec![9, 9, 9]);
    env.engine.write(&batch).expect("write");
    assert!(matches!(env.raw.get(b"k"), Err(Error::Corrupt { .. })));
    assert!(matches!(
        env.raw.scan(b"", b"", 10, false, false),
        Err(Error::Corrupt { .. })
    ));
}
