//! Outcomes of transaction rules that refuse a command.
//!
//! Each variant corresponds to one kvrpcpb `KeyError` shape (noted per
//! variant), so a server maps them one-to-one. Keys inside are raw user keys.
//! Storage failures are carried as [`TxnError::Storage`]; they are not
//! decisions about the transaction and map to region/other errors instead.

use std::fmt;

use super::key::escape;
use super::lock::LockInfo;
use crate::TimeStamp;

/// Why a write conflict was reported (kvrpcpb `WriteConflict.Reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteConflictReason {
    /// An optimistic prewrite found a newer write.
    Optimistic,
    /// A pessimistic lock or prewrite found a commit newer than for_update_ts.
    PessimisticRetry,
    /// The transaction itself has already been rolled back on this key.
    SelfRolledBack,
}

/// A transaction rule refused the command (or storage failed underneath it).
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// `KeyError.locked`: another transaction's lock blocks the command.
    #[error("key {} is locked by transaction {}", escape(&.0.key), .0.start_ts)]
    KeyIsLocked(Box<LockInfo>),
    /// `KeyError.conflict`.
    #[error(
        "write conflict on key {} ({reason:?}): start_ts {start_ts}, conflicting start_ts {conflict_start_ts} commit_ts {conflict_commit_ts}",
        escape(key)
    )]
    WriteConflict {
        /// The refused transaction's start ts.
        start_ts: TimeStamp,
        /// Start ts of the transaction whose write conflicts.
        conflict_start_ts: TimeStamp,
        /// Commit ts of the conflicting write (0 when the conflict is not a
        /// committed write).
        conflict_commit_ts: TimeStamp,
        /// The key written by both.
        key: Vec<u8>,
        /// The refused transaction's primary key.
        primary: Vec<u8>,
        /// Which check found the conflict, reported to the client as is.
        reason: WriteConflictReason,
    },
    /// `KeyError.already_exist`: `Insert`/`CheckNotExists`/`should_not_exist`
    /// found a visible value.
    #[error("key {} already exists", escape(key))]
    AlreadyExist {
        /// The key that has a value.
        key: Vec<u8>,
    },
    /// `KeyError.commit_ts_expired`: commit_ts below the lock's min_commit_ts.
    #[error(
        "commit_ts {attempted_commit_ts} of transaction {start_ts} is below min_commit_ts {min_commit_ts} on key {}",
        escape(key)
    )]
    CommitTsExpired {
        /// The committing transaction's start ts.
        start_ts: TimeStamp,
        /// The commit ts the client asked for.
        attempted_commit_ts: TimeStamp,
        /// The lock's floor the commit ts fell below; the client retries with
        /// a commit ts above it.
        min_commit_ts: TimeStamp,
        /// The key whose lock refused the commit.
        key: Vec<u8>,
    },
    /// `KeyError.txn_lock_not_found` (older servers: `retryable`): commit
    /// found neither the lock nor a commit record — rolled back or never
    /// prewritten.
    #[error(
        "lock of transaction {start_ts} not found on key {} while committing at {commit_ts}",
        escape(key)
    )]
    TxnLockNotFound {
        /// The committing transaction's start ts.
        start_ts: TimeStamp,
        /// The commit ts the client asked for.
        commit_ts: TimeStamp,
        /// The key with no lock.
        key: Vec<u8>,
    },
    /// `KeyError.txn_not_found`: check_txn_status / heartbeat found no trace
    /// of the transaction on its primary.
    #[error("transaction {start_ts} not found on primary {}", escape(key))]
    TxnNotFound {
        /// The transaction asked about.
        start_ts: TimeStamp,
        /// Its primary key.
        key: Vec<u8>,
    },
    /// `KeyError.retryable`: a pessimistic prewrite found no pessimistic lock
    /// of its own on the key.
    #[error(
        "pessimistic lock of transaction {start_ts} not found on key {}",
        escape(key)
    )]
    PessimisticLockNotFound {
        /// The prewriting transaction.
        start_ts: TimeStamp,
        /// The key that should have held its pessimistic lock.
        key: Vec<u8>,
    },
    /// `KeyError.retryable`/`abort`: acquiring a pessimistic lock for a
    /// transaction that was already rolled back on this key.
    #[error(
        "pessimistic lock of transaction {start_ts} already rolled back on key {}",
        escape(key)
    )]
    PessimisticLockRolledBack {
        /// The rolled-back transaction.
        start_ts: TimeStamp,
        /// The key carrying its rollback record.
        key: Vec<u8>,
    },
    /// `KeyError.abort`: an optimistic prewrite met its own pessimistic lock.
    #[error(
        "lock type mismatch for transaction {start_ts} on key {} (pessimistic: {pessimistic})",
        escape(key)
    )]
    LockTypeNotMatch {
        /// The prewriting transaction.
        start_ts: TimeStamp,
        /// The key whose lock has the wrong kind.
        key: Vec<u8>,
        /// Whether the lock found is a pessimistic one.
        pessimistic: bool,
    },
    /// Rolling back a transaction that is already committed. Cleanup maps it
    /// to `commit_version`; other commands to `KeyError.abort`.
    #[error(
        "transaction {start_ts} is already committed at {commit_ts} on key {}",
        escape(key)
    )]
    Committed {
        /// The transaction asked to roll back.
        start_ts: TimeStamp,
        /// Where it committed.
        commit_ts: TimeStamp,
        /// The key carrying its commit record.
        key: Vec<u8>,
    },
    /// `KeyError.primary_mismatch`: check_txn_status was asked to verify the
    /// primary and the lock names another one.
    #[error("key {} is not the primary of transaction {}", escape(&.0.key), .0.start_ts)]
    PrimaryMismatch(Box<LockInfo>),
    /// `KeyError.abort`: a commit timestamp not above the start timestamp.
    #[error("invalid commit_ts {commit_ts} for transaction {start_ts}")]
    InvalidTxnTso {
        /// The transaction's start ts.
        start_ts: TimeStamp,
        /// The refused commit ts (at or below `start_ts`).
        commit_ts: TimeStamp,
    },
    /// The store failed, or the input was refused (`Error::InvalidInput`).
    #[error(transparent)]
    Storage(#[from] crate::Error),
}

impl TxnError {
    /// Whether this is [`TxnError::KeyIsLocked`].
    pub fn is_key_locked(&self) -> bool {
        matches!(self, TxnError::KeyIsLocked(_))
    }

    pub(crate) fn locked(info: LockInfo) -> Self {
        TxnError::KeyIsLocked(Box::new(info))
    }
}

/// Result of a transactional command.
pub type TxnResult<T> = std::result::Result<T, TxnError>;

impl fmt::Display for WriteConflictReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
