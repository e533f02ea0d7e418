//! A `kvfeed changefeed run` process into Kafka — librdkafka's mock
//! cluster, run by the test, on loopback — killed (-9) and restarted while
//! transactions commit: every transaction reaches the topic, in commit
//! order within each key's partition, and `kvfeed verify` reads each once.
//!
//! What this proves and what it does not: the mock shows the rows of
//! aborted transactions to `read_committed` readers (see the sink's module
//! comment), so a window interrupted by a kill appears in the topic again
//! when it is replayed. The test proves at-least-once delivery and that a
//! reader dropping rows not above its partition's last (as `verify` does,
//! counting them) gets each change exactly once. That the replay is hidden
//! from `read_committed` consumers needs Apache Kafka, which is not run here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "changefeed/support.rs"]
#[allow(dead_code)] // not every helper is used here
mod support;

use std::time::{Duration, Instant};

use common::TestServer;
use kvfeed_changefeed::sink::SinkUri;
use kvfeed_changefeed::sink::kafka::KafkaReader;
use kvfeed_changefeed::verify::SinkItem;
use kvfeed_client::Cluster;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use support::{CfProcess, RandomWriter, txn_client};
use tikv_client::TimestampExt;

fn kafka_uri(sink: &str) -> kvfeed_changefeed::sink::KafkaUri {
    match SinkUri::parse(sink).expect("a sink URI") {
        SinkUri::Kafka(uri) => uri,
        other => panic!("not a Kafka URI: {other:?}"),
    }
}

/// The checkpoint the topic's progress records hold (0 before the first).
async fn checkpoint(sink: &str) -> u64 {
    match KafkaReader::open_with_timeout(&kafka_uri(sink), Duration::from_secs(5)).await {
        Ok(reader) => reader.checkpoint().into_inner(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_changefeed_killed_under_writes_delivers_every_transaction() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    println!("seed {seed}");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"50ms\"\n").expect("config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config]);

    let mock: MockCluster<'static, DefaultProducerContext> =
        MockCluster::new(1).expect("a mock cluster");
    mock.create_topic("orders", 3, 1).expect("topic");
    mock.create_topic("orders.kvfeed-progress", 1, 1)
        .expect("progress topic");
    let sink = format!("kafka://{}/orders", mock.bootstrap_servers());
    let args: Vec<String> = vec![
        "--pd".into(),
        server.pd_endpoint(),
        "--id".into(),
        "orders".into(),
        "--sink".into(),
        sink.clone(),
        "--prefix".into(),
        "o/".into(),
        "--start-ts".into(),
        "0".into(),
        "--state-dir".into(),
        tmp.path().join("state").display().to_string(),
    ];
    let mut cf = CfProcess::start(&args, tmp.path());

    let writer = RandomWriter::start(&server, seed, "o/", 100, 0).await;

    let mut rng = StdRng::seed_from_u64(seed ^ 0x4b61_666b);
    let began = Instant::now();
    let mut kills = 0;
    let mut next_kill = began + Duration::from_millis(rng.random_range(700..1500));
    while began.elapsed() < Duration::from_secs(6) {
        if Instant::now() >= next_kill {
            cf.kill_and_restart();
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(700..1500));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let committed = writer.stop().await;
    let f = txn_client(&server)
        .await
        .current_timestamp()
        .await
        .expect("tso")
        .version();
    let deadline = Instant::now() + support::CATCH_UP;
    while checkpoint(&sink).await < f {
        cf.assert_running();
        assert!(
            Instant::now() < deadline,
            "the checkpoint did not pass {f}; logs:\n{}",
            cf.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cf.kill();

    let mut reader = KafkaReader::open_with_timeout(&kafka_uri(&sink), Duration::from_secs(10))
        .await
        .expect("read the topic");
    let upto = reader.checkpoint().into_inner();
    let replayed = reader.replayed();
    let mut rows = Vec::new();
    while let Some(item) = reader.next().await.expect("an item") {
        match item {
            SinkItem::Row { row, .. } => rows.push(row),
            SinkItem::Watermark { .. } => {}
            SinkItem::Problem(problem) => panic!("the topic: {problem}"),
        }
    }
    println!(
        "{} transactions, {} rows, {kills} kills, {replayed} replayed rows dropped",
        committed.len(),
        rows.len()
    );
    assert!(kills >= 3 && committed.len() > 20, "too little happened");
    support::assert_transactions(&rows, &committed, upto);
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("cluster connects");
    let report = kvfeed_changefeed::verify::verify(&cluster, &sink)
        .await
        .expect("verify reads the topic");
    assert!(report.is_clean(), "verify: {:?}", report.problems);
    let (code, out) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "kvfeed verify: {out}");
}
