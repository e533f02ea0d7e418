//! The feed side of the model test: consumers that record every row and
//! resolved ts they receive, per subscription, and check on the fly what
//! can only be checked in arrival order (resolved ts before INITIALIZED or
//! going back, rows at or below a resolved ts, a key's commit ts not
//! rising). A "subscription" here is one region on one raw `EventFeed`
//! stream, or one whole `Feed` of the feed client (`feeds`), whose
//! resolved ts is the span's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kvfeed_client::feed::Registration;
use kvfeed_client::{KeyMode, RegionInfo};
use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use kvfeed_proto::cdcpb::event::{self, LogType, row::OpType};
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest};
use kvfeed_storage::mvcc::encode_bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::FEED_WAIT;

/// The subscribed ranges, per region, in PD's key space.
pub fn ranges(kv_api: KvApi) -> [(Vec<u8>, Vec<u8>); 2] {
    match kv_api {
        KvApi::RawKv => {
            let high = |s: &[u8]| [&[0xFF; 10][..], s].concat();
            [(b"r/".to_vec(), b"r0".to_vec()), (high(b"r/"), high(b"r0"))]
        }
        _ => {
            let high = |s: &[u8]| encode_bytes(&[&[0xFF; 8][..], s].concat());
            [
                (encode_bytes(b"m/"), encode_bytes(b"m0")),
                (high(b"m/"), high(b"m0")),
            ]
        }
    }
}

/// A logical clock ordering writes against consumers' INITIALIZED rows.
static CLOCK: AtomicU64 = AtomicU64::new(1);

pub fn tick() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

/// One row as a consumer received it, COMMIT values filled from PREWRITE.
#[derive(Debug, Clone)]
pub struct Got {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub start_ts: u64,
    pub commit_ts: u64,
}

/// One region on one stream, or one feed.
#[derive(Debug, Default)]
pub struct Sub {
    pub initialized_at: Option<u64>,
    pub resolved: u64,
    pub rows: Vec<Got>,
    pub per_key: HashMap<Vec<u8>, u64>,
    pub staged: HashMap<(Bytes, u64), Bytes>,
}

/// Everything one consumer saw and what was wrong with it.
#[derive(Debug, Default)]
pub struct Seen {
    pub name: String,
    pub kv_api: i32,
    pub checkpoint: u64,
    /// Region ids by request id - 1.
    pub region_ids: Vec<u64>,
    /// Subscriptions in order; the last `live` are the current ones.
    pub subs: Vec<Sub>,
    /// Subscriptions at a time: one per region on a stream, one for a feed.
    pub live: usize,
    /// Every raw put begun after this logical instant must be delivered;
    /// `None`: after the first subscriptions' INITIALIZED rows.
    pub raw_from: Option<u64>,
    /// Region errors and lost streams a feed recovered from.
    pub retries: u32,
    pub lost: u32,
    pub violations: Vec<String>,
}

impl Seen {
    pub fn resolved_min(&self) -> u64 {
        let n = self.subs.len();
        self.subs[n - self.live..]
            .iter()
            .map(|s| s.resolved)
            .min()
            .unwrap_or(0)
    }

    /// See [`Seen::raw_from`] the field.
    pub fn raw_from(&self) -> u64 {
        self.raw_from.unwrap_or_else(|| {
            self.subs[..self.live]
                .iter()
                .filter_map(|s| s.initialized_at)
                .max()
                .unwrap_or(u64::MAX)
        })
    }

    pub fn on_event(&mut self, base: usize, event: ChangeDataEvent) {
        for e in event.events {
            let index = base + e.request_id as usize - 1;
            match e.event {
                Some(event::Event::Entries(entries)) => {
                    for row in entries.entries {
                        self.on_row(index, row);
                    }
                }
                Some(event::Event::ResolvedTs(ts)) => self.on_resolved(index, ts),
                Some(event::Event::Error(error)) => {
                    self.violations
                        .push(format!("sub {index}: error {error:?}"));
                }
                _ => {}
            }
        }
        if let Some(resolved) = event.resolved_ts {
            for index in base..self.subs.len() {
                let request_id = (index - base) as u64 + 1;
                let region = self.region_ids[index - base];
                if (resolved.request_id == 0 || resolved.request_id == request_id)
                    && resolved.regions.contains(&region)
                {
                    self.on_resolved(index, resolved.ts);
                }
            }
        }
    }

    pub fn on_resolved(&mut self, index: usize, ts: u64) {
        let name = self.name.clone();
        let sub = &mut self.subs[index];
        if sub.initialized_at.is_none() {
            self.violations.push(format!(
                "{name} sub {index}: resolved ts {ts} before INITIALIZED"
            ));
        }
        if ts < sub.resolved {
            self.violations.push(format!(
                "{name} sub {index}: resolved ts went back {} -> {ts}",
                sub.resolved
            ));
        }
        sub.resolved = sub.resolved.max(ts);
    }

    fn on_row(&mut self, index: usize, row: event::Row) {
        let name = self.name.clone();
        let sub = &mut self.subs[index];
        let delete = row.op_type == OpType::Delete as i32;
        let value = match LogType::try_from(row.r#type) {
            Ok(LogType::Initialized) => {
                sub.initialized_at = Some(tick());
                return;
            }
            Ok(LogType::Prewrite) => {
                sub.staged.insert((row.key, row.start_ts), row.value);
                return;
            }
            Ok(LogType::Rollback) => {
                sub.staged.remove(&(row.key, row.start_ts));
                return;
            }
            Ok(LogType::Commit) => {
                let staged = sub.staged.remove(&(row.key.clone(), row.start_ts));
                match staged {
                    Some(value) if row.value.is_empty() => value,
                    _ => row.value.clone(),
                }
            }
            Ok(LogType::Committed) => row.value.clone(),
            other => {
                self.violations
                    .push(format!("{name} sub {index}: unexpected row type {other:?}"));
                return;
            }
        };
        let got = Got {
            key: row.key.to_vec(),
            value: (!delete).then(|| value.to_vec()),
            start_ts: row.start_ts,
            commit_ts: row.commit_ts,
        };
        self.on_got(index, got);
    }

