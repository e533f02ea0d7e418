//! kvfeed's storage layer: everything that is durable lives here.
//!
//! Layers, bottom up:
//! - [`engine`]: a small trait over an ordered key-value engine with column
//!   families, atomic write batches and consistent snapshots. [`engine::fjall`]
//!   is the durable default; [`engine::memory`] serves tests.
//! - [`store`]: the apply sequence. Every write batch gets a strictly
//!   increasing [`store::SeqNo`], is made durable (group commit), and is then
//!   handed, in sequence order, to registered observers. A snapshot records the
//!   sequence number it reflects. This is the seam the change feed stands on.
//! - [`mvcc`]: TiKV's Percolator data model (lock / write / default column
//!   families) and the transaction rules on top of it.
//! - [`raw`]: raw key-value operations, each write stamped with a timestamp
//!   so the change feed can capture raw writes too.
//! - [`delta`]: delta scans, what a key range holds newer than a
//!   timestamp (the change feed's catch-up); [`versioned`]: how a version
//!   is written into an engine key.
//! - [`region`]: the region layout clients see, its changes (split, merge,
//!   leader transfer) and the measurement automatic split and merge use.
//! - [`tso`]: the timestamp oracle (`physical_ms << 18 | logical`).

#![warn(missing_docs)]

pub mod delta;
pub mod engine;
pub mod error;
pub mod latch;
pub mod mvcc;
pub mod raw;
pub mod region;
pub mod safepoint;
pub mod store;
pub mod tso;
pub mod versioned;

/// Timestamps live in `kvfeed-types` so clients need not compile storage.
pub use kvfeed_types::timestamp;

pub use error::{Error, Result};
pub use timestamp::TimeStamp;

/// The most bytes (keys plus values) one scan answer may hold: a request
/// asking for more is refused rather than built, so no single small
/// request can make the server allocate without bound. Room for a maximal
/// value (8 MiB) with its key.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Takes `bytes` out of a scan's answer budget, or refuses the scan.
pub(crate) fn take_answer_budget(budget: &mut usize, bytes: usize) -> Result<()> {
    match budget.checked_sub(bytes) {
        Some(left) => {
            *budget = left;
            Ok(())
        }
        None => Err(Error::InvalidInput(format!(
            "the answer would exceed {} bytes: ask for fewer pairs (a smaller limit) per request",
            MAX_ANSWER_BYTES
        ))),
    }
}
