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

/// Why a changefeed stopped or restarted.
#[derive(Debug, Error)]
pub enum ChangefeedError {
    /// The definition cannot run.
    #[error(transparent)]
    Def(#[from] DefError),
    /// The start (or resume) ts is below what GC keeps: the history between
    /// them may be gone, so the changefeed cannot be exactly once.
    #[error(
        "start ts {start_ts} is below the GC safe point {safe_point}: changes after the start may already be garbage-collected; start from a ts at or above the safe point"
    )]
    BelowSafePoint {
        /// The ts the changefeed would start (or resume) from.
        start_ts: kvfeed_types::TimeStamp,
        /// The safe point in force.
        safe_point: kvfeed_types::TimeStamp,
    },
    /// The state directory cannot be created or locked.
    #[error("state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process runs a changefeed with this state directory.
    #[error(
        "state directory {path} is in use by another changefeed process (the same --id runs already, or give it another --state-dir)"
    )]
    StateDirBusy {
        /// The directory.
        path: PathBuf,
    },
    /// The sink failed.
    #[error("sink")]
    Sink(#[from] crate::sink::SinkError),
    /// The sorter's spill space failed.
    #[error("sorter")]
    Sorter(#[from] SorterError),
    /// The feed ended with an error (after its own bounded retries).
    #[error("change feed")]
    Feed(#[source] kvfeed_client::feed::FeedError),
    /// A PD call failed.
    #[error("cluster")]
    Client(#[from] kvfeed_client::ClientError),
}

impl ChangefeedError {
    /// Whether retrying cannot help: bad definitions, history lost to GC,
    /// a sink that refuses for good, a server that refuses the feed.
    pub fn is_permanent(&self) -> bool {
        use kvfeed_client::feed::FeedError;
        match self {
            ChangefeedError::Def(_)
            | ChangefeedError::BelowSafePoint { .. }
            | ChangefeedError::StateDir { .. }
            | ChangefeedError::StateDirBusy { .. } => true,
            ChangefeedError::Sink(e) => e.is_permanent(),
            ChangefeedError::Sorter(_) | ChangefeedError::Client(_) => false,
            ChangefeedError::Feed(e) => {
                matches!(e, FeedError::Refused { .. } | FeedError::Unsupported(_))
            }
        }
    }

    /// The error and its sources in one line.
    pub fn chain(&self) -> String {
        kvfeed_client::error::error_chain(self)
    }
}
