//! [`WriteTracker`]: what was written to each region since the last look,
//! so that an automatic split or merge checker measures only the regions
//! that may have changed instead of scanning the database every tick.
//!
//! The tracker is a store observer: it sees every durable batch in the
//! store's order, attributes each data mutation to the region holding its
//! key, and adds the mutation's key and value bytes (a delete counts its
//! key) and, for a new version in `write` or `raw`, one key. Client writes
//! and GC count (GC shrinks regions, which may make them merge candidates);
//! the store's own bookkeeping does not. Layout changes reach it through the
//! same sequence ([`crate::store::ChangeBatch::regions`]), so every batch is
//! attributed with the layout it was applied under; it also remembers which
//! regions a split produced, for a checker that waits before merging them.
//!
//! Cost: per mutation a binary search over the regions (and, for a raw key,
//! decoding its engine key); per batch one lock of a map holding one entry
//! per region written since the last [`WriteTracker::take`]. Nothing else
//! runs on the committing thread.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::size::position;
use super::{ChangeKind, RegionId, RegionMap, RegionSize};
use crate::engine::{Cf, Op};
use crate::store::{BatchSource, ChangeBatch, Observer};

/// What the tracker saw since the last [`WriteTracker::take`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes and new versions written, per region id (ids as they were when
    /// the writes were applied; a region split or merged since may be gone).
    pub regions: HashMap<RegionId, RegionSize>,
    /// Regions created or narrowed by a split, in the order of the splits.
    pub split: Vec<RegionId>,
}

struct State {
    map: Arc<RegionMap>,
    written: Written,
}

/// Counts writes per region; register it with
/// [`crate::store::Store::add_observer`].
pub struct WriteTracker {
    state: Mutex<State>,
}

impl std::fmt::Debug for WriteTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTracker").finish_non_exhaustive()
    }
}

impl WriteTracker {
    /// A tracker attributing writes with `map` until it sees a newer one.
    pub fn new(map: Arc<RegionMap>) -> WriteTracker {
        WriteTracker {
            state: Mutex::new(State {
                map,
                written: Written::default(),
            }),
        }
    }

    /// Offers a layout read after registering, in case a change happened
    /// between reading the first map and registering: the newer one (by
    /// generation) is kept.
    pub fn catch_up(&self, map: Arc<RegionMap>) {
        let mut state = self.state.lock();
        if map.generation() > state.map.generation() {
            state.map = map;
        }
    }

    /// Everything written since the last call, leaving nothing behind.
    pub fn take(&self) -> Written {
        std::mem::take(&mut self.state.lock().written)
    }
}

impl Observer for WriteTracker {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        match batch.source {
            BatchSource::Client | BatchSource::Gc => {}
            BatchSource::Regions => {
                if let Some(change) = &batch.regions {
                    let mut state = self.state.lock();
                    if let ChangeKind::Split { regions, .. } = &change.kind {
                        state.written.split.extend(regions.iter().map(|r| r.id));
                    }
                    if change.map.generation() > state.map.generation() {
                        state.map = Arc::clone(&change.map);
                    }
                }
                return;
            }
            BatchSource::Internal => return,
        }
        let mut state = self.state.lock();
        let State { map, written } = &mut *state;
        for m in &batch.mutations {
            // A key no reader could have written is not data; skip it.
            let Ok(Some(pos)) = position(m.cf, &m.key) else {
                continue;
            };
            let (bytes, version) = match &m.op {
                Op::Put(value) => (
                    m.key.len() + value.len(),
                    matches!(m.cf, Cf::Write | Cf::Raw),
                ),
                Op::Delete => (m.key.len(), false),
            };
            let region = map.locate(&pos).id;
            let entry = written.regions.entry(region).or_default();
            *entry = entry.plus(RegionSize::new(
                u64::try_from(bytes).unwrap_or(u64::MAX),
                u64::from(version),
            ));
        }
    }
}
