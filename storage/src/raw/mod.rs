//! TiKV's raw key-value API, with a timestamp on every write so that raw
//! writes can be captured by the change feed like committed transactions.
//!
//! Data lives in [`Cf::Raw`] as versions (the layout is described in
//! `record.rs`); reads return the *latest* version of a key, and a key whose
//! latest version is a tombstone or has expired is absent. Older versions are
//! kept until [`RawStore::gc`] removes them.
//!
//! Invariants:
//! - Writes to one key are serialized by a latch, and the timestamp is
//!   allocated while the latch is held, so per key the apply order equals the
//!   timestamp order: the feed never sees a version arrive after a newer one.
//! - A write registers (a lower bound of) its timestamp in the in-flight
//!   tracker before allocating it and unregisters after `Store::apply`
//!   returned, by which time the batch has been handed to the store's
//!   observers. See [`RawStore::min_in_flight_ts`] for how the feed uses it.
//! - [`RawStore::delete_range`] excludes every other writer for its duration
//!   (a range lock writers take shared), so no key written concurrently can
//!   slip past the range's tombstones.
//! - Garbage collection never deletes a tombstone before the versions it
//!   shadows (they go in the same or an earlier batch), so a crash midway can
//!   not resurrect a deleted value.

mod in_flight;
mod record;

use std::ops::Bound;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::engine::{Cf, EngineIter, EngineSnapshot, KvPair, WriteBatch};
use crate::mvcc::{MAX_KEY_SIZE, MAX_VALUE_SIZE, encode_bytes};
use crate::store::{BatchSource, Store};
use crate::tso::{Clock, Tso};
use crate::{Error, Result, TimeStamp};

use in_flight::InFlight;

use crate::latch::Latches;
pub use record::{RawChange, RawOp, decode_change, decode_version};
use record::{Record, decode_user_key, encode_key, split_key};

/// Tombstones written by one [`RawStore::delete_range`] batch, so a huge range
/// does not become one unbounded engine write.
const DELETE_RANGE_BATCH_KEYS: usize = 1024;
/// Engine deletes per garbage-collection batch.
const GC_BATCH_KEYS: usize = 1024;

/// What one [`RawStore::gc`] run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawGcStats {
    /// User keys examined.
    pub keys: usize,
    /// Versions (including tombstones) removed.
    pub versions_removed: usize,
}

/// Raw key-value operations over a [`Store`].
pub struct RawStore {
    store: Arc<Store>,
    tso: Arc<Tso>,
    clock: Arc<dyn Clock>,
    latches: Latches,
    /// Point writes hold it shared, `delete_range` exclusively.
    range_lock: RwLock<()>,
    in_flight: InFlight,
}

impl RawStore {
    /// A raw store whose TTLs follow the oracle's clock.
    pub fn new(store: Arc<Store>, tso: Arc<Tso>) -> Self {
        let clock = Arc::clone(tso.clock());
        Self::with_clock(store, tso, clock)
    }

    /// A raw store whose TTLs follow `clock` (milliseconds since the epoch).
    pub fn with_clock(store: Arc<Store>, tso: Arc<Tso>, clock: Arc<dyn Clock>) -> Self {
        RawStore {
            store,
            tso,
            clock,
            latches: Latches::default(),
            range_lock: RwLock::new(()),
            in_flight: InFlight::default(),
        }
    }

    fn now_secs(&self) -> u64 {
        self.clock.now_ms() / 1000
    }

