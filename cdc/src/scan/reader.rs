//! Reading one catch-up snapshot in bounded batches.
//!
//! A [`Scanner`] owns a store snapshot and walks its subscription's range
//! one user key at a time. For each key it reports, in this order:
//!
//! 1. a COMMITTED row for every Put/Delete version with `commit_ts >`
//!    the checkpoint, oldest first (Rollback and Lock records are skipped:
//!    they change no value); a raw key's versions with `ts >` the
//!    checkpoint the same way, tombstones and values past their TTL
//!    included (with their expiry), as the live feed reports them;
//! 2. a PREWRITE row for the key's lock, if it is a Put or Delete lock
//!    (the transaction commits after every version already written, so its
//!    row comes last, as the live feed would have ordered them).
//!
//! Every Put/Delete lock found is also reported to the owner separately
//! (`ScanBatch::locks`), loop filter or not: the subscription's resolved
//! ts must wait for it whether or not its rows are shown.
//!
//! # Bounds
//!
//! - A batch holds at most [`SCAN_BATCH_ROWS`] rows and [`SCAN_BATCH_BYTES`]
//!   of encoded rows; a single larger row travels alone.
//! - The work of one batch is bounded even where the range yields no rows
//!   (every version at or below the checkpoint): it also stops after
//!   [`SCAN_BATCH_KEYS`] keys or [`SCAN_READ_BYTES`] read, so a
//!   cancellation is noticed within one such batch.
//! - Memory does not depend on the size of the range or on a key's
//!   history. One forward walk discovers the keys and reads their
//!   versions (newest first); the versions newer than the checkpoint are
//!   kept from it, to be emitted oldest first without reading the key
//!   again, as long as they fit [`KEPT_VERSIONS`] and [`KEPT_BYTES`]. A
//!   longer history is dropped from memory and read again oldest first
//!   with a reverse iterator bounded by the checkpoint, one version at a
//!   time.
//!
//! # Cost
//!
//! The forward walk is the whole read in the common case: every version
//! is read once, and nothing is searched per key. (Opening an iterator per
//! key, as a reverse read needs, costs a seek in every memtable and table
//! of the LSM tree, and stepping a memtable backwards repeats a search per
//! step: several times the cost of the forward step.) A stored value moves
//! into its row; the user key is decoded once per key.
//!
//! # Resuming
//!
//! Between batches the scanner keeps positions (engine keys and the last
//! version emitted) and the kept versions of the key it stopped in, not
//! iterators, so nothing borrows the snapshot while the scan waits and
//! each batch may run on any blocking thread. A batch that stops inside a
//! key resumes after the last version it emitted; a row that did not fit
//! is simply read again from the snapshot.
//!
//! Storage failures (an engine error, an undecodable record, a large value
//! missing from the default family) end the scan with the error: the
//! owner fails the subscription rather than deliver a partial history.

use std::ops::Bound;

use bytes::Bytes;
use kvfeed_proto::cdcpb::event::{LogType, Row, row::OpType};
use kvfeed_storage::engine::{Cf, Cursor};
use kvfeed_storage::mvcc::key::TS_SUFFIX_LEN;
use kvfeed_storage::mvcc::{
    Key, Lock, LockType, MvccReader, Write, WriteType, decode_bytes, encode_bytes,
};
use kvfeed_storage::raw;
use kvfeed_storage::store::{SeqNo, Snapshot};
use kvfeed_storage::{Error, Result, TimeStamp};
use prost::Message;

use crate::ids::KvApi;
use crate::owner::raw_committed_row;
use crate::subscription::SubscriptionSpec;

use crate::{SCAN_BATCH_MAX_BYTES as SCAN_BATCH_BYTES, SCAN_BATCH_MAX_ROWS as SCAN_BATCH_ROWS};
/// Most user keys one batch visits.
const SCAN_BATCH_KEYS: usize = 1024;
/// Most bytes one batch reads from the store before it stops.
const SCAN_READ_BYTES: usize = 4 << 20;
/// Most versions of one key kept from the forward walk.
const KEPT_VERSIONS: usize = SCAN_BATCH_ROWS;
/// Most bytes of stored values of one key kept from the forward walk.
const KEPT_BYTES: usize = SCAN_BATCH_BYTES;

