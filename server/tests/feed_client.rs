//! The feed client (`kvfeed_client::feed`) against the real server, with
//! region errors and lost streams injected on the server side
//! (`--fault-injection`, see `kvfeed::faults`) while writers commit.
//!
//! Each scenario: three writers commit transactions to keys of their own,
//! in three regions; once the feed has delivered some of them, one fault
//! hits every live subscription (or drops the stream); the writers go on.
//! Then every acknowledged commit must have arrived exactly once, per key
//! in commit order; no row may arrive at or below a resolved ts already
//! handed out; resolved ts never moves back. Every wait is on a condition
//! with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "feed_client/consumer.rs"]
mod consumer;

use std::time::Duration;

use common::TestServer;
use consumer::wait_for;
use kvfeed_storage::mvcc::encode_bytes;
use tokio::sync::watch;

const WRITERS: u32 = 3;
const PUTS: u32 = 40;
/// Distinct keys per writer (so keys see several commits each).
const KEYS: u32 = 5;

/// A server with regions split at `f/1` and `f/2` (one per writer) and
/// fault injection on, with a short resolved-ts interval, serving `stores`
/// store endpoints.
fn server_with_stores(stores: u32) -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    let hex = |key: &[u8]| {
        encode_bytes(key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let text = format!(
        "[server]\nsplit-keys = [\"{}\", \"{}\"]\n[cdc]\nmin-ts-interval = \"50ms\"\n",
        hex(b"f/1"),
        hex(b"f/2"),
    );
    std::fs::write(&config, text).expect("write config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(
        &tmp.path().join("data"),
        &[
            "--config",
            &config,
            "--fault-injection",
            "--stores",
            &stores.to_string(),
        ],
    );
    (tmp, server)
}

/// What disturbs the feed while the writers commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disturbance<'a> {
    /// One injected fault (`/debug/fault/feed?inject=…`).
    Fault(&'a str),
    /// Splits and merges of the writers' regions (and leader moves between
    /// `stores`), one every few milliseconds, chosen by a seeded generator,
    /// until the writers finish.
    Layout { seed: u64, stores: u32 },
}

/// Splits and merges regions inside `f/` (and moves leaders between
/// `stores`) until `done` turns true; returns how many changes were made.
/// The server's regions, as `/debug/regions` lists them.
async fn region_list(status: &str) -> Vec<serde_json::Value> {
    let status = status.to_owned();
    let (_, body) =
        tokio::task::spawn_blocking(move || common::http_get(&status, "/debug/regions"))
            .await
            .expect("/debug/regions");
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    view["regions"].as_array().cloned().unwrap_or_default()
}

async fn reshape(server: &TestServer, seed: u64, stores: u32, done: watch::Receiver<bool>) -> u32 {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let status = server.status_addr().to_owned();
    let mut changes = 0;
    while !*done.borrow() {
        let path = if stores > 1 && rng.random_bool(0.3) {
            let regions = region_list(&status).await;
            let id = regions[rng.random_range(0..regions.len())]["id"]
                .as_u64()
                .expect("id");
            let store = rng.random_range(1..=stores);
            format!("/admin/transfer-leader?region={id}&store={store}")
        } else if rng.random_bool(0.6) {
            let key = format!(
                "f/{}/{}{}",
                rng.random_range(0..WRITERS),
                rng.random_range(0..KEYS),
                rng.random_range(0..9)
            );
            let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
            format!("/admin/split?key={hex}")
        } else {
            let regions = region_list(&status).await;
            // Any region but the last (which merges leftwards anyway).
            let pick = rng.random_range(0..regions.len().saturating_sub(1).max(1));
            let id = regions[pick]["id"].as_u64().expect("id");
            format!("/admin/merge?region={id}")
        };
        let status = status.clone();
        let (code, body) = tokio::task::spawn_blocking(move || {
            kvfeed_bench::scrape::http_post(&status, &path, common::WAIT).expect("POST")
        })
        .await
        .expect("admin");
        // A split at an existing boundary is refused; that is fine.
        assert!(code == 200 || code == 400, "{code}: {body}");
        if code == 200 {
            changes += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
    changes
}

/// One scenario: `disturbance` while the writers commit.
async fn survives(disturbance: Disturbance<'_>) {
    let stores = match disturbance {
        Disturbance::Layout { stores, .. } => stores,
        Disturbance::Fault(_) => 1,
    };
    let (_tmp, server) = server_with_stores(stores);
    let (cluster, mut rx, consumer) = consumer::subscribe(&server, b"f/", b"f0").await;
    // The server offers EventFeedV2, so the client multiplexes on it.
    let status = server.status_addr().to_owned();
    let (code, body) = tokio::task::spawn_blocking(move || common::http_get(&status, "/debug/cdc"))
        .await
        .expect("/debug/cdc");
    assert_eq!(code, 200, "{body}");
    let debug: serde_json::Value = serde_json::from_str(&body).expect("/debug/cdc is JSON");
    assert_eq!(
        debug["connections"][0]["features"],
        serde_json::json!(["stream-multiplexing"]),
        "{debug:#}"
    );

    // The writers run beside the injection, on this task: the client's
    // futures are not all `Send`, and nothing here needs another thread.
    let write = |w: u32| {
        let cluster = cluster.clone();
        async move {
            let mut written = Vec::new();
            for i in 0..PUTS {
                let key = format!("f/{w}/{}", i % KEYS).into_bytes();
                let value = format!("w{w}-{i}").into_bytes();
                let done = cluster.txn_put(&key, &value).await.expect("put");
                written.push((key, done.commit_ts.into_inner(), value));
            }
            written
        }
    };
    let (writing_done, writing) = watch::channel(false);
    let inject = async {
        wait_for(&mut rx, "the first rows", |s| s.rows.len() >= 10).await;
        match disturbance {
            Disturbance::Fault(fault) => {
                let status = server.status_addr().to_owned();
                let path = format!("/debug/fault/feed?inject={fault}");
                let (code, body) =
                    tokio::task::spawn_blocking(move || common::http_get(&status, &path))
                        .await
                        .expect("inject");
                assert_eq!(code, 200, "{body}");
            }
            Disturbance::Layout { seed, stores } => {
                let changes = reshape(&server, seed, stores, writing).await;
                assert!(changes >= 5, "only {changes} layout changes");
            }
        }
        wait_for(&mut rx, "the client noticed", |s| s.retries + s.lost > 0).await;
    };
    let writers = async {
        let written = tokio::join!(write(0), write(1), write(2));
        let _ = writing_done.send(true);
        written
    };
    let ((a, b, c), ()) = tokio::join!(writers, inject);
    let seen = consumer::finish(rx, consumer, [a, b, c].concat()).await;
    match disturbance {
        Disturbance::Fault("drop_stream") => assert!(seen.lost > 0, "{seen:?}"),
        Disturbance::Fault(_) => assert!(seen.retries >= WRITERS, "every region retried: {seen:?}"),
        Disturbance::Layout { .. } => assert!(seen.retries > 0, "{seen:?}"),
    }
}

/// Bounds a scenario as a whole.
async fn run(fault: &str) {
    run_with(Disturbance::Fault(fault)).await;
}

async fn run_with(disturbance: Disturbance<'_>) {
    tokio::time::timeout(Duration::from_secs(120), survives(disturbance))
        .await
        .unwrap_or_else(|_| panic!("{disturbance:?}: the scenario did not finish in time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn epoch_not_match_is_survived_without_loss_or_repetition() {
    run("epoch_not_match").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_leader_is_survived_without_loss_or_repetition() {
    run("not_leader").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_not_found_is_survived_without_loss_or_repetition() {
    run("region_not_found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_is_busy_is_survived_without_loss_or_repetition() {
    run("server_is_busy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_stream_is_survived_without_loss_or_repetition() {
    run("drop_stream").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_and_merges_are_survived_without_loss_or_repetition() {
    let seed = std::env::var("KVFEED_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    run_with(Disturbance::Layout { seed, stores: 1 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_moves_between_stores_are_survived_too() {
    let seed = std::env::var("KVFEED_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    run_with(Disturbance::Layout { seed, stores: 3 }).await;
}
