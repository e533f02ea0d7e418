//! Reading one catch-up snapshot in bounded batches.
//!
//! A [`Scanner`] runs storage's delta scan over a store snapshot of its
//! subscription's range and turns it into rows,
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
//!   history: storage's delta scan (`kvfeed_storage::delta`) hands over a
//!   key's versions newer than the checkpoint only while they fit
//!   [`KEPT`]; a longer history is read again oldest first, one version at
//!   a time.
//!
//! # Cost
//!
//! The delta scan's forward walk is the whole read in the common case:
//! every version is read once, nothing is searched per key, and the lock
//! family's deletion markers are stepped over once for the whole scan, not
//! once per batch (see the delta module's docs for why that matters). A
//! stored value moves into its row; the user key is decoded once per key.
//!
//! # Resuming
//!
//! Between batches the delta scanner keeps positions, not iterators, so
//! nothing borrows the snapshot while the scan waits and each batch may
//! run on any blocking thread. This module keeps the key it stopped in
//! (its kept versions and the last version emitted): a batch that stops
//! inside a key resumes after that version, and a row that did not fit is
//! simply read again from the snapshot.
//!
//! Storage failures (an engine error, an undecodable record, a large value
//! missing from the default family) end the scan with the error: the
//! owner fails the subscription rather than deliver a partial history.

use bytes::Bytes;
use kvfeed_proto::cdcpb::event::{LogType, Row, row::OpType};
use kvfeed_storage::delta::{self, DeltaScanner, DeltaSpec, KeepLimits, KeyDelta, KeySpace};
use kvfeed_storage::engine::Cf;
use kvfeed_storage::mvcc::{Key, Lock, LockType, MvccReader, Write, WriteType};
use kvfeed_storage::raw;
use kvfeed_storage::store::{SeqNo, Snapshot};
use kvfeed_storage::{Error, Result, TimeStamp};
use prost::Message;

use crate::ids::KvApi;
use crate::owner::{is_loop, prewrite_old_value_ts, prewrite_row, raw_committed_row};
use crate::subscription::SubscriptionSpec;

use crate::{SCAN_BATCH_MAX_BYTES as SCAN_BATCH_BYTES, SCAN_BATCH_MAX_ROWS as SCAN_BATCH_ROWS};
/// Most user keys one batch visits.
const SCAN_BATCH_KEYS: usize = 1024;
/// Most bytes one batch reads from the store before it stops.
const SCAN_READ_BYTES: usize = 4 << 20;
/// Most versions and bytes of stored values of one key kept from the
/// forward walk.
const KEPT: KeepLimits = KeepLimits {
    versions: SCAN_BATCH_ROWS,
    bytes: SCAN_BATCH_BYTES,
};

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

    /// The storage delta scan this reads.
    fn delta(&self) -> DeltaSpec {
        match self.kv_api {
            KvApi::TiDb => DeltaSpec::txn(
                self.start_key.clone(),
                self.end_key.clone(),
                self.checkpoint,
            ),
            KvApi::RawKv => DeltaSpec::raw(&self.start_key, &self.end_key, self.checkpoint),
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

use kvfeed_storage::delta::Version;

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
    delta: DeltaScanner,
    spec: ScanSpec,
    current: Option<KeyWork>,
    /// The versions of `current` kept from the forward walk, newest first
    /// (the next to emit is last); meaningful while `current.kept`.
    kept: Vec<Version>,
}

impl Scanner {
    pub(crate) fn new(snapshot: Snapshot, spec: ScanSpec) -> Scanner {
        Scanner {
            delta: DeltaScanner::new(snapshot, spec.delta()),
            spec,
            current: None,
            kept: Vec::new(),
        }
    }

    /// The apply sequence the snapshot reflects.
    pub(crate) fn seq(&self) -> SeqNo {
        self.delta.seq()
    }

    /// Reads the next batch. After a batch with `finished`, every later
    /// batch is empty and finished too.
    pub(crate) fn next_batch(&mut self) -> Result<ScanBatch> {
        let mut batch = ScanBatch::default();
        if let Some(mut work) = self.current.take()
            && !emit_key(
                self.delta.snapshot(),
                &self.spec,
                &mut work,
                &mut self.kept,
                &mut batch,
            )?
        {
            self.current = Some(work);
            return Ok(batch);
        }
        if !self.delta.is_finished() {
            self.discover(&mut batch)?;
        }
        batch.finished = self.delta.is_finished();
        Ok(batch)
    }

    /// Walks the keys not yet reported, emitting each, until the batch is
    /// full or the range ends.
    fn discover(&mut self, batch: &mut ScanBatch) -> Result<()> {
        let spec = &self.spec;
        let mut walk = self.delta.walk()?;
        let snap = walk.snapshot();
        while !batch.full() {
            let Some(found) = walk.next_key(&mut self.kept, KEPT)? else {
                break;
            };
            batch.read_bytes += found.read_bytes;
            batch.keys += 1;
            let mut work = key_work(spec, found, batch)?;
            if !emit_key(snap, spec, &mut work, &mut self.kept, batch)? {
                self.current = Some(work);
                break;
            }
        }
        Ok(())
    }
}

/// The work of a key the walk found; a Put/Delete lock is reported to the
/// owner (loop filter or not: resolved ts must wait for it either way).
fn key_work(spec: &ScanSpec, found: KeyDelta, batch: &mut ScanBatch) -> Result<KeyWork> {
    let user_key = found.user_key()?;
    let lock = found
        .lock
        .filter(|l| matches!(l.lock_type, LockType::Put | LockType::Delete));
    if let Some(l) = &lock {
        batch.locks.push((found.encoded.clone(), l.start_ts));
    }
    Ok(KeyWork {
        encoded: found.encoded,
        user_key,
        emitted_through: spec.checkpoint,
        kept: found.complete,
        versions_done: false,
        lock,
    })
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
        let Some(row) = scanned_prewrite_row(snap, spec, work, &lock, batch)? else {
            return Ok(true);
        };
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
    let space = match spec.kv_api {
        KvApi::TiDb => KeySpace::Txn,
        KvApi::RawKv => KeySpace::Raw,
    };
    let versions = delta::versions_oldest_first(snap, space, &work.encoded, work.emitted_through);
    for version in versions {
        let (ts, value) = version?;
        batch.read(&work.encoded, &value);
        // Whether another version follows is not known here.
        match offer_version(snap, spec, work, (ts, value), false, batch)? {
            Offered::Taken => {}
            Offered::Full | Offered::NoRoom => return Ok(false),
        }
    }
    Ok(true)
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

/// The PREWRITE row of the lock found on `work`'s key, with its value
/// (inline, or from the default family) and, when asked, its old value.
fn scanned_prewrite_row(
    snap: &Snapshot,
    spec: &ScanSpec,
    work: &mut KeyWork,
    lock: &Lock,
    batch: &mut ScanBatch,
) -> Result<Option<Row>> {
    let key = work.key()?;
    let value = match (lock.lock_type, &lock.short_value) {
        (LockType::Put, Some(v)) => v.clone(),
        (LockType::Put, None) => {
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
        MvccReader::new(&**snap)
            .get(&key, prewrite_old_value_ts(lock))?
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let row = prewrite_row(Bytes::from(work.row_key(true)), lock, Bytes::from(value));
    Ok(row.map(|row| Row {
        old_value: Bytes::from(old_value),
        ..row
    }))
}
