//! What a changefeed reports about itself: `kvfeed changefeed status`, the
//! status server and the logs read it.

use serde::Serialize;

use crate::def::ChangefeedDef;

/// Where a changefeed is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Opening the sink, checking the safe point, registering.
    Starting,
    /// Following the feed and writing windows.
    Running,
    /// Waiting to restart after a transient error (see `last_error`).
    Retrying,
    /// Paused by an operator: nothing runs, the safe point is still held.
    Paused,
    /// Stopped for good by a permanent error (see `last_error`).
    Failed,
    /// Stopped on request.
    Stopped,
}

/// A changefeed's progress and health.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The changefeed's id.
    pub id: String,
    /// Its state.
    pub state: State,
    /// The sink's checkpoint: every change committed at or below it is
    /// durably in the sink.
    pub checkpoint_ts: u64,
    /// The feed's latest resolved ts.
    pub resolved_ts: u64,
    /// Rows written into the sink since this process started it.
    pub rows_emitted: u64,
    /// Their keys, values and old values, in bytes.
    pub bytes_emitted: u64,
    /// Windows with rows written.
    pub windows: u64,
    /// Rows waiting in the sorter for the resolved ts.
    pub sorter_rows: u64,
    /// Restarts after transient errors.
    pub restarts: u64,
    /// The last error, with its causes.
    pub last_error: Option<String>,
}

impl Status {
    /// The status of a changefeed about to start.
    pub fn new(def: &ChangefeedDef) -> Status {
        Status {
            id: def.id.to_string(),
            state: State::Starting,
            checkpoint_ts: def.start_ts.into_inner(),
            resolved_ts: 0,
            rows_emitted: 0,
            bytes_emitted: 0,
            windows: 0,
            sorter_rows: 0,
            restarts: 0,
            last_error: None,
        }
    }

    /// How far the checkpoint trails the wall clock `now_ms` (Unix ms), in
    /// milliseconds; the physical part of a TSO timestamp is Unix ms.
    pub fn lag_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(kvfeed_types::TimeStamp::new(self.checkpoint_ts).physical())
    }
}
