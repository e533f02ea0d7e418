//! Reading the Percolator layout out of one engine snapshot.
//!
//! Every method reads a single immutable snapshot, so a command that consults
//! the reader several times sees one consistent state. Nothing here decides
//! transaction rules except [`blocking_lock`], the read-side lock check, which
//! is shared by point reads and scans so both agree on what blocks a reader.
//!
//! Layout reminders: the lock family is keyed by `encode(key)`; the write
//! family by `encode(key) ++ !commit_ts`; the default family by
//! `encode(key) ++ !start_ts`. Because the timestamp is stored inverted, a
//! forward iteration over one key's versions goes from newest to oldest.

use std::ops::Bound;

use super::key::{Key, TS_SUFFIX_LEN, split_versioned};
use super::lock::{Lock, LockInfo, LockType};
use super::write::{Write, WriteType};
use crate::engine::{Cf, Cursor, EngineSnapshot};
use crate::{Error, Result, TimeStamp, versioned};

/// One entry of a transactional read: a key-value pair, or the lock that
/// prevented reading that key.
pub type ScanItem = std::result::Result<(Vec<u8>, Vec<u8>), LockInfo>;

/// What the write family says about transaction `start_ts` on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnCommitRecord {
    /// No record of the transaction. `overlapped_write` is another
    /// transaction's record sitting at `(key, start_ts)` (its commit_ts equals
    /// our start_ts), which a rollback must flag rather than overwrite.
    None {
        /// The record found at `(key, start_ts)`, if any.
        overlapped_write: Option<Write>,
    },
    /// The transaction's own commit or rollback record.
    SingleRecord {
        /// Where the record sits (the start ts for a rollback record).
        commit_ts: TimeStamp,
        /// The record.
        write: Write,
    },
    /// Another transaction's commit at `(key, start_ts)` carries our rollback.
    OverlappedRollback {
        /// The other transaction's commit ts (equal to our start ts).
        commit_ts: TimeStamp,
    },
}

impl TxnCommitRecord {
    /// `(commit_ts, type)` of the record, treating an overlapped rollback as a
    /// rollback.
    pub fn info(&self) -> Option<(TimeStamp, WriteType)> {
        match self {
            TxnCommitRecord::None { .. } => None,
            TxnCommitRecord::SingleRecord { commit_ts, write } => {
                Some((*commit_ts, write.write_type))
            }
            TxnCommitRecord::OverlappedRollback { commit_ts } => {
                Some((*commit_ts, WriteType::Rollback))
            }
        }
    }

    /// The commit_ts if the transaction committed (not rolled back).
    pub fn committed_ts(&self) -> Option<TimeStamp> {
        match self.info() {
            Some((ts, t)) if t != WriteType::Rollback => Some(ts),
            _ => None,
        }
    }
}

/// The lock that blocks a read of `raw_key` at `read_ts`, if any.
///
/// A lock blocks when its transaction may commit at or below the read
/// timestamp: it started at or before `read_ts`, it writes data (`Put` or
/// `Delete`; read locks and pessimistic locks never change the value), its
/// `min_commit_ts` does not already place the commit above `read_ts`, and the
/// caller has not resolved it (`bypass`). A read of the newest value
/// (`read_ts == MAX`) ignores the lock of a primary key, as TiKV does for
/// autocommit point gets — except for async-commit locks, whose primary alone
/// does not decide the outcome.
pub fn blocking_lock(
    lock: &Lock,
    raw_key: &[u8],
    read_ts: TimeStamp,
    bypass: &[TimeStamp],
) -> Option<LockInfo> {
    if lock.start_ts > read_ts || matches!(lock.lock_type, LockType::Lock | LockType::Pessimistic) {
        return None;
    }
    if read_ts == TimeStamp::MAX && raw_key == lock.primary.as_slice() && !lock.use_async_commit {
        return None;
    }
    if bypass.contains(&lock.start_ts) || lock.min_commit_ts > read_ts {
        return None;
    }
    Some(lock.to_lock_info(raw_key.to_vec()))
}

