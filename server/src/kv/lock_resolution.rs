//! Finding out and deciding what happened to other transactions: check txn
//! status, heartbeat, check secondary locks, cleanup, scan lock, resolve
//! lock, plus the region-wide maintenance calls GC and delete range.
//!
//! `CheckTxnStatusResponse` has one invariant the client relies on (it
//! panics otherwise): `(commit_version, lock_ttl, lock_info)` is exactly one
//! of `(0, 0, none)` rolled back, `(ts, 0, none)` committed, or
//! `(0, ttl > 0, some)` locked. A live lock may carry a TTL of 0 (prewrite
//! accepts it), so a locked answer reports at least 1 ms: the lock is
//! reported as locked, and the client's own expiry check then treats it as
//! expired at once, which is what a zero TTL means.
//!
//! Region-wide commands (resolve lock without keys, scan lock, GC) act on
//! the intersection of the request with the region only, as TiKV does:
//! the client sends one request per region.
//!
//! KvGC runs MVCC garbage collection over the region below `safe_point`. A
//! safe point above the newest timestamp the oracle handed out is refused:
//! it can only be a client bug, and honouring it would drop versions that
//! readers with valid timestamps still need. KvDeleteRange (delete every
//! version in a range, bypassing transactions) is not supported and says
//! so; TiDB uses it only for dropped tables, and the change feed could not
//! report it as row changes.

use std::collections::BTreeMap;

use kvfeed_proto::kvrpcpb;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{CheckTxnStatusRequest, SecondaryLocksStatus, TxnError, TxnStatus};

use super::context::{Direction, KeySpace, Scope};
use super::errors::{KvError, key_error, lock_info};
use super::limits;
use crate::node::Node;

fn primary(scope: &Scope, key: &[u8]) -> Result<(), KvError> {
    limits::check_key(key)?;
    scope.check_key(KeySpace::Txn, key)
}

