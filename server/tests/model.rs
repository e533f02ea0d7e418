//! The acceptance test of the feed guarantee: a seeded, randomized,
//! concurrent workload through the official `tikv-client`, watched by
//! several `cdcpb.ChangeData` consumers, checked against a model; and the
//! same under a nemesis, watched through the feed client.
//!
//! # The workload
//!
//! Writers run at once, each a seeded sequence of operations over a small
//! set of keys in both regions (so transactions conflict and some span the
//! region boundary):
//! - optimistic transactions of 1–3 keys, puts and deletes;
//! - pessimistic transactions of 1–2 keys;
//! - rollbacks (a pessimistic begin, a put that takes the lock, rollback);
//! - orphaned prewrites: a "crashed" writer prewrites by hand and never
//!   commits; the lock is resolved (rolled back) by whoever reads or writes
//!   its own key after its short TTL (the same writer, a few steps later,
//!   and the final snapshot read);
//! - raw puts, each raw key owned by one writer (so its final value is the
//!   writer's last acknowledged put). Raw deletes are left out: a raw delete
//!   row carries no value that could identify the write.
//!
//! Every written value is unique (`w{writer}s{seq}k{key}`).
//!
//! # The model
//!
//! Each transaction is recorded by its start ts with its mutations and its
//! outcome: committed at a commit ts (`commit()` returned it), rolled back
//! (an explicit rollback, or an orphan), or unknown (the commit call
//! failed: it may or may not have taken effect). Each raw put is recorded
//! with a logical instant taken just before it was sent.
//!
//! # The consumers
//!
//! One `EventFeed` stream each, one subscription per region over the
//! written range: from the start with checkpoint 0 (transactional and raw),
//! and mid-workload with a checkpoint taken then (transactional and raw);
//! one more, from 0, drops its stream mid-run and registers again on a new
//! one from the last resolved ts it saw per region.
//!
//! # Under a nemesis
//!
//! The second test runs the same workload on a server with three stores
//! while a nemesis (`common::nemesis`) splits regions (half of the time at
//! the written keys themselves), merges them and moves their leaders; the
//! orphans are prewritten on the leader's store; half-way every feed
//! stream is cut (the server's fault injection). The same five consumers
//! are `Feed`s of the feed client (from 0 over the whole key space, from
//! the checkpoint over the range written only), which re-register on
//! every region error; the resumed one opens a new feed
//! from the last resolved ts the first one handed out. Each feed is checked
//! as one subscription: its resolved ts is the span's. For a raw feed from
//! the mid checkpoint, every raw put begun after the checkpoint was taken
//! must be delivered (raw writes take their timestamp from the oracle). It
//! is small by default (a few seconds of writes); `KVFEED_MODEL_SCALE=N`
//! gives each writer N times the operations.
//!
//! # What is asserted
//!
//! Per subscription (one region on one stream, or one feed):
//! - no resolved ts before INITIALIZED (rows before it are the catch-up
//!   scan's);
//! - resolved timestamps never go back;
//! - no row with commit_ts ≤ a resolved ts already received (honesty);
//! - no (key, commit_ts) twice, and per key commit_ts strictly increasing.
//!
//! Per consumer (all its subscriptions together):
//! - every delivered transactional row belongs to a transaction that was
//!   not rolled back, carries that transaction's mutation of the key, and
//!   its commit ts when the model knows it; every raw row is a raw put;
//! - every transaction committed with commit_ts > the checkpoint is
//!   delivered for each of its keys; every raw put begun after the
//!   consumer's INITIALIZED (or every one, from checkpoint 0) is delivered;
//! - once the consumer's resolved ts passed a final timestamp F (taken
//!   after every write was acknowledged), its view (the last row per key,
//!   deletes applied) equals a snapshot read at F — for checkpoint 0; for a
//!   later checkpoint, for every key it received a row of; a scan of the
//!   written ranges at F finds exactly the keys of that snapshot.
//!
//! The seed is printed; `KVFEED_MODEL_SEED` replays a run's choices
//! (`KVFEED_NEMESIS_SEED` the nemesis's, which default to the model seed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "tikv_client/by_hand.rs"]
#[allow(dead_code)] // only the prewrite and the oracle are used here
mod by_hand;
#[path = "model/check.rs"]
mod check;
mod common;
#[path = "model/consumer.rs"]
mod consumer;
#[path = "model/feeds.rs"]
mod feeds;
#[path = "model/workload.rs"]
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use by_hand::ByHand;
use check::check;
use common::TestServer;
use common::nemesis::{self, Nemesis};
use consumer::{Consumer, consumer, ranges, tick};
use feeds::FeedConsumer;
use kvfeed_client::{Cluster, KeyMode, RegionInfo};
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_types::TimeStamp;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tikv_client::{RawClient, TimestampExt, TransactionClient};
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use workload::{
    Model, OPS_PER_WRITER, Outcome, RAW_KEYS, TXN_KEYS, WRITERS, Writer, optimistic, orphan_key,
    raw_key, split_points, txn_key, written_range,
};