/// What a scan reads: the subscription's range and options.
#[derive(Clone, Debug)]
pub(crate) struct ScanSpec {
    pub kv_api: KvApi,
    /// Encoded keys for TiDB, raw keys for RawKV; empty end = unbounded.
    pub start_key: Vec<u8>,
    pub end_key: Vec<u8>,
    pub checkpoint: TimeStamp,
    pub old_value: bool,
    pub filter_loop: bool,
}

impl ScanSpec {
    pub(crate) fn of(spec: &SubscriptionSpec) -> ScanSpec {
        ScanSpec {
            kv_api: spec.kv_api,
            start_key: spec.start_key.clone(),
            end_key: spec.end_key.clone(),
            checkpoint: TimeStamp::new(spec.checkpoint_ts),
            old_value: spec.old_value,
            filter_loop: spec.filter_loop,
        }
    }
}

/// One batch of a scan.
#[derive(Debug, Default)]
pub(crate) struct ScanBatch {
    pub rows: Vec<Row>,
    /// Put/Delete locks found: (encoded key, start_ts).
    pub locks: Vec<(Vec<u8>, TimeStamp)>,
    /// Encoded bytes of `rows`.
    pub row_bytes: usize,
    /// Bytes read from the store (keys and values).
    pub read_bytes: usize,
    /// Whether the range is exhausted.
    pub finished: bool,
    keys: usize,
}

impl ScanBatch {
    fn full(&self) -> bool {
        self.rows.len() >= SCAN_BATCH_ROWS
            || self.row_bytes >= SCAN_BATCH_BYTES
            || self.keys >= SCAN_BATCH_KEYS
            || self.read_bytes >= SCAN_READ_BYTES
    }

    /// Whether a row of `len` encoded bytes may join the batch.
    fn fits(&self, len: usize) -> bool {
        self.rows.is_empty()
            || (self.rows.len() < SCAN_BATCH_ROWS && self.row_bytes + len <= SCAN_BATCH_BYTES)
    }

    /// Adds `row` if it fits; gives it back if not (boxed: refusals are
    /// at most one per batch, and a bare `Row` would make the `Result` as
    /// large as the row on every push).
    fn push(&mut self, row: Row) -> std::result::Result<(), Box<Row>> {
        let len = row.encoded_len();
        if !self.fits(len) {
            return Err(Box::new(row));
        }
        if self.rows.capacity() == 0 {
            // Most batches fill up: growing a vector of 1024 rows step by
            // step would copy it several times.
            self.rows.reserve_exact(SCAN_BATCH_ROWS);
        }
        self.row_bytes += len;
        self.rows.push(row);
        Ok(())
    }

    fn read(&mut self, key: &[u8], value: &[u8]) {
        self.read_bytes += key.len() + value.len();
    }
}

/// A version kept from the forward walk: its timestamp (a commit_ts, or a
/// raw write's ts) and its stored value (a write record or a raw record).
type Version = (TimeStamp, Vec<u8>);

/// A key whose rows are not all emitted yet.
#[derive(Debug)]
struct KeyWork {
    /// The engine's encoding of the user key.
    encoded: Vec<u8>,
    user_key: Vec<u8>,
    /// Every version at or below this was emitted (or skipped).
    emitted_through: TimeStamp,
    /// Whether the scanner's kept versions are exactly this key's versions
    /// above `emitted_through`; otherwise they are read from the snapshot.
    kept: bool,
    versions_done: bool,
    /// The PREWRITE still to emit.
    lock: Option<Lock>,
}

impl KeyWork {
    fn key(&self) -> Result<Key> {
        Key::from_encoded(self.encoded.clone())
    }

    /// The user key for a row: moved out for the key's last row (no copy),
    /// cloned otherwise. A moved key must be given back with
    /// [`KeyWork::restore_key`] if its row is not emitted.
    fn row_key(&mut self, last: bool) -> Vec<u8> {
        if last {
            std::mem::take(&mut self.user_key)
        } else {
            self.user_key.clone()
        }
    }

    /// Gives back the key of a row that was not emitted. The row was never
    /// shared, so turning its `Bytes` key back into a `Vec` reclaims the
    /// buffer without copying.
    fn restore_key(&mut self, row: Row, last: bool) {
        if last {
            self.user_key = Vec::from(row.key);
        }
    }
}

