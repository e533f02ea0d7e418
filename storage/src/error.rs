//! The storage layer's error type.
//!
//! Engine failures are kept apart from data corruption and from caller
//! mistakes: a caller can retry the first, must stop on the second, and must
//! fix its input on the third. Transaction-rule outcomes (a key is locked, a
//! write conflicts) are *not* errors of this type: they are ordinary results of
//! the MVCC layer, reported with their own types so that a server can map each
//! to the exact TiKV wire error.
//!
//! An engine failure keeps the engine's own error as its
//! [`source`](std::error::Error::source), so what the operating system said
//! (a full disk above all) stays recognisable: see [`Error::io_kind`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::{fmt, io};

/// The engine's own error. Shared rather than owned because one failed
/// write group hands the same failure to each of its writers, and a poisoned
/// store keeps it for every later refusal.
pub type EngineSource = Arc<dyn StdError + Send + Sync>;

/// A storage-layer failure.
///
/// `Display` and `source` are written by hand: `Arc<dyn Error>` is itself an
/// `Error` that forwards `source` to the shared error's *own* source, so a
/// derived `source` would skip the engine's error in the chain and
/// [`Error::io_kind`] could not see an `io::Error` held directly.
#[derive(Debug)]
pub enum Error {
    /// The underlying engine failed (I/O, a full disk, a poisoned journal).
    Engine {
        /// What the store was doing.
        context: String,
        /// The engine's error.
        source: EngineSource,
    },
    /// A stored record could not be decoded: the data on disk is not what this
    /// version of kvfeed wrote.
    Corrupt {
        /// The column family (or other store area) the record was read from.
        cf: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The caller passed input the store refuses (empty key, oversized value...).
    InvalidInput(String),
    /// An earlier durability failure made the store refuse further writes:
    /// after a failed fsync the state of the journal is unknown.
    Poisoned {
        /// What failed, and while doing what.
        reason: String,
        /// The engine's error that poisoned the store; `None` when it was
        /// not an engine failure (a panic during a commit).
        source: Option<EngineSource>,
    },
}

impl Error {
    /// Builds an [`Error::Engine`]: the engine's `source` failed while the
    /// store was doing `context`.
    pub fn engine(
        context: impl fmt::Display,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Error::Engine {
            context: context.to_string(),
            source: Arc::from(source.into()),
        }
    }

    /// Builds an [`Error::Corrupt`] for column family `cf`.
    pub fn corrupt(cf: &'static str, reason: impl fmt::Display) -> Self {
        Error::Corrupt {
            cf,
            reason: reason.to_string(),
        }
    }

    /// The kind of the first `io::Error` in this error's source chain, if an
    /// I/O failure is behind it (also behind a poisoned store).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        let mut next: Option<&(dyn StdError + 'static)> = Some(self);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return Some(io.kind());
            }
            next = err.source();
        }
        None
    }

    /// Whether the disk (or the user's quota on it) is full: the one engine
    /// failure an operator fixes by freeing space rather than by repair.
    pub fn is_storage_full(&self) -> bool {
        matches!(
            self.io_kind(),
            Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The engine's message is part of ours: gRPC statuses and logs carry
        // only this text.
        match self {
            Error::Engine { context, source } => write!(f, "storage engine: {context}: {source}"),
            Error::Corrupt { cf, reason } => {
                write!(f, "corrupt record in column family {cf}: {reason}")
            }
            Error::InvalidInput(reason) => write!(f, "invalid input: {reason}"),
            Error::Poisoned { reason, .. } => {
                write!(
                    f,
                    "store is read-only after an earlier write failure: {reason}"
                )
            }
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Engine { source, .. }
            | Error::Poisoned {
                source: Some(source),
                ..
            } => Some(&**source),
            _ => None,
        }
    }
}

/// Storage-layer result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_recognisable_through_the_chain() {
        let full = || io::Error::new(io::ErrorKind::StorageFull, "no space left on device");
        let direct = Error::engine("syncing the journal", full());
        assert_eq!(direct.io_kind(), Some(io::ErrorKind::StorageFull));
        assert!(direct.is_storage_full());
        assert!(direct.to_string().contains("no space left"), "{direct}");

        // fjall wraps the io::Error in its own error.
        let fjall = Error::engine("writing a batch of 1", fjall::Error::Io(full()));
        assert!(fjall.is_storage_full(), "{fjall:?}");

        let shared = Error::Poisoned {
            reason: "committing seq 2..=2".into(),
            source: match fjall {
                Error::Engine { source, .. } => Some(source),
                _ => None,
            },
        };
        assert!(shared.is_storage_full(), "{shared:?}");

        let other = Error::engine("opening", io::Error::other("locked"));
        assert_eq!(other.io_kind(), Some(io::ErrorKind::Other));
        assert!(!other.is_storage_full());
        assert_eq!(Error::engine("opening", "no io here").io_kind(), None);
        assert_eq!(Error::corrupt("lock", "bad").io_kind(), None);
    }
}
