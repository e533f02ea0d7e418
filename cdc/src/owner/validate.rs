//! Whether a Register request may become a subscription.
//!
//! Checks run in a fixed order and the first failure is the answer, so a
//! client always gets the most fundamental problem first:
//!
//! 1. cluster id (only for clients ≥ 5.3.0, as TiKV) → `cluster_id_mismatch`;
//! 2. `kv_api`: TiDB and RawKV are served; TxnKV or an unknown value →
//!    `compatibility`;
//! 3. the region exists → else `region_not_found`;
//!    the connection's store leads it → else `not_leader` naming the leader
//!    (only with several stores; TiKV serves the feed from leaders only);
//! 4. the epoch's `version` matches (TiKV ignores `conf_ver`: membership
//!    changes do not move keys) → else `epoch_not_match` with the current
//!    region, so the client can refresh without asking PD;
//! 5. no subscription with this (request id, region) on the connection →
//!    else `duplicate_request`;
//! 6. the requested range intersects the region (bytewise; encoded keys for
//!    TiDB, raw keys for RawKV) → else `epoch_not_match`: the client's
//!    view of the region is stale;
//! 7. the connection is under its subscription cap → else `server_is_busy`.
//!
//! After validation the owner refuses with `server_is_busy` when
//! `incremental-scan-concurrency-limit` catch-up scans are queued or running.
//! A subscription whose scan cannot complete ends with a [`Refusal`] too:
//!
//! - checkpoint below the effective GC safe point → `compatibility`, whose
//!   `required_version` text names both timestamps. The protocol has no
//!   field for it; `compatibility` is the one TiCDC treats as fatal (it
//!   stops the changefeed and shows the text), which is the right outcome:
//!   the history the client asks for may be gone, so retrying cannot help.
//!   Every retryable field (`server_is_busy`, region errors) would make it
//!   retry forever.
//! - a storage failure during the scan → `server_is_busy` with the cause as
//!   `reason` (the subscription may be retried once the store is healthy).
//! - held-back live rows over their cap → `congested`.
//!
//! A refusal is a typed [`Refusal`] (so logs and tests see the exact
//! reason) until it is turned into the protocol's `Error` for the answer
//! event. Every outcome is a value; nothing here can panic on request
//! contents.

use kvfeed_proto::cdcpb::{
    self, ChangeDataRequest, ClusterIdMismatch, Compatibility, Congested, DuplicateRequest,
    change_data_request::KvApi as WireKvApi,
};
use kvfeed_proto::errorpb::{EpochNotMatch, NotLeader, RegionNotFound, ServerIsBusy};
use kvfeed_proto::kvrpcpb::ExtraOp;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::region::RegionMap;

use crate::ids::{KvApi, RegionId, RequestId};
use crate::meta::{leader_peer, region_meta};
use crate::owner::registry::SubMap;
use crate::protocol::ProtocolVersion;
use crate::subscription::SubscriptionSpec;

/// What validation needs beyond the request.
pub(crate) struct Context<'a> {
    pub version: ProtocolVersion,
    pub cluster_id: u64,
    pub regions: &'a RegionMap,
    pub max_subscriptions: usize,
    /// The store the connection reached.
    pub store_id: u64,
}

/// Why a Register was refused. Kept typed until it is put on the wire, so
/// logs and tests see the exact reason rather than a flattened message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    ClusterIdMismatch {
        current: u64,
        request: u64,
    },
    /// The raw `kv_api` value asked for.
    UnsupportedKvApi(i32),
    RegionNotFound(RegionId),
    /// The region is led from another store.
    NotLeader(RegionId),
    /// The client's view of this (existing) region is stale.
    EpochNotMatch(RegionId),
    Duplicate(RegionId),
    /// The connection already holds this many subscriptions.
    TooManySubscriptions(usize),
    /// This many catch-up scans are queued or running, the most allowed.
    TooManyScans(usize),
    /// The checkpoint is below the effective GC safe point.
    BelowSafePoint {
        checkpoint: TimeStamp,
        safe_point: TimeStamp,
    },
    /// The catch-up scan hit a storage failure.
    ScanFailed(String),
    /// Live rows held back during the scan outgrew their cap.
    Congested(RegionId),
}

