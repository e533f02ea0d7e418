//! Automatic split and merge (`[coprocessor]`, `[raftstore]`, `[schedule]`)
//! with tiny thresholds, under a feed consumer: writes make regions split
//! on their own, deletes and GC make them merge back, and the consumer
//! (`kvfeed_client::feed`) sees every committed row exactly once through
//! it all. Every wait is on a condition with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "feed_client/consumer.rs"]
mod consumer;

use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use consumer::{Commit, wait_for};
use kvfeed_client::Cluster;
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{RequestHeader, UpdateGcSafePointRequest};
use kvfeed_storage::mvcc::encode_bytes;

/// Keys written by each of the two writers.
const KEYS: u32 = 60;

/// A server that splits regions at 20 versions (once one holds 30),
/// checks every 50 ms, and merges neighbours of at most 5 versions right
/// away.
fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(
        &config,
        r#"
[cdc]
min-ts-interval = "50ms"
[coprocessor]
region-split-size = "1MB"
region-split-keys = 20
region-max-keys = 30
[raftstore]
split-region-check-tick-interval = "50ms"
[schedule]
max-merge-region-size = "64KB"
max-merge-region-keys = 5
split-merge-interval = "0s"
"#,
    )
    .expect("write config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config]);
    (tmp, server)
}

/// The layout as `/debug/regions` shows it: (start, end) in hex, and the
/// split and merge counts.
#[derive(Debug)]
struct Layout {
    ranges: Vec<(String, String)>,
    splits: u64,
    merges: u64,
}

async fn layout(server: &TestServer) -> Layout {
    let status = server.status_addr().to_owned();
    let (code, body) =
        tokio::task::spawn_blocking(move || common::http_get(&status, "/debug/regions"))
            .await
            .expect("/debug/regions");
    assert_eq!(code, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let text = |v: &serde_json::Value| v.as_str().expect("a hex key").to_owned();
    Layout {
        ranges: view["regions"]
            .as_array()
            .expect("regions")
            .iter()
            .map(|r| (text(&r["start_key"]), text(&r["end_key"])))
            .collect(),
        splits: view["splits"].as_u64().expect("splits"),
        merges: view["merges"].as_u64().expect("merges"),
    }
}

/// Waits until the layout satisfies `cond`; returns it.
async fn wait_for_layout(
    server: &TestServer,
    what: &str,
    cond: impl Fn(&Layout) -> bool,
) -> Layout {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = layout(server).await;
        if cond(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}; {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Regions that start strictly inside `[lo, hi)` (hex of encoded keys):
/// boundaries the server put there.
fn boundaries_inside(layout: &Layout, lo: &str, hi: &str) -> usize {
    layout
        .ranges
        .iter()
        .filter(|(start, _)| start.as_str() > lo && start.as_str() < hi)
        .count()
}

/// Commits puts (or deletes) of every writer's keys, writers side by side;
/// returns (key, commit_ts, value) of each commit.
async fn write_all(cluster: &Cluster, delete: bool, round: u32) -> Vec<Commit> {
    let write = |w: u32| {
        let cluster = cluster.clone();
        async move {
            let mut done = Vec::new();
            for i in 0..KEYS {
                let key = format!("a/{w}/{i:03}").into_bytes();
                let (written, value) = if delete {
                    (cluster.txn_delete(&key).await.expect("delete"), Vec::new())
                } else {
                    let value = format!("r{round}-{w}-{i}").into_bytes();
                    (cluster.txn_put(&key, &value).await.expect("put"), value)
                };
                done.push((key, written.commit_ts.into_inner(), value));
            }
            done
        }
    };
    let (a, b) = tokio::join!(write(0), write(1));
    [a, b].concat()
}

async fn scenario() {
    let (_tmp, server) = server();
    let (cluster, mut rx, consumer) = consumer::subscribe(&server, b"a/", b"a0").await;
    let (lo, hi) = (hex(&encode_bytes(b"a/")), hex(&encode_bytes(b"a0")));
    let before = layout(&server).await;
    assert_eq!(before.ranges.len(), 2, "the default layout: {before:?}");

    // 120 keys, twenty to a part: the range is split on its own, more than
    // once, while the consumer is subscribed to it.
    let mut expected = write_all(&cluster, false, 0).await;
    let split = wait_for_layout(&server, "automatic splits", |l| {
        boundaries_inside(l, &lo, &hi) >= 3
    })
    .await;
    assert!(split.splits >= 1, "{split:?}");
    // Raw keys split too, at boundaries transactional clients can decode.
    for i in 0..60 {
        cluster
            .raw_put(format!("b{i:03}").as_bytes(), b"raw")
            .await
            .expect("raw put");
    }
    let (raw_lo, raw_hi) = (hex(b"b"), hex(b"c"));
    wait_for_layout(&server, "raw splits", |l| {
        boundaries_inside(l, &raw_lo, &raw_hi) >= 1
    })
    .await;

    // Delete every key and let GC remove what is left: the regions turn
    // small and merge back into their neighbours, down to the layout the
    // server keeps.
    expected.extend(write_all(&cluster, true, 1).await);
    for i in 0..60 {
        cluster
            .raw_delete(format!("b{i:03}").as_bytes())
            .await
            .expect("raw delete");
    }
    // GC up to what the consumer has: it re-registers from its resolved
    // ts, which must not be below the safe point (a changefeed would hold
    // a service safe point for that).
    // The raw deletes took their timestamps before this one.
    let deleted = cluster.tso().await.expect("tso").into_inner();
    wait_for(&mut rx, "resolved past the deletes", |s| {
        s.resolved >= deleted
    })
    .await;
    let safe_point = deleted;
    let mut pd = PdClient::new(server.channel().await);
    pd.update_gc_safe_point(UpdateGcSafePointRequest {
        header: Some(RequestHeader {
            cluster_id: server.cluster_id(),
            ..RequestHeader::default()
        }),
        safe_point,
    })
    .await
    .expect("UpdateGCSafePoint");
    let merged = wait_for_layout(&server, "automatic merges", |l| l.ranges == before.ranges).await;
    assert!(merged.merges >= 3, "{merged:?}");

    // The feed rode through every change: one more round, then every commit
    // arrived exactly once.
    expected.extend(write_all(&cluster, false, 2).await);
    let seen = consumer::finish(rx, consumer, expected).await;
    assert!(seen.retries > 0, "the layout changes reached the consumer");

    let metrics = server.metrics();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(counter("kvfeed_region_auto_splits_total") >= 1);
    assert!(counter("kvfeed_region_auto_merges_total") >= 3);
    assert!(counter("kvfeed_region_split_check_scans_total") >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regions_split_and_merge_on_their_own_under_a_feed_without_loss() {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .expect("the scenario did not finish in time");
}
