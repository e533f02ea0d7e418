use std::sync::Arc;

use super::*;
use crate::TimeStamp;
use crate::engine::Engine;
use crate::engine::memory::MemoryEngine;
use crate::mvcc::{MutationOp, PrewriteRequest, TxnMutation, TxnStore};
use crate::raw::RawStore;
use crate::region::{RegionMap, Regions, STORE_ID, WriteTracker};
use crate::store::{Durability, Store};
use crate::tso::{Clock, ManualClock, Tso};

struct Data {
    store: Arc<Store>,
    tso: Arc<Tso>,
    txn: TxnStore,
    raw: RawStore,
}

fn data() -> Data {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let store = Arc::new(Store::open(engine, Durability::NoSync).expect("store"));
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_700_000_000_000));
    let tso = Arc::new(Tso::open(Arc::clone(&store), clock).expect("tso"));
    Data {
        txn: TxnStore::new(Arc::clone(&store)),
        raw: RawStore::new(Arc::clone(&store), Arc::clone(&tso)),
        store,
        tso,
    }
}

impl Data {
    fn ts(&self) -> TimeStamp {
        self.tso.get(1).expect("ts")
    }

    /// Commits `op` on `key` in a fresh transaction.
    fn txn(&self, key: &[u8], op: MutationOp) {
        let start_ts = self.ts();
        let req = PrewriteRequest {
            mutations: vec![TxnMutation::new(key.to_vec(), op)],
            primary: key.to_vec(),
            start_ts,
            lock_ttl: 3_000,
            ..PrewriteRequest::default()
        };
        let out = self.txn.prewrite(&req).expect("prewrite");
        assert!(out.locks.is_empty(), "{out:?}");
        self.txn
            .commit(&[key.to_vec()], start_ts, self.ts())
            .expect("commit");
    }

    fn put(&self, key: &[u8], value: &[u8]) {
        self.txn(key, MutationOp::Put(value.to_vec()));
    }

    fn raw_put(&self, key: &[u8], value: &[u8]) {
        self.raw.put(key, value, None).expect("raw put");
    }
}

/// The whole key space as one region.
fn everything() -> Region {
    RegionMap::new(Vec::new(), &[STORE_ID])
        .expect("map")
        .regions()[0]
        .clone()
}

fn limits(split: RegionSize, max: RegionSize) -> SplitLimits {
    SplitLimits {
        split,
        max,
        batch: 100,
    }
}

/// Checks every property a split answer must have, measuring each part
/// as a region of its own after the split.
fn assert_valid(data: &Data, region: &Region, check: &SplitCheck) {
    let snap = data.store.snapshot();
    assert_eq!(check.parts.len(), check.split_keys.len() + 1, "{check:?}");
    let mut previous = region.start_key.clone();
    for key in &check.split_keys {
        assert!(
            is_complete_encoding(key),
            "{key:?} is not a complete encoding"
        );
        assert!(*key > previous, "split keys ascend, inside the region");
        assert!(region.contains(key));
        previous = key.clone();
    }
    let map = RegionMap::new(Vec::new(), &[STORE_ID]).expect("map");
    let (map, _) = map
        .split(region.id, None, &check.split_keys)
        .expect("the map accepts the split keys");
    let mut sum = RegionSize::default();
    for (part, want) in map.regions().iter().zip(&check.parts) {
        let (got, complete) =
            measure(&*snap, part, RegionSize::new(u64::MAX, u64::MAX)).expect("measure");
        assert!(complete);
        assert_eq!(got, *want, "part {part:?}");
        sum = sum.plus(got);
    }
    assert_eq!(sum, check.size, "the parts add up to the region");
}

#[test]
fn raw_data_is_cut_into_parts_of_about_the_split_size() {
    let data = data();
    let value = [7u8; 100];
    for i in 0..200 {
        data.raw_put(format!("r{i:04}").as_bytes(), &value);
    }
    let region = everything();
    let (whole, complete) = measure(
        &*data.store.snapshot(),
        &region,
        RegionSize::new(u64::MAX, u64::MAX),
    )
    .expect("measure");
    assert!(complete);
    assert_eq!(whole.keys, 200);
    assert!(whole.bytes > 200 * 100, "{whole:?}");

    let split = RegionSize::new(whole.bytes / 4, u64::MAX);
    let max = RegionSize::new(whole.bytes / 4 * 3 / 2, u64::MAX);
    let check = check_split(&*data.store.snapshot(), &region, &limits(split, max)).expect("check");
    assert!(check.complete);
    assert_eq!(check.split_keys.len(), 3, "{check:?}");
    assert_valid(&data, &region, &check);
    for part in &check.parts[..3] {
        assert!(
            part.bytes >= split.bytes && part.bytes < split.bytes + 200,
            "{part:?}"
        );
    }
    // Cuts fall between raw keys: each is the encoding right after one.
    assert_eq!(check.split_keys[0], encoding_after(b"r0049"));

    // Below the maximum nothing is cut.
    let big = RegionSize::new(whole.bytes + 1, u64::MAX);
    let none = check_split(&*data.store.snapshot(), &region, &limits(split, big)).expect("check");
    assert!(
        none.split_keys.is_empty() && none.parts.is_empty(),
        "{none:?}"
    );
    assert_eq!(none.size, whole);
}

