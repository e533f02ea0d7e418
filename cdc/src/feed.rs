//! The feed handle: starts the owner, opens connections, answers queries,
//! shuts down.
//!
//! A [`Feed`] is a cheap clone of one shared handle. The owner task runs
//! until [`Feed::shutdown`] or until the last handle is dropped (the
//! handle's `Drop` queues the shutdown message, which never blocks).
//! Connections do not keep the feed alive: they hold only channel senders,
//! and once the owner is gone their operations return
//! [`FeedError::ShuttingDown`].
//!
//! Besides the owner, the feed runs a resolved-ts task (module `ts_sampler`)
//! and one task per catch-up scan (module `scan`).
//!
//! Shutdown order: the owner flushes what it produced, ends every
//! connection (each event stream yields what is queued, then ends, so a
//! server's response streams finish with OK; their subscriptions' scans
//! are cancelled with them), drops whatever is still queued for it, and
//! finally drops its store observer registration. The resolved-ts task
//! stops when the owner's channel closes; scan tasks stop within one batch.
//! Each of them holds a share of the completion signal, and `shutdown`
//! returns only once all are gone, so once it has returned the store never
//! calls into the feed again and no feed task holds a snapshot or handle
//! of it.
//!
//! The store observer runs on the committing thread under the store's
//! publish lock, so it only filters by batch source (client writes and
//! region layout changes) and forwards an `Arc` of
//! the batch on the unbounded control channel: no allocation per mutation,
//! no lock, no waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use kvfeed_storage::mvcc::TxnStore;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::region::Regions;
use kvfeed_storage::safepoint::SafePoints;
use kvfeed_storage::store::{BatchSource, ChangeBatch, Observer, Store};
use kvfeed_storage::tso::Tso;

use crate::config::FeedConfig;
use crate::connection::{ConnGuard, ConnInfo, Connection, EventStream};
use crate::debug::{DebugSnapshot, FeedCounts};
use crate::error::FeedError;
use crate::ids::ConnId;
use crate::metrics::{FeedMetrics, PendingBytes, TaskGuard};
use crate::owner::{Command, Control, NewConnection, Observed, Owner, OwnerDeps, RESERVED_SLOTS};
use crate::queue;
use crate::quota::MemoryQuota;
use crate::scan::ScanPool;
use crate::ts_sampler::{self, MinTsSource};

/// What the feed is built on.
pub struct FeedDeps {
    /// The storage whose writes are fed and whose snapshots catch-up scans read.
    pub store: Arc<Store>,
    /// The live region layout requests are checked against (id, epoch,
    /// range). The feed takes it once at start and then follows its changes
    /// through the store's observed batches.
    pub regions: Arc<Regions>,
    /// Checked against requests of clients ≥ 5.3.0.
    pub cluster_id: u64,
    /// The `[cdc]` settings: limits, intervals and quotas.
    pub config: FeedConfig,
    /// The oracle the store's transactions and raw writes take timestamps
    /// from: resolved timestamps are sampled from it, and its clock is the
    /// one GC service safe points expire by.
    pub tso: Arc<Tso>,
    /// The transaction library serving clients: its concurrency manager
    /// bounds resolved timestamps by in-flight async-commit/1PC prewrites.
    pub txn: Arc<TxnStore>,
    /// The raw library serving clients: its in-flight writes bound raw
    /// subscriptions' resolved timestamps.
    pub raw: Arc<RawStore>,
}

/// A handle to the running feed. Clones share it.
#[derive(Clone, Debug)]
pub struct Feed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<Command>,
    control: mpsc::UnboundedSender<Control>,
    metrics: FeedMetrics,
    config: FeedConfig,
    quota: Arc<MemoryQuota>,
    next_conn: AtomicU64,
    closing: AtomicBool,
    /// Its sender is shared by the owner, the resolved-ts task and every
    /// scan task; closed when all of them have finished.
    done: watch::Receiver<()>,
    /// Catch-up scans alive.
    scans: watch::Receiver<usize>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the owner. Never blocks.
        let _ = self.control.send(Control::Shutdown);
    }
}

struct FeedObserver {
    control: mpsc::UnboundedSender<Control>,
    metrics: FeedMetrics,
}

impl Observer for FeedObserver {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        // GC and the store's bookkeeping are not user-visible changes;
        // layout changes end subscriptions.
        let wanted = match batch.source {
            BatchSource::Client => true,
            BatchSource::Regions => batch.regions.is_some(),
            BatchSource::Gc | BatchSource::Internal => false,
        };
        if wanted {
            // Fails only once the owner is gone (its registration is being
            // removed at that moment).
            let observed = Observed::new(Arc::clone(batch), &self.metrics);
            let _ = self.control.send(Control::Batch(observed));
        }
    }
}

