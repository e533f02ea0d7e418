//! Apply-sequence tests: numbering, observers, poisoning, group commit and
//! the snapshot/observer seam the change feed relies on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use kvfeed_storage::Error;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::engine::{Cf, Engine, EngineSnapshot, Mutation, Op, WriteBatch};
use kvfeed_storage::store::{
    APPLIED_SEQ_KEY, BatchSource, ChangeBatch, Durability, Observer, SeqNo, Store,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

fn put(key: &str) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put(Cf::Raw, key.as_bytes().to_vec(), b"v".to_vec());
    b
}

/// A random batch from a seeded generator, so failures replay exactly.
fn random_batch(rng: &mut StdRng) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for _ in 0..=rng.random_range(0..5) {
        let cf = Cf::ALL[rng.random_range(0..Cf::ALL.len())];
        let key = format!("k{}", rng.random_range(0..40)).into_bytes();
        if rng.random_range(0..4) == 0 {
            batch.delete(cf, key);
        } else {
            batch.put(cf, key, rng.next_u64().to_be_bytes().to_vec());
        }
    }
    batch
}

/// Collects every batch it is handed.
#[derive(Default)]
struct Collector(Mutex<Vec<Arc<ChangeBatch>>>);

impl Observer for Collector {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        self.0.lock().push(Arc::clone(batch));
    }
}

impl Collector {
    fn seqs(&self) -> Vec<u64> {
        self.0.lock().iter().map(|b| b.seq.0).collect()
    }
}

/// A memory engine that counts writes and syncs, can hold the next sync until
/// released, and can fail the n-th sync.
#[derive(Default)]
struct TestEngine {
    inner: MemoryEngine,
    writes: AtomicUsize,
    syncs: AtomicUsize,
    fail_sync_number: AtomicUsize,
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl TestEngine {
    /// Arms the gate: the next sync reports on the first channel, then waits
    /// for a message on the second.
    fn gate_next_sync(&self) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.gate.lock() = Some((entered_tx, release_rx));
        (entered_rx, release_tx)
    }
}

impl Engine for TestEngine {
    fn write(&self, batch: &WriteBatch) -> kvfeed_storage::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write(batch)
    }

    fn sync(&self) -> kvfeed_storage::Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        let gate = self.gate.lock().take();
        if let Some((entered, release)) = gate {
            entered.send(()).expect("test gone");
            release.recv().expect("test gone");
        }
        if self.fail_sync_number.load(Ordering::SeqCst) == n {
            self.inner.fail_next_sync();
        }
        self.inner.sync()
    }

    fn snapshot(&self) -> Box<dyn EngineSnapshot> {
        self.inner.snapshot()
    }
}

/// The whole engine as a map, without the store's own sequence record.
fn dump(snap: &dyn EngineSnapshot) -> BTreeMap<(Cf, Vec<u8>), Vec<u8>> {
    let mut out = BTreeMap::new();
    for cf in Cf::ALL {
        for kv in snap.iter(cf, Bound::Unbounded, Bound::Unbounded, false) {
            let (k, v) = kv.expect("scan");
            if !(cf == Cf::Meta && k == APPLIED_SEQ_KEY) {
                out.insert((cf, k), v);
            }
        }
    }
    out
}

fn apply_mutations(state: &mut BTreeMap<(Cf, Vec<u8>), Vec<u8>>, mutations: &[Mutation]) {
    for m in mutations {
        match &m.op {
            Op::Put(v) => state.insert((m.cf, m.key.clone()), v.clone()),
            Op::Delete => state.remove(&(m.cf, m.key.clone())),
        };
    }
}

