//! `GetStoreSafeTS` and stale reads against a real `kvfeed serve`, with
//! the generated gRPC clients and no feed subscription (the safe ts must
//! hold store-wide without one): reads at and below the safe ts are served,
//! reads above it get `DataIsNotReady`, and an open lock holds the safe ts
//! at or below its start_ts until it commits.
//!
//! Timestamps come from the server's oracle (PD's `Tso`), since the safe ts
//! is bounded by it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "kv/support.rs"]
mod support;

use std::time::Duration;

use common::TestServer;
use kvfeed_proto::kvrpcpb;
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{RequestHeader, TsoRequest};
use kvfeed_storage::TimeStamp;
use support::{Kv, b, put};

/// One timestamp from the server's oracle.
async fn tso(server: &TestServer) -> u64 {
    let mut pd = PdClient::new(server.channel().await);
    let request = TsoRequest {
        header: Some(RequestHeader {
            cluster_id: server.cluster_id(),
            ..Default::default()
        }),
        count: 1,
        dc_location: String::new(),
    };
    let mut answers = pd
        .tso(tokio_stream::iter([request]))
        .await
        .expect("Tso")
        .into_inner();
    let answer = answers.message().await.expect("answered").expect("one");
    let ts = answer.timestamp.expect("a timestamp");
    TimeStamp::compose(ts.physical as u64, ts.logical as u64).into_inner()
}

async fn safe_ts(kv: &Kv) -> u64 {
    kv.c()
        .get_store_safe_ts(kvrpcpb::StoreSafeTsRequest {
            // What client-go sends: the whole store.
            key_range: Some(kvrpcpb::KeyRange::default()),
        })
        .await
        .expect("GetStoreSafeTS")
        .into_inner()
        .safe_ts
}

fn stale(kv: &Kv, key: &[u8]) -> Option<kvrpcpb::Context> {
    let mut context = kv.txn_ctx(key).expect("a context");
    context.stale_read = true;
    Some(context)
}

/// Region errors of a stale get, batch get and scan of `key` at `version`
/// (`None` when served), with the value each read.
async fn stale_reads(
    kv: &Kv,
    key: &[u8],
    version: u64,
) -> Vec<Result<Option<Vec<u8>>, kvfeed_proto::errorpb::Error>> {
    let get = kv
        .c()
        .kv_get(kvrpcpb::GetRequest {
            context: stale(kv, key),
            key: key.to_vec(),
            version,
            ..Default::default()
        })
        .await
        .expect("KvGet")
        .into_inner();
    let batch = kv
        .c()
        .kv_batch_get(kvrpcpb::BatchGetRequest {
            context: stale(kv, key),
            keys: vec![key.to_vec()],
            version,
            ..Default::default()
        })
        .await
        .expect("KvBatchGet")
        .into_inner();
    let mut end = key.to_vec();
    end.push(0);
    let scan = kv
        .c()
        .kv_scan(kvrpcpb::ScanRequest {
            context: stale(kv, key),
            start_key: key.to_vec(),
            end_key: end,
            limit: 10,
            version,
            ..Default::default()
        })
        .await
        .expect("KvScan")
        .into_inner();
    vec![
        match get.region_error {
            Some(err) => Err(err),
            None => {
                assert!(get.error.is_none(), "{get:?}");
                Ok((!get.not_found).then_some(get.value))
            }
        },
        match batch.region_error {
            Some(err) => Err(err),
            None => Ok(batch.pairs.into_iter().next().map(|p| p.value)),
        },
        match scan.region_error {
            Some(err) => Err(err),
            None => Ok(scan.pairs.into_iter().next().map(|p| p.value)),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_at_below_and_above_the_safe_ts() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let key = b("stale/k");

    let start = tso(&server).await;
    kv.prewrite(vec![put(&key, b"v1")], &key, start, 3000).await;
    let commit = tso(&server).await;
    kv.commit(std::slice::from_ref(&key), start, commit).await;

    // The commit is applied and nothing is locked: the safe ts reaches it
    // (it is sampled after), and stays below timestamps not handed out yet.
    let safe = safe_ts(&kv).await;
    assert!(
        safe >= commit,
        "safe ts {safe} below applied commit {commit}"
    );
    assert!(safe < tso(&server).await);

    // At the safe ts: served, the committed value.
    for read in stale_reads(&kv, &key, safe).await {
        assert_eq!(read.expect("served"), Some(b("v1")));
    }
    // Below it, before the write: served, nothing there.
    for read in stale_reads(&kv, &key, commit - 1).await {
        assert_eq!(read.expect("served"), None);
    }
    // Above it: DataIsNotReady, for this region, with the safe ts. (Within
    // the allowed drift beyond the oracle, so an ordinary read may use it.)
    let future = TimeStamp::new(tso(&server).await)
        .physical()
        .saturating_add(30_000);
    let future = TimeStamp::compose(future, 0).into_inner();
    let region = kv.txn_ctx(&key).expect("a context").region_id;
    for read in stale_reads(&kv, &key, future).await {
        let err = read.expect_err("not ready");
        let not_ready = err.data_is_not_ready.expect("DataIsNotReady");
        assert_eq!(not_ready.region_id, region);
        assert!(not_ready.safe_ts >= safe && not_ready.safe_ts < future);
        assert!(!err.message.is_empty());
    }
    // Without stale_read the same version is an ordinary read.
    assert_eq!(kv.value(&key, future).await, Some(b("v1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_lock_holds_the_safe_ts_until_it_commits() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let key = b("stale/locked");
    let start = tso(&server).await;
    kv.prewrite(vec![put(&key, b"v")], &key, start, 60_000)
        .await;

    // However often it is recomputed, the lock bounds it.
    for _ in 0..4 {
        assert!(safe_ts(&kv).await <= start);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    for read in stale_reads(&kv, &key, start + 1).await {
        let not_ready = read.expect_err("held by the lock").data_is_not_ready;
        assert!(not_ready.expect("DataIsNotReady").safe_ts <= start);
    }

    let commit = tso(&server).await;
    kv.commit(std::slice::from_ref(&key), start, commit).await;
    // Recomputed at most every 50 ms: poll, bounded.
    let mut safe = safe_ts(&kv).await;
    for _ in 0..100 {
        if safe >= commit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        safe = safe_ts(&kv).await;
    }
    assert!(safe >= commit, "safe ts {safe} stuck below commit {commit}");
    for read in stale_reads(&kv, &key, safe).await {
        assert_eq!(read.expect("served"), Some(b("v")));
    }
}