impl Refusal {
    /// A short name, for logs.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Refusal::ClusterIdMismatch { .. } => "cluster_id_mismatch",
            Refusal::UnsupportedKvApi(_) => "compatibility",
            Refusal::RegionNotFound(_) => "region_not_found",
            Refusal::NotLeader(_) => "not_leader",
            Refusal::EpochNotMatch(_) => "epoch_not_match",
            Refusal::Duplicate(_) => "duplicate_request",
            Refusal::TooManySubscriptions(_) => "server_is_busy",
            Refusal::TooManyScans(_) => "server_is_busy",
            Refusal::BelowSafePoint { .. } => "checkpoint_below_safe_point",
            Refusal::ScanFailed(_) => "scan_failed",
            Refusal::Congested(_) => "congested",
        }
    }

    /// The protocol error answering the request.
    pub(crate) fn to_wire(&self, regions: &RegionMap) -> cdcpb::Error {
        let mut error = cdcpb::Error::default();
        match self {
            Refusal::ClusterIdMismatch { current, request } => {
                error.cluster_id_mismatch = Some(ClusterIdMismatch {
                    current: *current,
                    request: *request,
                });
            }
            Refusal::UnsupportedKvApi(kv_api) => {
                error.compatibility = Some(Compatibility {
                    required_version: format!(
                        "a server that captures kv_api {kv_api} (this one captures TiDB and RawKV)"
                    ),
                });
            }
            Refusal::NotLeader(id) if regions.get(*id).is_some() => {
                error.not_leader = Some(NotLeader {
                    region_id: id.0,
                    leader: regions.get(*id).map(leader_peer),
                });
            }
            Refusal::EpochNotMatch(id) if regions.get(*id).is_some() => {
                error.epoch_not_match = Some(EpochNotMatch {
                    current_regions: regions.get(*id).map(region_meta).into_iter().collect(),
                });
            }
            // A region found during validation may have been merged away
            // since (a scan refusal comes later): it is then not found.
            Refusal::RegionNotFound(id) | Refusal::EpochNotMatch(id) | Refusal::NotLeader(id) => {
                error.region_not_found = Some(RegionNotFound { region_id: id.0 });
            }
            Refusal::Duplicate(id) => {
                error.duplicate_request = Some(DuplicateRequest { region_id: id.0 });
            }
            Refusal::TooManySubscriptions(count) => {
                error.server_is_busy = Some(ServerIsBusy {
                    reason: format!(
                        "the connection already has {count} subscriptions, the most allowed"
                    ),
                    ..ServerIsBusy::default()
                });
            }
            Refusal::TooManyScans(count) => {
                error.server_is_busy = Some(ServerIsBusy {
                    reason: format!(
                        "{count} catch-up scans are queued or running, the most allowed"
                    ),
                    ..ServerIsBusy::default()
                });
            }
            Refusal::BelowSafePoint {
                checkpoint,
                safe_point,
            } => {
                error.compatibility = Some(Compatibility {
                    required_version: format!(
                        "checkpoint_ts {checkpoint} is below the GC safe point {safe_point}: \
                         changes before the safe point may have been garbage collected; \
                         subscribe with checkpoint_ts >= {safe_point}"
                    ),
                });
            }
            Refusal::ScanFailed(cause) => {
                error.server_is_busy = Some(ServerIsBusy {
                    reason: format!("catch-up scan failed: {cause}"),
                    ..ServerIsBusy::default()
                });
            }
            Refusal::Congested(id) => {
                error.congested = Some(Congested { region_id: id.0 });
            }
        }
        error
    }
}