    /// The latest live value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        let snap = self.store.snapshot();
        latest_value(&*snap, key, self.now_secs())
    }

    /// Values of the keys that exist, in request order; missing keys are
    /// omitted. All keys are read from one snapshot.
    pub fn batch_get(&self, keys: &[Vec<u8>]) -> Result<Vec<KvPair>> {
        keys.iter().try_for_each(|k| check_key(k))?;
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(value) = latest_value(&*snap, key, now)? {
                out.push((key.clone(), value));
            }
        }
        Ok(out)
    }

    /// Remaining time to live of `key` in seconds: `None` if the key is
    /// absent, `Some(0)` if it never expires.
    pub fn get_key_ttl(&self, key: &[u8]) -> Result<Option<u64>> {
        check_key(key)?;
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let Some(bytes) = latest_version(&*snap, key)? else {
            return Ok(None);
        };
        let record = Record::decode(&bytes)?;
        if !record.is_live(now) {
            return Ok(None);
        }
        Ok(Some(record.expire_ts.map_or(0, |e| e.saturating_sub(now))))
    }

    /// Writes `value` under `key`. `ttl` is in seconds; `None` or `Some(0)`
    /// means the value never expires. Returns the write's timestamp.
    pub fn put(&self, key: &[u8], value: &[u8], ttl: Option<u64>) -> Result<TimeStamp> {
        check_key(key)?;
        check_value(value)?;
        let expire_ts = expiry(self.now_secs(), ttl.unwrap_or(0));
        let _range = self.range_lock.read();
        let _latch = self.latches.acquire([key]);
        self.commit_latched(|ts| {
            let mut batch = WriteBatch::new();
            batch.put(
                Cf::Raw,
                encode_key(key, ts),
                Record::encode_put(value, expire_ts),
            );
            batch
        })
    }

    /// Writes all `pairs` atomically under one timestamp. `ttls` follows
    /// TiKV's request: empty for no TTL, one entry for all pairs, or one per
    /// pair; 0 means no TTL. A key given twice keeps its last value. Returns
    /// `None` when `pairs` is empty (nothing is written).
    pub fn batch_put(&self, pairs: &[KvPair], ttls: &[u64]) -> Result<Option<TimeStamp>> {
        if !(ttls.len() <= 1 || ttls.len() == pairs.len()) {
            return Err(Error::InvalidInput(format!(
                "{} TTLs for {} pairs",
                ttls.len(),
                pairs.len()
            )));
        }
        for (key, value) in pairs {
            check_key(key)?;
            check_value(value)?;
        }
        if pairs.is_empty() {
            return Ok(None);
        }
        let now = self.now_secs();
        let ttl_of = |i: usize| match ttls {
            [] => 0,
            [all] => *all,
            per_pair => per_pair.get(i).copied().unwrap_or(0),
        };
        let _range = self.range_lock.read();
        let _latch = self
            .latches
            .acquire(pairs.iter().map(|(k, _)| k.as_slice()));
        self.commit_latched(|ts| {
            let mut batch = WriteBatch::new();
            for (i, (key, value)) in pairs.iter().enumerate() {
                batch.put(
                    Cf::Raw,
                    encode_key(key, ts),
                    Record::encode_put(value, expiry(now, ttl_of(i))),
                );
            }
            batch
        })
        .map(Some)
    }

    /// Writes a tombstone for `key` (whether or not it exists, as TiKV
    /// does: the feed reports the delete either way).
    pub fn delete(&self, key: &[u8]) -> Result<TimeStamp> {
        check_key(key)?;
        let _range = self.range_lock.read();
        let _latch = self.latches.acquire([key]);
        self.commit_latched(|ts| tombstones([key], ts))
    }

    /// Writes tombstones for all `keys` atomically under one timestamp.
    /// Returns `None` when `keys` is empty.
    pub fn batch_delete(&self, keys: &[Vec<u8>]) -> Result<Option<TimeStamp>> {
        keys.iter().try_for_each(|k| check_key(k))?;
        if keys.is_empty() {
            return Ok(None);
        }
        let _range = self.range_lock.read();
        let _latch = self.latches.acquire(keys.iter().map(Vec::as_slice));
        self.commit_latched(|ts| tombstones(keys.iter().map(Vec::as_slice), ts))
            .map(Some)
    }

    /// Writes a tombstone for every live key in `[start, end)` (`end` empty:
    /// unbounded) and returns how many. Other writers wait until it is done;
    /// a large range is written in several batches, each with its own
    /// timestamp, so readers may observe it half done.
    pub fn delete_range(&self, start: &[u8], end: &[u8]) -> Result<usize> {
        check_bound(start)?;
        check_bound(end)?;
        if !end.is_empty() && start >= end {
            return Ok(0);
        }
        let _range = self.range_lock.write();
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let (lower, upper) = scan_bounds(start, end, false);
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut deleted = 0;
        for version in Newest::new(
            snap.iter(Cf::Raw, as_ref(&lower), as_ref(&upper), false),
            false,
        ) {
            let (encoded, _, bytes) = version?;
            if Record::decode(&bytes)?.is_live(now) {
                pending.push(decode_user_key(&encoded)?);
            }
            if pending.len() >= DELETE_RANGE_BATCH_KEYS {
                deleted += pending.len();
                let keys = std::mem::take(&mut pending);
                self.commit_latched(|ts| tombstones(keys.iter().map(Vec::as_slice), ts))?;
            }
        }
        if !pending.is_empty() {
            deleted += pending.len();
            self.commit_latched(|ts| tombstones(pending.iter().map(Vec::as_slice), ts))?;
        }
        Ok(deleted)
    }

    /// Live pairs in a range, at most `limit` of them. Forward: `[start,
    /// end)`. Reverse (TiKV's convention): `start` is the exclusive upper
    /// bound and `end` the inclusive lower bound, results descend. An empty
    /// bound is unbounded. `key_only` leaves values empty.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        key_only: bool,
        reverse: bool,
    ) -> Result<Vec<KvPair>> {
        let mut unbounded = usize::MAX;
        self.scan_within(start, end, limit, key_only, reverse, &mut unbounded)
    }

    /// As [`RawStore::scan`], taking the pairs' bytes (key + value) out of
    /// `budget`: a scan whose answer would not fit is refused
    /// (`InvalidInput`) as soon as it would overflow, having read no more
    /// than the budget. Several scans of one request share one budget.
    pub fn scan_within(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        key_only: bool,
        reverse: bool,
        budget: &mut usize,
    ) -> Result<Vec<KvPair>> {
        check_bound(start)?;
        check_bound(end)?;
        let empty_range = !start.is_empty()
            && !end.is_empty()
            && if reverse { start <= end } else { start >= end };
        if limit == 0 || empty_range {
            return Ok(Vec::new());
        }
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let (lower, upper) = scan_bounds(start, end, reverse);
        let iter = snap.iter(Cf::Raw, as_ref(&lower), as_ref(&upper), reverse);
        let mut out = Vec::new();
        for version in Newest::new(iter, reverse) {
            let (encoded, _, bytes) = version?;
            let record = Record::decode(&bytes)?;
            if !record.is_live(now) {
                continue;
            }
            let value = if key_only {
                Vec::new()
            } else {
                record.value.to_vec()
            };
            let key = decode_user_key(&encoded)?;
            crate::take_answer_budget(budget, key.len() + value.len())?;
            out.push((key, value));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Writes `new` under `key` if its latest live value equals `expected`
    /// (`None`: the key must be absent). Returns whether it swapped and the
    /// value found.
    pub fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<(bool, Option<Vec<u8>>)> {
        self.compare_and_swap_with_ttl(key, expected, new, None)
    }

    /// [`RawStore::compare_and_swap`] with a TTL for the new value (as in
    /// [`RawStore::put`]).
    pub fn compare_and_swap_with_ttl(
        &self,
        key: &[u8],
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl: Option<u64>,
    ) -> Result<(bool, Option<Vec<u8>>)> {
        check_key(key)?;
        check_value(&new)?;
        let _range = self.range_lock.read();
        let _latch = self.latches.acquire([key]);
        // Taken under the latch: every earlier write to `key` has returned
        // from apply, so the snapshot holds the latest version.
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let previous = latest_value(&*snap, key, now)?;
        drop(snap);
        if previous != expected {
            return Ok((false, previous));
        }
        let expire_ts = expiry(now, ttl.unwrap_or(0));
        self.commit_latched(|ts| {
            let mut batch = WriteBatch::new();
            batch.put(
                Cf::Raw,
                encode_key(key, ts),
                Record::encode_put(&new, expire_ts),
            );
            batch
        })?;
        Ok((true, previous))
    }

    /// A lower bound on the timestamp of every raw write that has, or is
    /// about to get, a timestamp but has not been handed to the store's
    /// observers yet; `None` if there is none.
    ///
    /// The feed's resolved ts must stay strictly below it. Read the candidate
    /// resolved ts from the oracle *before* calling this: a write whose
    /// timestamp is at most that candidate registered itself before the
    /// candidate was read, so it is either reported here or already observed.
    pub fn min_in_flight_ts(&self) -> Option<TimeStamp> {
        self.in_flight.min()
    }

    /// Removes versions no reader needs at `safe_point`: every version older
    /// than the newest one at or below the safe point, and that newest one
    /// too when it is a tombstone or an expired value. Runs in bounded
    /// batches written with [`BatchSource::Gc`], which the feed ignores.
    pub fn gc(&self, safe_point: TimeStamp) -> Result<RawGcStats> {
        let snap = self.store.snapshot();
        let now = self.now_secs();
        let mut stats = RawGcStats::default();
        let mut batch = WriteBatch::new();
        // The current key's encoded prefix, whether its version visible at the
        // safe point has been seen, and that version's engine key if it is to
        // be removed once the older versions have been queued.
        let mut current: Option<Vec<u8>> = None;
        let mut seen_visible = false;
        let mut dead_top: Option<Vec<u8>> = None;
        for item in snap.iter(Cf::Raw, Bound::Unbounded, Bound::Unbounded, false) {
            let (key, value) = item?;
            let (encoded, ts) = split_key(&key)?;
            if current.as_deref() != Some(encoded) {
                if let Some(top) = dead_top.take() {
                    batch.delete(Cf::Raw, top);
                    stats.versions_removed += 1;
                }
                current = Some(encoded.to_vec());
                seen_visible = false;
                stats.keys += 1;
            }
            if ts > safe_point {
                continue;
            }
            if seen_visible {
                batch.delete(Cf::Raw, key);
                stats.versions_removed += 1;
            } else {
                seen_visible = true;
                if !Record::decode(&value)?.is_live(now) {
                    dead_top = Some(key);
                }
            }
            if batch.len() >= GC_BATCH_KEYS {
                self.store
                    .apply(std::mem::take(&mut batch), BatchSource::Gc)?;
            }
        }
        if let Some(top) = dead_top {
            batch.delete(Cf::Raw, top);
            stats.versions_removed += 1;
        }
        if !batch.is_empty() {
            self.store.apply(batch, BatchSource::Gc)?;
        }
        Ok(stats)
    }

    /// Allocates a timestamp and applies the batch `build` makes with it.
    /// The caller holds the latches of every key the batch touches (or the
    /// range lock exclusively).
    fn commit_latched(&self, build: impl FnOnce(TimeStamp) -> WriteBatch) -> Result<TimeStamp> {
        // Register a lower bound first, then the real ts: a feed that read
        // the oracle after this write's allocation finds it here.
        let mut in_flight = self.in_flight.register(self.tso.current());
        let ts = self.tso.get(1)?;
        in_flight.update(ts);
        self.store.apply(build(ts), BatchSource::Client)?;
        drop(in_flight);
        Ok(ts)
    }
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidInput("raw key is empty".to_owned()));
    }
    check_bound(key)
}

