//! Every kind of bad input to the KV service gets a clear, specific answer
//! and leaves the server serving: after each one a normal request must
//! succeed (and see no trace of the refused one).
//!
//! Where each answer goes: bad input is the response's own error field
//! (`KeyError.abort`, the raw `error` string, or one error pair); routing
//! mistakes are region errors naming the region; a request without a
//! context is `INVALID_ARGUMENT`; a request over the size limit is
//! `OUT_OF_RANGE` from the transport.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "kv/support.rs"]
mod support;

use common::TestServer;
use kvfeed_proto::kvrpcpb;
use kvfeed_proto::metapb;
use support::{Kv, MAX_KEY, MAX_VALUE, ctx, put};
use tikv_client::TimestampExt;

/// A raw put to the first region, whatever the key.
async fn raw_put_first(kv: &Kv, key: Vec<u8>, value: Vec<u8>) -> kvrpcpb::RawPutResponse {
    kv.c()
        .raw_put(kvrpcpb::RawPutRequest {
            context: ctx(kv.first()),
            key,
            value,
            ..Default::default()
        })
        .await
        .expect("raw put answered")
        .into_inner()
}

/// Whether a raw key is absent (read in its own region).
async fn raw_absent(kv: &Kv, key: &[u8]) -> bool {
    kv.c()
        .raw_get(kvrpcpb::RawGetRequest {
            context: kv.raw_ctx(key),
            key: key.to_vec(),
            ..Default::default()
        })
        .await
        .expect("raw get answered")
        .into_inner()
        .not_found
}

/// A prewrite of `mutations` with primary `k`.
async fn prewrite_k(
    kv: &Kv,
    mutations: Vec<kvrpcpb::Mutation>,
    start: u64,
) -> kvrpcpb::PrewriteResponse {
    kv.prewrite(mutations, b"k", start, 3000).await
}

/// A commit of `k`, answered whatever the timestamps.
async fn commit_k(kv: &Kv, start: u64, commit_ts: u64) -> kvrpcpb::CommitResponse {
    kv.commit(&[b"k".to_vec()], start, commit_ts).await
}

/// The abort message of the single prewrite error.
fn prewrite_abort(resp: &kvrpcpb::PrewriteResponse) -> String {
    assert!(resp.region_error.is_none(), "{resp:?}");
    assert_eq!(resp.errors.len(), 1, "{resp:?}");
    resp.errors[0].abort.clone()
}

#[tokio::test]
async fn bad_keys_and_values_are_refused_and_nothing_is_written() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;

    let resp = raw_put_first(&kv, Vec::new(), b"v".to_vec()).await;
    assert_eq!(resp.error, "key is empty", "{resp:?}");
    kv.still_serving().await;

    let resp = raw_put_first(&kv, vec![b'a'; MAX_KEY + 1], b"v".to_vec()).await;
    assert!(resp.error.contains("8193 bytes"), "{resp:?}");
    assert!(resp.error.contains("8192"), "{resp:?}");
    kv.still_serving().await;
    // A key of exactly the limit is fine.
    let resp = raw_put_first(&kv, vec![b'a'; MAX_KEY], b"v".to_vec()).await;
    assert!(resp.error.is_empty(), "{resp:?}");

    let resp = raw_put_first(&kv, b"big".to_vec(), vec![0; MAX_VALUE + 1]).await;
    assert!(resp.error.contains("exceeds the limit"), "{resp:?}");
    assert!(raw_absent(&kv, b"big").await);
    kv.still_serving().await;

    // Transactional reads and writes answer with KeyError.abort.
    let resp = kv
        .c()
        .kv_get(kvrpcpb::GetRequest {
            context: ctx(kv.first()),
            key: Vec::new(),
            version: 10,
            ..Default::default()
        })
        .await
        .expect("get answered")
        .into_inner();
    assert_eq!(resp.error.map(|e| e.abort).as_deref(), Some("key is empty"));
    let resp = prewrite_k(&kv, vec![put(&vec![1; MAX_KEY + 1], b"v")], 10).await;
    assert!(
        prewrite_abort(&resp).contains("exceeds the limit"),
        "{resp:?}"
    );
    let resp = prewrite_k(&kv, vec![put(b"k", &vec![1; MAX_VALUE + 1])], 10).await;
    assert!(
        prewrite_abort(&resp).contains("exceeds the limit"),
        "{resp:?}"
    );
    kv.still_serving().await;

    // Scans carry the error in a pair (where tikv-client looks).
    let resp = kv
        .c()
        .raw_scan(kvrpcpb::RawScanRequest {
            context: ctx(kv.first()),
            start_key: vec![1; MAX_KEY + 1],
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("scan answered")
        .into_inner();
    let err = resp
        .kvs
        .first()
        .and_then(|p| p.error.clone())
        .map(|e| e.abort);
    assert!(
        err.is_some_and(|m| m.contains("exceeds the limit")),
        "{:?}",
        resp.kvs.len()
    );
    kv.still_serving().await;
}

#[tokio::test]
async fn oversized_request_is_refused_by_the_transport() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    // Three values under the value limit, together over the request limit.
    let pairs = (0..3u8)
        .map(|i| kvrpcpb::KvPair {
            key: vec![b'x', i],
            value: vec![i; 6 * 1024 * 1024],
            ..Default::default()
        })
        .collect();
    let status = kv
        .c()
        .raw_batch_put(kvrpcpb::RawBatchPutRequest {
            context: ctx(kv.first()),
            pairs,
            ..Default::default()
        })
        .await
        .expect_err("a request over 16 MiB is refused");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert!(raw_absent(&kv, &[b'x', 0]).await);
    kv.still_serving().await;
}

