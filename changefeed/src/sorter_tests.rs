use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use kvfeed_client::feed::{Op, Row};
use kvfeed_types::TimeStamp;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::Sorter;

/// Keeps every row in memory.
const BIG: usize = 1 << 30;
/// Spills nearly every row.
const TINY: usize = 1;

fn row(commit: u64, start: u64, key: &str, value: &str) -> Row {
    Row {
        start_ts: TimeStamp::new(start),
        commit_ts: TimeStamp::new(commit),
        op: if value.is_empty() {
            Op::Delete
        } else {
            Op::Put
        },
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        old_value: Bytes::copy_from_slice(format!("old-{value}").as_bytes()),
    }
}

type ModelKey = (TimeStamp, TimeStamp, Bytes);

fn model_key(r: &Row) -> ModelKey {
    (r.commit_ts, r.start_ts, r.key.clone())
}

fn open(budget: usize) -> (tempfile::TempDir, Sorter) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sorter = Sorter::open(dir.path(), budget).expect("open");
    (dir, sorter)
}

fn random_rows(seed: u64, n: usize, value_len: usize) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let commit = rng.random_range(100..200u64);
            let start = commit - rng.random_range(1..5u64);
            let key = format!("k{:05}", rng.random_range(0..5_000u32));
            let value: String = (0..value_len)
                .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                .collect();
            row(commit, start, &key, &value)
        })
        .collect()
}

/// Adds `rows` and drains them in steps of the resolved ts, `max_rows` at a
/// time; checks against a model and returns everything drained.
fn add_and_drain(sorter: &mut Sorter, rows: &[Row], max_rows: usize) -> Vec<Row> {
    let mut model: BTreeMap<ModelKey, Row> = BTreeMap::new();
    for r in rows {
        sorter.add(r.clone()).expect("add");
        model.insert(model_key(r), r.clone());
    }
    // A duplicate of a spilled row may count twice (see `Sorter::len`).
    assert!(sorter.len() >= model.len() as u64);
    let mut out = Vec::new();
    for upto in (100..=200u64).step_by(7).chain([u64::MAX]) {
        loop {
            let batch = sorter.drain(TimeStamp::new(upto), max_rows).expect("drain");
            assert!(batch.len() <= max_rows);
            assert!(batch.iter().all(|r| r.commit_ts.into_inner() <= upto));
            let done = batch.len() < max_rows;
            out.extend(batch);
            if done {
                break;
            }
        }
        let left = model
            .iter()
            .filter(|(k, _)| k.0.into_inner() > upto)
            .count();
        assert!(sorter.len() >= left as u64, "after draining up to {upto}");
    }
    let expected: Vec<Row> = model.into_values().collect();
    assert_eq!(out, expected);
    assert!(sorter.is_empty());
    out
}

#[test]
fn random_inserts_come_out_sorted_in_memory() {
    let rows = random_rows(1, 20_000, 16);
    let (_dir, mut sorter) = open(BIG);
    add_and_drain(&mut sorter, &rows, 1_000);
    assert_eq!(sorter.spilled_rows(), 0);
}

#[test]
fn spilling_gives_the_same_rows_as_memory() {
    let rows = random_rows(2, 20_000, 16);
    let (_dir, mut in_memory) = open(BIG);
    let expected = add_and_drain(&mut in_memory, &rows, 500);
    for budget in [TINY, 64 << 10, 512 << 10] {
        let (_dir, mut spilling) = open(budget);
        let got = add_and_drain(&mut spilling, &rows, 500);
        assert_eq!(got, expected, "budget {budget}");
        assert_eq!(spilling.spilled_rows(), 0);
        assert_eq!(spilling.memory_bytes(), 0);
    }
}

