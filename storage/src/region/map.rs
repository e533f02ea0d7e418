//! [`RegionMap`]: one immutable version of the layout, and the pure
//! operations (split, merge, leader transfer) that derive the next version.
//!
//! A map is never changed in place: an operation validates its input
//! against the map, and on success returns a new map and what changed;
//! on failure nothing changed. [`super::Regions`] persists and publishes
//! the result.

use std::collections::HashMap;

use super::{ChangeKind, Peer, Region, RegionEpoch, RegionError, RegionId, hex};
use crate::mvcc::{decode_bytes, encode_bytes};
use crate::{Error, Result};

/// Region ids of a new layout start here so that no region shares an id
/// with the first store.
const FIRST_REGION_ID: u64 = 2;

/// Peer ids of a new layout are offset from region ids so the two are never
/// confused in logs; ids allocated later come from one counter above both.
const PEER_ID_OFFSET: u64 = 1_000;

/// Most split keys one split may carry. A bound on the work (and the size of
/// the persisted change) one request can cause.
pub const MAX_SPLIT_KEYS: usize = 1_024;

/// Split keys of one region, as [`RegionMap::group_by_region`] finds them.
pub type SplitGroup = (RegionId, Vec<Vec<u8>>);

/// Why a layout change was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The region (or an epoch mismatch) as a KV request would be refused.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A split without split keys.
    #[error("no split keys given")]
    NoSplitKeys,
    /// More split keys than [`MAX_SPLIT_KEYS`].
    #[error("{count} split keys given, at most {max} are accepted per split")]
    TooManySplitKeys {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An empty split key: it would be the unbounded start.
    #[error("a split key must not be empty")]
    EmptySplitKey,
    /// The same split key twice.
    #[error("split key {} is given twice", hex(.0))]
    DuplicateSplitKey(Vec<u8>),
    /// Split keys out of ascending order.
    #[error("split keys are not in ascending order: {} comes after {}", hex(.later), hex(.earlier))]
    UnsortedSplitKeys {
        /// The key that came first.
        earlier: Vec<u8>,
        /// The smaller key that followed it.
        later: Vec<u8>,
    },
    /// A split key outside the region, or equal to its start (a region
    /// cannot be split where it begins).
    #[error(
        "split key {} is not inside region {region} [{}, {})",
        hex(.key), hex(.start_key), hex(.end_key)
    )]
    SplitKeyNotInRegion {
        /// The region to split.
        region: RegionId,
        /// The offending key.
        key: Vec<u8>,
        /// The region's start.
        start_key: Vec<u8>,
        /// The region's end.
        end_key: Vec<u8>,
    },
    /// A merge of a region with itself.
    #[error("cannot merge region {0} with itself")]
    MergeWithItself(RegionId),
    /// A merge of regions that do not touch.
    #[error("regions {region} and {target} are not adjacent")]
    NotAdjacent {
        /// The region to merge away.
        region: RegionId,
        /// The region to merge into.
        target: RegionId,
    },
    /// A merge of the only region.
    #[error("region {0} has no neighbour to merge with")]
    NoNeighbour(RegionId),
    /// A leader transfer to a store the node does not have.
    #[error("store {store} does not exist (stores: {stores:?})")]
    UnknownStore {
        /// The store asked for.
        store: u64,
        /// The stores there are.
        stores: Vec<u64>,
    },
}

/// One version of the layout, sorted by start key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMap {
    regions: Vec<Region>,
    index: HashMap<RegionId, usize>,
    /// The next id to allocate to a region or peer.
    next_id: u64,
    /// How many changes led to this map; only grows.
    generation: u64,
    /// The stores every region has a peer on, ascending.
    stores: Vec<u64>,
}

impl RegionMap {
    /// The default boundary: the encoding of eight `0xFF` bytes. That key is
    /// a valid encoding (so transactional clients can decode it) and sorts
    /// above every ordinary raw key, which keeps raw scans that reach the
    /// unbounded last region correct in `tikv-client` 0.4.
    pub fn default_split_keys() -> Vec<Vec<u8>> {
        vec![encode_bytes(&[0xFF; 8])]
    }

