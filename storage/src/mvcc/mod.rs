//! TiKV's Percolator transaction model on top of the store.
//!
//! Three column families hold a transactional key:
//! - `lock`: `encode(key)` → [`Lock`], present while a transaction is between
//!   prewrite and commit/rollback (or holds a pessimistic lock);
//! - `write`: `encode(key) ++ !commit_ts` → [`Write`], one record per commit
//!   or rollback;
//! - `default`: `encode(key) ++ !start_ts` → value, for values longer than
//!   [`SHORT_VALUE_MAX_LEN`] (shorter values live inline in lock and write
//!   records).
//!
//! Layers: [`key`] (memcomparable codec, size limits), [`lock`] / [`mod@write`]
//! (record formats), [`reader`] (reading one snapshot), [`actions`] (the
//! transaction rules as pure functions producing a write batch), [`gc`],
//! and [`TxnStore`] (latches, snapshot, apply). [`decode_change`] turns an
//! applied mutation back into a typed change for the change feed.
//!
//! Invariants the rules maintain: at most one lock per key; a transaction's
//! commit record and its lock never coexist; a rolled-back transaction leaves
//! a rollback mark on every key it rolled back, so a late prewrite cannot
//! succeed; a large value in the default family exists iff a lock or write
//! record refers to it.

pub mod actions;
mod codec;
pub mod concurrency;
pub mod error;
pub mod executor;
pub mod gc;
pub mod key;
pub mod lock;
pub mod reader;
pub mod txn;
pub mod write;

pub use actions::commit::{batch_rollback, cleanup, commit, resolve_lock_keys, resolve_locks};
pub use actions::pessimistic::{
    PessimisticKey, PessimisticLockOutcome, PessimisticLockRequest, acquire_pessimistic_lock,
    pessimistic_rollback,
};
pub use actions::prewrite::{
    MutationOp, PessimisticAction, PrewriteOutcome, PrewriteRequest, TxnMutation, prewrite,
};
pub use actions::status::{
    CheckTxnStatusRequest, SecondaryLocksStatus, TxnStatus, check_secondary_locks,
    check_txn_status, scan_lock, txn_heart_beat,
};
pub use concurrency::ConcurrencyManager;
pub use error::{TxnError, TxnResult, WriteConflictReason};
pub use executor::TxnStore;
pub use gc::{GC_BATCH_KEYS, GcStats};
pub use key::{Key, MAX_KEY_SIZE, MAX_VALUE_SIZE, decode_bytes, encode_bytes};
pub use lock::{Lock, LockInfo, LockType, SHORT_VALUE_MAX_LEN};
pub use reader::{MvccReader, ScanItem, ScanOptions, TxnCommitRecord};
pub use write::{Write, WriteType};

use crate::engine::{Cf, Mutation, Op};
use crate::{Error, Result, TimeStamp};

/// A transactional mutation of an applied batch, decoded. Keys are raw user
/// keys.
///
/// What a batch means, by command: prewrite = `LockPut` (+ `DefaultPut` for a
/// large value); commit = `WritePut` + `LockDeleted`; rollback = `WritePut`
/// of a `Rollback` record + `LockDeleted` (+ `DefaultDeleted`); 1PC =
/// `WritePut` only (+ `DefaultPut`); pessimistic lock / rollback = `LockPut`
/// / `LockDeleted` of a `Pessimistic` lock; a `min_commit_ts` push or
/// heartbeat = `LockPut` over an existing lock. A commit's value is in its
/// write record when short, otherwise in the default family at
/// `(key, start_ts)` — written by the earlier prewrite batch, not this one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MvccChange {
    /// A lock was written on `key`: a prewrite, a pessimistic lock, or an
    /// update of an existing lock (heartbeat, `min_commit_ts` push).
    LockPut {
        /// The locked user key.
        key: Vec<u8>,
        /// The lock as written.
        lock: Lock,
    },
    /// The lock on `key` was removed (which transaction's is not recorded in
    /// the mutation; the feed knows from the lock it saw put).
    LockDeleted {
        /// The user key that is no longer locked.
        key: Vec<u8>,
    },
    /// A commit or rollback record was written for `key`.
    WritePut {
        /// The user key.
        key: Vec<u8>,
        /// Where the record sits: the commit ts, or the start ts for a
        /// rollback record.
        commit_ts: TimeStamp,
        /// The record.
        write: Write,
    },
    /// Only GC deletes write records.
    WriteDeleted {
        /// The user key.
        key: Vec<u8>,
        /// The timestamp the deleted record sat at.
        commit_ts: TimeStamp,
    },
    /// A value too long to inline was written by a prewrite.
    DefaultPut {
        /// The user key.
        key: Vec<u8>,
        /// The writing transaction's start ts.
        start_ts: TimeStamp,
        /// The full value.
        value: Vec<u8>,
    },
    /// A long value was removed, by a rollback or by GC.
    DefaultDeleted {
        /// The user key.
        key: Vec<u8>,
        /// The start ts of the transaction whose value it was.
        start_ts: TimeStamp,
    },
}

/// Decodes one applied mutation. Returns `None` for families outside the
/// transactional layout (`raw`, `meta`); undecodable keys or records are
/// `Error::Corrupt`.
pub fn decode_change(m: &Mutation) -> Result<Option<MvccChange>> {
    let change = match m.cf {
        Cf::Lock => {
            let (key, used) = decode_bytes(&m.key).map_err(|e| Error::corrupt("lock", e))?;
            if used != m.key.len() {
                return Err(Error::corrupt("lock", "trailing bytes after lock key"));
            }
            match &m.op {
                Op::Put(v) => MvccChange::LockPut {
                    key,
                    lock: Lock::from_bytes(v)?,
                },
                Op::Delete => MvccChange::LockDeleted { key },
            }
        }
        Cf::Write => {
            let (k, commit_ts) = key::split_versioned(&m.key, Cf::Write)?;
            let key = k.to_raw()?;
            match &m.op {
                Op::Put(v) => MvccChange::WritePut {
                    key,
                    commit_ts,
                    write: Write::from_bytes(v)?,
                },
                Op::Delete => MvccChange::WriteDeleted { key, commit_ts },
            }
        }
        Cf::Default => {
            let (k, start_ts) = key::split_versioned(&m.key, Cf::Default)?;
            let key = k.to_raw()?;
            match &m.op {
                Op::Put(v) => MvccChange::DefaultPut {
                    key,
                    start_ts,
                    value: v.clone(),
                },
                Op::Delete => MvccChange::DefaultDeleted { key, start_ts },
            }
        }
        Cf::Raw | Cf::Meta => return Ok(None),
    };
    Ok(Some(change))
}
