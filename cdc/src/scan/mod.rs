//! Catch-up scans, off the owner task.
//!
//! Each new subscription gets one scan task ([`ScanPool::spawn`]). The task
//! queues for one of `incremental-scan-concurrency` *scan slots*, then
//! arms its subscription, takes a store snapshot at apply sequence S and
//! reads it in bounded batches ([`reader`]), each on a blocking thread
//! holding one of `incremental-scan-threads` *thread permits*. Everything it
//! learns travels to the owner as [`ScanMsg`]s over one bounded channel, in
//! this order per scan: `Started { seq: S }`, `Batch`es, then `Done` (or
//! `Failed`). The owner alone decides what reaches the connection, so the
//! scan's rows, INITIALIZED and the live rows held back meanwhile keep
//! their order.
//!
//! # Arming, and why the boundary has no gap
//!
//! While a scan waits for its slot the owner ignores live batches for the
//! subscription: the snapshot, taken later, will contain them. The task sets
//! the subscription's `armed` flag (SeqCst) *before* it takes the snapshot;
//! from then on the owner holds back every routed batch with its seq. A
//! batch the owner saw unarmed was applied before the owner looked, hence
//! before the flag was set, hence before the snapshot (which waits for the
//! store's publish lock, under which the batch was announced): it is in
//! the snapshot. Held-back batches with seq ≤ S are dropped when `Started`
//! arrives, later ones are delivered after INITIALIZED, and batches seen
//! after the scan with seq ≤ S are dropped by seq. So every batch reaches
//! the subscription exactly once: through the snapshot or live.
//!
//! # Cancellation
//!
//! The subscription owns the sending half of a `watch` channel; the task
//! holds the receiver. However the subscription ends (deregistration,
//! connection end, congestion, shutdown), dropping it closes the channel.
//! The task checks it before every batch and awaits it alongside every wait
//! (slot, thread permit, speed limit, pacing, hand-over), so it stops within
//! one batch and no code has to remember to cancel it.
//!
//! # Pacing and memory
//!
//! Before handing a batch over, the task waits until the connection has room
//! (free queue slots beyond those kept for live rows, and fewer than
//! [`SCAN_PENDING_BYTES`] — or half the connection's memory cap, if less —
//! queued), woken whenever the client takes events.
//! A scan therefore runs at its reader's pace and a range is never held in
//! memory: per scan at most one batch being read, one being handed over,
//! and what the connection's queue admits. The next batch is read while
//! the previous one is handed over, so the store is read without waiting
//! for the owner's round trip; a batch is handed over only after the one
//! before it is queued (its `flushed` acknowledgement), so the room a scan
//! sees always counts its own earlier batches. The speed limit
//! ([`limiter`]) applies on top, to bytes read from the store: a read
//! starts only after the previous batch's bytes were paid for.
//!
//! A scan that finds its connection's event stream gone (the client or an
//! embedder dropped it) tells the owner (`ScanEvent::SinkGone`), which
//! ends the connection: the owner otherwise learns of a closed stream only
//! when it sends, and a half-closed connection waiting for this scan would
//! wait forever.
//!
//! A reader that takes nothing for [`SCAN_STALL_TIMEOUT`] while a scan
//! waits for room fails that subscription with `congested`: otherwise a
//! client that registers and never reads would hold a scan slot (and a
//! snapshot) forever, and a handful of them would starve every other
//! subscriber's scans.
//!
//! # Safe point
//!
//! Right after the snapshot is taken the task reads the effective GC safe
//! point. A checkpoint below it fails the subscription: GC may already have
//! removed versions the scan would have to report. Reading it *after* the
//! snapshot makes the check airtight: the safe point only rises, and GC
//! removes versions only after it has risen, so a safe point at or below the
//! checkpoint now was at or below it for every GC run the snapshot reflects.

mod limiter;
mod reader;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

use kvfeed_proto::cdcpb::event::Row;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::safepoint::SafePoints;
use kvfeed_storage::store::{SeqNo, Store};

use crate::config::FeedConfig;
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::{FeedMetrics, PendingBytes, ScanOutcome, ScanTaskGuard};
use crate::owner::{RESERVED_SLOTS, Refusal};
use crate::queue::WeakQueue;

