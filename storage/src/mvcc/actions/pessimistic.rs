//! Pessimistic locks: taken during a pessimistic transaction's execution,
//! before prewrite, so that its writes cannot conflict later.
//!
//! Rules (TiKV `actions/acquire_pessimistic_lock.rs`,
//! `commands/pessimistic_rollback.rs`):
//! - Another transaction's lock: `KeyIsLocked`. Our own pessimistic lock:
//!   success (its for_update_ts and TTL are raised if the request's are
//!   higher). Our own prewrite lock: a duplicate request, success unchanged.
//! - A commit newer than `for_update_ts`: `WriteConflict` (reason
//!   `PessimisticRetry`); the client retries with a newer for_update_ts.
//! - The transaction was already rolled back on this key:
//!   `PessimisticLockRolledBack`.
//! - `should_not_exist` with a visible `Put`: `AlreadyExist`.
//! - Any error aborts the whole command; nothing is locked.
//! - Pessimistic rollback removes only `Pessimistic` locks of the transaction
//!   whose `for_update_ts` is at most the given one, and writes no rollback
//!   record: the transaction itself goes on.

use super::conflict;
use crate::TimeStamp;
use crate::engine::WriteBatch;
use crate::mvcc::error::{TxnError, TxnResult, WriteConflictReason};
use crate::mvcc::key::{Key, check_key};
use crate::mvcc::lock::{Lock, LockType};
use crate::mvcc::reader::MvccReader;
use crate::mvcc::txn::MvccTxn;

/// One key to lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PessimisticKey {
    /// The raw user key.
    pub key: Vec<u8>,
    /// Fail with `AlreadyExist` if the key has a visible value.
    pub should_not_exist: bool,
}

/// kvrpcpb `PessimisticLockRequest`.
#[derive(Clone, Debug, Default)]
pub struct PessimisticLockRequest {
    /// The keys to lock, in order.
    pub keys: Vec<PessimisticKey>,
    /// The transaction's primary key, recorded in every lock.
    pub primary: Vec<u8>,
    /// The transaction's start timestamp (its identity).
    pub start_ts: TimeStamp,
    /// The timestamp the locks are taken at: writes committed after it
    /// conflict, and returned values are read at it.
    pub for_update_ts: TimeStamp,
    /// Milliseconds after `start_ts.physical()` before the locks may be
    /// considered abandoned.
    pub lock_ttl: u64,
    /// Stored in the locks: the transaction will not commit below it.
    pub min_commit_ts: TimeStamp,
    /// How many keys the whole transaction writes, as the client reports it.
    pub txn_size: u64,
    /// Return each key's value at `for_update_ts`.
    pub return_values: bool,
    /// Report whether each key exists (via the returned values).
    pub check_existence: bool,
}

/// Values at `for_update_ts`, one per requested key in order, when
/// `return_values` or `check_existence` was set (empty otherwise).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PessimisticLockOutcome {
    /// One entry per key; `None` when the key has no visible value.
    pub values: Vec<Option<Vec<u8>>>,
}

/// Takes a pessimistic lock on every key of `req`, reading through
/// `reader`; returns the batch to apply and the values asked for. Fails
/// with the first key's error, writing nothing.
pub fn acquire_pessimistic_lock(
    reader: &MvccReader<'_>,
    req: &PessimisticLockRequest,
) -> TxnResult<(WriteBatch, PessimisticLockOutcome)> {
    check_key(&req.primary)?;
    let need_value = req.return_values || req.check_existence;
    let mut txn = MvccTxn::new();
    let mut outcome = PessimisticLockOutcome::default();
    for pk in &req.keys {
        check_key(&pk.key)?;
        let value = lock_key(&mut txn, reader, req, pk, need_value)?;
        if need_value {
            outcome.values.push(value);
        }
    }
    Ok((txn.into_batch(), outcome))
}

fn lock_key(
    txn: &mut MvccTxn,
    reader: &MvccReader<'_>,
    req: &PessimisticLockRequest,
    pk: &PessimisticKey,
    need_value: bool,
) -> TxnResult<Option<Vec<u8>>> {
    let key = Key::from_raw(&pk.key);
    let read_value = |reader: &MvccReader<'_>| -> TxnResult<Option<Vec<u8>>> {
        Ok(if need_value {
            reader.get(&key, req.for_update_ts)?
        } else {
            None
        })
    };
    if let Some(mut lock) = reader.load_lock(&key)? {
        if lock.start_ts != req.start_ts {
            return Err(TxnError::locked(lock.to_lock_info(pk.key.clone())));
        }
        if lock.lock_type == LockType::Pessimistic
            && (req.for_update_ts > lock.for_update_ts || req.lock_ttl > lock.ttl)
        {
            lock.for_update_ts = lock.for_update_ts.max(req.for_update_ts);
            lock.ttl = lock.ttl.max(req.lock_ttl);
            txn.put_lock(&key, &lock);
        }
        return read_value(reader);
    }
    if let Some((commit_ts, write)) = reader.seek_write(&key, TimeStamp::MAX)? {
        if commit_ts > req.for_update_ts {
            let reason = WriteConflictReason::PessimisticRetry;
            return Err(conflict(
                req.start_ts,
                &req.primary,
                &pk.key,
                commit_ts,
                &write,
                reason,
            ));
        }
        if reader.rolled_back(&key, req.start_ts)? {
            return Err(TxnError::PessimisticLockRolledBack {
                start_ts: req.start_ts,
                key: pk.key.clone(),
            });
        }
        if pk.should_not_exist && reader.key_exists(&key, TimeStamp::MAX)? {
            return Err(TxnError::AlreadyExist {
                key: pk.key.clone(),
            });
        }
    }
    let mut lock = Lock::new(
        LockType::Pessimistic,
        req.primary.clone(),
        req.start_ts,
        req.lock_ttl,
    );
    lock.for_update_ts = req.for_update_ts;
    lock.min_commit_ts = req.min_commit_ts;
    lock.txn_size = req.txn_size;
    txn.put_lock(&key, &lock);
    read_value(reader)
}

/// Releases the pessimistic locks of `start_ts` with `for_update_ts <=` the
/// given one on `keys`; other locks and missing locks are left alone.
pub fn pessimistic_rollback(
    reader: &MvccReader<'_>,
    keys: &[Vec<u8>],
    start_ts: TimeStamp,
    for_update_ts: TimeStamp,
) -> TxnResult<WriteBatch> {
    let mut txn = MvccTxn::new();
    for raw in keys {
        check_key(raw)?;
        let key = Key::from_raw(raw);
        if let Some(lock) = reader.load_lock(&key)?
            && lock.lock_type == LockType::Pessimistic
            && lock.start_ts == start_ts
            && lock.for_update_ts <= for_update_ts
        {
            txn.unlock_key(&key);
        }
    }
    Ok(txn.into_batch())
}
