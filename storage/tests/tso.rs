//! Timestamp oracle tests: batch semantics, monotonicity under concurrency,
//! clock steps, restarts and the persisted window.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::engine::{Cf, Engine, WriteBatch};
use kvfeed_storage::store::{BatchSource, ChangeBatch, Durability, Observer, Store};
use kvfeed_storage::timestamp::MAX_LOGICAL;
use kvfeed_storage::tso::{
    Clock, EXTEND_MARGIN_MS, ManualClock, Tso, WINDOW_KEY, WINDOW_MS, persisted_window_end,
};
use kvfeed_storage::{Error, TimeStamp};

const T0: u64 = 1_700_000_000_000;

fn open_store(engine: &Arc<MemoryEngine>) -> Arc<Store> {
    let engine: Arc<dyn Engine> = Arc::clone(engine) as Arc<dyn Engine>;
    Arc::new(Store::open(engine, Durability::SyncOnCommit).expect("open store"))
}

fn setup(start_ms: u64) -> (Arc<MemoryEngine>, Arc<Store>, Arc<ManualClock>, Tso) {
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let clock = Arc::new(ManualClock::new(start_ms));
    let tso = Tso::open(Arc::clone(&store), Arc::clone(&clock) as Arc<dyn Clock>).expect("tso");
    (engine, store, clock, tso)
}

#[test]
fn invalid_counts_are_refused() {
    let (_e, _s, _c, tso) = setup(T0);
    let too_many = u32::try_from(MAX_LOGICAL + 1).expect("fits");
    for count in [0, too_many, u32::MAX] {
        assert!(
            matches!(tso.get(count), Err(Error::InvalidInput(_))),
            "count {count}"
        );
    }
    // Nothing was handed out by the refused calls.
    let ts = tso.get(1).expect("get");
    assert_eq!((ts.physical(), ts.logical()), (T0, 1));
}

#[test]
fn batch_returns_highest_and_reserves_the_range() {
    let (_e, _s, _c, tso) = setup(T0);
    let cases: [(u32, u64); 4] = [(1, 1), (10, 11), (1, 12), (100, 112)];
    for (count, logical) in cases {
        let ts = tso.get(count).expect("get");
        assert_eq!(ts.physical(), T0);
        assert_eq!(ts.logical(), logical, "count {count}");
        assert_eq!(tso.current(), ts);
    }
}

#[test]
fn follows_the_clock_forward() {
    let (_e, _s, clock, tso) = setup(T0);
    tso.get(5).expect("get");
    clock.advance(7);
    let ts = tso.get(1).expect("get");
    assert_eq!((ts.physical(), ts.logical()), (T0 + 7, 1));
}

#[test]
fn current_is_below_the_next_allocation() {
    let (_e, _s, _c, tso) = setup(T0);
    let before = tso.current();
    let first = tso.get(1).expect("get");
    assert!(before < first);
    assert_eq!(tso.current(), first);
    assert!(tso.current() < tso.get(1).expect("get"));
}

#[test]
fn clock_step_back_keeps_increasing() {
    let (_e, _s, clock, tso) = setup(T0);
    clock.advance(500);
    let before = tso.get(3).expect("get");
    clock.step_back(10_000);
    let mut last = before;
    for _ in 0..100 {
        let ts = tso.get(2).expect("get");
        assert!(ts > last);
        // The physical part does not follow the clock backwards.
        assert_eq!(ts.physical(), before.physical());
        last = ts;
    }
    // Once the clock passes the old physical again, it is followed.
    clock.set(T0 + 2_000);
    let ts = tso.get(1).expect("get");
    assert_eq!((ts.physical(), ts.logical()), (T0 + 2_000, 1));
}

#[test]
fn logical_overflow_advances_physical() {
    let max = u32::try_from(MAX_LOGICAL).expect("fits");
    // (first count, second count, expected second (physical offset, logical))
    let cases: [(u32, u32, (u64, u64)); 4] = [
        (max, 1, (1, 1)),
        (max, max, (1, MAX_LOGICAL)),
        (1, max, (1, MAX_LOGICAL)),
        (max - 1, 1, (0, MAX_LOGICAL)),
    ];
    for (first, second, (offset, logical)) in cases {
        let (_e, _s, _c, tso) = setup(T0);
        let a = tso.get(first).expect("first");
        let b = tso.get(second).expect("second");
        assert!(b > a);
        assert_eq!(
            (b.physical(), b.logical()),
            (T0 + offset, logical),
            "{first} then {second}"
        );
        // The reserved ranges do not overlap.
        assert!(b.into_inner() - u64::from(second) >= a.into_inner());
    }
}

#[test]
fn overflow_with_a_stopped_clock_stays_within_a_persisted_window() {
    let (_e, store, _c, tso) = setup(T0);
    let max = u32::try_from(MAX_LOGICAL).expect("fits");
    // Far more timestamps than one window of a stopped clock holds with
    // logical counting alone: the oracle must keep extending the window.
    let mut last = TimeStamp::ZERO;
    for _ in 0..(WINDOW_MS + 500) {
        let ts = tso.get(max).expect("get");
        assert!(ts > last);
        last = ts;
    }
    let end = persisted_window_end(&store)
        .expect("read")
        .expect("present");
    assert!(last.physical() < end);
    assert_eq!(last.physical(), T0 + WINDOW_MS + 499);
}

/// A clock that moves forward by one millisecond every `every` readings.
struct TickingClock {
    reads: AtomicU64,
    every: u64,
}

impl Clock for TickingClock {
    fn now_ms(&self) -> u64 {
        T0 + self.reads.fetch_add(1, Ordering::SeqCst) / self.every
    }
}

