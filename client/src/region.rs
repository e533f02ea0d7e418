//! Regions as a client sees them, and the two key spaces they are looked up
//! in.
//!
//! PD's region boundaries live in one key space, but the two APIs reach it
//! differently (as with TiKV's API v1):
//! - raw keys are compared with the boundaries as they are;
//! - transactional keys are memcomparable-encoded before the lookup, and the
//!   boundaries must be decoded back before they are compared with user keys
//!   or sent in a request (KV requests carry unencoded keys).
//!
//! [`KeyMode`] is the single place that knows this, so scans and lookups
//! cannot mix the spaces. A boundary that does not decode is refused, never
//! "repaired": guessing would send a request to the wrong range.

use kvfeed_proto::{kvrpcpb, metapb};
use kvfeed_types::RegionId;
use kvfeed_types::{decode_bytes, encode_bytes};

use super::error::ClientError;
use crate::text::hex;

/// Which API a key belongs to, and so how it meets region boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// Raw key-value commands: keys compared with boundaries as they are.
    Raw,
    /// Transactional commands: keys encoded for region lookup.
    Txn,
}

impl KeyMode {
    /// The key to look up in PD for the user key `key`.
    pub fn region_key(self, key: &[u8]) -> Vec<u8> {
        match self {
            KeyMode::Raw => key.to_vec(),
            KeyMode::Txn => encode_bytes(key),
        }
    }

    /// The user-key range `[start, end)` (empty `end` = unbounded) in PD's
    /// key space; an empty bound stays empty in both modes.
    pub fn region_range(self, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let bound = |key: &[u8]| match (key.is_empty(), self) {
            (true, _) | (false, KeyMode::Raw) => key.to_vec(),
            (false, KeyMode::Txn) => encode_bytes(key),
        };
        (bound(start), bound(end))
    }

    /// A region boundary as a user key; empty (unbounded) stays empty.
    pub fn user_bound(self, bound: &[u8]) -> Result<Vec<u8>, ClientError> {
        if bound.is_empty() || self == KeyMode::Raw {
            return Ok(bound.to_vec());
        }
        match decode_bytes(bound) {
            Ok((key, used)) if used == bound.len() => Ok(key),
            Ok(_) => Err(ClientError::bad(
                "region",
                format!("boundary {} has bytes after its encoding", hex(bound)),
            )),
            Err(e) => Err(ClientError::bad(
                "region",
                format!("boundary {} is not a valid encoded key: {e}", hex(bound)),
            )),
        }
    }
}

/// A region and where to send its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionInfo {
    /// The region's id, which every KV request names in its context.
    pub id: RegionId,
    /// Inclusive lower bound in PD's key space; empty means unbounded.
    pub start_key: Vec<u8>,
    /// Exclusive upper bound in PD's key space; empty means unbounded.
    pub end_key: Vec<u8>,
    /// The layout version the request must carry: a store refuses a
    /// request with a stale epoch (`epoch_not_match`), which is how a split
    /// or merge since the lookup is noticed.
    pub epoch: metapb::RegionEpoch,
    /// The peer that serves requests: the leader PD named, or the region's
    /// first peer when PD named none.
    pub leader: metapb::Peer,
}

impl RegionInfo {
    /// Builds from PD's answer. A region without an epoch, or without any
    /// peer to send to, is a malformed answer rather than something to guess.
    pub(crate) fn from_proto(
        method: &'static str,
        region: metapb::Region,
        leader: Option<metapb::Peer>,
    ) -> Result<RegionInfo, ClientError> {
        let epoch = region.region_epoch.ok_or_else(|| {
            ClientError::bad(method, format!("region {} has no epoch", region.id))
        })?;
        let leader = leader
            .filter(|p| p.store_id != 0)
            .or_else(|| region.peers.first().cloned())
            .ok_or_else(|| {
                ClientError::bad(
                    method,
                    format!("region {} has no leader or peer", region.id),
                )
            })?;
        Ok(RegionInfo {
            id: RegionId(region.id),
            start_key: region.start_key,
            end_key: region.end_key,
            epoch,
            leader,
        })
    }

    /// The request context that routes a KV request to this region.
    pub fn context(&self) -> kvrpcpb::Context {
        kvrpcpb::Context {
            region_id: self.id.0,
            region_epoch: Some(self.epoch),
            peer: Some(self.leader),
            api_version: kvrpcpb::ApiVersion::V1.into(),
            ..Default::default()
        }
    }

    /// Whether `region_key` (in PD's key space) lies in the region.
    pub fn contains(&self, region_key: &[u8]) -> bool {
        region_key >= self.start_key.as_slice()
            && (self.end_key.is_empty() || region_key < self.end_key.as_slice())
    }