use limiter::SpeedLimiter;
pub(crate) use reader::{ScanSpec, Scanner};

/// A scan stops handing batches over while its connection has this many
/// bytes queued and not taken.
pub(crate) const SCAN_PENDING_BYTES: u64 = 8 << 20;

/// How long a scan waits for its reader to take anything before the
/// subscription is failed as congested.
pub(crate) const SCAN_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Scan messages the owner may have waiting, across all scans.
const SCAN_CHANNEL: usize = 64;

/// Identifies one scan. A subscription remembers its scan's id, so a late
/// message of an earlier scan for the same (connection, request, region)
/// cannot touch a newer subscription. Allocated by the owner, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ScanId(pub u64);

/// Which subscription a scan serves.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanKey {
    pub conn: ConnId,
    pub request_id: RequestId,
    pub region_id: RegionId,
    pub scan: ScanId,
}

/// What a scan tells the owner.
#[derive(Debug)]
pub(crate) enum ScanEvent {
    /// The snapshot reflects every batch with seq ≤ this.
    Started { seq: SeqNo },
    /// Rows to deliver, and Put/Delete locks found (encoded key, start_ts).
    Batch {
        rows: Vec<Row>,
        locks: Vec<(Vec<u8>, TimeStamp)>,
    },
    /// Every row has been handed over.
    Done,
    /// The connection's event stream is gone: the scan stopped, and the
    /// connection can never be served again.
    SinkGone,
    /// The scan cannot complete; the subscription ends with this error.
    Failed(Refusal),
}

#[derive(Debug)]
pub(crate) struct ScanMsg {
    pub key: ScanKey,
    pub event: ScanEvent,
    /// Dropped by the owner once the events this message produced are
    /// queued on the connection (after the step's flush). The scan waits
    /// for it before looking for room again, so its own earlier batch is
    /// counted in the room it sees: without this, batches still on their
    /// way to the owner were invisible to `pace`, and a burst of them could
    /// overfill a reading client's queue and congest it.
    pub flushed: oneshot::Sender<()>,
}

/// Everything a scan task needs about its subscription and connection.
pub(crate) struct ScanJob {
    pub key: ScanKey,
    pub spec: ScanSpec,
    /// Closed when the subscription goes away.
    pub cancel: watch::Receiver<()>,
    /// Set before the snapshot is taken; see the module docs.
    pub armed: Arc<AtomicBool>,
    /// Looked at (never sent to) for pacing.
    pub sink: WeakQueue,
    pub pending: Arc<PendingBytes>,
    pub span: tracing::Span,
}

/// What the scan tasks share; one per feed.
pub(crate) struct ScanPool {
    store: Arc<Store>,
    safe_points: SafePoints,
    slots: Arc<Semaphore>,
    threads: Arc<Semaphore>,
    limiter: SpeedLimiter,
    tx: mpsc::Sender<ScanMsg>,
    metrics: FeedMetrics,
    /// Scan tasks alive (queued, running, or winding down).
    active: watch::Sender<usize>,
    /// Free ordinary slots a connection needs before a batch is handed over.
    free_slots: usize,
    limit: usize,
    /// Kept while any task lives, so `Feed::shutdown` waits for them.
    _done: Arc<watch::Sender<()>>,
}

impl ScanPool {
    /// A pool and the receiving end of its message channel (for the owner).
    pub(crate) fn new(
        store: Arc<Store>,
        safe_points: SafePoints,
        config: &FeedConfig,
        metrics: FeedMetrics,
        done: Arc<watch::Sender<()>>,
    ) -> (ScanPool, mpsc::Receiver<ScanMsg>) {
        let (tx, rx) = mpsc::channel(SCAN_CHANNEL);
        let pool = ScanPool {
            store,
            safe_points,
            slots: Arc::new(Semaphore::new(config.incremental_scan_concurrency.max(1))),
            threads: Arc::new(Semaphore::new(config.incremental_scan_threads.max(1))),
            limiter: SpeedLimiter::new(config.incremental_scan_speed_limit),
            tx,
            metrics,
            active: watch::Sender::new(0),
            free_slots: (config.sink_capacity / 2).clamp(1, 8),
            limit: config.incremental_scan_concurrency_limit,
            _done: done,
        };
        (pool, rx)
    }

