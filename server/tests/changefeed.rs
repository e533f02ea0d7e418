//! Changefeeds end to end: `kvfeed changefeed run` processes against a real
//! `kvfeed serve`, writes through the official `tikv-client`, checked by
//! `kvfeed verify` and by the transactions the writers committed.
//!
//! - a file sink replays history from ts 0 and follows live writes: every
//!   transaction whole, at its commit ts, once; `verify` is clean;
//! - the changefeed is killed (-9) again and again while transactions
//!   commit: after the last restart the sink holds each exactly once;
//! - debezium rows carry `before`/`after` and `c`/`u`/`d`;
//! - raw keys;
//! - bad input is refused before anything runs, with a clear message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "changefeed/support.rs"]
mod support;

use std::time::Duration;

use common::TestServer;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{CfProcess, Committed, assert_transactions, commit, sink_rows, txn_client};
use tikv_client::TimestampExt;

fn run_args(server: &TestServer, id: &str, sink: &str, state: &std::path::Path) -> Vec<String> {
    vec![
        "--pd".into(),
        server.pd_endpoint(),
        "--id".into(),
        id.into(),
        "--sink".into(),
        sink.into(),
        "--prefix".into(),
        "cf/".into(),
        "--start-ts".into(),
        "0".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ]
}

fn key(i: usize) -> Vec<u8> {
    format!("cf/{i:04}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_replays_history_and_follows_live_writes() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let sink = format!("file://{}", out.display());
    let client = txn_client(&server).await;
    let mut committed = Vec::new();
    for t in 0..20 {
        let writes: Vec<_> = (0..3)
            .map(|k| (key(t * 3 + k), Some(format!("v{t}-{k}").into_bytes())))
            .collect();
        committed.push(commit(&client, &writes).await);
    }
    // Outside the prefix: never delivered.
    commit(&client, &[(b"other".to_vec(), Some(b"x".to_vec()))]).await;

    let mut cf = CfProcess::start(
        &run_args(&server, "files", &sink, &tmp.path().join("state")),
        tmp.path(),
    );
    for t in 0..20 {
        let mut writes = vec![(key(t), Some(format!("w{t}").into_bytes()))];
        if t % 4 == 0 {
            writes.push((key(t + 30), None));
        }
        committed.push(commit(&client, &writes).await);
    }
    let last = client.current_timestamp().await.expect("tso").version();
    support::wait_checkpoint(&out, last, &mut cf);
    assert_eq!(cf.terminate(), Some(0), "log:\n{}", cf.log());

    let upto = support::checkpoint(&out);
    assert_transactions(&sink_rows(&out), &committed, upto);
    let (code, text) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok:"), "{text}");

    // Data files sort by commit ts and hold one window each.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("read sink")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ndjson"))
        .collect();
    assert!(!names.is_empty());
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    names.sort_by_key(|n| n[..20].parse::<u64>().expect("from ts in the name"));
    assert_eq!(names, sorted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_changefeeds_resume_exactly_once() {
    let seed = common::nemesis::seed(7);
    eprintln!("seed {seed}");
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let sink = format!("file://{}", out.display());
    let client = txn_client(&server).await;
    let mut cf = CfProcess::start(
        &run_args(&server, "killed", &sink, &tmp.path().join("state")),
        tmp.path(),
    );

    let writer = {
        let client = txn_client(&server).await;
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut committed: Vec<Committed> = Vec::new();
            for t in 0..300 {
                let n = rng.random_range(1..=4);
                let writes: Vec<_> = (0..n)
                    .map(|_| {
                        let k = key(rng.random_range(0..40));
                        let v = (rng.random_range(0..5) > 0).then(|| format!("t{t}").into_bytes());
                        (k, v)
                    })
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into_iter()
                    .collect();
                committed.push(commit(&client, &writes).await);
                if t % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            committed
        })
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc0ffee);
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        cf.kill_and_restart();
    }
    let committed = writer.await.expect("writer");
    let last = client.current_timestamp().await.expect("tso").version();
    tokio::task::block_in_place(|| support::wait_checkpoint(&out, last, &mut cf));
    cf.kill();

    assert_transactions(&sink_rows(&out), &committed, support::checkpoint(&out));
    let (code, text) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_rows_carry_before_and_after() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let sink = format!("file://{}", out.display());
    let client = txn_client(&server).await;
    let mut args = run_args(&server, "dbz", &sink, &tmp.path().join("state"));
    args.extend(["--format".into(), "debezium".into()]);
    let mut cf = CfProcess::start(&args, tmp.path());
    commit(&client, &[(key(1), Some(b"v1".to_vec()))]).await;
    commit(&client, &[(key(1), Some(b"v2".to_vec()))]).await;
    commit(&client, &[(key(1), None)]).await;
    let last = client.current_timestamp().await.expect("tso").version();
    tokio::task::block_in_place(|| support::wait_checkpoint(&out, last, &mut cf));
    cf.kill();

    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&out).expect("read sink") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "ndjson") {
            let text = std::fs::read_to_string(&path).expect("read");
            lines.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")),
            );
        }
    }
    lines.sort_by_key(|l| l["source"]["commit_ts"].as_u64().expect("commit_ts"));
    let ops: Vec<&str> = lines
        .iter()
        .map(|l| l["op"].as_str().expect("op"))
        .collect();
    assert_eq!(ops, ["c", "u", "d"], "{lines:?}");
    assert_eq!(lines[1]["before"]["value"], "v1");
    assert_eq!(lines[1]["after"]["value"], "v2");
    assert_eq!(lines[2]["before"]["value"], "v2");
    assert!(lines[2]["after"].is_null());
    assert_eq!(lines[0]["source"]["name"], "dbz");
    let (code, text) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_changefeeds_deliver_raw_writes() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let sink = format!("file://{}", out.display());
    let raw = tikv_client::RawClient::new(vec![server.pd_endpoint()])
        .await
        .expect("raw client");
    raw.put(key(1), b"before".to_vec()).await.expect("put");
    let mut args = run_args(&server, "raw", &sink, &tmp.path().join("state"));
    args.push("--raw".into());
    let mut cf = CfProcess::start(&args, tmp.path());
    for i in 0..20 {
        raw.put(key(i), format!("r{i}").into_bytes())
            .await
            .expect("put");
    }
    raw.delete(key(3)).await.expect("delete");
    let cluster = kvfeed_client::Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect");
    let last = cluster.tso().await.expect("tso").into_inner();
    tokio::task::block_in_place(|| support::wait_checkpoint(&out, last, &mut cf));
    cf.kill();
    let rows = sink_rows(&out);
    assert!(rows.iter().any(|r| r.key.as_ref() == key(19).as_slice()));
    let (code, text) = support::verify(&server, &sink);
    assert_eq!(code, Some(0), "{text}");
}

