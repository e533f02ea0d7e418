//! Finding out what happened to a transaction: check_txn_status, heartbeat,
//! check_secondary_locks, scan_lock.
//!
//! The primary key decides a normal transaction: its lock (alive, expired) or
//! its commit/rollback record is the truth. `check_txn_status` may change that
//! truth — roll back an expired lock, roll back a transaction that never
//! reached its primary (`rollback_if_not_exist`), or push a large
//! transaction's `min_commit_ts` above a reader so the reader need not wait.
//! Async-commit transactions are decided by all their keys together, so
//! `check_txn_status` never rolls them back or pushes them (unless
//! `force_sync_commit`); `check_secondary_locks` inspects the secondaries and
//! rolls back any that lost their lock, which makes the outcome final. Rules
//! follow TiKV's `actions/check_txn_status.rs` and
//! `commands/check_secondary_locks.rs`.

use super::commit::{rollback_lock, write_rollback};
use crate::TimeStamp;
use crate::engine::WriteBatch;
use crate::mvcc::error::{TxnError, TxnResult};
use crate::mvcc::key::{Key, check_key};
use crate::mvcc::lock::{LockInfo, LockType};
use crate::mvcc::reader::{MvccReader, TxnCommitRecord};
use crate::mvcc::txn::MvccTxn;
use crate::mvcc::write::WriteType;

/// kvrpcpb `CheckTxnStatusRequest`.
#[derive(Clone, Debug, Default)]
pub struct CheckTxnStatusRequest {
    /// The transaction's primary key, where its fate is recorded.
    pub primary_key: Vec<u8>,
    /// The transaction's start ts.
    pub lock_ts: TimeStamp,
    /// Start ts of the reader asking; `MAX` for an autocommit point get.
    pub caller_start_ts: TimeStamp,
    /// Now, for TTL expiry (physical milliseconds matter).
    pub current_ts: TimeStamp,
    /// When there is neither lock nor record, write a rollback record and
    /// report `LockNotExist` instead of failing with `TxnNotFound`.
    pub rollback_if_not_exist: bool,
    /// Decide an async-commit primary like an ordinary one: roll it back if
    /// expired, push it otherwise. Without it such a lock is only reported.
    pub force_sync_commit: bool,
    /// The caller is resolving a pessimistic lock: an expired pessimistic
    /// primary is removed without a rollback record, and a missing
    /// transaction gets no rollback record either.
    pub resolving_pessimistic_lock: bool,
    /// Fail with `PrimaryMismatch` if the lock found names another primary.
    pub verify_is_primary: bool,
}

/// The transaction's status and the action taken (kvrpcpb `Action`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnStatus {
    /// Already rolled back. Reply `(0, 0, none)`, `NoAction`.
    RolledBack,
    /// The lock expired and was rolled back now. `TTLExpireRollback`.
    TtlExpire,
    /// No lock and no record: a rollback record was written now.
    /// `LockNotExistRollback`.
    LockNotExist,
    /// Committed. Reply `(commit_ts, 0, none)`.
    Committed {
        /// Where the transaction committed.
        commit_ts: TimeStamp,
    },
    /// Still locked. Reply `(0, ttl, lock)`; `MinCommitTSPushed` when
    /// `min_commit_ts_pushed`.
    Uncommitted {
        /// The primary lock, after any push.
        lock: LockInfo,
        /// Whether the caller need not wait: the lock's `min_commit_ts` is
        /// above the caller's start ts (always so for an autocommit point get).
        min_commit_ts_pushed: bool,
    },
    /// An expired pessimistic primary lock was removed without a rollback
    /// record. `TTLExpirePessimisticRollback`.
    PessimisticRollBack,
    /// Resolving a pessimistic lock found nothing; nothing written.
    /// `LockNotExistDoNothing`.
    LockNotExistDoNothing,
}

/// Checks (and possibly decides) the status of transaction `lock_ts` on its
/// primary key.
pub fn check_txn_status(
    reader: &MvccReader<'_>,
    req: &CheckTxnStatusRequest,
) -> TxnResult<(WriteBatch, TxnStatus)> {
    check_key(&req.primary_key)?;
    let key = Key::from_raw(&req.primary_key);
    let raw = &req.primary_key;
    let mut txn = MvccTxn::new();
    let status = match reader.load_lock(&key)? {
        Some(mut lock) if lock.start_ts == req.lock_ts => {
            if req.verify_is_primary && lock.primary != *raw {
                return Err(TxnError::PrimaryMismatch(Box::new(
                    lock.to_lock_info(raw.clone()),
                )));
            }
            if lock.use_async_commit && !req.force_sync_commit {
                let info = lock.to_lock_info(raw.clone());
                return Ok((WriteBatch::new(), uncommitted(info, false)));
            }
            if lock.is_expired(req.current_ts) {
                if req.resolving_pessimistic_lock && lock.lock_type == LockType::Pessimistic {
                    txn.unlock_key(&key);
                    TxnStatus::PessimisticRollBack
                } else {
                    rollback_lock(&mut txn, reader, &key, raw, &lock)?;
                    TxnStatus::TtlExpire
                }
            } else {
                // Push a large transaction's min_commit_ts above the reader so
                // its locks stop blocking that reader. A zero min_commit_ts
                // marks a transaction that must not be pushed; pessimistic
                // locks never block readers, so there is nothing to gain.
                let caller = req.caller_start_ts;
                if lock.lock_type != LockType::Pessimistic
                    && !lock.min_commit_ts.is_zero()
                    && caller != TimeStamp::MAX
                    && caller >= lock.min_commit_ts
                {
                    lock.min_commit_ts = caller.next().max(req.current_ts);
                    txn.put_lock(&key, &lock);
                }
                let pushed =
                    (!caller.is_zero() && lock.min_commit_ts > caller) || caller == TimeStamp::MAX;
                uncommitted(lock.to_lock_info(raw.clone()), pushed)
            }
        }
        _ => match reader.get_txn_commit_record(&key, req.lock_ts)? {
            TxnCommitRecord::SingleRecord { commit_ts, write } => {
                if write.write_type == WriteType::Rollback {
                    TxnStatus::RolledBack
                } else {
                    TxnStatus::Committed { commit_ts }
                }
            }
            TxnCommitRecord::OverlappedRollback { .. } => TxnStatus::RolledBack,
            TxnCommitRecord::None { overlapped_write } => {
                if !req.rollback_if_not_exist {
                    return Err(TxnError::TxnNotFound {
                        start_ts: req.lock_ts,
                        key: raw.clone(),
                    });
                }
                if req.resolving_pessimistic_lock {
                    TxnStatus::LockNotExistDoNothing
                } else {
                    write_rollback(&mut txn, &key, req.lock_ts, overlapped_write);
                    TxnStatus::LockNotExist
                }
            }
        },
    };
    Ok((txn.into_batch(), status))
}