    /// Scans queued or running. A Register is refused when this reaches
    /// `incremental-scan-concurrency-limit`.
    pub(crate) fn ongoing(&self) -> usize {
        *self.active.borrow()
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Follows [`ScanPool::ongoing`].
    pub(crate) fn watch_active(&self) -> watch::Receiver<usize> {
        self.active.subscribe()
    }

    /// Starts a scan task. Counted as ongoing from this call on.
    pub(crate) fn spawn(self: &Arc<Self>, job: ScanJob) {
        let ticket = Ticket::new(self);
        let span = job.span.clone();
        tokio::spawn(Arc::clone(self).run(job, ticket).instrument(span));
    }

    /// Waits for a scan slot, then scans. While it waits the task holds
    /// only the job: the scan's own state (a snapshot, the reader, batches
    /// in flight) is a large future, boxed once it may run. A connection
    /// registering thousands of regions queues thousands of scans at once,
    /// and holding the whole scan future from the start cost about 6 KB
    /// each, which the allocator then kept as resident memory.
    async fn run(self: Arc<Self>, mut job: ScanJob, ticket: Ticket) {
        let slot = tokio::select! {
            permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = cancelled(&mut job.cancel) => return,
        };
        Box::pin(self.scan(job, ticket, slot)).await;
    }

    async fn scan(self: Arc<Self>, job: ScanJob, mut ticket: Ticket, slot: OwnedSemaphorePermit) {
        let ScanJob {
            key,
            spec,
            mut cancel,
            armed,
            sink,
            pending,
            span: _,
        } = job;
        let store = Arc::clone(&self.store);
        let checkpoint = spec.checkpoint;
        let pool = Arc::clone(&self);
        let opened = self
            .blocking(&mut cancel, move || {
                armed.store(true, Ordering::SeqCst);
                let snapshot = store.snapshot();
                let safe_point = pool
                    .safe_points
                    .effective_safe_point()
                    .map_err(|e| Refusal::ScanFailed(format!("reading the GC safe point: {e}")))?;
                if checkpoint < safe_point {
                    return Err(Refusal::BelowSafePoint {
                        checkpoint,
                        safe_point,
                    });
                }
                Ok(Scanner::new(snapshot, spec))
            })
            .await;
        let mut scanner = match opened {
            Err(Interrupted::Cancelled) => return,
            Err(Interrupted::Panicked) => {
                let failed = ScanEvent::Failed(Refusal::ScanFailed("the scan panicked".into()));
                self.hand_over(&mut cancel, key, failed).await;
                return;
            }
            Ok(Err(refusal)) => {
                // A failed scan did not finish its range: counted as aborted.
                self.hand_over(&mut cancel, key, ScanEvent::Failed(refusal))
                    .await;
                return;
            }
            Ok(Ok(scanner)) => scanner,
        };
        let seq = scanner.seq();
        tracing::debug!(seq = seq.0, "catch-up snapshot taken");
        if !self
            .hand_over(&mut cancel, key, ScanEvent::Started { seq })
            .await
        {
            return;
        }
        // Each turn reads the next batch on a blocking thread while the
        // previous one is handed over, so reading never waits for the
        // owner and the connection's queue: at most one batch is being
        // read and one handed over at a time.
        let mut ready: Vec<ScanEvent> = Vec::new();
        loop {
            let mut read_cancel = cancel.clone();
            let read = self.blocking(&mut read_cancel, move || {
                let batch = scanner.next_batch();
                (scanner, batch)
            });
            let delivered = self
                .deliver_while(&sink, &pending, &mut cancel, key, ready, read)
                .await;
            let Some(read) = delivered else {
                return;
            };
            let (back, batch) = match read {
                Ok(read) => read,
                Err(Interrupted::Cancelled) => return,
                Err(Interrupted::Panicked) => {
                    let failed = ScanEvent::Failed(Refusal::ScanFailed("the scan panicked".into()));
                    self.hand_over(&mut cancel, key, failed).await;
                    return;
                }
            };
            scanner = back;
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "catch-up scan failed");
                    let failed = ScanEvent::Failed(Refusal::ScanFailed(e.to_string()));
                    self.hand_over(&mut cancel, key, failed).await;
                    return;
                }
            };
            self.metrics
                .scanned_bytes
                .inc_by(u64::try_from(batch.read_bytes).unwrap_or(u64::MAX));
            // Rows, PREWRITE rows of found locks included (`locks` only
            // repeats those for the resolved ts).
            self.metrics
                .scanned_rows
                .inc_by(u64::try_from(batch.rows.len()).unwrap_or(u64::MAX));
            tokio::select! {
                () = self.limiter.consume(batch.read_bytes) => {}
                () = cancelled(&mut cancel) => return,
            }
            let finished = batch.finished;
            ready = Vec::with_capacity(2);
            if !batch.rows.is_empty() || !batch.locks.is_empty() {
                ready.push(ScanEvent::Batch {
                    rows: batch.rows,
                    locks: batch.locks,
                });
            }
            if finished {
                // INITIALIZED and the held-back rows need room too.
                ready.push(ScanEvent::Done);
                if self.deliver(&sink, &pending, &mut cancel, key, ready).await {
                    ticket.finish();
                }
                drop(slot);
                return;
            }
        }
    }

    /// Hands `events` over (see [`ScanPool::deliver`]) while `read` makes
    /// progress. Returns what `read` produced, or `None` if the scan must
    /// stop (`read` is then dropped: work already on a blocking thread
    /// finishes in the background).
    async fn deliver_while<R: Future>(
        &self,
        sink: &WeakQueue,
        pending: &PendingBytes,
        cancel: &mut watch::Receiver<()>,
        key: ScanKey,
        events: Vec<ScanEvent>,
        read: R,
    ) -> Option<R::Output> {
        let deliver = self.deliver(sink, pending, cancel, key, events);
        tokio::pin!(deliver, read);
        let mut read_out = None;
        loop {
            tokio::select! {
                delivered = &mut deliver => {
                    if !delivered {
                        return None;
                    }
                    break;
                }
                out = &mut read, if read_out.is_none() => read_out = Some(out),
            }
        }
        Some(match read_out {
            Some(out) => out,
            None => read.await,
        })
    }

    /// Hands `events` over in order, each once the connection has room.
    /// Returns false if the scan must stop (cancelled, the subscriber is
    /// gone or stalled, the owner is gone); the owner has then been told
    /// whatever it needs to end the subscription.
    async fn deliver(
        &self,
        sink: &WeakQueue,
        pending: &PendingBytes,
        cancel: &mut watch::Receiver<()>,
        key: ScanKey,
        events: Vec<ScanEvent>,
    ) -> bool {
        for event in events {
            match self.pace(sink, pending, cancel).await {
                Pace::Room => {}
                Pace::Cancelled => return false,
                Pace::Gone => {
                    // The subscriber dropped its event stream. Nothing
                    // else would tell the owner (it learns of a closed
                    // queue only when it sends), and a half-closed
                    // connection waits for this scan: say so, so the
                    // owner ends the connection.
                    tracing::debug!("the subscriber's event stream is gone");
                    self.hand_over(cancel, key, ScanEvent::SinkGone).await;
                    return false;
                }
                Pace::Stalled => {
                    tracing::warn!("the subscriber took nothing while its scan waited");
                    let failed = ScanEvent::Failed(Refusal::Congested(key.region_id));
                    self.hand_over(cancel, key, failed).await;
                    return false;
                }
            }
            if !self.hand_over(cancel, key, event).await {
                return false;
            }
        }
        true
    }

    /// Runs `work` on a blocking thread under a thread permit. When
    /// cancelled first, work already started still finishes in the
    /// background and releases its permit then.
    async fn blocking<T, F>(
        &self,
        cancel: &mut watch::Receiver<()>,
        work: F,
    ) -> Result<T, Interrupted>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit = tokio::select! {
            permit = Arc::clone(&self.threads).acquire_owned() => {
                // Closed only if the pool is gone.
                permit.map_err(|_| Interrupted::Cancelled)?
            }
            () = cancelled(cancel) => return Err(Interrupted::Cancelled),
        };
        if is_cancelled(cancel) {
            return Err(Interrupted::Cancelled);
        }
        let task = tokio::task::spawn_blocking(move || {
            let out = work();
            drop(permit);
            out
        });
        tokio::select! {
            joined = task => joined.map_err(|e| {
                tracing::error!(error = %e, "catch-up scan batch panicked");
                Interrupted::Panicked
            }),
            () = cancelled(cancel) => Err(Interrupted::Cancelled),
        }
    }

    /// Waits until the connection has room for another batch.
    async fn pace(
        &self,
        sink: &WeakQueue,
        pending: &PendingBytes,
        cancel: &mut watch::Receiver<()>,
    ) -> Pace {
        loop {
            // Registered before looking, so a take in between still wakes us.
            let drained = pending.drained().notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let Some(free) = sink.free() else {
                // The queue's sender goes only with the connection's
                // registry entry, which cancels the scan first.
                return if is_cancelled(cancel) {
                    Pace::Cancelled
                } else {
                    Pace::Gone
                };
            };
            let free = free.saturating_sub(RESERVED_SLOTS);
            // At most half the connection's byte cap queued, so a batch
            // (≤ SCAN_BATCH_MAX_BYTES) rarely meets a full quota.
            let queued_cap = SCAN_PENDING_BYTES.min(pending.quota().conn_capacity() / 2);
            if free >= self.free_slots && pending.get() < queued_cap {
                return Pace::Room;
            }
            // Each take restarts the clock: only a reader that takes
            // nothing at all is stalled.
            tokio::select! {
                () = &mut drained => {}
                () = tokio::time::sleep(SCAN_STALL_TIMEOUT) => return Pace::Stalled,
                () = cancelled(cancel) => return Pace::Cancelled,
            }
        }
    }

    /// Sends one message to the owner; false if cancelled first or the
    /// owner is gone.
    async fn hand_over(
        &self,
        cancel: &mut watch::Receiver<()>,
        key: ScanKey,
        event: ScanEvent,
    ) -> bool {
        let (flushed, queued) = oneshot::channel();
        let msg = ScanMsg {
            key,
            event,
            flushed,
        };
        tokio::select! {
            sent = self.tx.send(msg) => if sent.is_err() { return false; },
            () = cancelled(cancel) => return false,
        }
        // Err is the expected answer: the owner drops the sender at its next
        // flush whatever became of the subscription (or when it is gone), so
        // this wait always ends and needs no race with `cancel` — which,
        // after `Done`, fires as the subscription completes and would make a
        // finished scan look aborted.
        let _ = queued.await;
        true
    }
}

