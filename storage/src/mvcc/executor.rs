//! The transaction executor: runs actions against the store, one command at
//! a time per key.
//!
//! A write command latches its keys, takes a snapshot, runs the pure action,
//! applies the resulting batch with `BatchSource::Client` (GC with
//! `BatchSource::Gc`) and only then releases the latches. Holding the latches
//! across read–decide–apply is what makes an action's view of its keys still
//! true when its batch lands. Everything runs on the caller's thread, which
//! must be one that may block (it waits for latches and for the fsync).
//!
//! Reads take no latches: a snapshot is consistent by itself. They do raise
//! the concurrency manager's `max_ts` and wait out in-flight async-commit/1PC
//! prewrites on their keys (see `concurrency`), so every transactional read
//! of the server must go through this type.
//!
//! Range commands (resolve lock over a range, GC) find their keys with one
//! snapshot, then latch and re-check them with a fresh one, at most
//! [`GC_BATCH_KEYS`] keys per batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::actions::commit::{self, resolve_locks};
use super::actions::pessimistic::{self, PessimisticLockOutcome, PessimisticLockRequest};
use super::actions::prewrite::{self, MutationOp, PrewriteOutcome, PrewriteRequest};
use super::actions::status::{self, CheckTxnStatusRequest, SecondaryLocksStatus, TxnStatus};
use super::concurrency::ConcurrencyManager;
use super::error::{TxnError, TxnResult};
use super::gc::{GC_BATCH_KEYS, GcStats, gc_keys};
use super::key::{Key, check_key};
use super::lock::LockInfo;
use super::reader::{MvccReader, ScanItem, ScanOptions, blocking_lock};
use crate::TimeStamp;
use crate::engine::WriteBatch;
use crate::latch::Latches;
use crate::store::{BatchSource, Store};

/// Transactional access to a [`Store`].
pub struct TxnStore {
    store: Arc<Store>,
    latches: Latches,
    cm: ConcurrencyManager,
}

impl TxnStore {
    /// Wraps `store`. `max_ts` starts at zero: before serving async-commit or
    /// 1PC transactions after a restart, raise it to a fresh oracle timestamp
    /// (`concurrency_manager().update_max_ts(now)`), since reads served
    /// before the restart are not remembered.
    pub fn new(store: Arc<Store>) -> Self {
        TxnStore {
            store,
            latches: Latches::default(),
            cm: ConcurrencyManager::default(),
        }
    }

    /// The store the commands read and write.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The read-timestamp tracker; the change feed needs it to compute
    /// resolved timestamps that async-commit/1PC commits cannot undercut.
    pub fn concurrency_manager(&self) -> &ConcurrencyManager {
        &self.cm
    }

