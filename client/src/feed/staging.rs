//! Where the feed keeps what a PREWRITE carried until its COMMIT.
//!
//! A two-phase commit reaches the feed as a PREWRITE row (with the value
//! and, when asked for, the old value) and later a COMMIT row that carries
//! only a short value — TiKV inlines values up to 255 bytes in the write
//! record; a larger one travels only with the PREWRITE. So every open
//! transaction's values wait here: a transaction of a million 1 KiB values
//! holds a gigabyte until it commits. [`MemoryStaging`] keeps them in a map;
//! a consumer that must bound its memory (a changefeed) gives
//! [`Feed::open_with_staging`](super::Feed::open_with_staging) a store that
//! spills to disk.

use std::collections::HashMap;

use bytes::Bytes;

/// What a PREWRITE staged for its COMMIT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Staged {
    /// The value written.
    pub value: Bytes,
    /// The value before, when the feed asked for old values.
    pub old_value: Bytes,
}

/// A staging store failed (a disk-backed one, typically).
#[derive(Debug, thiserror::Error)]
#[error("staging prewritten values: {0}")]
pub struct StagingError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Keeps [`Staged`] values by `(key, start_ts)`.
pub trait Staging: Send + std::fmt::Debug {
    /// Stages what the PREWRITE of `key` by the transaction `start_ts`
    /// carried, replacing what was staged for the same pair.
    fn stage(&mut self, key: &Bytes, start_ts: u64, staged: Staged) -> Result<(), StagingError>;

    /// Removes and returns what was staged for `(key, start_ts)`.
    fn take(&mut self, key: &Bytes, start_ts: u64) -> Result<Option<Staged>, StagingError>;

    /// Pairs staged.
    fn len(&self) -> usize;

    /// Whether nothing is staged.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Staging in memory: the default.
#[derive(Debug, Default)]
pub struct MemoryStaging {
    staged: HashMap<(Bytes, u64), Staged>,
}

impl Staging for MemoryStaging {
    fn stage(&mut self, key: &Bytes, start_ts: u64, staged: Staged) -> Result<(), StagingError> {
        self.staged.insert((key.clone(), start_ts), staged);
        Ok(())
    }

    fn take(&mut self, key: &Bytes, start_ts: u64) -> Result<Option<Staged>, StagingError> {
        Ok(self.staged.remove(&(key.clone(), start_ts)))
    }

    fn len(&self) -> usize {
        self.staged.len()
    }
}