#[test]
fn more_rows_than_fit_in_memory() {
    let budget = 256 << 10;
    let rows = random_rows(3, 30_000, 200);
    let (_dir, mut sorter) = open(budget);
    let mut peak = 0;
    for r in &rows {
        sorter.add(r.clone()).expect("add");
        peak = peak.max(sorter.memory_bytes());
    }
    assert!(peak <= budget + budget / 8, "peak {peak}");
    assert!(
        sorter.spilled_rows() > sorter.len() / 2,
        "most rows are spilled"
    );
    assert_eq!(
        sorter.min_commit_ts().expect("min"),
        rows.iter().map(|r| r.commit_ts).min()
    );
    let drained = sorter.drain(TimeStamp::MAX, usize::MAX).expect("drain");
    assert!(
        drained
            .windows(2)
            .all(|w| model_key(&w[0]) < model_key(&w[1]))
    );
    let distinct: std::collections::BTreeSet<ModelKey> = rows.iter().map(model_key).collect();
    assert_eq!(drained.len(), distinct.len());
    assert!(sorter.is_empty());
    assert_eq!(sorter.min_commit_ts().expect("min"), None);
}

#[test]
fn duplicates_are_held_once_and_the_later_wins() {
    // In memory.
    let (_dir, mut sorter) = open(BIG);
    sorter.add(row(10, 5, "a", "first")).expect("add");
    sorter.add(row(10, 5, "a", "second")).expect("add");
    sorter.add(row(10, 6, "a", "other txn")).expect("add");
    assert_eq!(sorter.len(), 2);
    let out = sorter.drain(TimeStamp::new(10), 10).expect("drain");
    assert_eq!(
        out,
        vec![row(10, 5, "a", "second"), row(10, 6, "a", "other txn")]
    );
    assert!(sorter.is_empty());
}

#[test]
fn a_duplicate_of_a_spilled_row_replaces_it() {
    let (_dir, mut sorter) = open(TINY);
    for i in 0..10 {
        sorter.add(row(20 + i, 1, "k", "spilled")).expect("add");
    }
    assert!(sorter.spilled_rows() >= 9, "{}", sorter.spilled_rows());
    // One copy on disk, the other arriving now: held once, the later wins.
    sorter.add(row(25, 1, "k", "again")).expect("add");
    sorter.add(row(25, 1, "k", "and again")).expect("add");
    assert!(sorter.len() >= 10);
    let out = sorter.drain(TimeStamp::MAX, 100).expect("drain");
    assert_eq!(out.len(), 10);
    assert_eq!(out[5], row(25, 1, "k", "and again"));
    assert!(sorter.is_empty());
}

#[test]
fn duplicates_of_rows_moved_back_to_memory_replace_them() {
    let (_dir, mut sorter) = open(2 << 10);
    for i in 0..100 {
        sorter.add(row(100 + i, 1, "k", "first")).expect("add");
    }
    assert!(sorter.spilled_rows() > 50);
    // Empties memory and moves spilled rows back, some beyond 130.
    let out = sorter.drain(TimeStamp::new(130), 1_000).expect("drain");
    assert_eq!(out.len(), 31);
    assert!(sorter.memory_bytes() > 0);
    for i in 31..100 {
        sorter.add(row(100 + i, 1, "k", "second")).expect("add");
    }
    assert!(sorter.len() >= 69);
    let out = sorter.drain(TimeStamp::MAX, 1_000).expect("drain");
    assert_eq!(out.len(), 69);
    assert!(out.iter().all(|r| r.value == "second"));
}

#[test]
fn drain_stops_at_max_rows() {
    for budget in [BIG, TINY] {
        let (_dir, mut sorter) = open(budget);
        for i in 0..10 {
            sorter.add(row(10, 1, &format!("k{i}"), "v")).expect("add");
        }
        assert!(
            sorter
                .drain(TimeStamp::new(10), 0)
                .expect("drain")
                .is_empty()
        );
        let first = sorter.drain(TimeStamp::new(10), 4).expect("drain");
        let keys: Vec<&[u8]> = first.iter().map(|r| &r.key[..]).collect();
        assert_eq!(keys, [&b"k0"[..], b"k1", b"k2", b"k3"]);
        assert_eq!(sorter.len(), 6);
        assert_eq!(sorter.drain(TimeStamp::new(10), 4).expect("drain").len(), 4);
        assert_eq!(sorter.drain(TimeStamp::new(10), 4).expect("drain").len(), 2);
        assert!(sorter.is_empty());
    }
}

