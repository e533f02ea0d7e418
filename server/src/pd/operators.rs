//! PD's region operators as clients call them: `SplitRegions` (BR,
//! Lightning), `ScatterRegion` and `GetOperator` (client-go's
//! `SplitRegions(…, scatter = true)` and `WaitScatterRegionFinish`).
//!
//! kvfeed runs an operator to completion before it answers (each change
//! is one durable write through the region layout, and the feed sees it as
//! any other split or leader move), so no operator is ever still running:
//! `GetOperator` answers as PD does for a region without a pending operator,
//! which client-go reads as "finished".
//!
//! - `SplitRegions`: split keys are region keys (encoded, as boundaries
//!   are); keys that are already boundaries are skipped, the rest split the
//!   regions holding them. The answer lists the new regions' ids and the
//!   share of keys that became boundaries.
//! - `ScatterRegion`: with several stores, each region's leader moves to
//!   the store leading the fewest regions; with one store there is nothing
//!   to move. Unknown region ids are skipped and lower `finished_percentage`.
//!
//! Both are bounded: at most [`MAX_KEYS`] keys / [`MAX_REGIONS`] regions
//! per request, else `INVALID_VALUE`.

use std::collections::HashMap;

use kvfeed_proto::pdpb::{
    ErrorType, GetOperatorRequest, GetOperatorResponse, OperatorStatus, ScatterRegionRequest,
    ScatterRegionResponse, SplitRegionsRequest, SplitRegionsResponse,
};
use kvfeed_storage::region::{RegionId, Regions};

use super::{PdService, request_cluster_id};

/// Most split keys one `SplitRegions` may carry.
pub const MAX_KEYS: usize = 4096;
/// Most regions one `ScatterRegion` may name.
pub const MAX_REGIONS: usize = 4096;

impl PdService {
    /// The answer to `SplitRegions`.
    pub(super) async fn split_regions_reply(
        &self,
        req: SplitRegionsRequest,
    ) -> SplitRegionsResponse {
        if let Some(header) = self.reject(request_cluster_id(req.header.as_ref()), "SplitRegions") {
            return SplitRegionsResponse {
                header,
                ..SplitRegionsResponse::default()
            };
        }
        if req.split_keys.len() > MAX_KEYS {
            return SplitRegionsResponse {
                header: self.error_header(
                    ErrorType::InvalidValue,
                    format!(
                        "{} split keys, at most {MAX_KEYS} per request",
                        req.split_keys.len()
                    ),
                ),
                ..SplitRegionsResponse::default()
            };
        }
        let regions = std::sync::Arc::clone(self.node.regions());
        let outcome = tokio::task::spawn_blocking(move || split_at(&regions, req.split_keys)).await;
        match outcome {
            Ok((regions_id, finished_percentage)) => SplitRegionsResponse {
                header: self.header(),
                finished_percentage,
                regions_id,
            },
            Err(err) => SplitRegionsResponse {
                header: self.error_header(ErrorType::Unknown, format!("split failed: {err}")),
                ..SplitRegionsResponse::default()
            },
        }
    }

    /// The answer to `ScatterRegion`.
    pub(super) async fn scatter_region_reply(
        &self,
        req: ScatterRegionRequest,
    ) -> ScatterRegionResponse {
        if let Some(header) = self.reject(request_cluster_id(req.header.as_ref()), "ScatterRegion")
        {
            return ScatterRegionResponse {
                header,
                finished_percentage: 0,
            };
        }
        #[allow(deprecated)] // older clients name one region this way
        let ids: Vec<u64> = if !req.regions_id.is_empty() {
            req.regions_id
        } else if req.region_id != 0 {
            vec![req.region_id]
        } else {
            req.region.map(|r| r.id).into_iter().collect()
        };
        if ids.len() > MAX_REGIONS {
            return ScatterRegionResponse {
                header: self.error_header(
                    ErrorType::InvalidValue,
                    format!("{} regions, at most {MAX_REGIONS} per request", ids.len()),
                ),
                finished_percentage: 0,
            };
        }
        let regions = std::sync::Arc::clone(self.node.regions());
        match tokio::task::spawn_blocking(move || scatter(&regions, &ids)).await {
            Ok(Ok(finished_percentage)) => ScatterRegionResponse {
                header: self.header(),
                finished_percentage,
            },
            Ok(Err(message)) => ScatterRegionResponse {
                header: self.error_header(ErrorType::RegionNotFound, message),
                finished_percentage: 0,
            },
            Err(err) => ScatterRegionResponse {
                header: self.error_header(ErrorType::Unknown, format!("scatter failed: {err}")),
                finished_percentage: 0,
            },
        }
    }

