//! INTERFACE STUB — to be implemented.
use std::path::Path;

use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use crate::error::SorterError;

/// Rows waiting for the resolved ts, sorted by (commit_ts, start_ts, key).
#[derive(Debug)]
pub struct Sorter {}

impl Sorter {
    /// Opens the spill space in `dir` (created if missing, emptied if it
    /// holds rows of an earlier run), keeping up to `memory_budget` bytes of
    /// rows in memory.
    pub fn open(dir: &Path, memory_budget: usize) -> Result<Sorter, SorterError> {
        todo!("{dir:?} {memory_budget}")
    }

    /// Adds a row; a row with the same (commit_ts, start_ts, key) as one held replaces it.
    pub fn add(&mut self, row: Row) -> Result<(), SorterError> {
        todo!("{row:?}")
    }

    /// Rows held (memory and disk).
    pub fn len(&self) -> u64 {
        todo!()
    }

    /// The lowest commit ts held.
    pub fn min_commit_ts(&self) -> Option<TimeStamp> {
        todo!()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns up to `max_rows` rows with commit_ts <= `upto`,
    /// lowest first in (commit_ts, start_ts, key) order.
    pub fn drain(&mut self, upto: TimeStamp, max_rows: usize) -> Result<Vec<Row>, SorterError> {
        todo!("{upto} {max_rows}")
    }
}
