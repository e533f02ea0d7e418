//! Delta scans: what a key range holds newer than a timestamp, key by key.
//!
//! A [`DeltaScanner`] walks one [`Snapshot`] over a range of one key space
//! (transactional or raw) and reports, per user key in ascending order, the
//! key's versions with a timestamp above `after` (commit_ts for the write
//! family, the write's ts for raw) and, for transactional keys, the key's
//! lock. This is what a change feed's catch-up scan replays (TiKV's
//! `DeltaScanner` plays the same part); the on-disk layout it reads stays
//! private to this crate.
//!
//! # Walks and positions
//!
//! A scanner is consumed in *walks* ([`DeltaScanner::walk`]): a walk holds
//! engine iterators, which borrow the snapshot, and reports whole keys;
//! between walks the scanner keeps only positions, so the caller may pause
//! (to hand a batch over) and continue on another thread without holding an
//! iterator. Two positions are kept:
//!
//! - the last key reported: the next walk's versions start after it;
//! - the next **live lock** at or after that point, or that none is left.
//!
//! The second is what keeps a long scan linear. Percolator deletes a lock
//! when its transaction ends, so the lock family of a busy range is mostly
//! deletion markers that an LSM iterator must step over one by one to find
//! the next live lock. Opening the lock iterator at the last key reported
//! would repeat that walk for every pause — for a range of committed
//! transactions with no live lock, to the end of the range each time, and
//! the scan would be quadratic in the range's size. Because the snapshot
//! never changes, the next live lock found by one walk is still the next
//! one for the following walk, which opens the lock iterator right there
//! (or not at all). Every deletion marker is then stepped over once.
//!
//! # Memory
//!
//! A key's versions are read newest first (the order they are stored in)
//! and handed over in the caller's vector while they fit its bounds. A
//! longer history is read past, not kept ([`KeyDelta::complete`] is false):
//! the caller reads it again, oldest first and one version at a time, with
//! [`versions_oldest_first`]. Memory therefore depends
//! neither on the size of the range nor on the length of a key's history.

use std::ops::Bound;

use crate::engine::{Cf, Cursor};
use crate::mvcc::key::{TS_SUFFIX_LEN, encode_bytes};
use crate::mvcc::lock::Lock;
use crate::store::{SeqNo, Snapshot};
use crate::{Result, TimeStamp, versioned};

/// Which key space a delta scan reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpace {
    /// Percolator data: the write family, with the lock family beside it.
    Txn,
    /// Raw key-value versions.
    Raw,
}

impl KeySpace {
    /// The family holding the key space's versions.
    fn versions_cf(self) -> Cf {
        match self {
            KeySpace::Txn => Cf::Write,
            KeySpace::Raw => Cf::Raw,
        }
    }
}

/// What a delta scan reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaSpec {
    space: KeySpace,
    /// Encoded range bounds; an empty `end` is unbounded.
    start: Vec<u8>,
    end: Vec<u8>,
    after: TimeStamp,
}

impl DeltaSpec {
    /// Transactional keys in `[start, end)`, both already memcomparable
    /// encoded (as regions and feed requests carry them; `end` empty: no
    /// end), with versions committed after `after`.
    pub fn txn(start: Vec<u8>, end: Vec<u8>, after: TimeStamp) -> DeltaSpec {
        DeltaSpec {
            space: KeySpace::Txn,
            start,
            end,
            after,
        }
    }

    /// Raw user keys in `[start, end)` (`end` empty: no end), with versions
    /// written after `after`.
    pub fn raw(start: &[u8], end: &[u8], after: TimeStamp) -> DeltaSpec {
        DeltaSpec {
            space: KeySpace::Raw,
            // The empty key encodes to the lowest encoding: no bound lost.
            start: encode_bytes(start),
            end: if end.is_empty() {
                Vec::new()
            } else {
                encode_bytes(end)
            },
            after,
        }
    }

    /// The key space read.
    pub fn space(&self) -> KeySpace {
        self.space
    }

    /// Versions at or below this are not reported.
    pub fn after(&self) -> TimeStamp {
        self.after
    }
}

/// Bounds on the versions of one key handed over by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepLimits {
    /// Most versions.
    pub versions: usize,
    /// Most bytes of stored values.
    pub bytes: usize,
}

