//! The GC worker: removes MVCC versions that no reader can see any more.
//!
//! A version is garbage once a newer version of its key is visible at the
//! *effective safe point* (the minimum of the GC safe point and every
//! unexpired service safe point, see [`SafePoints`]). The worker collects up
//! to that point, transactional data through [`TxnStore::gc`] and raw data
//! through [`RawStore::gc`]; both write with `BatchSource::Gc`, so the change
//! feed never reports a collection as a change.
//!
//! When it runs: as soon as the GC safe point is raised (the worker watches
//! the store for the safe point's key being written, so it needs no link to
//! the PD service that writes it), and every [`GC_INTERVAL`], which picks up
//! service safe points that moved or expired. A pass runs only if the
//! effective safe point advanced past the last one collected, so an idle
//! cluster costs one small read per interval.
//!
//! Invariants:
//! - The worker never collects above the effective safe point it read at the
//!   start of a pass, and only moves forward: a service safe point accepted
//!   later is at least that point (the safe point rules refuse lower ones).
//! - Passes never overlap: one task runs them one after another on the
//!   blocking pool (a pass scans and fsyncs).
//! - The last collected point lives in memory only: after a restart the first
//!   pass scans everything once more, which is harmless because GC is
//!   idempotent.
//! - Errors are logged with the safe point and retried on the next trigger;
//!   nothing in a pass panics on stored data.
//! - The worker holds a shutdown signal: shutdown waits for a pass in flight
//!   (between its transactional and raw halves it stops early).

use std::sync::Arc;
use std::time::Duration;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::{Cf, Op};
use kvfeed_storage::mvcc::{TxnError, TxnStore};
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::safepoint::{GC_SAFE_POINT_KEY, SafePointError, SafePoints};
use kvfeed_storage::store::{BatchSource, ChangeBatch, Observer, ObserverId, Store};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{Notify, watch};

use crate::metrics::{Metrics, MetricsError};
use crate::node::Node;
use crate::shutdown::ShutdownSignal;

/// How often the effective safe point is re-read without a trigger.
pub const GC_INTERVAL: Duration = Duration::from_secs(10);

/// Why a GC pass failed.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("reading the safe points: {0}")]
    SafePoints(#[from] SafePointError),
    #[error("transactional GC at safe point {safe_point}: {source}")]
    Txn {
        safe_point: TimeStamp,
        #[source]
        source: TxnError,
    },
    #[error("raw GC at safe point {safe_point}: {source}")]
    Raw {
        safe_point: TimeStamp,
        #[source]
        source: kvfeed_storage::Error,
    },
    #[error("GC task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcPass {
    /// The effective safe point collected up to.
    pub safe_point: TimeStamp,
    /// Write records, large values and raw versions removed.
    pub keys_deleted: u64,
}

/// Progress of a worker, published after every pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStatus {
    /// Passes attempted, including those with nothing to do and failed ones.
    pub passes: u64,
    /// The effective safe point of the last completed pass (0: none yet).
    pub last_collected: TimeStamp,
}

/// The worker's Prometheus metrics.
#[derive(Clone)]
pub struct GcMetrics {
    /// The effective safe point of the last completed pass.
    safe_point: IntGauge,
    runs: IntCounter,
    keys_deleted: IntCounter,
}

impl GcMetrics {
    /// Creates the collectors and registers them with `metrics`.
    pub fn register(metrics: &Metrics) -> Result<GcMetrics, MetricsError> {
        let gc = GcMetrics::unregistered()?;
        metrics.register(Box::new(gc.safe_point.clone()))?;
        metrics.register(Box::new(gc.runs.clone()))?;
        metrics.register(Box::new(gc.keys_deleted.clone()))?;
        Ok(gc)
    }