impl Feed {
    /// Starts the owner task and registers the store observer. Must be
    /// called inside a Tokio runtime. Fails only if the feed's metrics
    /// cannot be defined (their names and help texts are constants, checked
    /// by a unit test), before anything is started.
    pub fn start(deps: FeedDeps) -> Result<Feed, FeedError> {
        let metrics = FeedMetrics::new()?;
        metrics
            .min_ts_interval
            .set(deps.config.effective_min_ts_interval().as_secs_f64());
        let (commands_tx, commands_rx) = mpsc::channel(deps.config.command_queue.max(1));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(());
        let done = Arc::new(done_tx);
        let observer = deps.store.add_observer(Arc::new(FeedObserver {
            control: control_tx.clone(),
            metrics: metrics.clone(),
        }));
        let quota = Arc::new(MemoryQuota::new(&deps.config, &metrics));
        // Read only: the feed never writes safe points.
        let safe_points = SafePoints::new(Arc::clone(&deps.store), Arc::clone(deps.tso.clock()));
        let (pool, scan_rx) = ScanPool::new(
            Arc::clone(&deps.store),
            safe_points,
            &deps.config,
            metrics.clone(),
            Arc::clone(&done),
        );
        let scans = pool.watch_active();
        let owner = Owner::new(OwnerDeps {
            store: deps.store,
            // Read after the observer is registered: a change that this map
            // does not contain yet is observed, and one it already contains
            // may be observed too (the owner keeps the newer generation).
            regions: deps.regions.current(),
            cluster_id: deps.cluster_id,
            config: deps.config.clone(),
            metrics: metrics.clone(),
            observer,
            scans: Arc::new(pool),
        });
        tokio::spawn(
            ts_sampler::run(
                MinTsSource {
                    tso: deps.tso,
                    txn: deps.txn,
                    raw: deps.raw,
                },
                control_tx.clone(),
                deps.config.effective_min_ts_interval(),
                metrics.clone(),
                Arc::clone(&done),
            )
            .instrument(tracing::info_span!("cdc_resolved_ts")),
        );
        tokio::spawn(
            owner
                .run(commands_rx, control_rx, scan_rx, done)
                .instrument(tracing::info_span!("cdc_owner")),
        );
        Ok(Feed {
            inner: Arc::new(Inner {
                commands: commands_tx,
                control: control_tx,
                metrics,
                config: deps.config,
                quota,
                next_conn: AtomicU64::new(1),
                closing: AtomicBool::new(false),
                done: done_rx,
                scans,
            }),
        })
    }

    /// Registers a connection. Returns its request side and its event
    /// stream. Never waits.
    pub fn connect(&self, info: ConnInfo) -> Result<(Connection, EventStream), FeedError> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(FeedError::ShuttingDown);
        }
        let id = ConnId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!(
            "cdc_conn",
            conn_id = id.0,
            peer = %info.peer,
            store_id = info.store_id
        );
        let pending = Arc::new(PendingBytes::new(
            &self.inner.metrics,
            Arc::clone(&self.inner.quota),
        ));
        let (sink, events) = queue::channel(
            self.inner.config.sink_capacity.max(1) + RESERVED_SLOTS,
            Arc::clone(&pending),
        );
        let (ended_tx, ended_rx) = watch::channel(());
        self.inner
            .control
            .send(Control::Connect(Box::new(NewConnection {
                id,
                peer: info.peer,
                features: info.features,
                store_id: info.store_id,
                sink,
                pending: Arc::clone(&pending),
                ended: ended_tx,
                span: span.clone(),
            })))
            .map_err(|_| FeedError::ShuttingDown)?;
        // From here on nothing can fail before the guard exists.
        let guard = ConnGuard::new(id, self.inner.control.clone());
        let connection = Connection::new(
            guard,
            self.inner.commands.clone(),
            info.features,
            ended_rx,
            span,
        );
        let stream = EventStream::new(id, events, self.inner.metrics.clone());
        Ok((connection, stream))
    }

    /// Stops the feed: ends every connection, removes the store observer,
    /// and returns when the owner has finished. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.closing.store(true, Ordering::Release);
        let _ = self.inner.control.send(Control::Shutdown);
        let mut done = self.inner.done.clone();
        while done.changed().await.is_ok() {}
    }

    /// Resolves once no catch-up scan is queued or running (immediately if
    /// none is, or once the feed is gone). Scans whose subscription went
    /// away count until they have noticed, which is within one batch.
    pub async fn scans_idle(&self) {
        let mut scans = self.inner.scans.clone();
        // An error means the pool is gone, and with it every scan.
        let _ = scans.wait_for(|n| *n == 0).await;
    }

    /// Every connection and subscription, as of after all previously sent
    /// requests and control messages.
    pub async fn debug_snapshot(&self) -> Result<DebugSnapshot, FeedError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::Snapshot { reply }, answer).await
    }

    /// Registry totals, with the same ordering guarantee as
    /// [`Feed::debug_snapshot`].
    pub async fn counts(&self) -> Result<FeedCounts, FeedError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Command::Counts { reply }, answer).await
    }

    async fn ask<T>(&self, cmd: Command, answer: oneshot::Receiver<T>) -> Result<T, FeedError> {
        self.inner
            .commands
            .send(cmd)
            .await
            .map_err(|_| FeedError::ShuttingDown)?;
        answer.await.map_err(|_| FeedError::ShuttingDown)
    }

    /// The feed's metrics (register them with [`FeedMetrics::register`]).
    pub fn metrics(&self) -> &FeedMetrics {
        &self.inner.metrics
    }

    /// A guard counting one live connection task; hold it for the task's
    /// whole life.
    pub fn task_guard(&self) -> TaskGuard {
        TaskGuard::new(&self.inner.metrics)
    }

    /// The settings the feed was built with.
    pub fn config(&self) -> &FeedConfig {
        &self.inner.config
    }
}
