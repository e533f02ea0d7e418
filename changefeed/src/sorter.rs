//! Rows wait here, sorted, until the resolved ts passes them.
//!
//! The feed interleaves regions and keys, so rows arrive out of commit
//! order; a window needs them in `(commit_ts, start_ts, key)` order, which
//! is also what puts each transaction's rows together. A single large
//! transaction can be far bigger than the memory a changefeed may use, so
//! rows beyond a memory budget go to a fjall keyspace on disk.
//!
//! Invariants, and why they hold:
//! - **Memory below disk.** Every row in memory sorts below `boundary`;
//!   every row on disk (or in the outbox, the small buffer of rows on their
//!   way to disk) sorts at or above it. Spilling always moves the *highest*
//!   rows out of memory — those the resolved ts reaches last — and lowers
//!   the boundary to the lowest row moved, so the two parts never overlap.
//!   A drain therefore never merges: it walks memory, and only once memory
//!   is empty does it look at disk, where everything is higher still. When
//!   nothing is spilled a drain is a plain walk of the `BTreeMap`.
//! - **Each key once.** Equal `(commit_ts, start_ts, key)` means the same
//!   change sent twice (a re-registered feed resends), and exactly-once
//!   delivery needs the sorter to hold it once, the later copy winning. The
//!   boundary decides where a row lives, so both copies land in the same
//!   part: memory and the outbox replace by map insert, disk by the later
//!   write shadowing the earlier. Disk-bound rows are not looked up first
//!   (a lookup per row made spilling several times slower), so a copy that
//!   shadows a spilled row counts twice in [`Sorter::len`] until the disk
//!   empties; the rows themselves are held once.
//! - **Disk drains back into memory.** When a drain empties memory and still
//!   wants rows, it moves the lowest spilled rows back (about half the
//!   budget's worth) and raises the boundary to the first row left on disk.
//!   Rows that arrive later and sort below it stay in memory again, so a feed
//!   that spilled once during a burst returns to memory-only work once the
//!   backlog drains, instead of sending every later row through disk.
//! - **Drained rows stay dead.** A drain hands rows out lowest first, and
//!   a row added later that sorts at or below the last one handed out is
//!   dropped (a consumer emits in order, so it can only be a repeat). Rows
//!   moved from disk back into memory are therefore not deleted from disk:
//!   the boundary rises above them, every later spill moves rows that sort
//!   above every drained row (memory holds only such rows), so the
//!   boundary never sinks below a dead copy again and no scan, which
//!   starts at the boundary, meets one. The copies go when the disk
//!   empties and is cleared; until then they cost disk, not tombstones.
//! - **Disk is scratch.** Nothing spilled is needed after a crash: the
//!   changefeed resumes the feed from its checkpoint and the rows come
//!   again. Writes therefore never fsync, [`Sorter::open`] clears whatever an
//!   earlier run left, and when the last spilled row leaves, the keyspace is
//!   cleared, which drops its tables and tombstones at once, so deleted rows
//!   do not pile up over a long run. Drains read from the boundary upwards,
//!   so the tombstones of rows already moved are never scanned.
//! - **Bounded memory.** The budget counts key, value and old value plus a
//!   fixed per-row estimate of the map and `Bytes` overhead; fjall gets a
//!   small block cache and small memtables so the spill itself adds a few
//!   tens of MiB at most, whatever the size of the transaction. Rows hold
//!   `Bytes` as the feed handed them over: a row that is a slice of a larger
//!   buffer keeps that buffer alive, which the estimate cannot see.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use kvfeed_client::feed::{Op, Row};
use kvfeed_types::TimeStamp;

use crate::error::SorterError;

