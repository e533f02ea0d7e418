//! An in-memory [`Engine`] for tests.
//!
//! Each column family is an `Arc`'d `BTreeMap`. A snapshot clones the five
//! `Arc`s, so taking one is O(1) and it never changes afterwards; the next
//! write to a family that a live snapshot still shares copies that family's
//! map first (`Arc::make_mut`). That makes writes O(n) while snapshots are
//! held, which is fine for tests and keeps the isolation argument trivial.
//!
//! Nothing here is durable: `sync` does nothing unless a failure was injected
//! with [`MemoryEngine::fail_next_write`] or [`MemoryEngine::fail_next_sync`],
//! which exist so that tests can drive the store into its poisoned state, or
//! with their `_with` variants, which say what the operating system reported
//! (a full disk, say).

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::engine::{Cf, Engine, EngineIter, EngineSnapshot, Op, WriteBatch};
use crate::{Error, Result};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// One immutable-by-sharing map per column family, indexed like [`Cf::ALL`].
type Families = [Arc<Map>; Cf::ALL.len()];

/// Position of `cf` in [`Cf::ALL`]; engines keep per-family state in arrays
/// indexed by it.
pub(super) fn index(cf: Cf) -> usize {
    match cf {
        Cf::Default => 0,
        Cf::Lock => 1,
        Cf::Write => 2,
        Cf::Raw => 3,
        Cf::Meta => 4,
    }
}

/// A volatile engine backed by ordered maps.
#[derive(Default)]
pub struct MemoryEngine {
    families: Mutex<Families>,
    /// The failure the next write reports, if one was injected.
    fail_write: Mutex<Option<io::ErrorKind>>,
    /// The failure the next sync reports, if one was injected.
    fail_sync: Mutex<Option<io::ErrorKind>>,
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next [`Engine::write`] fail without applying anything.
    pub fn fail_next_write(&self) {
        self.fail_next_write_with(io::ErrorKind::Other);
    }

    /// Makes the next [`Engine::write`] fail with an I/O error of `kind`.
    pub fn fail_next_write_with(&self, kind: io::ErrorKind) {
        *self.fail_write.lock() = Some(kind);
    }

    /// Makes the next [`Engine::sync`] fail. The writes before it stay
    /// visible, as they would in a real engine whose fsync failed.
    pub fn fail_next_sync(&self) {
        self.fail_next_sync_with(io::ErrorKind::Other);
    }

    /// Makes the next [`Engine::sync`] fail with an I/O error of `kind`.
    pub fn fail_next_sync_with(&self, kind: io::ErrorKind) {
        *self.fail_sync.lock() = Some(kind);
    }
}

/// Longest key any engine accepts (the durable engine stores key lengths in
/// 16 bits).
pub const MAX_KEY_LEN: usize = u16::MAX as usize;
/// Longest value any engine accepts (the durable engine stores value lengths
/// in 32 bits).
pub const MAX_VALUE_LEN: usize = u32::MAX as usize;

/// Rejects batches some engine cannot store, so every engine refuses the same
/// input instead of one of them panicking on it: keys must be non-empty and at
/// most [`MAX_KEY_LEN`] bytes, values at most [`MAX_VALUE_LEN`] bytes.
pub(crate) fn check_batch(batch: &WriteBatch) -> Result<()> {
    for m in batch.mutations() {
        if m.key.is_empty() {
            return Err(Error::InvalidInput(format!(
                "empty key in column family {}",
                m.cf.name()
            )));
        }
        if m.key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidInput(format!(
                "key of {} bytes exceeds {MAX_KEY_LEN}",
                m.key.len()
            )));
        }
        if let Op::Put(value) = &m.op
            && value.len() > MAX_VALUE_LEN
        {
            return Err(Error::InvalidInput(format!(
                "value of {} bytes exceeds {MAX_VALUE_LEN}",
                value.len()
            )));
        }
    }
    Ok(())
}

impl Engine for MemoryEngine {
    fn write(&self, batch: &WriteBatch) -> Result<()> {
        check_batch(batch)?;
        if let Some(kind) = self.fail_write.lock().take() {
            return Err(Error::engine(
                format_args!("writing a batch of {}", batch.len()),
                io::Error::new(kind, "injected write failure"),
            ));
        }
        // Holding the lock for the whole batch makes it atomic with respect to
        // snapshots, which take the same lock.
        let mut families = self.families.lock();
        for m in batch.mutations() {
            let map = Arc::make_mut(&mut families[index(m.cf)]);
            match &m.op {
                Op::Put(value) => {
                    map.insert(m.key.clone(), value.clone());
                }
                Op::Delete => {
                    map.remove(&m.key);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if let Some(kind) = self.fail_sync.lock().take() {
            return Err(Error::engine(
                "syncing the journal",
                io::Error::new(kind, "injected sync failure"),
            ));
        }
        Ok(())
    }

    fn snapshot(&self) -> Box<dyn EngineSnapshot> {
        Box::new(MemorySnapshot {
            families: self.families.lock().clone(),
        })
    }
}

/// A frozen view of a [`MemoryEngine`].
struct MemorySnapshot {
    families: Families,
}

/// Whether `(lower, upper)` can contain any key. `BTreeMap::range` panics on
/// inverted ranges and on `(Excluded(k), Excluded(k))`, while the engine
/// contract treats them as simply empty. Shared with the other engines so all
/// of them agree on degenerate ranges.
pub(super) fn non_empty_range(lower: Bound<&[u8]>, upper: Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (Bound::Unbounded, _) | (_, Bound::Unbounded) => true,
        (Bound::Included(l), Bound::Included(u)) => l <= u,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u))
        | (Bound::Excluded(l), Bound::Included(u)) => l < u,
    }
}

impl EngineSnapshot for MemorySnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.families[index(cf)].get(key).cloned())
    }

    fn iter<'a>(
        &'a self,
        cf: Cf,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
    ) -> EngineIter<'a> {
        if !non_empty_range(lower, upper) {
            return Box::new(std::iter::empty());
        }
        let range = self.families[index(cf)]
            .range::<[u8], _>((lower, upper))
            .map(|(k, v)| Ok((k.clone(), v.clone())));
        if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_cf_all() {
        for (i, cf) in Cf::ALL.into_iter().enumerate() {
            assert_eq!(index(cf), i, "{cf:?}");
        }
    }

    #[test]
    fn degenerate_ranges_are_empty_not_panics() {
        let engine = MemoryEngine::new();
        let mut batch = WriteBatch::new();
        batch.put(Cf::Raw, b"k".to_vec(), b"v".to_vec());
        engine.write(&batch).expect("write");
        let snap = engine.snapshot();
        let k: &[u8] = b"k";
        let z: &[u8] = b"z";
        for (lower, upper) in [
            (Bound::Excluded(k), Bound::Excluded(k)),
            (Bound::Included(z), Bound::Included(k)),
            (Bound::Excluded(k), Bound::Included(k)),
        ] {
            assert_eq!(snap.iter(Cf::Raw, lower, upper, false).count(), 0);
            assert_eq!(snap.iter(Cf::Raw, lower, upper, true).count(), 0);
        }
        let one = snap.iter(Cf::Raw, Bound::Included(k), Bound::Included(k), false);
        assert_eq!(one.count(), 1);
    }
}