/// Reads MVCC records from one snapshot.
pub struct MvccReader<'a> {
    snap: &'a dyn EngineSnapshot,
}

impl<'a> MvccReader<'a> {
    /// A reader over `snap`.
    pub fn new(snap: &'a dyn EngineSnapshot) -> Self {
        MvccReader { snap }
    }

    /// The underlying snapshot.
    pub fn snapshot(&self) -> &'a dyn EngineSnapshot {
        self.snap
    }

    /// The lock on `key`, if any.
    pub fn load_lock(&self, key: &Key) -> Result<Option<Lock>> {
        self.snap
            .get(Cf::Lock, key.as_encoded())?
            .map(|b| Lock::from_bytes(&b))
            .transpose()
    }

    /// The write record at exactly `(key, commit_ts)`.
    pub fn write_at(&self, key: &Key, commit_ts: TimeStamp) -> Result<Option<Write>> {
        self.snap
            .get(Cf::Write, &key.append_ts(commit_ts))?
            .map(|b| Write::from_bytes(&b))
            .transpose()
    }

    /// Versions of `key` with `commit_ts <= ts`, newest first.
    fn versions(&self, key: &Key, ts: TimeStamp) -> (Vec<u8>, Vec<u8>) {
        (key.append_ts(ts), key.append_ts(TimeStamp::ZERO))
    }

    /// Iterates `(commit_ts, write)` of `key` from `from` down to `down_to`
    /// (both inclusive), newest first.
    fn walk_writes<F>(&self, key: &Key, from: TimeStamp, down_to: TimeStamp, mut f: F) -> Result<()>
    where
        F: FnMut(TimeStamp, Write) -> Result<bool>,
    {
        if from < down_to {
            return Ok(());
        }
        let (lower, upper) = (key.append_ts(from), key.append_ts(down_to));
        for item in self.snap.iter(
            Cf::Write,
            Bound::Included(&lower),
            Bound::Included(&upper),
            false,
        ) {
            let (k, v) = item?;
            let (_, commit_ts) = split_versioned(&k, Cf::Write)?;
            if !f(commit_ts, Write::from_bytes(&v)?)? {
                break;
            }
        }
        Ok(())
    }

    /// The newest write record of any type with `commit_ts <= ts`.
    pub fn seek_write(&self, key: &Key, ts: TimeStamp) -> Result<Option<(TimeStamp, Write)>> {
        let (lower, upper) = self.versions(key, ts);
        let mut iter = self.snap.iter(
            Cf::Write,
            Bound::Included(&lower),
            Bound::Included(&upper),
            false,
        );
        match iter.next().transpose()? {
            Some((k, v)) => {
                let (_, commit_ts) = split_versioned(&k, Cf::Write)?;
                Ok(Some((commit_ts, Write::from_bytes(&v)?)))
            }
            None => Ok(None),
        }
    }

    /// The newest data record (`Put` or `Delete`) with `commit_ts <= ts`,
    /// skipping `Lock` and `Rollback` records.
    pub fn get_write(&self, key: &Key, ts: TimeStamp) -> Result<Option<(TimeStamp, Write)>> {
        let mut found = None;
        self.walk_writes(key, ts, TimeStamp::ZERO, |commit_ts, write| {
            if write.write_type.is_data() {
                found = Some((commit_ts, write));
                return Ok(false);
            }
            Ok(true)
        })?;
        Ok(found)
    }

    /// The value committed by `write` (a `Put`): inline, or from the default
    /// family. A missing default-family value is corruption: GC deletes the
    /// value only together with its write record.
    pub fn load_value(&self, key: &Key, write: &Write) -> Result<Vec<u8>> {
        if let Some(v) = &write.short_value {
            return Ok(v.clone());
        }
        self.snap
            .get(Cf::Default, &key.append_ts(write.start_ts))?
            .ok_or_else(|| {
                Error::corrupt(
                    "default",
                    format!("value of {key:?} written at {} is missing", write.start_ts),
                )
            })
    }

    /// The value of `key` visible at `ts`, ignoring locks.
    pub fn get(&self, key: &Key, ts: TimeStamp) -> Result<Option<Vec<u8>>> {
        Ok(self.get_versioned(key, ts)?.map(|(_, value)| value))
    }

    /// The value of `key` visible at `ts` with the commit_ts that wrote it,
    /// ignoring locks.
    pub fn get_versioned(&self, key: &Key, ts: TimeStamp) -> Result<Option<(TimeStamp, Vec<u8>)>> {
        match self.get_write(key, ts)? {
            Some((commit_ts, w)) if w.write_type == WriteType::Put => {
                Ok(Some((commit_ts, self.load_value(key, &w)?)))
            }
            _ => Ok(None),
        }
    }

    /// Whether a `Put` is the newest data version of `key` at `ts`.
    pub fn key_exists(&self, key: &Key, ts: TimeStamp) -> Result<bool> {
        Ok(matches!(self.get_write(key, ts)?, Some((_, w)) if w.write_type == WriteType::Put))
    }

    /// Whether transaction `start_ts` has been rolled back on `key`: a
    /// rollback record at `(key, start_ts)`, or another transaction's commit
    /// there flagged with an overlapped rollback.
    pub fn rolled_back(&self, key: &Key, start_ts: TimeStamp) -> Result<bool> {
        Ok(match self.write_at(key, start_ts)? {
            Some(w) => {
                w.has_overlapped_rollback
                    || (w.write_type == WriteType::Rollback && w.start_ts == start_ts)
            }
            None => false,
        })
    }

    /// Finds the commit or rollback record of transaction `start_ts`. Its
    /// commit_ts is at least `start_ts`, so only versions at or above
    /// `start_ts` are examined.
    pub fn get_txn_commit_record(&self, key: &Key, start_ts: TimeStamp) -> Result<TxnCommitRecord> {
        let mut result = TxnCommitRecord::None {
            overlapped_write: None,
        };
        self.walk_writes(key, TimeStamp::MAX, start_ts, |commit_ts, write| {
            if write.start_ts == start_ts {
                result = TxnCommitRecord::SingleRecord { commit_ts, write };
                return Ok(false);
            }
            if commit_ts == start_ts {
                result = if write.has_overlapped_rollback {
                    TxnCommitRecord::OverlappedRollback { commit_ts }
                } else {
                    TxnCommitRecord::None {
                        overlapped_write: Some(write),
                    }
                };
            }
            Ok(true)
        })?;
        Ok(result)
    }

    /// The oldest start_ts of a lock that writes data (Put or Delete)
    /// anywhere in the snapshot, for the store-wide safe ts: read and
    /// pessimistic locks never commit a row, so they bound nothing. Walks
    /// every lock, holding one at a time.
    pub fn oldest_data_lock_ts(&self) -> Result<Option<TimeStamp>> {
        let mut oldest: Option<TimeStamp> = None;
        for item in self
            .snap
            .iter(Cf::Lock, Bound::Unbounded, Bound::Unbounded, false)
        {
            let (_, v) = item?;
            let lock = Lock::from_bytes(&v)?;
            if matches!(lock.lock_type, LockType::Put | LockType::Delete) {
                oldest = Some(oldest.map_or(lock.start_ts, |o| o.min(lock.start_ts)));
            }
        }
        Ok(oldest)
    }

    /// Locks with encoded keys in `[start, end)` (`end == None`: unbounded)
    /// accepted by `filter`, in key order. `limit == 0` means no limit.
    /// Returns the locks and whether the scan stopped because of the limit.
    pub fn scan_locks<F>(
        &self,
        start: &Key,
        end: Option<&Key>,
        filter: F,
        limit: usize,
    ) -> Result<(Vec<(Key, Lock)>, bool)>
    where
        F: Fn(&Lock) -> bool,
    {
        let upper = match end {
            Some(e) => Bound::Excluded(e.as_encoded()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self
            .snap
            .iter(Cf::Lock, Bound::Included(start.as_encoded()), upper, false)
        {
            let (k, v) = item?;
            let lock = Lock::from_bytes(&v)?;
            if !filter(&lock) {
                continue;
            }
            if limit != 0 && out.len() == limit {
                return Ok((out, true));
            }
            let key = Key::from_encoded(k).map_err(|e| Error::corrupt("lock", e))?;
            out.push((key, lock));
        }
        Ok((out, false))
    }

    /// Encoded user keys that have write records in `[start, end)`, starting
    /// at `start`, at most `limit` of them (for GC). Returns the keys and
    /// whether more may follow.
    pub fn scan_write_keys(
        &self,
        start: &Key,
        end: Option<&Key>,
        limit: usize,
    ) -> Result<(Vec<Key>, bool)> {
        let upper = match end {
            Some(e) => Bound::Excluded(e.as_encoded()),
            None => Bound::Unbounded,
        };
        let mut out: Vec<Key> = Vec::new();
        for item in self
            .snap
            .iter(Cf::Write, Bound::Included(start.as_encoded()), upper, false)
        {
            let (k, _) = item?;
            if out.last().is_some_and(|last| last.is_prefix_of(&k)) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(split_versioned(&k, Cf::Write)?.0);
        }
        Ok((out, false))
    }

    /// Transactional range read at `ts` over raw keys `[start, end)` (`end`
    /// empty: unbounded), ascending or (with `reverse`) descending, at most
    /// `limit` entries. A key whose lock blocks the read yields `Err(lock)`
    /// and counts toward the limit, as in TiKV, so the client can resolve it
    /// and retry from there.
    ///
    /// The write family is read first, up to the `limit`-th key with a
    /// visible value; only then is the lock family read, and only up to
    /// that key. Reading both side by side would be simpler, but the lock
    /// family of a range whose transactions have ended is all deletion
    /// markers, and finding the next live lock means stepping over every
    /// one of them, to the end of the range when there is none: a client
    /// paging through a large range would pay that on every page. Bounded
    /// by the page's last key, the lock walk costs what the page covers.
    pub fn scan(&self, opts: &ScanOptions<'_>) -> Result<Vec<ScanItem>> {
        if opts.limit == 0 {
            return Ok(Vec::new());
        }
        let start = Key::from_raw(opts.start);
        let end = (!opts.end.is_empty()).then(|| Key::from_raw(opts.end));
        let (visible, last) = self.visible_puts(&start, end.as_ref(), opts)?;
        // The lock walk covers what the page covers: up to its last key, or
        // the rest of the range when the write family ran out first.
        let (lock_lower, lock_upper) = match (&last, opts.reverse) {
            (Some(last), false) => (
                Bound::Included(start.as_encoded()),
                Bound::Included(last.as_slice()),
            ),
            (Some(last), true) => (Bound::Included(last.as_slice()), upper_bound(end.as_ref())),
            (None, _) => (
                Bound::Included(start.as_encoded()),
                upper_bound(end.as_ref()),
            ),
        };
        let mut locks =
            Cursor::new(
                self.snap
                    .iter(Cf::Lock, lock_lower, lock_upper, opts.reverse),
            )?;
        let mut visible = visible.into_iter().peekable();
        let mut out = Vec::new();
        let mut budget = opts.max_bytes;
        // Merge in scan order: a key either side may come first.
        let before = |a: &[u8], b: &[u8]| (a < b) != opts.reverse;
        while out.len() < opts.limit {
            let lock_key = locks.head_key();
            let put_key = visible.peek().map(|(k, _)| k.as_encoded());
            let take_lock = match (lock_key, put_key) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(l), Some(p)) => l == p || before(l, p),
            };
            if !take_lock {
                if let Some((key, write)) = visible.next() {
                    let entry = self.entry(key, &write, opts.key_only)?;
                    crate::take_answer_budget(&mut budget, entry.0.len() + entry.1.len())?;
                    out.push(Ok(entry));
                }
                continue;
            }
            let Some((lock_key, lock)) = locks.take()? else {
                break;
            };
            let put = visible.next_if(|(k, _)| k.as_encoded() == lock_key.as_slice());
            let key = Key::from_encoded(lock_key).map_err(|e| Error::corrupt("lock", e))?;
            let raw = key.to_raw()?;
            if let Some(info) = blocking_lock(&Lock::from_bytes(&lock)?, &raw, opts.ts, opts.bypass)
            {
                out.push(Err(info));
            } else if let Some((key, write)) = put {
                let entry = self.entry(key, &write, opts.key_only)?;
                crate::take_answer_budget(&mut budget, entry.0.len() + entry.1.len())?;
                out.push(Ok(entry));
            }
        }
        Ok(out)
    }

    /// The keys of the range whose newest data version at `opts.ts` is a
    /// Put, in scan order, with that version, up to `opts.limit` of them;
    /// and the last key the walk covered when it stopped at the limit
    /// (`None`: the range ran out).
    fn visible_puts(
        &self,
        start: &Key,
        end: Option<&Key>,
        opts: &ScanOptions<'_>,
    ) -> Result<VisiblePuts> {
        let mut writes = Cursor::new(self.snap.iter(
            Cf::Write,
            Bound::Included(start.as_encoded()),
            upper_bound(end),
            opts.reverse,
        ))?;
        let mut out = Vec::new();
        while let Some(encoded) = writes.head_key_prefix(TS_SUFFIX_LEN, Cf::Write)? {
            if out.len() == opts.limit {
                // Everything up to the last kept key is read; the lock walk
                // stops there.
                let last = out
                    .last()
                    .map(|(k, _): &(Key, Write)| k.as_encoded().to_vec());
                return Ok((out, last));
            }
            let key =
                Key::from_encoded(encoded.to_vec()).map_err(|e| Error::corrupt("write", e))?;
            // Consume every version of this key; pick the newest data version
            // visible at `ts`. Forward, versions arrive newest first; in
            // reverse, oldest first, so the last match wins.
            let mut visible: Option<Write> = None;
            let mut passed = 0;
            while let Some((k, v)) = writes.head()
                && key.is_prefix_of(k)
            {
                if visible.is_some() && !opts.reverse {
                    passed += 1;
                    if passed > versioned::STEPS_BEFORE_SEEK {
                        // A long history below the visible version: one
                        // seek past it is cheaper than stepping through.
                        let after = versioned::after_versions(key.as_encoded());
                        writes = Cursor::new(self.snap.iter(
                            Cf::Write,
                            Bound::Excluded(&after),
                            upper_bound(end),
                            false,
                        ))?;
                        break;
                    }
                }
                if opts.reverse || visible.is_none() {
                    let (_, commit_ts) = versioned::split(k, Cf::Write)?;
                    if commit_ts <= opts.ts {
                        let w = Write::from_bytes(v)?;
                        if w.write_type.is_data() {
                            visible = Some(w);
                        }
                    }
                }
                writes.advance()?;
            }
            if let Some(w) = visible.filter(|w| w.write_type == WriteType::Put) {
                out.push((key, w));
            }
        }
        Ok((out, None))
    }

    /// A scan entry: the user key and, unless `key_only`, its value.
    fn entry(&self, key: Key, write: &Write, key_only: bool) -> Result<(Vec<u8>, Vec<u8>)> {
        let value = if key_only {
            Vec::new()
        } else {
            self.load_value(&key, write)?
        };
        Ok((key.to_raw()?, value))
    }
}