/// A catch-up scan over one snapshot; see the module docs.
pub(crate) struct Scanner {
    snapshot: Snapshot,
    spec: ScanSpec,
    /// The last key discovered; discovery resumes after it.
    after: Option<Vec<u8>>,
    current: Option<KeyWork>,
    /// The versions of `current` kept from the forward walk, newest first
    /// (the next to emit is last); meaningful while `current.kept`.
    kept: Vec<Version>,
    finished: bool,
}

impl Scanner {
    pub(crate) fn new(snapshot: Snapshot, spec: ScanSpec) -> Scanner {
        Scanner {
            snapshot,
            spec,
            after: None,
            current: None,
            kept: Vec::new(),
            finished: false,
        }
    }

    /// The apply sequence the snapshot reflects.
    pub(crate) fn seq(&self) -> SeqNo {
        self.snapshot.seq()
    }

    /// Reads the next batch. After a batch with `finished`, every later
    /// batch is empty and finished too.
    pub(crate) fn next_batch(&mut self) -> Result<ScanBatch> {
        let mut batch = ScanBatch::default();
        if self.finished {
            batch.finished = true;
            return Ok(batch);
        }
        if let Some(mut work) = self.current.take()
            && !emit_key(
                &self.snapshot,
                &self.spec,
                &mut work,
                &mut self.kept,
                &mut batch,
            )?
        {
            self.current = Some(work);
            return Ok(batch);
        }
        match self.spec.kv_api {
            KvApi::TiDb => self.discover_txn(&mut batch)?,
            KvApi::RawKv => self.discover_raw(&mut batch)?,
        }
        batch.finished = self.finished;
        Ok(batch)
    }

    /// Walks keys after `after`, emitting each, until the batch is full or
    /// the range ends.
    fn discover_txn(&mut self, batch: &mut ScanBatch) -> Result<()> {
        let snap = &self.snapshot;
        let spec = &self.spec;
        let start = spec.start_key.as_slice();
        let end = spec.end_key.as_slice();
        let write_after = self.after.as_deref().map(after_all_versions);
        let lock_lower = match &self.after {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Included(start),
        };
        let write_lower = match &write_after {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Included(start),
        };
        let lock_upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let mut locks = Cursor::new(snap.iter(Cf::Lock, lock_lower, lock_upper, false))?;
        // The versions of a key below `end` can sort above `end` when the
        // key is a prefix of it, so the write family is bounded by its user
        // keys in the loop rather than by the iterator.
        let mut writes = Cursor::new(snap.iter(Cf::Write, write_lower, Bound::Unbounded, false))?;
        while !batch.full() {
            let lock_key = locks.head_key();
            let write_key = writes
                .head_key_prefix(TS_SUFFIX_LEN, Cf::Write)?
                .filter(|k| end.is_empty() || *k < end);
            let next = match (lock_key, write_key) {
                (None, None) => {
                    self.finished = true;
                    break;
                }
                (Some(l), None) => l.to_vec(),
                (None, Some(w)) => w.to_vec(),
                (Some(l), Some(w)) => l.min(w).to_vec(),
            };
            let mut lock = None;
            if locks.head_key() == Some(next.as_slice())
                && let Some((k, v)) = locks.take()?
            {
                batch.read(&k, &v);
                lock = Some(Lock::from_bytes(&v)?);
            }
            let kept = keep_versions(
                &mut writes,
                Cf::Write,
                &next,
                spec.checkpoint,
                None,
                &mut self.kept,
                batch,
            )?;
            remember(&mut self.after, &next);
            if next.as_slice() < start {
                // Only a key that is a proper prefix of `start` gets here.
                continue;
            }
            batch.keys += 1;
            let lock = lock.filter(|l| matches!(l.lock_type, LockType::Put | LockType::Delete));
            if let Some(l) = &lock {
                batch.locks.push((next.clone(), l.start_ts));
            }
            let user_key = user_key_of(&next, Cf::Write)?;
            let mut work = KeyWork {
                encoded: next,
                user_key,
                emitted_through: spec.checkpoint,
                kept,
                versions_done: false,
                lock,
            };
            if !emit_key(snap, spec, &mut work, &mut self.kept, batch)? {
                self.current = Some(work);
                break;
            }
        }
        Ok(())
    }

