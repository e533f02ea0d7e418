//! Prewrite: the first phase of Percolator's two-phase commit.
//!
//! For every mutated key the transaction checks that nobody else holds a lock
//! and (optimistic) that nothing was committed after its `start_ts`, then
//! leaves a lock naming the primary. Rules, following TiKV's
//! `actions/prewrite.rs` and `commands/prewrite.rs`:
//!
//! - Another transaction's lock: `KeyIsLocked` (collected for every key so
//!   the client can resolve them in one round; if any key is locked nothing
//!   at all is written). A pessimistic key (`DoPessimisticCheck`) reports
//!   `PessimisticLockNotFound` instead.
//! - Our own non-pessimistic lock: a duplicate request, accepted unchanged.
//!   Our own pessimistic lock: overwritten by the real lock (an optimistic
//!   prewrite meeting it is `LockTypeNotMatch`). A pessimistic key without
//!   our lock: `PessimisticLockNotFound` (no lock amending).
//! - Optimistic (and `DoConstraintCheck`) keys: a write with commit_ts >
//!   start_ts is a `WriteConflict`. Timestamps are unique, so the only record
//!   that can sit at exactly start_ts is our own rollback (or another commit
//!   flagged with it), which is `WriteConflict` with reason `SelfRolledBack`.
//!   Pessimistic keys without a lock check (`SkipPessimisticCheck`) conflict
//!   on commits newer than `for_update_ts` and on our own rollback.
//! - `Insert` / `CheckNotExists` with a visible `Put`: `AlreadyExist`.
//! - Any error other than `KeyIsLocked` stops the command at that key and is
//!   returned alone. Before reporting `WriteConflict` or `KeyIsLocked` /
//!   `PessimisticLockNotFound`, the key is checked for our own commit record:
//!   if the transaction already committed, the prewrite is a stale retry and
//!   succeeds without writing anything (idempotence after commit).
//!
//! Async commit and 1PC: the final `min_commit_ts` of each lock is
//! `max(max_ts, start_ts, for_update_ts) + 1` (at least the requested
//! `min_commit_ts`), where `max_ts` is the highest timestamp any reader has
//! used (see `concurrency`). That keeps every already-served read below the
//! commit. If it exceeds a non-zero `max_commit_ts` the whole request falls
//! back to ordinary 2PC locks, as does a 1PC retry that finds locks left by
//! an earlier attempt of the same transaction. With `try_one_pc` the keys
//! are committed directly at the largest such timestamp — the server does
//! not pick 1PC commit timestamps from the oracle; the reply reports the one
//! chosen.

use super::conflict;
use crate::Error;
use crate::TimeStamp;
use crate::engine::WriteBatch;
use crate::mvcc::error::{TxnError, TxnResult, WriteConflictReason};
use crate::mvcc::key::{Key, check_key, check_value};
use crate::mvcc::lock::{Lock, LockInfo, LockType, is_short_value};
use crate::mvcc::reader::MvccReader;
use crate::mvcc::txn::MvccTxn;
use crate::mvcc::write::{Write, WriteType};

/// What one mutation does (kvrpcpb `Op`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MutationOp {
    /// Write this value.
    Put(Vec<u8>),
    /// Delete the key (commits as a `Delete` record).
    Delete,
    /// Lock the key without changing it (commits as a `Lock` record).
    Lock,
    /// Put that requires the key not to exist.
    Insert(Vec<u8>),
    /// Only check the key does not exist; writes nothing.
    CheckNotExists,
}

/// kvrpcpb `PrewriteRequest.PessimisticAction`; ignored by optimistic
/// transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PessimisticAction {
    /// The key was not pessimistically locked.
    #[default]
    SkipPessimisticCheck,
    /// The key must hold our pessimistic lock.
    DoPessimisticCheck,
    /// Not locked; check for conflicts and constraints like an optimistic txn.
    DoConstraintCheck,
}

/// One key of a prewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnMutation {
    /// The raw user key.
    pub key: Vec<u8>,
    /// What the transaction does to it.
    pub op: MutationOp,
    /// How a pessimistic prewrite checks the key; ignored by optimistic ones.
    pub pessimistic_action: PessimisticAction,
}

impl TxnMutation {
    /// A mutation with [`PessimisticAction::SkipPessimisticCheck`], as an
    /// optimistic transaction sends it.
    pub fn new(key: impl Into<Vec<u8>>, op: MutationOp) -> Self {
        TxnMutation {
            key: key.into(),
            op,
            pessimistic_action: PessimisticAction::default(),
        }
    }
}