    /// The answer to `GetOperator`: no operator is ever pending.
    pub(super) fn get_operator_reply(&self, req: &GetOperatorRequest) -> GetOperatorResponse {
        if let Some(header) = self.reject(request_cluster_id(req.header.as_ref()), "GetOperator") {
            return GetOperatorResponse {
                header,
                ..GetOperatorResponse::default()
            };
        }
        let exists = self
            .node
            .regions()
            .current()
            .get(RegionId(req.region_id))
            .is_some();
        // PD's answer for a region without an operator.
        let header = if exists {
            self.header()
        } else {
            self.error_header(ErrorType::RegionNotFound, "Not Found".to_owned())
        };
        GetOperatorResponse {
            header,
            region_id: req.region_id,
            desc: Vec::new(),
            status: OperatorStatus::Success as i32,
            kind: Vec::new(),
        }
    }
}

/// Splits at every key that is not yet a boundary; returns the new
/// regions' ids and the share of keys (percent) that are boundaries now.
fn split_at(regions: &Regions, mut keys: Vec<Vec<u8>>) -> (Vec<u64>, u64) {
    keys.retain(|k| !k.is_empty());
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return (Vec::new(), 100);
    }
    let total = keys.len();
    let (groups, boundaries) = regions.current().group_by_region(&keys);
    let mut done = boundaries.len();
    let mut new_ids = Vec::new();
    for (id, group) in groups {
        let count = group.len();
        match regions.split(id, None, group) {
            Ok(parts) => {
                done += count;
                new_ids.extend(parts.iter().map(|r| r.id.0).filter(|&r| r != id.0));
            }
            Err(err) => tracing::warn!(region_id = id.0, %err, "SplitRegions: a split failed"),
        }
    }
    (new_ids, (done * 100 / total) as u64)
}

/// Moves each region's leader to the store leading the fewest regions;
/// returns the percentage of regions found. `Err` when none was.
fn scatter(regions: &Regions, ids: &[u64]) -> Result<u64, String> {
    if ids.is_empty() {
        return Ok(100);
    }
    let map = regions.current();
    let mut leading: HashMap<u64, usize> = map.stores().iter().map(|&s| (s, 0)).collect();
    for region in map.regions() {
        *leading.entry(region.leader_store).or_default() += 1;
    }
    let mut found = 0;
    for &id in ids {
        let Some(region) = map.get(RegionId(id)) else {
            continue;
        };
        found += 1;
        let Some((&target, _)) = leading.iter().min_by_key(|(store, n)| (**n, **store)) else {
            continue;
        };
        // Only a move that evens the counts out is worth a leader change.
        let here = leading.get(&region.leader_store).copied().unwrap_or(0);
        let there = leading.get(&target).copied().unwrap_or(0);
        if target == region.leader_store || here <= there + 1 {
            continue;
        }
        match regions.transfer_leader(region.id, target) {
            Ok(_) => {
                *leading.entry(target).or_default() += 1;
                if let Some(n) = leading.get_mut(&region.leader_store) {
                    *n = n.saturating_sub(1);
                }
            }
            Err(err) => tracing::warn!(region_id = id, %err, "ScatterRegion: a move failed"),
        }
    }
    if found == 0 {
        return Err(format!("regions {ids:?} not found"));
    }
    Ok((found * 100 / ids.len()) as u64)
}
