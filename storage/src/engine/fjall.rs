//! The durable [`Engine`], on fjall (an LSM-tree with a shared journal).
//!
//! Each [`Cf`] is one fjall keyspace named [`Cf::name`]. All keyspaces share
//! one journal, and a fjall write batch spanning several keyspaces is one
//! journal record, which gives the cross-family atomicity the trait demands.
//!
//! Durability split: [`Engine::write`] commits with `PersistMode::Buffer`
//! (the record reaches the OS, so it survives a process crash but not a power
//! loss), and [`Engine::sync`] fsyncs the journal (`PersistMode::SyncAll`).
//! The store above calls `sync` once per commit group.
//!
//! Invariants this module keeps on top of fjall:
//! - Within one fjall batch every item gets the same fjall sequence number, so
//!   two items for the same key would be ordered by item type rather than by
//!   position. The trait promises "later mutations of the same key win", so
//!   batches are deduplicated (last one kept) before they reach fjall.
//! - fjall asserts on empty or over-long keys; such batches are refused with
//!   [`Error::InvalidInput`] first (see `check_batch`), so input can never
//!   reach a panic.
//! - fjall holds an exclusive lock file inside the directory for as long as
//!   the database is open, so a second open of the same path fails with an
//!   engine error instead of corrupting it. Snapshots share the database
//!   handle, so the lock is released only once the engine *and* every
//!   snapshot taken from it are dropped.
//! - Once fjall reports a failed journal write or fsync it poisons itself and
//!   refuses further writes; the store poisons itself likewise.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::engine::memory::{check_batch, index, non_empty_range};
use crate::engine::{Cf, Engine, EngineIter, EngineSnapshot, Op, WriteBatch};
use crate::{Error, Result};

/// Tuning for [`FjallEngine::open_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FjallOptions {
    /// Block cache capacity in bytes, shared by all column families.
    pub cache_size_bytes: u64,
}

impl Default for FjallOptions {
    fn default() -> Self {
        FjallOptions {
            cache_size_bytes: 64 << 20,
        }
    }
}

/// A fjall database with one keyspace per column family.
pub struct FjallEngine {
    db: Database,
    /// Indexed like [`Cf::ALL`].
    keyspaces: [Keyspace; Cf::ALL.len()],
    path: PathBuf,
}

fn engine_err(context: impl std::fmt::Display, err: fjall::Error) -> Error {
    Error::engine(context, err)
}

impl FjallEngine {
    /// Opens (or creates) the database in directory `path` with default options.
    pub fn open(path: &Path) -> Result<FjallEngine> {
        Self::open_with(path, &FjallOptions::default())
    }

    /// Opens (or creates) the database in directory `path`. Fails if another
    /// process (or another handle in this one) has it open.
    pub fn open_with(path: &Path, options: &FjallOptions) -> Result<FjallEngine> {
        let db = Database::builder(path)
            .cache_size(options.cache_size_bytes)
            .open()
            .map_err(|e| engine_err(format_args!("opening {}", path.display()), e))?;
        let open_cf = |cf: Cf| {
            db.keyspace(cf.name(), KeyspaceCreateOptions::default)
                .map_err(|e| engine_err(format_args!("opening keyspace {}", cf.name()), e))
        };
        let keyspaces = [
            open_cf(Cf::ALL[0])?,
            open_cf(Cf::ALL[1])?,
            open_cf(Cf::ALL[2])?,
            open_cf(Cf::ALL[3])?,
            open_cf(Cf::ALL[4])?,
        ];
        Ok(FjallEngine {
            db,
            keyspaces,
            path: path.to_path_buf(),
        })
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Engine for FjallEngine {
    fn write(&self, batch: &WriteBatch) -> Result<()> {
        check_batch(batch)?;
        let mut out = self.db.batch().durability(Some(PersistMode::Buffer));
        // Walk backwards so the last mutation of each key is the one kept.
        let mut seen: HashSet<(Cf, &[u8])> = HashSet::with_capacity(batch.len());
        for m in batch.mutations().iter().rev() {
            if !seen.insert((m.cf, m.key.as_slice())) {
                continue;
            }
            let keyspace = &self.keyspaces[index(m.cf)];
            match &m.op {
                Op::Put(value) => out.insert(keyspace, m.key.as_slice(), value.as_slice()),
                Op::Delete => out.remove(keyspace, m.key.as_slice()),
            }
        }
        out.commit()
            .map_err(|e| engine_err(format_args!("writing a batch of {}", batch.len()), e))
    }

    fn sync(&self) -> Result<()> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| engine_err("syncing the journal", e))
    }

    fn snapshot(&self) -> Box<dyn EngineSnapshot> {
        Box::new(FjallSnapshot {
            snapshot: self.db.snapshot(),
            keyspaces: self.keyspaces.clone(),
        })
    }
}

impl Drop for FjallEngine {
    /// A clean shutdown leaves nothing to journal replay, also under
    /// `Durability::NoSync`. Failure here only means replay will do the work.
    fn drop(&mut self) {
        if let Err(err) = self.db.persist(PersistMode::SyncAll) {
            tracing::warn!(%err, path = %self.path.display(), "final journal sync failed");
        }
    }
}

/// A fjall snapshot plus the keyspace handles it reads, so it owns everything
/// it needs and can outlive the borrow of the engine.
struct FjallSnapshot {
    snapshot: fjall::Snapshot,
    keyspaces: [Keyspace; Cf::ALL.len()],
}

impl EngineSnapshot for FjallSnapshot {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.snapshot
            .get(&self.keyspaces[index(cf)], key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| engine_err(format_args!("reading column family {}", cf.name()), e))
    }

    fn iter<'a>(
        &'a self,
        cf: Cf,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        reverse: bool,
    ) -> EngineIter<'a> {
        if !non_empty_range(lower, upper) {
            return Box::new(std::iter::empty());
        }
        let range = self
            .snapshot
            .range::<&[u8], _>(&self.keyspaces[index(cf)], (lower, upper));
        let convert = move |guard: fjall::Guard| {
            guard
                .into_inner()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(|e| engine_err(format_args!("scanning column family {}", cf.name()), e))
        };
        if reverse {
            Box::new(range.rev().map(convert))
        } else {
            Box::new(range.map(convert))
        }
    }
}
