//! Transactional reads and the two-phase-commit writes: get, batch get,
//! scan, prewrite, commit, rollback and pessimistic locks.
//!
//! Each handler turns the wire request into the MVCC library's request
//! (after the input limits and region membership are checked: nothing runs
//! for a refused request) and the library's outcome back into the wire
//! response. Transaction rules live in the library; what is decided here
//! is only the wire shape:
//! - reads report a blocking lock as `KeyError.locked`, per pair for scans
//!   and batch gets (which is where `tikv-client` looks);
//! - prewrite reports every blocking lock in `errors[]` (so the client can
//!   resolve them in one round) or the single rule error that stopped it;
//! - `one_pc_commit_ts` is non-zero only when 1PC was asked for, because the
//!   client aborts on a 1PC commit it did not request. The library picks the
//!   1PC commit timestamp above every read already served (its concurrency
//!   manager); the oracle is not consulted.
//!
//! Unsupported request features are refused rather than ignored when
//! ignoring them would change the answer (`sample_step`, the force-lock
//! wake-up mode, `lock_only_if_exists`); features that only add checks the
//! server does not make (assertions, `for_update_ts_constraints`,
//! `skip_constraint_check`) are ignored, which can only make the server
//! stricter. KvGet with `need_commit_ts` reports the commit_ts of the version
//! it read (0 when the key has no value at that version).
//!
//! Stale reads (`Context.stale_read`, on get, batch get and scan) are
//! served like any read once their version is at or below the store's safe
//! ts; above it they get `DataIsNotReady` ([`super::safe_ts`]).

use kvfeed_proto::kvrpcpb::{self, prewrite_request};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{
    MutationOp, PessimisticAction, PessimisticKey, PessimisticLockRequest, PrewriteRequest,
    ScanItem, ScanOptions, TxnMutation,
};

use super::context::{Direction, KeySpace, Scope};
use super::errors::{KvError, error_pair, key_error, lock_info};
use super::limits;
use crate::node::Node;

/// Start timestamps of locks the client has resolved and may read past.
pub fn bypass(ctx: Option<&kvrpcpb::Context>) -> Vec<TimeStamp> {
    ctx.map(|c| {
        c.resolved_locks
            .iter()
            .copied()
            .map(TimeStamp::new)
            .collect()
    })
    .unwrap_or_default()
}

/// Point keys of a transactional command: limits, then region membership.
fn txn_keys(scope: &Scope, keys: &[Vec<u8>]) -> Result<(), KvError> {
    limits::check_keys(keys)?;
    scope.check_keys(KeySpace::Txn, keys.iter().map(Vec::as_slice))
}