#[test]
fn transactional_keys_are_cut_at_their_own_encoding_and_count_every_version() {
    let data = data();
    for round in 0..3 {
        for i in 0..40 {
            data.put(
                format!("t/{i:03}").as_bytes(),
                format!("v{round}").as_bytes(),
            );
        }
    }
    let region = everything();
    let snap = data.store.snapshot();
    let (whole, _) = measure(&*snap, &region, RegionSize::new(u64::MAX, u64::MAX)).expect("m");
    assert_eq!(whole.keys, 120, "three versions of forty keys");

    let check = check_split(
        &*snap,
        &region,
        &limits(RegionSize::new(u64::MAX, 30), RegionSize::new(u64::MAX, 45)),
    )
    .expect("check");
    assert_eq!(check.split_keys.len(), 3, "{check:?}");
    assert_eq!(
        check.split_keys[0],
        encode_bytes(b"t/010"),
        "whole keys, 30 versions"
    );
    assert_valid(&data, &region, &check);
    // The last part (30 versions) is kept; a sliver would have joined the
    // one before it.
    assert_eq!(
        check.parts.iter().map(|p| p.keys).collect::<Vec<_>>(),
        [30; 4]
    );
}

#[test]
fn a_small_last_part_joins_the_one_before() {
    let data = data();
    for i in 0..34 {
        data.put(format!("t/{i:03}").as_bytes(), b"v");
    }
    let check = check_split(
        &*data.store.snapshot(),
        &everything(),
        &limits(RegionSize::new(u64::MAX, 10), RegionSize::new(u64::MAX, 15)),
    )
    .expect("check");
    // 10 + 10 + 14: the last four keys join the ten before them, which
    // stays below the maximum of 15.
    let keys: Vec<u64> = check.parts.iter().map(|p| p.keys).collect();
    assert_eq!(keys, [10, 10, 14]);
    assert_valid(&data, &everything(), &check);
}

#[test]
fn versions_of_one_key_are_never_separated() {
    let data = data();
    for i in 0..100 {
        data.put(b"hot", format!("{i}").as_bytes());
    }
    let region = everything();
    let tight = limits(RegionSize::new(u64::MAX, 10), RegionSize::new(u64::MAX, 15));
    let check = check_split(&*data.store.snapshot(), &region, &tight).expect("check");
    assert!(
        check.split_keys.is_empty(),
        "one key cannot be split: {check:?}"
    );
    assert_eq!(check.size.keys, 100);

    // With a neighbour, the cut lands between the two keys.
    for i in 0..20 {
        data.put(b"hot2", format!("{i}").as_bytes());
    }
    let check = check_split(&*data.store.snapshot(), &region, &tight).expect("check");
    assert_eq!(check.split_keys, [encode_bytes(b"hot2")]);
    assert_valid(&data, &region, &check);
}

#[test]
fn both_key_modes_in_one_region_give_boundaries_valid_for_both() {
    let data = data();
    for i in 0..60 {
        // Interleaved in boundary space: raw "m…" keys sort among the
        // encodings of "m…" transactional keys.
        data.raw_put(format!("m{i:03}").as_bytes(), b"raw-value");
        data.put(format!("m{i:03}x").as_bytes(), b"txn-value");
    }
    // Locks and large values count too.
    let start_ts = data.ts();
    let req = PrewriteRequest {
        mutations: vec![TxnMutation::new(
            b"m999".to_vec(),
            MutationOp::Put(vec![1; 1000]),
        )],
        primary: b"m999".to_vec(),
        start_ts,
        lock_ttl: 3_000,
        ..PrewriteRequest::default()
    };
    data.txn.prewrite(&req).expect("prewrite");
    let region = everything();
    let check = check_split(
        &*data.store.snapshot(),
        &region,
        &limits(RegionSize::new(u64::MAX, 20), RegionSize::new(u64::MAX, 30)),
    )
    .expect("check");
    assert_eq!(check.size.keys, 120, "the pending lock adds no key");
    assert!(check.size.bytes > 1000, "but its value adds bytes");
    assert!(check.split_keys.len() >= 4, "{check:?}");
    assert_valid(&data, &region, &check);
}

