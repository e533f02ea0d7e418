//! A feed consumer that checks what it receives: every stamped put exactly
//! once, with its latency, plus the resolved-ts lag.
//!
//! A watcher first subscribes and waits until every subscription is
//! INITIALIZED, so the writers start only once nothing can be missed.
//! Then it runs on a task of its own until it has seen as many distinct
//! puts as were acknowledged (the *target*, known only when the writers
//! are done) or the drain deadline passes. Loss is computed afterwards
//! against the exact set of acknowledged puts, never from counts alone.
//!
//! Transactional rows: a PREWRITE stages its value under (key, start_ts);
//! the COMMIT counts, taking the staged value when it carries none (large
//! values travel only with the PREWRITE); a ROLLBACK drops it. Raw writes
//! and one-phase commits arrive as single COMMITTED rows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvfeed_proto::cdcpb::event::{LogType, Row};
use kvfeed_storage::TimeStamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::BenchError;
use super::load::{Stamp, unix_nanos};
use super::stats::{Histogram, Insert, SeqSet};
use super::subscribe::{FeedStream, Item, Plan, connect, describe, for_each_item};

/// Bound on every subscription of a watcher becoming INITIALIZED.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// When a running watcher may stop.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Distinct puts to see.
    pub puts: u64,
    /// Give up waiting for them at this time.
    pub give_up_at: tokio::time::Instant,
}

/// What a watcher saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub puts: SeqSet,
    /// Data rows received (distinct puts and duplicates).
    pub rows: u64,
    pub duplicates: u64,
    /// Rows that are not a put of this run.
    pub foreign: u64,
    /// Put sent → row received, nanoseconds.
    pub latency: Histogram,
    /// Now − resolved ts (physical part), microseconds, one sample per
    /// resolved ts received.
    pub resolved_lag_us: Histogram,
    /// Feed errors received, described.
    pub errors: Vec<String>,
    /// Why the stream ended early, if it did.
    pub ended: Option<String>,
    /// When the target was reached (`None`: never).
    pub complete_at: Option<Instant>,
}

/// A watcher whose subscriptions are all INITIALIZED.
pub struct Subscribed {
    stream: FeedStream,
    state: State,
}

struct State {
    plan_subs: usize,
    initialized: usize,
    active: usize,
    staged: HashMap<(Vec<u8>, u64), Vec<u8>>,
    seen: Seen,
}

impl State {
    fn on_message(&mut self, event: kvfeed_proto::cdcpb::ChangeDataEvent) {
        // One clock reading per message: its rows arrived together.
        let now_ns = unix_nanos();
        for_each_item(event, |item| match item {
            Item::Row { row, .. } => self.on_row(row, now_ns),
            Item::Error { error, .. } => {
                self.active = self.active.saturating_sub(1);
                self.seen.errors.push(describe(&error));
            }
            Item::Resolved { ts } => {
                let physical_ms = TimeStamp::new(ts).physical();
                let lag_us = (now_ns / 1000).saturating_sub(physical_ms.saturating_mul(1000));
                self.seen.resolved_lag_us.record(lag_us);
            }
        });
    }

    fn on_row(&mut self, row: Row, now_ns: u64) {
        let value = match LogType::try_from(row.r#type) {
            Ok(LogType::Initialized) => {
                self.initialized += 1;
                return;
            }
            Ok(LogType::Prewrite) => {
                self.staged.insert((row.key, row.start_ts), row.value);
                return;
            }
            Ok(LogType::Rollback) => {
                self.staged.remove(&(row.key, row.start_ts));
                return;
            }
            Ok(LogType::Commit) => {
                let staged = self.staged.remove(&(row.key, row.start_ts));
                match staged {
                    Some(value) if row.value.is_empty() => value,
                    _ => row.value,
                }
            }
            Ok(LogType::Committed) => row.value,
            Ok(LogType::Unknown) | Err(_) => return,
        };
        self.seen.rows += 1;
        let Some(stamp) = Stamp::parse(&value) else {
            self.seen.foreign += 1;
            return;
        };
        match self.seen.puts.insert(stamp.writer, stamp.seq) {
            Insert::New => {
                self.seen
                    .latency
                    .record(now_ns.saturating_sub(stamp.sent_ns));
            }
            Insert::Duplicate => self.seen.duplicates += 1,
            Insert::Foreign => self.seen.foreign += 1,
        }
    }
}

