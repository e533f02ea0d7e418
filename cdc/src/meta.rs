//! The wire form of a region: the one conversion from storage's region
//! layout to `metapb`, shared by PD's answers, KV region errors and the
//! feed's `epoch_not_match` errors, so a client sees the same region
//! however it learns of it.

use kvfeed_proto::metapb;
use kvfeed_storage::region::{Peer, Region};

/// The region's leader peer.
pub fn leader_peer(region: &Region) -> metapb::Peer {
    peer(region.leader())
}

fn peer(peer: Peer) -> metapb::Peer {
    metapb::Peer {
        id: peer.id,
        store_id: peer.store_id,
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
        peers: region.peers.iter().copied().map(peer).collect(),
        ..metapb::Region::default()
    }
}