#[test]
fn seq_increases_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        let engine = FjallEngine::open(dir.path()).expect("open");
        Store::open(Arc::new(engine), Durability::SyncOnCommit).expect("store")
    };
    {
        let store = open();
        assert_eq!(store.last_seq(), SeqNo(0));
        for i in 1..=10u64 {
            let seq = store.apply(put(&format!("k{i}")), BatchSource::Client);
            assert_eq!(seq.expect("apply"), SeqNo(i));
            assert_eq!(store.last_seq(), SeqNo(i));
        }
    }
    let store = open();
    assert_eq!(store.last_seq(), SeqNo(10));
    assert_eq!(
        store.apply(put("more"), BatchSource::Gc).expect("apply"),
        SeqNo(11)
    );
    let snap = store.snapshot();
    assert_eq!(snap.seq(), SeqNo(11));
    let recorded = snap.get(Cf::Meta, APPLIED_SEQ_KEY).expect("get");
    assert_eq!(recorded, Some(11u64.to_be_bytes().to_vec()));
    assert_eq!(dump(&*snap).len(), 11);
}

#[test]
fn observers_see_every_batch_once_in_order() {
    let store = Arc::new(
        Store::open(Arc::new(MemoryEngine::new()), Durability::SyncOnCommit).expect("open"),
    );
    let observers = [
        Arc::new(Collector::default()),
        Arc::new(Collector::default()),
    ];
    for o in &observers {
        store.add_observer(Arc::clone(o) as Arc<dyn Observer>);
    }
    let sources = [BatchSource::Client, BatchSource::Gc, BatchSource::Internal];
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                let mut applied = Vec::new();
                for i in 0..50 {
                    let batch = random_batch(&mut rng);
                    let source = sources[(w as usize + i) % sources.len()];
                    let seq = store.apply(batch.clone(), source).expect("apply");
                    applied.push((seq, source, batch));
                }
                applied
            })
        })
        .collect();
    let mut applied: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    applied.sort_by_key(|(seq, _, _)| *seq);
    let last = store.last_seq().0;
    assert_eq!(last, 200);
    assert_eq!(
        applied.iter().map(|(s, _, _)| s.0).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    for o in &observers {
        let seen = o.0.lock();
        assert_eq!(seen.len(), applied.len());
        for (batch, (seq, source, written)) in seen.iter().zip(&applied) {
            assert_eq!(batch.seq, *seq);
            assert_eq!(batch.source, *source);
            assert_eq!(batch.mutations, written.mutations());
        }
    }
}

#[test]
fn removed_observer_is_never_called_again() {
    let store =
        Arc::new(Store::open(Arc::new(MemoryEngine::new()), Durability::NoSync).expect("open"));
    let keeper = Arc::new(Collector::default());
    store.add_observer(Arc::clone(&keeper) as Arc<dyn Observer>);

    struct Counting(AtomicUsize, Mutex<Option<mpsc::Sender<()>>>);
    impl Observer for Counting {
        fn on_apply(&self, _: &Arc<ChangeBatch>) {
            if self.0.fetch_add(1, Ordering::SeqCst) == 20
                && let Some(tx) = self.1.lock().take()
            {
                let _ = tx.send(());
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    let counting = Arc::new(Counting(AtomicUsize::new(0), Mutex::new(Some(tx))));
    let id = store.add_observer(Arc::clone(&counting) as Arc<dyn Observer>);
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                for i in 0..200 {
                    store
                        .apply(put(&format!("{w}-{i}")), BatchSource::Client)
                        .expect("apply");
                }
            })
        })
        .collect();
    // Remove while the writers are still going.
    rx.recv().expect("observer saw 20 batches");
    store.remove_observer(id);
    let at_removal = counting.0.load(Ordering::SeqCst);
    for w in writers {
        w.join().expect("writer");
    }
    assert_eq!(counting.0.load(Ordering::SeqCst), at_removal);
    assert_eq!(keeper.seqs(), (1..=600).collect::<Vec<_>>());
    // Removing twice, or an unknown id, is harmless.
    store.remove_observer(id);
}