/// Why blocking work produced nothing.
enum Interrupted {
    Cancelled,
    /// The subscription must be told; it would otherwise never initialize.
    Panicked,
}

/// What waiting for room ended with.
enum Pace {
    Room,
    /// The subscription is gone.
    Cancelled,
    /// The subscriber's event stream is gone (the subscription is not).
    Gone,
    /// The reader took nothing for [`SCAN_STALL_TIMEOUT`].
    Stalled,
}

/// Resolves once the subscription behind `cancel` is gone.
async fn cancelled(cancel: &mut watch::Receiver<()>) {
    // Nothing is ever sent: `changed` only returns once the sender drops.
    while cancel.changed().await.is_ok() {}
}

fn is_cancelled(cancel: &watch::Receiver<()>) -> bool {
    cancel.has_changed().is_err()
}

/// One scan task's place in the pool's count and in the scan metrics.
struct Ticket {
    active: watch::Sender<usize>,
    guard: ScanTaskGuard,
}

impl Ticket {
    fn new(pool: &ScanPool) -> Ticket {
        pool.active.send_modify(|n| *n += 1);
        Ticket {
            active: pool.active.clone(),
            guard: ScanTaskGuard::new(&pool.metrics),
        }
    }

    fn finish(&mut self) {
        self.guard.set_outcome(ScanOutcome::Finished);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}