    /// The region's bounds as user keys of `mode`.
    pub fn user_range(&self, mode: KeyMode) -> Result<(Vec<u8>, Vec<u8>), ClientError> {
        Ok((
            mode.user_bound(&self.start_key)?,
            mode.user_bound(&self.end_key)?,
        ))
    }
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when there is none (an empty or all-`0xFF` prefix): the scan is
/// then unbounded above.
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let keep = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut end = prefix[..=keep].to_vec();
    // `end[keep]` is below 0xFF, so the increment cannot overflow.
    end[keep] += 1;
    Some(end)
}

/// The part of `[start, end)` inside `[lo, hi)`, all user keys with an empty
/// upper bound meaning unbounded. `None` when they do not overlap.
pub fn clip(start: &[u8], end: &[u8], lo: &[u8], hi: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let from = start.max(lo);
    let to = match (end.is_empty(), hi.is_empty()) {
        (true, _) => hi,
        (false, true) => end,
        (false, false) => end.min(hi),
    };
    if !to.is_empty() && from >= to {
        return None;
    }
    Some((from.to_vec(), to.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: Vec<u8>, end: Vec<u8>) -> RegionInfo {
        let meta = metapb::Region {
            id: 2,
            start_key: start,
            end_key: end,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version: 2,
            }),
            peers: vec![metapb::Peer {
                id: 1002,
                store_id: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        RegionInfo::from_proto("GetRegion", meta, None).expect("valid region")
    }

    #[test]
    fn txn_bounds_are_decoded_raw_bounds_are_not() {
        let split = encode_bytes(&[0xff; 8]);
        let r = region(Vec::new(), split.clone());
        assert_eq!(
            r.user_range(KeyMode::Txn).expect("decodes"),
            (Vec::new(), vec![0xff; 8])
        );
        assert_eq!(
            r.user_range(KeyMode::Raw).expect("raw"),
            (Vec::new(), split.clone())
        );
        // Keys with nine leading 0xFF bytes fall in the next region in both
        // modes; eight or fewer in this one.
        let high = [&[0xff; 9][..], &[0x01]].concat();
        assert!(!r.contains(&KeyMode::Txn.region_key(&high)));
        assert!(!r.contains(&KeyMode::Raw.region_key(&high)));
        assert!(r.contains(&KeyMode::Txn.region_key(&[0xff; 7])));
        assert!(r.contains(&KeyMode::Raw.region_key(b"zzz")));
    }

    #[test]
    fn invalid_boundaries_are_refused() {
        let r = region(b"abc".to_vec(), Vec::new());
        assert!(r.user_range(KeyMode::Txn).is_err());
        let mut trailing = encode_bytes(b"k");
        trailing.push(0);
        assert!(KeyMode::Txn.user_bound(&trailing).is_err());
    }

    #[test]
    fn context_routes_to_the_leader() {
        let r = region(Vec::new(), Vec::new());
        let ctx = r.context();
        assert_eq!(ctx.region_id, 2);
        assert_eq!(ctx.region_epoch.map(|e| e.version), Some(2));
        assert_eq!(ctx.peer.map(|p| p.store_id), Some(1));
    }

    #[test]
    fn regions_without_epoch_or_peer_are_malformed() {
        let meta = metapb::Region {
            id: 3,
            ..Default::default()
        };
        assert!(RegionInfo::from_proto("GetRegion", meta.clone(), None).is_err());
        let with_epoch = metapb::Region {
            region_epoch: Some(metapb::RegionEpoch::default()),
            ..meta
        };
        assert!(RegionInfo::from_proto("GetRegion", with_epoch, None).is_err());
    }

    #[test]
    fn clip_intersects_half_open_ranges() {
        assert_eq!(
            clip(b"b", b"", b"a", b"c"),
            Some((b"b".to_vec(), b"c".to_vec()))
        );
        assert_eq!(clip(b"", b"", b"", b""), Some((Vec::new(), Vec::new())));
        assert_eq!(
            clip(b"a", b"m", b"c", b""),
            Some((b"c".to_vec(), b"m".to_vec()))
        );
        assert_eq!(clip(b"x", b"", b"a", b"c"), None);
        assert_eq!(clip(b"a", b"b", b"c", b""), None);
        assert_eq!(clip(b"a", b"c", b"c", b"d"), None);
    }

    #[test]
    fn prefix_successor_bounds_the_prefix() {
        assert_eq!(prefix_successor(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_successor(&[b'a', 0xff, 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(&[0x01, 0xfe]), Some(vec![0x01, 0xff]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
        // Every key with the prefix sorts below the successor, and the
        // successor itself does not have the prefix.
        let prefix = [b'k', 0xff];
        let end = prefix_successor(&prefix).expect("bounded");
        for suffix in [&[][..], &[0x00], &[0xff, 0xff, 0xff]] {
            let key = [&prefix[..], suffix].concat();
            assert!(key.as_slice() < end.as_slice(), "{key:?}");
        }
        assert!(!end.starts_with(&prefix));
    }
}