    /// A new layout over `stores` (non-empty; region `i` is led by the
    /// `i`-th store, round robin), cut at encoded `split_keys`. Every key must be a
    /// complete, valid memcomparable encoding and non-empty (an invalid
    /// boundary would make `tikv-client` silently skip a commit); duplicates
    /// are refused. Ids are a pure function of the input.
    pub fn new(mut split_keys: Vec<Vec<u8>>, stores: &[u64]) -> Result<RegionMap> {
        let mut stores = stores.to_vec();
        stores.sort_unstable();
        stores.dedup();
        let Some(&first_store) = stores.first() else {
            return Err(Error::InvalidInput(
                "a layout needs at least one store".into(),
            ));
        };
        for key in &split_keys {
            check_boundary(key)?;
        }
        split_keys.sort();
        if let Some(w) = split_keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidInput(format!(
                "region split key {} is given twice",
                hex(&w[0])
            )));
        }
        let count = split_keys.len() as u64 + 1;
        // Peers on stores after the first take ids above every region id and
        // first-store peer id.
        let mut next_id = PEER_ID_OFFSET + FIRST_REGION_ID + count;
        let mut regions = Vec::with_capacity(split_keys.len() + 1);
        let mut start = Vec::new();
        for (i, end) in split_keys
            .into_iter()
            .chain(std::iter::once(Vec::new()))
            .enumerate()
        {
            let id = FIRST_REGION_ID + i as u64;
            // Leaders are spread over the stores, round robin.
            let leader_store = stores.get(i % stores.len()).copied().unwrap_or(first_store);
            let mut peers = vec![Peer {
                id: PEER_ID_OFFSET + id,
                store_id: first_store,
            }];
            for &store_id in &stores[1..] {
                peers.push(Peer {
                    id: next_id,
                    store_id,
                });
                next_id += 1;
            }
            regions.push(Region {
                id: RegionId(id),
                start_key: std::mem::replace(&mut start, end.clone()),
                end_key: end,
                epoch: RegionEpoch {
                    conf_ver: 1,
                    version: count,
                },
                peers,
                leader_store,
            });
        }
        Ok(RegionMap::from_parts(regions, next_id, 0, stores))
    }

    /// Reassembles a persisted map; `regions` must be sorted and contiguous
    /// (checked by the loader).
    pub(super) fn from_parts(
        regions: Vec<Region>,
        next_id: u64,
        generation: u64,
        stores: Vec<u64>,
    ) -> RegionMap {
        let index = regions.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        RegionMap {
            regions,
            index,
            next_id,
            generation,
            stores,
        }
    }

    /// All regions in key order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region with id `id`; `None` if there is none.
    pub fn get(&self, id: RegionId) -> Option<&Region> {
        self.index.get(&id).and_then(|&i| self.regions.get(i))
    }

    /// The stores every region has a peer on, ascending.
    pub fn stores(&self) -> &[u64] {
        &self.stores
    }

    /// How many changes led to this map. A consumer that may receive an
    /// older map after a newer one keeps the higher generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next id the map will allocate.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The region containing `key` (always exists: regions cover everything).
    pub fn locate(&self, key: &[u8]) -> &Region {
        let idx = self
            .regions
            .partition_point(|r| r.start_key.as_slice() <= key);
        &self.regions[idx.saturating_sub(1)]
    }

    /// The region whose end key is exactly `key` (the one before the region
    /// starting at `key`); `None` for the empty key.
    pub fn before(&self, key: &[u8]) -> Option<&Region> {
        if key.is_empty() {
            return self.regions.last().filter(|r| r.end_key.is_empty());
        }
        let idx = self
            .regions
            .partition_point(|r| r.start_key.as_slice() < key);
        idx.checked_sub(1).and_then(|i| self.regions.get(i))
    }

    /// Regions overlapping `[start, end)` (empty `end` = unbounded), in key
    /// order, at most `limit` of them (0 = no limit).
    pub fn overlapping(&self, start: &[u8], end: &[u8], limit: usize) -> Vec<&Region> {
        let first = self
            .regions
            .partition_point(|r| r.start_key.as_slice() <= start);
        let take = if limit == 0 { usize::MAX } else { limit };
        self.regions[first.saturating_sub(1)..]
            .iter()
            .take_while(|r| end.is_empty() || r.start_key.as_slice() < end)
            .take(take)
            .collect()
    }

    /// The regions adjacent to `id`: the one ending where it starts and the
    /// one starting where it ends.
    pub fn neighbours(&self, id: RegionId) -> (Option<&Region>, Option<&Region>) {
        match self.index.get(&id) {
            None => (None, None),
            Some(&i) => (
                i.checked_sub(1).and_then(|j| self.regions.get(j)),
                self.regions.get(i + 1),
            ),
        }
    }

    /// Groups ascending `keys` by the region holding each, in key order,
    /// for splitting several regions at once. Keys that already start a
    /// region are returned apart (they cannot split anything).
    pub fn group_by_region(&self, keys: &[Vec<u8>]) -> (Vec<SplitGroup>, Vec<Vec<u8>>) {
        let mut groups: Vec<SplitGroup> = Vec::new();
        let mut boundaries = Vec::new();
        for key in keys {
            let region = self.locate(key);
            if region.start_key == *key {
                boundaries.push(key.clone());
                continue;
            }
            match groups.last_mut() {
                Some((id, group)) if *id == region.id => group.push(key.clone()),
                _ => groups.push((region.id, vec![key.clone()])),
            }
        }
        (groups, boundaries)
    }

    /// Checks a request's region id and epoch.
    pub fn check(&self, id: RegionId, epoch: RegionEpoch) -> Result<&Region, RegionError> {
        let region = self.get(id).ok_or(RegionError::NotFound(id))?;
        if region.epoch != epoch {
            return Err(RegionError::EpochNotMatch {
                region: id,
                requested: epoch,
                current: region.epoch,
            });
        }
        Ok(region)
    }

    /// Checks region, epoch and that `key` lies in the region.
    pub fn check_key(
        &self,
        id: RegionId,
        epoch: RegionEpoch,
        key: &[u8],
    ) -> Result<&Region, RegionError> {
        let region = self.check(id, epoch)?;
        if !region.contains(key) {
            return Err(RegionError::KeyNotInRegion {
                region: id,
                key: key.to_vec(),
            });
        }
        Ok(region)
    }

    /// Splits region `id` at `keys` (boundary space, strictly ascending,
    /// each strictly inside the region). With `epoch`, the region must
    /// still have it (a client splitting from a stale view is refused as
    /// TiKV refuses it). Like TiKV's right-derived split, the last part
    /// keeps the region's id; the others get new ids, in key order.
    pub fn split(
        &self,
        id: RegionId,
        epoch: Option<RegionEpoch>,
        keys: &[Vec<u8>],
    ) -> Result<(RegionMap, ChangeKind), ChangeError> {
        let parent = match epoch {
            Some(epoch) => self.check(id, epoch)?,
            None => self.get(id).ok_or(RegionError::NotFound(id))?,
        };
        if keys.is_empty() {
            return Err(ChangeError::NoSplitKeys);
        }
        if keys.len() > MAX_SPLIT_KEYS {
            return Err(ChangeError::TooManySplitKeys {
                count: keys.len(),
                max: MAX_SPLIT_KEYS,
            });
        }
        for (i, key) in keys.iter().enumerate() {
            if key.is_empty() {
                return Err(ChangeError::EmptySplitKey);
            }
            if let Some(prev) = i.checked_sub(1).and_then(|j| keys.get(j)) {
                if prev == key {
                    return Err(ChangeError::DuplicateSplitKey(key.clone()));
                }
                if prev > key {
                    return Err(ChangeError::UnsortedSplitKeys {
                        earlier: prev.clone(),
                        later: key.clone(),
                    });
                }
            }
            if key.as_slice() <= parent.start_key.as_slice() || !parent.contains(key) {
                return Err(ChangeError::SplitKeyNotInRegion {
                    region: id,
                    key: key.clone(),
                    start_key: parent.start_key.clone(),
                    end_key: parent.end_key.clone(),
                });
            }
        }
        let mut next = self.clone();
        let epoch = RegionEpoch {
            conf_ver: parent.epoch.conf_ver,
            version: parent.epoch.version + keys.len() as u64,
        };
        let mut parts = Vec::with_capacity(keys.len() + 1);
        let mut start = parent.start_key.clone();
        for key in keys {
            let id = RegionId(next.alloc_id());
            let peers = next.new_peers();
            parts.push(Region {
                id,
                start_key: std::mem::replace(&mut start, key.clone()),
                end_key: key.clone(),
                epoch,
                peers,
                leader_store: parent.leader_store,
            });
        }
        parts.push(Region {
            id: parent.id,
            start_key: start,
            end_key: parent.end_key.clone(),
            epoch,
            peers: parent.peers.clone(),
            leader_store: parent.leader_store,
        });
        let at = self.index.get(&id).copied().unwrap_or_default();
        next.regions.splice(at..=at, parts.iter().cloned());
        next.reindex();
        Ok((
            next,
            ChangeKind::Split {
                parent: id,
                regions: parts,
            },
        ))
    }

    /// Merges region `source` into `target`, its neighbour (the right one
    /// when `target` is `None`, the left one for the last region). The
    /// target survives, spanning both ranges.
    pub fn merge(
        &self,
        source: RegionId,
        target: Option<RegionId>,
    ) -> Result<(RegionMap, ChangeKind), ChangeError> {
        let src = self.get(source).ok_or(RegionError::NotFound(source))?;
        let (left, right) = self.neighbours(source);
        let tgt = match target {
            Some(t) if t == source => return Err(ChangeError::MergeWithItself(source)),
            Some(t) => {
                let tgt = self.get(t).ok_or(RegionError::NotFound(t))?;
                if left.map(|r| r.id) != Some(t) && right.map(|r| r.id) != Some(t) {
                    return Err(ChangeError::NotAdjacent {
                        region: source,
                        target: t,
                    });
                }
                tgt
            }
            None => right.or(left).ok_or(ChangeError::NoNeighbour(source))?,
        };
        let (start_key, end_key) = if src.end_key == tgt.start_key {
            (src.start_key.clone(), tgt.end_key.clone())
        } else {
            (tgt.start_key.clone(), src.end_key.clone())
        };
        let merged = Region {
            id: tgt.id,
            start_key,
            end_key,
            epoch: RegionEpoch {
                conf_ver: tgt.epoch.conf_ver,
                version: src.epoch.version.max(tgt.epoch.version) + 1,
            },
            peers: tgt.peers.clone(),
            leader_store: tgt.leader_store,
        };
        let mut next = self.clone();
        next.regions.retain(|r| r.id != source);
        if let Some(slot) = next.regions.iter_mut().find(|r| r.id == merged.id) {
            *slot = merged.clone();
        }
        next.reindex();
        Ok((
            next,
            ChangeKind::Merge {
                source,
                target: merged,
            },
        ))
    }

    /// Moves region `id`'s leader to its peer on `store`. `None` when that
    /// peer already leads (nothing to change, nothing to report).
    pub fn transfer_leader(
        &self,
        id: RegionId,
        store: u64,
    ) -> Result<Option<(RegionMap, ChangeKind)>, ChangeError> {
        let region = self.get(id).ok_or(RegionError::NotFound(id))?;
        if region.peer_on(store).is_none() {
            return Err(ChangeError::UnknownStore {
                store,
                stores: self.stores.clone(),
            });
        }
        if region.leader_store == store {
            return Ok(None);
        }
        let mut next = self.clone();
        let mut moved = region.clone();
        moved.leader_store = store;
        if let Some(&i) = next.index.get(&id)
            && let Some(slot) = next.regions.get_mut(i)
        {
            *slot = moved.clone();
        }
        next.generation += 1;
        Ok(Some((
            next,
            ChangeKind::LeaderTransfer {
                region: moved,
                from_store: region.leader_store,
            },
        )))
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn new_peers(&mut self) -> Vec<Peer> {
        let stores = self.stores.clone();
        stores
            .into_iter()
            .map(|store_id| Peer {
                id: self.alloc_id(),
                store_id,
            })
            .collect()
    }

    /// Rebuilds the id index after the region list changed, and counts the
    /// change.
    fn reindex(&mut self) {
        self.index = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id, i))
            .collect();
        self.generation += 1;
    }
}

/// A boundary the server itself chooses must be a complete, valid encoding.
fn check_boundary(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidInput(
            "a region split key must not be empty".into(),
        ));
    }
    match decode_bytes(key) {
        Ok((_, used)) if used == key.len() => Ok(()),
        Ok(_) => Err(Error::InvalidInput(format!(
            "region split key {} has bytes after its encoding",
            hex(key)
        ))),
        Err(e) => Err(Error::InvalidInput(format!(
            "region split key {} is not a valid encoded key: {e}",
            hex(key)
        ))),
    }
}

#[cfg(test)]
#[path = "map_tests.rs"]
mod tests;
