//! Transaction actions: pure functions from (snapshot, request) to
//! (write batch, outcome).
//!
//! Each public function reads only through the [`MvccReader`](super::reader::MvccReader) it is given and
//! describes its effect as a [`WriteBatch`](crate::engine::WriteBatch); it
//! never applies anything. An error means the batch is discarded, so a
//! command either has its whole effect or none. Serializing commands that
//! touch the same keys (latches) and applying the batch is the executor's job
//! ([`TxnStore`](crate::mvcc::TxnStore)); the functions here assume that no
//! conflicting command runs between their snapshot and the apply.
//!
//! Rollbacks are always *protected*: a rollback record is written (or the
//! overlapping commit record is flagged) for every key rolled back, and older
//! rollback records are never collapsed. That is the conservative choice — a
//! late prewrite can never resurrect a rolled-back transaction — at the cost
//! of some extra records, which GC removes once they fall below the safe
//! point.

pub mod commit;
pub mod pessimistic;
pub mod prewrite;
pub mod status;

use super::error::{TxnError, WriteConflictReason};
use super::write::Write;
use crate::TimeStamp;

/// Builds a `WriteConflict` against `write`, committed at `commit_ts`.
pub(crate) fn conflict(
    start_ts: TimeStamp,
    primary: &[u8],
    key: &[u8],
    commit_ts: TimeStamp,
    write: &Write,
    reason: WriteConflictReason,
) -> TxnError {
    TxnError::WriteConflict {
        start_ts,
        conflict_start_ts: write.start_ts,
        conflict_commit_ts: commit_ts,
        key: key.to_vec(),
        primary: primary.to_vec(),
        reason,
    }
}
