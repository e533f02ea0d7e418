//! One changefeed's life: resume from the sink's checkpoint, hold a GC
//! service safe point, follow the feed, and turn each resolved ts into a
//! window for the sink.
//!
//! Invariants (with the sink's, in `sink`):
//! - `checkpoint` is the sink's durable checkpoint: it starts as what
//!   `open` returned (or the start ts) and moves only when `commit_window`
//!   returned. The feed is opened at it, so every row above it comes; rows
//!   at or below it that come anyway are dropped before the sorter.
//! - A window `(checkpoint, resolved]` is drained from the sorter only when
//!   the feed's resolved ts says nothing at or below `resolved` is still to
//!   come; the sorter holds each `(commit_ts, start_ts, key)` once, so a
//!   row the feed sends twice is emitted once.
//! - PD holds a service safe point at the checkpoint (refreshed as it moves
//!   and at least every `gc_refresh`), so GC never takes a version the feed
//!   still needs after a restart. A start below the GC safe point is refused
//!   before anything is written.
//! - Transient failures (a lost feed, a sink that timed out) restart the
//!   whole pipeline from the sink's checkpoint after a backoff: the sorter
//!   is emptied and refilled by the feed. Permanent ones end the run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvfeed_client::Cluster;
use kvfeed_client::feed::{Feed, FeedError, FeedEvent, FeedSpec};
use kvfeed_types::TimeStamp;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::def::ChangefeedDef;
use crate::error::ChangefeedError;
use crate::sink::{AnySink, Sink};
use crate::sorter::Sorter;
use crate::staging::DiskStaging;
use crate::status::{State, Status};

/// Rows moved from the sorter into the sink per call: bounded work, and a
/// bounded batch in memory however large the window.
const DRAIN_CHUNK: usize = 4096;

/// How a changefeed runs; the defaults suit most.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Memory for rows, in bytes: half for rows waiting for the resolved ts
    /// (the sorter), half for values of open transactions (the staging);
    /// beyond it they spill to disk in the state directory.
    pub memory_budget: usize,
    /// TTL of the PD service safe point (TiCDC's `gc-ttl`, 24 h): how long
    /// history is kept for a changefeed that stopped without being removed.
    pub gc_ttl: Duration,
    /// How often the service safe point is renewed while running.
    pub gc_refresh: Duration,
    /// A window with no rows (the checkpoint moving alone) is written at
    /// most this often; windows with rows are written at once.
    pub idle_checkpoint_interval: Duration,
    /// First wait before restarting after a transient failure; doubles up
    /// to [`RunOptions::max_backoff`].
    pub backoff: Duration,
    /// Longest wait between restarts.
    pub max_backoff: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memory_budget: 64 << 20,
            gc_ttl: Duration::from_secs(24 * 3600),
            gc_refresh: Duration::from_secs(10),
            idle_checkpoint_interval: Duration::from_secs(1),
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A changefeed ready to run.
pub struct Changefeed {
    def: ChangefeedDef,
    cluster: Cluster,
    sink: AnySink,
    state_dir: PathBuf,
    options: RunOptions,
    status: Arc<Mutex<Status>>,
}

impl Changefeed {
    /// A changefeed of `def` on `cluster` writing into `sink`, keeping its
    /// scratch files (the sorter's spill) in `state_dir`.
    pub fn new(
        def: ChangefeedDef,
        cluster: Cluster,
        sink: AnySink,
        state_dir: PathBuf,
        options: RunOptions,
    ) -> Changefeed {
        let status = Arc::new(Mutex::new(Status::new(&def)));
        Changefeed {
            def,
            cluster,
            sink,
            state_dir,
            options,
            status,
        }
    }

    /// The live status, shared with whoever reports it.
    pub fn status(&self) -> Arc<Mutex<Status>> {
        Arc::clone(&self.status)
    }