    /// An INITIALIZED row of subscription `index` (a feed has one per
    /// region it subscribes; the first counts).
    pub fn on_initialized(&mut self, index: usize) {
        self.subs[index].initialized_at.get_or_insert_with(tick);
    }

    /// A committed change delivered on subscription `index`.
    pub fn on_got(&mut self, index: usize, got: Got) {
        let name = self.name.clone();
        let sub = &mut self.subs[index];
        let mut wrong = Vec::new();
        if got.commit_ts <= sub.resolved {
            wrong.push(format!(
                "commit_ts {} at or below resolved ts {}",
                got.commit_ts, sub.resolved
            ));
        }
        if let Some(last) = sub.per_key.insert(got.key.clone(), got.commit_ts)
            && last >= got.commit_ts
        {
            wrong.push(format!(
                "commit_ts {} after {last} for the same key (out of order or twice)",
                got.commit_ts
            ));
        }
        for w in wrong {
            self.violations
                .push(format!("{name} sub {index}: key {:?}: {w}", got.key));
        }
        sub.rows.push(got);
    }
}

/// What one turn of a consumer's loop got.
pub enum Step {
    Continue,
    Event(ChangeDataEvent),
    Ended(String),
    Reconnect,
}

pub struct Consumer {
    pub seen: Arc<Mutex<Seen>>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Opens a stream and registers one subscription per region from each
/// checkpoint (request id = region index + 1).
pub async fn open(
    channel: &Channel,
    cluster_id: u64,
    regions: &[RegionInfo],
    kv_api: KvApi,
    checkpoints: &[u64],
) -> (
    mpsc::Sender<ChangeDataRequest>,
    tonic::Streaming<ChangeDataEvent>,
) {
    let (tx, rx) = mpsc::channel(16);
    for (i, ((start, end), region)) in ranges(kv_api).into_iter().zip(regions).enumerate() {
        let mode = match kv_api {
            KvApi::RawKv => KeyMode::Raw,
            _ => KeyMode::Txn,
        };
        let request = Registration {
            cluster_id,
            request_id: i as u64 + 1,
            region,
            start: &start,
            end: &end,
            checkpoint_ts: checkpoints[i],
            mode,
            old_value: false,
        }
        .request();
        tx.send(request).await.expect("request queue open");
    }
    let stream = tokio::time::timeout(
        FEED_WAIT,
        ChangeDataClient::new(channel.clone()).event_feed(ReceiverStream::new(rx)),
    )
    .await
    .expect("EventFeed answers in time")
    .expect("EventFeed opens")
    .into_inner();
    (tx, stream)
}

/// Starts a consumer; `reconnect` (if given) makes it drop its stream and
/// register again from its last resolved ts per region; it stops once its
/// resolved ts passes what `target` holds (0: not yet known).
#[allow(clippy::too_many_arguments)]
pub async fn consumer(
    name: &str,
    channel: Channel,
    cluster_id: u64,
    regions: Vec<RegionInfo>,
    kv_api: KvApi,
    checkpoint: u64,
    mut reconnect: Option<oneshot::Receiver<()>>,
    mut target: watch::Receiver<u64>,
) -> Consumer {
    let seen = Arc::new(Mutex::new(Seen {
        name: name.to_owned(),
        kv_api: kv_api as i32,
        checkpoint,
        region_ids: regions.iter().map(|r| r.id.0).collect(),
        subs: vec![Sub::default(), Sub::default()],
        live: 2,
        ..Seen::default()
    }));
    let (mut tx, mut stream) = open(
        &channel,
        cluster_id,
        &regions,
        kv_api,
        &[checkpoint, checkpoint],
    )
    .await;
    let task = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut base = 0;
            loop {
                let goal = *target.borrow();
                if goal > 0 && seen.lock().expect("seen").resolved_min() >= goal {
                    return;
                }
                let wants_reconnect = async {
                    match reconnect.as_mut() {
                        Some(rx) => {
                            let _ = rx.await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let step = tokio::select! {
                    () = wants_reconnect => Step::Reconnect,
                    changed = target.changed() => match changed {
                        Ok(()) => Step::Continue,
                        Err(_) => return,
                    },
                    message = stream.message() => match message {
                        Ok(Some(event)) => Step::Event(event),
                        other => Step::Ended(format!("{other:?}")),
                    },
                };
                match step {
                    Step::Continue => {}
                    Step::Event(event) => seen.lock().expect("seen").on_event(base, event),
                    Step::Ended(why) => {
                        let mut seen = seen.lock().expect("seen");
                        seen.violations.push(format!("stream ended: {why}"));
                        return;
                    }
                    Step::Reconnect => {
                        reconnect = None;
                        let floors: Vec<u64> = {
                            let mut seen = seen.lock().expect("seen");
                            let floors = seen.subs[base..]
                                .iter()
                                .map(|s| s.resolved.max(checkpoint))
                                .collect();
                            seen.subs.push(Sub::default());
                            seen.subs.push(Sub::default());
                            floors
                        };
                        drop(tx);
                        drop(stream);
                        base += 2;
                        (tx, stream) = open(&channel, cluster_id, &regions, kv_api, &floors).await;
                    }
                }
            }
        })
    };
    Consumer { seen, task }
}
