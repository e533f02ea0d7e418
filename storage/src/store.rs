//! The apply sequence (PLACEHOLDER: API fixed, implementation in progress).

use std::sync::Arc;

use crate::Result;
use crate::engine::{Engine, EngineSnapshot, Mutation, WriteBatch};

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
}

/// A durable, applied batch as handed to observers.
#[derive(Debug)]
pub struct ChangeBatch {
    pub seq: SeqNo,
    pub source: BatchSource,
    pub mutations: Vec<Mutation>,
}

/// Receives every applied batch, in sequence order, after it is durable.
/// Called on the committing thread while the sequence is held: it must not
/// block or call back into the store (push to a channel and return).
pub trait Observer: Send + Sync + 'static {
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

/// The store: an engine plus the apply sequence.
pub struct Store {
    _engine: Arc<dyn Engine>,
}

impl Store {
    pub fn open(_engine: Arc<dyn Engine>, _durability: Durability) -> Result<Store> {
        todo!()
    }
    pub fn apply(&self, _batch: WriteBatch, _source: BatchSource) -> Result<SeqNo> {
        todo!()
    }
    pub fn snapshot(&self) -> Snapshot {
        todo!()
    }
    pub fn last_seq(&self) -> SeqNo {
        todo!()
    }
    pub fn add_observer(&self, _observer: Arc<dyn Observer>) -> ObserverId {
        todo!()
    }
    pub fn remove_observer(&self, _id: ObserverId) {
        todo!()
    }
}
