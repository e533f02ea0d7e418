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
//!   history: a key's versions are read oldest first with a reverse
//!   iterator bounded by the checkpoint, never collected.
//!
//! # Resuming
//!
//! Between batches the scanner keeps positions (engine keys and the last
//! version emitted), not iterators, so nothing borrows the snapshot while
//! the scan waits and each batch may run on any blocking thread. A batch
//! that stops inside a key resumes after the last version it emitted; a row
//! that did not fit is simply read again.
//!
//! Storage failures (an engine error, an undecodable record, a large value
//! missing from the default family) end the scan with the error: the
//! owner fails the subscription rather than deliver a partial history.

use std::ops::Bound;

use kvfeed_proto::cdcpb::event::{LogType, Row, row::OpType};
use kvfeed_storage::engine::{Cf, EngineIter, Mutation, Op};
use kvfeed_storage::mvcc::key::{TS_SUFFIX_LEN, split_versioned};
use kvfeed_storage::mvcc::{
    Key, Lock, LockType, MvccReader, Write, WriteType, decode_bytes, encode_bytes,
};
use kvfeed_storage::raw;
use kvfeed_storage::store::{SeqNo, Snapshot};
use kvfeed_storage::{Error, Result, TimeStamp};
use prost::Message;

use crate::ids::KvApi;
use crate::owner::raw_row;
use crate::subscription::SubscriptionSpec;

use crate::{SCAN_BATCH_MAX_BYTES as SCAN_BATCH_BYTES, SCAN_BATCH_MAX_ROWS as SCAN_BATCH_ROWS};
/// Most user keys one batch visits.
const SCAN_BATCH_KEYS: usize = 1024;
/// Most bytes one batch reads from the store before it stops.
const SCAN_READ_BYTES: usize = 4 << 20;

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

    /// Adds `row` if it fits; returns whether it did.
    fn push(&mut self, row: Row) -> bool {
        let len = row.encoded_len();
        if !self.fits(len) {
            return false;
        }
        self.row_bytes += len;
        self.rows.push(row);
        true
    }

    fn read(&mut self, key: &[u8], value: &[u8]) {
        self.read_bytes += key.len() + value.len();
    }
}

/// A key whose rows are not all emitted yet.
#[derive(Debug)]
struct KeyWork {
    /// The engine's encoding of the user key.
    encoded: Vec<u8>,
    user_key: Vec<u8>,
    /// Every version at or below this was emitted (or skipped).
    emitted_through: TimeStamp,
    versions_done: bool,
    /// The PREWRITE still to emit.
    lock: Option<Lock>,
}

/// A catch-up scan over one snapshot; see the module docs.
pub(crate) struct Scanner {
    snapshot: Snapshot,
    spec: ScanSpec,
    /// The last key discovered; discovery resumes after it.
    after: Option<Vec<u8>>,
    current: Option<KeyWork>,
    finished: bool,
}

