//! Read-timestamp tracking and in-memory locks for async commit and 1PC.
//!
//! In plain 2PC the client fetches commit_ts from the oracle *after* every
//! lock is durable, so any reader with a higher timestamp either sees the
//! lock or the commit. Async commit and 1PC pick the commit timestamp on the
//! server, during prewrite, and must not pick one at or below a timestamp a
//! reader has already used to read the key without seeing the change. TiKV
//! solves this with a "concurrency manager", and so do we:
//!
//! - Every transactional read first raises `max_ts` to its read timestamp,
//!   then checks the in-memory lock table for the keys it reads.
//! - An async-commit/1PC prewrite first inserts its keys into the table and,
//!   under the same mutex, reads `max_ts`; its commit timestamps are then
//!   above `max_ts`. It removes the keys after its batch is applied.
//!
//! Both steps touch the table's mutex, so one of them happens first: either
//! the reader raised `max_ts` before the writer read it (the commit lands
//! above the read), or the reader sees the in-memory lock and waits until the
//! batch is applied (and then reads it). A reader only waits for writers that
//! started at or below its timestamp, and a writer never waits for readers,
//! so waiting cannot deadlock.
//!
//! The change feed uses the same two operations to compute resolved
//! timestamps: raise `max_ts` to the candidate, then take
//! [`ConcurrencyManager::global_min_lock_ts`] into account.
//!
//! `max_ts` only grows, and async-commit/1PC commit timestamps follow it,
//! so one read at a timestamp far in the future would push every later
//! such commit there — invisible to reads at the oracle's time. A client
//! timestamp is therefore checked against a limit first
//! ([`ConcurrencyManager::check_ts`]: the oracle's current time plus an
//! allowance, as TiKV's `max-ts-drift-allowance`), and one beyond it is
//! refused before it can move anything.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::TimeStamp;

/// Tracks the highest read timestamp and the keys of in-flight async-commit
/// and 1PC prewrites.
#[derive(Default)]
pub struct ConcurrencyManager {
    max_ts: AtomicU64,
    /// Raw key → start_ts of the prewrite holding it.
    table: Mutex<BTreeMap<Vec<u8>, TimeStamp>>,
    released: Condvar,
    /// The highest timestamp a client may use now; unset: no limit.
    limit: OnceLock<MaxTsLimit>,
}

/// The highest timestamp a client may name now (see the module comment).
pub type MaxTsLimit = Box<dyn Fn() -> TimeStamp + Send + Sync>;

/// Removes its keys from the table (and wakes waiting readers) on drop.
#[must_use = "the in-memory locks are released when the guard is dropped"]
pub struct MemLockGuard<'a> {
    cm: &'a ConcurrencyManager,
    keys: Vec<Vec<u8>>,
}

impl ConcurrencyManager {
    /// A manager with no in-memory locks whose max ts starts at
    /// `initial_max_ts`.
    pub fn new(initial_max_ts: TimeStamp) -> Self {
        let cm = ConcurrencyManager::default();
        cm.max_ts
            .store(initial_max_ts.into_inner(), Ordering::SeqCst);
        cm
    }

    /// The highest timestamp any reader has declared.
    pub fn max_ts(&self) -> TimeStamp {
        TimeStamp::new(self.max_ts.load(Ordering::SeqCst))
    }

    /// Raises `max_ts` to `ts`. `TimeStamp::MAX` ("read the latest") is
    /// ignored: it is not a timestamp a commit could be placed above.
    pub fn update_max_ts(&self, ts: TimeStamp) {
        if ts != TimeStamp::MAX {
            self.max_ts.fetch_max(ts.into_inner(), Ordering::SeqCst);
        }
    }

    /// Sets the limit client timestamps are checked against, once (later
    /// calls are ignored).
    pub fn set_max_ts_limit(&self, limit: MaxTsLimit) {
        let _ = self.limit.set(limit);
    }

    /// Refuses `ts` (the request field `what`) when it lies beyond the
    /// limit. `TimeStamp::MAX` ("read the latest") is always accepted.
    pub fn check_ts(&self, ts: TimeStamp, what: &str) -> crate::Result<()> {
        let Some(limit) = self.limit.get() else {
            return Ok(());
        };
        if ts == TimeStamp::MAX {
            return Ok(());
        }
        let limit = limit();
        if ts > limit {
            return Err(crate::Error::InvalidInput(format!(
                "{what} {ts} lies beyond {limit}, the current timestamp plus the allowed drift \
                 (storage.max-ts-drift-allowance): use a timestamp from PD"
            )));
        }
        Ok(())
    }

