//! How failures leave the KV service: the one place that decides between a
//! region error, a per-key error, the response's error field and a gRPC
//! status.
//!
//! The choice is part of the contract, because clients react per shape:
//! - a region error (`errorpb.Error`) makes `tikv-client` drop its region
//!   cache, back off and re-ask PD, so it is used only when the request was
//!   routed wrongly (unknown region, stale epoch, key outside the region);
//! - a transaction rule's refusal is a `KeyError` with the field kvrpcpb
//!   defines for it (locked, conflict, already_exist, ...), which drives lock
//!   resolution or reaches the user;
//! - bad input is the response's own error (`KeyError.abort`, a raw call's
//!   `error` string, or one pair carrying a `KeyError`): a final answer that
//!   no retry can change;
//! - a storage failure is a gRPC status (`UNAVAILABLE` for engine and
//!   write-refusal failures, `INTERNAL` for corrupt data), never
//!   `region_not_found`: the request was fine, the server was not, and
//!   pretending otherwise sends clients into a region-refresh loop.

use kvfeed_proto::{errorpb, kvrpcpb};
use kvfeed_storage::mvcc::{LockInfo, LockType, TxnError, WriteConflictReason};
use tonic::Status;

/// Why a request was not served normally.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The request carried no `Context`, so no region can be checked.
    #[error("request has no context: region_id and region_epoch are required")]
    MissingContext,
    /// The request was routed to the wrong region or with a stale epoch.
    #[error("{}", .0.message)]
    Region(Box<errorpb::Error>),
    /// The request is malformed or exceeds a limit; the message says which.
    #[error("{0}")]
    Input(String),
    /// The store failed underneath the command.
    #[error(transparent)]
    Storage(kvfeed_storage::Error),
}

impl From<kvfeed_storage::Error> for KvError {
    fn from(err: kvfeed_storage::Error) -> KvError {
        match err {
            kvfeed_storage::Error::InvalidInput(msg) => KvError::Input(msg),
            other => KvError::Storage(other),
        }
    }
}

impl KvError {
    /// The gRPC status for errors that are not answered in the response.
    pub fn to_status(&self, method: &str) -> Status {
        match self {
            KvError::MissingContext => Status::invalid_argument(format!("{method}: {self}")),
            KvError::Storage(
                kvfeed_storage::Error::Engine { .. } | kvfeed_storage::Error::Poisoned { .. },
            ) => Status::unavailable(format!("{method}: {self}")),
            _ => Status::internal(format!("{method}: {self}")),
        }
    }
}

/// The `KeyError` for a transaction rule's refusal. Storage failures are
/// not key errors and come back as `Err` (bad input as `KeyError.abort`).
pub fn key_error(err: TxnError) -> Result<kvrpcpb::KeyError, KvError> {
    let mut out = kvrpcpb::KeyError::default();
    match err {
        TxnError::KeyIsLocked(info) => out.locked = Some(lock_info(*info)),
        TxnError::WriteConflict {
            start_ts,
            conflict_start_ts,
            conflict_commit_ts,
            ref key,
            ref primary,
            reason,
        } => {
            // TiKV also fills `retryable` for clients that predate `conflict`.
            out.retryable = err.to_string();
            out.conflict = Some(kvrpcpb::WriteConflict {
                start_ts: start_ts.into_inner(),
                conflict_ts: conflict_start_ts.into_inner(),
                key: key.clone(),
                primary: primary.clone(),
                conflict_commit_ts: conflict_commit_ts.into_inner(),
                reason: conflict_reason(reason) as i32,
            });
        }
        TxnError::AlreadyExist { key } => {
            out.already_exist = Some(kvrpcpb::AlreadyExist { key });
        }
        TxnError::CommitTsExpired {
            start_ts,
            attempted_commit_ts,
            min_commit_ts,
            key,
        } => {
            out.commit_ts_expired = Some(kvrpcpb::CommitTsExpired {
                start_ts: start_ts.into_inner(),
                attempted_commit_ts: attempted_commit_ts.into_inner(),
                key,
                min_commit_ts: min_commit_ts.into_inner(),
            });
        }
        TxnError::TxnNotFound { start_ts, key } => {
            out.txn_not_found = Some(kvrpcpb::TxnNotFound {
                start_ts: start_ts.into_inner(),
                primary_key: key,
            });
        }
        // kvrpcpb's `txn_lock_not_found` is newer than the protocol served
        // here; TiKV answers older clients with `retryable`, and so do we.
        // `tikv-client` surfaces either as a key error to the user.
        TxnError::TxnLockNotFound { .. } | TxnError::PessimisticLockNotFound { .. } => {
            out.retryable = err.to_string();
        }
        TxnError::PessimisticLockRolledBack { .. }
        | TxnError::LockTypeNotMatch { .. }
        | TxnError::Committed { .. }
        | TxnError::PrimaryMismatch(_)
        | TxnError::InvalidTxnTso { .. } => out.abort = err.to_string(),
        TxnError::Storage(e) => match KvError::from(e) {
            KvError::Input(msg) => out.abort = msg,
            other => return Err(other),
        },
    }
    Ok(out)
}