impl Scanner {
    pub(crate) fn new(snapshot: Snapshot, spec: ScanSpec) -> Scanner {
        Scanner {
            snapshot,
            spec,
            after: None,
            current: None,
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
            && !emit_key(&self.snapshot, &self.spec, &mut work, &mut batch)?
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
            let lock_key = locks.head.as_ref().map(|(k, _)| k.as_slice());
            let write_key = writes
                .user_key(Cf::Write)?
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
            if let Some((k, v)) = &locks.head
                && *k == next
            {
                batch.read(k, v);
                lock = Some(Lock::from_bytes(v)?);
                locks.advance()?;
            }
            while let Some((k, v)) = &writes.head
                && version_of(k, &next)
            {
                batch.read(k, v);
                writes.advance()?;
            }
            self.after = Some(next.clone());
            if next.as_slice() < start {
                // Only a key that is a proper prefix of `start` gets here.
                continue;
            }
            batch.keys += 1;
            let lock = lock.filter(|l| matches!(l.lock_type, LockType::Put | LockType::Delete));
            if let Some(l) = &lock {
                batch.locks.push((next.clone(), l.start_ts));
            }
            let user_key = Key::from_encoded(next.clone())?.to_raw()?;
            let mut work = KeyWork {
                encoded: next,
                user_key,
                emitted_through: spec.checkpoint,
                versions_done: false,
                lock,
            };
            if !emit_key(snap, spec, &mut work, batch)? {
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
            let Some(next) = versions.user_key(Cf::Raw)?.map(<[u8]>::to_vec) else {
                self.finished = true;
                break;
            };
            while let Some((k, v)) = &versions.head
                && version_of(k, &next)
            {
                batch.read(k, v);
                versions.advance()?;
            }
            self.after = Some(next.clone());
            batch.keys += 1;
            let (user_key, used) =
                decode_bytes(&next).map_err(|e| Error::corrupt(Cf::Raw.name(), e))?;
            if used != next.len() {
                return Err(Error::corrupt(
                    Cf::Raw.name(),
                    "trailing bytes after a raw key",
                ));
            }
            let mut work = KeyWork {
                encoded: next,
                user_key,
                emitted_through: spec.checkpoint,
                versions_done: false,
                lock: None,
            };
            if !emit_key(snap, spec, &mut work, batch)? {
                self.current = Some(work);
                break;
            }
        }
        Ok(())
    }
}

/// Emits what is left of `work`. Returns false when the batch filled up
/// first (the rest stays in `work`).
fn emit_key(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    batch: &mut ScanBatch,
) -> Result<bool> {
    if !work.versions_done {
        let done = match spec.kv_api {
            KvApi::TiDb => emit_txn_versions(snap, spec, work, batch)?,
            KvApi::RawKv => emit_raw_versions(snap, work, batch)?,
        };
        if !done {
            return Ok(false);
        }
        work.versions_done = true;
    }
    if let Some(lock) = &work.lock {
        if spec.filter_loop && is_loop(lock.txn_source) {
            work.lock = None;
            return Ok(true);
        }
        let row = prewrite_row(snap, spec, work, lock, batch)?;
        if !batch.push(row) {
            return Ok(false);
        }
        work.lock = None;
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

fn emit_txn_versions(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    batch: &mut ScanBatch,
) -> Result<bool> {
    let (lower, upper) = newer_than(&work.encoded, work.emitted_through);
    let key = Key::from_encoded(work.encoded.clone())?;
    // Reverse: oldest first.
    for item in snap.iter(
        Cf::Write,
        Bound::Included(&lower),
        Bound::Excluded(&upper),
        true,
    ) {
        let (k, v) = item?;
        batch.read(&k, &v);
        let (_, commit_ts) = split_versioned(&k, "write")?;
        let write = Write::from_bytes(&v)?;
        let op = match write.write_type {
            WriteType::Put => OpType::Put,
            WriteType::Delete => OpType::Delete,
            WriteType::Rollback | WriteType::Lock => {
                work.emitted_through = commit_ts;
                continue;
            }
        };
        if spec.filter_loop && is_loop(write.txn_source) {
            work.emitted_through = commit_ts;
            continue;
        }
        let reader = MvccReader::new(&**snap);
        let value = if op == OpType::Put {
            let value = reader.load_value(&key, &write)?;
            if write.short_value.is_none() {
                batch.read(&[], &value);
            }
            value
        } else {
            Vec::new()
        };
        let old_value = if spec.old_value {
            reader.get(&key, commit_ts.prev())?.unwrap_or_default()
        } else {
            Vec::new()
        };
        let row = Row {
            start_ts: write.start_ts.into_inner(),
            commit_ts: commit_ts.into_inner(),
            r#type: LogType::Committed as i32,
            op_type: op as i32,
            key: work.user_key.clone(),
            value,
            old_value,
            txn_source: write.txn_source,
            ..Row::default()
        };
        if !batch.push(row) {
            return Ok(false);
        }
        work.emitted_through = commit_ts;
        if batch.full() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn emit_raw_versions(snap: &Snapshot, work: &mut KeyWork, batch: &mut ScanBatch) -> Result<bool> {
    let (lower, upper) = newer_than(&work.encoded, work.emitted_through);
    for item in snap.iter(
        Cf::Raw,
        Bound::Included(&lower),
        Bound::Excluded(&upper),
        true,
    ) {
        let (k, v) = item?;
        batch.read(&k, &v);
        let mutation = Mutation {
            cf: Cf::Raw,
            key: k,
            op: Op::Put(v),
        };
        let Some(change) = raw::decode_change(&mutation)? else {
            continue;
        };
        let ts = change.ts;
        if !batch.push(raw_row(&change).row) {
            return Ok(false);
        }
        work.emitted_through = ts;
        if batch.full() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn prewrite_row(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &KeyWork,
    lock: &Lock,
    batch: &mut ScanBatch,
) -> Result<Row> {
    let key = Key::from_encoded(work.encoded.clone())?;
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
        key: work.user_key.clone(),
        value,
        old_value,
        txn_source: lock.txn_source,
        ..Row::default()
    })
}

/// Whether a row was written by a change feed (its loop mark is set).
fn is_loop(txn_source: u64) -> bool {
    txn_source & 0xFF != 0
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

/// A one-item lookahead over an engine iterator.
struct Cursor<'a> {
    iter: EngineIter<'a>,
    head: Option<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Cursor<'a> {
    fn new(mut iter: EngineIter<'a>) -> Result<Self> {
        let head = iter.next().transpose()?;
        Ok(Cursor { iter, head })
    }

    fn advance(&mut self) -> Result<()> {
        self.head = self.iter.next().transpose()?;
        Ok(())
    }

    /// The user-key part of a versioned head key read from `cf`.
    fn user_key(&self, cf: Cf) -> Result<Option<&[u8]>> {
        match &self.head {
            None => Ok(None),
            Some((k, _)) => match k.len().checked_sub(TS_SUFFIX_LEN) {
                Some(n) => Ok(k.get(..n)),
                None => Err(Error::corrupt(
                    cf.name(),
                    "versioned key shorter than its timestamp",
                )),
            },
        }
    }
}
