//! Region layout changes: a split, merge or leader move ends every
//! subscription on the regions involved, with TiKV's error for it.
//!
//! The change reaches the owner as an observed batch, in the store's total
//! order of writes: every row applied before it was routed with the old
//! layout (to the old regions' subscriptions, which get their rows and then
//! the error), every row applied after it is routed with the new layout. A
//! subscription gets nothing after its error, as in TiKV. The consumer
//! re-registers on the new regions from its resolved ts, and the catch-up
//! scan of the new registration covers whatever was applied in between.
//!
//! Errors, as TiKV's CDC sends them: a split → `epoch_not_match` listing
//! the resulting regions; a merge → `epoch_not_match` without regions, for
//! the source and the target; a leader move → `not_leader` naming the new
//! leader.

use std::sync::Arc;

use kvfeed_proto::cdcpb;
use kvfeed_proto::errorpb::{EpochNotMatch, NotLeader};
use kvfeed_storage::region::{ChangeKind, RegionChange, RegionMap};

use crate::ids::{ConnId, RequestId};
use crate::meta::{leader_peer, region_meta};

use super::outbound::{Outbox, error_event};
use super::registry::Registry;

/// Takes in `change`: the layout the owner routes by becomes the change's
/// (unless the owner already has that or a newer one, which happens for a
/// change made while the feed started), and subscriptions on the affected
/// regions are ended with their error.
pub(crate) fn on_region_change(
    current: &mut Arc<RegionMap>,
    registry: &mut Registry,
    outbox: &mut Outbox,
    change: &RegionChange,
) {
    if change.map.generation() <= current.generation() {
        return;
    }
    *current = Arc::clone(&change.map);
    let error = error_for(&change.kind);
    for region in change.kind.affected() {
        let subs: Vec<(ConnId, RequestId)> = registry
            .region_subscribers(region)
            .map(|(conn, sub)| (conn.id, sub.spec().request_id))
            .collect();
        let ended = subs.len();
        for (conn, request_id) in subs {
            if registry.remove_sub(conn, request_id, region).is_some() {
                outbox.push(conn, error_event(request_id, region, error.clone()));
            }
        }
        if ended > 0 {
            tracing::info!(
                region_id = region.0,
                subscriptions = ended,
                change = kind_name(&change.kind),
                "subscriptions ended by a region change"
            );
        }
    }
}

fn error_for(kind: &ChangeKind) -> cdcpb::Error {
    match kind {
        ChangeKind::Split { regions, .. } => cdcpb::Error {
            epoch_not_match: Some(EpochNotMatch {
                current_regions: regions.iter().map(region_meta).collect(),
            }),
            ..cdcpb::Error::default()
        },
        ChangeKind::Merge { .. } => cdcpb::Error {
            epoch_not_match: Some(EpochNotMatch {
                current_regions: Vec::new(),
            }),
            ..cdcpb::Error::default()
        },
        ChangeKind::LeaderTransfer { region, .. } => cdcpb::Error {
            not_leader: Some(NotLeader {
                region_id: region.id.0,
                leader: Some(leader_peer(region)),
            }),
            ..cdcpb::Error::default()
        },
    }
}

fn kind_name(kind: &ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Split { .. } => "split",
        ChangeKind::Merge { .. } => "merge",
        ChangeKind::LeaderTransfer { .. } => "leader_transfer",
    }
}
