//! The acceptance test of the feed guarantee: a seeded, randomized,
//! concurrent workload through the official `tikv-client`, watched by
//! several `cdcpb.ChangeData` consumers, checked against a model.
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
//! # What is asserted
//!
//! Per subscription (one region on one stream):
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
//!   later checkpoint, for every key it received a row of.
//!
//! The seed is printed; `KVFEED_MODEL_SEED` replays a run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "tikv_client/by_hand.rs"]
#[allow(dead_code)] // only the prewrite and the oracle are used here
mod by_hand;
mod common;
#[path = "model/consumer.rs"]
mod consumer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use by_hand::ByHand;
use common::TestServer;
use consumer::{Got, Seen, consumer, ranges, tick};
use kvfeed_client::Cluster;
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use kvfeed_storage::mvcc::encode_bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tikv_client::{
    CheckLevel, RawClient, TimestampExt, Transaction, TransactionClient, TransactionOptions,
};
use tokio::sync::{oneshot, watch};

const WRITERS: usize = 6;
const OPS_PER_WRITER: usize = 80;
/// Transactional keys per region.
const TXN_KEYS: usize = 5;
/// Raw keys per writer per region.
const RAW_KEYS: usize = 2;
/// Short, so readers resolve an orphan soon after it is left.
const ORPHAN_TTL_MS: u64 = 100;
/// Bound on the whole test.
const TEST_LIMIT: Duration = Duration::from_secs(90);
/// Bound on one wait for the feed.
const FEED_WAIT: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    match std::env::var("KVFEED_MODEL_SEED") {
        Ok(text) => text.parse().expect("KVFEED_MODEL_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// A transactional key: `i` below `TXN_KEYS` in the low region, the rest
/// in the high one (eight `0xFF` bytes first encode above the boundary).
fn txn_key(i: usize) -> Vec<u8> {
    let mut key = if i < TXN_KEYS { vec![] } else { vec![0xFF; 8] };
    key.extend_from_slice(format!("m/{i}").as_bytes());
    key
}

/// The key of the orphan left at step `seq`: odd steps in the high region.
fn orphan_key(seq: usize) -> Vec<u8> {
    let mut key = if seq % 2 == 1 { vec![0xFF; 8] } else { vec![] };
    key.extend_from_slice(format!("m/o{seq}").as_bytes());
    key
}

/// A raw key of `writer`: low region for even `i`, high for odd (raw keys
/// are compared as they are; ten `0xFF` bytes sort above the boundary).
fn raw_key(writer: usize, i: usize) -> Vec<u8> {
    let mut key = if i.is_multiple_of(2) {
        vec![]
    } else {
        vec![0xFF; 10]
    };
    key.extend_from_slice(format!("r/{writer}/{i}").as_bytes());
    key
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Committed(u64),
    RolledBack,
    Unknown,
}

#[derive(Debug, Clone)]
struct Txn {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    outcome: Outcome,
}

/// What the writers did.
#[derive(Debug, Default)]
struct Model {
    txns: HashMap<u64, Txn>,
    /// value → (key, logical instant before the put was sent).
    raw: HashMap<Vec<u8>, (Vec<u8>, u64)>,
    /// Last acknowledged raw value per key.
    raw_final: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn optimistic() -> TransactionOptions {
    TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn)
}

fn pessimistic() -> TransactionOptions {
    TransactionOptions::new_pessimistic().drop_check(CheckLevel::Warn)
}

struct Writer {
    id: usize,
    rng: StdRng,
    txn: TransactionClient,
    raw: RawClient,
    by_hand: ByHand,
    model: Arc<Mutex<Model>>,
    /// An orphan's key and the step that left it, until a reader resolves it.
    orphaned: Option<(Vec<u8>, usize)>,
}

impl Writer {
    fn value(&self, seq: usize, key: usize) -> Vec<u8> {
        format!("w{}s{seq}k{key}", self.id).into_bytes()
    }

    fn record(&self, start_ts: u64, txn: Txn) {
        self.model.lock().expect("model").txns.insert(start_ts, txn);
    }

    fn pick_keys(&mut self, max: usize) -> Vec<usize> {
        let n = 1 + self.rng.random_range(0..max);
        let mut keys: Vec<usize> = (0..n)
            .map(|_| self.rng.random_range(0..2 * TXN_KEYS))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    async fn step(&mut self, seq: usize) {
        let roll = self.rng.random_range(0..100);
        if self.id == 0 && (seq == 5 || seq == OPS_PER_WRITER / 2) {
            return self.orphan(seq).await;
        }
        if let Some((key, left)) = self.orphaned.take_if(|(_, left)| seq >= *left + 3) {
            // A reader meets the lock, waits out its TTL and rolls it back.
            let mut reader = self
                .txn
                .begin_with_options(optimistic())
                .await
                .expect("begin");
            let value = reader
                .get(key.clone())
                .await
                .expect("read resolves the orphan");
            reader.rollback().await.expect("end the reader");
            assert_eq!(
                value, None,
                "the orphan left at step {left} was rolled back"
            );
        }
        match roll {
            0..35 => self.optimistic(seq).await,
            35..55 => self.pessimistic(seq).await,
            55..65 => self.rollback(seq).await,
            _ => self.raw_put(seq).await,
        }
    }

    async fn optimistic(&mut self, seq: usize) {
        let keys = self.pick_keys(3);
        let mut txn = self
            .txn
            .begin_with_options(optimistic())
            .await
            .expect("begin");
        let start_ts = txn.start_timestamp().version();
        let mut writes = Vec::new();
        for k in keys {
            let key = txn_key(k);
            if self.rng.random_range(0..100) < 15 {
                txn.delete(key.clone()).await.expect("buffered delete");
                writes.push((key, None));
            } else {
                let value = self.value(seq, k);
                txn.put(key.clone(), value.clone())
                    .await
                    .expect("buffered put");
                writes.push((key, Some(value)));
            }
        }
        let outcome = commit_or_roll_back(&mut txn).await;
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn pessimistic(&mut self, seq: usize) {
        let keys = self.pick_keys(2);
        let mut txn = self
            .txn
            .begin_with_options(pessimistic())
            .await
            .expect("begin");
        let start_ts = txn.start_timestamp().version();
        let mut writes = Vec::new();
        let mut failed = false;
        for k in keys {
            let (key, value) = (txn_key(k), self.value(seq, k));
            if txn.put(key.clone(), value.clone()).await.is_err() {
                failed = true;
                break;
            }
            writes.push((key, Some(value)));
        }
        let outcome = if failed {
            let _ = txn.rollback().await;
            Outcome::Unknown
        } else {
            commit_or_roll_back(&mut txn).await
        };
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn rollback(&mut self, seq: usize) {
        let k = self.rng.random_range(0..2 * TXN_KEYS);
        let mut txn = self
            .txn
            .begin_with_options(pessimistic())
            .await
            .expect("begin");
        let start_ts = txn.start_timestamp().version();
        let (key, value) = (txn_key(k), self.value(seq, k));
        // A failed lock is fine: either way nothing may be delivered.
        let _ = txn.put(key.clone(), value.clone()).await;
        txn.rollback().await.expect("rollback");
        let writes = vec![(key, Some(value))];
        let outcome = Outcome::RolledBack;
        self.record(start_ts, Txn { writes, outcome });
    }

    async fn orphan(&mut self, seq: usize) {
        // A key of its own: a prewrite by hand does not wait for locks.
        let key = orphan_key(seq);
        let value = self.value(seq, 0);
        let start_ts = self.by_hand.timestamp().await;
        // Recorded first: the lock is visible as soon as it is taken.
        let writes = vec![(key.clone(), Some(value.clone()))];
        let outcome = Outcome::RolledBack;
        self.record(start_ts, Txn { writes, outcome });
        self.by_hand
            .prewrite(&key, &value, &key, start_ts, ORPHAN_TTL_MS)
            .await;
        self.orphaned = Some((key, seq));
    }

    async fn raw_put(&mut self, seq: usize) {
        let i = self.rng.random_range(0..2 * RAW_KEYS);
        let (key, value) = (raw_key(self.id, i), self.value(seq, 100 + i));
        let begun = tick();
        self.model
            .lock()
            .expect("model")
            .raw
            .insert(value.clone(), (key.clone(), begun));
        self.raw
            .put(key.clone(), value.clone())
            .await
            .expect("raw put");
        self.model
            .lock()
            .expect("model")
            .raw_final
            .insert(key, value);
    }
}

/// Checks one consumer against the model and the final snapshot.
fn check(seen: &Seen, model: &Model, snapshot: &HashMap<Vec<u8>, Option<Vec<u8>>>) -> Vec<String> {
    let mut bad = seen.violations.clone();
    let raw = seen.kv_api == KvApi::RawKv as i32;
    let all: Vec<&Got> = seen.subs.iter().flat_map(|s| s.rows.iter()).collect();
    let delivered: HashSet<(Vec<u8>, u64)> =
        all.iter().map(|g| (g.key.clone(), g.commit_ts)).collect();
    // Every delivered row was written and not rolled back.
    for got in &all {
        if raw {
            let known = got
                .value
                .as_ref()
                .and_then(|v| model.raw.get(v))
                .is_some_and(|(key, _)| *key == got.key);
            if !known {
                bad.push(format!("raw row not written: {got:?}"));
            }
            continue;
        }
        let Some(txn) = model.txns.get(&got.start_ts) else {
            bad.push(format!("row of an unknown transaction: {got:?}"));
            continue;
        };
        match txn.outcome {
            Outcome::RolledBack => bad.push(format!("row of a rolled-back transaction: {got:?}")),
            Outcome::Committed(ts) if ts != got.commit_ts => {
                bad.push(format!("row with commit_ts other than {ts}: {got:?}"));
            }
            _ => {}
        }
        if !txn.writes.contains(&(got.key.clone(), got.value.clone())) {
            bad.push(format!(
                "row not among the mutations {:?}: {got:?}",
                txn.writes
            ));
        }
    }
    // Every commit after the checkpoint was delivered.
    if raw {
        let initialized = seen.subs[..2]
            .iter()
            .filter_map(|s| s.initialized_at)
            .max()
            .unwrap_or(u64::MAX);
        let values: HashSet<&Vec<u8>> = all.iter().filter_map(|g| g.value.as_ref()).collect();
        for (value, (key, begun)) in &model.raw {
            if (seen.checkpoint == 0 || *begun > initialized) && !values.contains(value) {
                bad.push(format!("raw put {key:?} = {value:?} not delivered"));
            }
        }
    } else {
        for (start_ts, txn) in &model.txns {
            if let Outcome::Committed(ts) = txn.outcome
                && ts > seen.checkpoint
            {
                for (key, _) in &txn.writes {
                    if !delivered.contains(&(key.clone(), ts)) {
                        bad.push(format!("commit {start_ts}->{ts} of {key:?} not delivered"));
                    }
                }
            }
        }
    }
    // The final view matches the snapshot.
    let mut view: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)> = HashMap::new();
    for got in &all {
        let entry = view.entry(got.key.clone()).or_insert((0, None));
        if got.commit_ts >= entry.0 {
            *entry = (got.commit_ts, got.value.clone());
        }
    }
    for (key, expected) in snapshot {
        match view.get(key) {
            Some((_, value)) if value != expected => bad.push(format!(
                "final view of {key:?} is {value:?}, the store has {expected:?}"
            )),
            None if seen.checkpoint == 0 && expected.is_some() => {
                bad.push(format!("final view lacks {key:?} = {expected:?}"));
            }
            _ => {}
        }
    }
    bad.into_iter()
        .map(|b| format!("{}: {b}", seen.name))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_delivers_every_commit_of_a_random_workload_once_and_honestly() {
    let seed = seed();
    println!("model seed {seed} (replay with KVFEED_MODEL_SEED={seed})");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"50ms\"\n").expect("write config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config]);
    tokio::time::timeout(TEST_LIMIT, run(&server, seed))
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the test did not finish within {TEST_LIMIT:?}"));
}

async fn run(server: &TestServer, seed: u64) {
    let channel = server.channel().await;
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let regions = cluster.regions_in_range(b"", b"").await.expect("regions");
    assert_eq!(regions.len(), 2, "{regions:?}");
    let cluster_id = server.cluster_id();
    let txn = TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("tikv-client connects");
    let raw = RawClient::new(vec![server.pd_endpoint()])
        .await
        .expect("raw client connects");
    let model = Arc::new(Mutex::new(Model::default()));
    let (target_tx, target) = watch::channel(0u64);

    let start = |name: &'static str, kv_api, checkpoint, reconnect| {
        consumer(
            name,
            channel.clone(),
            cluster_id,
            regions.clone(),
            kv_api,
            checkpoint,
            reconnect,
            target.clone(),
        )
    };
    let mut consumers = vec![
        start("txn-from-0", KvApi::TiDb, 0, None).await,
        start("raw-from-0", KvApi::RawKv, 0, None).await,
    ];

    let (done_tx, mut done) = watch::channel(0usize);
    let done_tx = Arc::new(done_tx);
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        let mut writer = Writer {
            id,
            rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
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
            for seq in 0..OPS_PER_WRITER {
                writer.step(seq).await;
                done_tx.send_modify(|n| *n += 1);
            }
        }));
    }
    let total = WRITERS * OPS_PER_WRITER;
    let wait_done = |done: &mut watch::Receiver<usize>, n: usize| {
        let mut done = done.clone();
        async move {
            tokio::time::timeout(FEED_WAIT, done.wait_for(|d| *d >= n))
                .await
                .expect("the writers progress")
                .map(|_| ())
                .expect("writers alive");
        }
    };

    wait_done(&mut done, total / 3).await;
    let mid = txn.current_timestamp().await.expect("tso").version();
    let (reconnect_tx, reconnect_rx) = oneshot::channel();
    consumers.push(start("txn-from-mid", KvApi::TiDb, mid, None).await);
    consumers.push(start("raw-from-mid", KvApi::RawKv, mid, None).await);
    consumers.push(start("txn-resumed", KvApi::TiDb, 0, Some(reconnect_rx)).await);

    wait_done(&mut done, 2 * total / 3).await;
    reconnect_tx.send(()).expect("the resuming consumer runs");

    for writer in writers {
        tokio::time::timeout(FEED_WAIT, writer)
            .await
            .expect("writers finish")
            .expect("writer succeeded");
    }

    // The final state, at F: reading resolves any orphan left.
    let f = txn.current_timestamp().await.expect("tso");
    let mut txn_keys: Vec<Vec<u8>> = (0..2 * TXN_KEYS).map(txn_key).collect();
    txn_keys.extend([orphan_key(5), orphan_key(OPS_PER_WRITER / 2)]);
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

    // Wait for every consumer's resolved ts to pass F.
    target_tx.send_replace(f.version());
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for consumer in consumers {
        tokio::time::timeout(FEED_WAIT, consumer.task)
            .await
            .unwrap_or_else(|_| {
                let seen = consumer.seen.lock().expect("seen");
                panic!(
                    "seed {seed}: {} resolved ts stayed below {} (at {})",
                    seen.name,
                    f.version(),
                    seen.resolved_min()
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
        summary.push(format!("{} {rows} rows", seen.name));
        failures.extend(check(&seen, &model, snapshot));
    }
    let outcomes = model.txns.values().fold([0; 3], |mut n, t| {
        n[match t.outcome {
            Outcome::Committed(_) => 0,
            Outcome::RolledBack => 1,
            Outcome::Unknown => 2,
        }] += 1;
        n
    });
    println!(
        "transactions committed/rolled back/unknown {outcomes:?}, raw puts {}; {}",
        model.raw.len(),
        summary.join(", ")
    );
    assert!(
        outcomes[0] > 0 && !model.raw.is_empty(),
        "seed {seed}: an empty workload"
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
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

/// Commits `txn`; if that fails or commits nothing, rolls it back. A failed
/// commit may still have committed (the primary may have landed), so the
/// outcome is then unknown rather than rolled back.
async fn commit_or_roll_back(txn: &mut Transaction) -> Outcome {
    match txn.commit().await {
        Ok(Some(ts)) => Outcome::Committed(ts.version()),
        Ok(None) | Err(_) => {
            let _ = txn.rollback().await;
            Outcome::Unknown
        }
    }
}
