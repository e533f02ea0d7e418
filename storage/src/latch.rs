//! Per-key latches: serialize commands that touch the same keys.
//!
//! Both key spaces need them. A transactional action reads a snapshot and
//! produces a batch; two conflicting commands must not both read the state
//! before either applies, so each command latches its keys for the whole
//! read–decide–apply sequence. A raw write latches its keys while it takes
//! its timestamp and applies, so one key's versions are applied in
//! timestamp order (otherwise a reader, and the change feed, could see an
//! older version land after a newer one). Keys hash onto a fixed
//! array of mutexes; a command takes its slots in ascending index order
//! (deduplicated), which rules out deadlock between commands whatever keys
//! they name. Hash collisions only cost unnecessary waiting, never
//! correctness.
//!
//! Latches are held on the calling (blocking) thread and released when the
//! guard drops, including on error paths.

use std::hash::{Hash, Hasher};

use parking_lot::{Mutex, MutexGuard};

/// Default number of slots.
pub const DEFAULT_SLOTS: usize = 2048;

/// A fixed table of latch slots.
pub struct Latches {
    slots: Box<[Mutex<()>]>,
}

/// Holds the latches of one command.
#[must_use = "latches are released when the guard is dropped"]
pub struct LatchGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl Latches {
    /// A table with `slots` slots (at least one).
    pub fn new(slots: usize) -> Self {
        Latches {
            slots: (0..slots.max(1)).map(|_| Mutex::new(())).collect(),
        }
    }

    fn slot(&self, key: &[u8]) -> usize {
        // SipHash with fixed keys: stable across runs, good enough spread.
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.slots.len() as u64) as usize
    }

    /// Blocks until every key's slot is held.
    pub fn acquire<'k, I>(&self, keys: I) -> LatchGuard<'_>
    where
        I: IntoIterator<Item = &'k [u8]>,
    {
        let mut idx: Vec<usize> = keys.into_iter().map(|k| self.slot(k)).collect();
        idx.sort_unstable();
        idx.dedup();
        LatchGuard {
            _held: idx.into_iter().map(|i| self.slots[i].lock()).collect(),
        }
    }
}

impl Default for Latches {
    fn default() -> Self {
        Latches::new(DEFAULT_SLOTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latching_the_same_key_twice_in_one_batch_does_not_deadlock() {
        let latches = Latches::default();
        let keys: [&[u8]; 3] = [b"a", b"a", b"b"];
        let guard = latches.acquire(keys);
        drop(guard);
        let _again = latches.acquire([b"a".as_slice()]);
    }

    #[test]
    fn overlapping_sets_exclude_each_other() {
        let latches = Latches::new(8);
        let held = latches.acquire([&b"a"[..], b"b"]);
        let slot_a = latches.slot(b"a");
        assert!(latches.slots[slot_a].try_lock().is_none());
        drop(held);
        assert!(latches.slots[slot_a].try_lock().is_some());
        // The same key twice takes its slot once (no self-deadlock).
        let _again = latches.acquire([&b"a"[..], b"a"]);
    }
}