fn uncommitted(lock: LockInfo, min_commit_ts_pushed: bool) -> TxnStatus {
    TxnStatus::Uncommitted {
        lock,
        min_commit_ts_pushed,
    }
}

/// Extends the primary lock's TTL to `advise_ttl` (never shortens it) and
/// returns the resulting TTL. A missing lock is `TxnNotFound`.
pub fn txn_heart_beat(
    reader: &MvccReader<'_>,
    primary: &[u8],
    start_ts: TimeStamp,
    advise_ttl: u64,
) -> TxnResult<(WriteBatch, u64)> {
    check_key(primary)?;
    let key = Key::from_raw(primary);
    let mut txn = MvccTxn::new();
    match reader.load_lock(&key)? {
        Some(mut lock) if lock.start_ts == start_ts => {
            if lock.ttl < advise_ttl {
                lock.ttl = advise_ttl;
                txn.put_lock(&key, &lock);
            }
            Ok((txn.into_batch(), lock.ttl))
        }
        _ => Err(TxnError::TxnNotFound {
            start_ts,
            key: primary.to_vec(),
        }),
    }
}

/// Outcome of [`check_secondary_locks`] (kvrpcpb `CheckSecondaryLocksResponse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecondaryLocksStatus {
    /// Every key is still locked by the transaction.
    Locked(Vec<LockInfo>),
    /// Some key is committed: the transaction committed at this ts.
    Committed(TimeStamp),
    /// Some key is rolled back (possibly just now): the transaction is.
    RolledBack,
}

/// Inspects the secondary keys of async-commit transaction `start_ts`.
///
/// A key still holding the transaction's prewrite lock is reported as locked
/// (whatever its async flag: the client checks `use_async_commit`); a
/// pessimistic lock left there, or no lock and no record, is rolled back now
/// with a rollback record, which decides the transaction. The scan stops at
/// the first committed or rolled-back key, as TiKV does.
pub fn check_secondary_locks(
    reader: &MvccReader<'_>,
    keys: &[Vec<u8>],
    start_ts: TimeStamp,
) -> TxnResult<(WriteBatch, SecondaryLocksStatus)> {
    let mut txn = MvccTxn::new();
    let mut locks = Vec::new();
    for raw in keys {
        check_key(raw)?;
        let key = Key::from_raw(raw);
        match reader.load_lock(&key)? {
            Some(lock) if lock.start_ts == start_ts && lock.lock_type != LockType::Pessimistic => {
                locks.push(lock.to_lock_info(raw.clone()));
                continue;
            }
            Some(lock) if lock.start_ts == start_ts => {
                // Only pessimistically locked: the prewrite never arrived.
                rollback_lock(&mut txn, reader, &key, raw, &lock)?;
                return Ok((txn.into_batch(), SecondaryLocksStatus::RolledBack));
            }
            _ => {}
        }
        match reader.get_txn_commit_record(&key, start_ts)? {
            TxnCommitRecord::SingleRecord { commit_ts, write } => {
                // An existing record is final (a rollback record is already
                // protected), so nothing needs writing.
                let status = if write.write_type == WriteType::Rollback {
                    SecondaryLocksStatus::RolledBack
                } else {
                    SecondaryLocksStatus::Committed(commit_ts)
                };
                return Ok((txn.into_batch(), status));
            }
            TxnCommitRecord::OverlappedRollback { .. } => {
                return Ok((txn.into_batch(), SecondaryLocksStatus::RolledBack));
            }
            TxnCommitRecord::None { overlapped_write } => {
                write_rollback(&mut txn, &key, start_ts, overlapped_write);
                return Ok((txn.into_batch(), SecondaryLocksStatus::RolledBack));
            }
        }
    }
    Ok((txn.into_batch(), SecondaryLocksStatus::Locked(locks)))
}

/// Locks with `start_ts <= max_ts` in raw key range `[start, end)` (`end`
/// empty: unbounded), at most `limit` (0: no limit), in key order.
pub fn scan_lock(
    reader: &MvccReader<'_>,
    max_ts: TimeStamp,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> TxnResult<Vec<LockInfo>> {
    let start = Key::from_raw(start);
    let end = (!end.is_empty()).then(|| Key::from_raw(end));
    let (locks, _) = reader.scan_locks(&start, end.as_ref(), |l| l.start_ts <= max_ts, limit)?;
    locks
        .into_iter()
        .map(|(k, l)| Ok(l.to_lock_info(k.to_raw()?)))
        .collect()
}