#[test]
fn drain_includes_upto_and_excludes_above() {
    for budget in [BIG, TINY] {
        let (_dir, mut sorter) = open(budget);
        for commit in [5, 6, 7] {
            sorter.add(row(commit, 1, "k", "v")).expect("add");
        }
        assert!(
            sorter
                .drain(TimeStamp::new(4), 10)
                .expect("drain")
                .is_empty()
        );
        let out = sorter.drain(TimeStamp::new(6), 10).expect("drain");
        let commits: Vec<u64> = out.iter().map(|r| r.commit_ts.into_inner()).collect();
        assert_eq!(commits, [5, 6], "budget {budget}");
        assert_eq!(
            sorter.min_commit_ts().expect("min"),
            Some(TimeStamp::new(7))
        );
        assert!(
            sorter
                .drain(TimeStamp::new(6), 10)
                .expect("drain")
                .is_empty()
        );
        assert_eq!(sorter.drain(TimeStamp::new(7), 10).expect("drain").len(), 1);
    }
}

#[test]
fn reopen_clears_rows_of_an_earlier_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut sorter = Sorter::open(dir.path(), TINY).expect("open");
        for i in 0..1_000 {
            sorter.add(row(10 + i, 1, "k", "left behind")).expect("add");
        }
        assert!(sorter.spilled_rows() > 900);
    }
    let mut sorter = Sorter::open(dir.path(), TINY).expect("reopen");
    assert!(sorter.is_empty());
    assert_eq!(sorter.min_commit_ts().expect("min"), None);
    sorter.add(row(500, 1, "k", "new")).expect("add");
    let out = sorter.drain(TimeStamp::MAX, 10_000).expect("drain");
    assert_eq!(out, vec![row(500, 1, "k", "new")]);
}

#[test]
fn an_empty_spill_returns_to_memory() {
    let (_dir, mut sorter) = open(8 << 10);
    for i in 0..1_000 {
        sorter.add(row(10 + i, 1, "k", "burst")).expect("add");
    }
    assert!(sorter.spilled_rows() > 900);
    assert_eq!(
        sorter
            .drain(TimeStamp::MAX, usize::MAX)
            .expect("drain")
            .len(),
        1_000
    );
    assert_eq!(sorter.spilled_rows(), 0);
    // After the burst, rows above the old ones stay in memory again.
    for i in 0..10 {
        sorter.add(row(5_000 + i, 1, "k", "calm")).expect("add");
    }
    assert_eq!(sorter.spilled_rows(), 0);
    assert_eq!(sorter.len(), 10);
}

#[test]
fn oversized_keys_are_refused() {
    let (_dir, mut sorter) = open(BIG);
    let mut r = row(1, 1, "", "v");
    r.key = Bytes::from(vec![b'k'; 70_000]);
    assert!(matches!(
        sorter.add(r),
        Err(crate::SorterError::RowTooLarge { .. })
    ));
    assert!(sorter.is_empty());
}