#[test]
fn concurrent_callers_get_disjoint_increasing_ranges() {
    const THREADS: usize = 8;
    const CALLS: usize = 2_000;
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let clock = Arc::new(TickingClock {
        reads: AtomicU64::new(0),
        every: 7,
    });
    let tso = Arc::new(Tso::open(store, clock).expect("tso"));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let tso = Arc::clone(&tso);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut ranges = Vec::with_capacity(CALLS);
                for i in 0..CALLS {
                    // Deterministic mix of batch sizes, different per thread.
                    let count = u32::try_from((i * 7 + t * 3) % 9 + 1).expect("small");
                    let ts = tso.get(count).expect("get").into_inner();
                    ranges.push((ts + 1 - u64::from(count), ts));
                }
                ranges
            })
        })
        .collect();
    let mut all = Vec::new();
    for handle in handles {
        let ranges = handle.join().expect("thread");
        for pair in ranges.windows(2) {
            assert!(pair[0].1 < pair[1].0, "per-thread order: {pair:?}");
        }
        all.extend(ranges);
    }
    all.sort_unstable();
    for pair in all.windows(2) {
        assert!(pair[0].1 < pair[1].0, "overlapping ranges: {pair:?}");
    }
    assert_eq!(all.len(), THREADS * CALLS);
    assert!(tso.current().into_inner() >= all.last().expect("some").1);
}

#[test]
fn restart_continues_above_everything_handed_out() {
    let (engine, store, clock, tso) = setup(T0);
    clock.advance(1_234);
    let mut last = TimeStamp::ZERO;
    for count in [1, 50, 7] {
        last = tso.get(count).expect("get");
    }
    drop(tso);
    drop(store);

    // The clock went far back while we were down.
    clock.set(T0 - 3_600_000);
    let store = open_store(&engine);
    let tso = Tso::open(Arc::clone(&store), Arc::clone(&clock) as Arc<dyn Clock>).expect("reopen");
    assert!(tso.current() > last);
    let first = tso.get(1).expect("get");
    assert!(first > last);
    assert!(first.physical() > last.physical());

    // And again, with the clock still behind.
    drop(tso);
    drop(store);
    let store = open_store(&engine);
    let tso = Tso::open(store, Arc::clone(&clock) as Arc<dyn Clock>).expect("reopen");
    assert!(tso.get(3).expect("get") > first);
}

#[test]
fn restart_on_fjall_continues_above_everything_handed_out() {
    use kvfeed_storage::engine::fjall::FjallEngine;

    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let last = {
        let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).expect("fjall"));
        let store = Arc::new(Store::open(engine, Durability::SyncOnCommit).expect("store"));
        let tso = Tso::open(store, Arc::clone(&clock) as Arc<dyn Clock>).expect("tso");
        clock.advance(10);
        tso.get(5).expect("get")
    };
    clock.set(T0 - 60_000);
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(dir.path()).expect("fjall"));
    let store = Arc::new(Store::open(engine, Durability::SyncOnCommit).expect("store"));
    let tso = Tso::open(store, Arc::clone(&clock) as Arc<dyn Clock>).expect("tso");
    assert!(tso.get(1).expect("get") > last);
}

/// Counts the oracle's window writes.
#[derive(Default)]
struct CountInternal(AtomicUsize);

impl Observer for CountInternal {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        if batch.source == BatchSource::Internal
            && batch
                .mutations
                .iter()
                .any(|m| m.cf == Cf::Meta && m.key == WINDOW_KEY)
        {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn window_covers_every_physical_and_is_extended_ahead() {
    let (_e, store, clock, tso) = setup(T0);
    let counter = Arc::new(CountInternal::default());
    store.add_observer(Arc::clone(&counter) as Arc<dyn Observer>);
    // Steady progress in small steps, a jump far ahead, a step back, and
    // steady progress again.
    let mut steps: Vec<i64> = vec![10; 1_000];
    steps.push(3_600_000);
    steps.push(-5_000);
    steps.extend([10; 1_000]);
    let mut last = TimeStamp::ZERO;
    for step in steps {
        match u64::try_from(step) {
            Ok(forward) => clock.advance(forward),
            Err(_) => clock.step_back(step.unsigned_abs()),
        }
        let ts = tso.get(1).expect("get");
        assert!(ts > last);
        last = ts;
        let end = persisted_window_end(&store)
            .expect("read")
            .expect("present");
        assert!(ts.physical() < end, "{} not below {end}", ts.physical());
    }
    // About 15 s of forward progress in all (10 s, then 5 s once the clock has
    // caught up after the step back) plus the jump: one write per
    // WINDOW - MARGIN ms of progress, i.e. far fewer writes than calls.
    let writes = u64::try_from(counter.0.load(Ordering::SeqCst)).expect("fits");
    let expected = 15_000 / (WINDOW_MS - EXTEND_MARGIN_MS) + 1;
    assert!(
        (expected - 2..=expected + 2).contains(&writes),
        "{writes} window writes, expected about {expected}"
    );
}

#[test]
fn failed_window_write_hands_out_nothing() {
    let (engine, _store, clock, tso) = setup(T0);
    let before = tso.get(1).expect("get");
    // Jump past the window so the next call must persist first.
    clock.advance(WINDOW_MS * 2);
    engine.fail_next_write();
    assert!(tso.get(1).is_err());
    assert_eq!(tso.current(), before);
}

#[test]
fn corrupt_window_is_reported() {
    let engine = Arc::new(MemoryEngine::new());
    let store = open_store(&engine);
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, WINDOW_KEY, b"short".to_vec());
    store.apply(batch, BatchSource::Internal).expect("apply");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(T0));
    assert!(matches!(
        Tso::open(store, clock),
        Err(Error::Corrupt { .. })
    ));
}
