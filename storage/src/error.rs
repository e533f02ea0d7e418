//! The storage layer's error type.
//!
//! Engine failures are kept apart from data corruption and from caller
//! mistakes: a caller can retry the first, must stop on the second, and must
//! fix its input on the third. Transaction-rule outcomes (a key is locked, a
//! write conflicts) are *not* errors of this type: they are ordinary results of
//! the MVCC layer, reported with their own types so that a server can map each
//! to the exact TiKV wire error.

use std::fmt;

/// A storage-layer failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying engine failed (I/O, a full disk, a poisoned journal).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record could not be decoded: the data on disk is not what this
    /// version of kvfeed wrote.
    #[error("corrupt record in column family {cf}: {reason}")]
    Corrupt { cf: &'static str, reason: String },
    /// The caller passed input the store refuses (empty key, oversized value...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An earlier durability failure made the store refuse further writes:
    /// after a failed fsync the state of the journal is unknown.
    #[error("store is read-only after an earlier write failure: {0}")]
    Poisoned(String),
}

impl Error {
    /// Builds an [`Error::Corrupt`] for column family `cf`.
    pub fn corrupt(cf: &'static str, reason: impl fmt::Display) -> Self {
        Error::Corrupt {
            cf,
            reason: reason.to_string(),
        }
    }
}

/// Storage-layer result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
