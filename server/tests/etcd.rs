//! etcd's `KV` service on the PD address, called with the generated
//! `etcdserverpb` client against the real binary: the saved GC safe point
//! client-go reads every second, range reads, and refused writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::TestServer;
use kvfeed_proto::etcdserverpb::kv_client::KvClient;
use kvfeed_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, TxnRequest,
};
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{RequestHeader, UpdateGcSafePointRequest};
use tonic::transport::Channel;

const SAFE_POINT_KEY: &[u8] = b"/tidb/store/gcworker/saved_safe_point";

async fn range(client: &mut KvClient<Channel>, request: RangeRequest) -> RangeResponse {
    client.range(request).await.expect("Range").into_inner()
}

/// What client-go's `Get(key)` sends: the key alone.
fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_safe_point_follows_the_gc_safe_point() {
    let server = TestServer::start();
    let mut etcd = KvClient::new(server.channel().await);

    let first = range(&mut etcd, get(SAFE_POINT_KEY)).await;
    let header = first.header.expect("a header");
    assert_eq!(header.cluster_id, server.cluster_id());
    assert_eq!(header.member_id, 1);
    assert!(header.revision >= 1);
    assert_eq!(header.raft_term, 1);
    assert_eq!(first.count, 1);
    assert!(!first.more);
    assert_eq!(first.kvs.len(), 1);
    assert_eq!(first.kvs[0].key, SAFE_POINT_KEY);
    assert_eq!(first.kvs[0].value, b"0", "zero until GC first runs");

    let mut pd = PdClient::new(server.channel().await);
    let safe_point = 470_726_064_875_241_473_u64;
    pd.update_gc_safe_point(UpdateGcSafePointRequest {
        header: Some(RequestHeader {
            cluster_id: server.cluster_id(),
            ..Default::default()
        }),
        safe_point,
    })
    .await
    .expect("UpdateGCSafePoint");

    let after = range(&mut etcd, get(SAFE_POINT_KEY)).await;
    assert_eq!(after.kvs.len(), 1);
    // client-go parses the value with strconv.ParseUint(value, 10, 64).
    assert_eq!(after.kvs[0].value, safe_point.to_string().as_bytes());
    let revision = after.header.expect("a header").revision;
    assert!(revision > header.revision, "the update is a newer revision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_ranges_and_missing_keys() {
    let server = TestServer::start();
    let mut etcd = KvClient::new(server.channel().await);

    // client-go's GetWithPrefix: range_end is the prefix plus one.
    let prefix = range(
        &mut etcd,
        RangeRequest {
            key: b"/tidb/store/gcworker/".to_vec(),
            range_end: b"/tidb/store/gcworker0".to_vec(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(prefix.count, 1);
    assert_eq!(prefix.kvs[0].key, SAFE_POINT_KEY);

    // "\0" as range_end: every key >= key; with "\0" as key: every key.
    let everything = range(
        &mut etcd,
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            keys_only: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(everything.count, 1);
    assert_eq!(everything.kvs[0].key, SAFE_POINT_KEY);
    assert!(everything.kvs[0].value.is_empty(), "keys only");
    let counted = range(
        &mut etcd,
        RangeRequest {
            key: b"/tidb".to_vec(),
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((counted.count, counted.kvs.len()), (1, 0));
    let limited = range(
        &mut etcd,
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            limit: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!((limited.kvs.len(), limited.more), (1, false));

    for missing in [
        get(b"/tidb/server/minstartts/x"),
        get(b"/tidb/store/gcworker/saved_safe_point/"),
        RangeRequest {
            key: b"/pd/".to_vec(),
            range_end: b"/pd0".to_vec(),
            ..Default::default()
        },
    ] {
        let answer = range(&mut etcd, missing.clone()).await;
        assert!(answer.kvs.is_empty(), "{missing:?}");
        assert_eq!(answer.count, 0);
        assert!(!answer.more);
        assert_eq!(
            answer.header.expect("a header").cluster_id,
            server.cluster_id()
        );
    }

    let status = etcd
        .range(RangeRequest::default())
        .await
        .expect_err("an empty key");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_and_change_nothing() {
    let server = TestServer::start();
    let mut etcd = KvClient::new(server.channel().await);
    let put = etcd
        .put(PutRequest {
            key: SAFE_POINT_KEY.to_vec(),
            value: b"99".to_vec(),
        })
        .await
        .expect_err("Put");
    let delete = etcd
        .delete_range(DeleteRangeRequest {})
        .await
        .expect_err("DeleteRange");
    let txn = etcd.txn(TxnRequest {}).await.expect_err("Txn");
    let compact = etcd
        .compact(CompactionRequest {})
        .await
        .expect_err("Compact");
    for (method, status) in [
        ("Put", put),
        ("DeleteRange", delete),
        ("Txn", txn),
        ("Compact", compact),
    ] {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{method}");
        assert!(
            status.message().contains("etcd writes are not supported"),
            "{method}: {}",
            status.message()
        );
        assert!(status.message().contains(method), "{}", status.message());
    }
    let value = range(&mut etcd, get(SAFE_POINT_KEY)).await;
    assert_eq!(value.kvs[0].value, b"0");
}