    /// Collectors not attached to any registry (for tests).
    pub fn unregistered() -> Result<GcMetrics, MetricsError> {
        Ok(GcMetrics {
            safe_point: IntGauge::new(
                "kvfeed_gc_safe_point",
                "Effective GC safe point (a TSO timestamp) the last GC pass collected up to.",
            )
            .map_err(MetricsError::Register)?,
            runs: IntCounter::new("kvfeed_gc_runs_total", "GC passes completed.")
                .map_err(MetricsError::Register)?,
            keys_deleted: IntCounter::new(
                "kvfeed_gc_keys_deleted_total",
                "Old MVCC versions (write records, large values, raw versions) removed by GC.",
            )
            .map_err(MetricsError::Register)?,
        })
    }
}

/// Runs GC passes over one store.
pub struct GcWorker {
    store: Arc<Store>,
    safe_points: SafePoints,
    txn: Arc<TxnStore>,
    raw: Arc<RawStore>,
    metrics: GcMetrics,
    status: watch::Sender<GcStatus>,
}

impl GcWorker {
    /// A worker over `store`. `safe_points` is only read.
    pub fn new(
        store: Arc<Store>,
        safe_points: SafePoints,
        txn: Arc<TxnStore>,
        raw: Arc<RawStore>,
        metrics: GcMetrics,
    ) -> GcWorker {
        GcWorker {
            store,
            safe_points,
            txn,
            raw,
            metrics,
            status: watch::Sender::new(GcStatus::default()),
        }
    }

    /// The node's worker, with its metrics registered in the node's registry
    /// (so there is at most one per node).
    pub fn for_node(node: &Node) -> Result<GcWorker, MetricsError> {
        let safe_points = SafePoints::new(Arc::clone(node.store()), Arc::clone(node.tso().clock()));
        Ok(GcWorker::new(
            Arc::clone(node.store()),
            safe_points,
            Arc::clone(node.txn()),
            Arc::clone(node.raw()),
            GcMetrics::register(node.metrics())?,
        ))
    }

    /// The effective safe point of the last completed pass.
    pub fn last_collected(&self) -> TimeStamp {
        self.status.borrow().last_collected
    }

    /// Follows the worker's progress.
    #[cfg(test)]
    pub fn subscribe(&self) -> watch::Receiver<GcStatus> {
        self.status.subscribe()
    }

    /// One pass, blocking: reads the effective safe point and, if it is past
    /// the last one collected, collects transactional then raw data up to
    /// it. `Ok(None)` when there was nothing new to collect.
    #[cfg(test)]
    pub fn run_once(&self) -> Result<Option<GcPass>, GcError> {
        let outcome = self.run_pass(&|| false);
        self.status.send_modify(|s| s.passes += 1);
        outcome
    }

    /// [`GcWorker::run_once`], stopping between the transactional and the
    /// raw half when `stop` says so (the pass then does not count).
    fn run_pass(&self, stop: &dyn Fn() -> bool) -> Result<Option<GcPass>, GcError> {
        let safe_point = self.safe_points.effective_safe_point()?;
        if safe_point <= self.last_collected() {
            return Ok(None);
        }
        let txn = self
            .txn
            .gc(safe_point, &[], &[])
            .map_err(|source| GcError::Txn { safe_point, source })?;
        if stop() {
            return Ok(None);
        }
        let raw = self
            .raw
            .gc(safe_point)
            .map_err(|source| GcError::Raw { safe_point, source })?;
        let keys_deleted = txn.deleted_writes
            + txn.deleted_values
            + u64::try_from(raw.versions_removed).unwrap_or(u64::MAX);
        self.status
            .send_modify(|s| s.last_collected = s.last_collected.max(safe_point));
        self.metrics
            .safe_point
            .set(i64::try_from(safe_point.into_inner()).unwrap_or(i64::MAX));
        self.metrics.runs.inc();
        self.metrics.keys_deleted.inc_by(keys_deleted);
        Ok(Some(GcPass {
            safe_point,
            keys_deleted,
        }))
    }