/// One user key of a delta scan.
#[derive(Debug)]
pub struct KeyDelta {
    /// The key as stored: memcomparable encoded.
    pub encoded: Vec<u8>,
    /// The key's lock, of any type (transactional keys only).
    pub lock: Option<Lock>,
    /// Whether every version newer than the scan's `after` was handed over;
    /// if not, none was, and [`versions_oldest_first`] reads
    /// them.
    pub complete: bool,
    /// Bytes read from the engine for this key (keys and values).
    pub read_bytes: usize,
    /// The key space it was read from, to name it if the key is corrupt.
    space: KeySpace,
}

impl KeyDelta {
    /// The user key.
    pub fn user_key(&self) -> Result<Vec<u8>> {
        versioned::user_key(&self.encoded, self.space.versions_cf())
    }
}

/// A version handed over by a walk: its timestamp and its stored record (a
/// write record, or a raw record).
pub type Version = (TimeStamp, Vec<u8>);

/// Where the next live lock is, as far as the scanner knows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NextLock {
    /// Not looked for yet: the first walk looks from the range's start.
    Unknown,
    /// The next live lock's key.
    At(Vec<u8>),
    /// No live lock is left in the range.
    None,
}

/// Positions kept between walks.
#[derive(Debug)]
struct Position {
    /// The last key reported.
    after: Option<Vec<u8>>,
    next_lock: NextLock,
    finished: bool,
}

/// A resumable delta scan over one snapshot; see the module docs.
pub struct DeltaScanner {
    snapshot: Snapshot,
    spec: DeltaSpec,
    pos: Position,
}

impl DeltaScanner {
    /// A scan of `spec` over `snapshot`.
    pub fn new(snapshot: Snapshot, spec: DeltaSpec) -> DeltaScanner {
        let next_lock = match spec.space {
            KeySpace::Txn => NextLock::Unknown,
            KeySpace::Raw => NextLock::None,
        };
        DeltaScanner {
            snapshot,
            spec,
            pos: Position {
                after: None,
                next_lock,
                finished: false,
            },
        }
    }

    /// The snapshot read.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The apply sequence the snapshot reflects.
    pub fn seq(&self) -> SeqNo {
        self.snapshot.seq()
    }

    /// What is scanned.
    pub fn spec(&self) -> &DeltaSpec {
        &self.spec
    }

    /// Whether every key has been reported.
    pub fn is_finished(&self) -> bool {
        self.pos.finished
    }

    /// Opens a walk that continues after the last key reported.
    pub fn walk(&mut self) -> Result<DeltaWalk<'_>> {
        let DeltaScanner {
            snapshot,
            spec,
            pos,
        } = self;
        let snapshot: &Snapshot = snapshot;
        let end = spec.end.as_slice();
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let locks = match &pos.next_lock {
            NextLock::None => None,
            NextLock::At(key) => Some(Cursor::new(snapshot.iter(
                Cf::Lock,
                Bound::Included(key.as_slice()),
                upper,
                false,
            ))?),
            NextLock::Unknown => Some(Cursor::new(snapshot.iter(
                Cf::Lock,
                Bound::Included(spec.start.as_slice()),
                upper,
                false,
            ))?),
        };
        let after_key = pos.after.as_deref().map(versioned::after_versions);
        let lower = match &after_key {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Included(spec.start.as_slice()),
        };
        let versions = versions_cursor(snapshot, spec, lower)?;
        let mut walk = DeltaWalk {
            snapshot,
            spec,
            pos,
            locks,
            versions,
        };
        walk.note_next_lock();
        Ok(walk)
    }
}

/// The versions of the key encoded as `encoded` in `space` newer than
/// `after`, oldest first, read from `snapshot` one at a time (for a key
/// whose walk was not [`KeyDelta::complete`]).
pub fn versions_oldest_first<'a>(
    snapshot: &'a Snapshot,
    space: KeySpace,
    encoded: &[u8],
    after: TimeStamp,
) -> impl Iterator<Item = Result<Version>> + 'a {
    let cf = space.versions_cf();
    let lower = versioned::with_version(encoded, TimeStamp::MAX);
    let upper = versioned::with_version(encoded, after);
    snapshot
        .iter(cf, Bound::Included(&lower), Bound::Excluded(&upper), true)
        .map(move |item| {
            let (k, v) = item?;
            let (_, ts) = versioned::split(&k, cf)?;
            Ok((ts, v))
        })
}