/// Validates a Register; see the module docs for the order.
pub(crate) fn register(
    req: &ChangeDataRequest,
    ctx: &Context<'_>,
    existing: &SubMap,
) -> Result<SubscriptionSpec, Refusal> {
    let request_id = RequestId(req.request_id);
    let region_id = RegionId(req.region_id);

    if ctx.version.validates_cluster_id() {
        let request = req.header.as_ref().map_or(0, |h| h.cluster_id);
        if request != ctx.cluster_id {
            return Err(Refusal::ClusterIdMismatch {
                current: ctx.cluster_id,
                request,
            });
        }
    }

    let kv_api = match WireKvApi::try_from(req.kv_api) {
        Ok(WireKvApi::TiDb) => KvApi::TiDb,
        Ok(WireKvApi::RawKv) => KvApi::RawKv,
        Ok(WireKvApi::TxnKv) | Err(_) => return Err(Refusal::UnsupportedKvApi(req.kv_api)),
    };

    let Some(region) = ctx.regions.get(region_id) else {
        return Err(Refusal::RegionNotFound(region_id));
    };
    if region.leader_store != ctx.store_id {
        return Err(Refusal::NotLeader(region_id));
    }

    let requested_version = req.region_epoch.as_ref().map_or(0, |e| e.version);
    if requested_version != region.epoch.version {
        return Err(Refusal::EpochNotMatch(region_id));
    }

    if existing.contains_key(&(request_id, region_id)) {
        return Err(Refusal::Duplicate(region_id));
    }

    let Some((start_key, end_key)) = region.intersect(&req.start_key, &req.end_key) else {
        return Err(Refusal::EpochNotMatch(region_id));
    };

    if existing.len() >= ctx.max_subscriptions {
        return Err(Refusal::TooManySubscriptions(existing.len()));
    }

    Ok(SubscriptionSpec {
        request_id,
        region_id,
        kv_api,
        start_key,
        end_key,
        old_value: req.extra_op == ExtraOp::ReadOldValue as i32,
        filter_loop: req.filter_loop,
        checkpoint_ts: req.checkpoint_ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_one_wire_error_each() {
        let regions = RegionMap::new(
            RegionMap::default_split_keys(),
            &[kvfeed_storage::region::STORE_ID],
        )
        .expect("layout");
        let known = regions.regions()[0].id;
        let cases = [
            Refusal::ClusterIdMismatch {
                current: 1,
                request: 2,
            },
            Refusal::UnsupportedKvApi(2),
            Refusal::RegionNotFound(RegionId(99)),
            Refusal::EpochNotMatch(known),
            Refusal::Duplicate(known),
            Refusal::TooManySubscriptions(3),
            Refusal::TooManyScans(3),
            Refusal::BelowSafePoint {
                checkpoint: TimeStamp::new(1),
                safe_point: TimeStamp::new(2),
            },
            Refusal::ScanFailed("disk on fire".to_owned()),
            Refusal::Congested(known),
        ];
        for refusal in cases {
            let e = refusal.to_wire(&regions);
            let set = [
                e.cluster_id_mismatch.is_some(),
                e.compatibility.is_some(),
                e.region_not_found.is_some(),
                e.epoch_not_match.is_some(),
                e.duplicate_request.is_some(),
                e.server_is_busy.is_some(),
                e.congested.is_some(),
                e.not_leader.is_some(),
            ];
            assert_eq!(set.iter().filter(|s| **s).count(), 1, "{refusal:?}");
        }
        let current = Refusal::EpochNotMatch(known).to_wire(&regions);
        assert_eq!(
            current.epoch_not_match.map(|e| e.current_regions[0].id),
            Some(known.0)
        );
        // A region that vanished between validation and answer (the layout
        // is fixed, so only defensively) is reported as not found.
        let gone = Refusal::EpochNotMatch(RegionId(99)).to_wire(&regions);
        assert_eq!(gone.region_not_found.map(|r| r.region_id), Some(99));
    }
}