    /// A client's timestamp `ts` (the request field `what`): checked
    /// against the limit, then `max_ts` raised to it.
    pub fn raise_max_ts(&self, ts: TimeStamp, what: &str) -> crate::Result<()> {
        self.check_ts(ts, what)?;
        self.update_max_ts(ts);
        Ok(())
    }

    /// The smallest start_ts among in-flight async-commit/1PC prewrites.
    pub fn global_min_lock_ts(&self) -> Option<TimeStamp> {
        self.table.lock().values().min().copied()
    }

    /// Registers `keys` for transaction `start_ts` and returns the guard with
    /// the `max_ts` read after registration.
    pub(crate) fn lock_keys(
        &self,
        start_ts: TimeStamp,
        keys: Vec<Vec<u8>>,
    ) -> (MemLockGuard<'_>, TimeStamp) {
        let mut table = self.table.lock();
        for k in &keys {
            table.insert(k.clone(), start_ts);
        }
        let max_ts = self.max_ts();
        drop(table);
        (MemLockGuard { cm: self, keys }, max_ts)
    }

    /// Waits until none of `keys` is held by a prewrite that started at or
    /// below `read_ts`.
    pub(crate) fn wait_for_keys(&self, keys: &[&[u8]], read_ts: TimeStamp) {
        let mut table = self.table.lock();
        while keys
            .iter()
            .any(|k| table.get(*k).is_some_and(|&ts| ts <= read_ts))
        {
            self.released.wait(&mut table);
        }
    }

    /// Waits until no key in raw range `[start, end)` (`end` empty:
    /// unbounded) is held by a prewrite that started at or below `read_ts`.
    pub(crate) fn wait_for_range(&self, start: &[u8], end: &[u8], read_ts: TimeStamp) {
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        let mut table = self.table.lock();
        while table
            .range::<[u8], _>((Bound::Included(start), upper))
            .any(|(_, &ts)| ts <= read_ts)
        {
            self.released.wait(&mut table);
        }
    }
}

impl Drop for MemLockGuard<'_> {
    fn drop(&mut self) {
        let mut table = self.cm.table.lock();
        for k in &self.keys {
            table.remove(k);
        }
        drop(table);
        self.cm.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn timestamps_beyond_the_limit_are_refused_and_move_nothing() {
        let cm = ConcurrencyManager::new(TimeStamp::new(5));
        assert!(cm.check_ts(TimeStamp::new(u64::MAX - 1), "version").is_ok());
        cm.set_max_ts_limit(Box::new(|| TimeStamp::new(100)));
        assert!(cm.check_ts(TimeStamp::new(100), "version").is_ok());
        assert!(cm.check_ts(TimeStamp::MAX, "version").is_ok());
        let err = cm
            .check_ts(TimeStamp::new(u64::MAX - 1), "version")
            .expect_err("beyond the limit");
        assert!(err.to_string().contains("version"), "{err}");
        assert_eq!(cm.max_ts(), TimeStamp::new(5));
    }

    #[test]
    fn max_ts_only_grows_and_ignores_max() {
        let cm = ConcurrencyManager::new(TimeStamp::new(5));
        cm.update_max_ts(TimeStamp::new(3));
        assert_eq!(cm.max_ts(), TimeStamp::new(5));
        cm.update_max_ts(TimeStamp::MAX);
        assert_eq!(cm.max_ts(), TimeStamp::new(5));
        cm.update_max_ts(TimeStamp::new(9));
        assert_eq!(cm.max_ts(), TimeStamp::new(9));
    }

    #[test]
    fn reader_waits_for_in_flight_writer() {
        let cm = ConcurrencyManager::new(TimeStamp::ZERO);
        let (guard, _) = cm.lock_keys(TimeStamp::new(10), vec![b"k".to_vec()]);
        assert_eq!(cm.global_min_lock_ts(), Some(TimeStamp::new(10)));
        // A reader below the writer's start does not wait.
        cm.wait_for_keys(&[b"k"], TimeStamp::new(9));
        cm.wait_for_range(b"a", b"z", TimeStamp::new(9));
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                cm.wait_for_range(b"a", b"", TimeStamp::new(11));
                done_tx.send(()).ok();
            });
            // The reader cannot finish while the key is held.
            assert!(done_rx.try_recv().is_err());
            drop(guard);
            assert!(done_rx.recv().is_ok());
        });
        assert_eq!(cm.global_min_lock_ts(), None);
    }
}
