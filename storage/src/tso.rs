//! The timestamp oracle: hands out hybrid timestamps `physical_ms << 18 |
//! logical` that are strictly increasing for the lifetime of the data
//! directory, not just of the process.
//!
//! Wall clocks step backwards (NTP corrections, VM migration, an operator
//! fixing the date). Following the clock blindly after a restart could hand
//! out a timestamp that was already used, which breaks snapshot isolation and
//! lets a change feed report a resolved ts that a later commit undercuts. So,
//! as PD does, the oracle persists a *window end* `max_persisted_physical`
//! in [`Cf::Meta`] and keeps these invariants:
//!
//! - Every timestamp handed out has `physical < max_persisted_physical`, and
//!   the persisted value is durable before such a timestamp leaves
//!   [`Tso::get`]. The window is extended (by [`WINDOW_MS`]) whenever the next
//!   physical would come within [`EXTEND_MARGIN_MS`] of its end, so the
//!   persisting write happens about once every two seconds under load.
//! - On open the oracle starts at `max(now, persisted + 1 ms)`: strictly above
//!   anything a previous incarnation could have handed out.
//! - Within one process the physical part never decreases: if the clock is
//!   behind the last physical used, the oracle keeps counting logically on the
//!   old physical, and when the logical counter would overflow it advances the
//!   physical by one millisecond on its own.
//!
//! Durability of the window follows the [`Store`]'s durability setting: a store
//! opened without fsync-on-commit cannot promise monotonicity across a power
//! loss.
//!
//! All state sits behind one mutex. The persisting write (an fsync) is done
//! while holding it: callers arriving meanwhile wait for the window to be
//! extended, which is exactly what they would have to do anyway, and it keeps
//! the "persist before hand out" ordering trivially true.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::engine::{Cf, WriteBatch};
use crate::store::{BatchSource, Store};
use crate::timestamp::{LOGICAL_BITS, MAX_LOGICAL};
use crate::{Error, Result, TimeStamp};

/// Key in [`Cf::Meta`] under which the window end is stored (8 bytes,
/// big-endian milliseconds).
pub const WINDOW_KEY: &[u8] = b"tso/max_persisted_physical_ms";

/// How far ahead of the current physical time the window end is persisted.
/// PD uses the same three seconds.
pub const WINDOW_MS: u64 = 3_000;

/// The window is extended once the next physical comes this close to its end,
/// so that under steady load the extension happens before anyone has to wait
/// for the window to run out.
pub const EXTEND_MARGIN_MS: u64 = 1_000;

/// The largest physical part that fits into a timestamp.
pub const MAX_PHYSICAL: u64 = u64::MAX >> LOGICAL_BITS;

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    /// The current time; not guaranteed to be monotonic.
    fn now_ms(&self) -> u64;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 reads as 0; the oracle's monotonicity does
        // not depend on the clock anyway.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. For tests, including those of other