#[test]
fn failed_sync_poisons_the_store() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Store::open(
        Arc::clone(&engine) as Arc<dyn Engine>,
        Durability::SyncOnCommit,
    )
    .expect("open");
    let seen = Arc::new(Collector::default());
    store.add_observer(Arc::clone(&seen) as Arc<dyn Observer>);
    assert_eq!(
        store.apply(put("a"), BatchSource::Client).expect("apply"),
        SeqNo(1)
    );

    engine.fail_next_sync();
    let err = store
        .apply(put("b"), BatchSource::Client)
        .expect_err("sync failure hidden");
    assert!(matches!(err, Error::Engine { .. }), "{err}");
    assert!(store.is_poisoned());
    assert_eq!(store.last_seq(), SeqNo(1));
    assert_eq!(seen.seqs(), vec![1]);
    // Every later write is refused, even though the engine works again.
    for batch in [put("c"), WriteBatch::new()] {
        let err = store
            .apply(batch, BatchSource::Client)
            .expect_err("poisoned store wrote");
        assert!(matches!(err, Error::Poisoned { .. }), "{err}");
    }
    assert_eq!(seen.seqs(), vec![1]);
    assert_eq!(store.snapshot().seq(), SeqNo(1));
}

#[test]
fn failed_write_poisons_the_store() {
    let engine = Arc::new(MemoryEngine::new());
    let store =
        Store::open(Arc::clone(&engine) as Arc<dyn Engine>, Durability::NoSync).expect("open");
    engine.fail_next_write();
    assert!(matches!(
        store.apply(put("a"), BatchSource::Client),
        Err(Error::Engine { .. })
    ));
    assert!(matches!(
        store.apply(put("a"), BatchSource::Client),
        Err(Error::Poisoned { .. })
    ));
    assert_eq!(store.snapshot().get(Cf::Raw, b"a").expect("get"), None);
}

#[test]
fn a_full_disk_stays_recognisable_after_poisoning() {
    let engine = Arc::new(MemoryEngine::new());
    let store = Store::open(
        Arc::clone(&engine) as Arc<dyn Engine>,
        Durability::SyncOnCommit,
    )
    .expect("open");
    engine.fail_next_sync_with(std::io::ErrorKind::StorageFull);
    let failed = store
        .apply(put("a"), BatchSource::Client)
        .expect_err("sync failure hidden");
    assert!(matches!(failed, Error::Engine { .. }), "{failed}");
    assert!(failed.is_storage_full(), "{failed:?}");
    let refused = store
        .apply(put("b"), BatchSource::Client)
        .expect_err("poisoned store wrote");
    assert!(matches!(refused, Error::Poisoned { .. }), "{refused}");
    assert!(refused.is_storage_full(), "{refused:?}");

    // Any other failure is not mistaken for a full disk.
    let engine = Arc::new(MemoryEngine::new());
    let store =
        Store::open(Arc::clone(&engine) as Arc<dyn Engine>, Durability::NoSync).expect("open");
    engine.fail_next_write();
    let failed = store
        .apply(put("a"), BatchSource::Client)
        .expect_err("write failure hidden");
    assert_eq!(failed.io_kind(), Some(std::io::ErrorKind::Other));
    assert!(!failed.is_storage_full());
}

#[test]
fn a_failed_group_fails_every_writer_in_it() {
    let engine = Arc::new(TestEngine::default());
    engine.fail_sync_number.store(2, Ordering::SeqCst);
    let store = Arc::new(
        Store::open(
            Arc::clone(&engine) as Arc<dyn Engine>,
            Durability::SyncOnCommit,
        )
        .expect("open"),
    );
    let seen = Arc::new(Collector::default());
    store.add_observer(Arc::clone(&seen) as Arc<dyn Observer>);
    let (entered, release) = engine.gate_next_sync();
    let spawn = |key: String| {
        let store = Arc::clone(&store);
        thread::spawn(move || store.apply(put(&key), BatchSource::Client))
    };
    let first = spawn("first".into());
    entered.recv().expect("first sync started");
    let rest: Vec<_> = (0..5).map(|i| spawn(format!("rest{i}"))).collect();
    while store.pending_writes() < rest.len() {
        thread::yield_now();
    }
    release.send(()).expect("release");
    assert_eq!(first.join().expect("join").expect("first apply"), SeqNo(1));
    for w in rest {
        let err = w
            .join()
            .expect("join")
            .expect_err("failed group acknowledged");
        assert!(matches!(err, Error::Engine { .. }), "{err}");
    }
    assert_eq!(seen.seqs(), vec![1]);
    assert!(store.is_poisoned());
}