impl Subscribed {
    /// Connects to `addr`, registers every subscription of `plan` from
    /// `checkpoint` and waits (bounded) until all are INITIALIZED.
    pub async fn open(
        addr: &str,
        plan: &Plan,
        checkpoint: u64,
        writers: u32,
    ) -> Result<Subscribed, BenchError> {
        let channel = connect(addr).await?;
        let stream = FeedStream::open(channel).await?;
        stream.send_all(plan.registers(checkpoint)).await?;
        let mut subscribed = Subscribed {
            stream,
            state: State {
                plan_subs: plan.subs.len(),
                initialized: 0,
                active: plan.subs.len(),
                staged: HashMap::new(),
                seen: Seen {
                    puts: SeqSet::new(writers as usize),
                    ..Seen::default()
                },
            },
        };
        let waiting = async {
            while subscribed.state.initialized < subscribed.state.plan_subs {
                if let Some(error) = subscribed.state.seen.errors.first() {
                    return Err(BenchError::Feed(format!(
                        "a subscription was refused: {error}"
                    )));
                }
                match subscribed.stream.next().await? {
                    Some(event) => subscribed.state.on_message(event),
                    None => {
                        return Err(BenchError::Feed(
                            "the server ended the stream before INITIALIZED".to_owned(),
                        ));
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(INIT_TIMEOUT, waiting)
            .await
            .map_err(|_| {
                BenchError::Feed(format!(
                    "subscriptions were not INITIALIZED within {INIT_TIMEOUT:?}"
                ))
            })??;
        Ok(subscribed)
    }

    /// Runs on a task until the target (sent on `target` once known) is
    /// reached, its deadline passes, or the stream ends.
    pub fn spawn(self, target: watch::Receiver<Option<Target>>) -> JoinHandle<Seen> {
        tokio::spawn(self.run(target))
    }

    async fn run(mut self, mut target: watch::Receiver<Option<Target>>) -> Seen {
        let far = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        loop {
            let current = *target.borrow();
            if let Some(t) = current
                && self.state.seen.puts.len() >= t.puts
            {
                self.state.seen.complete_at = Some(Instant::now());
                break;
            }
            if self.state.active == 0 {
                self.state.seen.ended = Some("every subscription ended with an error".to_owned());
                break;
            }
            let give_up = current.map_or(far, |t| t.give_up_at);
            tokio::select! {
                changed = target.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep_until(give_up) => break,
                next = self.stream.next() => match next {
                    Ok(Some(event)) => self.state.on_message(event),
                    Ok(None) => {
                        self.state.seen.ended = Some("the server ended the stream".to_owned());
                        break;
                    }
                    Err(e) => {
                        self.state.seen.ended = Some(e.to_string());
                        break;
                    }
                },
            }
        }
        self.state.seen
    }

    /// Reads what the server queued for this (stalled) consumer until an
    /// error ends every subscription, the stream ends, it has caught up
    /// (seen `puts` distinct puts), or `limit` passes. Returns how it
    /// ended and what was seen.
    pub async fn drain_after_stall(mut self, puts: u64, limit: Duration) -> (String, Seen) {
        let reading = async {
            loop {
                if self.state.active == 0 {
                    let errors = self.state.seen.errors.join(", ");
                    return format!("subscriptions ended: {errors}");
                }
                if self.state.seen.puts.len() >= puts {
                    return "caught up: every put arrived".to_owned();
                }
                match self.stream.next().await {
                    Ok(Some(event)) => self.state.on_message(event),
                    Ok(None) => return "the server ended the stream".to_owned(),
                    Err(e) => return e.to_string(),
                }
            }
        };
        let ended = tokio::time::timeout(limit, reading)
            .await
            .unwrap_or_else(|_| format!("still open after {limit:?}"));
        (ended, self.state.seen)
    }
}
