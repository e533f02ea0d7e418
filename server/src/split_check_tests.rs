use std::sync::Arc;

use kvfeed_storage::engine::Engine;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::region::{RegionMap, STORE_ID};
use kvfeed_storage::store::Durability;
use kvfeed_storage::tso::{Clock, ManualClock, Tso};

use super::*;

struct Fixture {
    regions: Arc<Regions>,
    raw: RawStore,
    checker: SplitChecker,
}

/// A store split at `m` (a kept boundary) and `t` (an ordinary one), with
/// a checker cutting parts of 10 versions once a region holds 15, and
/// merging regions of at most 3.
fn fixture(split_merge_interval: Duration) -> Fixture {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let store = Arc::new(Store::open(engine, Durability::NoSync).expect("store"));
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(1_700_000_000_000));
    let tso = Arc::new(Tso::open(Arc::clone(&store), clock).expect("tso"));
    let kept = encode_bytes(b"m");
    let regions = Arc::new(
        Regions::open(Arc::clone(&store), vec![kept.clone()], &[STORE_ID]).expect("regions"),
    );
    let config = CheckConfig {
        limits: SplitLimits {
            split: RegionSize::new(u64::MAX, 10),
            max: RegionSize::new(u64::MAX, 15),
            batch: 10,
        },
        interval: Duration::from_millis(10),
        merge: Some(RegionSize::new(u64::MAX, 3)),
        split_merge_interval,
        kept: [kept].into_iter().collect(),
    };
    let metrics = CheckMetrics::unregistered().expect("metrics");
    let checker = SplitChecker::new(Arc::clone(&store), Arc::clone(&regions), config, metrics);
    checker.start_tracking();
    // After tracking started: the checker knows when this split happened.
    let middle = regions.current().regions()[1].id;
    regions
        .split(middle, None, vec![encode_bytes(b"t")])
        .expect("split");
    Fixture {
        raw: RawStore::new(Arc::clone(&store), tso),
        regions,
        checker,
    }
}

fn starts(map: &RegionMap) -> Vec<Vec<u8>> {
    map.regions().iter().map(|r| r.start_key.clone()).collect()
}

#[test]
fn written_regions_split_and_small_neighbours_merge_but_not_across_kept_boundaries() {
    let f = fixture(Duration::ZERO);
    let mut state = State::default();
    let now = Instant::now();
    // Regions [, m) [m, t) [t, ): all empty, but the two on the right
    // were just split (never merged in the same pass) and `m` is kept.
    let pass = f.checker.pass(&mut state, now);
    assert!(pass.merges.is_empty(), "{pass:?}");
    assert_eq!(
        pass.scanned, 1,
        "regions too young to merge are not measured"
    );
    // Only the two right of the kept boundary merge.
    let pass = f.checker.pass(&mut state, now);
    assert_eq!(pass.merges.len(), 1, "{pass:?}");
    assert_eq!(
        starts(&f.regions.current()),
        [Vec::new(), encode_bytes(b"m")]
    );

    // Forty raw keys in the right region: it splits into parts of ten.
    for i in 0..40 {
        f.raw
            .put(format!("r{i:02}").as_bytes(), b"v", None)
            .expect("put");
    }
    let pass = f.checker.pass(&mut state, now);
    assert_eq!(pass.splits.len(), 1, "{pass:?}");
    assert_eq!(pass.splits[0].1, 4, "{pass:?}");
    assert!(pass.merges.is_empty(), "just split: {pass:?}");
    let map = f.regions.current();
    assert_eq!(map.regions().len(), 5);

    // Nothing written: a pass reads nothing and changes nothing.
    let pass = f.checker.pass(&mut state, now);
    assert_eq!(pass, Pass::default());

    // Deleting most keys of two neighbouring parts (and their versions
    // going, as GC would remove them) makes them small: they merge.
    let snap_keys: Vec<Vec<u8>> = (0..20).map(|i| format!("r{i:02}").into_bytes()).collect();
    for key in &snap_keys[1..20] {
        f.raw.delete(key).expect("delete");
    }
    f.raw.gc(f.raw_ts()).expect("gc");
    let pass = f.checker.pass(&mut state, now);
    assert_eq!(pass.merges.len(), 1, "{pass:?}");
    assert_eq!(f.regions.current().regions().len(), 4);
    let metrics = &f.checker.metrics;
    assert_eq!((metrics.splits.get(), metrics.merges.get()), (1, 2));
}

#[test]
fn regions_made_by_a_split_wait_for_the_split_merge_interval() {
    let f = fixture(Duration::from_secs(60));
    let mut state = State::default();
    let now = Instant::now();
    let pass = f.checker.pass(&mut state, now);
    assert!(pass.merges.is_empty(), "split a moment ago: {pass:?}");
    let later = now + Duration::from_secs(61);
    let pass = f.checker.pass(&mut state, later);
    assert_eq!(pass.merges.len(), 1, "{pass:?}");
}

impl Fixture {
    /// A timestamp above every raw write so far.
    fn raw_ts(&self) -> kvfeed_storage::TimeStamp {
        self.raw.put(b"~ts", b"", None).expect("put")
    }
}
