//! A feed consumer that checks what it receives: every stamped put exactly
//! once, with its latency, plus the resolved-ts lag.
//!
//! A watcher first subscribes and waits until it is ready — on kvfeed,
//! every subscription INITIALIZED; on etcd, the watch `created` — so the
//! writers start only once nothing can be missed. Then it runs on a task
//! of its own until it has seen as many distinct puts as were
//! acknowledged (the *target*, known only when the writers are done) or
//! the drain deadline passes. Loss is computed afterwards against the
//! exact set of acknowledged puts, never from counts alone.
//!
//! The counting ([`Seen::record`]) and the run loop are the same for both
//! systems; only reading a message differs (`Source`).
//!
//! Transactional rows: a PREWRITE stages its value under (key, start_ts);
//! the COMMIT counts, taking the staged value when it carries none (large
//! values travel only with the PREWRITE); a ROLLBACK drops it. Raw writes
//! and one-phase commits arrive as single COMMITTED rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
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
    /// The distinct puts of this run received, by (writer, seq); compared
    /// with the acknowledged set afterwards to find losses.
    pub puts: SeqSet,
    /// Data rows received (distinct puts and duplicates).
    pub rows: u64,
    /// Rows of a put already received: each one breaks exactly-once.
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

impl Seen {
    /// An empty record for puts of `writers` writers.
    pub fn new(writers: u32) -> Seen {
        Seen {
            puts: SeqSet::new(writers as usize),
            ..Seen::default()
        }
    }

    /// Counts one delivered value, received at `now_ns`: a put of this run
    /// is new (its latency recorded) or a duplicate; anything else is
    /// foreign.
    pub fn record(&mut self, value: &[u8], now_ns: u64) {
        self.rows += 1;
        let Some(stamp) = Stamp::parse(value) else {
            self.foreign += 1;
            return;
        };
        match self.puts.insert(stamp.writer, stamp.seq) {
            Insert::New => self.latency.record(now_ns.saturating_sub(stamp.sent_ns)),
            Insert::Duplicate => self.duplicates += 1,
            Insert::Foreign => self.foreign += 1,
        }
    }
}

/// How to open one watcher: all it needs, cheap to clone into a task.
#[derive(Debug, Clone)]
pub enum WatchPlan {
    /// An EventFeed stream subscribed to every region of `plan`.
    Kvfeed {
        /// The store's `host:port`, dialled on a connection of its own.
        addr: String,
        /// The subscriptions covering the watched range, shared by watchers.
        plan: Arc<Plan>,
        /// Every subscription's checkpoint_ts: rows committed after it come.
        checkpoint: u64,
    },
    /// A Watch stream with one watch of every key under `prefix`.
    #[cfg(feature = "etcd")]
    Etcd {
        /// etcd's client URL, `host:port`.
        addr: String,
        /// The key prefix watched.
        prefix: Vec<u8>,
    },
}

impl WatchPlan {
    /// Opens one watcher (a connection of its own) and waits until it is
    /// ready.
    pub async fn open(&self, writers: u32) -> Result<Subscribed, BenchError> {
        match self {
            WatchPlan::Kvfeed {
                addr,
                plan,
                checkpoint,
            } => Subscribed::open(addr, plan, *checkpoint, writers).await,
            #[cfg(feature = "etcd")]
            WatchPlan::Etcd { addr, prefix } => {
                let watch = super::etcd::EtcdWatcher::open(addr, prefix).await?;
                Ok(Subscribed {
                    source: Source::Etcd(watch),
                    seen: Seen::new(writers),
                })
            }
        }
    }

    /// Subscriptions per watcher on kvfeed (one per region); `None` on
    /// etcd, where a watch is not split.
    pub fn regions(&self) -> Option<usize> {
        match self {
            WatchPlan::Kvfeed { plan, .. } => Some(plan.subs.len()),
            #[cfg(feature = "etcd")]
            WatchPlan::Etcd { .. } => None,
        }
    }
}

/// A watcher that is ready: nothing written from now on can be missed.
pub struct Subscribed {
    source: Source,
    seen: Seen,
}

/// What a watcher reads from.
enum Source {
    Kvfeed {
        stream: FeedStream,
        state: State,
    },
    #[cfg(feature = "etcd")]
    Etcd(super::etcd::EtcdWatcher),
}

/// What one read brought.
enum Read {
    Message,
    /// The stream ended; why.
    Ended(String),
}

