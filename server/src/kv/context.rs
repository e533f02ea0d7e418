//! Region checks: every KV request names a region (id, epoch, peer) and may
//! only touch keys inside it.
//!
//! TiKV clients route each request with a cached region layout; the server
//! must refuse requests routed with a stale or wrong view, or a client would
//! silently miss keys that moved. The refusal is a region error of the exact
//! kind TiKV sends, so `tikv-client` refreshes its cache and retries:
//! - a peer on another store than the one the request reached →
//!   `store_not_match`;
//! - unknown region id → `region_not_found`;
//! - the region is led by another store → `not_leader` naming the leader
//!   (unless a follower or stale read, which any peer serves);
//! - epoch differs from the region's → `epoch_not_match` listing the region
//!   as it is now and its neighbours;
//! - a key outside `[start_key, end_key)` → `key_not_in_region`.
//!
//! Region boundaries are encoded keys. Transactional keys are memcomparable
//! encoded before comparing (that is how the client located the region);
//! raw keys are compared as they are (API v1). For a range request the key
//! the scan starts from must lie in the region and the far end is clamped
//! to the region, as TiKV bounds every scan by its region: a forward range
//! starts at its lower bound; a reverse range starts at its upper bound,
//! which is exclusive, so it may equal the region's end key.
//!
//! A request without any `Context` is a protocol violation rather than a
//! routing mistake: it is refused with `INVALID_ARGUMENT` (see
//! [`KvError::MissingContext`]) instead of a region error a client would
//! retry forever.

use kvfeed_proto::{errorpb, kvrpcpb};
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::{
    Region, RegionEpoch, RegionError, RegionId, RegionMap, raw_lower_bound,
};

use super::errors::{KvError, hex};
use kvfeed_cdc::meta::{leader_peer, region_meta};

/// Requests that carry a `Context`.
pub trait HasContext: Send + 'static {
    fn context(&self) -> Option<&kvrpcpb::Context>;
}

macro_rules! has_context {
    ($($t:ident),* $(,)?) => {$(
        impl HasContext for kvrpcpb::$t {
            fn context(&self) -> Option<&kvrpcpb::Context> {
                self.context.as_ref()
            }
        }
    )*};
}

has_context!(
    GetRequest,
    ScanRequest,
    PrewriteRequest,
    PessimisticLockRequest,
    PessimisticRollbackRequest,
    TxnHeartBeatRequest,
    CheckTxnStatusRequest,
    CheckSecondaryLocksRequest,
    CommitRequest,
    CleanupRequest,
    BatchGetRequest,
    BatchRollbackRequest,
    ScanLockRequest,
    ResolveLockRequest,
    GcRequest,
    DeleteRangeRequest,
    RawGetRequest,
    RawBatchGetRequest,
    RawPutRequest,
    RawBatchPutRequest,
    RawDeleteRequest,
    RawBatchDeleteRequest,
    RawScanRequest,
    RawDeleteRangeRequest,
    RawBatchScanRequest,
    RawGetKeyTtlRequest,
    RawCasRequest,
    SplitRegionRequest,
);

/// How keys of a request compare with region boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpace {
    /// Raw keys: compared as they are.
    Raw,
    /// Transactional keys: compared in their memcomparable encoding.
    Txn,
}

impl KeySpace {
    fn encode_for_region(self, key: &[u8]) -> Vec<u8> {
        match self {
            KeySpace::Raw => key.to_vec(),
            KeySpace::Txn => encode_bytes(key),
        }
    }

    /// Back from boundary space: the least key of this space at or above
    /// `key`. For a transactional key that is the decoding of a complete
    /// encoding; a boundary from a raw split (any bytes, as TiKV allows)
    /// maps to where it falls among encodings.
    fn decode_from_region(self, key: &[u8]) -> Vec<u8> {
        match self {
            KeySpace::Raw => key.to_vec(),
            KeySpace::Txn => raw_lower_bound(key),
        }
    }
}

/// Which end of a range the request starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Starts at the (inclusive) lower bound.
    Forward,
    /// Starts at the (exclusive) upper bound.
    Reverse,
}

