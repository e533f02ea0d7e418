use std::sync::Arc;

use parking_lot::Mutex;

use super::*;
use crate::engine::memory::MemoryEngine;
use crate::engine::{Cf, Engine};
use crate::mvcc::encode_bytes;
use crate::region::STORE_ID;
use crate::store::{ChangeBatch, Durability, Observer};

fn open_store(engine: &Arc<MemoryEngine>) -> Arc<Store> {
    let engine: Arc<dyn Engine> = engine.clone();
    Arc::new(Store::open(engine, Durability::SyncOnCommit).expect("store"))
}

/// The default layout over `store`.
fn default_regions(store: &Arc<Store>) -> Regions {
    Regions::open(
        Arc::clone(store),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect("open")
}

#[derive(Default)]
struct Seen(Mutex<Vec<Arc<ChangeBatch>>>);

impl Observer for Seen {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        self.0.lock().push(Arc::clone(batch));
    }
}

#[test]
fn a_new_store_gets_the_bootstrap_layout_and_keeps_it() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let regions = Regions::open(store, RegionMap::default_split_keys(), &[STORE_ID]).expect("open");
    let first = regions.current();
    assert_eq!(first.regions().len(), 2);
    // Split, then reopen over the same engine: the layout comes back.
    let left = first.regions()[0].clone();
    let parts = regions
        .split(left.id, Some(left.epoch), vec![encode_bytes(b"k")])
        .expect("split");
    assert_eq!(parts.len(), 2);
    let after = regions.current();
    assert_eq!(after.regions().len(), 3);
    drop(regions);
    let again = Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect("reopen");
    assert_eq!(*again.current(), *after);
    // Ids keep growing across the restart.
    let survivor = again.merge(parts[0].id, None).expect("merge");
    assert_eq!(survivor.id, left.id);
    let more = again
        .split(left.id, None, vec![encode_bytes(b"q")])
        .expect("split again");
    assert!(more[0].id.0 >= after.next_id());
}

#[test]
fn configured_boundaries_are_added_on_restart() {
    let engine = Arc::new(MemoryEngine::new());
    Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect("open");
    let mut keys = RegionMap::default_split_keys();
    keys.push(encode_bytes(b"m"));
    let regions = Regions::open(open_store(&engine), keys.clone(), &[STORE_ID]).expect("reopen");
    assert_eq!(regions.current().regions().len(), 3);
    assert_eq!(regions.counts().splits, 1);
    // A third start with the same keys changes nothing.
    let regions = Regions::open(open_store(&engine), keys, &[STORE_ID]).expect("reopen");
    assert_eq!(regions.current().regions().len(), 3);
    assert_eq!(regions.counts().splits, 0);
}

#[test]
fn observers_get_each_change_with_the_new_layout() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let regions = default_regions(&store);
    let seen = Arc::new(Seen::default());
    store.add_observer(seen.clone());
    let r = regions.current().regions()[0].clone();
    regions
        .split(r.id, None, vec![encode_bytes(b"a"), encode_bytes(b"b")])
        .expect("split");
    let batches = seen.0.lock().clone();
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    assert_eq!(batch.source, BatchSource::Regions);
    let change = batch.regions.as_ref().expect("carries the change");
    assert_eq!(*change.map, *regions.current());
    assert_eq!(change.kind.affected(), vec![r.id]);
    assert!(batch.mutations.iter().all(|m| m.cf == Cf::Meta));
}

#[test]
fn refused_changes_persist_nothing() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let regions = default_regions(&store);
    let before = regions.current();
    let seq = store.last_seq();
    let r = before.regions()[0].clone();
    assert!(matches!(
        regions.split(r.id, None, vec![encode_bytes(b"b"), encode_bytes(b"a")]),
        Err(RegionsError::Change(ChangeError::UnsortedSplitKeys { .. }))
    ));
    assert!(regions.merge(r.id, Some(RegionId(12345))).is_err());
    assert!(regions.transfer_leader(r.id, 7).is_err());
    assert_eq!(store.last_seq(), seq);
    assert_eq!(*regions.current(), *before);
}

#[test]
fn corrupt_layouts_are_reported() {
    let engine = Arc::new(MemoryEngine::new());
    Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect("open");
    // Remove the first region's record: the rest no longer covers the space.
    let mut batch = WriteBatch::new();
    let mut key = record::REGION_KEY_PREFIX.to_vec();
    key.extend_from_slice(&2u64.to_be_bytes());
    batch.delete(Cf::Meta, key);
    engine.write(&batch).expect("write");
    let err = Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect_err("a gap is corruption");
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    // A different number of stores is refused with a clear message.
    let engine = Arc::new(MemoryEngine::new());
    Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[STORE_ID],
    )
    .expect("open");
    let err = Regions::open(
        open_store(&engine),
        RegionMap::default_split_keys(),
        &[1, 2],
    )
    .expect_err("store mismatch");
    assert!(err.to_string().contains("stores"), "{err}");
}
