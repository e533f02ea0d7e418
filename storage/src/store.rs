//! The apply sequence: the one place where writes are ordered, made durable
//! and announced.
//!
//! # Why this exists
//!
//! The change feed must hand a subscriber an initial snapshot and then every
//! change after it, with no gap and no duplicate. That is only possible if
//! "which writes does this snapshot contain" and "which writes will this
//! observer be told about" are answered against one total order. The store
//! provides that order: every non-empty batch gets a [`SeqNo`], one larger
//! than the previous, and the number is persisted in [`Cf::Meta`] under
//! [`APPLIED_SEQ_KEY`] *in the same atomic engine write* as the batch, so the
//! numbering survives restarts and a recovered engine's `applied_seq` names
//! exactly the last batch it contains.
//!
//! # Group commit
//!
//! Writers enqueue their batch and wait. Whoever finds no leader active
//! becomes the leader: it takes the queued batches (up to a size cap),
//! numbers them in queue order, merges them (plus the `applied_seq` put) into
//! one engine write, syncs once if [`Durability::SyncOnCommit`], publishes,
//! and wakes the waiters with their numbers. Concurrent writers therefore
//! share one fsync. At most one leader is active, so groups never overlap and
//! numbering, writing and publishing all happen in one order. Observers get
//! each batch as submitted; the `applied_seq` put is the store's own and is
//! not part of any [`ChangeBatch`].
//!
//! # The publish lock and the seam invariant
//!
//! The leader holds the *publish lock* from before the engine write until all
//! observers have been called. [`Store::snapshot`] takes the same lock. Hence:
//!
//! 1. A snapshot sees a batch iff the batch's seq ≤ the snapshot's seq: engine
//!    writes happen only under the lock, and the snapshot reads the engine
//!    and `last_seq` together under it.
//! 2. A snapshot never contains a batch that is not yet durable or not yet
//!    handed to observers: publication finishes before the lock is released.
//! 3. An observer registered before a snapshot is taken is called for every
//!    batch with seq > the snapshot's seq. Registration and notification share
//!    the observer lock, so an observer misses a batch only if notification of
//!    it had begun before registration; the leader then still held the publish
//!    lock, which the later snapshot has to wait for, so the snapshot contains
//!    that batch. The observer may additionally see batches the snapshot also
//!    contains; subscribers drop those by seq (`seq <= snapshot.seq()`).
//!
//! Lock order is queue → (released) → publish → observers; `add_observer` and
//! `remove_observer` take only the observer lock, and because notification
//! holds it, once `remove_observer` returns the observer is never called again.
//!
//! # Failures
//!
//! If the engine write or the sync fails, no batch of the group is observed,
//! every writer of the group gets the error, and the store is *poisoned*:
//! after a failed fsync the journal's contents are unknown, so continuing to
//! number and announce writes could announce something that later vanishes.
//! Every later write returns [`Error::Poisoned`]. Snapshots stay available for
//! diagnostics, but may then include the failed group's writes (the engine may
//! hold them in memory); a server should stop serving once
//! [`Store::is_poisoned`] is true.
//!
//! An empty batch changes nothing and gets no number: `apply` returns the
//! current last seq (which already covers every write acknowledged before the
//! call), writes nothing and calls no observer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::engine::{Cf, Engine, EngineSnapshot, Mutation, WriteBatch};
use crate::error::EngineSource;
use crate::region::RegionChange;
use crate::{Error, Result};

/// The [`Cf::Meta`] key holding the last applied [`SeqNo`] (8 bytes, big
/// endian). Reserved: client batches may not write it.
pub const APPLIED_SEQ_KEY: &[u8] = b"store/applied_seq";

/// Upper bound on the bytes merged into one group, so a burst of large
/// batches does not make one engine write (and its waiters) unbounded. A
/// single batch larger than this still forms a group of its own.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// Position in the apply sequence. Strictly increasing, persisted, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SeqNo(pub u64);