    fn discover_raw(&mut self, batch: &mut ScanBatch) -> Result<()> {
        let snap = &self.snapshot;
        let spec = &self.spec;
        let encoded_start = (!spec.start_key.is_empty()).then(|| encode_bytes(&spec.start_key));
        let encoded_end = (!spec.end_key.is_empty()).then(|| encode_bytes(&spec.end_key));
        let after = self.after.as_deref().map(after_all_versions);
        let lower = match (&after, &encoded_start) {
            (Some(k), _) => Bound::Excluded(k.as_slice()),
            (None, Some(s)) => Bound::Included(s.as_slice()),
            (None, None) => Bound::Unbounded,
        };
        // Raw keys are encoded, and no encoding is a prefix of another, so
        // every version of a key below `end` sorts below `encode(end)`.
        let upper = match &encoded_end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        let mut versions = Cursor::new(snap.iter(Cf::Raw, lower, upper, false))?;
        while !batch.full() {
            let Some((mut next, value)) = versions.take()? else {
                self.finished = true;
                break;
            };
            batch.read(&next, &value);
            let ts = version_ts(&next, Cf::Raw)?;
            // The newest version's engine key, less its timestamp, is the
            // encoded user key: no copy needed.
            next.truncate(next.len() - TS_SUFFIX_LEN);
            let kept = keep_versions(
                &mut versions,
                Cf::Raw,
                &next,
                spec.checkpoint,
                Some((ts, value)),
                &mut self.kept,
                batch,
            )?;
            remember(&mut self.after, &next);
            batch.keys += 1;
            let user_key = user_key_of(&next, Cf::Raw)?;
            let mut work = KeyWork {
                encoded: next,
                user_key,
                emitted_through: spec.checkpoint,
                kept,
                versions_done: false,
                lock: None,
            };
            if !emit_key(snap, spec, &mut work, &mut self.kept, batch)? {
                self.current = Some(work);
                break;
            }
        }
        Ok(())
    }
}

/// Consumes every version of `encoded` at the cursor (newest first; the
/// newest may already have been taken, as `first`) into `kept`, keeping
/// those newer than `after` while they fit [`KEPT_VERSIONS`] and
/// [`KEPT_BYTES`]. Returns whether they all did; if not, `kept` is left
/// empty and they are read again from the snapshot.
fn keep_versions(
    cursor: &mut Cursor<'_>,
    cf: Cf,
    encoded: &[u8],
    after: TimeStamp,
    first: Option<Version>,
    kept: &mut Vec<Version>,
    batch: &mut ScanBatch,
) -> Result<bool> {
    kept.clear();
    let mut all = true;
    let mut bytes = 0;
    let mut keep = |ts: TimeStamp, value: Vec<u8>| {
        // Older versions (at or below `after`) are read past, not kept.
        if ts <= after || !all {
            return;
        }
        bytes += value.len();
        if kept.len() >= KEPT_VERSIONS || bytes > KEPT_BYTES {
            kept.clear();
            all = false;
        } else {
            kept.push((ts, value));
        }
    };
    if let Some((ts, value)) = first {
        keep(ts, value);
    }
    while cursor.head_key().is_some_and(|k| version_of(k, encoded)) {
        let Some((k, v)) = cursor.take()? else {
            break;
        };
        batch.read(&k, &v);
        keep(version_ts(&k, cf)?, v);
    }
    Ok(all)
}

/// Emits what is left of `work`. Returns false when the batch filled up
/// first (the rest stays in `work` and `kept`).
fn emit_key(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    kept: &mut Vec<Version>,
    batch: &mut ScanBatch,
) -> Result<bool> {
    if !work.versions_done {
        let done = if work.kept {
            emit_kept(snap, spec, work, kept, batch)?
        } else {
            emit_from_snapshot(snap, spec, work, batch)?
        };
        if !done {
            return Ok(false);
        }
        work.versions_done = true;
    }
    if let Some(lock) = work.lock.take() {
        if spec.filter_loop && is_loop(lock.txn_source) {
            return Ok(true);
        }
        // The PREWRITE is the key's last row.
        let row = prewrite_row(snap, spec, work, &lock, batch)?;
        if let Err(row) = batch.push(row) {
            work.restore_key(*row, true);
            work.lock = Some(lock);
            return Ok(false);
        }
    }
    Ok(true)
}