#[tokio::test]
async fn malformed_transactions_are_aborted() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;

    let resp = prewrite_k(&kv, Vec::new(), 10).await;
    assert_eq!(prewrite_abort(&resp), "the mutation list is empty");
    kv.still_serving().await;

    let unknown = kvrpcpb::Mutation {
        op: 42,
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let resp = prewrite_k(&kv, vec![unknown], 10).await;
    assert!(
        prewrite_abort(&resp).contains("unknown mutation op 42"),
        "{resp:?}"
    );
    kv.still_serving().await;

    let resp = prewrite_k(&kv, vec![put(b"k", b"v"), put(b"k", b"w")], 10).await;
    assert!(prewrite_abort(&resp).contains("twice"), "{resp:?}");

    // Fewer pessimistic actions than mutations leaves mutations without one.
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: ctx(kv.first()),
            mutations: vec![put(b"k", b"v"), put(b"k2", b"v")],
            primary_lock: b"k".to_vec(),
            start_version: 10,
            for_update_ts: 10,
            pessimistic_actions: vec![1],
            ..Default::default()
        })
        .await
        .expect("prewrite answered")
        .into_inner();
    assert!(
        prewrite_abort(&resp).contains("1 pessimistic actions for 2 mutations"),
        "{resp:?}"
    );

    let resp = prewrite_k(&kv, vec![put(b"k", b"v")], 0).await;
    assert!(prewrite_abort(&resp).contains("start_version must not be 0"));

    // A valid prewrite, then commits with bad timestamps.
    assert!(
        prewrite_k(&kv, vec![put(b"k", b"v")], 100)
            .await
            .errors
            .is_empty()
    );
    let resp = commit_k(&kv, 100, 0).await;
    let abort = resp.error.map(|e| e.abort).unwrap_or_default();
    assert!(abort.contains("commit_version must not be 0"), "{abort}");
    kv.still_serving().await;
    let resp = commit_k(&kv, 100, 99).await;
    let abort = resp.error.map(|e| e.abort).unwrap_or_default();
    assert!(abort.contains("greater than start_version 100"), "{abort}");
    let resp = commit_k(&kv, 100, 100).await;
    assert!(resp.error.is_some_and(|e| !e.abort.is_empty()));
    let resp = commit_k(&kv, 0, 5).await;
    assert!(
        resp.error
            .is_some_and(|e| e.abort.contains("start_version"))
    );
    kv.still_serving().await;

    // The lock is untouched by the refused commits and commits normally.
    let resp = commit_k(&kv, 100, 101).await;
    assert!(resp.error.is_none(), "{resp:?}");
    let resp = kv
        .c()
        .kv_get(kvrpcpb::GetRequest {
            context: kv.txn_ctx(b"k"),
            key: b"k".to_vec(),
            version: 102,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(resp.value, b"v");

    // An unknown pessimistic lock op is refused too.
    let resp = kv
        .c()
        .kv_pessimistic_lock(kvrpcpb::PessimisticLockRequest {
            context: ctx(kv.first()),
            mutations: vec![put(b"k", b"v")],
            primary_lock: b"k".to_vec(),
            start_version: 200,
            for_update_ts: 200,
            ..Default::default()
        })
        .await
        .expect("lock answered")
        .into_inner();
    let abort = resp
        .errors
        .first()
        .map(|e| e.abort.clone())
        .unwrap_or_default();
    assert!(abort.contains("PessimisticLock"), "{abort}");
    kv.still_serving().await;
}

#[tokio::test]
async fn routing_mistakes_are_region_errors_naming_the_region() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let first = kv.first().clone();

    // No context at all.
    let status = kv
        .c()
        .raw_get(kvrpcpb::RawGetRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("no context");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("context"), "{status:?}");
    kv.still_serving().await;

    // Unknown region.
    let mut context = ctx(&first);
    if let Some(c) = context.as_mut() {
        c.region_id = 4242;
    }
    let resp = kv
        .c()
        .raw_get(kvrpcpb::RawGetRequest {
            context,
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    let err = resp.region_error.expect("region error");
    assert_eq!(err.region_not_found.map(|r| r.region_id), Some(4242));
    assert!(err.message.contains("4242"), "{}", err.message);
    kv.still_serving().await;

    // Stale epoch: the answer carries the region as it is now.
    let mut context = ctx(&first);
    if let Some(c) = context.as_mut() {
        c.region_epoch = Some(metapb::RegionEpoch {
            conf_ver: 1,
            version: 1,
        });
    }
    let resp = kv
        .c()
        .kv_get(kvrpcpb::GetRequest {
            context,
            key: b"a".to_vec(),
            version: 5,
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    let err = resp.region_error.expect("region error");
    let current = err
        .epoch_not_match
        .map(|e| e.current_regions)
        .unwrap_or_default();
    // The region itself, then its neighbour (the default layout has two).
    assert_eq!(current.len(), 2);
    assert_eq!(current[0].id, first.id.0);
    assert_eq!(current[0].end_key, first.end_key);
    let epoch = current[0].region_epoch.unwrap_or_default();
    assert_eq!(
        (epoch.conf_ver, epoch.version),
        (first.epoch.conf_ver, first.epoch.version)
    );
    assert!(
        err.message.contains(&first.id.to_string()),
        "{}",
        err.message
    );
    kv.still_serving().await;

    // A key outside the region: raw keys as they are, txn keys encoded.
    let high = vec![0xFF; 12];
    let resp = kv
        .c()
        .raw_put(kvrpcpb::RawPutRequest {
            context: ctx(&first),
            key: high.clone(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    let err = resp.region_error.expect("region error");
    let k = err.key_not_in_region.clone().unwrap_or_default();
    assert_eq!((k.key, k.region_id), (high.clone(), first.id.0));
    assert_eq!(
        (k.start_key, k.end_key),
        (first.start_key.clone(), first.end_key.clone())
    );
    assert!(
        err.message.contains(&format!("region {}", first.id)),
        "{}",
        err.message
    );
    assert!(raw_absent(&kv, &high).await);
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: ctx(&first),
            mutations: vec![put(b"ok", b"v"), put(&[0xFF; 9], b"v")],
            primary_lock: b"ok".to_vec(),
            start_version: 300,
            lock_ttl: 3000,
            ..Default::default()
        })
        .await
        .expect("prewrite answered")
        .into_inner();
    let err = resp.region_error.expect("region error");
    assert!(err.key_not_in_region.is_some() && resp.errors.is_empty());
    // Nothing of the refused prewrite was locked.
    assert!(kv.locks(1000).await.is_empty());
    kv.still_serving().await;
}

#[tokio::test]
async fn unknown_column_family_and_unsupported_calls_are_named() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;

    let resp = kv
        .c()
        .raw_put(kvrpcpb::RawPutRequest {
            context: ctx(kv.first()),
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            cf: "write".to_owned(),
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert!(resp.error.contains("\"write\""), "{resp:?}");
    assert!(raw_absent(&kv, b"a").await);
    let resp = kv
        .c()
        .raw_batch_get(kvrpcpb::RawBatchGetRequest {
            context: ctx(kv.first()),
            keys: vec![b"a".to_vec()],
            cf: "lock".to_owned(),
        })
        .await
        .expect("answered")
        .into_inner();
    let abort = resp
        .pairs
        .first()
        .and_then(|p| p.error.clone())
        .map(|e| e.abort);
    assert!(abort.is_some_and(|m| m.contains("\"lock\"")));
    kv.still_serving().await;

    let resp = kv
        .c()
        .kv_delete_range(kvrpcpb::DeleteRangeRequest {
            context: ctx(kv.first()),
            start_key: b"a".to_vec(),
            end_key: b"b".to_vec(),
            notify_only: false,
        })
        .await
        .expect("answered")
        .into_inner();
    assert!(resp.error.contains("not supported"), "{resp:?}");

    let resp = kv
        .c()
        .kv_gc(kvrpcpb::GcRequest {
            context: ctx(kv.first()),
            safe_point: u64::MAX,
        })
        .await
        .expect("answered")
        .into_inner();
    let abort = resp.error.map(|e| e.abort).unwrap_or_default();
    assert!(abort.contains("ahead of the newest timestamp"), "{abort}");
    let resp = kv
        .c()
        .kv_gc(kvrpcpb::GcRequest {
            context: ctx(kv.first()),
            safe_point: 1,
        })
        .await
        .expect("answered")
        .into_inner();
    assert!(resp.error.is_none(), "{resp:?}");
    kv.still_serving().await;
}

/// A read at a timestamp far beyond the oracle's would raise the store's
/// `max_ts`, and with it every later 1PC commit timestamp past what reads
/// at the oracle's time see: it is refused, and a 1PC write after it is
/// visible at the next timestamp, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_far_beyond_the_oracle_is_refused_and_moves_nothing() {
    let mut server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let far = u64::MAX - 1;
    let got = kv.get(b"k", far).await;
    let abort = got
        .error
        .as_ref()
        .map(|e| e.abort.clone())
        .unwrap_or_default();
    assert!(
        abort.contains("max-ts-drift-allowance") && abort.contains(&far.to_string()),
        "{got:?}"
    );
    let prewrite = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: kv.txn_ctx(b"k"),
            mutations: vec![put(b"k", b"v")],
            primary_lock: b"k".to_vec(),
            start_version: far,
            lock_ttl: 3000,
            txn_size: 1,
            try_one_pc: true,
            ..Default::default()
        })
        .await
        .expect("prewrite answered")
        .into_inner();
    assert!(
        prewrite
            .errors
            .first()
            .is_some_and(|e| e.abort.contains("start_version")),
        "{prewrite:?}"
    );

    let client = tikv_client::TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("tikv-client connects");
    let mut txn = client
        .begin_with_options(tikv_client::TransactionOptions::new_optimistic().try_one_pc())
        .await
        .expect("begin");
    txn.put(b"k".to_vec(), b"v".to_vec()).await.expect("put");
    let commit_ts = txn.commit().await.expect("commit").expect("a commit ts");
    let now = client.current_timestamp().await.expect("tso");
    assert!(
        commit_ts.version() < now.version(),
        "1PC committed at {} above the next timestamp {}",
        commit_ts.version(),
        now.version()
    );
    let mut snapshot = client.snapshot(now, tikv_client::TransactionOptions::new_optimistic());
    assert_eq!(
        snapshot.get(b"k".to_vec()).await.expect("get"),
        Some(b"v".to_vec())
    );
    server.restart();
    let client = tikv_client::TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("tikv-client connects");
    let now = client.current_timestamp().await.expect("tso");
    let mut snapshot = client.snapshot(now, tikv_client::TransactionOptions::new_optimistic());
    assert_eq!(
        snapshot.get(b"k".to_vec()).await.expect("get"),
        Some(b"v".to_vec())
    );
}

/// A scan whose answer would pass 16 MiB is refused, whatever its limit
/// asks for — raw, batch (the budget is shared by its ranges) and
/// transactional — while one that fits is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_whose_answer_would_pass_the_byte_cap_are_refused() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let big = vec![b'x'; 4 << 20];
    for i in 0..5u8 {
        kv.raw_put(&[b'r', i], &big, 0).await;
        kv.write(&[(&[b't', i][..], &big[..])]).await;
    }
    let raw_scan = |limit: u32| kvrpcpb::RawScanRequest {
        context: kv.raw_ctx(b"r"),
        start_key: b"r".to_vec(),
        end_key: b"s".to_vec(),
        limit,
        ..Default::default()
    };
    let refused = |pairs: &[kvrpcpb::KvPair]| {
        pairs.len() == 1
            && pairs[0]
                .error
                .as_ref()
                .is_some_and(|e| e.abort.contains("would exceed"))
    };
    let all = kv
        .c()
        .raw_scan(raw_scan(u32::MAX))
        .await
        .expect("answered")
        .into_inner();
    assert!(refused(&all.kvs), "{} pairs", all.kvs.len());
    let some = kv
        .c()
        .raw_scan(raw_scan(3))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(some.kvs.len(), 3);
    assert!(
        some.kvs
            .iter()
            .all(|p| p.error.is_none() && p.value.len() == big.len())
    );

    let batch = kv
        .c()
        .raw_batch_scan(kvrpcpb::RawBatchScanRequest {
            context: kv.raw_ctx(b"r"),
            ranges: vec![
                kvrpcpb::KeyRange {
                    start_key: b"r".to_vec(),
                    end_key: b"s".to_vec(),
                };
                20
            ],
            each_limit: 2,
            ..Default::default()
        })
        .await
        .expect("answered")
        .into_inner();
    assert!(refused(&batch.kvs), "{} pairs", batch.kvs.len());

    let txn_scan = |limit: u32| kvrpcpb::ScanRequest {
        context: kv.txn_ctx(b"t"),
        start_key: b"t".to_vec(),
        end_key: b"u".to_vec(),
        limit,
        version: kv.ts(),
        ..Default::default()
    };
    let all = kv
        .c()
        .kv_scan(txn_scan(u32::MAX))
        .await
        .expect("answered")
        .into_inner();
    assert!(refused(&all.pairs), "{} pairs", all.pairs.len());
    let some = kv
        .c()
        .kv_scan(txn_scan(2))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(some.pairs.len(), 2, "{:?}", some.error);
    kv.still_serving().await;
}