/// A prewrite command.
#[derive(Clone, Debug, Default)]
pub struct PrewriteRequest {
    /// The keys to lock, each with what the transaction does to it.
    pub mutations: Vec<TxnMutation>,
    /// The transaction's primary key, recorded in every lock.
    pub primary: Vec<u8>,
    /// The transaction's start timestamp (its identity and read snapshot).
    pub start_ts: TimeStamp,
    /// Milliseconds.
    pub lock_ttl: u64,
    /// How many keys the whole transaction writes, as the client reports it;
    /// stored in the locks.
    pub txn_size: u64,
    /// Non-zero for pessimistic transactions.
    pub for_update_ts: TimeStamp,
    /// The lowest commit ts the client will use; stored in the locks so
    /// readers below it are not blocked.
    pub min_commit_ts: TimeStamp,
    /// Upper bound for async-commit/1PC timestamps (0 = none).
    pub max_commit_ts: TimeStamp,
    /// The transaction's source tag, carried into its locks and writes.
    pub txn_source: u64,
    /// `Some` ⇔ async commit; the secondary keys are stored on the primary.
    pub secondaries: Option<Vec<Vec<u8>>>,
    /// Commit the keys in this same step (1PC), writing commit records instead
    /// of locks; falls back to 2PC as the module docs describe.
    pub try_one_pc: bool,
}

impl PrewriteRequest {
    fn is_pessimistic(&self) -> bool {
        !self.for_update_ts.is_zero()
    }
}

/// Result of a prewrite that broke no rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrewriteOutcome {
    /// Locks of other transactions; if non-empty nothing was written.
    pub locks: Vec<LockInfo>,
    /// Async commit: the transaction's minimum commit_ts (0 otherwise or
    /// after a fallback to 2PC).
    pub min_commit_ts: TimeStamp,
    /// 1PC: the commit_ts the keys were committed at (0 if not 1PC).
    pub one_pc_commit_ts: TimeStamp,
}

/// A key that passed its checks and will be locked (or 1PC-committed).
struct Pending {
    key: Key,
    lock: Lock,
    had_pessimistic_lock: bool,
}

enum KeyResult {
    /// Our lock is already there (min_commit_ts of an async-commit lock).
    Duplicate(TimeStamp),
    /// A check-only mutation passed; nothing to write.
    Checked(TimeStamp),
    Lock(Pending),
}

