//! Consumers built on the feed client (`kvfeed_client::feed::Feed`), each
//! following a range of one key mode wherever its regions are and whatever
//! store leads them. A feed's rows and resolved ts are
//! recorded and checked by the same rules as one subscription of a raw
//! stream (`consumer`): the feed is the subscription, its resolved ts the
//! span's.

use std::sync::{Arc, Mutex};

use kvfeed_client::feed::{Feed, FeedEvent, FeedSpec, Op};
use kvfeed_client::{Cluster, KeyMode};
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use kvfeed_types::TimeStamp;
use tokio::sync::{oneshot, watch};

use super::consumer::{Consumer, Got, Seen, Sub};

/// What a feed consumer is.
pub struct FeedConsumer {
    pub name: &'static str,
    pub mode: KeyMode,
    pub checkpoint: u64,
    /// The user-key range followed (empty ends: unbounded).
    pub range: (Vec<u8>, Vec<u8>),
    /// Every raw put begun after this logical instant must be delivered
    /// (raw writes take their timestamp from the oracle when applied, so
    /// one begun after the checkpoint was taken commits above it).
    pub raw_from: u64,
}

fn open(cluster: &Cluster, mode: KeyMode, range: &(Vec<u8>, Vec<u8>), start_ts: u64) -> Feed {
    let spec = FeedSpec {
        mode,
        start: range.0.clone(),
        end: range.1.clone(),
        start_ts: TimeStamp::new(start_ts),
        old_value: false,
    };
    Feed::open(cluster, &spec)
}

impl Seen {
    /// One item of the feed that subscription `index` stands for.
    fn on_feed_event(&mut self, index: usize, event: FeedEvent) {
        match event {
            FeedEvent::Row(row) => self.on_got(
                index,
                Got {
                    key: row.key.to_vec(),
                    value: (row.op == Op::Put).then(|| row.value.to_vec()),
                    start_ts: row.start_ts.into_inner(),
                    commit_ts: row.commit_ts.into_inner(),
                },
            ),
            FeedEvent::ResolvedTs(ts) => self.on_resolved(index, ts.into_inner()),
            // The feed's first INITIALIZED: a resolved ts before it would
            // precede the catch-up of every range.
            FeedEvent::Initialized { .. } => self.on_initialized(index),
            FeedEvent::RegionRetry { .. } => self.retries += 1,
            FeedEvent::StreamLost { .. } => self.lost += 1,
            FeedEvent::CatchUp { .. } => {}
        }
    }
}

impl FeedConsumer {
    /// Starts the consumer; `reconnect` (if given) makes it drop its feed
    /// and open a new one from the last resolved ts it handed out; it stops
    /// once its resolved ts passes what `target` holds (0: not yet known).
    pub fn start(
        self,
        cluster: Cluster,
        mut reconnect: Option<oneshot::Receiver<()>>,
        target: watch::Receiver<u64>,
    ) -> Consumer {
        let kv_api = match self.mode {
            KeyMode::Raw => KvApi::RawKv,
            KeyMode::Txn => KvApi::TiDb,
        };
        let seen = Arc::new(Mutex::new(Seen {
            name: self.name.to_owned(),
            kv_api: kv_api as i32,
            checkpoint: self.checkpoint,
            subs: vec![Sub::default()],
            live: 1,
            raw_from: Some(self.raw_from),
            ..Seen::default()
        }));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut feed = open(&cluster, self.mode, &self.range, self.checkpoint);
                let mut index = 0;
                loop {
                    let goal = *target.borrow();
                    if goal > 0 && seen.lock().expect("seen").resolved_min() >= goal {
                        return;
                    }
                    // Checked between items rather than raced against
                    // `next`, which is not cancellation-safe; items come
                    // at least every resolved-ts interval.
                    if reconnect.as_mut().is_some_and(|rx| rx.try_recv().is_ok()) {
                        reconnect = None;
                        let floor = {
                            let mut seen = seen.lock().expect("seen");
                            seen.subs.push(Sub::default());
                            seen.subs[index].resolved.max(self.checkpoint)
                        };
                        index += 1;
                        feed = open(&cluster, self.mode, &self.range, floor);
                    }
                    match feed.next().await {
                        Ok(event) => seen.lock().expect("seen").on_feed_event(index, event),
                        Err(e) => {
                            let mut seen = seen.lock().expect("seen");
                            seen.violations.push(format!("feed ended: {e}"));
                            return;
                        }
                    }
                }
            })
        };
        Consumer { seen, task }
    }
}