/// Scan bounds may be empty (unbounded) but not oversized.
fn check_bound(key: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY_SIZE {
        return Err(Error::InvalidInput(format!(
            "raw key of {} bytes exceeds {MAX_KEY_SIZE}",
            key.len()
        )));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_SIZE {
        return Err(Error::InvalidInput(format!(
            "raw value of {} bytes exceeds {MAX_VALUE_SIZE}",
            value.len()
        )));
    }
    Ok(())
}

/// Unix seconds at which a value written at `now` with `ttl` expires.
fn expiry(now_secs: u64, ttl: u64) -> Option<u64> {
    (ttl != 0).then(|| now_secs.saturating_add(ttl))
}

fn tombstones<'k>(keys: impl IntoIterator<Item = &'k [u8]>, ts: TimeStamp) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for key in keys {
        batch.put(Cf::Raw, encode_key(key, ts), Record::encode_delete());
    }
    batch
}

/// Engine bounds of a user-key range (see [`RawStore::scan`] for the
/// conventions). An encoded key is never a prefix of another, so every version
/// of a key below `end` sorts below `encode(end)` and every version of `start`
/// sorts above `encode(start)`.
fn scan_bounds(start: &[u8], end: &[u8], reverse: bool) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let (low, high) = if reverse { (end, start) } else { (start, end) };
    let lower = if low.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Included(encode_bytes(low))
    };
    let upper = if high.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(encode_bytes(high))
    };
    (lower, upper)
}

fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    bound.as_ref().map(Vec::as_slice)
}

/// The record bytes of the newest version of `key`.
fn latest_version(snap: &dyn EngineSnapshot, key: &[u8]) -> Result<Option<Vec<u8>>> {
    let lower = encode_bytes(key);
    let upper = crate::versioned::after_versions(&lower);
    let iter = snap.iter(
        Cf::Raw,
        Bound::Included(&lower),
        Bound::Included(&upper),
        false,
    );
    match Newest::new(iter, false).next() {
        Some(version) => Ok(Some(version?.2)),
        None => Ok(None),
    }
}

fn latest_value(snap: &dyn EngineSnapshot, key: &[u8], now_secs: u64) -> Result<Option<Vec<u8>>> {
    let Some(bytes) = latest_version(snap, key)? else {
        return Ok(None);
    };
    let record = Record::decode(&bytes)?;
    Ok(record.is_live(now_secs).then(|| record.value.to_vec()))
}

/// One version: encoded user key, timestamp, record bytes.
type Version = (Vec<u8>, TimeStamp, Vec<u8>);

/// Adapts an engine iterator over [`Cf::Raw`] (either direction) to yield
/// only the newest version of each user key.
///
/// Versions of a key are contiguous, newest first in ascending order: going
/// forward the first of a run is taken; going backward the last of a run is,
/// so one version is held back until the run ends.
struct Newest<'a> {
    inner: EngineIter<'a>,
    reverse: bool,
    /// Forward: the encoded key last yielded, whose older versions follow.
    last: Option<Vec<u8>>,
    /// Reverse: the newest version seen so far of the current key.
    held: Option<Version>,
    done: bool,
}