#[test]
fn concurrent_writers_share_syncs() {
    const WRITERS: usize = 8;
    let engine = Arc::new(TestEngine::default());
    let store = Arc::new(
        Store::open(
            Arc::clone(&engine) as Arc<dyn Engine>,
            Durability::SyncOnCommit,
        )
        .expect("open"),
    );
    let (entered, release) = engine.gate_next_sync();
    let spawn = |key: String| {
        let store = Arc::clone(&store);
        thread::spawn(move || store.apply(put(&key), BatchSource::Client).expect("apply"))
    };
    let first = spawn("first".into());
    // While the first group is inside its sync, everyone else queues up...
    entered.recv().expect("first sync started");
    let rest: Vec<_> = (1..WRITERS).map(|i| spawn(format!("w{i}"))).collect();
    while store.pending_writes() < WRITERS - 1 {
        thread::yield_now();
    }
    release.send(()).expect("release");
    assert_eq!(first.join().expect("join"), SeqNo(1));
    let mut seqs: Vec<u64> = rest
        .into_iter()
        .map(|w| w.join().expect("join").0)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=WRITERS as u64).collect::<Vec<_>>());
    // ...and commits as one group: one write, one sync.
    assert_eq!(engine.writes.load(Ordering::SeqCst), 2);
    assert_eq!(engine.syncs.load(Ordering::SeqCst), 2);
    assert_eq!(dump(&*store.snapshot()).len(), WRITERS);
}

#[test]
fn no_sync_never_syncs() {
    let engine = Arc::new(TestEngine::default());
    let store =
        Store::open(Arc::clone(&engine) as Arc<dyn Engine>, Durability::NoSync).expect("open");
    for i in 0..5 {
        store
            .apply(put(&format!("{i}")), BatchSource::Client)
            .expect("apply");
    }
    assert_eq!(engine.syncs.load(Ordering::SeqCst), 0);
    assert_eq!(engine.writes.load(Ordering::SeqCst), 5);
}

#[test]
fn bad_input_is_refused_without_poisoning() {
    let store = Store::open(Arc::new(MemoryEngine::new()), Durability::SyncOnCommit).expect("open");
    let mut reserved = WriteBatch::new();
    reserved.put(Cf::Meta, APPLIED_SEQ_KEY.to_vec(), b"0".to_vec());
    let mut empty_key = put("ok");
    empty_key.put(Cf::Raw, Vec::new(), b"v".to_vec());
    for batch in [reserved, empty_key] {
        let err = store
            .apply(batch, BatchSource::Client)
            .expect_err("bad batch accepted");
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
    assert!(!store.is_poisoned());
    assert_eq!(
        store.apply(put("ok"), BatchSource::Client).expect("apply"),
        SeqNo(1)
    );
}

#[test]
fn empty_batch_gets_no_number() {
    let engine = Arc::new(TestEngine::default());
    let store = Store::open(
        Arc::clone(&engine) as Arc<dyn Engine>,
        Durability::SyncOnCommit,
    )
    .expect("open");
    let seen = Arc::new(Collector::default());
    store.add_observer(Arc::clone(&seen) as Arc<dyn Observer>);
    assert_eq!(
        store
            .apply(WriteBatch::new(), BatchSource::Client)
            .expect("empty"),
        SeqNo(0)
    );
    store.apply(put("a"), BatchSource::Client).expect("apply");
    assert_eq!(
        store
            .apply(WriteBatch::new(), BatchSource::Client)
            .expect("empty"),
        SeqNo(1)
    );
    assert_eq!(seen.seqs(), vec![1]);
    assert_eq!(engine.writes.load(Ordering::SeqCst), 1);
}

#[test]
fn corrupt_sequence_record_is_reported() {
    let engine = MemoryEngine::new();
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, APPLIED_SEQ_KEY.to_vec(), b"short".to_vec());
    engine.write(&batch).expect("write");
    let err = Store::open(Arc::new(engine), Durability::NoSync).err();
    assert!(matches!(err, Some(Error::Corrupt { .. })), "{err:?}");
}