/// crates that need to drive TTLs or clock steps deterministically.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ms` until it is set or advanced.
    pub fn new(ms: u64) -> Self {
        ManualClock {
            ms: AtomicU64::new(ms),
        }
    }

    /// Sets the clock to `ms`, forwards or backwards.
    pub fn set(&self, ms: u64) {
        self.ms.store(ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms` (saturating).
    pub fn advance(&self, ms: u64) {
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                Some(cur.saturating_add(ms))
            });
    }

    /// Moves the clock backward by `ms` (saturating at zero), like an NTP step.
    pub fn step_back(&self, ms: u64) {
        let _ = self
            .ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                Some(cur.saturating_sub(ms))
            });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

/// Reads the persisted window end, if any.
pub fn persisted_window_end(store: &Store) -> Result<Option<u64>> {
    let Some(raw) = store.snapshot().get(Cf::Meta, WINDOW_KEY)? else {
        return Ok(None);
    };
    let bytes: [u8; 8] = raw.as_slice().try_into().map_err(|_| {
        Error::corrupt(
            Cf::Meta.name(),
            format!("TSO window end has {} bytes, expected 8", raw.len()),
        )
    })?;
    let end = u64::from_be_bytes(bytes);
    if end > MAX_PHYSICAL {
        return Err(Error::corrupt(
            Cf::Meta.name(),
            format!("TSO window end {end} exceeds the timestamp range"),
        ));
    }
    Ok(Some(end))
}

/// What the oracle has handed out so far.
#[derive(Debug)]
struct State {
    /// Physical part of the highest timestamp handed out (or of the start
    /// point right after open).
    physical: u64,
    /// Logical part of the highest timestamp handed out; 0 when nothing has
    /// been handed out at `physical` yet.
    logical: u64,
    /// Durable window end: every handed-out physical is below it.
    max_persisted: u64,
}

/// The timestamp oracle. Cheap to share behind an `Arc`.
pub struct Tso {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Tso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tso")
            .field("state", &*self.state.lock())
            .finish_non_exhaustive()
    }
}

impl Tso {
    /// Opens the oracle on `store`, starting strictly above anything a
    /// previous oracle on the same store handed out, and persists a first
    /// window before returning.
    pub fn open(store: Arc<Store>, clock: Arc<dyn Clock>) -> Result<Tso> {
        let now = checked_now(&*clock)?;
        let start = match persisted_window_end(&store)? {
            Some(end) => now.max(end.saturating_add(1)),
            None => now,
        };
        let window_end = window_end_for(start)?;
        persist(&store, window_end)?;
        Ok(Tso {
            store,
            clock,
            state: Mutex::new(State {
                physical: start,
                logical: 0,
                max_persisted: window_end,
            }),
        })
    }

    /// Allocates `count` consecutive timestamps and returns the highest; the
    /// caller owns `ts - count + 1 ..= ts` (PD's batch semantics). All of them
    /// share one physical part, so `count` is limited to [`MAX_LOGICAL`].
    pub fn get(&self, count: u32) -> Result<TimeStamp> {
        let count = u64::from(count);
        if count == 0 {
            return Err(Error::InvalidInput(
                "timestamp count must be at least 1".to_owned(),
            ));
        }
        if count > MAX_LOGICAL {
            return Err(Error::InvalidInput(format!(
                "timestamp count {count} exceeds {MAX_LOGICAL} per request"
            )));
        }

        let mut state = self.state.lock();
        let now = checked_now(&*self.clock)?;
        let (mut physical, mut logical) = (state.physical, state.logical);
        if now > physical {
            physical = now;
            logical = 0;
        }
        if logical + count > MAX_LOGICAL {
            // The batch does not fit into this millisecond: move on to the
            // next one even if the clock has not got there (it is behind us or
            // we are simply fast). The window check below covers the new value.
            physical += 1;
            logical = 0;
        }
        if physical.saturating_add(EXTEND_MARGIN_MS) >= state.max_persisted {
            let window_end = window_end_for(physical)?;
            persist(&self.store, window_end)?;
            state.max_persisted = window_end;
        }
        logical += count;
        state.physical = physical;
        state.logical = logical;
        Ok(TimeStamp::compose(physical, logical))
    }

    /// A timestamp at least as high as every timestamp handed out so far
    /// (including by earlier incarnations on the same store) and lower than
    /// every timestamp handed out later. Allocates nothing.
    pub fn current(&self) -> TimeStamp {
        let state = self.state.lock();
        TimeStamp::compose(state.physical, state.logical)
    }

    /// The clock this oracle reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// Reads the clock, refusing readings the timestamp format cannot hold.
fn checked_now(clock: &dyn Clock) -> Result<u64> {
    let now = clock.now_ms();
    if now > MAX_PHYSICAL - WINDOW_MS {
        return Err(Error::InvalidInput(format!(
            "clock reading {now} ms is beyond the timestamp range"
        )));
    }
    Ok(now)
}

/// The window end to persist when handing out `physical`.
fn window_end_for(physical: u64) -> Result<u64> {
    physical
        .checked_add(WINDOW_MS)
        .filter(|end| *end <= MAX_PHYSICAL)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "physical time {physical} ms is beyond the timestamp range"
            ))
        })
}

fn persist(store: &Store, window_end: u64) -> Result<()> {
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, WINDOW_KEY, window_end.to_be_bytes());
    store.apply(batch, BatchSource::Internal)?;
    Ok(())
}