fn scan_pairs(items: Vec<ScanItem>) -> Vec<kvrpcpb::KvPair> {
    items
        .into_iter()
        .map(|item| match item {
            Ok((key, value)) => kvrpcpb::KvPair {
                key,
                value,
                ..Default::default()
            },
            Err(info) => kvrpcpb::KvPair {
                key: info.key.clone(),
                error: Some(kvrpcpb::KeyError {
                    locked: Some(lock_info(info)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        })
        .collect()
}

pub fn get(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::GetRequest,
) -> Result<kvrpcpb::GetResponse, KvError> {
    limits::check_key(&req.key)?;
    scope.check_key(KeySpace::Txn, &req.key)?;
    node.safe_ts()
        .check_read(req.context.as_ref(), scope, req.version)?;
    let bypass = bypass(req.context.as_ref());
    let mut resp = kvrpcpb::GetResponse::default();
    match node
        .txn()
        .get_versioned(&req.key, TimeStamp::new(req.version), &bypass)
    {
        Ok(Some((commit_ts, value))) => {
            resp.value = value;
            if req.need_commit_ts {
                resp.commit_ts = commit_ts.into_inner();
            }
        }
        Ok(None) => resp.not_found = true,
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn batch_get(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::BatchGetRequest,
) -> Result<kvrpcpb::BatchGetResponse, KvError> {
    txn_keys(scope, &req.keys)?;
    node.safe_ts()
        .check_read(req.context.as_ref(), scope, req.version)?;
    let bypass = bypass(req.context.as_ref());
    let mut resp = kvrpcpb::BatchGetResponse::default();
    match node
        .txn()
        .batch_get(&req.keys, TimeStamp::new(req.version), &bypass)
    {
        Ok(items) => resp.pairs = scan_pairs(items),
        Err(e) => {
            let err = key_error(e)?;
            resp.pairs = vec![error_pair(err.clone())];
            resp.error = Some(err);
        }
    }
    Ok(resp)
}

pub fn scan(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::ScanRequest,
) -> Result<kvrpcpb::ScanResponse, KvError> {
    limits::check_bound(&req.start_key)?;
    limits::check_bound(&req.end_key)?;
    if req.sample_step > 1 {
        return Err(KvError::Input(format!(
            "sample_step {} is not supported (0 or 1 reads every key)",
            req.sample_step
        )));
    }
    // Reverse scans carry the upper bound in start_key.
    let range = if req.reverse {
        scope.clamp(
            KeySpace::Txn,
            &req.end_key,
            &req.start_key,
            Direction::Reverse,
        )?
    } else {
        scope.clamp(
            KeySpace::Txn,
            &req.start_key,
            &req.end_key,
            Direction::Forward,
        )?
    };
    node.safe_ts()
        .check_read(req.context.as_ref(), scope, req.version)?;
    let bypass = bypass(req.context.as_ref());
    let opts = ScanOptions {
        start: &range.lower,
        end: &range.upper,
        ts: TimeStamp::new(req.version),
        limit: req.limit as usize,
        key_only: req.key_only,
        reverse: req.reverse,
        bypass: &bypass,
        max_bytes: kvfeed_storage::MAX_ANSWER_BYTES,
    };
    let mut resp = kvrpcpb::ScanResponse::default();
    match node.txn().scan(&opts) {
        Ok(items) => resp.pairs = scan_pairs(items),
        Err(e) => {
            let err = key_error(e)?;
            resp.pairs = vec![error_pair(err.clone())];
            resp.error = Some(err);
        }
    }
    Ok(resp)
}

/// The library's form of one wire mutation.
fn mutation(m: kvrpcpb::Mutation) -> Result<TxnMutation, KvError> {
    use kvrpcpb::Op;
    let op = match Op::try_from(m.op) {
        Ok(Op::Put) => MutationOp::Put(m.value),
        Ok(Op::Del) => MutationOp::Delete,
        Ok(Op::Lock) => MutationOp::Lock,
        Ok(Op::Insert) => MutationOp::Insert(m.value),
        Ok(Op::CheckNotExists) => MutationOp::CheckNotExists,
        Ok(other @ (Op::Rollback | Op::PessimisticLock)) => {
            return Err(KvError::Input(format!(
                "mutation op {} is not allowed in a prewrite",
                other.as_str_name()
            )));
        }
        Err(_) => {
            return Err(KvError::Input(format!(
                "unknown mutation op {} (expected Put, Del, Lock, Insert or CheckNotExists)",
                m.op
            )));
        }
    };
    Ok(TxnMutation::new(m.key, op))
}

fn pessimistic_action(raw: i32) -> Result<PessimisticAction, KvError> {
    use prewrite_request::PessimisticAction as Wire;
    match Wire::try_from(raw) {
        Ok(Wire::SkipPessimisticCheck) => Ok(PessimisticAction::SkipPessimisticCheck),
        Ok(Wire::DoPessimisticCheck) => Ok(PessimisticAction::DoPessimisticCheck),
        Ok(Wire::DoConstraintCheck) => Ok(PessimisticAction::DoConstraintCheck),
        Err(_) => Err(KvError::Input(format!("unknown pessimistic action {raw}"))),
    }
}

pub fn prewrite(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::PrewriteRequest,
) -> Result<kvrpcpb::PrewriteResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    limits::check_distinct(
        req.mutations.iter().map(|m| m.key.as_slice()),
        "mutation list",
    )?;
    limits::check_key(&req.primary_lock)?;
    for m in &req.mutations {
        limits::check_key(&m.key)?;
        limits::check_value(&m.value)?;
    }
    // `tikv-client` shards the mutations by region but sends every shard
    // the whole transaction's action list, so a longer list is normal:
    // entry i belongs to mutation i and the rest is ignored (TiKV zips the
    // two). A shorter, non-empty list would leave mutations without an
    // action and is refused.
    if !req.pessimistic_actions.is_empty() && req.pessimistic_actions.len() < req.mutations.len() {
        return Err(KvError::Input(format!(
            "{} pessimistic actions for {} mutations (expected none or one per mutation)",
            req.pessimistic_actions.len(),
            req.mutations.len()
        )));
    }
    let secondaries = if req.use_async_commit {
        limits::check_keys(&req.secondaries)?;
        Some(req.secondaries)
    } else {
        None
    };
    let mut mutations = Vec::with_capacity(req.mutations.len());
    for (i, m) in req.mutations.into_iter().enumerate() {
        let mut m = mutation(m)?;
        if let Some(&action) = req.pessimistic_actions.get(i) {
            m.pessimistic_action = pessimistic_action(action)?;
        }
        mutations.push(m);
    }
    scope.check_keys(KeySpace::Txn, mutations.iter().map(|m| m.key.as_slice()))?;
    let cmd = PrewriteRequest {
        mutations,
        primary: req.primary_lock,
        start_ts,
        lock_ttl: req.lock_ttl,
        txn_size: req.txn_size,
        for_update_ts: TimeStamp::new(req.for_update_ts),
        min_commit_ts: TimeStamp::new(req.min_commit_ts),
        max_commit_ts: TimeStamp::new(req.max_commit_ts),
        txn_source: req.context.as_ref().map_or(0, |c| c.txn_source),
        secondaries,
        try_one_pc: req.try_one_pc,
    };
    let mut resp = kvrpcpb::PrewriteResponse::default();
    match node.txn().prewrite(&cmd) {
        Ok(outcome) => {
            resp.errors = outcome
                .locks
                .into_iter()
                .map(|info| kvrpcpb::KeyError {
                    locked: Some(lock_info(info)),
                    ..Default::default()
                })
                .collect();
            resp.min_commit_ts = outcome.min_commit_ts.into_inner();
            if req.try_one_pc {
                resp.one_pc_commit_ts = outcome.one_pc_commit_ts.into_inner();
            }
        }
        Err(e) => resp.errors = vec![key_error(e)?],
    }
    Ok(resp)
}

pub fn commit(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::CommitRequest,
) -> Result<kvrpcpb::CommitResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    let commit_ts = limits::check_commit_ts(start_ts, req.commit_version)?;
    txn_keys(scope, &req.keys)?;
    let mut resp = kvrpcpb::CommitResponse::default();
    match node.txn().commit(&req.keys, start_ts, commit_ts) {
        Ok(()) => resp.commit_version = commit_ts.into_inner(),
        Err(e) => resp.error = Some(key_error(e)?),
    }
    Ok(resp)
}

pub fn batch_rollback(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::BatchRollbackRequest,
) -> Result<kvrpcpb::BatchRollbackResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    txn_keys(scope, &req.keys)?;
    let mut resp = kvrpcpb::BatchRollbackResponse::default();
    if let Err(e) = node.txn().batch_rollback(&req.keys, start_ts) {
        resp.error = Some(key_error(e)?);
    }
    Ok(resp)
}

pub fn pessimistic_lock(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::PessimisticLockRequest,
) -> Result<kvrpcpb::PessimisticLockResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    let for_update_ts = limits::check_ts(req.for_update_ts, "for_update_ts")?;
    limits::check_distinct(req.mutations.iter().map(|m| m.key.as_slice()), "key list")?;
    limits::check_key(&req.primary_lock)?;
    if req.wake_up_mode == kvrpcpb::PessimisticLockWakeUpMode::WakeUpModeForceLock as i32 {
        return Err(KvError::Input(
            "wake_up_mode WakeUpModeForceLock is not supported".to_owned(),
        ));
    }
    if req.lock_only_if_exists {
        return Err(KvError::Input(
            "lock_only_if_exists is not supported".to_owned(),
        ));
    }
    let mut keys = Vec::with_capacity(req.mutations.len());
    for m in req.mutations {
        limits::check_key(&m.key)?;
        if m.op != kvrpcpb::Op::PessimisticLock as i32 {
            let name = kvrpcpb::Op::try_from(m.op)
                .map(|op| op.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("unknown op {}", m.op));
            return Err(KvError::Input(format!(
                "mutation op {name} is not allowed in a pessimistic lock request \
                 (expected PessimisticLock)"
            )));
        }
        keys.push(PessimisticKey {
            should_not_exist: m.assertion == kvrpcpb::Assertion::NotExist as i32,
            key: m.key,
        });
    }
    scope.check_keys(KeySpace::Txn, keys.iter().map(|k| k.key.as_slice()))?;
    let cmd = PessimisticLockRequest {
        keys,
        primary: req.primary_lock,
        start_ts,
        for_update_ts,
        lock_ttl: req.lock_ttl,
        min_commit_ts: TimeStamp::new(req.min_commit_ts),
        txn_size: 0,
        return_values: req.return_values,
        check_existence: req.check_existence,
    };
    let mut resp = kvrpcpb::PessimisticLockResponse::default();
    match node.txn().acquire_pessimistic_lock(&cmd) {
        Ok(outcome) => {
            // Both lists follow the request's key order, one entry per key.
            resp.not_founds = outcome.values.iter().map(Option::is_none).collect();
            if req.return_values {
                resp.values = outcome
                    .values
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect();
            }
        }
        Err(e) => resp.errors = vec![key_error(e)?],
    }
    Ok(resp)
}

pub fn pessimistic_rollback(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::PessimisticRollbackRequest,
) -> Result<kvrpcpb::PessimisticRollbackResponse, KvError> {
    let start_ts = limits::check_ts(req.start_version, "start_version")?;
    let for_update_ts = limits::check_ts(req.for_update_ts, "for_update_ts")?;
    txn_keys(scope, &req.keys)?;
    let mut resp = kvrpcpb::PessimisticRollbackResponse::default();
    if let Err(e) = node
        .txn()
        .pessimistic_rollback(&req.keys, start_ts, for_update_ts)
    {
        resp.errors = vec![key_error(e)?];
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(r: Result<impl std::fmt::Debug, KvError>) -> String {
        match r {
            Err(KvError::Input(m)) => m,
            other => format!("unexpected {other:?}"),
        }
    }

    #[test]
    fn mutation_ops_map_and_unknown_ones_are_refused() {
        let m = |op: i32| kvrpcpb::Mutation {
            op,
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        let op_of = |op: i32| mutation(m(op)).map(|t| t.op);
        assert_eq!(op_of(0).ok(), Some(MutationOp::Put(b"v".to_vec())));
        assert_eq!(op_of(1).ok(), Some(MutationOp::Delete));
        assert_eq!(op_of(2).ok(), Some(MutationOp::Lock));
        assert_eq!(op_of(4).ok(), Some(MutationOp::Insert(b"v".to_vec())));
        assert_eq!(op_of(6).ok(), Some(MutationOp::CheckNotExists));
        assert!(input(op_of(3)).contains("Rollback"));
        assert!(input(op_of(5)).contains("PessimisticLock"));
        assert!(input(op_of(42)).contains("unknown mutation op 42"));
        assert!(input(op_of(-1)).contains("-1"));
    }

    #[test]
    fn pessimistic_actions_map() {
        assert_eq!(
            pessimistic_action(1).ok(),
            Some(PessimisticAction::DoPessimisticCheck)
        );
        assert!(input(pessimistic_action(7)).contains("7"));
    }

    #[test]
    fn bypass_comes_from_resolved_locks() {
        let ctx = kvrpcpb::Context {
            resolved_locks: vec![3, 9],
            ..Default::default()
        };
        assert_eq!(
            bypass(Some(&ctx)),
            vec![TimeStamp::new(3), TimeStamp::new(9)]
        );
        assert!(bypass(None).is_empty());
    }
}