/// The one keyspace spilled rows live in.
const KEYSPACE: &str = "sorter_rows";
/// Estimated memory of one held row beyond its key and values: the map's
/// node share, three `Bytes` handles, the timestamps and the op.
const ROW_OVERHEAD: usize = 128;
/// Bytes of the two timestamps in front of the user key on disk.
const TS_LEN: usize = 16;
/// fjall refuses keys longer than `u16::MAX` bytes.
const MAX_USER_KEY: usize = u16::MAX as usize - TS_LEN;
/// Bytes in front of the values in a spilled value: the op and the length of
/// the value.
const VALUE_HEADER: usize = 5;
/// fjall refuses values longer than `u32::MAX` bytes.
const MAX_SPILLED_VALUE: usize = u32::MAX as usize;
/// Most bytes of rows written to fjall in one batch, and most bytes the
/// outbox holds before it is written.
const BATCH_BYTES: usize = 4 << 20;

/// Writes of at least this many bytes are ingested as a table rather than
/// written through the journal (see `Sorter::store`).
const INGEST_BYTES: usize = 1 << 20;
/// fjall's block cache: reads are sequential, so little is reused.
pub(crate) const CACHE_BYTES: u64 = 8 << 20;
/// fjall's memtable size: up to four sealed ones may wait for a flush.
pub(crate) const MEMTABLE_BYTES: u64 = 8 << 20;
/// fjall's journal limit (its minimum): bounds the disk an earlier run's
/// leftovers take and the replay when the sorter opens.
pub(crate) const JOURNAL_BYTES: u64 = 64 << 20;

/// Where a row sorts: the order windows are delivered in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    commit_ts: TimeStamp,
    start_ts: TimeStamp,
    key: Bytes,
}

/// The rest of a row.
#[derive(Debug)]
struct Entry {
    op: Op,
    value: Bytes,
    old_value: Bytes,
}

impl SortKey {
    /// Big-endian timestamps then the user key, so fjall's byte order is
    /// the sort order.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(TS_LEN + self.key.len());
        out.extend_from_slice(&self.commit_ts.into_inner().to_be_bytes());
        out.extend_from_slice(&self.start_ts.into_inner().to_be_bytes());
        out.extend_from_slice(&self.key);
        out
    }

    fn decode(raw: &[u8]) -> Option<SortKey> {
        let commit = raw.get(..8)?.try_into().ok()?;
        let start = raw.get(8..TS_LEN)?.try_into().ok()?;
        Some(SortKey {
            commit_ts: TimeStamp::new(u64::from_be_bytes(commit)),
            start_ts: TimeStamp::new(u64::from_be_bytes(start)),
            key: Bytes::copy_from_slice(raw.get(TS_LEN..)?),
        })
    }
}

impl Entry {
    /// `op ‖ value length (u32 BE) ‖ value ‖ old value`.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VALUE_HEADER + self.value.len() + self.old_value.len());
        out.push(match self.op {
            Op::Put => 0,
            Op::Delete => 1,
        });
        // Checked in `Sorter::add`: the whole encoding fits in a u32.
        let len = u32::try_from(self.value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.value);
        out.extend_from_slice(&self.old_value);
        out
    }

    fn decode(raw: &[u8]) -> Option<Entry> {
        let op = match raw.first()? {
            0 => Op::Put,
            1 => Op::Delete,
            _ => return None,
        };
        let len = u32::from_be_bytes(raw.get(1..VALUE_HEADER)?.try_into().ok()?);
        let value_end = VALUE_HEADER.checked_add(usize::try_from(len).ok()?)?;
        Some(Entry {
            op,
            value: Bytes::copy_from_slice(raw.get(VALUE_HEADER..value_end)?),
            old_value: Bytes::copy_from_slice(raw.get(value_end..)?),
        })
    }
}

/// The memory a held row is charged.
fn row_bytes(key: &SortKey, entry: &Entry) -> usize {
    ROW_OVERHEAD + key.key.len() + entry.value.len() + entry.old_value.len()
}

fn into_row(key: SortKey, entry: Entry) -> Row {
    Row {
        start_ts: key.start_ts,
        commit_ts: key.commit_ts,
        op: entry.op,
        key: key.key,
        value: entry.value,
        old_value: entry.old_value,
    }
}