/// Bound on the whole test (at scale 1).
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// Bound on one wait for the feed.
const FEED_WAIT: Duration = Duration::from_secs(30);
/// Stores the nemesis moves leaders between.
const STORES: u32 = 3;

fn seed() -> u64 {
    match std::env::var("KVFEED_MODEL_SEED") {
        Ok(text) => text.parse().expect("KVFEED_MODEL_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// `KVFEED_MODEL_SCALE`: how many times the default operations each
/// writer makes under the nemesis (1 in CI).
fn scale() -> usize {
    match std::env::var("KVFEED_MODEL_SCALE") {
        Ok(text) => text.parse().expect("KVFEED_MODEL_SCALE is a count"),
        Err(_) => 1,
    }
    .max(1)
}

/// The server's config: resolved ts every 50 ms.
fn server(tmp: &tempfile::TempDir, args: &[&str]) -> TestServer {
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"50ms\"\n").expect("write config");
    let config = config.display().to_string();
    let mut all = vec!["--config", &config];
    all.extend_from_slice(args);
    TestServer::start_in_with(&tmp.path().join("data"), &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_delivers_every_commit_of_a_random_workload_once_and_honestly() {
    let seed = seed();
    println!("model seed {seed} (replay with KVFEED_MODEL_SEED={seed})");
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp, &[]);
    let setup = Setup {
        seed,
        scale: 1,
        nemesis: None,
    };
    tokio::time::timeout(TEST_LIMIT, run(&server, setup))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the test did not finish within {TEST_LIMIT:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feeds_deliver_every_commit_once_and_honestly_while_regions_split_merge_and_move() {
    let seed = seed();
    let nemesis_seed = nemesis::seed(seed);
    let scale = scale();
    println!(
        "model seed {seed}, nemesis seed {nemesis_seed}, scale {scale} (replay with \
         KVFEED_MODEL_SEED={seed} KVFEED_NEMESIS_SEED={nemesis_seed} KVFEED_MODEL_SCALE={scale})"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let stores = STORES.to_string();
    let server = server(&tmp, &["--stores", &stores, "--fault-injection"]);
    let setup = Setup {
        seed,
        scale,
        nemesis: Some(nemesis_seed),
    };
    let limit = TEST_LIMIT * scale as u32;
    tokio::time::timeout(limit, run(&server, setup))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the test did not finish within {limit:?}"));
}

/// How a run is set up.
struct Setup {
    seed: u64,
    /// Writers make `scale` times [`OPS_PER_WRITER`] operations, and
    /// waits for them are as many times longer.
    scale: usize,
    /// With a nemesis of this seed (over [`STORES`] stores) and feed-client
    /// consumers; without, the fixed layout and raw `EventFeed` consumers.
    nemesis: Option<u64>,
}

/// What starting a consumer needs.
struct Consumers {
    feeds: bool,
    channel: Channel,
    cluster: Cluster,
    regions: Vec<RegionInfo>,
    target: watch::Receiver<u64>,
}

impl Consumers {
    /// A consumer of `kv_api` from `checkpoint`, resuming on `reconnect`;
    /// for a feed, raw puts begun after `raw_from` must be delivered.
    async fn start(
        &self,
        name: &'static str,
        kv_api: KvApi,
        (checkpoint, raw_from): (u64, u64),
        reconnect: Option<oneshot::Receiver<()>>,
    ) -> Consumer {
        if self.feeds {
            let mode = match kv_api {
                KvApi::RawKv => KeyMode::Raw,
                _ => KeyMode::Txn,
            };
            // From 0 over the whole key space; from the checkpoint over
            // the written range only, whose ends cut regions.
            let range = if checkpoint == 0 {
                (Vec::new(), Vec::new())
            } else {
                written_range(mode)
            };
            let feed = FeedConsumer {
                name,
                mode,
                checkpoint,
                range,
                raw_from,
            };
            return feed.start(self.cluster.clone(), reconnect, self.target.clone());
        }
        consumer(
            name,
            self.channel.clone(),
            self.cluster.cluster_id(),
            self.regions.clone(),
            kv_api,
            checkpoint,
            reconnect,
            self.target.clone(),
        )
        .await
    }
}

async fn run(server: &TestServer, setup: Setup) {
    let Setup { seed, scale, .. } = setup;
    let ops = OPS_PER_WRITER * scale;
    let writing = FEED_WAIT * scale as u32;
    let channel = server.channel().await;
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let regions = cluster.regions_in_range(b"", b"").await.expect("regions");
    assert_eq!(regions.len(), 2, "{regions:?}");
    let txn = TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("tikv-client connects");
    let raw = RawClient::new(vec![server.pd_endpoint()])
        .await
        .expect("raw client connects");
    let model = Arc::new(Mutex::new(Model::default()));
    let (target_tx, target) = watch::channel(0u64);
    let starter = Consumers {
        feeds: setup.nemesis.is_some(),
        channel: channel.clone(),
        cluster,
        regions,
        target,
    };
    let mut consumers = vec![
        starter.start("txn-from-0", KvApi::TiDb, (0, 0), None).await,
        starter
            .start("raw-from-0", KvApi::RawKv, (0, 0), None)
            .await,
    ];
    // Dropped (stopped and joined) before the caller's server on a
    // failure, so it never outlives the server it changes.
    let nemesis = setup.nemesis.map(|nemesis_seed| {
        let points = split_points(ops);
        Nemesis::start_among(server.status_addr(), nemesis_seed, STORES, points)
    });

    let (done_tx, mut done) = watch::channel(0usize);
    let done_tx = Arc::new(done_tx);
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        let mut writer = Writer {
            id,
            rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
            ops,
            txn: TransactionClient::new(vec![server.pd_endpoint()])
                .await
                .expect("tikv-client connects"),
            raw: raw.clone(),
            by_hand: ByHand::connect(channel.clone()).await,
            model: model.clone(),
            orphaned: None,
        };
        let done_tx = done_tx.clone();
        writers.push(tokio::spawn(async move {
            for seq in 0..ops {
                writer.step(seq).await;
                done_tx.send_modify(|n| *n += 1);
            }
        }));
    }
    let total = WRITERS * ops;
    let wait_done = |done: &mut watch::Receiver<usize>, n: usize| {
        let mut done = done.clone();
        async move {
            tokio::time::timeout(writing, done.wait_for(|d| *d >= n))
                .await
                .expect("the writers progress")
                .map(|_| ())
                .expect("writers alive");
        }
    };

    wait_done(&mut done, total / 3).await;
    let mid = txn.current_timestamp().await.expect("tso").version();
    let mid = (mid, tick());
    let (reconnect_tx, reconnect_rx) = oneshot::channel();
    consumers.push(starter.start("txn-from-mid", KvApi::TiDb, mid, None).await);
    consumers.push(starter.start("raw-from-mid", KvApi::RawKv, mid, None).await);
    let resumed = starter.start("txn-resumed", KvApi::TiDb, (0, 0), Some(reconnect_rx));
    consumers.push(resumed.await);

    if setup.nemesis.is_some() {
        // Half-way, every feed stream is cut, as a lost connection looks:
        // the feeds recover every store's ranges at once, among the
        // region errors.
        wait_done(&mut done, total / 2).await;
        let status = server.status_addr().to_owned();
        let (code, body) = tokio::task::spawn_blocking(move || {
            common::http_get(&status, "/debug/fault/feed?inject=drop_stream")
        })
        .await
        .expect("inject");
        assert_eq!(code, 200, "{body}");
    }
    wait_done(&mut done, 2 * total / 3).await;
    reconnect_tx.send(()).expect("the resuming consumer runs");

    for writer in writers {
        tokio::time::timeout(writing, writer)
            .await
            .expect("writers finish")
            .expect("writer succeeded");
    }

    // The final state, at F: reading resolves any orphan left.
    let f = txn.current_timestamp().await.expect("tso");
    let mut txn_keys: Vec<Vec<u8>> = (0..2 * TXN_KEYS).map(txn_key).collect();
    txn_keys.extend([orphan_key(5), orphan_key(ops / 2)]);
    let mut snapshot = txn.snapshot(f.clone(), optimistic());
    let got: HashMap<Vec<u8>, Vec<u8>> = snapshot
        .batch_get(txn_keys.clone())
        .await
        .expect("final snapshot")
        .map(|pair| (pair.key().clone().into(), pair.value().clone()))
        .collect();
    let txn_final: HashMap<Vec<u8>, Option<Vec<u8>>> = txn_keys
        .iter()
        .map(|k| (k.clone(), got.get(k).cloned()))
        .collect();
    let model = Arc::try_unwrap(model)
        .expect("writers are done")
        .into_inner()
        .expect("model");
    let raw_keys: Vec<Vec<u8>> = (0..WRITERS)
        .flat_map(|w| (0..2 * RAW_KEYS).map(move |i| raw_key(w, i)))
        .collect();
    let raw_got: HashMap<Vec<u8>, Vec<u8>> = raw
        .batch_get(raw_keys.clone())
        .await
        .expect("raw batch get")
        .into_iter()
        .map(|pair| (pair.key().clone().into(), pair.value().clone()))
        .collect();
    let raw_final: HashMap<Vec<u8>, Option<Vec<u8>>> = raw_keys
        .iter()
        .map(|k| (k.clone(), raw_got.get(k).cloned()))
        .collect();
    for (key, value) in &model.raw_final {
        assert_eq!(
            raw_final.get(key),
            Some(&Some(value.clone())),
            "seed {seed}"
        );
    }
    // What the feeds' views are compared with is all there is: a scan of
    // the written ranges (by kvfeed's own client, which follows the
    // regions wherever they are) finds exactly the keys read above.
    for (mode, expected) in [(KeyMode::Txn, &txn_final), (KeyMode::Raw, &raw_final)] {
        let present: BTreeMap<Vec<u8>, Vec<u8>> = expected
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        let scanned = scan_written(&starter.cluster, mode, f.version()).await;
        assert_eq!(scanned, present, "seed {seed}: the final {mode:?} scan");
    }

    // Wait for every consumer's resolved ts to pass F.
    target_tx.send_replace(f.version());
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    let (mut retries, mut lost) = (0, 0);
    for consumer in consumers {
        tokio::time::timeout(FEED_WAIT, consumer.task)
            .await
            .unwrap_or_else(|_| {
                let seen = consumer.seen.lock().expect("seen");
                panic!(
                    "seed {seed}: {} resolved ts stayed below {} (at {}); violations so far: {:?}",
                    seen.name,
                    f.version(),
                    seen.resolved_min(),
                    seen.violations
                )
            })
            .expect("consumer task");
        let seen = consumer.seen.lock().expect("seen");
        let snapshot = if seen.kv_api == KvApi::RawKv as i32 {
            &raw_final
        } else {
            &txn_final
        };
        let rows: usize = seen.subs.iter().map(|s| s.rows.len()).sum();
        summary.push(format!(
            "{} {rows} rows, {} retries, {} streams lost",
            seen.name, seen.retries, seen.lost
        ));
        retries += seen.retries;
        lost += seen.lost;
        failures.extend(check(&seen, &model, snapshot));
    }
    // The nemesis ran until every feed had passed F.
    let changes = nemesis.map(Nemesis::stop);
    let outcomes = model.txns.values().fold([0; 3], |mut n, t| {
        n[match t.outcome {
            Outcome::Committed(_) => 0,
            Outcome::RolledBack => 1,
            Outcome::Unknown => 2,
        }] += 1;
        n
    });
    println!(
        "transactions committed/rolled back/unknown {outcomes:?}, raw puts {}; {}; nemesis {changes:?}",
        model.raw.len(),
        summary.join(", ")
    );
    assert!(
        outcomes[0] > 0 && !model.raw.is_empty(),
        "seed {seed}: an empty workload"
    );
    if let Some(changes) = changes {
        assert!(
            changes.splits > 0
                && changes.merges > 0
                && changes.transfers > 0
                && retries > 0
                && lost > 0,
            "seed {seed}: the nemesis did not reach the feeds: {changes:?}, {retries} retries, \
             {lost} streams lost"
        );
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every pair of `mode` in the written range (as of `ts`, for
/// transactional keys).
async fn scan_written(cluster: &Cluster, mode: KeyMode, ts: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let (start, end) = written_range(mode);
    let mut scanner = cluster.scan_at(mode, &start, &end, None, TimeStamp::new(ts));
    let mut pairs = BTreeMap::new();
    while let Some(page) = scanner.next_page().await.expect("scan") {
        pairs.extend(page.into_iter().map(|pair| (pair.key, pair.value)));
    }
    pairs
}

#[test]
fn ranges_hold_the_keys_they_are_for() {
    for (i, (start, end)) in ranges(KvApi::TiDb).iter().enumerate() {
        for k in (i * TXN_KEYS)..((i + 1) * TXN_KEYS) {
            let key = encode_bytes(&txn_key(k));
            assert!(*start <= key && key < *end, "txn key {k} in range {i}");
        }
    }
    for (i, (start, end)) in ranges(KvApi::RawKv).iter().enumerate() {
        let key = raw_key(3, i);
        assert!(*start <= key && key < *end, "raw key {i} in range {i}");
    }
}

#[test]
fn the_written_range_holds_every_key_written() {
    let inside =
        |(start, end): &(Vec<u8>, Vec<u8>), key: &[u8]| start[..] <= *key && *key < end[..];
    let txn = written_range(KeyMode::Txn);
    for k in 0..2 * TXN_KEYS {
        assert!(inside(&txn, &txn_key(k)), "txn key {k}");
    }
    for seq in [5, 6] {
        assert!(inside(&txn, &orphan_key(seq)), "orphan {seq}");
    }
    let raw = written_range(KeyMode::Raw);
    for i in 0..2 * RAW_KEYS {
        assert!(inside(&raw, &raw_key(WRITERS - 1, i)), "raw key {i}");
    }
}

/// The nemesis's split points fall among the written keys: between any
/// two neighbouring keys, in the space where regions are compared
/// (transactional keys encoded, raw keys as they are), a boundary can be.
#[test]
fn split_points_fall_among_the_written_keys() {
    let points: Vec<Vec<u8>> = split_points(OPS_PER_WRITER)
        .iter()
        .map(|p| encode_bytes(p))
        .collect();
    let txn: Vec<Vec<u8>> = (0..2 * TXN_KEYS)
        .map(|k| encode_bytes(&txn_key(k)))
        .collect();
    let raw: Vec<Vec<u8>> = (0..WRITERS)
        .flat_map(|w| (0..2 * RAW_KEYS).map(move |i| raw_key(w, i)))
        .collect();
    for mut keys in [txn, raw] {
        keys.sort();
        for pair in keys.windows(2) {
            assert!(
                points.iter().any(|p| pair[0] < *p && *p <= pair[1]),
                "no split point between {pair:?}"
            );
        }
    }
}