#[test]
fn raw_keys_no_encoding_can_separate_stay_together() {
    let data = data();
    // Same first eight bytes, ninth byte an ASCII digit: every complete
    // encoding starting "user/key" sorts above all of them.
    for i in 0..50 {
        data.raw_put(format!("user/key{i:03}").as_bytes(), b"v");
    }
    data.raw_put(b"zzz", b"v");
    let region = everything();
    let check = check_split(
        &*data.store.snapshot(),
        &region,
        &limits(RegionSize::new(u64::MAX, 10), RegionSize::new(u64::MAX, 15)),
    )
    .expect("check");
    assert_eq!(check.split_keys, [encode_bytes(b"user/key")], "{check:?}");
    assert_eq!(check.parts[0].keys, 50);
    assert_valid(&data, &region, &check);
}

#[test]
fn scans_stop_early_and_stay_inside_the_region() {
    let data = data();
    for i in 0..100 {
        data.put(format!("k{i:03}").as_bytes(), b"v");
    }
    let map = RegionMap::new(vec![encode_bytes(b"k050")], &[STORE_ID]).expect("map");
    let snap = data.store.snapshot();
    let (left, right) = (&map.regions()[0], &map.regions()[1]);
    let all = RegionSize::new(u64::MAX, u64::MAX);
    assert_eq!(measure(&*snap, left, all).expect("m").0.keys, 50);
    assert_eq!(measure(&*snap, right, all).expect("m").0.keys, 50);
    let (seen, complete) = measure(&*snap, right, RegionSize::new(u64::MAX, 5)).expect("m");
    assert!(!complete);
    assert_eq!(seen.keys, 6, "stops at the first entry above the limit");

    // A batch limit stops the split check once the region is known big.
    let check = check_split(
        &*snap,
        right,
        &SplitLimits {
            split: RegionSize::new(u64::MAX, 5),
            max: RegionSize::new(u64::MAX, 5),
            batch: 2,
        },
    )
    .expect("check");
    assert!(!check.complete);
    assert_eq!(
        check.split_keys,
        [encode_bytes(b"k055"), encode_bytes(b"k060")]
    );
    assert_eq!(check.size.keys, 10);
}

#[test]
fn the_tracker_attributes_writes_to_regions_and_sees_splits() {
    let data = data();
    let regions = Regions::open(
        Arc::clone(&data.store),
        vec![encode_bytes(b"m")],
        &[STORE_ID],
    )
    .expect("regions");
    let tracker = Arc::new(WriteTracker::new(regions.current()));
    data.store.add_observer(tracker.clone());
    tracker.catch_up(regions.current());
    let map = regions.current();
    let (left, right) = (map.regions()[0].id, map.regions()[1].id);

    data.put(b"a", b"1");
    data.raw_put(b"z", b"2");
    // A raw key below encode("m") but above "m" itself goes right.
    data.raw_put(b"m\x01", b"3");
    let written = tracker.take();
    assert_eq!(written.regions.get(&left).map(|s| s.keys), Some(1));
    assert_eq!(written.regions.get(&right).map(|s| s.keys), Some(2));
    assert!(written.regions[&left].bytes > 0);
    assert!(tracker.take().regions.is_empty(), "taking empties it");

    let parts = regions
        .split(right, None, vec![encode_bytes(b"t")])
        .expect("split");
    data.raw_put(b"n", b"4");
    let written = tracker.take();
    assert_eq!(
        written.split,
        parts.iter().map(|r| r.id).collect::<Vec<_>>()
    );
    assert_eq!(
        written.regions.get(&parts[0].id).map(|s| s.keys),
        Some(1),
        "attributed with the layout after the split"
    );
}

#[test]
fn merging_a_changed_region_is_refused() {
    let data = data();
    let regions = Regions::open(
        Arc::clone(&data.store),
        vec![encode_bytes(b"m")],
        &[STORE_ID],
    )
    .expect("regions");
    let map = regions.current();
    let (left, right) = (map.regions()[0].clone(), map.regions()[1].clone());
    regions
        .split(right.id, None, vec![encode_bytes(b"t")])
        .expect("split");
    let stale = regions.merge_if_unchanged((left.id, left.epoch), (right.id, right.epoch));
    assert!(stale.is_err(), "{stale:?}");
    assert_eq!(regions.current().regions().len(), 3, "nothing changed");
    let now = regions.current();
    let middle = now.regions()[1].clone();
    let merged = regions
        .merge_if_unchanged((left.id, left.epoch), (middle.id, middle.epoch))
        .expect("merge");
    assert_eq!(merged.id, middle.id);
}
