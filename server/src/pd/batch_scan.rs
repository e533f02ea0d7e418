//! `BatchScanRegions`: the regions overlapping several key ranges at once,
//! which client-go (and PD's Go client) try before `ScanRegions`.
//!
//! The rules are PD's (`BatchScanRegions` in its gRPC service and region
//! tree):
//! - ranges must be in order and must not overlap (a range starting below
//!   the previous range's end, compared as bytes), and no range may start
//!   above its end; otherwise the header carries `UNKNOWN` with PD's
//!   wording, which its clients match on;
//! - each range is scanned as `ScanRegions` scans one ([`RegionMap::overlapping`]),
//!   and a region overlapping several consecutive ranges is listed once;
//! - `limit` caps the total (0 or below: no limit); a truncated answer is
//!   still a success;
//! - with `contain_all_key_range`, a range left partly uncovered by the
//!   regions returned for it is `REGIONS_NOT_CONTAIN_ALL_KEY_RANGE`
//!   (kvfeed's regions tile the key space, so only a layout change between
//!   the lookups of one request could cause it).
//!
//! Work is bounded by the request: one lookup per range, and at most the
//! number of regions per range.

use std::collections::HashSet;

use kvfeed_cdc::meta::{leader_peer, region_meta};
use kvfeed_proto::pdpb::{
    self, BatchScanRegionsRequest, BatchScanRegionsResponse, ErrorType, KeyRange,
};
use kvfeed_storage::region::{Region, RegionMap};

use super::{PdService, request_cluster_id};

/// Why a batch scan was refused: the header's error type and message.
type Refusal = (ErrorType, String);

impl PdService {
    /// The answer to `BatchScanRegions`.
    pub(super) fn batch_scan_regions_reply(
        &self,
        req: &BatchScanRegionsRequest,
    ) -> BatchScanRegionsResponse {
        let requested = request_cluster_id(req.header.as_ref());
        if let Some(header) = self.reject(requested, "BatchScanRegions") {
            return BatchScanRegionsResponse {
                header,
                regions: Vec::new(),
            };
        }
        // A limit of 0 or below means "no limit", as in PD.
        let limit = usize::try_from(req.limit).unwrap_or(0);
        match batch_scan(
            &self.node.regions().current(),
            &req.ranges,
            limit,
            req.contain_all_key_range,
        ) {
            Ok(regions) => BatchScanRegionsResponse {
                header: self.header(),
                regions: regions
                    .into_iter()
                    .map(|r| pdpb::Region {
                        region: Some(region_meta(r)),
                        leader: Some(leader_peer(r)),
                        ..pdpb::Region::default()
                    })
                    .collect(),
            },
            Err((kind, message)) => {
                tracing::debug!(%message, "BatchScanRegions refused");
                BatchScanRegionsResponse {
                    header: self.error_header(kind, message),
                    regions: Vec::new(),
                }
            }
        }
    }
}

/// The regions overlapping `ranges`, in order, each once.
fn batch_scan<'a>(
    map: &'a RegionMap,
    ranges: &[KeyRange],
    limit: usize,
    contain_all: bool,
) -> Result<Vec<&'a Region>, Refusal> {
    let mut prev_end: Option<&[u8]> = None;
    for range in ranges {
        if prev_end.is_some_and(|end| range.start_key.as_slice() < end) {
            return Err(unknown("invalid key range, ranges overlapped"));
        }
        if !range.end_key.is_empty() && range.start_key > range.end_key {
            return Err(unknown("invalid key range, start key > end key"));
        }
        prev_end = Some(&range.end_key);
    }
    let limit = if limit == 0 { usize::MAX } else { limit };
    let mut out: Vec<&Region> = Vec::new();
    let mut listed = HashSet::new();
    for range in ranges {
        if out.len() >= limit {
            break;
        }
        let found = map.overlapping(&range.start_key, &range.end_key, 0);
        if contain_all {
            check_covered(range, &found)?;
        }
        for region in found {
            if out.len() >= limit {
                break;
            }
            // Usually a region shared with the previous range is the last
            // one listed, but a range after an unbounded one (which PD
            // lets through) can cover regions again.
            if listed.insert(region.id) {
                out.push(region);
            }
        }
    }
    Ok(out)
}