/// A range after clamping to the region, in the request's key space: the
/// lower bound is inclusive, the upper exclusive; an empty upper bound is
/// unbounded (only possible in the last region).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub lower: Vec<u8>,
    pub upper: Vec<u8>,
}

/// The region a request was checked against.
#[derive(Clone, Debug)]
pub struct Scope {
    region: Region,
}

/// Checks the request's context against the layout, for a request that
/// reached store `store_id`. The order of the checks is TiKV's.
pub fn check(
    regions: &RegionMap,
    ctx: Option<&kvrpcpb::Context>,
    store_id: u64,
) -> Result<Scope, KvError> {
    let ctx = ctx.ok_or(KvError::MissingContext)?;
    let id = RegionId(ctx.region_id);
    let epoch = ctx
        .region_epoch
        .as_ref()
        .map(|e| RegionEpoch {
            conf_ver: e.conf_ver,
            version: e.version,
        })
        // A missing epoch matches no region: the client must refresh.
        .unwrap_or(RegionEpoch {
            conf_ver: 0,
            version: 0,
        });
    if let Some(peer) = &ctx.peer
        && peer.store_id != 0
        && peer.store_id != store_id
    {
        return Err(KvError::Region(Box::new(errorpb::Error {
            message: format!(
                "region {id}: request addressed to store {}, this is store {store_id}",
                peer.store_id
            ),
            store_not_match: Some(errorpb::StoreNotMatch {
                request_store_id: peer.store_id,
                actual_store_id: store_id,
            }),
            ..Default::default()
        })));
    }
    let Some(led) = regions.get(id) else {
        return Err(region_error(regions, RegionError::NotFound(id)));
    };
    // Follower and stale reads may be served by any peer, as in TiKV (the
    // one engine makes every peer as fresh as the leader).
    let follower_read = (ctx.replica_read || ctx.stale_read) && led.peer_on(store_id).is_some();
    if led.leader_store != store_id && !follower_read {
        return Err(KvError::Region(Box::new(errorpb::Error {
            message: format!(
                "region {id} is led by store {}, this is store {store_id}",
                led.leader_store
            ),
            not_leader: Some(errorpb::NotLeader {
                region_id: id.0,
                leader: Some(leader_peer(led)),
            }),
            ..Default::default()
        })));
    }
    let region = regions
        .check(id, epoch)
        .map_err(|e| region_error(regions, e))?;
    Ok(Scope {
        region: region.clone(),
    })
}

/// The TiKV region error for `err`, with the layout's current regions.
pub(crate) fn region_error(regions: &RegionMap, err: RegionError) -> KvError {
    let mut out = errorpb::Error {
        message: err.to_string(),
        ..Default::default()
    };
    match err {
        RegionError::NotFound(id) => {
            out.region_not_found = Some(errorpb::RegionNotFound { region_id: id.0 });
        }
        RegionError::EpochNotMatch { region, .. } => {
            // The region as it is now, and its neighbours: after a split one
            // of them is the part the client's view still attributes to
            // this region (TiKV adds the split sibling for the same reason).
            let (left, right) = regions.neighbours(region);
            out.epoch_not_match = Some(errorpb::EpochNotMatch {
                current_regions: regions
                    .get(region)
                    .into_iter()
                    .chain(left)
                    .chain(right)
                    .map(region_meta)
                    .collect(),
            });
        }
        RegionError::KeyNotInRegion { region, key } => {
            let (start_key, end_key) = regions
                .get(region)
                .map(|r| (r.start_key.clone(), r.end_key.clone()))
                .unwrap_or_default();
            out.key_not_in_region = Some(errorpb::KeyNotInRegion {
                key,
                region_id: region.0,
                start_key,
                end_key,
            });
        }
    }
    KvError::Region(Box::new(out))
}

impl Scope {
    pub fn id(&self) -> RegionId {
        self.region.id
    }

    /// The region as it was when the request was checked.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Refuses `key` (as the request carries it) if it lies outside the
    /// region.
    pub fn check_key(&self, space: KeySpace, key: &[u8]) -> Result<(), KvError> {
        if self.region.contains(&space.encode_for_region(key)) {
            Ok(())
        } else {
            Err(self.not_in_region(key))
        }
    }

