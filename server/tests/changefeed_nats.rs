//! Changefeeds into a real NATS JetStream (`nats-server -js`, started by
//! the test): transactions delivered exactly once, in order, whole, while
//! the changefeed is killed (-9) and restarted and while the broker is
//! gone for a few seconds; and the ways a NATS sink is refused — each with
//! an error that names the problem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "brokers/nats.rs"]
mod broker;
mod common;
#[path = "changefeed/support.rs"]
#[allow(dead_code)] // not every helper is used here
mod support;

use std::time::{Duration, Instant};

use broker::NatsServer;
use common::TestServer;
use kvfeed_changefeed::verify::SinkItem;
use kvfeed_client::Cluster;
use kvfeed_client::feed::Row;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{CfProcess, RandomWriter, commit, txn_client};
use tikv_client::TimestampExt;

/// A server with resolved ts every 50 ms (so windows are short).
fn server(tmp: &tempfile::TempDir) -> TestServer {
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"50ms\"\n").expect("write config");
    let config = config.display().to_string();
    TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config])
}

/// `changefeed run` flags for `id` over `prefix`, from ts 0, into `sink`.
fn feed(server: &TestServer, id: &str, sink: &str, prefix: &str, state: &str) -> Vec<String> {
    vec![
        "--pd".into(),
        server.pd_endpoint(),
        "--id".into(),
        id.into(),
        "--sink".into(),
        sink.into(),
        "--prefix".into(),
        prefix.into(),
        "--start-ts".into(),
        "0".into(),
        "--state-dir".into(),
        state.into(),
    ]
}

/// Waits until changefeed `id` in `sink` has a checkpoint of at least `ts`.
async fn wait_checkpoint(sink: &str, id: &str, ts: u64, cf: &mut CfProcess) {
    broker::wait_checkpoint(sink, id, ts, support::CATCH_UP, |give_up| {
        if give_up {
            return cf.all_logs();
        }
        cf.assert_running();
        String::new()
    })
    .await;
}

/// The rows the sink holds up to its checkpoint, and its checkpoint.
async fn sink_rows(sink: &str) -> (Vec<Row>, u64) {
    let (items, checkpoint) = broker::items(sink).await;
    let rows = items
        .into_iter()
        .filter_map(|item| match item {
            SinkItem::Row { row, .. } => Some(row),
            SinkItem::Watermark { .. } => None,
            SinkItem::Problem(problem) => panic!("the stream: {problem}"),
        })
        .collect();
    (rows, checkpoint)
}