fn unknown(message: &str) -> Refusal {
    (ErrorType::Unknown, message.to_owned())
}

/// Whether `regions` (in key order) cover `range` without a hole.
fn check_covered(range: &KeyRange, regions: &[&Region]) -> Result<(), Refusal> {
    let hole = |what: String| {
        Err((
            ErrorType::RegionsNotContainAllKeyRange,
            format!("the regions do not contain the whole key range: {what}"),
        ))
    };
    let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
        return hole("no region overlaps it".to_owned());
    };
    if first.start_key > range.start_key {
        return hole(format!("a hole before region {}", first.id.0));
    }
    for pair in regions.windows(2) {
        if let [a, b] = pair
            && a.end_key != b.start_key
        {
            return hole(format!("a hole between regions {} and {}", a.id.0, b.id.0));
        }
    }
    let reaches_end =
        last.end_key.is_empty() || (!range.end_key.is_empty() && last.end_key >= range.end_key);
    if !reaches_end {
        return hole(format!("a hole after region {}", last.id.0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvfeed_storage::mvcc::encode_bytes;

    use super::*;

    fn map() -> RegionMap {
        RegionMap::new(
            vec![encode_bytes(b"m"), encode_bytes(b"t")],
            &[kvfeed_storage::region::STORE_ID],
        )
        .unwrap()
    }

    fn range(start: &[u8], end: &[u8]) -> KeyRange {
        KeyRange {
            start_key: start.to_vec(),
            end_key: end.to_vec(),
        }
    }

    fn ids(regions: &[&Region]) -> Vec<u64> {
        regions.iter().map(|r| r.id.0).collect()
    }

    #[test]
    fn ranges_are_scanned_in_order_and_shared_regions_listed_once() {
        let map = map();
        let all = ids(&map.regions().iter().collect::<Vec<_>>());
        let (c, n) = (encode_bytes(b"c"), encode_bytes(b"n"));
        let found = batch_scan(&map, &[range(b"a", b"b"), range(&c, &n)], 0, true).unwrap();
        assert_eq!(ids(&found), all[..2]);
        let found = batch_scan(&map, &[range(b"a", b""), range(b"", b"")], 0, false).unwrap();
        assert_eq!(
            ids(&found),
            all,
            "an empty start after an unbounded end, as PD"
        );
        let found = batch_scan(&map, &[range(b"", b"")], 2, true).unwrap();
        assert_eq!(ids(&found), all[..2], "truncated by the limit");
        assert_eq!(batch_scan(&map, &[], 0, true).unwrap().len(), 0);
    }

    #[test]
    fn invalid_ranges_are_refused_in_pds_words() {
        let map = map();
        let (kind, message) =
            batch_scan(&map, &[range(b"a", b"c"), range(b"b", b"d")], 0, false).unwrap_err();
        assert_eq!(kind, ErrorType::Unknown);
        assert_eq!(message, "invalid key range, ranges overlapped");
        let (_, message) = batch_scan(&map, &[range(b"c", b"a")], 0, false).unwrap_err();
        assert_eq!(message, "invalid key range, start key > end key");
    }

    #[test]
    fn coverage_holes_are_reported() {
        let map = map();
        let regions: Vec<&Region> = map.regions().iter().collect();
        let whole = range(b"", b"");
        assert!(check_covered(&whole, &regions).is_ok());
        let (kind, _) = check_covered(&whole, &[regions[0], regions[2]]).unwrap_err();
        assert_eq!(kind, ErrorType::RegionsNotContainAllKeyRange);
        assert!(check_covered(&whole, &regions[..2]).is_err(), "ends early");
        assert!(check_covered(&range(b"a", &encode_bytes(b"n")), &regions[..2]).is_ok());
        assert!(check_covered(&range(b"a", b"b"), &[]).is_err());
    }
}