    /// Runs until `stop` turns true (then `Ok`) or a permanent error. Each
    /// transient error is recorded in the status and followed by a restart
    /// from the checkpoint.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ChangefeedError> {
        self.def.validate()?;
        // Held for the whole run: a second process with the same state
        // directory (by default, the same id) is refused before it starts.
        let _lock = lock_state_dir(&self.state_dir)?;
        let mut backoff = self.options.backoff;
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = self.run_once() => outcome,
                _ = stop.wait_for(|s| *s) => Ok(()),
            };
            match outcome {
                Ok(()) => {
                    self.status.lock().state = State::Stopped;
                    return Ok(());
                }
                Err(err) if err.is_permanent() => {
                    let mut status = self.status.lock();
                    status.state = State::Failed;
                    status.last_error = Some(err.chain());
                    return Err(err);
                }
                Err(err) => {
                    tracing::warn!(changefeed = %self.def.id, error = %err.chain(), ?backoff, "changefeed restarts");
                    {
                        let mut status = self.status.lock();
                        status.state = State::Retrying;
                        status.last_error = Some(err.chain());
                        status.restarts += 1;
                    }
                    // A run that lasted a while was healthy: start the
                    // backoff over.
                    if started.elapsed() > self.options.max_backoff * 2 {
                        backoff = self.options.backoff;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => {
                            self.status.lock().state = State::Stopped;
                            return Ok(());
                        }
                    }
                    backoff = (backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    /// One pipeline: open the sink, check and hold the safe point, follow
    /// the feed. Returns only with an error (or never).
    async fn run_once(&mut self) -> Result<(), ChangefeedError> {
        let def = self.def.clone();
        let resumed = self.sink.open(&def).await?;
        let mut checkpoint = resumed.unwrap_or(def.start_ts);
        self.hold_safe_point(checkpoint, true).await?;
        // Half the budget for rows waiting for the resolved ts, half for
        // values of transactions still open.
        let budget = self.options.memory_budget / 2;
        let mut sorter = Sorter::open(&self.state_dir.join("sorter"), budget)?;
        let staging = DiskStaging::open(&self.state_dir.join("staging"), budget)?;
        {
            let mut status = self.status.lock();
            status.state = State::Running;
            status.checkpoint_ts = checkpoint.into_inner();
        }
        tracing::info!(changefeed = %def.id, %checkpoint, resumed = resumed.is_some(), "changefeed started");
        let spec = FeedSpec {
            mode: def.mode.into(),
            start: def.start.clone(),
            end: def.end.clone(),
            start_ts: checkpoint,
            old_value: def.old_value,
        };
        let mut feed = Feed::open_with_staging(&self.cluster, &spec, Box::new(staging));
        let mut last_window = Instant::now();
        let mut last_hold = Instant::now();
        loop {
            match feed.next().await? {
                FeedEvent::Row(row) if row.commit_ts > checkpoint => sorter.add(row)?,
                FeedEvent::ResolvedTs(resolved) => {
                    self.status.lock().resolved_ts = resolved.into_inner();
                    if resolved <= checkpoint {
                        continue;
                    }
                    let has_rows = sorter.min_commit_ts()?.is_some_and(|ts| ts <= resolved);
                    if !has_rows && last_window.elapsed() < self.options.idle_checkpoint_interval {
                        continue;
                    }
                    self.write_window(&mut sorter, checkpoint, resolved).await?;
                    checkpoint = resolved;
                    last_window = Instant::now();
                    if last_hold.elapsed() >= self.options.gc_refresh {
                        self.hold_safe_point(checkpoint, false).await?;
                        last_hold = Instant::now();
                    }
                }
                _ => {}
            }
            self.status.lock().sorter_rows = sorter.len();
        }
    }

    /// Moves every row of `(from, to]` from the sorter into the sink, then
    /// makes `to` the checkpoint.
    async fn write_window(
        &mut self,
        sorter: &mut Sorter,
        from: TimeStamp,
        to: TimeStamp,
    ) -> Result<(), ChangefeedError> {
        self.sink.begin_window(from, to).await?;
        let (mut rows, mut bytes) = (0u64, 0u64);
        loop {
            let chunk = sorter.drain(to, DRAIN_CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            rows += chunk.len() as u64;
            bytes += chunk
                .iter()
                .map(|r| (r.key.len() + r.value.len() + r.old_value.len()) as u64)
                .sum::<u64>();
            self.sink.write(&chunk).await?;
        }
        self.sink.commit_window().await?;
        let mut status = self.status.lock();
        status.checkpoint_ts = to.into_inner();
        status.rows_emitted += rows;
        status.bytes_emitted += bytes;
        if rows > 0 {
            status.windows += 1;
        }
        Ok(())
    }

    /// Sets the PD service safe point `service id = changefeed id` to
    /// `checkpoint`. At start (`first`), a checkpoint below the GC safe
    /// point, or below what PD will hold, is a permanent error: history the
    /// changefeed needs may already be gone.
    async fn hold_safe_point(
        &self,
        checkpoint: TimeStamp,
        first: bool,
    ) -> Result<(), ChangefeedError> {
        if first {
            let gc = self.cluster.gc_safe_point().await?;
            if checkpoint < gc {
                return Err(ChangefeedError::BelowSafePoint {
                    start_ts: checkpoint,
                    safe_point: gc,
                });
            }
        }
        let ttl = i64::try_from(self.options.gc_ttl.as_secs()).unwrap_or(i64::MAX);
        let answer = self
            .cluster
            .update_service_safe_point(self.def.id.as_str(), ttl, checkpoint)
            .await?;
        if !answer.held() {
            // PD keeps the lowest service safe point, and ours is below it:
            // another service let GC pass our checkpoint.
            return Err(ChangefeedError::BelowSafePoint {
                start_ts: checkpoint,
                safe_point: answer.min_safe_point,
            });
        }
        Ok(())
    }
}

/// The runner's lock file in the state directory. Not the sinks' `LOCK`:
/// a webhook sink keeps its own state (and locks it) in the same
/// directory, from the same process, while the runner holds this one.
const RUN_LOCK_FILE: &str = "changefeed.lock";

/// Creates `dir` and takes the exclusive lock of its [`RUN_LOCK_FILE`].
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, ChangefeedError> {
    let io = |source| ChangefeedError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(RUN_LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ChangefeedError::StateDirBusy {
            path: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

impl From<FeedError> for ChangefeedError {
    fn from(err: FeedError) -> Self {
        ChangefeedError::Feed(err)
    }
}
