//! Second phase and its undo: commit, rollback, cleanup and lock resolution.
//!
//! Rules (TiKV `actions/commit.rs`, `actions/cleanup.rs`,
//! `commands/resolve_lock.rs`):
//! - Commit needs our lock. Without it, an existing commit record makes the
//!   commit an idempotent success; a rollback record or nothing at all is
//!   `TxnLockNotFound`. A commit_ts below the lock's min_commit_ts is
//!   `CommitTsExpired`. A pessimistic lock that is still there at commit time
//!   (its key was never prewritten) commits as a `Lock` record, as TiKV does.
//! - Rollback removes our lock, deletes a large value written by prewrite,
//!   and always leaves a rollback record at `(key, start_ts)` — or, when
//!   another transaction's commit record already sits there, sets its
//!   `has_overlapped_rollback` flag. Rolling back a committed transaction is
//!   `Committed`.
//! - Cleanup is a rollback that first honours the lock's TTL against
//!   `current_ts` (not expired → `KeyIsLocked`); `current_ts == 0` skips the
//!   TTL check (batch rollback).
//! - Resolve lock commits (commit_ts > 0) or rolls back (commit_ts == 0) the
//!   locks of transactions whose outcome the client has determined.

use std::collections::BTreeMap;

use super::prewrite::overlaps_rollback;
use crate::TimeStamp;
use crate::engine::WriteBatch;
use crate::mvcc::error::{TxnError, TxnResult};
use crate::mvcc::key::{Key, check_key};
use crate::mvcc::lock::{Lock, LockType};
use crate::mvcc::reader::{MvccReader, TxnCommitRecord};
use crate::mvcc::txn::MvccTxn;
use crate::mvcc::write::{Write, WriteType};

/// Commits `keys` of transaction `start_ts` at `commit_ts`. Any error aborts
/// the whole command.
pub fn commit(
    reader: &MvccReader<'_>,
    keys: &[Vec<u8>],
    start_ts: TimeStamp,
    commit_ts: TimeStamp,
) -> TxnResult<WriteBatch> {
    if commit_ts <= start_ts {
        return Err(TxnError::InvalidTxnTso {
            start_ts,
            commit_ts,
        });
    }
    let mut txn = MvccTxn::new();
    for raw in keys {
        check_key(raw)?;
        commit_key(
            &mut txn,
            reader,
            &Key::from_raw(raw),
            raw,
            start_ts,
            commit_ts,
        )?;
    }
    Ok(txn.into_batch())
}

pub(crate) fn commit_key(
    txn: &mut MvccTxn,
    reader: &MvccReader<'_>,
    key: &Key,
    raw: &[u8],
    start_ts: TimeStamp,
    commit_ts: TimeStamp,
) -> TxnResult<()> {
    let lock = match reader.load_lock(key)? {
        Some(lock) if lock.start_ts == start_ts => lock,
        _ => {
            return match reader.get_txn_commit_record(key, start_ts)?.info() {
                Some((_, t)) if t != WriteType::Rollback => Ok(()),
                _ => Err(TxnError::TxnLockNotFound {
                    start_ts,
                    commit_ts,
                    key: raw.to_vec(),
                }),
            };
        }
    };
    if commit_ts < lock.min_commit_ts {
        return Err(TxnError::CommitTsExpired {
            start_ts,
            attempted_commit_ts: commit_ts,
            min_commit_ts: lock.min_commit_ts,
            key: raw.to_vec(),
        });
    }
    let mut write = Write::new(
        WriteType::from_lock_type(lock.lock_type),
        start_ts,
        lock.short_value,
    );
    write.txn_source = lock.txn_source;
    write.has_overlapped_rollback = overlaps_rollback(reader, key, commit_ts)?;
    txn.put_write(key, commit_ts, &write);
    txn.unlock_key(key);
    Ok(())
}

/// Rolls back `lock` (owned by `start_ts`) on `key`.
pub(crate) fn rollback_lock(
    txn: &mut MvccTxn,
    reader: &MvccReader<'_>,
    key: &Key,
    raw: &[u8],
    lock: &Lock,
) -> TxnResult<()> {
    let start_ts = lock.start_ts;
    let overlapped = match reader.get_txn_commit_record(key, start_ts)? {
        TxnCommitRecord::None { overlapped_write } => overlapped_write,
        TxnCommitRecord::SingleRecord { commit_ts, write }
            if write.write_type != WriteType::Rollback =>
        {
            // A lock and a commit record of one transaction cannot coexist in
            // a consistent store; refuse rather than destroy the commit.
            return Err(TxnError::Committed {
                start_ts,
                commit_ts,
                key: raw.to_vec(),
            });
        }
        // Already rolled back: only the stale lock is left to remove.
        _ => {
            txn.unlock_key(key);
            return Ok(());
        }
    };
    if lock.lock_type == LockType::Put && lock.short_value.is_none() {
        txn.delete_value(key, start_ts);
    }
    write_rollback(txn, key, start_ts, overlapped);
    txn.unlock_key(key);
    Ok(())
}