/// Why a batch was written. Observers use it to skip batches that are not
/// user-visible changes (GC must not produce feed events).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSource {
    /// A client command (transactional or raw write).
    Client,
    /// MVCC garbage collection.
    Gc,
    /// The store's own bookkeeping (TSO window, cluster id).
    Internal,
    /// A change of the region layout (see [`crate::region::Regions`]); the
    /// batch carries the change in [`ChangeBatch::regions`].
    Regions,
}

/// A durable, applied batch as handed to observers.
#[derive(Debug)]
pub struct ChangeBatch {
    /// The batch's place in the store's total order of applied batches.
    pub seq: SeqNo,
    /// Why the batch was written.
    pub source: BatchSource,
    /// The engine mutations exactly as applied (keys encoded).
    pub mutations: Vec<Mutation>,
    /// The region layout change this batch persists, if it is one.
    pub regions: Option<Arc<RegionChange>>,
}

/// Receives every applied batch, in sequence order, after it is durable.
/// Called on the committing thread while the sequence is held: it must not
/// block or call back into the store (push to a channel and return).
pub trait Observer: Send + Sync + 'static {
    /// Called once per applied batch, with the rules above.
    fn on_apply(&self, batch: &Arc<ChangeBatch>);
}

/// Durability of [`Store::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync before acknowledging (concurrent writers share one fsync).
    #[default]
    SyncOnCommit,
    /// Acknowledge once written to the engine; the OS flushes later.
    NoSync,
}

/// A snapshot plus the sequence number it reflects: it contains exactly the
/// batches with `seq <= self.seq()`.
pub struct Snapshot {
    inner: Box<dyn EngineSnapshot>,
    seq: SeqNo,
}

impl Snapshot {
    /// The sequence number of the last batch the snapshot contains.
    pub fn seq(&self) -> SeqNo {
        self.seq
    }
}

impl std::ops::Deref for Snapshot {
    type Target = dyn EngineSnapshot;
    fn deref(&self) -> &Self::Target {
        &*self.inner
    }
}

/// Identifies a registered observer so it can be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObserverId(pub u64);

/// Where a waiting writer's outcome is delivered. Written by the leader
/// before it takes the queue lock to wake everyone, read under the queue lock,
/// so a waiter that saw it empty is guaranteed to be woken after it is filled.
type Slot = Arc<Mutex<Option<Result<SeqNo>>>>;

struct Request {
    batch: WriteBatch,
    source: BatchSource,
    regions: Option<Arc<RegionChange>>,
    slot: Slot,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Request>,
    leader_active: bool,
}

struct Publish {
    poisoned: Option<Poison>,
}

/// Why the store refuses writes; cloned into every refusal so that a full
/// disk stays recognisable in each ([`Error::io_kind`]).
#[derive(Clone)]
struct Poison {
    reason: String,
    source: Option<EngineSource>,
}

impl Poison {
    fn error(&self) -> Error {
        Error::Poisoned {
            reason: self.reason.clone(),
            source: self.source.clone(),
        }
    }
}

#[derive(Default)]
struct Observers {
    next_id: u64,
    list: Vec<(ObserverId, Arc<dyn Observer>)>,
}

/// The store: an engine plus the apply sequence.
pub struct Store {
    engine: Arc<dyn Engine>,
    durability: Durability,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    publish: Mutex<Publish>,
    /// The last published seq. Written only under `publish`; read lock-free by
    /// [`Store::last_seq`] so callers are not held up by an fsync.
    last_seq: AtomicU64,
    observers: Mutex<Observers>,
}

