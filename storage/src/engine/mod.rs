//! The engine trait: the only thing kvfeed asks of an ordered key-value store.
//!
//! Invariants every implementation keeps:
//! - A [`WriteBatch`] is atomic across column families: after a crash either
//!   all of it or none of it is visible.
//! - [`Engine::write`] makes a batch visible to later snapshots; it is durable
//!   only once a later [`Engine::sync`] returns `Ok` (the store above decides
//!   when to sync, so that concurrent writers can share one fsync).
//! - A snapshot never changes: it sees exactly the batches written before it
//!   was taken.
//! - Keys within a column family are ordered bytewise; iteration in both
//!   directions honours the bounds exactly.

pub mod cursor;
pub mod fjall;
pub mod memory;

use std::ops::Bound;

use crate::Result;

pub use cursor::Cursor;

/// Column families. `Default`, `Lock` and `Write` are TiKV's Percolator
/// families; `Raw` holds raw key-value data (kept apart so that transactional
/// scans never walk over raw versions and vice versa); `Meta` holds the
/// store's own bookkeeping (applied sequence number, cluster id, TSO window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Transaction values too long to inline, at `(key, start_ts)`.
    Default,
    /// Percolator locks of uncommitted transactions, one per key.
    Lock,
    /// Commit and rollback records, at `(key, commit_ts)`.
    Write,
    /// Raw (non-transactional) key-value data.
    Raw,
    /// The store's own bookkeeping, never visible to clients.
    Meta,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 5] = [Cf::Default, Cf::Lock, Cf::Write, Cf::Raw, Cf::Meta];

    /// The family's stable on-disk name.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Default => "default",
            Cf::Lock => "lock",
            Cf::Write => "write",
            Cf::Raw => "raw",
            Cf::Meta => "meta",
        }
    }
}

/// One change inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets the key to this value, replacing any previous one.
    Put(Vec<u8>),
    /// Removes the key; deleting an absent key is not an error.
    Delete,
}

/// A put or delete of one key in one column family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mutation {
    /// The column family the key lives in.
    pub cf: Cf,
    /// The key exactly as stored (already encoded by the layer above).
    pub key: Vec<u8>,
    /// What happens to the key.
    pub op: Op,
}

/// An ordered list of mutations applied atomically. Later mutations of the
/// same key win.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    mutations: Vec<Mutation>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a put of `key` to `value` in `cf`.
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.mutations.push(Mutation {
            cf,
            key: key.into(),
            op: Op::Put(value.into()),
        });
    }

    /// Appends a delete of `key` in `cf`.
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.mutations.push(Mutation {
            cf,
            key: key.into(),
            op: Op::Delete,
        });
    }

    /// Whether the batch holds no mutation; writing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }

    /// Number of mutations, counting repeated keys once per mutation.
    pub fn len(&self) -> usize {
        self.mutations.len()
    }

    /// The mutations in the order they apply.
    pub fn mutations(&self) -> &[Mutation] {
        &self.mutations
    }

    /// Takes the mutations out, in the order they apply.
    pub fn into_mutations(self) -> Vec<Mutation> {
        self.mutations
    }

    /// Appends every mutation of `other`.
    pub fn extend(&mut self, other: WriteBatch) {
        self.mutations.extend(other.mutations);
    }

    /// Approximate size in bytes (keys + values), for accounting.
    pub fn approximate_size(&self) -> usize {
        self.mutations
            .iter()
            .map(|m| {
                m.key.len()
                    + match &m.op {
                        Op::Put(v) => v.len(),
                        Op::Delete => 0,
                    }
            })
            .sum()
    }
}

/// A key-value pair read from the engine.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// An iterator over one column family of a snapshot.
pub type EngineIter<'a> = Box<dyn Iterator<Item = Result<KvPair>> + Send + 'a>;

/// An ordered, column-family aware key-value engine.
pub trait Engine: Send + Sync + 'static {
    /// Applies `batch` atomically. Visible to snapshots taken afterwards;
    /// durable after the next successful [`Engine::sync`].
    fn write(&self, batch: &WriteBatch) -> Result<()>;

    /// Makes every batch written so far durable (fsync).
    fn sync(&self) -> Result<()>;

    /// A consistent, immutable view of the whole engine.
    fn snapshot(&self) -> Box<dyn EngineSnapshot>;
}

/// A consistent read view of an [`Engine`]. Owns what it needs, so it can be
/// moved to another thread (a catch-up scan runs on one).
pub trait EngineSnapshot: Send + Sync + 'static {
    /// The value of `key` in `cf` as of the snapshot; `None` if absent.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Iterates `cf` between `lower` and `upper`, ascending, or descending when
    /// `reverse` is set.
    fn iter<'a>(
        &'a self,
        cf: Cf,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
    ) -> EngineIter<'a>;
}