/// Writers apply random batches while a subscriber, mid-stream, registers an
/// observer and then takes a snapshot. The snapshot plus the observed batches
/// after it must rebuild the final state, with each later seq seen once.
fn seam(engine: Arc<dyn Engine>, durability: Durability, seed: u64) {
    const WRITERS: u64 = 4;
    const PER_WRITER: usize = 150;
    const JOIN_AFTER: usize = 120;
    let store = Arc::new(Store::open(engine, durability).expect("open"));
    let (progress_tx, progress_rx) = mpsc::channel();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            let progress = progress_tx.clone();
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(w));
                let mut seqs = Vec::with_capacity(PER_WRITER);
                for i in 0..PER_WRITER {
                    let source = if rng.random_range(0..5) == 0 {
                        BatchSource::Gc
                    } else {
                        BatchSource::Client
                    };
                    // A key unique to this batch: shows exactly which batches
                    // a snapshot contains (replaying the others is idempotent).
                    let marker = format!("marker/{w}/{i}").into_bytes();
                    let mut batch = random_batch(&mut rng);
                    batch.put(Cf::Raw, marker.clone(), Vec::new());
                    seqs.push((store.apply(batch, source).expect("apply").0, marker));
                    let _ = progress.send(());
                }
                seqs
            })
        })
        .collect();
    drop(progress_tx);

    for _ in 0..JOIN_AFTER {
        progress_rx.recv().expect("writers stopped early");
    }
    let collector = Arc::new(Collector::default());
    store.add_observer(Arc::clone(&collector) as Arc<dyn Observer>);
    let snap = store.snapshot();
    let start = snap.seq().0;
    let mut rebuilt = dump(&*snap);
    drop(snap);

    let mut acked: Vec<(u64, Vec<u8>)> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    acked.sort_unstable();
    let last = store.last_seq().0;
    assert!(
        start >= JOIN_AFTER as u64,
        "snapshot predates acknowledged writes"
    );
    let acked_seqs: Vec<u64> = acked.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        acked_seqs,
        (1..=last).collect::<Vec<_>>(),
        "seqs not dense and unique"
    );
    let in_snapshot: Vec<&Vec<u8>> = rebuilt
        .keys()
        .filter(|(cf, k)| *cf == Cf::Raw && k.starts_with(b"marker/"))
        .map(|(_, k)| k)
        .collect();
    let mut expected: Vec<&Vec<u8>> = acked
        .iter()
        .filter(|(seq, _)| *seq <= start)
        .map(|(_, marker)| marker)
        .collect();
    expected.sort_unstable();
    assert_eq!(
        in_snapshot, expected,
        "snapshot at {start} holds other batches"
    );

    let observed = collector.0.lock();
    let after: Vec<&Arc<ChangeBatch>> = observed.iter().filter(|b| b.seq.0 > start).collect();
    let after_seqs: Vec<u64> = after.iter().map(|b| b.seq.0).collect();
    assert_eq!(
        after_seqs,
        (start + 1..=last).collect::<Vec<_>>(),
        "gap or duplicate after {start}"
    );
    for batch in after {
        apply_mutations(&mut rebuilt, &batch.mutations);
    }
    assert_eq!(rebuilt, dump(&*store.snapshot()));
}

#[test]
fn seam_memory() {
    for seed in 0..6 {
        seam(
            Arc::new(MemoryEngine::new()),
            Durability::SyncOnCommit,
            seed,
        );
    }
}

#[test]
fn seam_fjall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = FjallEngine::open(dir.path()).expect("open");
    seam(Arc::new(engine), Durability::NoSync, 99);
}