/// Leaves the rollback mark of `start_ts` on `key`.
pub(crate) fn write_rollback(
    txn: &mut MvccTxn,
    key: &Key,
    start_ts: TimeStamp,
    overlapped: Option<Write>,
) {
    match overlapped {
        Some(mut w) => {
            w.has_overlapped_rollback = true;
            txn.put_write(key, start_ts, &w);
        }
        None => txn.put_write(key, start_ts, &Write::rollback(start_ts)),
    }
}

/// Rolls back transaction `start_ts` on `key`, honouring the lock's TTL at
/// `current_ts` unless it is zero.
pub(crate) fn cleanup_key(
    txn: &mut MvccTxn,
    reader: &MvccReader<'_>,
    key: &Key,
    raw: &[u8],
    start_ts: TimeStamp,
    current_ts: TimeStamp,
) -> TxnResult<()> {
    match reader.load_lock(key)? {
        Some(lock) if lock.start_ts == start_ts => {
            if !current_ts.is_zero() && !lock.is_expired(current_ts) {
                return Err(TxnError::locked(lock.to_lock_info(raw.to_vec())));
            }
            rollback_lock(txn, reader, key, raw, &lock)
        }
        _ => match reader.get_txn_commit_record(key, start_ts)? {
            TxnCommitRecord::SingleRecord { commit_ts, write }
                if write.write_type != WriteType::Rollback =>
            {
                Err(TxnError::Committed {
                    start_ts,
                    commit_ts,
                    key: raw.to_vec(),
                })
            }
            TxnCommitRecord::None { overlapped_write } => {
                // Mark the key so a prewrite arriving late is refused.
                write_rollback(txn, key, start_ts, overlapped_write);
                Ok(())
            }
            _ => Ok(()),
        },
    }
}

/// Rolls back `keys` of transaction `start_ts` regardless of TTL
/// (kvrpcpb `BatchRollback`).
pub fn batch_rollback(
    reader: &MvccReader<'_>,
    keys: &[Vec<u8>],
    start_ts: TimeStamp,
) -> TxnResult<WriteBatch> {
    let mut txn = MvccTxn::new();
    for raw in keys {
        check_key(raw)?;
        cleanup_key(
            &mut txn,
            reader,
            &Key::from_raw(raw),
            raw,
            start_ts,
            TimeStamp::ZERO,
        )?;
    }
    Ok(txn.into_batch())
}

/// Rolls back transaction `start_ts` on `key` if its lock expired at
/// `current_ts` (kvrpcpb `Cleanup`; `current_ts == 0` rolls back at once).
pub fn cleanup(
    reader: &MvccReader<'_>,
    key: &[u8],
    start_ts: TimeStamp,
    current_ts: TimeStamp,
) -> TxnResult<WriteBatch> {
    check_key(key)?;
    let mut txn = MvccTxn::new();
    cleanup_key(
        &mut txn,
        reader,
        &Key::from_raw(key),
        key,
        start_ts,
        current_ts,
    )?;
    Ok(txn.into_batch())
}

/// Resolves transaction `start_ts` on the given keys: commit at `commit_ts`,
/// or roll back when it is zero (kvrpcpb `ResolveLock` with `keys`).
pub fn resolve_lock_keys(
    reader: &MvccReader<'_>,
    keys: &[Vec<u8>],
    start_ts: TimeStamp,
    commit_ts: TimeStamp,
) -> TxnResult<WriteBatch> {
    if commit_ts.is_zero() {
        return batch_rollback(reader, keys, start_ts);
    }
    commit(reader, keys, start_ts, commit_ts)
}

/// Resolves the locks on `keys` whose transactions appear in `txn_status`
/// (start_ts → commit_ts, 0 meaning rolled back). Keys whose lock is gone or
/// belongs to another transaction are skipped: the executor found them with
/// an earlier snapshot.
pub fn resolve_locks(
    reader: &MvccReader<'_>,
    keys: &[Key],
    txn_status: &BTreeMap<TimeStamp, TimeStamp>,
) -> TxnResult<WriteBatch> {
    let mut txn = MvccTxn::new();
    for key in keys {
        let Some(lock) = reader.load_lock(key)? else {
            continue;
        };
        let Some(&commit_ts) = txn_status.get(&lock.start_ts) else {
            continue;
        };
        let raw = key.to_raw()?;
        if commit_ts.is_zero() {
            rollback_lock(&mut txn, reader, key, &raw, &lock)?;
        } else if commit_ts > lock.start_ts {
            commit_key(&mut txn, reader, key, &raw, lock.start_ts, commit_ts)?;
        } else {
            return Err(TxnError::InvalidTxnTso {
                start_ts: lock.start_ts,
                commit_ts,
            });
        }
    }
    Ok(txn.into_batch())
}
