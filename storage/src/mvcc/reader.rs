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
use crate::{Error, Result, TimeStamp};

/// One entry of a transactional read: a key-value pair, or the lock that
/// prevented reading that key.
pub type ScanItem = std::result::Result<(Vec<u8>, Vec<u8>), LockInfo>;

/// What the write family says about transaction `start_ts` on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnCommitRecord {
    /// No record of the transaction. `overlapped_write` is another
    /// transaction's record sitting at `(key, start_ts)` (its commit_ts equals
    /// our start_ts), which a rollback must flag rather than overwrite.
    None { overlapped_write: Option<Write> },
    /// The transaction's own commit or rollback record.
    SingleRecord { commit_ts: TimeStamp, write: Write },
    /// Another transaction's commit at `(key, start_ts)` carries our rollback.
    OverlappedRollback { commit_ts: TimeStamp },
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
            let (_, commit_ts) = split_versioned(&k, "write")?;
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
                let (_, commit_ts) = split_versioned(&k, "write")?;
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
            out.push(split_versioned(&k, "write")?.0);
        }
        Ok((out, false))
    }

    /// Transactional range read at `ts` over raw keys `[start, end)` (`end`
    /// empty: unbounded), ascending or (with `reverse`) descending, at most
    /// `limit` entries. A key whose lock blocks the read yields `Err(lock)`
    /// and counts toward the limit, as in TiKV, so the client can resolve it
    /// and retry from there.
    pub fn scan(&self, opts: &ScanOptions<'_>) -> Result<Vec<ScanItem>> {
        let mut out = Vec::new();
        if opts.limit == 0 {
            return Ok(out);
        }
        let lower = Key::from_raw(opts.start);
        let upper = (!opts.end.is_empty()).then(|| Key::from_raw(opts.end));
        let upper_bound = match &upper {
            Some(u) => Bound::Excluded(u.as_encoded()),
            None => Bound::Unbounded,
        };
        let lower_bound = Bound::Included(lower.as_encoded());
        let mut locks =
            Cursor::new(
                self.snap
                    .iter(Cf::Lock, lower_bound, upper_bound, opts.reverse),
            )?;
        let mut writes =
            Cursor::new(
                self.snap
                    .iter(Cf::Write, lower_bound, upper_bound, opts.reverse),
            )?;
        while out.len() < opts.limit {
            let lock_key = locks.head_key();
            let write_key = writes.head_key_prefix(TS_SUFFIX_LEN, Cf::Write)?;
            let current: Vec<u8> = match (lock_key, write_key) {
                (None, None) => break,
                (Some(l), None) => l.to_vec(),
                (None, Some(w)) => w.to_vec(),
                (Some(l), Some(w)) => {
                    let first = if (l < w) != opts.reverse { l } else { w };
                    first.to_vec()
                }
            };
            let key = Key::from_encoded(current).map_err(|e| Error::corrupt("write", e))?;
            let raw = key.to_raw()?;
            let mut blocked = None;
            if let Some((k, v)) = locks.head()
                && k == key.as_encoded()
            {
                blocked = blocking_lock(&Lock::from_bytes(v)?, &raw, opts.ts, opts.bypass);
                locks.advance()?;
            }
            // Consume every version of this key; pick the newest data version
            // visible at `ts`. Forward, versions arrive newest first; in
            // reverse, oldest first, so the last match wins.
            let mut visible: Option<Write> = None;
            while let Some((k, v)) = writes.head()
                && key.is_prefix_of(k)
            {
                if blocked.is_none() && (opts.reverse || visible.is_none()) {
                    let (_, commit_ts) = split_versioned(k, "write")?;
                    if commit_ts <= opts.ts {
                        let w = Write::from_bytes(v)?;
                        if w.write_type.is_data() {
                            visible = Some(w);
                        }
                    }
                }
                writes.advance()?;
            }
            if let Some(info) = blocked {
                out.push(Err(info));
                continue;
            }
            if let Some(w) = visible.filter(|w| w.write_type == WriteType::Put) {
                let value = if opts.key_only {
                    Vec::new()
                } else {
                    self.load_value(&key, &w)?
                };
                out.push(Ok((raw, value)));
            }
        }
        Ok(out)
    }
}

/// Parameters of [`MvccReader::scan`].
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions<'a> {
    /// Inclusive lower bound (raw user key; empty = from the beginning).
    pub start: &'a [u8],
    /// Exclusive upper bound (raw user key; empty = to the end).
    pub end: &'a [u8],
    pub ts: TimeStamp,
    pub limit: usize,
    pub key_only: bool,
    pub reverse: bool,
    /// Start timestamps of transactions whose locks the caller has resolved
    /// (kvrpcpb `Context.resolved_locks`).
    pub bypass: &'a [TimeStamp],
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