    /// Starts the worker on the current runtime: a pass at once, then one
    /// on every raise of the GC safe point and every [`GC_INTERVAL`]. It
    /// stops when `shutdown` fires. The store is watched from before this
    /// returns, so no raise after it is missed.
    pub fn spawn(self, shutdown: ShutdownSignal) -> tokio::task::JoinHandle<()> {
        let raised = Arc::new(Notify::new());
        let observer = self.store.add_observer(Arc::new(SafePointWatch {
            raised: Arc::clone(&raised),
        }));
        tokio::spawn(Arc::new(self).run(raised, observer, shutdown))
    }

    async fn run(
        self: Arc<Self>,
        raised: Arc<Notify>,
        observer: ObserverId,
        mut shutdown: ShutdownSignal,
    ) {
        loop {
            let worker = Arc::clone(&self);
            let stopping = shutdown.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let outcome = worker.run_pass(&|| stopping.is_shutdown());
                worker.status.send_modify(|s| s.passes += 1);
                outcome
            })
            .await
            .unwrap_or_else(|err| Err(GcError::Task(err)));
            match pass {
                Ok(Some(pass)) => tracing::info!(
                    safe_point = %pass.safe_point,
                    keys_deleted = pass.keys_deleted,
                    "GC pass done"
                ),
                Ok(None) => {}
                Err(err) => tracing::error!(
                    last_collected = %self.last_collected(),
                    %err,
                    "GC pass failed; retrying on the next trigger"
                ),
            }
            // The timer is created only while waiting, so a paused test clock
            // cannot jump to it while a pass is running.
            tokio::select! {
                () = shutdown.recv() => break,
                () = raised.notified() => {}
                () = tokio::time::sleep(GC_INTERVAL) => {}
            }
        }
        self.store.remove_observer(observer);
        tracing::debug!("GC worker stopped");
    }
}

/// Wakes the worker when a batch writes the GC safe point. Runs on the
/// committing thread: it only inspects the batch and notifies.
struct SafePointWatch {
    raised: Arc<Notify>,
}

