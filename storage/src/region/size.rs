//! How big a region is, and where to cut it: the measurement behind
//! automatic split and merge.
//!
//! A region's data lives in four families. Transactional keys (`default`,
//! `lock`, `write`) are stored under their memcomparable encoding and
//! compared with boundaries encoded; raw keys (`raw`) are stored encoded too
//! but compared with boundaries as they are (see [`super`]). So a region
//! `[start, end)` covers, in the transactional families, the engine keys
//! from the encoding of `raw_lower_bound(start)` to that of
//! `raw_lower_bound(end)`, and in the raw family those from `encode(start)`
//! to `encode(end)`. [`check_split`] and [`measure`] walk the four families
//! at once, merged by a key's *position* in boundary space (the encoded key
//! for transactional data, the raw key for raw data), so one pass sees the
//! region's keys in the order boundaries divide them.
//!
//! What counts:
//! - bytes: every engine entry's key and value, in all four families (a
//!   value too large to inline counts in `default`, a pending lock in
//!   `lock`);
//! - keys: every version in `write` and `raw` (commits, rollbacks, deletes,
//!   tombstones), as TiKV's `region-split-keys` counts write-family
//!   versions: a key with 100 versions counts 100 until GC removes them.
//!   Locks and large values add bytes but no keys (they belong to a version
//!   or are about to).
//!
//! Split points are complete memcomparable encodings (`encode_bytes(k)` for
//! some user key `k`) strictly inside the region, so they are valid
//! boundaries in both key modes, like the default boundary; and a cut never
//! falls between two versions of one key. For transactional data a cut is
//! the encoding of the first key of the next part. Raw keys that share
//! their first eight bytes (with a ninth byte below `0xF7`) cannot be
//! separated by any complete encoding (every encoding with the same first
//! eight bytes continues with `0xF7..=0xFF`), so such keys stay together in
//! one part, which may grow past `split_size`.
//!
//! Cost: both functions read one snapshot and stop early. [`measure`] stops
//! as soon as the region is above the given limit, so it reads at most the
//! limit plus one entry. [`check_split`] stops once it found
//! [`SplitLimits::batch`] split points in a region known to be above
//! `max_size`, so it reads at most about `(batch + 1) * split_size` plus
//! any run of entries no boundary can fall inside (one key's versions,
//! raw keys sharing eight bytes), which GC bounds; the rest of a larger
//! region is cut on a later check. Neither ever reads outside the region.

use std::ops::Bound;

use super::{Region, raw_lower_bound};
use crate::engine::{Cf, EngineIter, EngineSnapshot};
use crate::mvcc::{decode_bytes, encode_bytes};
use crate::{Result, versioned};

use super::MAX_SPLIT_KEYS;

/// Bytes and keys of a region or part of one (see the module docs for what
/// counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionSize {
    /// Key and value bytes of every entry.
    pub bytes: u64,
    /// Versions in the write and raw families.
    pub keys: u64,
}

impl RegionSize {
    /// A size of `bytes` and `keys`.
    pub const fn new(bytes: u64, keys: u64) -> RegionSize {
        RegionSize { bytes, keys }
    }

    /// Both counts added, saturating.
    pub fn plus(self, other: RegionSize) -> RegionSize {
        RegionSize {
            bytes: self.bytes.saturating_add(other.bytes),
            keys: self.keys.saturating_add(other.keys),
        }
    }

    /// Whether either count is above `limit`'s.
    pub fn exceeds(self, limit: RegionSize) -> bool {
        self.bytes > limit.bytes || self.keys > limit.keys
    }

    /// Whether either count reached `limit`'s.
    pub fn reaches(self, limit: RegionSize) -> bool {
        self.bytes >= limit.bytes || self.keys >= limit.keys
    }
}

/// Where parts are cut and when a region is split, as TiKV's `[coprocessor]`
/// settings say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLimits {
    /// A part is cut once it reaches this (`region-split-size`,
    /// `region-split-keys`).
    pub split: RegionSize,
    /// A region is split only once it reaches this (`region-max-size`,
    /// `region-max-keys`), each at least `split`'s.
    pub max: RegionSize,
    /// Split points found before a check stops (TiKV's
    /// `batch-split-limit`); at most [`MAX_SPLIT_KEYS`].
    pub batch: usize,
}

/// What [`check_split`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitCheck {
    /// What the scan saw: the whole region if `complete`, else a lower bound.
    pub size: RegionSize,
    /// Whether the scan reached the region's end.
    pub complete: bool,
    /// Split points, ascending, each a complete encoding strictly inside the
    /// region; empty when the region is below `max` or cannot be cut.
    pub split_keys: Vec<Vec<u8>>,
    /// With split points: the size of each resulting part, in key order
    /// (`split_keys.len() + 1` of them; the last a lower bound unless
    /// `complete`). Empty otherwise.
    pub parts: Vec<RegionSize>,
}

/// Measures `region` in `snap`, stopping as soon as the size exceeds
/// `limit`. Returns what was seen and whether that is the whole region.
pub fn measure(
    snap: &dyn EngineSnapshot,
    region: &Region,
    limit: RegionSize,
) -> Result<(RegionSize, bool)> {
    let mut items = Items::new(snap, region);
    let mut size = RegionSize::default();
    while let Some(item) = items.next()? {
        size = size.plus(item.size);
        if size.exceeds(limit) {
            return Ok((size, false));
        }
    }
    Ok((size, true))
}

