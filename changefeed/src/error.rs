//! Narrow errors, each keeping its source: a changefeed's status shows the
//! whole chain, and callers match on the kind (bad input before anything
//! runs, a sink that refuses for good, a feed that gave up).

use std::path::PathBuf;

use thiserror::Error;

/// A definition that cannot run.
#[derive(Debug, Error)]
pub enum DefError {
    /// The id breaks the rules of `ChangefeedId`.
    #[error(
        "invalid changefeed id {id:?}: use 1 to 128 ASCII letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadId {
        /// The id given.
        id: String,
    },
    /// Neither `json` nor `debezium`.
    #[error("unknown format {format:?}: expected json or debezium")]
    BadFormat {
        /// The format given.
        format: String,
    },
    /// `start >= end`: the range holds no key.
    #[error("the key range [{start}, {end}) (hex) is empty: the start must be below the end")]
    EmptyRange {
        /// Start key, hex.
        start: String,
        /// End key, hex.
        end: String,
    },
    /// Debezium's `before` and `op` need old values.
    #[error("the debezium format needs old values")]
    DebeziumNeedsOldValue,
}

/// The sorter's spill space failed.
#[derive(Debug, Error)]
pub enum SorterError {
    /// The fjall keyspace under the state directory.
    #[error("sorter spill space in {path}")]
    Spill {
        /// Its directory.
        path: PathBuf,
        /// What fjall said.
        #[source]
        source: fjall::Error,
    },
    /// A row the spill space cannot hold (fjall caps keys at 64 KiB and
    /// values at 4 GiB); held in memory alone it could not be ordered
    /// against the spilled ones.
    #[error("a row with a {key_len}-byte key and {value_len} bytes of values is too large to sort")]
    RowTooLarge {
        /// Bytes of the user key.
        key_len: usize,
        /// Bytes of the value and the old value together.
        value_len: usize,
    },
    /// A spilled row that does not decode: the spill space is damaged.
    #[error("a spilled row in {path} is damaged")]
    Corrupt {
        /// Its directory.
        path: PathBuf,
    },
}