impl Store {
    /// Opens the apply sequence over `engine`, continuing the numbering
    /// recorded in [`Cf::Meta`].
    pub fn open(engine: Arc<dyn Engine>, durability: Durability) -> Result<Store> {
        let last = match engine.snapshot().get(Cf::Meta, APPLIED_SEQ_KEY)? {
            None => 0,
            Some(raw) => {
                let bytes: [u8; 8] = raw.as_slice().try_into().map_err(|_| {
                    Error::corrupt(
                        Cf::Meta.name(),
                        format!("applied_seq has {} bytes, expected 8", raw.len()),
                    )
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        Ok(Store {
            engine,
            durability,
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            publish: Mutex::new(Publish { poisoned: None }),
            last_seq: AtomicU64::new(last),
            observers: Mutex::new(Observers::default()),
        })
    }

    /// Applies `batch` atomically, durably (per the store's [`Durability`]),
    /// and announces it to observers; returns its sequence number. Blocks the
    /// calling thread while the group it joined commits.
    pub fn apply(&self, batch: WriteBatch, source: BatchSource) -> Result<SeqNo> {
        self.submit(batch, source, None)
    }

    /// Applies `batch`, which persists the layout change `change`, and hands
    /// the change to observers with it ([`ChangeBatch::regions`]), in the
    /// same place of the total order.
    pub fn apply_region_change(
        &self,
        batch: WriteBatch,
        change: Arc<RegionChange>,
    ) -> Result<SeqNo> {
        if batch.is_empty() {
            return Err(Error::InvalidInput(
                "a region change must persist something".into(),
            ));
        }
        self.submit(batch, BatchSource::Regions, Some(change))
    }

    fn submit(
        &self,
        batch: WriteBatch,
        source: BatchSource,
        regions: Option<Arc<RegionChange>>,
    ) -> Result<SeqNo> {
        if batch
            .mutations()
            .iter()
            .any(|m| m.cf == Cf::Meta && m.key == APPLIED_SEQ_KEY)
        {
            return Err(Error::InvalidInput(
                "the applied sequence key is reserved for the store".into(),
            ));
        }
        // Refuse input the engine would refuse before it can join a group:
        // an engine write failure poisons the store, a bad key must not.
        crate::engine::memory::check_batch(&batch)?;
        if batch.is_empty() {
            let publish = self.publish.lock();
            if let Some(poison) = &publish.poisoned {
                return Err(poison.error());
            }
            return Ok(self.last_seq());
        }

        let slot: Slot = Arc::new(Mutex::new(None));
        let mut queue = self.queue.lock();
        queue.pending.push_back(Request {
            batch,
            source,
            regions,
            slot: Arc::clone(&slot),
        });
        loop {
            if let Some(result) = slot.lock().take() {
                return result;
            }
            if queue.leader_active {
                self.queue_cv.wait(&mut queue);
                continue;
            }
            queue.leader_active = true;
            let group = take_group(&mut queue.pending);
            drop(queue);
            // The guard reopens leadership (and fails the group if the commit
            // unwound), whatever happens inside.
            let guard = LeaderGuard {
                store: self,
                slots: group.iter().map(|r| Arc::clone(&r.slot)).collect(),
            };
            self.commit_group(group);
            drop(guard);
            queue = self.queue.lock();
        }
    }

    /// Commits one group under the publish lock and fills every slot.
    fn commit_group(&self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        let mut publish = self.publish.lock();
        if let Some(poison) = &publish.poisoned {
            for req in &group {
                *req.slot.lock() = Some(Err(poison.error()));
            }
            return;
        }

        let first = self.last_seq.load(Ordering::Acquire) + 1;
        let last = first + group.len() as u64 - 1;
        let mut merged = WriteBatch::new();
        let mut parts = Vec::with_capacity(group.len());
        for req in group {
            parts.push((req.batch.len(), req.source, req.regions, req.slot));
            merged.extend(req.batch);
        }
        merged.put(Cf::Meta, APPLIED_SEQ_KEY, last.to_be_bytes());

        let written = self
            .engine
            .write(&merged)
            .and_then(|()| match self.durability {
                Durability::SyncOnCommit => self.engine.sync(),
                Durability::NoSync => Ok(()),
            });
        if let Err(err) = written {
            let reason = format!("committing seq {first}..={last}: {err}");
            tracing::error!(%reason, "store poisoned");
            // Each writer gets the engine's own error, so that a full disk
            // can be told from a broken one.
            let (context, source): (String, EngineSource) = match err {
                Error::Engine { context, source } => (
                    format!("committing seq {first}..={last}: {context}"),
                    source,
                ),
                other => (format!("committing seq {first}..={last}"), Arc::new(other)),
            };
            for (_, _, _, slot) in &parts {
                *slot.lock() = Some(Err(Error::Engine {
                    context: context.clone(),
                    source: Arc::clone(&source),
                }));
            }
            publish.poisoned = Some(Poison {
                reason,
                source: Some(source),
            });
            return;
        }

        // Split the merged mutations back into their batches, moving them.
        let mut mutations = merged.into_mutations().into_iter();
        let mut published = Vec::with_capacity(parts.len());
        for (seq, (len, source, regions, slot)) in (first..=last).zip(parts) {
            let batch = ChangeBatch {
                seq: SeqNo(seq),
                source,
                mutations: mutations.by_ref().take(len).collect(),
                regions,
            };
            published.push((Arc::new(batch), slot));
        }
        {
            let observers = self.observers.lock();
            for (batch, _) in &published {
                for (_, observer) in &observers.list {
                    observer.on_apply(batch);
                }
            }
        }
        self.last_seq.store(last, Ordering::Release);
        drop(publish);
        for (batch, slot) in published {
            *slot.lock() = Some(Ok(batch.seq));
        }
    }

    /// A consistent view containing exactly the batches with seq ≤ its seq.
    pub fn snapshot(&self) -> Snapshot {
        let _publish = self.publish.lock();
        Snapshot {
            inner: self.engine.snapshot(),
            seq: self.last_seq(),
        }
    }

    /// The seq of the last published batch (0 for a fresh store).
    pub fn last_seq(&self) -> SeqNo {
        SeqNo(self.last_seq.load(Ordering::Acquire))
    }

    /// How many batches are queued and not yet taken by a commit group (a
    /// queue-depth gauge; also lets tests observe that writers are waiting).
    pub fn pending_writes(&self) -> usize {
        self.queue.lock().pending.len()
    }

    /// Whether an earlier write failure made the store refuse writes.
    pub fn is_poisoned(&self) -> bool {
        self.publish.lock().poisoned.is_some()
    }

    /// Registers `observer` for every batch published from now on. Take a
    /// snapshot *after* this returns to obtain a gap-free starting point.
    pub fn add_observer(&self, observer: Arc<dyn Observer>) -> ObserverId {
        let mut observers = self.observers.lock();
        observers.next_id += 1;
        let id = ObserverId(observers.next_id);
        observers.list.push((id, observer));
        id
    }

    /// Unregisters an observer. Once this returns it is never called again.
    /// Unknown ids are ignored. Must not be called from inside an observer.
    pub fn remove_observer(&self, id: ObserverId) {
        self.observers.lock().list.retain(|(oid, _)| *oid != id);
    }
}

/// Takes requests from the front of the queue up to [`MAX_GROUP_BYTES`]
/// (always at least one).
fn take_group(pending: &mut VecDeque<Request>) -> Vec<Request> {
    let mut group = Vec::new();
    let mut bytes = 0;
    while let Some(front) = pending.front() {
        let size = front.batch.approximate_size();
        if !group.is_empty() && bytes + size > MAX_GROUP_BYTES {
            break;
        }
        bytes += size;
        if let Some(req) = pending.pop_front() {
            group.push(req);
        }
    }
    group
}

/// Ends a leader's term. If the commit unwound (an observer panicked), the
/// group's outcome is unknown: poison the store and fail every writer that
/// was not answered, so nobody waits forever.
struct LeaderGuard<'a> {
    store: &'a Store,
    slots: Vec<Slot>,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let poison = Poison {
                reason: "a commit was interrupted by a panic".to_string(),
                source: None,
            };
            self.store.publish.lock().poisoned = Some(poison.clone());
            for slot in &self.slots {
                let mut slot = slot.lock();
                if slot.is_none() {
                    *slot = Some(Err(poison.error()));
                }
            }
        }
        let mut queue = self.store.queue.lock();
        queue.leader_active = false;
        self.store.queue_cv.notify_all();
    }
}