async fn assert_verified(server: &TestServer, sink: &str) -> kvfeed_changefeed::verify::Report {
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let report = kvfeed_changefeed::verify::verify(&cluster, sink)
        .await
        .expect("verify reads the stream");
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_changefeed_killed_and_cut_off_from_its_broker_delivers_every_transaction_once() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("seed {seed}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp);
    let mut nats = NatsServer::start(&tmp.path().join("js"));
    let sink = nats.sink("cdc.orders", "?subject-buckets=4");
    let state = tmp.path().join("state").display().to_string();
    let mut cf = CfProcess::start(&feed(&server, "orders", &sink, "o/", &state), tmp.path());

    let writer = RandomWriter::start(&server, seed, "o/", 200, 300).await;

    // Kill -9 and restart the changefeed every 0.5-1.5 s for 8 s; at 3 s
    // the broker goes away for 3 s.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let began = Instant::now();
    let mut kills = 0;
    let mut next_kill = began + Duration::from_millis(rng.random_range(500..1500));
    let mut broker_down = false;
    let mut broker_back = false;
    while began.elapsed() < Duration::from_secs(8) {
        if !broker_down && began.elapsed() >= Duration::from_secs(3) {
            nats.stop();
            broker_down = true;
        }
        if broker_down && !broker_back && began.elapsed() >= Duration::from_secs(6) {
            tokio::task::block_in_place(|| nats.restart());
            broker_back = true;
        }
        if Instant::now() >= next_kill {
            cf.kill_and_restart();
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(500..1500));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed = writer.stop().await;
    let client = txn_client(&server).await;
    let f = client.current_timestamp().await.expect("tso").version();
    wait_checkpoint(&sink, "orders", f, &mut cf).await;
    let logs = cf.all_logs();
    cf.kill();

    let (rows, checkpoint) = sink_rows(&sink).await;
    println!(
        "{} transactions, {} rows, {kills} kills, checkpoint {checkpoint}",
        committed.len(),
        rows.len()
    );
    assert!(kills >= 3 && committed.len() > 20, "too little happened");
    assert!(
        logs.contains("changefeed restarts") && logs.contains("nats://"),
        "the broker's absence was not reported; logs:\n{logs}"
    );
    support::assert_transactions(&rows, &committed, checkpoint);
    assert_verified(&server, &sink).await;
    let (code, out) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "kvfeed verify: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_until_it_appears() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp);
    // A port nothing listens on, until the broker is started on it.
    let mut nats = NatsServer::start(&tmp.path().join("js"));
    let sink = nats.sink("late", "");
    nats.stop();
    let state = tmp.path().join("state").display().to_string();
    let mut cf = CfProcess::start(&feed(&server, "late", &sink, "l/", &state), tmp.path());
    let client = txn_client(&server).await;
    let done = commit(&client, &[(b"l/1".to_vec(), Some(b"one".to_vec()))]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cf.log().contains("changefeed restarts") {
        cf.assert_running();
        assert!(Instant::now() < deadline, "no retry logged:\n{}", cf.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cf.log().contains("connecting"), "{}", cf.log());
    tokio::task::block_in_place(|| nats.restart());
    wait_checkpoint(&sink, "late", done.commit_ts, &mut cf).await;
    cf.kill();
    let (rows, checkpoint) = sink_rows(&sink).await;
    support::assert_transactions(&rows, &[done], checkpoint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_rows_go_key_only_and_verify_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp);
    let nats = NatsServer::start(&tmp.path().join("js"));
    let sink = nats.sink("big", "?max-message-bytes=1024");
    let state = tmp.path().join("state").display().to_string();
    let mut cf = CfProcess::start(&feed(&server, "big", &sink, "b/", &state), tmp.path());
    let client = txn_client(&server).await;
    let done = commit(
        &client,
        &[
            (b"b/big".to_vec(), Some(vec![b'x'; 4096])),
            (b"b/small".to_vec(), Some(b"s".to_vec())),
        ],
    )
    .await;
    wait_checkpoint(&sink, "big", done.commit_ts, &mut cf).await;
    cf.kill();
    let mut omitted = Vec::new();
    for item in broker::items(&sink).await.0 {
        if let SinkItem::Row {
            row, value_omitted, ..
        } = item
        {
            omitted.push((row.key.to_vec(), value_omitted, row.value.len()));
        }
    }
    assert_eq!(
        omitted,
        vec![
            (b"b/big".to_vec(), true, 0),
            (b"b/small".to_vec(), false, 1)
        ]
    );
    let report = assert_verified(&server, &sink).await;
    assert_eq!(report.values_omitted, 1);
    let (code, out) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 rows were larger"), "{out}");
}

/// `kvfeed changefeed run` with `args` exits with status 1 and says `want`.
fn refused(cf: &mut CfProcess, want: &str) {
    let code = cf.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{}", cf.log());
    assert!(
        cf.log().contains(want),
        "expected {want:?} in:\n{}",
        cf.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_nats_sinks_are_refused_naming_the_problem() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = server(&tmp);
    let nats = NatsServer::start(&tmp.path().join("js"));
    let state = |name: &str| tmp.path().join(name).display().to_string();
    let logs = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("log dir");
        dir
    };

    // A changefeed that makes stream S over `first.>`.
    let first = nats.sink("first", "?stream=S");
    let mut a = CfProcess::start(&feed(&server, "a", &first, "m/", &state("a")), &logs("a"));
    let client = txn_client(&server).await;
    let done = commit(&client, &[(b"m/1".to_vec(), Some(b"1".to_vec()))]).await;
    wait_checkpoint(&first, "a", done.commit_ts, &mut a).await;

    // S does not take `second.>`.
    let second = nats.sink("second", "?stream=S");
    let mut b = CfProcess::start(&feed(&server, "b", &second, "m/", &state("b")), &logs("b"));
    refused(&mut b, "does not take the subjects second.>");

    // The same id with another range.
    let mut c = CfProcess::start(&feed(&server, "a", &first, "z/", &state("c")), &logs("c"));
    refused(&mut c, "another definition");

    // The same changefeed started a second time elsewhere: the first one
    // finds its checkpoint moved under it and stops.
    let mut d = CfProcess::start(&feed(&server, "a", &first, "m/", &state("d")), &logs("d"));
    let more = commit(&client, &[(b"m/2".to_vec(), Some(b"2".to_vec()))]).await;
    wait_checkpoint(&first, "a", more.commit_ts, &mut d).await;
    refused(&mut a, "written by another process");
    d.kill();
    assert_verified(&server, &first).await;

    // Flags that contradict the URI.
    let mut args = feed(
        &server,
        "e",
        &nats.sink("e", "?format=debezium"),
        "m/",
        &state("e"),
    );
    args.extend(["--format".to_owned(), "json".to_owned()]);
    let mut e = CfProcess::start(&args, &logs("e"));
    refused(&mut e, "contradicts the sink URI's format=debezium");
}
