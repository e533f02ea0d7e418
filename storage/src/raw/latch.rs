//! Per-key write serialization and the in-flight write tracker.
//!
//! Raw writes to one key must be applied in timestamp order, otherwise a
//! reader (and the change feed) could see an older version land after a newer
//! one. [`Latches`] give that: a writer holds the latches of all its keys
//! while it allocates its timestamp and applies its batch. Keys are hashed
//! onto a fixed set of stripes; a batch locks its stripes in ascending index
//! order, so two batches can never wait on each other in a cycle. Unrelated
//! keys sharing a stripe only cost some parallelism.
//!
//! [`InFlight`] records the timestamps of writes that have (or are about to
//! have) a timestamp but are not applied yet, so the change feed can keep its
//! resolved ts below them.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use parking_lot::{Mutex, MutexGuard};

use crate::TimeStamp;

/// Number of latch stripes. A power of two is not required; it only spreads
/// unrelated keys thinly enough that they rarely wait on each other.
const STRIPES: usize = 1024;

/// A fixed set of striped mutexes keyed by user key.
pub(crate) struct Latches {
    stripes: Box<[Mutex<()>]>,
}

/// Holds the latches of a set of keys until dropped.
pub(crate) struct LatchGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl Latches {
    pub(crate) fn new() -> Self {
        Latches {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    fn stripe(&self, key: &[u8]) -> usize {
        // DefaultHasher::new() has fixed keys: the mapping is stable, which
        // nothing relies on but makes contention reproducible.
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        // The modulo keeps the value below STRIPES, so the cast is lossless.
        (hasher.finish() % self.stripes.len() as u64) as usize
    }

    /// Locks every stripe covering `keys`, in ascending stripe order.
    pub(crate) fn lock<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) -> LatchGuard<'_> {
        let mut indices: Vec<usize> = keys.into_iter().map(|k| self.stripe(k)).collect();
        indices.sort_unstable();
        indices.dedup();
        let held = indices
            .into_iter()
            .filter_map(|i| self.stripes.get(i).map(Mutex::lock))
            .collect();
        LatchGuard { _held: held }
    }
}

/// A multiset of the timestamps of writes in flight.
#[derive(Default)]
pub(crate) struct InFlight {
    ts: Mutex<BTreeMap<TimeStamp, usize>>,
}

/// Keeps one timestamp registered in an [`InFlight`] until dropped, so that an
/// error or an unwind between registration and apply still unregisters it.
pub(crate) struct InFlightGuard<'a> {
    tracker: &'a InFlight,
    ts: TimeStamp,
}

impl InFlight {
    pub(crate) fn register(&self, ts: TimeStamp) -> InFlightGuard<'_> {
        *self.ts.lock().entry(ts).or_insert(0) += 1;
        InFlightGuard { tracker: self, ts }
    }

    pub(crate) fn min(&self) -> Option<TimeStamp> {
        self.ts.lock().keys().next().copied()
    }

    fn remove(map: &mut BTreeMap<TimeStamp, usize>, ts: TimeStamp) {
        if let Some(count) = map.get_mut(&ts) {
            *count -= 1;
            if *count == 0 {
                map.remove(&ts);
            }
        }
    }
}

impl InFlightGuard<'_> {
    /// Replaces the registered timestamp with `ts`, atomically for readers of
    /// [`InFlight::min`]. Used to swap a lower-bound placeholder for the real
    /// timestamp once it is allocated; `ts` must not be lower than what is
    /// registered, or a reader could have resolved past it.
    pub(crate) fn update(&mut self, ts: TimeStamp) {
        let mut map = self.tracker.ts.lock();
        InFlight::remove(&mut map, self.ts);
        *map.entry(ts).or_insert(0) += 1;
        self.ts = ts;
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        InFlight::remove(&mut self.tracker.ts.lock(), self.ts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_a_multiset() {
        let t = InFlight::default();
        assert_eq!(t.min(), None);
        let a = t.register(TimeStamp::new(5));
        let mut b = t.register(TimeStamp::new(5));
        let c = t.register(TimeStamp::new(9));
        assert_eq!(t.min(), Some(TimeStamp::new(5)));
        drop(a);
        assert_eq!(t.min(), Some(TimeStamp::new(5)));
        b.update(TimeStamp::new(7));
        assert_eq!(t.min(), Some(TimeStamp::new(7)));
        drop(b);
        assert_eq!(t.min(), Some(TimeStamp::new(9)));
        drop(c);
        assert_eq!(t.min(), None);
    }

    #[test]
    fn latching_the_same_key_twice_in_one_batch_does_not_deadlock() {
        let latches = Latches::new();
        let keys: [&[u8]; 3] = [b"a", b"a", b"b"];
        let guard = latches.lock(keys);
        drop(guard);
        let _again = latches.lock([b"a".as_slice()]);
    }
}
