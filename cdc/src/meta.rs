//! The wire form of a region: the one conversion from storage's region
//! layout to `metapb`, shared by PD's answers, KV region errors and the
//! feed's `epoch_not_match` errors, so a client sees the same region
//! however it learns of it.

use kvfeed_proto::metapb;
use kvfeed_storage::region::{Region, STORE_ID};

/// The region's leader peer (its only peer: one store serves every region).
pub fn leader_peer(region: &Region) -> metapb::Peer {
    metapb::Peer {
        id: region.peer_id,
        store_id: STORE_ID,
        role: metapb::PeerRole::Voter as i32,
        is_witness: false,
    }
}

/// The metadata form of a region, as PD hands it out (and as region errors
/// carry it in `current_regions`).
pub fn region_meta(region: &Region) -> metapb::Region {
    metapb::Region {
        id: region.id.0,
        start_key: region.start_key.clone(),
        end_key: region.end_key.clone(),
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: region.epoch.conf_ver,
            version: region.epoch.version,
        }),
        peers: vec![leader_peer(region)],
        ..metapb::Region::default()
    }
}