impl<'a> Newest<'a> {
    /// `reverse` must match the direction `inner` iterates in.
    fn new(inner: EngineIter<'a>, reverse: bool) -> Self {
        Newest {
            inner,
            reverse,
            last: None,
            held: None,
            done: false,
        }
    }

    /// The next engine entry, split into its parts.
    fn pull(&mut self) -> Option<Result<Version>> {
        let item = self.inner.next()?;
        Some(item.and_then(|(key, value)| {
            let (encoded, ts) = split_key(&key)?;
            Ok((encoded.to_vec(), ts, value))
        }))
    }

    fn next_forward(&mut self) -> Option<Result<Version>> {
        loop {
            let version = match self.pull()? {
                Ok(version) => version,
                Err(e) => return Some(Err(e)),
            };
            if self.last.as_ref() == Some(&version.0) {
                continue;
            }
            self.last = Some(version.0.clone());
            return Some(Ok(version));
        }
    }

    fn next_reverse(&mut self) -> Option<Result<Version>> {
        if self.done {
            return None;
        }
        loop {
            let Some(item) = self.pull() else {
                self.done = true;
                return self.held.take().map(Ok);
            };
            let version = match item {
                Ok(version) => version,
                Err(e) => return Some(Err(e)),
            };
            let same_key = self
                .held
                .as_ref()
                .is_some_and(|(held, _, _)| *held == version.0);
            // Either a newer version of the held key replaces it, or the held
            // key's run has ended and it is the answer.
            let finished = self.held.replace(version);
            if !same_key && let Some(finished) = finished {
                return Some(Ok(finished));
            }
        }
    }
}

impl Iterator for Newest<'_> {
    type Item = Result<Version>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.reverse {
            self.next_reverse()
        } else {
            self.next_forward()
        }
    }
}
