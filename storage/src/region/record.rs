//! How the layout is kept in [`Cf::Meta`].
//!
//! - [`STATE_KEY`] → format byte, `next_id`, `generation` (u64 big-endian
//!   each): the id counter and change count of the layout on disk;
//! - [`REGION_KEY_PREFIX`] + region id (u64 big-endian) → one region:
//!   format byte, `conf_ver`, `version`, `leader_store`, peer count (u32),
//!   each peer's id and store id, then start and end key, each as a u32
//!   length and its bytes.
//!
//! A change rewrites the state record and every region it created or
//! altered, and deletes every region it removed, in one batch. The loader
//! checks that the regions read back are contiguous and cover the key space:
//! anything else is reported as corruption, never repaired by guessing.

use std::ops::Bound;

use super::{ChangeKind, Peer, Region, RegionEpoch, RegionId, RegionMap, hex};
use crate::engine::{Cf, EngineSnapshot, WriteBatch};
use crate::{Error, Result};

/// The layout's id counter and generation.
pub const STATE_KEY: &[u8] = b"region/state";
/// Prefix of one record per region.
pub const REGION_KEY_PREFIX: &[u8] = b"region/r/";

/// The only record format so far.
const FORMAT: u8 = 1;

fn region_key(id: RegionId) -> Vec<u8> {
    let mut key = REGION_KEY_PREFIX.to_vec();
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// Puts the whole layout (a new store's first layout).
pub fn put_all(batch: &mut WriteBatch, map: &RegionMap) {
    put_state(batch, map);
    for region in map.regions() {
        batch.put(Cf::Meta, region_key(region.id), encode_region(region));
    }
}

/// Puts what `kind` changed, leading to `map`.
pub fn put_change(batch: &mut WriteBatch, map: &RegionMap, kind: &ChangeKind) {
    put_state(batch, map);
    match kind {
        ChangeKind::Split { regions, .. } => {
            for region in regions {
                batch.put(Cf::Meta, region_key(region.id), encode_region(region));
            }
        }
        ChangeKind::Merge { source, target } => {
            batch.delete(Cf::Meta, region_key(*source));
            batch.put(Cf::Meta, region_key(target.id), encode_region(target));
        }
        ChangeKind::LeaderTransfer { region, .. } => {
            batch.put(Cf::Meta, region_key(region.id), encode_region(region));
        }
    }
}

fn put_state(batch: &mut WriteBatch, map: &RegionMap) {
    let mut value = vec![FORMAT];
    value.extend_from_slice(&map.next_id().to_be_bytes());
    value.extend_from_slice(&map.generation().to_be_bytes());
    batch.put(Cf::Meta, STATE_KEY, value);
}

/// Reads the layout back; `None` for a store that never had one. `stores`
/// are the stores of this run: every region must have a peer on each.
pub fn load(snap: &dyn EngineSnapshot, stores: &[u64]) -> Result<Option<RegionMap>> {
    let Some(state) = snap.get(Cf::Meta, STATE_KEY)? else {
        return Ok(None);
    };
    let mut r = Reader::new(&state, "region state");
    r.format()?;
    let next_id = r.u64()?;
    let generation = r.u64()?;
    r.end()?;

    let mut upper = REGION_KEY_PREFIX.to_vec();
    if let Some(last) = upper.last_mut() {
        *last += 1;
    }
    let mut regions = Vec::new();
    for item in snap.iter(
        Cf::Meta,
        Bound::Included(REGION_KEY_PREFIX),
        Bound::Excluded(&upper),
        false,
    ) {
        let (key, value) = item?;
        let id = key
            .get(REGION_KEY_PREFIX.len()..)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| corrupt(format!("region record key {}", hex(&key))))?;
        regions.push(decode_region(RegionId(id), &value)?);
    }
    regions.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    check_layout(&regions, next_id, stores)?;
    Ok(Some(RegionMap::from_parts(
        regions,
        next_id,
        generation,
        stores.to_vec(),
    )))
}

