//! The region layout: how the key space is divided for clients, and how the
//! division changes.
//!
//! kvfeed is one process, but TiKV clients (and feed consumers) think in
//! regions: every request names the region it targets, and the change feed is
//! subscribed region by region. Regions split, merge and move their leader
//! while clients use them, as in a TiKV cluster, and every client must learn
//! of it through the same errors TiKV sends.
//!
//! # Invariants
//!
//! - Regions are contiguous, non-overlapping and cover the whole key space;
//!   an empty start or end key means unbounded.
//! - Boundaries live in the *encoded* key space (TiKV's memcomparable
//!   encoding): transactional clients encode a key before looking up its
//!   region and decode the boundaries they get back. Raw keys are compared
//!   with the same boundaries as they are (raw requests carry unencoded keys,
//!   as with TiKV's API v1). Boundaries the server chooses itself (the
//!   default split, configured splits) are complete encodings, valid for both
//!   key modes; a raw split asked for by a client is used as it is, as TiKV
//!   does, and [`raw_lower_bound`] maps it into the transactional key space.
//! - Region ids are allocated from one counter that only grows and is
//!   persisted with the layout, so an id is never reused, even after a merge
//!   removed its region and the process was killed.
//! - Epochs change as TiKV changes them: a split of a region into `n + 1`
//!   regions raises every resulting region's `version` by `n`; a merge gives
//!   the surviving region `max(source, target) + 1`; a leader move changes
//!   no epoch.
//! - The layout is persisted in the store's meta family in the *same atomic
//!   write* that announces the change to the store's observers (see
//!   [`Regions`]), so after a crash the layout on disk is exactly the last
//!   change the feed may have reported, and the feed sees layout changes in
//!   the store's total order of writes: every row applied before a split is
//!   routed with the old layout, every row after it with the new one.
//!
//! How big a region is and where to cut it ([`measure`], [`check_split`])
//! and which regions were written to ([`WriteTracker`]) live here too, as
//! only storage knows how a region's keys are laid out on disk; the policy
//! (when to split or merge) is the server's.

mod bound;
mod growth;
mod map;
mod record;
mod regions;
mod size;

pub use bound::raw_lower_bound;
pub use growth::{WriteTracker, Written};
pub use map::{ChangeError, MAX_SPLIT_KEYS, RegionMap, SplitGroup};
pub use regions::{Regions, RegionsError};
pub use size::{RegionSize, SplitCheck, SplitLimits, check_split, measure};

pub use kvfeed_types::RegionId;

/// The first store of this node. TiKV clients expect a store id on every peer.
pub const STORE_ID: u64 = 1;

/// A region's epoch, as TiKV versions region metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEpoch {
    /// Bumped by membership (peer) changes.
    pub conf_ver: u64,
    /// Bumped by splits and merges, i.e. whenever the key range changes.
    pub version: u64,
}

/// One replica of a region, on one store. kvfeed replicates nothing: every
/// peer reads the one engine; only the leader serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's id, unique in the cluster (same counter as region ids).
    pub id: u64,
    /// The store the peer lives on.
    pub store_id: u64,
}

/// One region: a key range, its peers and which of them leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// The region's id, unique in the cluster and never reused.
    pub id: RegionId,
    /// Inclusive lower bound, encoded; empty means unbounded.
    pub start_key: Vec<u8>,
    /// Exclusive upper bound, encoded; empty means unbounded.
    pub end_key: Vec<u8>,
    /// The metadata version requests must present to be served.
    pub epoch: RegionEpoch,
    /// One peer per store, in store order.
    pub peers: Vec<Peer>,
    /// The store whose peer leads (serves requests and the feed).
    pub leader_store: u64,
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

    /// The leading peer. A region always has a peer on its leader store
    /// (the map refuses anything else), so the fallback — a peer id of 0 on
    /// the leader store — is never handed out in practice.
    pub fn leader(&self) -> Peer {
        self.peer_on(self.leader_store).unwrap_or(Peer {
            id: 0,
            store_id: self.leader_store,
        })
    }

    /// The region's peer on `store_id`, if it has one there.
    pub fn peer_on(&self, store_id: u64) -> Option<Peer> {
        self.peers.iter().copied().find(|p| p.store_id == store_id)
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

/// What one layout change did, as the feed must report it to subscribers
/// of the regions involved (TiKV's errors in parentheses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// `parent` was split into `regions` (in key order; the last keeps the
    /// parent's id, as TiKV's right-derived split does) (`epoch_not_match`
    /// with the new regions).
    Split {
        /// The region that was split.
        parent: RegionId,
        /// The resulting regions, in key order.
        regions: Vec<Region>,
    },
    /// `source` was merged into `target`, which now spans both ranges
    /// (`epoch_not_match` for both, with no regions).
    Merge {
        /// The region that no longer exists.
        source: RegionId,
        /// The surviving region as it is now.
        target: Region,
    },
    /// The region's leader moved to another store (`not_leader`).
    LeaderTransfer {
        /// The region as it is now.
        region: Region,
        /// The store that led before.
        from_store: u64,
    },
}

impl ChangeKind {
    /// The ids of the regions whose subscriptions this change ends.
    pub fn affected(&self) -> Vec<RegionId> {
        match self {
            ChangeKind::Split { parent, .. } => vec![*parent],
            ChangeKind::Merge { source, target } => vec![*source, target.id],
            ChangeKind::LeaderTransfer { region, .. } => vec![region.id],
        }
    }
}

/// A layout change on its way to the store's observers: what changed and
/// the whole layout after it.
#[derive(Clone, Debug)]
pub struct RegionChange {
    /// The change.
    pub kind: ChangeKind,
    /// The layout after the change.
    pub map: std::sync::Arc<RegionMap>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