pub fn check_txn_status(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::CheckTxnStatusRequest,
) -> Result<kvrpcpb::CheckTxnStatusResponse, KvError> {
    let lock_ts = limits::check_ts(req.lock_ts, "lock_ts")?;
    primary(scope, &req.primary_key)?;
    let cmd = CheckTxnStatusRequest {
        primary_key: req.primary_key,
        lock_ts,
        caller_start_ts: TimeStamp::new(req.caller_start_ts),
        current_ts: TimeStamp::new(req.current_ts),
        rollback_if_not_exist: req.rollback_if_not_exist,
        force_sync_commit: req.force_sync_commit,
        resolving_pessimistic_lock: req.resolving_pessimistic_lock,
        verify_is_primary: req.verify_is_primary,
    };
    let mut resp = kvrpcpb::CheckTxnStatusResponse::default();
    match node.txn().check_txn_status(&cmd) {
        Ok(status) => fill_status(&mut resp, status),
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

/// Writes `status` in the one shape the client accepts for it.
fn fill_status(resp: &mut kvrpcpb::CheckTxnStatusResponse, status: TxnStatus) {
    use kvrpcpb::Action;
    let action = match status {
        TxnStatus::RolledBack => Action::NoAction,
        TxnStatus::TtlExpire => Action::TtlExpireRollback,
        TxnStatus::LockNotExist => Action::LockNotExistRollback,
        TxnStatus::PessimisticRollBack => Action::TtlExpirePessimisticRollback,
        TxnStatus::LockNotExistDoNothing => Action::LockNotExistDoNothing,
        TxnStatus::Committed { commit_ts } => {
            resp.commit_version = commit_ts.into_inner();
            Action::NoAction
        }
        TxnStatus::Uncommitted {
            lock,
            min_commit_ts_pushed,
        } => {
            resp.lock_ttl = lock.ttl.max(1);
            resp.lock_info = Some(lock_info(lock));
            if min_commit_ts_pushed {
                Action::MinCommitTsPushed
            } else {
                Action::NoAction
            }
        }
    };
    resp.action = action as i32;
}

pub fn txn_heart_beat(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::TxnHeartBeatRequest,
) -> Result<kvrpcpb::TxnHeartBeatResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    primary(scope, &req.primary_lock)?;
    let mut resp = kvrpcpb::TxnHeartBeatResponse::default();
    match node
        .txn()
        .txn_heart_beat(&req.primary_lock, start_ts, req.advise_lock_ttl)
    {
        Ok(ttl) => resp.lock_ttl = ttl,
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn check_secondary_locks(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::CheckSecondaryLocksRequest,
) -> Result<kvrpcpb::CheckSecondaryLocksResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    limits::check_keys(&req.keys)?;
    scope.check_keys(KeySpace::Txn, req.keys.iter().map(Vec::as_slice))?;
    let mut resp = kvrpcpb::CheckSecondaryLocksResponse::default();
    match node.txn().check_secondary_locks(&req.keys, start_ts) {
        Ok(SecondaryLocksStatus::Locked(locks)) => {
            resp.locks = locks.into_iter().map(lock_info).collect();
        }
        Ok(SecondaryLocksStatus::Committed(ts)) => resp.commit_ts = ts.into_inner(),
        // Neither locks nor a commit ts: the client reads that as rolled back.
        Ok(SecondaryLocksStatus::RolledBack) => {}
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn cleanup(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::CleanupRequest,
) -> Result<kvrpcpb::CleanupResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    primary(scope, &req.key)?;
    let mut resp = kvrpcpb::CleanupResponse::default();
    match node
        .txn()
        .cleanup(&req.key, start_ts, TimeStamp::new(req.current_ts))
    {
        Ok(()) => {}
        // Cleanup of a committed transaction answers with its commit ts.
        Err(TxnError::Committed { commit_ts, .. }) => {
            resp.commit_version = commit_ts.into_inner();
        }
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn scan_lock(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::ScanLockRequest,
) -> Result<kvrpcpb::ScanLockResponse, KvError> {
    limits::check_bound(&req.start_key)?;
    limits::check_bound(&req.end_key)?;
    let range = scope.clamp(
        KeySpace::Txn,
        &req.start_key,
        &req.end_key,
        Direction::Forward,
    )?;
    let mut resp = kvrpcpb::ScanLockResponse::default();
    match node.txn().scan_lock(
        TimeStamp::new(req.max_version),
        &range.lower,
        &range.upper,
        req.limit as usize,
    ) {
        Ok(locks) => resp.locks = locks.into_iter().map(lock_info).collect(),
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

/// A transaction's outcome as ResolveLock states it: commit ts, 0 for
/// rolled back.
fn outcome(start: u64, commit: u64) -> Result<(TimeStamp, TimeStamp), KvError> {
    let start_ts = limits::check_ts(start, "start_version")?;
    let commit_ts = if commit == 0 {
        TimeStamp::ZERO
    } else {
        limits::check_commit_ts(start_ts, commit)?
    };
    Ok((start_ts, commit_ts))
}

/// Three forms, first match wins: explicit `keys` (one transaction,
/// `start_version`/`commit_version`); batched `txn_infos` over the region;
/// a single transaction over the region.
pub fn resolve_lock(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::ResolveLockRequest,
) -> Result<kvrpcpb::ResolveLockResponse, KvError> {
    let result = if !req.keys.is_empty() {
        let (start_ts, commit_ts) = outcome(req.start_version, req.commit_version)?;
        limits::check_keys(&req.keys)?;
        scope.check_keys(KeySpace::Txn, req.keys.iter().map(Vec::as_slice))?;
        node.txn().resolve_lock_keys(&req.keys, start_ts, commit_ts)
    } else {
        let mut txns = BTreeMap::new();
        if req.txn_infos.is_empty() {
            let (start_ts, commit_ts) = outcome(req.start_version, req.commit_version)?;
            txns.insert(start_ts, commit_ts);
        }
        for info in &req.txn_infos {
            let (start_ts, commit_ts) = outcome(info.txn, info.status)?;
            txns.insert(start_ts, commit_ts);
        }
        let range = scope.whole(KeySpace::Txn)?;
        node.txn()
            .resolve_locks_in_range(&txns, &range.lower, &range.upper)
    };
    let mut resp = kvrpcpb::ResolveLockResponse::default();
    if let Err(e) = result {
        resp.error = Some(key_error(e)?);
    }
    Ok(resp)
}

pub fn gc(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::GcRequest,
) -> Result<kvrpcpb::GcResponse, KvError> {
    let safe_point = TimeStamp::new(req.safe_point);
    let newest = node.last_ts();
    if safe_point > newest {
        return Err(KvError::Input(format!(
            "safe_point {safe_point} is ahead of the newest timestamp {newest}"
        )));
    }
    let range = scope.whole(KeySpace::Txn)?;
    let mut resp = kvrpcpb::GcResponse::default();
    match node.txn().gc(safe_point, &range.lower, &range.upper) {
        Ok(stats) => tracing::info!(
            region_id = %scope.id(),
            %safe_point,
            keys = stats.keys,
            deleted_writes = stats.deleted_writes,
            deleted_values = stats.deleted_values,
            "mvcc gc"
        ),
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn delete_range(
    _node: &Node,
    scope: &Scope,
    req: kvrpcpb::DeleteRangeRequest,
) -> Result<kvrpcpb::DeleteRangeResponse, KvError> {
    limits::check_bound(&req.start_key)?;
    limits::check_bound(&req.end_key)?;
    scope.clamp(
        KeySpace::Txn,
        &req.start_key,
        &req.end_key,
        Direction::Forward,
    )?;
    Err(KvError::Input(
        "DeleteRange is not supported: delete the keys in a transaction, \
         or use RawDeleteRange for raw data"
            .to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use kvfeed_storage::mvcc::{LockInfo, LockType};

    use super::*;

    fn shape(status: TxnStatus) -> (u64, u64, bool, i32) {
        let mut resp = kvrpcpb::CheckTxnStatusResponse::default();
        fill_status(&mut resp, status);
        (
            resp.commit_version,
            resp.lock_ttl,
            resp.lock_info.is_some(),
            resp.action,
        )
    }

    fn lock(ttl: u64) -> LockInfo {
        LockInfo {
            key: b"p".to_vec(),
            primary: b"p".to_vec(),
            start_ts: TimeStamp::new(10),
            ttl,
            lock_type: LockType::Put,
            txn_size: 1,
            for_update_ts: TimeStamp::ZERO,
            min_commit_ts: TimeStamp::new(11),
            use_async_commit: false,
            secondaries: Vec::new(),
        }
    }

    #[test]
    fn every_status_has_one_consistent_shape() {
        use kvrpcpb::Action;
        let rolled_back = [
            (TxnStatus::RolledBack, Action::NoAction),
            (TxnStatus::TtlExpire, Action::TtlExpireRollback),
            (TxnStatus::LockNotExist, Action::LockNotExistRollback),
            (
                TxnStatus::PessimisticRollBack,
                Action::TtlExpirePessimisticRollback,
            ),
            (
                TxnStatus::LockNotExistDoNothing,
                Action::LockNotExistDoNothing,
            ),
        ];
        for (status, action) in rolled_back {
            assert_eq!(shape(status), (0, 0, false, action as i32));
        }
        assert_eq!(
            shape(TxnStatus::Committed {
                commit_ts: TimeStamp::new(20)
            }),
            (20, 0, false, Action::NoAction as i32)
        );
        assert_eq!(
            shape(TxnStatus::Uncommitted {
                lock: lock(3000),
                min_commit_ts_pushed: true
            }),
            (0, 3000, true, Action::MinCommitTsPushed as i32)
        );
        // A zero-TTL lock must still read as locked, never as (0, 0, some).
        assert_eq!(
            shape(TxnStatus::Uncommitted {
                lock: lock(0),
                min_commit_ts_pushed: false
            }),
            (0, 1, true, Action::NoAction as i32)
        );
    }

    #[test]
    fn resolve_outcomes_are_validated() {
        assert!(outcome(0, 0).is_err());
        assert!(outcome(5, 5).is_err());
        assert!(outcome(5, 4).is_err());
        assert_eq!(
            outcome(5, 0).ok(),
            Some((TimeStamp::new(5), TimeStamp::ZERO))
        );
        assert_eq!(
            outcome(5, 6).ok(),
            Some((TimeStamp::new(5), TimeStamp::new(6)))
        );
    }
}