impl Observer for SafePointWatch {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        if batch.source != BatchSource::Internal {
            return;
        }
        let raised = batch
            .mutations
            .iter()
            .any(|m| m.cf == Cf::Meta && m.key == GC_SAFE_POINT_KEY && matches!(m.op, Op::Put(_)));
        if raised {
            // Stores a permit if the worker is mid-pass, so the raise is
            // picked up right after it.
            self.raised.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfeed_storage::engine::Engine;
    use kvfeed_storage::engine::memory::MemoryEngine;
    use kvfeed_storage::mvcc::{MutationOp, PrewriteRequest, TxnMutation};
    use kvfeed_storage::safepoint::ServiceId;
    use kvfeed_storage::store::Durability;
    use kvfeed_storage::tso::{Clock, ManualClock, Tso};

    /// Writes and reads through the transaction layer.
    struct Data {
        tso: Arc<Tso>,
        txn: Arc<TxnStore>,
    }

    impl Data {
        fn ts(&self) -> TimeStamp {
            self.tso.get(1).expect("ts")
        }

        /// Commits `key = value` in a fresh transaction; returns the commit ts.
        fn put(&self, key: &[u8], value: &[u8]) -> TimeStamp {
            let start_ts = self.ts();
            let req = PrewriteRequest {
                mutations: vec![TxnMutation::new(
                    key.to_vec(),
                    MutationOp::Put(value.to_vec()),
                )],
                primary: key.to_vec(),
                start_ts,
                lock_ttl: 3_000,
                ..PrewriteRequest::default()
            };
            let out = self.txn.prewrite(&req).expect("prewrite");
            assert!(out.locks.is_empty(), "{out:?}");
            let commit_ts = self.ts();
            self.txn
                .commit(&[key.to_vec()], start_ts, commit_ts)
                .expect("commit");
            commit_ts
        }

        fn get(&self, key: &[u8], at: TimeStamp) -> Option<Vec<u8>> {
            self.txn.get(key, at, &[]).expect("get")
        }
    }

    struct Fixture {
        clock: Arc<ManualClock>,
        data: Data,
        /// The PD side: the one writer of the safe points.
        pd: SafePoints,
        worker: GcWorker,
    }

    fn fixture() -> Fixture {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let store = Arc::new(Store::open(engine, Durability::NoSync).expect("store"));
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let tso = Arc::new(Tso::open(Arc::clone(&store), Arc::clone(&dyn_clock)).expect("tso"));
        let txn = Arc::new(TxnStore::new(Arc::clone(&store)));
        let raw = Arc::new(RawStore::new(Arc::clone(&store), Arc::clone(&tso)));
        let worker = GcWorker::new(
            Arc::clone(&store),
            SafePoints::new(Arc::clone(&store), Arc::clone(&dyn_clock)),
            Arc::clone(&txn),
            raw,
            GcMetrics::unregistered().expect("metrics"),
        );
        Fixture {
            clock,
            data: Data { tso, txn },
            pd: SafePoints::new(store, dyn_clock),
            worker,
        }
    }

    #[test]
    fn collects_old_versions_below_the_effective_safe_point_only() {
        let Fixture {
            clock,
            data,
            pd,
            worker,
        } = fixture();
        let first = data.put(b"k", b"v1");
        let second = data.put(b"k", b"v2");
        assert_eq!(data.get(b"k", first).as_deref(), Some(&b"v1"[..]));

        // Nothing raised yet: nothing to collect.
        assert_eq!(worker.run_once().expect("pass"), None);

        // A service holds GC at `first`, below the GC safe point.
        let held = pd
            .update_service(&ServiceId::new("cdc"), 60, first)
            .expect("service");
        assert!(held.updated);
        let above = data.ts();
        pd.update_gc_safe_point(above).expect("raise");
        let pass = worker.run_once().expect("pass").expect("advanced");
        assert_eq!(pass.safe_point, first);
        assert_eq!(
            data.get(b"k", first).as_deref(),
            Some(&b"v1"[..]),
            "the version visible at the service safe point is kept"
        );
        assert_eq!(worker.run_once().expect("pass"), None, "no advance");

        // The service expires: GC moves up to the GC safe point and the old
        // version goes.
        clock.advance(60_000);
        let pass = worker.run_once().expect("pass").expect("advanced");
        assert_eq!(pass.safe_point, above);
        assert!(pass.keys_deleted >= 1, "{pass:?}");
        assert_eq!(data.get(b"k", first), None, "v1 collected");
        assert_eq!(data.get(b"k", second).as_deref(), Some(&b"v2"[..]));
        assert_eq!(data.get(b"k", data.ts()).as_deref(), Some(&b"v2"[..]));
        assert_eq!(worker.last_collected(), above);
        assert_eq!(worker.metrics.runs.get(), 2);
        assert_eq!(worker.metrics.keys_deleted.get(), pass.keys_deleted);
        assert_eq!(worker.subscribe().borrow().passes, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_gc_safe_point_triggers_a_pass_and_shutdown_stops_the_loop() {
        let Fixture {
            data, pd, worker, ..
        } = fixture();
        let first = data.put(b"a", b"1");
        data.put(b"a", b"2");
        let shutdown = crate::shutdown::Shutdown::new();
        let mut status = worker.subscribe();
        let task = worker.spawn(shutdown.subscribe());
        // The pass at start finds nothing to collect.
        let after_start = *status.wait_for(|s| s.passes >= 1).await.expect("status");
        assert_eq!(after_start.last_collected, TimeStamp::ZERO);

        let started = tokio::time::Instant::now();
        let target = data.ts();
        pd.update_gc_safe_point(target).expect("raise");
        let done = *status
            .wait_for(|s| s.last_collected >= target)
            .await
            .expect("status");
        assert_eq!(done.last_collected, target);
        // Under the paused clock, waiting for the interval would have moved
        // it: the raise itself woke the worker.
        assert!(started.elapsed() < GC_INTERVAL, "{:?}", started.elapsed());
        assert_eq!(data.get(b"a", first), None, "the old version was collected");

        shutdown.trigger();
        task.await.expect("worker loop ends on shutdown");
    }
}
