//! The region layout: how the key space is divided for clients.
//!
//! kvfeed is one process, but TiKV clients (and feed consumers) think in
//! regions: every request names the region it targets, and the change feed is
//! subscribed region by region. The layout is fixed when the server starts:
//! the key space `[-inf, +inf)` is cut at a sorted list of split keys.
//!
//! Invariants:
//! - Regions are contiguous, non-overlapping and cover the whole key space;
//!   region `i` spans `[split[i-1], split[i])` with empty meaning unbounded.
//! - Boundaries live in the *encoded* key space (TiKV's memcomparable
//!   encoding): transactional clients encode a key before looking up its
//!   region and decode the boundaries they get back, so every split key must
//!   be a complete, valid encoding. An invalid boundary would make
//!   `tikv-client` silently skip a commit, which is why [`RegionMap::new`]
//!   refuses one instead of "fixing" it.
//! - Raw keys are compared with the same boundaries as they are (raw requests
//!   carry unencoded keys, as with TiKV's API v1).
//! - Region ids, peer ids and epochs are pure functions of the layout, so a
//!   restart with the same configuration hands clients the same regions, and a
//!   changed layout changes every epoch `version` (clients with a stale cache
//!   get `epoch_not_match` and ask again).

use crate::mvcc::{decode_bytes, encode_bytes};
use crate::{Error, Result};

/// The only store of this node. TiKV clients expect a store id on every peer.
pub const STORE_ID: u64 = 1;

/// Region ids start here so that no region shares an id with the store.
const FIRST_REGION_ID: u64 = 2;

/// Peer ids are offset from region ids so the two are never confused in logs.
const PEER_ID_OFFSET: u64 = 1_000;

pub use kvfeed_types::RegionId;

/// A region's epoch, as TiKV versions region metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEpoch {
    /// Bumped by membership (peer) changes.
    pub conf_ver: u64,
    /// Bumped by splits and merges, i.e. whenever the key range changes.
    pub version: u64,
}

/// One region: a key range served by the single peer on [`STORE_ID`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// The region's id, unique in the cluster.
    pub id: RegionId,
    /// Inclusive lower bound, encoded; empty means unbounded.
    pub start_key: Vec<u8>,
    /// Exclusive upper bound, encoded; empty means unbounded.
    pub end_key: Vec<u8>,
    /// The metadata version requests must present to be served.
    pub epoch: RegionEpoch,
    /// The id of the region's only peer (always the leader).
    pub peer_id: u64,
}

impl Region {
    /// Whether `key` (compared bytewise with the boundaries) lies in the region.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start_key.as_slice()
            && (self.end_key.is_empty() || key < self.end_key.as_slice())
    }

    /// Intersects `[start, end)` (empty `end` = unbounded) with the region.
    /// Returns `None` when the two do not overlap.
    pub fn intersect(&self, start: &[u8], end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let lo = std::cmp::max(start, self.start_key.as_slice());
        let hi = match (end.is_empty(), self.end_key.is_empty()) {
            (true, true) => &[][..],
            (true, false) => self.end_key.as_slice(),
            (false, true) => end,
            (false, false) => std::cmp::min(end, self.end_key.as_slice()),
        };
        if !hi.is_empty() && lo >= hi {
            return None;
        }
        Some((lo.to_vec(), hi.to_vec()))
    }
}

/// Why a request's region context was refused. Each maps to one TiKV region
/// error so clients react as they would against TiKV.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The request names a region id this store does not serve
    /// (TiKV's `RegionNotFound`).
    #[error("region {0} not found")]
    NotFound(RegionId),
    /// The request carries a stale or unknown epoch (TiKV's
    /// `EpochNotMatch`); the client refreshes its region cache and retries.
    #[error("region {region} epoch {requested:?} does not match current {current:?}")]
    EpochNotMatch {
        /// The region the request named.
        region: RegionId,
        /// The epoch the request carried.
        requested: RegionEpoch,
        /// The region's actual epoch.
        current: RegionEpoch,
    },
    /// A key of the request lies outside the region it was sent to
    /// (TiKV's `KeyNotInRegion`).
    #[error("key is not in region {region}")]
    KeyNotInRegion {
        /// The region the request named.
        region: RegionId,
        /// The offending key.
        key: Vec<u8>,
    },
}

/// The fixed layout of regions, sorted by start key.
#[derive(Clone, Debug)]
pub struct RegionMap {
    regions: Vec<Region>,
}

impl RegionMap {
    /// The default layout: two regions split at the encoding of eight `0xFF`
    /// bytes. That key is a valid encoding (so transactional clients can decode
    /// it) and sorts above every ordinary raw key, which keeps raw scans that
    /// reach the unbounded last region correct in `tikv-client` 0.4.
    pub fn default_split_keys() -> Vec<Vec<u8>> {
        vec![encode_bytes(&[0xFF; 8])]
    }

