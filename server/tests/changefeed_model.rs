//! The acceptance test of changefeeds: the model test's seeded workload
//! (`model/workload.rs`: optimistic, pessimistic, rolled-back and orphaned
//! transactions, raw puts) on three stores while a nemesis splits, merges
//! and moves regions, replicated into file sinks by two `kvfeed changefeed
//! run` processes — one transactional over the written transactional
//! range, one `--raw` over the raw range, both from ts 0 — each killed
//! (-9) and restarted every 0.5–2 s (seeded) while the writers run.
//!
//! A third changefeed follows the transactional range into a real NATS
//! JetStream (`nats-server -js`, started by the test), killed on its own
//! schedule like the others.
//!
//! After the workload a final ts F is taken (every write acknowledged),
//! every sink's checkpoint must pass F, and then:
//! - `verify` is clean for every sink;
//! - the transactional sinks (file and NATS) against the model
//!   (`changefeed_model/check.rs`; a NATS "data file" is a window):
//!   every transaction committed at or below the checkpoint is there with
//!   all its mutations (puts with their values, deletes as deletes) at its
//!   commit ts, each `(commit_ts, key)` once; nothing of a rolled-back or
//!   orphaned transaction; a transaction of unknown outcome only whole;
//!   rows sorted by `(commit_ts, start_ts, key)` through the files, each
//!   transaction contiguous and inside one data file;
//! - the raw sink: every acknowledged raw put once, in its writer's order,
//!   each key ending at its last acknowledged put.
//!
//! And the webhook sink end to end, against a flaky receiver in the test
//! (`changefeed_model/receiver.rs`, which documents its de-duplication
//! rules): a changefeed killed and restarted while transactions commit
//! hands the receiver every transaction exactly once, in commit order,
//! whole in every batch; a receiver answering 400 stops the changefeed
//! with status 1 and a message naming the status.
//!
//! Seeds are printed: `KVFEED_MODEL_SEED` replays the writers' and the
//! kills' choices, `KVFEED_NEMESIS_SEED` the nemesis's (default: the model
//! seed); `KVFEED_MODEL_SCALE=N` gives each writer N times the operations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "brokers/nats.rs"]
mod broker;
#[path = "tikv_client/by_hand.rs"]
#[allow(dead_code)] // only the prewrite and the oracle are used here
mod by_hand;
#[path = "changefeed_model/check.rs"]
mod cf_check;
mod common;
#[path = "model/consumer.rs"]
#[allow(dead_code)] // only the logical clock is used here
mod consumer;
#[path = "changefeed_model/receiver.rs"]
mod receiver;
#[path = "changefeed/support.rs"]
#[allow(dead_code)] // not every helper is used here
mod support;
#[path = "model/workload.rs"]
#[allow(dead_code)] // the feed tests' range helpers are not used here
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use by_hand::ByHand;
use common::TestServer;
use common::nemesis::{self, Nemesis};
use kvfeed_changefeed::sink::file::{FileRow, FileSinkReader};
use kvfeed_changefeed::verify::SinkItem;
use kvfeed_client::feed::{Op, Row};
use kvfeed_client::{Cluster, KeyMode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use receiver::Receiver;
use support::{CfProcess, Committed, commit, txn_client};
use tikv_client::{RawClient, TimestampExt, TransactionClient};
use workload::{
    Model, OPS_PER_WRITER, Outcome, TXN_KEYS, WRITERS, Writer, optimistic, orphan_key,
    split_points, txn_key, written_range,
};

/// Bound on the writers (at scale 1); `model/consumer.rs` names it too.
const FEED_WAIT: Duration = Duration::from_secs(30);
/// Stores the nemesis moves leaders between.
const STORES: u32 = 3;
/// Each writer makes this many times the model test's operations (times
/// the scale): a few seconds of writes under which each changefeed is
/// killed several times.
const OPS_FACTOR: usize = 4;
/// Least and most time between two kills of one changefeed.
const KILL_EVERY_MS: std::ops::Range<u64> = 500..2000;

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
/// writer makes (1 in CI).
fn scale() -> usize {
    match std::env::var("KVFEED_MODEL_SCALE") {
        Ok(text) => text.parse().expect("KVFEED_MODEL_SCALE is a count"),
        Err(_) => 1,
    }
    .max(1)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server in `tmp` with resolved ts every 50 ms (so windows are short).
fn server(tmp: &tempfile::TempDir, args: &[&str]) -> TestServer {
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"50ms\"\n").expect("write config");
    let config = config.display().to_string();
    let mut all = vec!["--config", &config];
    all.extend_from_slice(args);
    TestServer::start_in_with(&tmp.path().join("data"), &all)
}

/// `changefeed run` flags for `id` over the range written in `mode`, from
/// ts 0, into a file sink at `out`.
fn file_feed(
    server: &TestServer,
    id: &str,
    mode: KeyMode,
    out: &Path,
    state: &Path,
) -> Vec<String> {
    let (from, to) = written_range(mode);
    let mut args: Vec<String> = vec![
        "--pd".into(),
        server.pd_endpoint(),
        "--id".into(),
        id.into(),
        "--sink".into(),
        format!("file://{}", out.display()),
        "--hex".into(),
        "--from-key".into(),
        hex(&from),
        "--to-key".into(),
        hex(&to),
        "--start-ts".into(),
        "0".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    if mode == KeyMode::Raw {
        args.push("--raw".into());
    }
    args
}

/// Every row of the NATS sink up to its checkpoint, in stream order, as
/// file rows whose "file" is the window (the watermarks before it).
async fn nats_rows(sink: &str) -> Vec<FileRow> {
    let (items, _) = broker::items(sink).await;
    let (mut rows, mut window) = (Vec::new(), 0u64);
    for item in items {
        match item {
            SinkItem::Watermark { .. } => window += 1,
            SinkItem::Problem(problem) => panic!("the NATS stream: {problem}"),
            SinkItem::Row { row, place, .. } => rows.push(FileRow {
                file: format!("window {window}"),
                line: place
                    .rsplit(' ')
                    .next()
                    .and_then(|seq| seq.parse().ok())
                    .unwrap_or(0),
                row,
            }),
        }
    }
    rows
}

/// Every row of the file sink at `dir` up to its checkpoint, in sink order.
fn file_rows(dir: &Path) -> Vec<FileRow> {
    let reader = FileSinkReader::open(dir).expect("open the sink");
    reader.rows().map(|item| item.expect("a row")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changefeeds_killed_under_a_nemesis_deliver_the_model_workload_exactly_once() {
    let seed = seed();
    let nemesis_seed = nemesis::seed(seed);
    let scale = scale();
    println!(
        "model seed {seed}, nemesis seed {nemesis_seed}, scale {scale} (replay with \
         KVFEED_MODEL_SEED={seed} KVFEED_NEMESIS_SEED={nemesis_seed} KVFEED_MODEL_SCALE={scale})"
    );
    let began = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp, &["--stores", &STORES.to_string()]);
    let ops = OPS_PER_WRITER * OPS_FACTOR * scale;
    let writing = FEED_WAIT * (OPS_FACTOR * scale) as u32;
    let channel = server.channel().await;
    let txn = TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("tikv-client connects");
    let raw = RawClient::new(vec![server.pd_endpoint()])
        .await
        .expect("raw client connects");

    let (txn_out, raw_out) = (tmp.path().join("txn-sink"), tmp.path().join("raw-sink"));
    let nats = broker::NatsServer::start(&tmp.path().join("js"));
    let nats_sink = nats.sink("model.txn", "");
    let mut nats_args = file_feed(
        &server,
        "model-nats",
        KeyMode::Txn,
        &txn_out,
        &tmp.path().join("nats-state"),
    );
    nats_args[5] = nats_sink.clone();
    for logs in ["txn-logs", "raw-logs", "nats-logs"] {
        std::fs::create_dir(tmp.path().join(logs)).expect("a log directory");
    }
    let mut feeds = [
        CfProcess::start(
            &file_feed(
                &server,
                "model-txn",
                KeyMode::Txn,
                &txn_out,
                &tmp.path().join("txn-state"),
            ),
            &tmp.path().join("txn-logs"),
        ),
        CfProcess::start(
            &file_feed(
                &server,
                "model-raw",
                KeyMode::Raw,
                &raw_out,
                &tmp.path().join("raw-state"),
            ),
            &tmp.path().join("raw-logs"),
        ),
        CfProcess::start(&nats_args, &tmp.path().join("nats-logs")),
    ];
    // Dropped (stopped and joined) before the server on a failure.
    let nemesis = Nemesis::start_among(
        server.status_addr(),
        nemesis_seed,
        STORES,
        split_points(ops),
    );

    let model = Arc::new(Mutex::new(Model::default()));
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
        writers.push(tokio::spawn(async move {
            for seq in 0..ops {
                writer.step(seq).await;
            }
        }));
    }

    // Each changefeed is killed and restarted on its own seeded schedule
    // while the writers run.
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0ff_ee00);
    let mut next =
        [0; 3].map(|_| Instant::now() + Duration::from_millis(rng.random_range(KILL_EVERY_MS)));
    let mut kills = [0u32; 3];
    let deadline = Instant::now() + writing;
    while !writers.iter().all(|w| w.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the writers did not finish within {writing:?}"
        );
        for (i, feed) in feeds.iter_mut().enumerate() {
            if Instant::now() >= next[i] {
                feed.kill_and_restart();
                kills[i] += 1;
                next[i] = Instant::now() + Duration::from_millis(rng.random_range(KILL_EVERY_MS));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for writer in writers {
        writer.await.expect("writer succeeded");
    }
    let wrote = began.elapsed();

    // The final ts, after every write was acknowledged. Reading the keys
    // at F resolves whatever lock is left (an orphan, a failed commit's),
    // so the feeds' resolved ts can pass it.
    let f = txn.current_timestamp().await.expect("tso");
    let mut keys: Vec<Vec<u8>> = (0..2 * TXN_KEYS).map(txn_key).collect();
    keys.extend([orphan_key(5), orphan_key(ops / 2)]);
    let mut snapshot = txn.snapshot(f.clone(), optimistic());
    snapshot
        .batch_get(keys)
        .await
        .expect("the final snapshot")
        .count();
    let f = f.version();
    tokio::task::block_in_place(|| {
        support::wait_checkpoint(&txn_out, f, &mut feeds[0]);
        support::wait_checkpoint(&raw_out, f, &mut feeds[1]);
    });
    let nats_feed = &mut feeds[2];
    let nats_checkpoint =
        broker::wait_checkpoint(&nats_sink, "model-nats", f, support::CATCH_UP, |give_up| {
            if give_up {
                return nats_feed.log();
            }
            nats_feed.assert_running();
            String::new()
        })
        .await;
    let caught_up = began.elapsed();
    for feed in &mut feeds {
        feed.kill();
    }
    let changes = nemesis.stop();

    let model = Arc::try_unwrap(model)
        .expect("writers are done")
        .into_inner()
        .expect("model");
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    let sinks = [
        ("txn", format!("file://{}", txn_out.display())),
        ("raw", format!("file://{}", raw_out.display())),
        ("nats", nats_sink.clone()),
    ];
    for (name, uri) in sinks {
        let report = kvfeed_changefeed::verify::verify(&cluster, &uri)
            .await
            .expect("verify reads the sink");
        summary.push(format!(
            "{name}: {} rows, {} transactions, {} keys compared",
            report.rows, report.transactions, report.keys_compared
        ));
        failures.extend(
            report
                .problems
                .iter()
                .map(|p| format!("verify {name}: {p}")),
        );
        if report.problem_count > report.problems.len() as u64 {
            failures.push(format!(
                "verify {name}: {} problems in all",
                report.problem_count
            ));
        }
    }
    let checkpoint = support::checkpoint(&txn_out);
    let txn_rows = file_rows(&txn_out);
    failures.extend(
        cf_check::check_txn(&txn_rows, &model, checkpoint)
            .into_iter()
            .map(|b| format!("txn sink: {b}")),
    );
    failures.extend(
        cf_check::check_txn(&nats_rows(&nats_sink).await, &model, nats_checkpoint)
            .into_iter()
            .map(|b| format!("NATS sink: {b}")),
    );
    let raw_rows = file_rows(&raw_out);
    failures.extend(
        cf_check::check_raw(&raw_rows, &model)
            .into_iter()
            .map(|b| format!("raw sink: {b}")),
    );

    let outcomes = model.txns.values().fold([0; 3], |mut n, t| {
        n[match t.outcome {
            Outcome::Committed(_) => 0,
            Outcome::RolledBack => 1,
            Outcome::Unknown => 2,
        }] += 1;
        n
    });
    println!(
        "transactions committed/rolled back/unknown {outcomes:?}, raw puts {}; kills txn/raw/nats \
         {kills:?}; {}; nemesis {changes:?}; writes took {wrote:?}, caught up at {caught_up:?}",
        model.raw.len(),
        summary.join(", ")
    );
    assert!(
        outcomes[0] > 0 && !model.raw.is_empty(),
        "seed {seed}: an empty workload"
    );
    assert!(
        kills.iter().all(|&k| k > 0) && changes.splits > 0 && changes.transfers > 0,
        "seed {seed}: nothing disturbed the changefeeds: kills {kills:?}, nemesis {changes:?}"
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `changefeed run` flags for `id` over `wh/`, from ts 0, into `sink`.
fn hook_feed(server: &TestServer, id: &str, sink: &str, state: &Path) -> Vec<String> {
    vec![
        "--pd".into(),
        server.pd_endpoint(),
        "--id".into(),
        id.into(),
        "--sink".into(),
        sink.into(),
        "--prefix".into(),
        "wh/".into(),
        "--start-ts".into(),
        "0".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ]
}

/// The webhook sink's checkpoint in `state`, 0 while it has none.
fn hook_checkpoint(state: &Path) -> u64 {
    std::fs::read(state.join(kvfeed_changefeed::sink::webhook::CHECKPOINT_FILE))
        .ok()
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
        .and_then(|json| json["checkpoint_ts"].as_u64())
        .unwrap_or(0)
}

type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Rows in order, as transactions: `(commit_ts, start_ts)` and writes.
fn transactions(rows: &[Row]) -> Vec<((u64, u64), Writes)> {
    let mut txns: Vec<((u64, u64), Writes)> = Vec::new();
    for row in rows {
        let id = (row.commit_ts.into_inner(), row.start_ts.into_inner());
        let value = (row.op == Op::Put).then(|| row.value.to_vec());
        match txns.last_mut() {
            Some((last, writes)) if *last == id => {
                writes.insert(row.key.to_vec(), value);
            }
            _ => txns.push((id, BTreeMap::from([(row.key.to_vec(), value)]))),
        }
    }
    txns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_webhook_receives_every_transaction_once_in_order_across_kills() {
    let seed = seed();
    println!("seed {seed} (replay with KVFEED_MODEL_SEED={seed})");
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp, &[]);
    let state = tmp.path().join("state");
    let hook = Receiver::start(seed, false);
    let mut cf = CfProcess::start(&hook_feed(&server, "hook", &hook.url(), &state), tmp.path());

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = txn_client(&server).await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x00f0_0d00);
            let mut committed: Vec<Committed> = Vec::new();
            for t in 0.. {
                if t >= 100 && stop.load(Ordering::Acquire) {
                    break;
                }
                let n = rng.random_range(1..=4);
                let writes: BTreeMap<_, _> = (0..n)
                    .map(|_| {
                        let k = format!("wh/{:03}", rng.random_range(0..40)).into_bytes();
                        let v = (rng.random_range(0..5) > 0).then(|| format!("t{t}").into_bytes());
                        (k, v)
                    })
                    .collect();
                let writes: Vec<_> = writes.into_iter().collect();
                committed.push(commit(&client, &writes).await);
                if t % 3 == 0 {
                    // Windows between transactions.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            committed
        })
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0xdead_beef);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        cf.kill_and_restart();
    }
    stop.store(true, Ordering::Release);
    let committed = tokio::time::timeout(FEED_WAIT, writer)
        .await
        .expect("the writer finishes")
        .expect("writer");
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let last = cluster.tso().await.expect("tso").into_inner();
    let deadline = Instant::now() + support::CATCH_UP;
    while hook_checkpoint(&state) < last {
        cf.assert_running();
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the checkpoint {} did not reach {last}; log:\n{}",
            hook_checkpoint(&state),
            cf.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cf.kill();
    let checkpoint = hook_checkpoint(&state);

    let got = std::mem::take(&mut *hook.received.lock().expect("received"));
    drop(hook);
    println!(
        "{} transactions committed; receiver: {} batches, {} applied transactions, {} repeated \
         keys, {} replayed transactions, answers {:?}, {} hung up, {} late, {} watermarks",
        committed.len(),
        got.batches.len(),
        got.applied_txns,
        got.repeats,
        got.replayed,
        got.statuses,
        got.hung_up,
        got.late,
        got.resolved.len()
    );
    assert!(got.errors.is_empty(), "seed {seed}: {:#?}", got.errors);
    let by_ts: HashMap<u64, &Writes> = committed.iter().map(|c| (c.commit_ts, &c.writes)).collect();
    // Whole transactions in every batch, repeats included.
    for batch in &got.batches {
        for ((commit_ts, _), writes) in transactions(&batch.rows) {
            assert_eq!(
                by_ts.get(&commit_ts),
                Some(&&writes),
                "seed {seed}: batch {} holds the transaction at {commit_ts} in part or one \
                 never committed",
                batch.key
            );
        }
    }
    // Applied: every committed transaction once, in commit order.
    let mut want: Vec<(u64, &Writes)> = committed
        .iter()
        .filter(|c| c.commit_ts <= checkpoint)
        .map(|c| (c.commit_ts, &c.writes))
        .collect();
    want.sort_by_key(|(ts, _)| *ts);
    assert_eq!(
        want.len(),
        committed.len(),
        "seed {seed}: the checkpoint is below a commit"
    );
    let applied = transactions(&got.applied);
    let applied_ts: Vec<u64> = applied.iter().map(|((ts, _), _)| *ts).collect();
    let want_ts: Vec<u64> = want.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(
        applied_ts, want_ts,
        "seed {seed}: the applied transactions differ"
    );
    for (((ts, _), writes), (_, expected)) in applied.iter().zip(&want) {
        assert_eq!(writes, *expected, "seed {seed}: the transaction at {ts}");
    }
    for pair in got.applied.windows(2) {
        let id = |r: &Row| (r.commit_ts, r.start_ts, r.key.clone());
        assert!(
            id(&pair[0]) < id(&pair[1]),
            "seed {seed}: rows out of order: {pair:?}"
        );
    }
    // A watermark came only once everything at or below it was applied.
    for (to, applied_then) in &got.resolved {
        let due = want.iter().filter(|(ts, _)| ts <= to).count();
        assert!(
            due <= *applied_then,
            "seed {seed}: a watermark at {to} with {applied_then} of its {due} transactions applied"
        );
    }
    assert!(
        got.statuses.get(&500).is_some_and(|&n| n > 0),
        "seed {seed}: the receiver was never flaky"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_400_stops_the_changefeed_with_status_1() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let hook = Receiver::start(1, true);
    let client = txn_client(&server).await;
    commit(&client, &[(b"wh/1".to_vec(), Some(b"v".to_vec()))]).await;
    let mut args = vec!["changefeed".to_owned(), "run".to_owned()];
    args.extend(hook_feed(
        &server,
        "refused",
        &hook.url(),
        &tmp.path().join("state"),
    ));
    let exited = tokio::task::block_in_place(|| common::run_to_exit(&args));
    assert_eq!(exited.status.code(), Some(1), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("HTTP 400"),
        "no status in:\n{}",
        exited.stderr
    );
    assert!(hook.received.lock().expect("received").statuses[&400] > 0);
}
