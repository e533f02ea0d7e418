//! Prewritten values of open transactions, in memory up to a budget and on
//! disk beyond it, so one huge transaction does not grow the changefeed by
//! its size (see `kvfeed_client::feed::staging` for why values wait).
//!
//! The disk part is scratch space, like the sorter's: nothing in it is
//! needed after a restart (the feed is opened again at the checkpoint, and
//! the server sends every open transaction's PREWRITE rows again), so it is
//! emptied on open and never synced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use kvfeed_client::feed::staging::{Staged, Staging, StagingError};

use crate::error::SorterError;
use crate::sorter::{CACHE_BYTES, JOURNAL_BYTES, MEMTABLE_BYTES};

/// Bytes counted per staged pair on top of its key and values: the map
/// entry, the `Bytes` handles, the allocation headers.
const ENTRY_OVERHEAD: usize = 96;

/// A [`Staging`] with a memory budget and a fjall spill.
pub struct DiskStaging {
    memory: HashMap<(Bytes, u64), Staged>,
    memory_bytes: usize,
    budget: usize,
    /// Pairs on disk.
    spilled: usize,
    path: PathBuf,
    /// Kept open for the keyspace's sake.
    _db: Database,
    keyspace: Keyspace,
}

impl std::fmt::Debug for DiskStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStaging")
            .field("in_memory", &self.memory.len())
            .field("memory_bytes", &self.memory_bytes)
            .field("spilled", &self.spilled)
            .field("path", &self.path)
            .finish()
    }
}

impl DiskStaging {
    /// Opens the spill in `dir`, emptied, keeping up to `budget` bytes in
    /// memory.
    pub fn open(dir: &Path, budget: usize) -> Result<DiskStaging, SorterError> {
        let spill = |source| SorterError::Spill {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| spill(fjall::Error::Io(e)))?;
        }
        // The sorter's limits: fjall's defaults (64 MiB memtables, a 512 MiB
        // journal) would let its own buffers outgrow the budget.
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(spill)?;
        let keyspace = db
            .keyspace("staging", || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(spill)?;
        Ok(DiskStaging {
            memory: HashMap::new(),
            memory_bytes: 0,
            budget,
            spilled: 0,
            path: dir.to_path_buf(),
            _db: db,
            keyspace,
        })
    }

    /// Staged pairs held in memory, in bytes (estimated).
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    fn error(&self, source: fjall::Error) -> StagingError {
        StagingError(Box::new(SorterError::Spill {
            path: self.path.clone(),
            source,
        }))
    }

    /// Moves every in-memory pair to disk, as one ingested table: sorted,
    /// it skips the journal and the memtable a write batch goes through.
    fn spill(&mut self) -> Result<(), StagingError> {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .memory
            .drain()
            .map(|((key, start_ts), staged)| (disk_key(&key, start_ts), encode(&staged)))
            .collect();
        self.memory_bytes = 0;
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Keys are unique in the map, so strictly ascending once sorted.
        if pairs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(StagingError(Box::new(SorterError::Corrupt {
                path: self.path.clone(),
            })));
        }
        self.spilled += pairs.len();
        let mut ingestion = self.keyspace.start_ingestion().map_err(|e| self.error(e))?;
        for (key, value) in pairs {
            ingestion.write(key, value).map_err(|e| self.error(e))?;
        }
        ingestion.finish().map_err(|e| self.error(e))
    }
}

fn size(key: &Bytes, staged: &Staged) -> usize {
    key.len() + staged.value.len() + staged.old_value.len() + ENTRY_OVERHEAD
}

/// `start_ts` first keeps one transaction's keys together on disk.
fn disk_key(key: &[u8], start_ts: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&start_ts.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// `len(value)` as 8 bytes big-endian, the value, the old value.
fn encode(staged: &Staged) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + staged.value.len() + staged.old_value.len());
    out.extend_from_slice(&(staged.value.len() as u64).to_be_bytes());
    out.extend_from_slice(&staged.value);
    out.extend_from_slice(&staged.old_value);
    out
}

fn decode(bytes: &[u8]) -> Option<Staged> {
    let (len, rest) = bytes.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_be_bytes(*len)).ok()?;
    let value = rest.get(..len)?;
    let old_value = rest.get(len..)?;
    Some(Staged {
        value: Bytes::copy_from_slice(value),
        old_value: Bytes::copy_from_slice(old_value),
    })
}