/// A `KeyError` for bad input.
pub fn abort(msg: String) -> kvrpcpb::KeyError {
    kvrpcpb::KeyError {
        abort: msg,
        ..Default::default()
    }
}

fn conflict_reason(reason: WriteConflictReason) -> kvrpcpb::write_conflict::Reason {
    use kvrpcpb::write_conflict::Reason;
    match reason {
        WriteConflictReason::Optimistic => Reason::Optimistic,
        WriteConflictReason::PessimisticRetry => Reason::PessimisticRetry,
        WriteConflictReason::SelfRolledBack => Reason::SelfRolledBack,
    }
}

/// The wire form of a lock.
pub fn lock_info(info: LockInfo) -> kvrpcpb::LockInfo {
    let lock_type = match info.lock_type {
        LockType::Put => kvrpcpb::Op::Put,
        LockType::Delete => kvrpcpb::Op::Del,
        LockType::Lock => kvrpcpb::Op::Lock,
        LockType::Pessimistic => kvrpcpb::Op::PessimisticLock,
    };
    kvrpcpb::LockInfo {
        primary_lock: info.primary,
        lock_version: info.start_ts.into_inner(),
        key: info.key,
        lock_ttl: info.ttl,
        txn_size: info.txn_size,
        lock_type: lock_type as i32,
        lock_for_update_ts: info.for_update_ts.into_inner(),
        use_async_commit: info.use_async_commit,
        min_commit_ts: info.min_commit_ts.into_inner(),
        secondaries: info.secondaries,
        duration_to_last_update_ms: 0,
    }
}

/// Lower-case hex of `bytes`, for messages.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Every KV response: where a region error and an input error go.
pub trait KvResponse: Default + Send + 'static {
    fn set_region_error(&mut self, err: errorpb::Error);
    fn set_input_error(&mut self, msg: String);
}

/// Responses with `error: Option<KeyError>`.
macro_rules! key_error_field {
    ($($t:ident),* $(,)?) => {$(
        impl KvResponse for kvrpcpb::$t {
            fn set_region_error(&mut self, err: errorpb::Error) {
                self.region_error = Some(err);
            }
            fn set_input_error(&mut self, msg: String) {
                self.error = Some(abort(msg));
            }
        }
    )*};
}

/// Responses with `errors: Vec<KeyError>`.
macro_rules! key_errors_field {
    ($($t:ident),* $(,)?) => {$(
        impl KvResponse for kvrpcpb::$t {
            fn set_region_error(&mut self, err: errorpb::Error) {
                self.region_error = Some(err);
            }
            fn set_input_error(&mut self, msg: String) {
                self.errors = vec![abort(msg)];
            }
        }
    )*};
}