/// Runs `kvfeed changefeed run ARGS` to its end; it must fail at once with
/// a message containing `want`.
fn refused(args: &[String], want: &str) {
    let mut all = vec!["changefeed".to_owned(), "run".to_owned()];
    all.extend_from_slice(args);
    let exited = common::run_to_exit(&all);
    assert_eq!(exited.status.code(), Some(1), "{args:?}: {}", exited.stderr);
    assert!(
        exited.stderr.contains(want),
        "{args:?}: expected {want:?} in:\n{}",
        exited.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_runs() {
    let server = TestServer::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let good = format!("file://{}", tmp.path().join("out").display());
    let args = |id: &str, sink: &str| run_args(&server, id, sink, &state);

    refused(
        &args("a", "amqp://localhost:5672/q"),
        "unknown sink scheme \"amqp\"",
    );
    refused(
        &args("a", "nats://127.0.0.1:4222/cdc?strem=S"),
        "unknown parameter \"strem\"",
    );
    refused(
        &args(
            "a",
            "nats://127.0.0.1:4222/cdc?format=debezium&subject-buckets=0",
        ),
        "subject-buckets",
    );
    refused(&args("a/b", &good), "invalid changefeed id");
    let blocker = tmp.path().join("a-file");
    std::fs::write(&blocker, b"x").expect("write");
    refused(
        &args("a", &format!("file://{}/sub", blocker.display())),
        "a-file",
    );
    let mut empty = args("a", &good);
    empty.retain(|a| a != "--prefix" && a != "cf/");
    empty.extend([
        "--from-key".into(),
        "b".into(),
        "--to-key".into(),
        "a".into(),
    ]);
    refused(&empty, "is empty");
    let mut format = args("a", &good);
    format.extend(["--format".into(), "avro".into()]);
    refused(&format, "unknown format");

    // The same id twice: the second is refused while the first runs.
    let mut first = CfProcess::start(&args("twice", &good), tmp.path());
    let deadline = std::time::Instant::now() + common::WAIT;
    while support::checkpoint(&tmp.path().join("out")) == 0 {
        first.assert_running();
        assert!(std::time::Instant::now() < deadline, "{}", first.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    refused(&args("twice", &good), "in use by another changefeed");
    first.assert_running();
    drop(first);

    // A start below the GC safe point names both timestamps.
    let cluster = kvfeed_client::Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect");
    let now = cluster.tso().await.expect("tso");
    let mut pd = kvfeed_proto::pdpb::pd_client::PdClient::new(server.channel().await);
    pd.update_gc_safe_point(kvfeed_proto::pdpb::UpdateGcSafePointRequest {
        header: Some(kvfeed_proto::pdpb::RequestHeader {
            cluster_id: server.cluster_id(),
            ..Default::default()
        }),
        safe_point: now.into_inner(),
    })
    .await
    .expect("UpdateGCSafePoint");
    let mut old = args(
        "old",
        &format!("file://{}", tmp.path().join("old").display()),
    );
    old.iter_mut()
        .filter(|a| *a == "0")
        .for_each(|a| *a = "5".into());
    refused(
        &old,
        &format!("start ts 5 is below the GC safe point {}", now.into_inner()),
    );
}