impl Staging for DiskStaging {
    fn stage(&mut self, key: &Bytes, start_ts: u64, staged: Staged) -> Result<(), StagingError> {
        if self.spilled > 0 {
            // A pair staged again (a re-registration resends PREWRITEs) must
            // not leave a stale copy on disk, nor count twice.
            let disk = disk_key(key, start_ts);
            if self
                .keyspace
                .contains_key(&disk)
                .map_err(|e| self.error(e))?
            {
                self.keyspace.remove(disk).map_err(|e| self.error(e))?;
                self.spilled -= 1;
            }
        }
        // Copied: the feed's values are slices of whole received messages,
        // and one value kept would keep its message.
        let staged = Staged {
            value: Bytes::copy_from_slice(&staged.value),
            old_value: Bytes::copy_from_slice(&staged.old_value),
        };
        let key = &Bytes::copy_from_slice(key);
        self.memory_bytes += size(key, &staged);
        if let Some(old) = self.memory.insert((key.clone(), start_ts), staged) {
            self.memory_bytes = self.memory_bytes.saturating_sub(size(key, &old));
        }
        if self.memory_bytes > self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn take(&mut self, key: &Bytes, start_ts: u64) -> Result<Option<Staged>, StagingError> {
        if let Some(staged) = self.memory.remove(&(key.clone(), start_ts)) {
            self.memory_bytes = self.memory_bytes.saturating_sub(size(key, &staged));
            return Ok(Some(staged));
        }
        if self.spilled == 0 {
            return Ok(None);
        }
        let disk = disk_key(key, start_ts);
        let Some(bytes) = self.keyspace.get(&disk).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        self.keyspace.remove(disk).map_err(|e| self.error(e))?;
        self.spilled = self.spilled.saturating_sub(1);
        let staged = decode(&bytes).ok_or_else(|| {
            StagingError(Box::new(SorterError::Corrupt {
                path: self.path.clone(),
            }))
        })?;
        Ok(Some(staged))
    }

    fn len(&self) -> usize {
        self.memory.len() + self.spilled
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn staged(value: &str, old: &str) -> Staged {
        Staged {
            value: Bytes::copy_from_slice(value.as_bytes()),
            old_value: Bytes::copy_from_slice(old.as_bytes()),
        }
    }

    #[test]
    fn pairs_come_back_once_from_memory_and_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A budget of a few pairs: most of them spill.
        let mut staging = DiskStaging::open(&dir.path().join("s"), 400).expect("open");
        for i in 0..100u64 {
            let key = Bytes::from(format!("k{i}"));
            staging
                .stage(&key, i, staged(&format!("v{i}"), &format!("o{i}")))
                .expect("stage");
        }
        assert_eq!(staging.len(), 100);
        assert!(staging.memory_bytes() <= 400);
        // Staged again: replaces, never duplicates.
        staging
            .stage(&Bytes::from("k3"), 3, staged("again", ""))
            .expect("stage");
        assert_eq!(staging.len(), 100);
        for i in (0..100u64).rev() {
            let key = Bytes::from(format!("k{i}"));
            let got = staging.take(&key, i).expect("take").expect("staged");
            let want = if i == 3 {
                staged("again", "")
            } else {
                staged(&format!("v{i}"), &format!("o{i}"))
            };
            assert_eq!(got, want, "k{i}");
            assert_eq!(staging.take(&key, i).expect("take"), None);
        }
        assert_eq!(staging.len(), 0);
        assert_eq!(staging.take(&Bytes::from("k1"), 2).expect("take"), None);
    }

    #[test]
    fn open_empties_an_earlier_spill() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        {
            let mut staging = DiskStaging::open(&path, 0).expect("open");
            staging
                .stage(&Bytes::from("k"), 1, staged("v", ""))
                .expect("stage");
        }
        let mut staging = DiskStaging::open(&path, 0).expect("reopen");
        assert_eq!(staging.take(&Bytes::from("k"), 1).expect("take"), None);
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let s = staged("value", "old");
        assert_eq!(decode(&encode(&s)), Some(s));
        assert_eq!(decode(&[0, 0, 0]), None);
        assert_eq!(decode(&[0, 0, 0, 0, 0, 0, 0, 9, b'x']), None);
    }
}