/// Responses with `error: String`.
macro_rules! string_error_field {
    ($($t:ident),* $(,)?) => {$(
        impl KvResponse for kvrpcpb::$t {
            fn set_region_error(&mut self, err: errorpb::Error) {
                self.region_error = Some(err);
            }
            fn set_input_error(&mut self, msg: String) {
                self.error = msg;
            }
        }
    )*};
}

/// Responses whose only error channel is a pair list (`$field`): the error
/// travels as a single pair carrying a `KeyError`, as TiKV does.
macro_rules! pair_error_field {
    ($($t:ident . $field:ident),* $(,)?) => {$(
        impl KvResponse for kvrpcpb::$t {
            fn set_region_error(&mut self, err: errorpb::Error) {
                self.region_error = Some(err);
            }
            fn set_input_error(&mut self, msg: String) {
                self.$field = vec![error_pair(abort(msg))];
            }
        }
    )*};
}

key_error_field!(
    GetResponse,
    TxnHeartBeatResponse,
    CheckTxnStatusResponse,
    CheckSecondaryLocksResponse,
    CommitResponse,
    CleanupResponse,
    BatchRollbackResponse,
    ScanLockResponse,
    ResolveLockResponse,
    GcResponse,
);
key_errors_field!(
    PrewriteResponse,
    PessimisticLockResponse,
    PessimisticRollbackResponse,
);
string_error_field!(
    DeleteRangeResponse,
    RawGetResponse,
    RawPutResponse,
    RawBatchPutResponse,
    RawDeleteResponse,
    RawBatchDeleteResponse,
    RawDeleteRangeResponse,
    RawGetKeyTtlResponse,
    RawCasResponse,
);
pair_error_field!(
    RawBatchGetResponse.pairs,
    RawScanResponse.kvs,
    RawBatchScanResponse.kvs,
);

/// Scan and batch get have both a top-level error and per-pair errors;
/// `tikv-client` reads only the pairs, older clients only the top level, so
/// an input error goes to both (as TiKV does).
macro_rules! scan_error_fields {
    ($($t:ident),* $(,)?) => {$(
        impl KvResponse for kvrpcpb::$t {
            fn set_region_error(&mut self, err: errorpb::Error) {
                self.region_error = Some(err);
            }
            fn set_input_error(&mut self, msg: String) {
                let err = abort(msg);
                self.pairs = vec![error_pair(err.clone())];
                self.error = Some(err);
            }
        }
    )*};
}
scan_error_fields!(ScanResponse, BatchGetResponse);