fn check_layout(regions: &[Region], next_id: u64, stores: &[u64]) -> Result<()> {
    let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
        return Err(corrupt("the region state exists but no region does".into()));
    };
    if !first.start_key.is_empty() || !last.end_key.is_empty() {
        return Err(corrupt("the regions do not cover the key space".into()));
    }
    for w in regions.windows(2) {
        if w[0].end_key != w[1].start_key || w[0].end_key.is_empty() {
            return Err(corrupt(format!(
                "regions {} and {} are not contiguous ({} vs {})",
                w[0].id,
                w[1].id,
                hex(&w[0].end_key),
                hex(&w[1].start_key)
            )));
        }
    }
    for region in regions {
        if region.id.0 >= next_id || region.peers.iter().any(|p| p.id >= next_id) {
            return Err(corrupt(format!(
                "region {} uses an id at or above the next id {next_id}",
                region.id
            )));
        }
        if region.peer_on(region.leader_store).is_none() {
            return Err(corrupt(format!(
                "region {} has no peer on its leader store {}",
                region.id, region.leader_store
            )));
        }
        let on: Vec<u64> = region.peers.iter().map(|p| p.store_id).collect();
        if on != stores {
            return Err(Error::InvalidInput(format!(
                "region {} has peers on stores {on:?}, but this server runs stores {stores:?}; \
                 start it with the number of stores the data directory was created with",
                region.id
            )));
        }
    }
    Ok(())
}

fn encode_region(region: &Region) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        1 + 8 * 3 + 4 + 16 * region.peers.len() + 8 + region.start_key.len() + region.end_key.len(),
    );
    out.push(FORMAT);
    out.extend_from_slice(&region.epoch.conf_ver.to_be_bytes());
    out.extend_from_slice(&region.epoch.version.to_be_bytes());
    out.extend_from_slice(&region.leader_store.to_be_bytes());
    // A region has one peer per store; the count always fits.
    out.extend_from_slice(
        &u32::try_from(region.peers.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for peer in &region.peers {
        out.extend_from_slice(&peer.id.to_be_bytes());
        out.extend_from_slice(&peer.store_id.to_be_bytes());
    }
    for key in [&region.start_key, &region.end_key] {
        out.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(key);
    }
    out
}

fn decode_region(id: RegionId, value: &[u8]) -> Result<Region> {
    let mut r = Reader::new(value, "region record");
    r.format()?;
    let conf_ver = r.u64()?;
    let version = r.u64()?;
    let leader_store = r.u64()?;
    let count = r.u32()?;
    let mut peers = Vec::new();
    for _ in 0..count {
        peers.push(Peer {
            id: r.u64()?,
            store_id: r.u64()?,
        });
    }
    let start_key = r.bytes()?;
    let end_key = r.bytes()?;
    r.end()?;
    Ok(Region {
        id,
        start_key,
        end_key,
        epoch: RegionEpoch { conf_ver, version },
        peers,
        leader_store,
    })
}

fn corrupt(reason: String) -> Error {
    Error::corrupt(Cf::Meta.name(), reason)
}

/// Reads fixed-width fields off the front of a record; every shortfall is
/// corruption naming the record.
struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8], what: &'static str) -> Self {
        Reader { rest, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(corrupt(format!("{} is truncated", self.what)));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn format(&mut self) -> Result<()> {
        match self.take(1)? {
            [FORMAT] => Ok(()),
            other => Err(corrupt(format!(
                "{} has unknown format {}",
                self.what,
                hex(other)
            ))),
        }
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| {
            corrupt(format!("{} is truncated", self.what))
        })?))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().map_err(|_| {
            corrupt(format!("{} is truncated", self.what))
        })?))
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn end(&self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt(format!(
                "{} has {} bytes too many",
                self.what,
                self.rest.len()
            )))
        }
    }
}
