//! [`Regions`]: the live layout, changed one step at a time and persisted
//! with each step.
//!
//! Readers take the current map ([`Regions::current`]), an `Arc` that never
//! changes under them. A change runs under one mutex: it derives the next
//! map from the current one, writes it through the store's apply sequence
//! (as a batch with [`BatchSource::Regions`] that carries the change to the
//! store's observers), and only then publishes it to readers. So:
//!
//! - nothing is published that is not durable, and a failed write changes
//!   nothing a reader can see;
//! - an observer (the change feed) learns of the change in the store's
//!   total order, before any reader can act on the new layout: a client that
//!   finds a new region through PD and subscribes to it is handled after the
//!   feed has taken in the change that created it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::map::ChangeError;
use super::{
    ChangeKind, Region, RegionChange, RegionEpoch, RegionError, RegionId, RegionMap, record,
};
use crate::engine::WriteBatch;
use crate::store::{BatchSource, Store};
use crate::{Error, Result};

/// Why a layout change failed. Nothing changed either way.
#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    /// The request was refused by the layout's rules.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// The change could not be persisted.
    #[error("cannot persist the region layout")]
    Storage(#[source] Error),
}

/// Counts of layout changes since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    /// Splits (each may create several regions).
    pub splits: u64,
    /// Merges.
    pub merges: u64,
    /// Leader transfers.
    pub leader_transfers: u64,
}

/// The live, persisted region layout of one store.
pub struct Regions {
    store: Arc<Store>,
    current: RwLock<Arc<RegionMap>>,
    write: Mutex<()>,
    splits: AtomicU64,
    merges: AtomicU64,
    leader_transfers: AtomicU64,
}

impl std::fmt::Debug for Regions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Regions")
            .field("regions", &self.current().regions().len())
            .finish_non_exhaustive()
    }
}

impl Regions {
    /// Loads the layout of `store`, or creates it from `split_keys` (encoded,
    /// each a complete encoding) on a store that has none. Keys of
    /// `split_keys` that are not yet boundaries of a loaded layout are split
    /// at, so boundaries added to a configuration take effect on restart;
    /// boundaries are never removed that way. `stores` are the store ids
    /// this process serves; the first leads every new region. Blocking.
    pub fn open(store: Arc<Store>, split_keys: Vec<Vec<u8>>, stores: &[u64]) -> Result<Regions> {
        let loaded = record::load(&*store.snapshot(), stores)?;
        let map = match loaded {
            Some(map) => map,
            None => {
                let map = RegionMap::new(split_keys.clone(), stores)?;
                let mut batch = WriteBatch::new();
                record::put_all(&mut batch, &map);
                store.apply(batch, BatchSource::Regions)?;
                map
            }
        };
        let regions = Regions {
            store,
            current: RwLock::new(Arc::new(map)),
            write: Mutex::new(()),
            splits: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            leader_transfers: AtomicU64::new(0),
        };
        for key in split_keys {
            let map = regions.current();
            let region = map.locate(&key);
            if region.start_key != key {
                regions
                    .split(region.id, None, vec![key])
                    .map_err(|e| match e {
                        RegionsError::Storage(e) => e,
                        RegionsError::Change(e) => Error::InvalidInput(e.to_string()),
                    })?;
            }
        }
        Ok(regions)
    }

    /// The layout now. It never changes; a later call may return a newer one.
    pub fn current(&self) -> Arc<RegionMap> {
        Arc::clone(&self.current.read())
    }

    /// Splits region `id` at `keys` (boundary space, strictly ascending);
    /// with `epoch`, only if the region still has it. Returns the resulting
    /// regions in key order. Blocking (a durable write).
    pub fn split(
        &self,
        id: RegionId,
        epoch: Option<RegionEpoch>,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<Region>, RegionsError> {
        let _write = self.write.lock();
        let (map, kind) = self.current().split(id, epoch, &keys)?;
        let regions = match &kind {
            ChangeKind::Split { regions, .. } => regions.clone(),
            _ => Vec::new(),
        };
        self.commit(map, kind)?;
        self.splits.fetch_add(1, Ordering::Relaxed);
        Ok(regions)
    }

    /// Merges region `source` into `target` (its right neighbour by
    /// default, the left one for the last region). Returns the surviving
    /// region. Blocking.
    pub fn merge(
        &self,
        source: RegionId,
        target: Option<RegionId>,
    ) -> Result<Region, RegionsError> {
        self.merge_checked(source, None, target.map(|t| (t, None)))
    }

    /// [`Regions::merge`] of `source` into `target` only if both still have
    /// the epochs given: whoever measured them must not merge regions that
    /// changed since (TiKV refuses a merge on a stale epoch too).
    pub fn merge_if_unchanged(
        &self,
        source: (RegionId, RegionEpoch),
        target: (RegionId, RegionEpoch),
    ) -> Result<Region, RegionsError> {
        self.merge_checked(source.0, Some(source.1), Some((target.0, Some(target.1))))
    }

    fn merge_checked(
        &self,
        source: RegionId,
        source_epoch: Option<RegionEpoch>,
        target: Option<(RegionId, Option<RegionEpoch>)>,
    ) -> Result<Region, RegionsError> {
        let _write = self.write.lock();
        let current = self.current();
        if let Some(epoch) = source_epoch {
            current.check(source, epoch).map_err(ChangeError::Region)?;
        }
        if let Some((id, Some(epoch))) = target {
            current.check(id, epoch).map_err(ChangeError::Region)?;
        }
        let (map, kind) = current.merge(source, target.map(|(id, _)| id))?;
        let survivor = match &kind {
            ChangeKind::Merge { target, .. } => Some(target.clone()),
            _ => None,
        };
        self.commit(map, kind)?;
        self.merges.fetch_add(1, Ordering::Relaxed);
        survivor.ok_or_else(|| {
            RegionsError::Storage(Error::InvalidInput("a merge produced no region".into()))
        })
    }

    /// Moves region `id`'s leader to `store`. Returns the region as it is
    /// now (unchanged if `store` already led it). Blocking.
    pub fn transfer_leader(&self, id: RegionId, store: u64) -> Result<Region, RegionsError> {
        let _write = self.write.lock();
        let current = self.current();
        let not_found = || RegionsError::from(ChangeError::Region(RegionError::NotFound(id)));
        let Some((map, kind)) = current.transfer_leader(id, store)? else {
            // That store leads it already: nothing to change or announce.
            return current.get(id).cloned().ok_or_else(not_found);
        };
        let region = map.get(id).cloned().ok_or_else(not_found)?;
        self.commit(map, kind)?;
        self.leader_transfers.fetch_add(1, Ordering::Relaxed);
        Ok(region)
    }

    /// Layout changes made by this process.
    pub fn counts(&self) -> ChangeCounts {
        ChangeCounts {
            splits: self.splits.load(Ordering::Relaxed),
            merges: self.merges.load(Ordering::Relaxed),
            leader_transfers: self.leader_transfers.load(Ordering::Relaxed),
        }
    }

    /// Persists and announces `kind`, then publishes `map`. Called with
    /// `write` held.
    fn commit(&self, map: RegionMap, kind: ChangeKind) -> Result<(), RegionsError> {
        let map = Arc::new(map);
        let mut batch = WriteBatch::new();
        record::put_change(&mut batch, &map, &kind);
        let change = Arc::new(RegionChange {
            kind,
            map: Arc::clone(&map),
        });
        self.store
            .apply_region_change(batch, change)
            .map_err(RegionsError::Storage)?;
        *self.current.write() = map;
        Ok(())
    }
}

#[cfg(test)]
#[path = "regions_tests.rs"]
mod tests;