#[derive(Debug, Clone)]
enum Action {
    Add {
        commit: u64,
        start: u64,
        key: u8,
        value: u8,
    },
    Drain {
        upto: u64,
        max_rows: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (1..40u64, 0..3u64, 0..8u8, any::<u8>()).prop_map(|(commit, back, key, value)| {
            Action::Add { commit, start: commit.saturating_sub(back), key, value }
        }),
        1 => (0..45u64, 0..20usize).prop_map(|(upto, max_rows)| Action::Drain { upto, max_rows }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The sorter against a `BTreeMap`: any mix of adds (duplicates
    /// included) and drains, with budgets that keep everything in memory,
    /// spill nearly everything, or move rows back and forth.
    #[test]
    fn behaves_like_a_sorted_map(
        actions in proptest::collection::vec(action(), 1..300),
        budget in prop_oneof![Just(TINY), Just(600usize), Just(2_000usize), Just(BIG)],
    ) {
        let (_dir, mut sorter) = open(budget);
        let mut model: BTreeMap<ModelKey, Row> = BTreeMap::new();
        // The highest key drained: rows at or below it are dropped.
        let mut drained: Option<ModelKey> = None;
        for a in actions {
            match a {
                Action::Add { commit, start, key, value } => {
                    let r = row(commit, start, &format!("key{key}"), &format!("v{value}"));
                    sorter.add(r.clone()).expect("add");
                    let k = model_key(&r);
                    if drained.as_ref().is_none_or(|d| k > *d) {
                        model.insert(k, r);
                    }
                }
                Action::Drain { upto, max_rows } => {
                    let got = sorter.drain(TimeStamp::new(upto), max_rows).expect("drain");
                    let expected: Vec<ModelKey> = model
                        .keys()
                        .take_while(|k| k.0.into_inner() <= upto)
                        .take(max_rows)
                        .cloned()
                        .collect();
                    let want: Vec<Row> =
                        expected.iter().filter_map(|k| model.remove(k)).collect();
                    prop_assert_eq!(got, want);
                    if let Some(last) = expected.last() {
                        drained = Some(last.clone());
                    }
                }
            }
            prop_assert!(sorter.len() >= model.len() as u64);
            prop_assert_eq!(
                sorter.min_commit_ts().expect("min"),
                model.keys().next().map(|k| k.0)
            );
        }
    }
}

/// `cargo test --release -p kvfeed-changefeed sorter::tests::timing -- --ignored --nocapture`
#[test]
#[ignore = "a timing run: use a release build"]
fn timing_one_million_rows() {
    let n = 1_000_000u64;
    let value = Bytes::from(vec![b'v'; 128]);
    let mut rng = StdRng::seed_from_u64(7);
    let rows: Vec<Row> = (0..n)
        .map(|i| {
            let commit = 1_000 + rng.random_range(0..10_000u64);
            Row {
                start_ts: TimeStamp::new(commit - 1),
                commit_ts: TimeStamp::new(commit),
                op: Op::Put,
                key: Bytes::from(format!("key-{i:010}")),
                value: value.clone(),
                old_value: Bytes::new(),
            }
        })
        .collect();
    for budget in [BIG, 32 << 20] {
        let (_dir, mut sorter) = open(budget);
        let start = Instant::now();
        for r in &rows {
            sorter.add(r.clone()).expect("add");
        }
        let added = start.elapsed();
        let spilled = sorter.spilled_rows();
        let mut drained = 0;
        loop {
            let batch = sorter.drain(TimeStamp::MAX, 4_096).expect("drain");
            if batch.is_empty() {
                break;
            }
            drained += batch.len();
        }
        assert_eq!(drained as u64, n);
        println!(
            "budget {budget}: {n} rows, {spilled} spilled: add {added:?}, add+drain {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn rows_at_or_below_what_was_drained_are_dropped() {
    let (_dir, mut sorter) = open(TINY);
    for i in 0..20 {
        sorter.add(row(10 + i, 5, "k", "v")).expect("add");
    }
    let first = sorter.drain(TimeStamp::new(19), 100).expect("drain");
    assert_eq!(first.len(), 10);
    // A repeat of a drained row, and an older row: both already emitted.
    sorter.add(row(15, 5, "k", "again")).expect("add");
    sorter.add(row(3, 1, "old", "v")).expect("add");
    // A new row above the last drained one is kept.
    sorter.add(row(19, 6, "k", "new")).expect("add");
    let rest = sorter.drain(TimeStamp::MAX, 100).expect("drain");
    let commits: Vec<u64> = rest.iter().map(|r| r.commit_ts.into_inner()).collect();
    assert_eq!(commits, [19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]);
    assert_eq!(rest[0], row(19, 6, "k", "new"));
}