    /// [`Scope::check_key`] for every key.
    pub fn check_keys<'a>(
        &self,
        space: KeySpace,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), KvError> {
        keys.into_iter().try_for_each(|k| self.check_key(space, k))
    }

    fn not_in_region(&self, key: &[u8]) -> KvError {
        let r = &self.region;
        KvError::Region(Box::new(errorpb::Error {
            message: format!(
                "key {} is not in region {} [{}, {})",
                hex(key),
                r.id,
                hex(&r.start_key),
                hex(&r.end_key)
            ),
            key_not_in_region: Some(errorpb::KeyNotInRegion {
                key: key.to_vec(),
                region_id: r.id.0,
                start_key: r.start_key.clone(),
                end_key: r.end_key.clone(),
            }),
            ..Default::default()
        }))
    }

    /// Checks the starting key of `[lower, upper)` (empty `upper`:
    /// unbounded) and clamps the range to the region.
    pub fn clamp(
        &self,
        space: KeySpace,
        lower: &[u8],
        upper: &[u8],
        direction: Direction,
    ) -> Result<KeyRange, KvError> {
        let r = &self.region;
        // `None` stands for +infinity on the upper side.
        let req_upper = (!upper.is_empty()).then(|| space.encode_for_region(upper));
        let region_upper = (!r.end_key.is_empty()).then_some(r.end_key.as_slice());
        let lower_b = space.encode_for_region(lower);
        let (lower_b, upper_b) = match direction {
            Direction::Forward => {
                if !r.contains(&lower_b) {
                    return Err(self.not_in_region(lower));
                }
                (lower_b, min_upper(req_upper.as_deref(), region_upper))
            }
            Direction::Reverse => {
                let inside = match (req_upper.as_deref(), region_upper) {
                    (_, None) => req_upper
                        .as_deref()
                        .is_none_or(|u| u > r.start_key.as_slice()),
                    (None, Some(_)) => false,
                    (Some(u), Some(end)) => u > r.start_key.as_slice() && u <= end,
                };
                if !inside {
                    return Err(self.not_in_region(upper));
                }
                let lower_b = std::cmp::max(lower_b, r.start_key.clone());
                (lower_b, req_upper)
            }
        };
        let lower = if lower_b.is_empty() {
            Vec::new()
        } else {
            space.decode_from_region(&lower_b)
        };
        let upper = match upper_b {
            None => Vec::new(),
            Some(u) => space.decode_from_region(&u),
        };
        Ok(KeyRange { lower, upper })
    }

    /// The whole region as a range of the key space (e.g. for resolving
    /// every lock of a transaction in the region).
    pub fn whole(&self, space: KeySpace) -> Result<KeyRange, KvError> {
        let r = &self.region;
        let conv = |k: &[u8]| {
            if k.is_empty() {
                Vec::new()
            } else {
                space.decode_from_region(k)
            }
        };
        Ok(KeyRange {
            lower: conv(&r.start_key),
            upper: conv(&r.end_key),
        })
    }
}