/// A pair that carries only an error.
pub fn error_pair(err: kvrpcpb::KeyError) -> kvrpcpb::KvPair {
    kvrpcpb::KvPair {
        error: Some(err),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use kvfeed_storage::TimeStamp;

    use super::*;

    fn ts(n: u64) -> TimeStamp {
        TimeStamp::new(n)
    }

    fn info() -> LockInfo {
        LockInfo {
            key: b"k".to_vec(),
            primary: b"p".to_vec(),
            start_ts: ts(5),
            ttl: 3000,
            lock_type: LockType::Delete,
            txn_size: 2,
            for_update_ts: ts(6),
            min_commit_ts: ts(7),
            use_async_commit: true,
            secondaries: vec![b"s".to_vec()],
        }
    }

    #[test]
    fn lock_info_fields_map_one_to_one() {
        let l = lock_info(info());
        assert_eq!(l.primary_lock, b"p");
        assert_eq!(l.key, b"k");
        assert_eq!((l.lock_version, l.lock_ttl, l.txn_size), (5, 3000, 2));
        assert_eq!(l.lock_type, kvrpcpb::Op::Del as i32);
        assert_eq!((l.lock_for_update_ts, l.min_commit_ts), (6, 7));
        assert!(l.use_async_commit);
        assert_eq!(l.secondaries, vec![b"s".to_vec()]);
    }

    #[test]
    fn rule_errors_use_their_own_fields() -> Result<(), KvError> {
        let e = key_error(TxnError::KeyIsLocked(Box::new(info())))?;
        assert_eq!(e.locked.map(|l| l.lock_version), Some(5));

        let e = key_error(TxnError::WriteConflict {
            start_ts: ts(1),
            conflict_start_ts: ts(2),
            conflict_commit_ts: ts(3),
            key: b"k".to_vec(),
            primary: b"p".to_vec(),
            reason: WriteConflictReason::SelfRolledBack,
        })?;
        let c = e.conflict.clone().unwrap_or_default();
        assert_eq!((c.start_ts, c.conflict_ts, c.conflict_commit_ts), (1, 2, 3));
        assert_eq!(
            c.reason,
            kvrpcpb::write_conflict::Reason::SelfRolledBack as i32
        );
        assert!(!e.retryable.is_empty());

        let e = key_error(TxnError::AlreadyExist { key: b"k".to_vec() })?;
        assert_eq!(e.already_exist.map(|a| a.key), Some(b"k".to_vec()));

        let e = key_error(TxnError::CommitTsExpired {
            start_ts: ts(1),
            attempted_commit_ts: ts(2),
            min_commit_ts: ts(3),
            key: b"k".to_vec(),
        })?;
        let x = e.commit_ts_expired.unwrap_or_default();
        assert_eq!(
            (x.start_ts, x.attempted_commit_ts, x.min_commit_ts),
            (1, 2, 3)
        );

        let e = key_error(TxnError::TxnNotFound {
            start_ts: ts(4),
            key: b"p".to_vec(),
        })?;
        assert_eq!(e.txn_not_found.map(|t| t.start_ts), Some(4));

        let e = key_error(TxnError::TxnLockNotFound {
            start_ts: ts(1),
            commit_ts: ts(2),
            key: b"k".to_vec(),
        })?;
        assert!(e.retryable.contains("not found"), "{e:?}");

        let e = key_error(TxnError::InvalidTxnTso {
            start_ts: ts(3),
            commit_ts: ts(2),
        })?;
        assert!(e.abort.contains("invalid commit_ts"), "{e:?}");
        Ok(())
    }

    #[test]
    fn storage_failures_are_statuses_and_bad_input_is_abort() {
        let bad = kvfeed_storage::Error::InvalidInput("key is empty".into());
        let e = key_error(TxnError::Storage(bad)).map(|k| k.abort);
        assert_eq!(e.ok().as_deref(), Some("key is empty"));

        let engine = kvfeed_storage::Error::engine("writing", "disk on fire");
        match key_error(TxnError::Storage(engine)) {
            Err(err) => {
                let status = err.to_status("KvGet");
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(status.message().contains("KvGet"), "{status:?}");
                assert!(status.message().contains("disk on fire"), "{status:?}");
            }
            Ok(k) => panic!("engine failure became a key error: {k:?}"),
        }
        let corrupt = KvError::from(kvfeed_storage::Error::corrupt("lock", "bad"));
        assert_eq!(corrupt.to_status("KvGet").code(), tonic::Code::Internal);
        let missing = KvError::MissingContext.to_status("RawGet");
        assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn input_errors_land_in_each_response_shape() {
        let mut r = kvrpcpb::GetResponse::default();
        r.set_input_error("m".into());
        assert_eq!(r.error.map(|e| e.abort).as_deref(), Some("m"));
        let mut r = kvrpcpb::PrewriteResponse::default();
        r.set_input_error("m".into());
        assert_eq!(r.errors.len(), 1);
        let mut r = kvrpcpb::RawPutResponse::default();
        r.set_input_error("m".into());
        assert_eq!(r.error, "m");
        let mut r = kvrpcpb::RawScanResponse::default();
        r.set_input_error("m".into());
        assert_eq!(r.kvs.len(), 1);
        assert!(r.kvs[0].error.is_some());
        let mut r = kvrpcpb::ScanResponse::default();
        r.set_input_error("m".into());
        assert!(r.error.is_some() && r.pairs.len() == 1);
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
