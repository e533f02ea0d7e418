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
//!   families) and the transaction rules on top of it, plus raw key-value
//!   operations with their own timestamps.
//! - [`tso`]: the timestamp oracle (`physical_ms << 18 | logical`).

pub mod engine;
pub mod error;
pub mod store;

pub use error::{Error, Result};
pub mod timestamp;

pub use timestamp::TimeStamp;