    /// Latches `keys`, runs `action` on a fresh snapshot and applies its
    /// batch (if any) before releasing the latches.
    fn run<'k, T, K, F>(&self, keys: K, source: BatchSource, action: F) -> TxnResult<T>
    where
        K: IntoIterator<Item = &'k [u8]>,
        F: FnOnce(&MvccReader<'_>) -> TxnResult<(WriteBatch, T)>,
    {
        let _latches = self.latches.acquire(keys);
        let snap = self.store.snapshot();
        let (batch, out) = action(&MvccReader::new(&*snap))?;
        if !batch.is_empty() {
            self.store.apply(batch, source)?;
        }
        Ok(out)
    }

    // ---- reads -------------------------------------------------------------

    /// The value of `key` at `ts`, or `KeyIsLocked` if a lock blocks it.
    /// `bypass`: start timestamps of locks the client has resolved.
    pub fn get(
        &self,
        key: &[u8],
        ts: TimeStamp,
        bypass: &[TimeStamp],
    ) -> TxnResult<Option<Vec<u8>>> {
        Ok(self.get_versioned(key, ts, bypass)?.map(|(_, value)| value))
    }

    /// As [`TxnStore::get`], with the commit_ts of the version read.
    pub fn get_versioned(
        &self,
        key: &[u8],
        ts: TimeStamp,
        bypass: &[TimeStamp],
    ) -> TxnResult<Option<(TimeStamp, Vec<u8>)>> {
        check_key(key)?;
        self.cm.raise_max_ts(ts, "read ts")?;
        self.cm.wait_for_keys(&[key], ts);
        let snap = self.store.snapshot();
        let reader = MvccReader::new(&*snap);
        let k = Key::from_raw(key);
        if let Some(lock) = reader.load_lock(&k)?
            && let Some(info) = blocking_lock(&lock, key, ts, bypass)
        {
            return Err(TxnError::locked(info));
        }
        Ok(reader.get_versioned(&k, ts)?)
    }

    /// Values of `keys` at `ts`: found keys in request order, locked keys as
    /// `Err(lock)`, missing keys omitted.
    pub fn batch_get(
        &self,
        keys: &[Vec<u8>],
        ts: TimeStamp,
        bypass: &[TimeStamp],
    ) -> TxnResult<Vec<ScanItem>> {
        for k in keys {
            check_key(k)?;
        }
        self.cm.raise_max_ts(ts, "read ts")?;
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        self.cm.wait_for_keys(&refs, ts);
        let snap = self.store.snapshot();
        let reader = MvccReader::new(&*snap);
        let mut out = Vec::with_capacity(keys.len());
        for raw in keys {
            let k = Key::from_raw(raw);
            if let Some(lock) = reader.load_lock(&k)?
                && let Some(info) = blocking_lock(&lock, raw, ts, bypass)
            {
                out.push(Err(info));
                continue;
            }
            if let Some(v) = reader.get(&k, ts)? {
                out.push(Ok((raw.clone(), v)));
            }
        }
        Ok(out)
    }

    /// A transactional range read; see [`MvccReader::scan`].
    pub fn scan(&self, opts: &ScanOptions<'_>) -> TxnResult<Vec<ScanItem>> {
        self.cm.raise_max_ts(opts.ts, "read ts")?;
        self.cm.wait_for_range(opts.start, opts.end, opts.ts);
        let snap = self.store.snapshot();
        Ok(MvccReader::new(&*snap).scan(opts)?)
    }

    /// Locks with `start_ts <= max_ts` in `[start, end)`; see
    /// [`status::scan_lock`].
    pub fn scan_lock(
        &self,
        max_ts: TimeStamp,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> TxnResult<Vec<LockInfo>> {
        let snap = self.store.snapshot();
        status::scan_lock(&MvccReader::new(&*snap), max_ts, start, end, limit)
    }

    // ---- writes ------------------------------------------------------------

    /// Prewrite (kvrpcpb `KvPrewrite`): locks the request's keys, or with
    /// 1PC commits them directly.
    pub fn prewrite(&self, req: &PrewriteRequest) -> TxnResult<PrewriteOutcome> {
        // Commit timestamps chosen here (async commit, 1PC) start from these.
        self.cm.check_ts(req.start_ts, "start_version")?;
        self.cm.check_ts(req.for_update_ts, "for_update_ts")?;
        self.cm.check_ts(req.min_commit_ts, "min_commit_ts")?;
        let keys = req.mutations.iter().map(|m| m.key.as_slice());
        if req
            .mutations
            .iter()
            .any(|m| m.op == MutationOp::CheckNotExists)
        {
            // A existence check is a read at start_ts.
            self.cm.update_max_ts(req.start_ts);
        }
        if req.secondaries.is_none() && !req.try_one_pc {
            return self.run(keys, BatchSource::Client, |r| {
                prewrite::prewrite(r, req, TimeStamp::ZERO)
            });
        }
        let _latches = self.latches.acquire(keys);
        let held = req
            .mutations
            .iter()
            .filter(|m| m.op != MutationOp::CheckNotExists)
            .map(|m| m.key.clone())
            .collect();
        // Keep the in-memory locks until the batch is applied.
        let (_mem_locks, max_ts) = self.cm.lock_keys(req.start_ts, held);
        let snap = self.store.snapshot();
        let (batch, out) = prewrite::prewrite(&MvccReader::new(&*snap), req, max_ts)?;
        if !batch.is_empty() {
            self.store.apply(batch, BatchSource::Client)?;
        }
        Ok(out)
    }

    /// Commit (kvrpcpb `KvCommit`): turns transaction `start_ts`'s locks on
    /// `keys` into write records at `commit_ts`.
    pub fn commit(
        &self,
        keys: &[Vec<u8>],
        start_ts: TimeStamp,
        commit_ts: TimeStamp,
    ) -> TxnResult<()> {
        self.cm.check_ts(commit_ts, "commit_version")?;
        self.run(slices(keys), BatchSource::Client, |r| {
            Ok((commit::commit(r, keys, start_ts, commit_ts)?, ()))
        })
    }

    /// Rolls transaction `start_ts` back on `keys` (kvrpcpb
    /// `KvBatchRollback`), leaving rollback records.
    pub fn batch_rollback(&self, keys: &[Vec<u8>], start_ts: TimeStamp) -> TxnResult<()> {
        self.run(slices(keys), BatchSource::Client, |r| {
            Ok((commit::batch_rollback(r, keys, start_ts)?, ()))
        })
    }

    /// Rolls back transaction `start_ts` on `key` if its lock expired by
    /// `current_ts` (kvrpcpb `KvCleanup`; `current_ts == 0` rolls back at
    /// once).
    pub fn cleanup(&self, key: &[u8], start_ts: TimeStamp, current_ts: TimeStamp) -> TxnResult<()> {
        self.run([key], BatchSource::Client, |r| {
            Ok((commit::cleanup(r, key, start_ts, current_ts)?, ()))
        })
    }

    /// Decides and reports transaction `lock_ts`'s fate on its primary
    /// (kvrpcpb `KvCheckTxnStatus`); see [`CheckTxnStatusRequest`].
    pub fn check_txn_status(&self, req: &CheckTxnStatusRequest) -> TxnResult<TxnStatus> {
        // The caller will read at caller_start_ts after this: async-commit/1PC
        // transactions must commit above it.
        self.cm
            .raise_max_ts(req.caller_start_ts, "caller_start_ts")?;
        self.run([req.primary_key.as_slice()], BatchSource::Client, |r| {
            status::check_txn_status(r, req)
        })
    }

    /// Returns the primary lock's TTL after the heartbeat.
    pub fn txn_heart_beat(
        &self,
        primary: &[u8],
        start_ts: TimeStamp,
        advise_ttl: u64,
    ) -> TxnResult<u64> {
        self.run([primary], BatchSource::Client, |r| {
            status::txn_heart_beat(r, primary, start_ts, advise_ttl)
        })
    }

    /// Reports an async-commit transaction's locks on `keys`, rolling back
    /// any key that lost its lock (kvrpcpb `KvCheckSecondaryLocks`).
    pub fn check_secondary_locks(
        &self,
        keys: &[Vec<u8>],
        start_ts: TimeStamp,
    ) -> TxnResult<SecondaryLocksStatus> {
        // A rollback written here must not be overtaken by a commit at a
        // timestamp at or below start_ts.
        self.cm.raise_max_ts(start_ts, "start_ts")?;
        self.run(slices(keys), BatchSource::Client, |r| {
            status::check_secondary_locks(r, keys, start_ts)
        })
    }

    /// Takes pessimistic locks (kvrpcpb `KvPessimisticLock`).
    pub fn acquire_pessimistic_lock(
        &self,
        req: &PessimisticLockRequest,
    ) -> TxnResult<PessimisticLockOutcome> {
        self.cm.check_ts(req.for_update_ts, "for_update_ts")?;
        if req.return_values || req.check_existence {
            self.cm.update_max_ts(req.for_update_ts);
        }
        let keys = req.keys.iter().map(|k| k.key.as_slice());
        self.run(keys, BatchSource::Client, |r| {
            pessimistic::acquire_pessimistic_lock(r, req)
        })
    }

    /// Removes transaction `start_ts`'s pessimistic locks on `keys`
    /// (kvrpcpb `KVPessimisticRollback`).
    pub fn pessimistic_rollback(
        &self,
        keys: &[Vec<u8>],
        start_ts: TimeStamp,
        for_update_ts: TimeStamp,
    ) -> TxnResult<()> {
        self.run(slices(keys), BatchSource::Client, |r| {
            Ok((
                pessimistic::pessimistic_rollback(r, keys, start_ts, for_update_ts)?,
                (),
            ))
        })
    }

    /// Commits (commit_ts > 0) or rolls back transaction `start_ts` on `keys`.
    pub fn resolve_lock_keys(
        &self,
        keys: &[Vec<u8>],
        start_ts: TimeStamp,
        commit_ts: TimeStamp,
    ) -> TxnResult<()> {
        self.cm.check_ts(commit_ts, "commit_version")?;
        self.run(slices(keys), BatchSource::Client, |r| {
            Ok((commit::resolve_lock_keys(r, keys, start_ts, commit_ts)?, ()))
        })
    }

    /// Resolves every lock in raw range `[start, end)` (`end` empty:
    /// unbounded) whose transaction is in `txn_status` (start_ts →
    /// commit_ts, 0 = roll back), in batches of at most [`GC_BATCH_KEYS`].
    pub fn resolve_locks_in_range(
        &self,
        txn_status: &BTreeMap<TimeStamp, TimeStamp>,
        start: &[u8],
        end: &[u8],
    ) -> TxnResult<()> {
        for commit_ts in txn_status.values() {
            self.cm.check_ts(*commit_ts, "commit_version")?;
        }
        let end_key = (!end.is_empty()).then(|| Key::from_raw(end));
        let mut from = Key::from_raw(start);
        loop {
            let (keys, more) = {
                let snap = self.store.snapshot();
                let reader = MvccReader::new(&*snap);
                let filter = |l: &super::lock::Lock| txn_status.contains_key(&l.start_ts);
                let (locks, more) =
                    reader.scan_locks(&from, end_key.as_ref(), filter, GC_BATCH_KEYS)?;
                (locks.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), more)
            };
            let Some(next) = self.batch_over(&keys, BatchSource::Client, |r| {
                Ok((resolve_locks(r, &keys, txn_status)?, ()))
            })?
            else {
                return Ok(());
            };
            if !more {
                return Ok(());
            }
            from = next;
        }
    }

    /// Garbage-collects versions below `safe_point` in raw range
    /// `[start, end)` (`end` empty: unbounded). Batches are applied with
    /// `BatchSource::Gc`.
    pub fn gc(&self, safe_point: TimeStamp, start: &[u8], end: &[u8]) -> TxnResult<GcStats> {
        let end_key = (!end.is_empty()).then(|| Key::from_raw(end));
        let mut from = Key::from_raw(start);
        let mut stats = GcStats::default();
        loop {
            let (keys, more) = {
                let snap = self.store.snapshot();
                MvccReader::new(&*snap).scan_write_keys(&from, end_key.as_ref(), GC_BATCH_KEYS)?
            };
            let mut batch_stats = GcStats::default();
            let Some(next) = self.batch_over(&keys, BatchSource::Gc, |r| {
                let (batch, s) = gc_keys(r, &keys, safe_point)?;
                batch_stats = s;
                Ok((batch, ()))
            })?
            else {
                return Ok(stats);
            };
            stats.add(batch_stats);
            if !more {
                return Ok(stats);
            }
            from = next;
        }
    }

    /// Runs `action` under the latches of `keys` (encoded); returns the key
    /// to continue from, or `None` if `keys` is empty.
    fn batch_over<F>(&self, keys: &[Key], source: BatchSource, action: F) -> TxnResult<Option<Key>>
    where
        F: FnOnce(&MvccReader<'_>) -> TxnResult<(WriteBatch, ())>,
    {
        let Some(last) = keys.last() else {
            return Ok(None);
        };
        let raws = keys
            .iter()
            .map(Key::to_raw)
            .collect::<crate::Result<Vec<_>>>()?;
        self.run(slices(&raws), source, action)?;
        // The smallest raw key after `last` is `last ++ 0x00`.
        let mut next = last.to_raw()?;
        next.push(0);
        Ok(Some(Key::from_raw(&next)))
    }
}

fn slices(keys: &[Vec<u8>]) -> impl Iterator<Item = &[u8]> {
    keys.iter().map(Vec::as_slice)
}