/// The keys of a scan page whose visible version is a Put, with it, and
/// the last key the page covers when it is full (see
/// `MvccReader::visible_puts`).
type VisiblePuts = (Vec<(Key, Write)>, Option<Vec<u8>>);

/// The exclusive upper bound of a range whose end is `end` (`None`: no end).
fn upper_bound(end: Option<&Key>) -> Bound<&[u8]> {
    match end {
        Some(e) => Bound::Excluded(e.as_encoded()),
        None => Bound::Unbounded,
    }
}

/// Parameters of [`MvccReader::scan`].
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions<'a> {
    /// Inclusive lower bound (raw user key; empty = from the beginning).
    pub start: &'a [u8],
    /// Exclusive upper bound (raw user key; empty = to the end).
    pub end: &'a [u8],
    /// The read timestamp: sees versions committed at or below it.
    pub ts: TimeStamp,
    /// At most this many pairs are returned.
    pub limit: usize,
    /// Return keys with empty values, without reading the values.
    pub key_only: bool,
    /// Walk from `end` down to `start` instead of upwards.
    pub reverse: bool,
    /// Start timestamps of transactions whose locks the caller has resolved
    /// (kvrpcpb `Context.resolved_locks`).
    pub bypass: &'a [TimeStamp],
    /// The most bytes (keys plus values) the answer may hold; a scan that
    /// would exceed it is refused (`InvalidInput`). `usize::MAX`: no limit.
    pub max_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(lock_type: LockType, start: u64, min_commit: u64, primary: &[u8]) -> Lock {
        let mut l = Lock::new(lock_type, primary.to_vec(), TimeStamp::new(start), 100);
        l.min_commit_ts = TimeStamp::new(min_commit);
        l
    }

    #[test]
    fn blocking_lock_rules() {
        let max = TimeStamp::MAX.into_inner();
        // (lock type, lock start, min_commit_ts, primary, read ts, bypass, blocks)
        type Case<'a> = (LockType, u64, u64, &'a [u8], u64, &'a [u64], bool);
        let table: &[Case<'_>] = &[
            (LockType::Put, 10, 0, b"p", 10, &[], true),
            (LockType::Delete, 10, 0, b"p", 20, &[], true),
            (LockType::Put, 10, 0, b"p", 9, &[], false),
            (LockType::Lock, 10, 0, b"p", 20, &[], false),
            (LockType::Pessimistic, 10, 0, b"p", 20, &[], false),
            (LockType::Put, 10, 21, b"p", 20, &[], false),
            (LockType::Put, 10, 20, b"p", 20, &[], true),
            (LockType::Put, 10, 0, b"p", 20, &[10], false),
            (LockType::Put, 10, 0, b"p", 20, &[11], true),
            (LockType::Put, 10, 0, b"k", max, &[], false),
            (LockType::Put, 10, 0, b"other", max, &[], true),
        ];
        for &(t, start, min_commit, primary, read, bypass, blocks) in table {
            let l = lock(t, start, min_commit, primary);
            let bypass: Vec<TimeStamp> = bypass.iter().map(|&b| TimeStamp::new(b)).collect();
            let got = blocking_lock(&l, b"k", TimeStamp::new(read), &bypass);
            assert_eq!(
                got.is_some(),
                blocks,
                "{t:?} start={start} min_commit={min_commit} read={read}"
            );
        }
        // An async-commit primary blocks even a read of the latest value.
        let mut l = lock(LockType::Put, 10, 0, b"k");
        l.use_async_commit = true;
        assert!(blocking_lock(&l, b"k", TimeStamp::MAX, &[]).is_some());
    }
}