/// The smaller of two exclusive upper bounds, `None` being unbounded.
fn min_upper(a: Option<&[u8]>, b: Option<&[u8]>) -> Option<Vec<u8>> {
    match (a, b) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(x.to_vec()),
        (Some(x), Some(y)) => Some(std::cmp::min(x, y).to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfeed_proto::metapb;
    use kvfeed_storage::region::STORE_ID;

    /// Checks as the first (and only) store.
    fn check_one(m: &RegionMap, ctx: Option<&kvrpcpb::Context>) -> Result<Scope, KvError> {
        check(m, ctx, STORE_ID)
    }

    #[test]
    fn requests_reaching_another_store_name_the_right_one() {
        let m = RegionMap::new(vec![encode_bytes(b"b")], &[1, 2]).expect("valid layout");
        let second = m.regions()[1].clone();
        assert_eq!(second.leader_store, 2);
        let mut c = ctx(&second);
        c.peer = Some(metapb::Peer {
            id: second.leader().id,
            store_id: 2,
            ..metapb::Peer::default()
        });
        assert!(check(&m, Some(&c), 2).is_ok());
        // Sent to store 1 (as its peer): store 1 does not lead it.
        c.peer = None;
        let e = region_err(check(&m, Some(&c), 1));
        let nl = e.not_leader.expect("not_leader");
        assert_eq!(nl.region_id, second.id.0);
        assert_eq!(nl.leader.map(|p| p.store_id), Some(2));
        // Addressed to store 2 but reaching store 1: store_not_match.
        c.peer = Some(metapb::Peer {
            id: second.leader().id,
            store_id: 2,
            ..metapb::Peer::default()
        });
        let e = region_err(check(&m, Some(&c), 1));
        let snm = e.store_not_match.expect("store_not_match");
        assert_eq!((snm.request_store_id, snm.actual_store_id), (2, 1));
        // A follower (or stale) read is served by any peer.
        c.peer = None;
        c.replica_read = true;
        assert!(check(&m, Some(&c), 1).is_ok());
    }

    fn layout() -> RegionMap {
        // Three regions: [-inf, enc(b)), [enc(b), enc(d)), [enc(d), +inf).
        RegionMap::new(vec![encode_bytes(b"b"), encode_bytes(b"d")], &[STORE_ID])
            .expect("valid layout")
    }

    fn ctx(region: &Region) -> kvrpcpb::Context {
        kvrpcpb::Context {
            region_id: region.id.0,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: region.epoch.conf_ver,
                version: region.epoch.version,
            }),
            peer: Some(metapb::Peer {
                id: region.leader().id,
                store_id: STORE_ID,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn region_err(r: Result<impl std::fmt::Debug, KvError>) -> errorpb::Error {
        match r {
            Err(KvError::Region(e)) => *e,
            other => errorpb::Error {
                message: format!("not a region error: {other:?}"),
                ..Default::default()
            },
        }
    }

    #[test]
    fn context_is_checked() {
        let m = layout();
        let r1 = m.regions()[1].clone();
        assert!(check_one(&m, Some(&ctx(&r1))).is_ok());
        assert!(matches!(check_one(&m, None), Err(KvError::MissingContext)));

        let mut c = ctx(&r1);
        c.region_id = 77;
        let e = region_err(check_one(&m, Some(&c)));
        assert_eq!(e.region_not_found.map(|x| x.region_id), Some(77));
        assert!(e.message.contains("77"), "{}", e.message);

        let mut c = ctx(&r1);
        c.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        });
        let e = region_err(check_one(&m, Some(&c)));
        let current = e
            .epoch_not_match
            .map(|x| x.current_regions)
            .unwrap_or_default();
        // The region first, then its neighbours (one may be a split sibling).
        assert_eq!(
            current,
            vec![
                region_meta(&r1),
                region_meta(&m.regions()[0]),
                region_meta(&m.regions()[2])
            ]
        );
        assert!(e.message.contains(&r1.id.to_string()), "{}", e.message);

        let mut c = ctx(&r1);
        c.region_epoch = None;
        assert!(
            region_err(check_one(&m, Some(&c)))
                .epoch_not_match
                .is_some()
        );

        let mut c = ctx(&r1);
        c.peer = Some(metapb::Peer {
            id: 1,
            store_id: 9,
            ..Default::default()
        });
        let e = region_err(check_one(&m, Some(&c)));
        assert_eq!(e.store_not_match.map(|s| s.request_store_id), Some(9));
    }

    #[test]
    fn txn_keys_are_compared_encoded_and_raw_keys_as_is() {
        let m = layout();
        let mid = check_one(&m, Some(&ctx(&m.regions()[1]))).expect("valid");
        assert!(mid.check_key(KeySpace::Txn, b"b").is_ok());
        assert!(mid.check_key(KeySpace::Txn, b"c\xff\xff").is_ok());
        let e = region_err(mid.check_key(KeySpace::Txn, b"d"));
        let k = e.key_not_in_region.clone().unwrap_or_default();
        assert_eq!((k.key.as_slice(), k.region_id), (&b"d"[..], mid.id().0));
        assert_eq!(k.start_key, encode_bytes(b"b"));
        assert_eq!(k.end_key, encode_bytes(b"d"));
        assert!(e.message.contains(&format!("region {}", mid.id())));
        // Raw "b" sorts below the boundary enc(b) = "b\0\0...", while the
        // transactional key "b" is the region's first key.
        assert!(mid.check_key(KeySpace::Raw, b"b").is_err());
        assert!(mid.check_key(KeySpace::Raw, &encode_bytes(b"c")).is_ok());
    }

    #[test]
    fn forward_ranges_start_inside_and_are_clamped() {
        let m = layout();
        let mid = check_one(&m, Some(&ctx(&m.regions()[1]))).expect("valid");
        let r = mid
            .clamp(KeySpace::Txn, b"b", b"", Direction::Forward)
            .expect("inside");
        assert_eq!(
            r,
            KeyRange {
                lower: b"b".to_vec(),
                upper: b"d".to_vec()
            }
        );
        let r = mid
            .clamp(KeySpace::Txn, b"bb", b"c", Direction::Forward)
            .expect("inside");
        assert_eq!(r.upper, b"c");
        assert!(
            mid.clamp(KeySpace::Txn, b"a", b"c", Direction::Forward)
                .is_err()
        );
        assert!(
            mid.clamp(KeySpace::Txn, b"d", b"", Direction::Forward)
                .is_err()
        );

        let last = check_one(&m, Some(&ctx(&m.regions()[2]))).expect("valid");
        let r = last
            .clamp(KeySpace::Txn, b"x", b"", Direction::Forward)
            .expect("inside");
        assert!(r.upper.is_empty());
        let first = check_one(&m, Some(&ctx(&m.regions()[0]))).expect("valid");
        let r = first
            .clamp(KeySpace::Txn, b"", b"", Direction::Forward)
            .expect("inside");
        assert_eq!(
            r,
            KeyRange {
                lower: Vec::new(),
                upper: b"b".to_vec()
            }
        );
    }

    #[test]
    fn reverse_ranges_start_at_the_exclusive_upper_bound() {
        let m = layout();
        let mid = check_one(&m, Some(&ctx(&m.regions()[1]))).expect("valid");
        // The region's own end key is a valid exclusive upper bound.
        let r = mid
            .clamp(KeySpace::Txn, b"", b"d", Direction::Reverse)
            .expect("inside");
        assert_eq!(
            r,
            KeyRange {
                lower: b"b".to_vec(),
                upper: b"d".to_vec()
            }
        );
        assert!(
            mid.clamp(KeySpace::Txn, b"", b"b", Direction::Reverse)
                .is_err()
        );
        assert!(
            mid.clamp(KeySpace::Txn, b"", b"e", Direction::Reverse)
                .is_err()
        );
        assert!(
            mid.clamp(KeySpace::Txn, b"", b"", Direction::Reverse)
                .is_err()
        );
        let last = check_one(&m, Some(&ctx(&m.regions()[2]))).expect("valid");
        let r = last
            .clamp(KeySpace::Txn, b"", b"", Direction::Reverse)
            .expect("unbounded upper in the last region");
        assert_eq!(
            r,
            KeyRange {
                lower: b"d".to_vec(),
                upper: Vec::new()
            }
        );
        // Raw space keeps bytes as they are.
        let r = last
            .clamp(KeySpace::Raw, b"", b"", Direction::Reverse)
            .expect("inside");
        assert_eq!(r.lower, encode_bytes(b"d"));
    }

    #[test]
    fn whole_region_in_each_space() {
        let m = layout();
        let mid = check_one(&m, Some(&ctx(&m.regions()[1]))).expect("valid");
        let t = mid.whole(KeySpace::Txn).expect("decodable");
        assert_eq!(
            t,
            KeyRange {
                lower: b"b".to_vec(),
                upper: b"d".to_vec()
            }
        );
        let r = mid.whole(KeySpace::Raw).expect("raw");
        assert_eq!(r.lower, encode_bytes(b"b"));
        let first = check_one(&m, Some(&ctx(&m.regions()[0]))).expect("valid");
        assert!(first.whole(KeySpace::Txn).expect("first").lower.is_empty());
    }
}
