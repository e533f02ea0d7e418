//! The store's safe ts (`GetStoreSafeTS`) and the stale reads it admits.
//!
//! The safe ts `s` promises: every change with a timestamp at or below `s`
//! is applied, and no lock can still commit at or below `s`. A read at
//! `ts <= s` therefore sees a final snapshot, which is what a stale read
//! (`Context.stale_read`) asks for. The value is the resolved ts of the
//! whole store, computed by the feed's own rules
//! ([`kvfeed_cdc::store_safe_ts`]) whether or not anything is subscribed.
//!
//! client-go polls `GetStoreSafeTS` every 2 s per store, with an empty
//! `key_range` (the whole store); it picks stale read timestamps at or
//! below the minimum it got. A stale read above the safe ts gets TiKV's
//! `DataIsNotReady` region error, carrying the safe ts; client-go backs
//! off and retries (newer versions retry on the leader as a normal read).
//!
//! Bounded work: computing the value allocates a timestamp and walks every
//! lock, so it runs at most once per [`MIN_REFRESH`] however many clients
//! ask, and callers wait for a computation in progress instead of starting
//! their own. A stale read at or below the last value computed needs no
//! computation at all. The value only grows (a safe ts stays safe), so the
//! cached value may be answered as is.
//!
//! A key range is not narrowed: the store-wide value is at most the value
//! of any range, so it is a correct answer for every range.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvfeed_proto::{errorpb, kvrpcpb};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::TxnStore;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::store::Store;
use kvfeed_storage::tso::Tso;

use super::context::Scope;
use super::errors::KvError;

/// The least time between two computations of the safe ts.
pub const MIN_REFRESH: Duration = Duration::from_millis(50);

/// The store's safe ts, cached.
pub struct SafeTs {
    store: Arc<Store>,
    tso: Arc<Tso>,
    txn: Arc<TxnStore>,
    raw: Arc<RawStore>,
    /// Held while computing, so concurrent callers share one computation.
    state: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    safe_ts: TimeStamp,
    computed_at: Option<Instant>,
}

impl SafeTs {
    pub fn new(store: Arc<Store>, tso: Arc<Tso>, txn: Arc<TxnStore>, raw: Arc<RawStore>) -> Self {
        SafeTs {
            store,
            tso,
            txn,
            raw,
            state: Mutex::new(Cached::default()),
        }
    }

    /// The safe ts, recomputed unless the cached value is younger than
    /// [`MIN_REFRESH`] or already reaches `wanted`. Blocking: call it on
    /// the blocking pool.
    pub fn get(&self, wanted: Option<TimeStamp>) -> Result<TimeStamp, kvfeed_storage::Error> {
        // A panic while computing leaves the cached value valid (it is
        // written only after a computation succeeded).
        let mut cached = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let reached = wanted.is_some_and(|ts| ts <= cached.safe_ts);
        let fresh = cached
            .computed_at
            .is_some_and(|at| at.elapsed() < MIN_REFRESH);
        if reached || fresh {
            return Ok(cached.safe_ts);
        }
        let computed = kvfeed_cdc::store_safe_ts(&self.store, &self.tso, &self.txn, &self.raw)?;
        cached.safe_ts = cached.safe_ts.max(computed);
        cached.computed_at = Some(Instant::now());
        Ok(cached.safe_ts)
    }

    /// For a stale read at `read_ts`: nothing if it is not one, or if
    /// `read_ts` is at or below the safe ts; else `DataIsNotReady`.
    pub fn check_read(
        &self,
        ctx: Option<&kvrpcpb::Context>,
        scope: &Scope,
        read_ts: u64,
    ) -> Result<(), KvError> {
        let Some(ctx) = ctx.filter(|c| c.stale_read) else {
            return Ok(());
        };
        let read_ts = TimeStamp::new(read_ts);
        let safe_ts = self.get(Some(read_ts)).map_err(KvError::Storage)?;
        if read_ts <= safe_ts {
            return Ok(());
        }
        let region_id = scope.id().0;
        Err(KvError::Region(Box::new(errorpb::Error {
            message: format!(
                "peer is not ready for stale read at {read_ts}: region {region_id}'s safe ts \
                 is {safe_ts}"
            ),
            data_is_not_ready: Some(errorpb::DataIsNotReady {
                region_id,
                peer_id: ctx.peer.as_ref().map_or(0, |p| p.id),
                safe_ts: safe_ts.into_inner(),
            }),
            ..Default::default()
        })))
    }
}

/// `GetStoreSafeTS`: the store-wide safe ts, for any key range.
pub fn store_safe_ts(
    safe_ts: &SafeTs,
    _request: &kvrpcpb::StoreSafeTsRequest,
) -> Result<kvrpcpb::StoreSafeTsResponse, kvfeed_storage::Error> {
    Ok(kvrpcpb::StoreSafeTsResponse {
        safe_ts: safe_ts.get(None)?.into_inner(),
    })
}