/// Rows waiting for the resolved ts, sorted by (commit_ts, start_ts, key);
/// see the module comment for how memory and disk share them.
pub struct Sorter {
    path: PathBuf,
    budget: usize,
    /// Rows below `boundary`.
    memory: BTreeMap<SortKey, Entry>,
    memory_bytes: usize,
    /// Rows at or above `boundary` not yet written to disk.
    outbox: BTreeMap<SortKey, Entry>,
    outbox_bytes: usize,
    /// `None` while nothing is spilled: every row is in memory.
    boundary: Option<SortKey>,
    /// The highest row drained so far.
    drained: Option<SortKey>,
    /// Rows in the outbox and on disk together; a row sent again after it
    /// was written to disk counts twice until the disk empties.
    spilled: u64,
    db: Database,
    keyspace: Keyspace,
}

impl std::fmt::Debug for Sorter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sorter")
            .field("path", &self.path)
            .field("budget", &self.budget)
            .field("memory_rows", &self.memory.len())
            .field("memory_bytes", &self.memory_bytes())
            .field("spilled_rows", &self.spilled)
            .finish_non_exhaustive()
    }
}

impl Sorter {
    /// Opens the spill space in `dir` (created if missing, emptied if it
    /// holds rows of an earlier run), keeping up to `memory_budget` bytes of
    /// rows in memory.
    pub fn open(dir: &Path, memory_budget: usize) -> Result<Sorter, SorterError> {
        let spill_err = |source| SorterError::Spill {
            path: dir.to_path_buf(),
            source,
        };
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(JOURNAL_BYTES)
            .open()
            .map_err(spill_err)?;
        let keyspace = db
            .keyspace(KEYSPACE, || {
                KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(spill_err)?;
        // Rows of an earlier run: their feed is read again from the
        // checkpoint, so they are only in the way.
        keyspace.clear().map_err(spill_err)?;
        Ok(Sorter {
            path: dir.to_path_buf(),
            budget: memory_budget,
            memory: BTreeMap::new(),
            memory_bytes: 0,
            outbox: BTreeMap::new(),
            outbox_bytes: 0,
            boundary: None,
            drained: None,
            spilled: 0,
            db,
            keyspace,
        })
    }

    fn spill_err(&self, source: fjall::Error) -> SorterError {
        SorterError::Spill {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self) -> SorterError {
        SorterError::Corrupt {
            path: self.path.clone(),
        }
    }

    /// Adds a row; a row with the same (commit_ts, start_ts, key) as one
    /// held replaces it. A row that sorts at or below one already drained
    /// is dropped: it was handed out (a consumer emits windows in order, so
    /// such a row can only be a repeat of an emitted one).
    pub fn add(&mut self, row: Row) -> Result<(), SorterError> {
        if let Some(drained) = &self.drained
            && (row.commit_ts, row.start_ts, &row.key[..])
                <= (drained.commit_ts, drained.start_ts, &drained.key[..])
        {
            return Ok(());
        }
        let value_len = row.value.len().saturating_add(row.old_value.len());
        if row.key.len() > MAX_USER_KEY || value_len > MAX_SPILLED_VALUE - VALUE_HEADER {
            return Err(SorterError::RowTooLarge {
                key_len: row.key.len(),
                value_len,
            });
        }
        // Copied: the feed's rows are slices of whole received messages
        // (up to megabytes each), and one row kept would keep its message.
        let key = SortKey {
            commit_ts: row.commit_ts,
            start_ts: row.start_ts,
            key: Bytes::copy_from_slice(&row.key),
        };
        let entry = Entry {
            op: row.op,
            value: Bytes::copy_from_slice(&row.value),
            old_value: Bytes::copy_from_slice(&row.old_value),
        };
        let size = row_bytes(&key, &entry);
        if self.boundary.as_ref().is_some_and(|b| key >= *b) {
            return self.add_beyond(key, entry, size);
        }
        if let Some(old) = self.memory.insert(key.clone(), entry) {
            self.memory_bytes -= row_bytes(&key, &old);
        }
        self.memory_bytes += size;
        if self.memory_bytes > self.budget {
            self.spill()?;
        }
        Ok(())
    }

    /// A row at or above the boundary: it joins the outbox.
    fn add_beyond(&mut self, key: SortKey, entry: Entry, size: usize) -> Result<(), SorterError> {
        match self.outbox.insert(key.clone(), entry) {
            Some(old) => self.outbox_bytes -= row_bytes(&key, &old),
            None => self.spilled += 1,
        }
        self.outbox_bytes += size;
        if self.outbox_bytes >= BATCH_BYTES.min(self.budget / 8) {
            self.flush_outbox()?;
        }
        Ok(())
    }

    /// Writes the outbox to disk.
    fn flush_outbox(&mut self) -> Result<(), SorterError> {
        let rows = std::mem::take(&mut self.outbox);
        self.outbox_bytes = 0;
        self.write(rows.into_iter())
    }

    /// Moves the highest rows from memory to disk until memory is at three
    /// quarters of the budget, so the next spill is a while away and each
    /// write batch is large.
    fn spill(&mut self) -> Result<(), SorterError> {
        let target = self.budget - self.budget / 4;
        let mut moved = Vec::new();
        while self.memory_bytes > target {
            let Some((key, entry)) = self.memory.pop_last() else {
                break;
            };
            self.memory_bytes -= row_bytes(&key, &entry);
            moved.push((key, entry));
        }
        let Some((lowest, _)) = moved.last() else {
            return Ok(());
        };
        // Everything moved sorts below the old boundary, so none of it is
        // on disk already.
        self.boundary = Some(lowest.clone());
        self.spilled += moved.len() as u64;
        // Popped highest first: ingestion wants them ascending.
        self.write(moved.into_iter().rev())
    }

    /// Writes rows, in ascending order, to the keyspace.
    fn write(&mut self, rows: impl Iterator<Item = (SortKey, Entry)>) -> Result<(), SorterError> {
        let items: Vec<(Vec<u8>, Option<Vec<u8>>)> = rows
            .map(|(key, entry)| (key.encode(), Some(entry.encode())))
            .collect();
        self.store(items)
    }

    /// Stores `(key, value)` pairs (`None` = a tombstone), keys ascending.
    /// A large set is ingested as one table: a bulk load skips the journal
    /// and the memtable that a write batch goes through row by row (several
    /// times faster for a spill of a budget's worth). A small one, which
    /// would make a table of a few rows, goes through a write batch.
    fn store(&mut self, items: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), SorterError> {
        let bytes: usize = items
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        if bytes >= INGEST_BYTES {
            return self.ingest(items.into_iter());
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for (key, value) in items {
            match value {
                Some(value) => batch.insert(&self.keyspace, key, value),
                None => batch.remove(&self.keyspace, key),
            }
        }
        batch.commit().map_err(|e| self.spill_err(e))
    }

    /// Ingests `(key, value)` pairs, `None` = a tombstone, keys ascending.
    /// Order is checked here, so a bug cannot reach fjall's own assertion.
    fn ingest(
        &mut self,
        items: impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<(), SorterError> {
        let mut items = items.peekable();
        if items.peek().is_none() {
            return Ok(());
        }
        let mut ingestion = self
            .keyspace
            .start_ingestion()
            .map_err(|e| self.spill_err(e))?;
        let mut last: Option<Vec<u8>> = None;
        for (key, value) in items {
            if last.as_ref().is_some_and(|l| key <= *l) {
                return Err(self.corrupt());
            }
            match value {
                Some(value) => ingestion.write(key.clone(), value),
                None => ingestion.write_tombstone(key.clone()),
            }
            .map_err(|e| self.spill_err(e))?;
            last = Some(key);
        }
        ingestion.finish().map_err(|e| self.spill_err(e))
    }

    /// Rows held (memory and disk).
    pub fn len(&self) -> u64 {
        self.memory.len() as u64 + self.spilled
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged for the rows held in memory (including those waiting
    /// to be written to disk).
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes + self.outbox_bytes
    }

    /// Rows held on disk (or about to be written there).
    pub fn spilled_rows(&self) -> u64 {
        self.spilled
    }

    /// The lowest commit ts held, if any row is.
    pub fn min_commit_ts(&self) -> Result<Option<TimeStamp>, SorterError> {
        if let Some((key, _)) = self.memory.first_key_value() {
            return Ok(Some(key.commit_ts));
        }
        let Some(boundary) = &self.boundary else {
            return Ok(None);
        };
        let outbox = self.outbox.first_key_value().map(|(k, _)| k.commit_ts);
        let disk = match self.keyspace.range(boundary.encode()..).next() {
            None => None,
            Some(guard) => {
                let (raw, _) = guard.into_inner().map_err(|e| self.spill_err(e))?;
                Some(
                    SortKey::decode(&raw)
                        .ok_or_else(|| self.corrupt())?
                        .commit_ts,
                )
            }
        };
        Ok(match (outbox, disk) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Removes and returns up to `max_rows` rows with commit_ts <= `upto`,
    /// lowest first in (commit_ts, start_ts, key) order.
    pub fn drain(&mut self, upto: TimeStamp, max_rows: usize) -> Result<Vec<Row>, SorterError> {
        let out = self.drain_rows(upto, max_rows)?;
        if let Some(last) = out.last() {
            self.drained = Some(SortKey {
                commit_ts: last.commit_ts,
                start_ts: last.start_ts,
                key: last.key.clone(),
            });
        }
        Ok(out)
    }

    fn drain_rows(&mut self, upto: TimeStamp, max_rows: usize) -> Result<Vec<Row>, SorterError> {
        let mut out = Vec::with_capacity(max_rows.min(self.memory.len().max(1024)));
        loop {
            while out.len() < max_rows {
                let Some(first) = self.memory.first_entry() else {
                    break;
                };
                if first.key().commit_ts > upto {
                    // Everything on disk sorts higher still.
                    return Ok(out);
                }
                let (key, entry) = first.remove_entry();
                self.memory_bytes -= row_bytes(&key, &entry);
                out.push(into_row(key, entry));
            }
            let wanted = max_rows - out.len();
            let spilled_due = self.boundary.as_ref().is_some_and(|b| b.commit_ts <= upto);
            if wanted == 0 || !spilled_due {
                return Ok(out);
            }
            self.refill(upto, wanted)?;
        }
    }

    /// Moves the lowest spilled rows into the (empty) memory: up to `wanted`
    /// rows at or below `upto` (they leave again at once), and then about
    /// half the budget's worth more. Raises the boundary to the first row left on
    /// disk, or clears the keyspace when none is left.
    fn refill(&mut self, upto: TimeStamp, wanted: usize) -> Result<(), SorterError> {
        self.flush_outbox()?;
        let Some(boundary) = self.boundary.take() else {
            return Ok(());
        };
        let target = self.budget / 2;
        let (mut loaded, mut due, mut kept_bytes) = (0usize, 0usize, 0usize);
        let mut next = None;
        for guard in self.keyspace.range(boundary.encode()..) {
            let (raw_key, raw_value) = guard.into_inner().map_err(|e| self.spill_err(e))?;
            let key = SortKey::decode(&raw_key).ok_or_else(|| self.corrupt())?;
            // Rows the drain returns at once do not count against the target.
            let is_due = due < wanted && key.commit_ts <= upto;
            if !is_due && kept_bytes >= target {
                next = Some(key);
                break;
            }
            let entry = Entry::decode(&raw_value).ok_or_else(|| self.corrupt())?;
            let size = row_bytes(&key, &entry);
            if is_due {
                due += 1;
            } else {
                kept_bytes += size;
            }
            self.memory_bytes += size;
            self.memory.insert(key, entry);
            loaded += 1;
        }
        self.spilled = self.spilled.saturating_sub(loaded as u64);
        match next {
            // The loaded rows stay on disk, below the new boundary, where no
            // scan reaches (see "Drained rows stay dead" above): deleting
            // them would cost a tombstone each.
            Some(key) => self.boundary = Some(key),
            None => {
                // Nothing left on disk: one clear drops every table.
                self.keyspace.clear().map_err(|e| self.spill_err(e))?;
                self.spilled = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sorter_tests.rs"]
mod tests;
