//! A feed consumer for tests: pulls a `kvfeed_client::feed::Feed`, records
//! what arrives and checks the ordering promises as items arrive.

use std::collections::{BTreeMap, BTreeSet};

use kvfeed_client::feed::{Feed, FeedEvent, FeedSpec};
use kvfeed_client::{Cluster, KeyMode};
use tokio::sync::watch;

use crate::common::{TestServer, WAIT};

/// A commit as a writer saw it and the feed must deliver it: (key,
/// commit_ts, value; empty for a delete).
pub type Commit = (Vec<u8>, u64, Vec<u8>);

/// A consumer of the transactional feed over `[start, end)` from now,
/// caught up: the cluster it connected with, what it sees, and its task.
pub async fn subscribe(
    server: &TestServer,
    start: &[u8],
    end: &[u8],
) -> (Cluster, watch::Receiver<Seen>, tokio::task::JoinHandle<()>) {
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect");
    let start_ts = cluster.tso().await.expect("tso");
    let feed = Feed::open(
        &cluster,
        &FeedSpec {
            mode: KeyMode::Txn,
            start: start.to_vec(),
            end: end.to_vec(),
            start_ts,
            old_value: false,
        },
    );
    let (tx, mut rx) = watch::channel(Seen::default());
    let consumer = tokio::spawn(consume(feed, tx));
    wait_for(&mut rx, "catch-up", |s| s.caught_up).await;
    (cluster, rx, consumer)
}

/// Waits until the consumer's resolved ts passed every commit in
/// `expected`, stops it, checks that it saw exactly them, and returns what
/// it saw.
pub async fn finish(
    mut rx: watch::Receiver<Seen>,
    consumer: tokio::task::JoinHandle<()>,
    expected: Vec<Commit>,
) -> Seen {
    let last = expected.iter().map(|(_, ts, _)| *ts).max().unwrap_or(0);
    wait_for(&mut rx, "resolved past the last commit", |s| {
        s.resolved >= last
    })
    .await;
    consumer.abort();
    let seen = rx.borrow().clone();
    assert_exactly_once(&seen, expected);
    seen
}

/// Every commit in `expected` arrived exactly once, nothing else did, and
/// each key's rows came in commit order.
fn assert_exactly_once(seen: &Seen, expected: Vec<Commit>) {
    let delivered: BTreeSet<_> = seen.rows.iter().cloned().collect();
    assert_eq!(delivered.len(), seen.rows.len(), "a row arrived twice");
    let expected: BTreeSet<_> = expected.into_iter().collect();
    assert_eq!(delivered, expected, "every commit exactly once");
    let mut per_key: BTreeMap<&[u8], u64> = BTreeMap::new();
    for (key, commit_ts, _) in &seen.rows {
        let previous = per_key.insert(key, *commit_ts).unwrap_or(0);
        assert!(*commit_ts > previous, "key {key:?} out of commit order");
    }
}

/// What the consumer has seen so far.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Rows in arrival order.
    pub rows: Vec<Commit>,
    pub resolved: u64,
    pub caught_up: bool,
    pub retries: u32,
    pub lost: u32,
    pub failure: Option<String>,
}

/// Pulls the feed, checking the ordering invariants as items arrive: no
/// row at or below a resolved ts already handed out, resolved ts only
/// grows.
pub async fn consume(mut feed: Feed, seen: watch::Sender<Seen>) {
    loop {
        let item = match feed.next().await {
            Ok(item) => item,
            Err(e) => {
                seen.send_modify(|s| s.failure = Some(format!("feed ended: {e}")));
                return;
            }
        };
        seen.send_modify(|s| match item {
            FeedEvent::Row(row) => {
                let commit_ts = row.commit_ts.into_inner();
                if commit_ts <= s.resolved {
                    s.failure = Some(format!(
                        "row at {commit_ts} after resolved ts {}",
                        s.resolved
                    ));
                }
                s.rows
                    .push((row.key.to_vec(), commit_ts, row.value.to_vec()));
            }
            FeedEvent::ResolvedTs(ts) => {
                if ts.into_inner() <= s.resolved {
                    s.failure = Some(format!("resolved ts {ts} after {}", s.resolved));
                }
                s.resolved = ts.into_inner();
            }
            FeedEvent::Initialized {
                regions_done,
                regions_total,
            } => s.caught_up |= regions_done == regions_total,
            FeedEvent::RegionRetry { .. } => s.retries += 1,
            FeedEvent::StreamLost { .. } => s.lost += 1,
            FeedEvent::CatchUp { .. } => {}
        });
    }
}

/// Waits until `cond` holds (or the consumer failed), at most [`WAIT`].
pub async fn wait_for(rx: &mut watch::Receiver<Seen>, what: &str, cond: impl Fn(&Seen) -> bool) {
    let waited = tokio::time::timeout(WAIT, rx.wait_for(|s| s.failure.is_some() || cond(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    let seen = rx.borrow().clone();
    assert!(seen.failure.is_none(), "{what}: {:?}", seen.failure);
    assert!(waited, "{what}: not within {WAIT:?}; {seen:?}");
}