/// What offering one version to a batch did.
enum Offered {
    /// Emitted or skipped; go on.
    Taken,
    /// Emitted, and the batch is now full.
    Full,
    /// Its row does not fit; the version was not emitted.
    NoRoom,
}

/// Turns version `ts` of `work` (its stored value) into a row and adds it
/// to the batch. `last`: no other row of the key follows it.
fn offer_version(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    (ts, value): Version,
    last: bool,
    batch: &mut ScanBatch,
) -> Result<Offered> {
    let row = match spec.kv_api {
        KvApi::TiDb => txn_version_row(snap, spec, work, ts, &value, last, batch)?,
        KvApi::RawKv => Some(raw_committed_row(raw::decode_version(
            work.row_key(last),
            ts,
            value,
        )?)),
    };
    let Some(row) = row else {
        work.emitted_through = ts;
        return Ok(Offered::Taken);
    };
    if let Err(row) = batch.push(row) {
        work.restore_key(*row, last);
        return Ok(Offered::NoRoom);
    }
    work.emitted_through = ts;
    Ok(if batch.full() {
        Offered::Full
    } else {
        Offered::Taken
    })
}

/// Emits the versions kept from the forward walk, oldest first.
fn emit_kept(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    kept: &mut Vec<Version>,
    batch: &mut ScanBatch,
) -> Result<bool> {
    while let Some(version) = kept.pop() {
        let last = kept.is_empty() && work.lock.is_none();
        match offer_version(snap, spec, work, version, last, batch)? {
            Offered::Taken => {}
            Offered::Full => return Ok(false),
            Offered::NoRoom => {
                // The row is gone with the value it was built from; the
                // next batch reads the rest of the key from the snapshot.
                kept.clear();
                work.kept = false;
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Emits the versions of `work` above `emitted_through` read from the
/// snapshot, oldest first.
fn emit_from_snapshot(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    batch: &mut ScanBatch,
) -> Result<bool> {
    let cf = match spec.kv_api {
        KvApi::TiDb => Cf::Write,
        KvApi::RawKv => Cf::Raw,
    };
    let (lower, upper) = newer_than(&work.encoded, work.emitted_through);
    // Reverse: oldest first.
    for item in snap.iter(cf, Bound::Included(&lower), Bound::Excluded(&upper), true) {
        let (k, v) = item?;
        batch.read(&k, &v);
        let ts = version_ts(&k, cf)?;
        // Whether another version follows is not known here.
        match offer_version(snap, spec, work, (ts, v), false, batch)? {
            Offered::Taken => {}
            Offered::Full | Offered::NoRoom => return Ok(false),
        }
    }
    Ok(true)
}

/// The engine key range holding versions of `encoded` newer than `ts`:
/// versions are suffixed with the inverted timestamp, so newer sorts first
/// and the range is `[suffix(MAX), suffix(ts))`.
fn newer_than(encoded: &[u8], ts: TimeStamp) -> (Vec<u8>, Vec<u8>) {
    let with = |t: TimeStamp| {
        let mut k = Vec::with_capacity(encoded.len() + TS_SUFFIX_LEN);
        k.extend_from_slice(encoded);
        k.extend_from_slice(&(!t.into_inner()).to_be_bytes());
        k
    };
    (with(TimeStamp::MAX), with(ts))
}

/// The COMMITTED row of the write record `record` committed at
/// `commit_ts`; `None` for a record that changes no value (Rollback, Lock)
/// or that the loop filter hides.
fn txn_version_row(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    commit_ts: TimeStamp,
    record: &[u8],
    last: bool,
    batch: &mut ScanBatch,
) -> Result<Option<Row>> {
    let mut write = Write::from_bytes(record)?;
    let op = match write.write_type {
        WriteType::Put => OpType::Put,
        WriteType::Delete => OpType::Delete,
        WriteType::Rollback | WriteType::Lock => return Ok(None),
    };
    if spec.filter_loop && is_loop(write.txn_source) {
        return Ok(None);
    }
    let value = match (op, write.short_value.take()) {
        (OpType::Put, Some(value)) => value,
        (OpType::Put, None) => {
            let value = MvccReader::new(&**snap).load_value(&work.key()?, &write)?;
            batch.read(&[], &value);
            value
        }
        _ => Vec::new(),
    };
    let old_value = if spec.old_value {
        MvccReader::new(&**snap)
            .get(&work.key()?, commit_ts.prev())?
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Some(Row {
        start_ts: write.start_ts.into_inner(),
        commit_ts: commit_ts.into_inner(),
        r#type: LogType::Committed as i32,
        op_type: op as i32,
        key: Bytes::from(work.row_key(last)),
        value: Bytes::from(value),
        old_value: Bytes::from(old_value),
        txn_source: write.txn_source,
        ..Row::default()
    }))
}

fn prewrite_row(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    lock: &Lock,
    batch: &mut ScanBatch,
) -> Result<Row> {
    let key = work.key()?;
    let op = if lock.lock_type == LockType::Delete {
        OpType::Delete
    } else {
        OpType::Put
    };
    let value = match (op, &lock.short_value) {
        (OpType::Put, Some(v)) => v.clone(),
        (OpType::Put, None) => {
            let value = snap
                .get(Cf::Default, &key.append_ts(lock.start_ts))?
                .ok_or_else(|| {
                    Error::corrupt(
                        Cf::Default.name(),
                        format!("value of a lock at {} is missing", lock.start_ts),
                    )
                })?;
            batch.read(&[], &value);
            value
        }
        _ => Vec::new(),
    };
    let old_value = if spec.old_value {
        let read_ts = lock.start_ts.max(lock.for_update_ts).prev();
        MvccReader::new(&**snap)
            .get(&key, read_ts)?
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Row {
        start_ts: lock.start_ts.into_inner(),
        r#type: LogType::Prewrite as i32,
        op_type: op as i32,
        key: Bytes::from(work.row_key(true)),
        value: Bytes::from(value),
        old_value: Bytes::from(old_value),
        txn_source: lock.txn_source,
        ..Row::default()
    })
}

/// Whether a row was written by a change feed (its loop mark is set).
fn is_loop(txn_source: u64) -> bool {
    txn_source & 0xFF != 0
}

/// The user key of `encoded`, which must be exactly one encoding.
fn user_key_of(encoded: &[u8], cf: Cf) -> Result<Vec<u8>> {
    let (user_key, used) = decode_bytes(encoded).map_err(|e| Error::corrupt(cf.name(), e))?;
    if used != encoded.len() {
        return Err(Error::corrupt(
            cf.name(),
            "trailing bytes after an encoded key",
        ));
    }
    Ok(user_key)
}

/// Sets `after` to `key`, reusing its allocation.
fn remember(after: &mut Option<Vec<u8>>, key: &[u8]) {
    match after {
        Some(after) => {
            after.clear();
            after.extend_from_slice(key);
        }
        None => *after = Some(key.to_vec()),
    }
}

/// The engine key just above every version of `encoded` (inverted
/// timestamps never exceed all-ones).
fn after_all_versions(encoded: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(encoded.len() + TS_SUFFIX_LEN);
    k.extend_from_slice(encoded);
    k.extend_from_slice(&[0xFF; TS_SUFFIX_LEN]);
    k
}

/// Whether engine key `versioned` is a version of `encoded`.
fn version_of(versioned: &[u8], encoded: &[u8]) -> bool {
    versioned.len() == encoded.len() + TS_SUFFIX_LEN && versioned.starts_with(encoded)
}

/// The timestamp of a versioned engine key (write or raw family: both end
/// in the inverted timestamp).
fn version_ts(versioned: &[u8], cf: Cf) -> Result<TimeStamp> {
    let suffix = versioned
        .len()
        .checked_sub(TS_SUFFIX_LEN)
        .and_then(|at| versioned.get(at..))
        .and_then(|s| <[u8; TS_SUFFIX_LEN]>::try_from(s).ok())
        .ok_or_else(|| Error::corrupt(cf.name(), "versioned key shorter than its timestamp"))?;
    Ok(TimeStamp::new(!u64::from_be_bytes(suffix)))
}