impl Source {
    /// Reads one message into `seen`.
    async fn read(&mut self, seen: &mut Seen) -> Read {
        match self {
            Source::Kvfeed { stream, state } => match stream.next().await {
                Ok(Some(event)) => {
                    state.on_message(event, seen);
                    Read::Message
                }
                Ok(None) => Read::Ended("the server ended the stream".to_owned()),
                Err(e) => Read::Ended(e.to_string()),
            },
            #[cfg(feature = "etcd")]
            Source::Etcd(watch) => match watch.read(seen).await {
                Ok(()) => Read::Message,
                Err(e) => Read::Ended(e.to_string()),
            },
        }
    }

    /// Whether anything is still subscribed (errors end subscriptions).
    fn active(&self) -> bool {
        match self {
            Source::Kvfeed { state, .. } => state.active > 0,
            #[cfg(feature = "etcd")]
            Source::Etcd(watch) => watch.active(),
        }
    }
}

/// A kvfeed stream's subscriptions and staged prewrites.
struct State {
    plan_subs: usize,
    initialized: usize,
    active: usize,
    staged: HashMap<(Bytes, u64), Bytes>,
}

impl State {
    fn on_message(&mut self, event: kvfeed_proto::cdcpb::ChangeDataEvent, seen: &mut Seen) {
        // One clock reading per message: its rows arrived together.
        let now_ns = unix_nanos();
        for_each_item(event, |item| match item {
            Item::Row { row, .. } => {
                if let Some(value) = self.on_row(row) {
                    seen.record(&value, now_ns);
                }
            }
            Item::Error { error, .. } => {
                self.active = self.active.saturating_sub(1);
                seen.errors.push(describe(&error));
            }
            Item::Resolved { ts } => {
                let physical_ms = TimeStamp::new(ts).physical();
                let lag_us = (now_ns / 1000).saturating_sub(physical_ms.saturating_mul(1000));
                seen.resolved_lag_us.record(lag_us);
            }
        });
    }

    /// The value a row delivers, if it delivers one.
    fn on_row(&mut self, row: Row) -> Option<Bytes> {
        match LogType::try_from(row.r#type) {
            Ok(LogType::Initialized) => {
                self.initialized += 1;
                None
            }
            Ok(LogType::Prewrite) => {
                self.staged.insert((row.key, row.start_ts), row.value);
                None
            }
            Ok(LogType::Rollback) => {
                self.staged.remove(&(row.key, row.start_ts));
                None
            }
            Ok(LogType::Commit) => {
                let staged = self.staged.remove(&(row.key, row.start_ts));
                match staged {
                    Some(value) if row.value.is_empty() => Some(value),
                    _ => Some(row.value),
                }
            }
            Ok(LogType::Committed) => Some(row.value),
            Ok(LogType::Unknown) | Err(_) => None,
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
        let mut stream = FeedStream::open(channel).await?;
        stream.send_all(plan.registers(checkpoint)).await?;
        let mut state = State {
            plan_subs: plan.subs.len(),
            initialized: 0,
            active: plan.subs.len(),
            staged: HashMap::new(),
        };
        let mut seen = Seen::new(writers);
        let waiting = async {
            while state.initialized < state.plan_subs {
                if let Some(error) = seen.errors.first() {
                    return Err(BenchError::Feed(format!(
                        "a subscription was refused: {error}"
                    )));
                }
                match stream.next().await? {
                    Some(event) => state.on_message(event, &mut seen),
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
        Ok(Subscribed {
            source: Source::Kvfeed { stream, state },
            seen,
        })
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
                && self.seen.puts.len() >= t.puts
            {
                self.seen.complete_at = Some(Instant::now());
                break;
            }
            if !self.source.active() {
                self.seen.ended = Some("every subscription ended with an error".to_owned());
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
                read = self.source.read(&mut self.seen) => match read {
                    Read::Message => {}
                    Read::Ended(why) => {
                        self.seen.ended = Some(why);
                        break;
                    }
                },
            }
        }
        self.seen
    }

    /// Reads what the server queued for this (stalled) consumer until an
    /// error ends every subscription, the stream ends, it has caught up
    /// (seen `puts` distinct puts), or `limit` passes. Returns how it
    /// ended and what was seen.
    pub async fn drain_after_stall(mut self, puts: u64, limit: Duration) -> (String, Seen) {
        let reading = async {
            loop {
                if !self.source.active() {
                    let errors = self.seen.errors.join(", ");
                    return format!("subscriptions ended: {errors}");
                }
                if self.seen.puts.len() >= puts {
                    return "caught up: every put arrived".to_owned();
                }
                if let Read::Ended(why) = self.source.read(&mut self.seen).await {
                    return why;
                }
            }
        };
        let ended = tokio::time::timeout(limit, reading)
            .await
            .unwrap_or_else(|_| format!("still open after {limit:?}"));
        (ended, self.seen)
    }
}