    /// Builds the layout from encoded split keys. Every key must be a complete,
    /// valid memcomparable encoding and non-empty; duplicates are refused.
    pub fn new(mut split_keys: Vec<Vec<u8>>) -> Result<RegionMap> {
        for key in &split_keys {
            if key.is_empty() {
                return Err(Error::InvalidInput(
                    "a region split key must not be empty".into(),
                ));
            }
            match decode_bytes(key) {
                Ok((_, used)) if used == key.len() => {}
                Ok(_) => {
                    return Err(Error::InvalidInput(format!(
                        "region split key {} has bytes after its encoding",
                        hex(key)
                    )));
                }
                Err(e) => {
                    return Err(Error::InvalidInput(format!(
                        "region split key {} is not a valid encoded key: {e}",
                        hex(key)
                    )));
                }
            }
        }
        split_keys.sort();
        if let Some(w) = split_keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidInput(format!(
                "region split key {} is given twice",
                hex(&w[0])
            )));
        }
        let count = split_keys.len() as u64 + 1;
        let mut regions = Vec::with_capacity(split_keys.len() + 1);
        let mut start = Vec::new();
        for (i, end) in split_keys
            .into_iter()
            .chain(std::iter::once(Vec::new()))
            .enumerate()
        {
            let id = FIRST_REGION_ID + i as u64;
            regions.push(Region {
                id: RegionId(id),
                start_key: std::mem::replace(&mut start, end.clone()),
                end_key: end,
                epoch: RegionEpoch {
                    conf_ver: 1,
                    version: count,
                },
                peer_id: PEER_ID_OFFSET + id,
            });
        }
        Ok(RegionMap { regions })
    }

    /// All regions in key order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region with id `id`; `None` if there is none.
    pub fn get(&self, id: RegionId) -> Option<&Region> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The region containing `key` (always exists: regions cover everything).
    pub fn locate(&self, key: &[u8]) -> &Region {
        // Index of the first region whose start is > key, minus one.
        let idx = self
            .regions
            .partition_point(|r| r.start_key.as_slice() <= key);
        &self.regions[idx.saturating_sub(1)]
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
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> RegionMap {
        RegionMap::new(RegionMap::default_split_keys()).expect("default layout is valid")
    }

    #[test]
    fn default_layout_has_two_contiguous_regions() {
        let m = map();
        let r = m.regions();
        assert_eq!(r.len(), 2);
        assert!(r[0].start_key.is_empty());
        assert_eq!(r[0].end_key, r[1].start_key);
        assert!(r[1].end_key.is_empty());
        assert_eq!(
            r[0].end_key,
            vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0xf7
            ]
        );
        assert_ne!(r[0].id, r[1].id);
        assert_ne!(r[0].id.0, STORE_ID);
    }

    #[test]
    fn locate_and_contains_agree() {
        let m = map();
        for key in [
            &b""[..],
            b"a",
            &[0xff; 8],
            &[0xff; 20],
            &encode_bytes(b"zzz"),
        ] {
            let r = m.locate(key);
            assert!(r.contains(key), "{key:?} not in its region");
            assert_eq!(m.regions().iter().filter(|r| r.contains(key)).count(), 1);
        }
        assert_eq!(m.locate(&[0xff; 20]).id, m.regions()[1].id);
        assert_eq!(m.locate(b"ordinary raw key").id, m.regions()[0].id);
    }

    #[test]
    fn invalid_split_keys_are_refused() {
        assert!(RegionMap::new(vec![Vec::new()]).is_err());
        assert!(RegionMap::new(vec![b"abc".to_vec()]).is_err());
        let mut trailing = encode_bytes(b"k");
        trailing.push(1);
        assert!(RegionMap::new(vec![trailing]).is_err());
        let k = encode_bytes(b"k");
        assert!(RegionMap::new(vec![k.clone(), k]).is_err());
    }

    #[test]
    fn split_keys_are_sorted_and_ids_stable() {
        let a = encode_bytes(b"a");
        let m = RegionMap::new(vec![encode_bytes(b"m"), a.clone()]).expect("valid");
        assert_eq!(m.regions().len(), 3);
        assert_eq!(m.regions()[0].end_key, a);
        let again = RegionMap::new(vec![a, encode_bytes(b"m")]).expect("valid");
        assert_eq!(m.regions(), again.regions());
    }

    #[test]
    fn checks_map_to_region_errors() {
        let m = map();
        let r = m.regions()[0].clone();
        assert!(m.check(r.id, r.epoch).is_ok());
        assert_eq!(
            m.check(RegionId(999), r.epoch),
            Err(RegionError::NotFound(RegionId(999)))
        );
        let stale = RegionEpoch {
            conf_ver: 1,
            version: 0,
        };
        assert!(matches!(
            m.check(r.id, stale),
            Err(RegionError::EpochNotMatch { .. })
        ));
        let outside = [0xff; 20];
        assert!(matches!(
            m.check_key(r.id, r.epoch, &outside),
            Err(RegionError::KeyNotInRegion { .. })
        ));
    }

    #[test]
    fn overlapping_and_intersect() {
        let m = RegionMap::new(vec![encode_bytes(b"b"), encode_bytes(b"d")]).expect("valid");
        let all = m.overlapping(b"", b"", 0);
        assert_eq!(all.len(), 3);
        let mid = m.overlapping(&encode_bytes(b"c"), &encode_bytes(b"c1"), 0);
        assert_eq!(mid.len(), 1);
        assert_eq!(mid[0].id, m.regions()[1].id);
        assert_eq!(m.overlapping(b"", b"", 2).len(), 2);
        let r = &m.regions()[1];
        assert_eq!(
            r.intersect(b"", b""),
            Some((r.start_key.clone(), r.end_key.clone()))
        );
        assert_eq!(r.intersect(&encode_bytes(b"x"), b""), None);
        assert_eq!(r.intersect(b"", &encode_bytes(b"a")), None);
    }
}