/// Finds where to split `region` so that each part holds about
/// `limits.split`, if the region reached `limits.max`. A last part that
/// can join the one before it without reaching `max` does (TiKV's rule),
/// so a split leaves no sliver.
pub fn check_split(
    snap: &dyn EngineSnapshot,
    region: &Region,
    limits: &SplitLimits,
) -> Result<SplitCheck> {
    let batch = limits.batch.clamp(1, MAX_SPLIT_KEYS);
    let mut items = Items::new(snap, region);
    let mut out = SplitCheck::default();
    let mut part = RegionSize::default();
    // The position of the last item taken: versions of one key share it.
    let mut last: Option<Vec<u8>> = None;
    // Set once the current part is full: where it will end. Items below it
    // still join the part (raw keys no encoding can separate).
    let mut cut: Option<Vec<u8>> = None;
    let mut full = false;
    let mut complete = true;
    while let Some(item) = items.next()? {
        if full && last.as_deref() != Some(item.pos.as_slice()) {
            let end = cut.get_or_insert_with(|| {
                if is_complete_encoding(&item.pos) {
                    item.pos.clone()
                } else {
                    encoding_after(last.as_deref().unwrap_or_default())
                }
            });
            if item.pos.as_slice() >= end.as_slice() {
                out.split_keys.push(std::mem::take(end));
                out.parts.push(std::mem::take(&mut part));
                cut = None;
                full = false;
                let enough = out.split_keys.len() >= batch && out.size.reaches(limits.max);
                if enough || out.split_keys.len() >= MAX_SPLIT_KEYS {
                    complete = false;
                    break;
                }
            }
        }
        part = part.plus(item.size);
        out.size = out.size.plus(item.size);
        if !full && part.reaches(limits.split) {
            full = true;
        }
        last = Some(item.pos);
    }
    out.complete = complete;
    if complete {
        // A last part small enough to join the one before it without
        // reaching `max` does so.
        if let Some(&previous) = out.parts.last()
            && !previous.plus(part).reaches(limits.max)
        {
            out.parts.pop();
            out.split_keys.pop();
            part = part.plus(previous);
        }
    }
    out.parts.push(part);
    if out.split_keys.is_empty() || !out.size.reaches(limits.max) {
        out.split_keys.clear();
        out.parts.clear();
    }
    Ok(out)
}

/// The smallest complete encoding above `pos`: `pos ++ [0]` is the next
/// byte string, and [`raw_lower_bound`] finds the least encoding at or
/// above it.
fn encoding_after(pos: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(pos.len() + 1);
    next.extend_from_slice(pos);
    next.push(0);
    encode_bytes(&raw_lower_bound(&next))
}

/// Whether `pos` is exactly one canonical memcomparable encoding.
fn is_complete_encoding(pos: &[u8]) -> bool {
    decode_bytes(pos).is_ok_and(|(_, used)| used == pos.len())
}

/// The position in boundary space of an engine key of `cf`: the encoded
/// user key for transactional families, the raw user key for `raw`.
/// `None` for families that hold no region data.
pub(crate) fn position(cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(Some(match cf {
        Cf::Lock => key.to_vec(),
        Cf::Default | Cf::Write => versioned::split(key, cf)?.0.to_vec(),
        Cf::Raw => versioned::user_key(versioned::split(key, cf)?.0, cf)?,
        Cf::Meta => return Ok(None),
    }))
}

/// One engine entry seen by a scan.
struct Item {
    pos: Vec<u8>,
    size: RegionSize,
}

/// The region's entries in all data families, merged by position.
struct Items<'a> {
    heads: Vec<Head<'a>>,
}

struct Head<'a> {
    cf: Cf,
    iter: EngineIter<'a>,
    next: Option<Item>,
}

impl<'a> Items<'a> {
    fn new(snap: &'a dyn EngineSnapshot, region: &Region) -> Items<'a> {
        let txn = |b: &[u8]| (!b.is_empty()).then(|| encode_bytes(&raw_lower_bound(b)));
        let raw = |b: &[u8]| (!b.is_empty()).then(|| encode_bytes(b));
        let heads = [Cf::Default, Cf::Lock, Cf::Write, Cf::Raw]
            .into_iter()
            .map(|cf| {
                let bound = if cf == Cf::Raw { raw } else { txn };
                let (lower, upper) = (bound(&region.start_key), bound(&region.end_key));
                let iter = snap.iter(
                    cf,
                    lower.as_deref().map_or(Bound::Unbounded, Bound::Included),
                    upper.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                    false,
                );
                Head {
                    cf,
                    iter,
                    next: None,
                }
            })
            .collect();
        Items { heads }
    }

    /// The next entry in position order; entries of one position come
    /// family by family.
    fn next(&mut self) -> Result<Option<Item>> {
        for head in &mut self.heads {
            if head.next.is_none() {
                head.next = pull(head.cf, &mut head.iter)?;
            }
        }
        let least = self
            .heads
            .iter_mut()
            .filter(|h| h.next.is_some())
            .min_by(|a, b| head_pos(a).cmp(&head_pos(b)));
        Ok(least.and_then(|h| h.next.take()))
    }
}

fn head_pos<'h>(head: &'h Head<'_>) -> Option<&'h [u8]> {
    head.next.as_ref().map(|i| i.pos.as_slice())
}

fn pull(cf: Cf, iter: &mut EngineIter<'_>) -> Result<Option<Item>> {
    let Some(entry) = iter.next() else {
        return Ok(None);
    };
    let (key, value) = entry?;
    let Some(pos) = position(cf, &key)? else {
        return Ok(None);
    };
    let bytes = u64::try_from(key.len() + value.len()).unwrap_or(u64::MAX);
    let keys = u64::from(matches!(cf, Cf::Write | Cf::Raw));
    Ok(Some(Item {
        pos,
        size: RegionSize { bytes, keys },
    }))
}

#[cfg(test)]
#[path = "size_tests.rs"]
mod tests;