/// A forward cursor over the versions family of `spec`'s key space, from
/// `lower`.
fn versions_cursor<'a>(
    snapshot: &'a Snapshot,
    spec: &DeltaSpec,
    lower: Bound<&[u8]>,
) -> Result<Cursor<'a>> {
    // A transactional range comes from the client and its end need not be
    // a complete encoding: a key's versions can then sort above the end
    // while the key is below it, so the walk bounds the write family by
    // user keys instead. Raw bounds are encodings made here, and no
    // encoding is a prefix of another, so the iterator can bound them.
    let upper = match spec.space {
        KeySpace::Raw if !spec.end.is_empty() => Bound::Excluded(spec.end.as_slice()),
        _ => Bound::Unbounded,
    };
    Cursor::new(snapshot.iter(spec.space.versions_cf(), lower, upper, false))
}

/// One walk of a [`DeltaScanner`]; see the module docs.
pub struct DeltaWalk<'a> {
    snapshot: &'a Snapshot,
    spec: &'a DeltaSpec,
    pos: &'a mut Position,
    locks: Option<Cursor<'a>>,
    versions: Cursor<'a>,
}

impl<'a> DeltaWalk<'a> {
    /// The snapshot walked, for reads beside the walk (large values, old
    /// values, a long history).
    pub fn snapshot(&self) -> &'a Snapshot {
        self.snapshot
    }

    /// The next key of the range, with its versions newer than the scan's
    /// `after` put into `kept` (newest first, cleared first) while they fit
    /// `limits`; `None` once the range is exhausted.
    pub fn next_key(
        &mut self,
        kept: &mut Vec<Version>,
        limits: KeepLimits,
    ) -> Result<Option<KeyDelta>> {
        kept.clear();
        loop {
            let Some(delta) = self.next_candidate(kept, limits)? else {
                self.pos.finished = true;
                return Ok(None);
            };
            // Only a key that is a proper prefix of the (transactional)
            // start sorts below it; it is not in the range.
            if delta.encoded.as_slice() >= self.spec.start.as_slice() {
                return Ok(Some(delta));
            }
            kept.clear();
        }
    }

    fn next_candidate(
        &mut self,
        kept: &mut Vec<Version>,
        limits: KeepLimits,
    ) -> Result<Option<KeyDelta>> {
        let cf = self.spec.space.versions_cf();
        let end = self.spec.end.as_slice();
        let lock_key = self.locks.as_ref().and_then(Cursor::head_key);
        let version_key = self
            .versions
            .head_key_prefix(TS_SUFFIX_LEN, cf)?
            .filter(|k| end.is_empty() || *k < end);
        let encoded = match (lock_key, version_key) {
            (None, None) => return Ok(None),
            (Some(l), None) => l.to_vec(),
            (None, Some(v)) => v.to_vec(),
            (Some(l), Some(v)) => l.min(v).to_vec(),
        };
        let mut read_bytes = 0;
        let mut lock = None;
        if let Some(locks) = &mut self.locks
            && locks.head_key() == Some(encoded.as_slice())
            && let Some((k, v)) = locks.take()?
        {
            read_bytes += k.len() + v.len();
            lock = Some(Lock::from_bytes(&v)?);
            self.note_next_lock();
        }
        let mut complete = true;
        let mut kept_bytes = 0;
        let mut older = 0;
        while self
            .versions
            .head_key()
            .is_some_and(|k| versioned::is_version_of(k, &encoded))
        {
            let Some((k, v)) = self.versions.take()? else {
                break;
            };
            read_bytes += k.len() + v.len();
            let (_, ts) = versioned::split(&k, cf)?;
            // Older versions are read past, not kept; they come last, so
            // past a few of them one seek to the next key is cheaper than
            // stepping through a long history.
            if ts <= self.spec.after {
                older += 1;
                if older > versioned::STEPS_BEFORE_SEEK {
                    let past = versioned::after_versions(&encoded);
                    self.versions =
                        versions_cursor(self.snapshot, self.spec, Bound::Excluded(&past))?;
                    break;
                }
                continue;
            }
            if !complete {
                continue;
            }
            kept_bytes += v.len();
            if kept.len() >= limits.versions || kept_bytes > limits.bytes {
                kept.clear();
                complete = false;
            } else {
                kept.push((ts, v));
            }
        }
        match &mut self.pos.after {
            Some(after) => {
                after.clear();
                after.extend_from_slice(&encoded);
            }
            None => self.pos.after = Some(encoded.clone()),
        }
        Ok(Some(KeyDelta {
            encoded,
            lock,
            complete,
            read_bytes,
            space: self.spec.space,
        }))
    }

    /// Records where the lock cursor stands: the next live lock, or none.
    fn note_next_lock(&mut self) {
        if let Some(locks) = &self.locks {
            self.pos.next_lock = match locks.head_key() {
                Some(k) => NextLock::At(k.to_vec()),
                None => NextLock::None,
            };
        }
    }
}