#[cfg(test)]
mod oldest_lock_tests {
    use super::*;
    use crate::engine::memory::MemoryEngine;
    use crate::engine::{Engine, WriteBatch};

    #[test]
    fn only_locks_that_write_data_bound_the_oldest() {
        let engine = MemoryEngine::new();
        let snap = engine.snapshot();
        assert_eq!(MvccReader::new(&*snap).oldest_data_lock_ts().unwrap(), None);

        // Read and pessimistic locks never commit a row, however old.
        let mut batch = WriteBatch::new();
        for (key, lock_type, start) in [
            (b"a", LockType::Lock, 5),
            (b"b", LockType::Pessimistic, 6),
            (b"c", LockType::Put, 30),
            (b"d", LockType::Delete, 20),
            (b"e", LockType::Put, 40),
        ] {
            let lock = Lock::new(lock_type, b"a".to_vec(), TimeStamp::new(start), 100);
            batch.put(
                Cf::Lock,
                Key::from_raw(key).as_encoded().to_vec(),
                lock.to_bytes(),
            );
        }
        engine.write(&batch).unwrap();
        let snap = engine.snapshot();
        assert_eq!(
            MvccReader::new(&*snap).oldest_data_lock_ts().unwrap(),
            Some(TimeStamp::new(20))
        );
    }
}