/// Runs a prewrite over `reader`. `max_ts` is the concurrency manager's
/// maximum read timestamp, consulted only for async commit and 1PC.
pub fn prewrite(
    reader: &MvccReader<'_>,
    req: &PrewriteRequest,
    max_ts: TimeStamp,
) -> TxnResult<(WriteBatch, PrewriteOutcome)> {
    validate(req)?;
    let mut txn = MvccTxn::new();
    let mut locks = Vec::new();
    let mut pending = Vec::new();
    let mut min_commit_ts = TimeStamp::ZERO;
    let async_or_one_pc = req.secondaries.is_some() || req.try_one_pc;
    let mut saw_duplicate = false;
    for m in &req.mutations {
        let key = Key::from_raw(&m.key);
        match prewrite_key(&mut txn, reader, req, m, &key) {
            Ok(KeyResult::Duplicate(ts)) => {
                saw_duplicate = true;
                min_commit_ts = min_commit_ts.max(ts);
            }
            Ok(KeyResult::Checked(ts)) => {
                min_commit_ts = min_commit_ts.max(ts);
            }
            Ok(KeyResult::Lock(p)) => pending.push(p),
            Err(e @ TxnError::KeyIsLocked(_)) => match committed_already(reader, req, &key, e)? {
                Ok(done) => return Ok(done),
                Err(TxnError::KeyIsLocked(info)) => locks.push(*info),
                Err(e) => return Err(e),
            },
            Err(
                e @ (TxnError::WriteConflict { .. } | TxnError::PessimisticLockNotFound { .. }),
            ) => {
                return match committed_already(reader, req, &key, e)? {
                    Ok(done) => Ok(done),
                    Err(e) => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
    }
    if !locks.is_empty() {
        let outcome = PrewriteOutcome {
            locks,
            ..PrewriteOutcome::default()
        };
        return Ok((WriteBatch::new(), outcome));
    }

    // Final timestamps for async commit / 1PC. Any key above max_commit_ts
    // sends the whole request back to plain 2PC with the locks' original
    // min_commit_ts (a max_ts pushed by a bogus read timestamp must not make
    // the transaction uncommittable).
    let mut fallback = !async_or_one_pc;
    if async_or_one_pc {
        let floor = max_ts.max(req.start_ts).max(req.for_update_ts).next();
        let finals: Vec<TimeStamp> = pending
            .iter()
            .map(|p| p.lock.min_commit_ts.max(floor))
            .collect();
        let highest = finals.iter().copied().fold(min_commit_ts, TimeStamp::max);
        // A retry that finds locks of an earlier attempt must not commit the
        // remaining keys by 1PC while those locks stay behind.
        let stale_locks = req.try_one_pc && saw_duplicate;
        if stale_locks || (!req.max_commit_ts.is_zero() && highest > req.max_commit_ts) {
            fallback = true;
            for p in &mut pending {
                p.lock.use_async_commit = false;
                p.lock.secondaries.clear();
            }
        } else {
            for (p, ts) in pending.iter_mut().zip(finals) {
                p.lock.min_commit_ts = ts;
            }
            min_commit_ts = highest;
        }
    }

    let one_pc = req.try_one_pc && !fallback;
    if one_pc {
        let commit_ts = min_commit_ts;
        for p in pending {
            let mut write = Write::new(
                WriteType::from_lock_type(p.lock.lock_type),
                req.start_ts,
                p.lock.short_value,
            );
            write.txn_source = req.txn_source;
            write.has_overlapped_rollback = overlaps_rollback(reader, &p.key, commit_ts)?;
            txn.put_write(&p.key, commit_ts, &write);
            if p.had_pessimistic_lock {
                txn.unlock_key(&p.key);
            }
        }
    } else {
        for p in &pending {
            txn.put_lock(&p.key, &p.lock);
        }
    }
    let outcome = PrewriteOutcome {
        locks: Vec::new(),
        min_commit_ts: if req.secondaries.is_some() && !fallback {
            min_commit_ts
        } else {
            TimeStamp::ZERO
        },
        one_pc_commit_ts: if one_pc {
            min_commit_ts
        } else {
            TimeStamp::ZERO
        },
    };
    Ok((txn.into_batch(), outcome))
}

/// Whether a rollback record of another transaction sits at
/// `(key, commit_ts)`; a commit there must keep that fact.
pub(super) fn overlaps_rollback(
    reader: &MvccReader<'_>,
    key: &Key,
    commit_ts: TimeStamp,
) -> TxnResult<bool> {
    Ok(matches!(
        reader.write_at(key, commit_ts)?,
        Some(w) if w.write_type == WriteType::Rollback || w.has_overlapped_rollback
    ))
}

fn validate(req: &PrewriteRequest) -> TxnResult<()> {
    check_key(&req.primary)?;
    for m in &req.mutations {
        check_key(&m.key)?;
        match &m.op {
            MutationOp::Put(v) | MutationOp::Insert(v) => check_value(v)?,
            MutationOp::CheckNotExists if req.is_pessimistic() => {
                return Err(Error::InvalidInput(
                    "CheckNotExists is not allowed in a pessimistic prewrite".into(),
                )
                .into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// On an error for `key`, checks whether the transaction committed already;
/// if so the request is a stale retry: succeed, write nothing.
fn committed_already(
    reader: &MvccReader<'_>,
    req: &PrewriteRequest,
    key: &Key,
    err: TxnError,
) -> TxnResult<Result<(WriteBatch, PrewriteOutcome), TxnError>> {
    let Some(commit_ts) = reader
        .get_txn_commit_record(key, req.start_ts)?
        .committed_ts()
    else {
        return Ok(Err(err));
    };
    let outcome = PrewriteOutcome {
        locks: Vec::new(),
        min_commit_ts: if req.secondaries.is_some() {
            commit_ts
        } else {
            TimeStamp::ZERO
        },
        one_pc_commit_ts: if req.try_one_pc {
            commit_ts
        } else {
            TimeStamp::ZERO
        },
    };
    Ok(Ok((WriteBatch::new(), outcome)))
}

fn prewrite_key(
    txn: &mut MvccTxn,
    reader: &MvccReader<'_>,
    req: &PrewriteRequest,
    m: &TxnMutation,
    key: &Key,
) -> TxnResult<KeyResult> {
    let start_ts = req.start_ts;
    let pessimistic = req.is_pessimistic();
    let must_hold_lock =
        pessimistic && m.pessimistic_action == PessimisticAction::DoPessimisticCheck;
    let mut lock_ttl = req.lock_ttl;
    let mut min_commit_ts = req.min_commit_ts;
    let mut had_pessimistic_lock = false;
    match reader.load_lock(key)? {
        Some(lock) if lock.start_ts != start_ts => {
            if must_hold_lock {
                return Err(TxnError::PessimisticLockNotFound {
                    start_ts,
                    key: m.key.clone(),
                });
            }
            let mut info = lock.to_lock_info(m.key.clone());
            // A pessimistic transaction's secondary-index keys are protected by
            // its row locks; a zero TTL asks the client to resolve at once.
            if pessimistic {
                info.ttl = 0;
            }
            return Err(TxnError::locked(info));
        }
        Some(lock) if lock.lock_type == LockType::Pessimistic => {
            if !pessimistic {
                return Err(TxnError::LockTypeNotMatch {
                    start_ts,
                    key: m.key.clone(),
                    pessimistic: true,
                });
            }
            // The lock's TTL and min_commit_ts may have been pushed since.
            lock_ttl = lock_ttl.max(lock.ttl);
            min_commit_ts = min_commit_ts.max(lock.min_commit_ts);
            had_pessimistic_lock = true;
        }
        Some(lock) => {
            let ts = if lock.use_async_commit {
                lock.min_commit_ts
            } else {
                TimeStamp::ZERO
            };
            return Ok(KeyResult::Duplicate(ts));
        }
        None if must_hold_lock => {
            return Err(TxnError::PessimisticLockNotFound {
                start_ts,
                key: m.key.clone(),
            });
        }
        None => {}
    }

    let should_not_exist = matches!(m.op, MutationOp::Insert(_) | MutationOp::CheckNotExists);
    let optimistic_checks =
        !pessimistic || m.pessimistic_action == PessimisticAction::DoConstraintCheck;
    if optimistic_checks {
        if let Some((commit_ts, write)) = reader.seek_write(key, TimeStamp::MAX)?
            && commit_ts > start_ts
        {
            let reason = WriteConflictReason::Optimistic;
            return Err(conflict(
                req.start_ts,
                &req.primary,
                &m.key,
                commit_ts,
                &write,
                reason,
            ));
        }
        check_self_rollback(reader, req, m, key)?;
        if should_not_exist && reader.key_exists(key, TimeStamp::MAX)? {
            return Err(TxnError::AlreadyExist { key: m.key.clone() });
        }
    } else if !had_pessimistic_lock {
        // SkipPessimisticCheck: protected by row locks, but a commit newer
        // than for_update_ts means that protection was lost.
        if let Some((commit_ts, write)) = reader.seek_write(key, TimeStamp::MAX)?
            && commit_ts > req.for_update_ts
        {
            let reason = WriteConflictReason::PessimisticRetry;
            return Err(conflict(
                req.start_ts,
                &req.primary,
                &m.key,
                commit_ts,
                &write,
                reason,
            ));
        }
        check_self_rollback(reader, req, m, key)?;
    }

    let async_or_one_pc = req.secondaries.is_some() || req.try_one_pc;
    let (lock_type, value) = match &m.op {
        MutationOp::CheckNotExists => {
            let ts = if async_or_one_pc {
                min_commit_ts.max(start_ts.next())
            } else {
                TimeStamp::ZERO
            };
            return Ok(KeyResult::Checked(ts));
        }
        MutationOp::Put(v) | MutationOp::Insert(v) => (LockType::Put, Some(v)),
        MutationOp::Delete => (LockType::Delete, None),
        MutationOp::Lock => (LockType::Lock, None),
    };
    let mut lock = Lock::new(lock_type, req.primary.clone(), start_ts, lock_ttl);
    lock.for_update_ts = req.for_update_ts;
    lock.min_commit_ts = min_commit_ts;
    lock.txn_size = req.txn_size;
    lock.txn_source = req.txn_source;
    if let Some(secondaries) = &req.secondaries {
        lock.use_async_commit = true;
        if m.key == req.primary {
            lock.secondaries = secondaries.clone();
        }
    }
    if let Some(v) = value {
        if is_short_value(v) {
            lock.short_value = Some(v.clone());
        } else {
            txn.put_value(key, start_ts, v.clone());
        }
    }
    Ok(KeyResult::Lock(Pending {
        key: key.clone(),
        lock,
        had_pessimistic_lock,
    }))
}

fn check_self_rollback(
    reader: &MvccReader<'_>,
    req: &PrewriteRequest,
    m: &TxnMutation,
    key: &Key,
) -> TxnResult<()> {
    if let Some(write) = reader.write_at(key, req.start_ts)?
        && (write.has_overlapped_rollback
            || (write.write_type == WriteType::Rollback && write.start_ts == req.start_ts))
    {
        let reason = WriteConflictReason::SelfRolledBack;
        return Err(conflict(
            req.start_ts,
            &req.primary,
            &m.key,
            req.start_ts,
            &write,
            reason,
        ));
    }
    Ok(())
}
