//! The write side of an action: mutations of the Percolator layout collected
//! into one [`WriteBatch`].
//!
//! Actions never write to the engine themselves. They describe their effect
//! here and the executor applies the batch atomically, which is what makes an
//! action a pure function of (snapshot, request) and lets a failed command
//! leave no trace: dropping the `MvccTxn` discards everything.

use super::key::Key;
use super::lock::Lock;
use super::write::Write;
use crate::TimeStamp;
use crate::engine::{Cf, WriteBatch};

/// Pending modifications of one command.
#[derive(Debug, Default)]
pub struct MvccTxn {
    batch: WriteBatch,
}

impl MvccTxn {
    /// No modifications yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes (or overwrites) the lock on `key`.
    pub fn put_lock(&mut self, key: &Key, lock: &Lock) {
        self.batch.put(Cf::Lock, key.as_encoded(), lock.to_bytes());
    }

    /// Removes the lock on `key`.
    pub fn unlock_key(&mut self, key: &Key) {
        self.batch.delete(Cf::Lock, key.as_encoded());
    }

    /// A large value, stored at `(key, start_ts)` in the default family.
    pub fn put_value(&mut self, key: &Key, start_ts: TimeStamp, value: Vec<u8>) {
        self.batch.put(Cf::Default, key.append_ts(start_ts), value);
    }

    /// Removes the large value transaction `start_ts` stored for `key`.
    pub fn delete_value(&mut self, key: &Key, start_ts: TimeStamp) {
        self.batch.delete(Cf::Default, key.append_ts(start_ts));
    }

    /// Writes a commit or rollback record at `(key, commit_ts)`.
    pub fn put_write(&mut self, key: &Key, commit_ts: TimeStamp, write: &Write) {
        self.batch
            .put(Cf::Write, key.append_ts(commit_ts), write.to_bytes());
    }

    /// Removes the write record at `(key, commit_ts)` (GC only).
    pub fn delete_write(&mut self, key: &Key, commit_ts: TimeStamp) {
        self.batch.delete(Cf::Write, key.append_ts(commit_ts));
    }

    /// Drops every pending modification.
    pub fn clear(&mut self) {
        self.batch = WriteBatch::new();
    }

    /// Whether the command has nothing to write.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The modifications, ready to apply atomically.
    pub fn into_batch(self) -> WriteBatch {
        self.batch
    }
}
