//! The KV service (`tikvpb.Tikv`) of a real `kvfeed serve`, driven with the
//! generated gRPC client: raw CRUD, scans, compare-and-swap and range
//! deletes; a prewrite/commit round trip; reads blocked by locks; write
//! conflicts and constraint failures; every CheckTxnStatus branch (checking
//! the field combination the official client insists on); pessimistic
//! locks with returned values; 1PC, async commit and lock resolution.
//!
//! Region contexts come from the default layout (the one a server without
//! split keys serves); timestamps from a local counter, which is enough
//! because the MVCC rules only compare them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;
#[path = "kv/support.rs"]
mod support;

use common::TestServer;
use kvfeed_proto::kvrpcpb::{self, Op};
use kvfeed_storage::TimeStamp;
use support::{Kv, b, op, put, raw_high, txn_high};

#[tokio::test]
async fn raw_crud_batches_and_ttl() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let (low, high) = (b("k1"), raw_high("k1"));

    assert_eq!(kv.raw_get(&low).await, None);
    kv.raw_put(&low, b"v1", 0).await;
    kv.raw_put(&high, b"hv1", 0).await;
    assert_eq!(kv.raw_get(&low).await, Some(b("v1")));
    assert_eq!(kv.raw_get(&high).await, Some(b("hv1")));

    // Batch put, then a batch get in which a missing key is omitted.
    let pairs = ["a", "b", "c"]
        .iter()
        .map(|k| kvrpcpb::KvPair {
            key: b(k),
            value: b(&format!("{k}-v")),
            ..Default::default()
        })
        .collect();
    let resp = kv
        .c()
        .raw_batch_put(kvrpcpb::RawBatchPutRequest {
            context: kv.raw_ctx(b"a"),
            pairs,
            ..Default::default()
        })
        .await
        .expect("batch put")
        .into_inner();
    assert!(
        resp.error.is_empty() && resp.region_error.is_none(),
        "{resp:?}"
    );
    let resp = kv
        .c()
        .raw_batch_get(kvrpcpb::RawBatchGetRequest {
            context: kv.raw_ctx(b"a"),
            keys: vec![b("c"), b("missing"), b("a")],
            ..Default::default()
        })
        .await
        .expect("batch get")
        .into_inner();
    let got: Vec<_> = resp
        .pairs
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    assert_eq!(got, vec![(b("c"), b("c-v")), (b("a"), b("a-v"))]);

    // Deletes.
    let resp = kv
        .c()
        .raw_delete(kvrpcpb::RawDeleteRequest {
            context: kv.raw_ctx(&low),
            key: low.clone(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(resp.error.is_empty(), "{resp:?}");
    assert_eq!(kv.raw_get(&low).await, None);
    let resp = kv
        .c()
        .raw_batch_delete(kvrpcpb::RawBatchDeleteRequest {
            context: kv.raw_ctx(b"a"),
            keys: vec![b("a"), b("b")],
            ..Default::default()
        })
        .await
        .expect("batch delete")
        .into_inner();
    assert!(resp.error.is_empty(), "{resp:?}");
    assert_eq!(kv.raw_get(b"a").await, None);
    assert_eq!(kv.raw_get(b"c").await, Some(b("c-v")));

    // TTL: a key with a TTL reports the remaining seconds, one without 0.
    kv.raw_put(b"ttl", b"x", 3600).await;
    let ttl_of = |key: &'static [u8]| {
        let mut c = kv.c();
        let context = kv.raw_ctx(key);
        async move {
            c.raw_get_key_ttl(kvrpcpb::RawGetKeyTtlRequest {
                context,
                key: key.to_vec(),
                ..Default::default()
            })
            .await
            .expect("get key ttl")
            .into_inner()
        }
    };
    let resp = ttl_of(b"ttl").await;
    assert!(
        !resp.not_found && resp.ttl > 3500 && resp.ttl <= 3600,
        "{resp:?}"
    );
    let resp = ttl_of(b"c").await;
    assert!(!resp.not_found && resp.ttl == 0, "{resp:?}");
    assert!(ttl_of(b"nothing").await.not_found);
}

#[tokio::test]
async fn raw_scans_cas_and_delete_range() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    for k in ["s1", "s2", "s3", "s4"] {
        kv.raw_put(&b(k), &b(&format!("v{k}")), 0).await;
    }
    for k in ["h1", "h2"] {
        kv.raw_put(&raw_high(k), b"hv", 0).await;
    }

    let keys = |kvs: Vec<(Vec<u8>, Vec<u8>)>| kvs.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    // Forward, bounded, with a limit.
    let got = kv
        .raw_scan(
            b"s1",
            kvrpcpb::RawScanRequest {
                start_key: b("s1"),
                end_key: b("s4"),
                limit: 2,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(got, vec![(b("s1"), b("vs1")), (b("s2"), b("vs2"))]);
    // An unbounded end is clamped to the first region: no high keys.
    let got = kv
        .raw_scan(
            b"s1",
            kvrpcpb::RawScanRequest {
                start_key: b("s"),
                limit: 100,
                key_only: true,
                ..Default::default()
            },
        )
        .await;
    assert!(got.iter().all(|(_, v)| v.is_empty()), "{got:?}");
    assert_eq!(keys(got), vec![b("s1"), b("s2"), b("s3"), b("s4")]);
    // Reverse: the upper bound travels in start_key.
    let got = kv
        .raw_scan(
            b"s1",
            kvrpcpb::RawScanRequest {
                start_key: b("s4"),
                end_key: b("s2"),
                limit: 10,
                reverse: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(keys(got), vec![b("s3"), b("s2")]);
    // The second region, reverse from the unbounded top.
    let got = kv
        .raw_scan(
            &raw_high("h1"),
            kvrpcpb::RawScanRequest {
                limit: 10,
                reverse: true,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(keys(got), vec![raw_high("h2"), raw_high("h1")]);

    // Batch scan: each range gets its own limit.
    let resp = kv
        .c()
        .raw_batch_scan(kvrpcpb::RawBatchScanRequest {
            context: kv.raw_ctx(b"s1"),
            ranges: vec![
                kvrpcpb::KeyRange {
                    start_key: b("s1"),
                    end_key: b("s3"),
                },
                kvrpcpb::KeyRange {
                    start_key: b("s3"),
                    end_key: b("s9"),
                },
            ],
            each_limit: 1,
            ..Default::default()
        })
        .await
        .expect("batch scan")
        .into_inner();
    let got: Vec<_> = resp.kvs.into_iter().map(|p| p.key).collect();
    assert_eq!(got, vec![b("s1"), b("s3")]);

    // Compare-and-swap: absent → set; wrong expectation → unchanged.
    let cas = |expected: Option<&str>, value: &str| {
        let mut c = kv.c();
        let req = kvrpcpb::RawCasRequest {
            context: kv.raw_ctx(b"cas"),
            key: b("cas"),
            value: b(value),
            previous_not_exist: expected.is_none(),
            previous_value: expected.map(b).unwrap_or_default(),
            ..Default::default()
        };
        async move { c.raw_compare_and_swap(req).await.expect("cas").into_inner() }
    };
    let r = cas(None, "one").await;
    assert!(
        r.succeed && r.previous_not_exist && r.error.is_empty(),
        "{r:?}"
    );
    let r = cas(None, "two").await;
    assert!(!r.succeed && !r.previous_not_exist, "{r:?}");
    assert_eq!(r.previous_value, b("one"));
    let r = cas(Some("nope"), "two").await;
    assert!(!r.succeed && r.previous_value == b("one"), "{r:?}");
    let r = cas(Some("one"), "two").await;
    assert!(r.succeed && r.previous_value == b("one"), "{r:?}");
    assert_eq!(kv.raw_get(b"cas").await, Some(b("two")));

    // Delete range [s2, s4) leaves s1 and s4.
    let resp = kv
        .c()
        .raw_delete_range(kvrpcpb::RawDeleteRangeRequest {
            context: kv.raw_ctx(b"s2"),
            start_key: b("s2"),
            end_key: b("s4"),
            ..Default::default()
        })
        .await
        .expect("delete range")
        .into_inner();
    assert!(
        resp.error.is_empty() && resp.region_error.is_none(),
        "{resp:?}"
    );
    let got = kv
        .raw_scan(
            b"s1",
            kvrpcpb::RawScanRequest {
                start_key: b("s"),
                end_key: b("t"),
                limit: 10,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(keys(got), vec![b("s1"), b("s4")]);
    assert_eq!(kv.raw_get(&raw_high("h1")).await, Some(b("hv")));
}

#[tokio::test]
async fn get_reports_the_commit_ts_only_when_asked() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let first = kv.write(&[(b"nc", b"v1")]).await;
    let second = kv.write(&[(b"nc", b"v2")]).await;
    assert!(second > first);
    let now = kv.ts();
    let get = async |version: u64, need_commit_ts: bool| {
        kv.c()
            .kv_get(kvrpcpb::GetRequest {
                context: kv.txn_ctx(b"nc"),
                key: b("nc"),
                version,
                need_commit_ts,
            })
            .await
            .expect("get")
            .into_inner()
    };

    let latest = get(now, true).await;
    assert_eq!((latest.value, latest.commit_ts), (b("v2"), second));
    // Between the two commits the older version, with its own commit_ts.
    let older = get(second - 1, true).await;
    assert_eq!((older.value, older.commit_ts), (b("v1"), first));
    // Not asked: 0, which kvrpcpb defines as unknown.
    let unasked = get(now, false).await;
    assert_eq!((unasked.value, unasked.commit_ts), (b("v2"), 0));
    // Nothing there yet: not found, no commit_ts.
    let before = get(first - 1, true).await;
    assert!(before.not_found && before.commit_ts == 0, "{before:?}");
}

#[tokio::test]
async fn prewrite_commit_round_trip_and_scans() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let before = kv.ts();
    let commit = kv
        .write(&[(b"t1", b"v1"), (b"t2", b"v2"), (b"t3", &[7u8; 1000])])
        .await;
    let after = kv.ts();
    assert!(commit > before);

    assert_eq!(kv.value(b"t1", before).await, None);
    assert_eq!(kv.value(b"t1", after).await, Some(b("v1")));
    assert_eq!(kv.value(b"t3", after).await, Some(vec![7u8; 1000]));
    assert_eq!(kv.value(b"t1", commit).await, Some(b("v1")));

    let resp = kv
        .c()
        .kv_batch_get(kvrpcpb::BatchGetRequest {
            context: kv.txn_ctx(b"t1"),
            keys: vec![b("t2"), b("nothing"), b("t1")],
            version: after,
            ..Default::default()
        })
        .await
        .expect("batch get")
        .into_inner();
    let got: Vec<_> = resp
        .pairs
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    assert_eq!(got, vec![(b("t2"), b("v2")), (b("t1"), b("v1"))]);

    let scan = |start: &str, end: &str, reverse: bool, key_only: bool| {
        let mut c = kv.c();
        let req = kvrpcpb::ScanRequest {
            context: kv.txn_ctx(b"t1"),
            start_key: b(start),
            end_key: b(end),
            limit: 10,
            version: after,
            key_only,
            reverse,
            ..Default::default()
        };
        async move {
            let resp = c.kv_scan(req).await.expect("scan").into_inner();
            assert!(
                resp.region_error.is_none() && resp.error.is_none(),
                "{resp:?}"
            );
            resp.pairs
                .into_iter()
                .map(|p| (p.key, p.value))
                .collect::<Vec<_>>()
        }
    };
    let got = scan("t", "t3", false, false).await;
    assert_eq!(got, vec![(b("t1"), b("v1")), (b("t2"), b("v2"))]);
    let got = scan("t3", "t1", true, true).await;
    assert_eq!(got, vec![(b("t2"), Vec::new()), (b("t1"), Vec::new())]);
    // The first region's upper bound is clamped: a high key is not seen.
    kv.write(&[(&txn_high("x"), b"hx")]).await;
    let late = kv.ts();
    assert_eq!(kv.value(&txn_high("x"), late).await, Some(b("hx")));
    let got = scan("t", "", false, true).await;
    assert_eq!(got.len(), 3, "{got:?}");

    // A delete commits as absence.
    let start = kv.ts();
    let resp = kv
        .prewrite(vec![op(Op::Del, b"t2")], b"t2", start, 3000)
        .await;
    assert!(resp.errors.is_empty(), "{resp:?}");
    let commit = kv.ts();
    assert!(kv.commit(&[b("t2")], start, commit).await.error.is_none());
    assert_eq!(kv.value(b"t2", kv.ts()).await, None);
}

#[tokio::test]
async fn locked_reads_report_the_lock_and_resolution_clears_it() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let start = kv.ts();
    let resp = kv
        .prewrite(
            vec![put(b"l1", b"x"), put(b"l2", b"y")],
            b"l1",
            start,
            20_000,
        )
        .await;
    assert!(resp.errors.is_empty(), "{resp:?}");
    let read_ts = kv.ts();

    let resp = kv.get(b"l2", read_ts).await;
    let lock = resp
        .error
        .and_then(|e| e.locked)
        .expect("get reports the lock");
    assert_eq!(lock.primary_lock, b("l1"));
    assert_eq!(lock.key, b("l2"));
    assert_eq!(lock.lock_version, start);
    assert_eq!(lock.lock_ttl, 20_000);
    assert_eq!(lock.lock_type, Op::Put as i32);
    // A reader below the lock is not blocked.
    assert!(kv.get(b"l2", start - 1).await.error.is_none());

    let resp = kv
        .c()
        .kv_batch_get(kvrpcpb::BatchGetRequest {
            context: kv.txn_ctx(b"l1"),
            keys: vec![b("l1"), b("l2")],
            version: read_ts,
            ..Default::default()
        })
        .await
        .expect("batch get")
        .into_inner();
    assert_eq!(resp.pairs.len(), 2);
    assert!(
        resp.pairs
            .iter()
            .all(|p| p.error.as_ref().is_some_and(|e| e.locked.is_some()))
    );

    let resp = kv
        .c()
        .kv_scan(kvrpcpb::ScanRequest {
            context: kv.txn_ctx(b"l1"),
            start_key: b("l"),
            end_key: b("m"),
            limit: 10,
            version: read_ts,
            ..Default::default()
        })
        .await
        .expect("scan")
        .into_inner();
    let locked: Vec<_> = resp
        .pairs
        .iter()
        .filter_map(|p| p.error.as_ref()?.locked.as_ref().map(|l| l.key.clone()))
        .collect();
    assert_eq!(locked, vec![b("l1"), b("l2")]);

    // Resolved locks let the reader through.
    let mut context = kv.txn_ctx(b"l2");
    if let Some(c) = context.as_mut() {
        c.resolved_locks = vec![start];
    }
    let resp = kv
        .c()
        .kv_get(kvrpcpb::GetRequest {
            context,
            key: b("l2"),
            version: read_ts,
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert!(resp.error.is_none() && resp.not_found, "{resp:?}");

    // Scan lock finds both; resolving the transaction as committed clears
    // them and makes the values visible.
    let keys: Vec<_> = kv.locks(read_ts).await.into_iter().map(|l| l.key).collect();
    assert_eq!(keys, vec![b("l1"), b("l2")]);
    let commit = kv.ts();
    let resp = kv
        .c()
        .kv_resolve_lock(kvrpcpb::ResolveLockRequest {
            context: kv.txn_ctx(b"l1"),
            start_version: start,
            commit_version: commit,
            ..Default::default()
        })
        .await
        .expect("resolve lock")
        .into_inner();
    assert!(
        resp.error.is_none() && resp.region_error.is_none(),
        "{resp:?}"
    );
    assert!(kv.locks(kv.ts()).await.is_empty());
    assert_eq!(kv.value(b"l2", kv.ts()).await, Some(b("y")));

    // Batched resolution rolls back another transaction.
    let start2 = kv.ts();
    let resp = kv
        .prewrite(vec![put(b"l3", b"z")], b"l3", start2, 20_000)
        .await;
    assert!(resp.errors.is_empty(), "{resp:?}");
    let resp = kv
        .c()
        .kv_resolve_lock(kvrpcpb::ResolveLockRequest {
            context: kv.txn_ctx(b"l3"),
            txn_infos: vec![kvrpcpb::TxnInfo {
                txn: start2,
                status: 0,
            }],
            ..Default::default()
        })
        .await
        .expect("batched resolve lock")
        .into_inner();
    assert!(resp.error.is_none(), "{resp:?}");
    assert_eq!(kv.value(b"l3", kv.ts()).await, None);
}

#[tokio::test]
async fn conflicts_and_constraints_are_key_errors() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let early = kv.ts();
    let commit = kv.write(&[(b"c1", b"first")]).await;

    // An optimistic transaction that started before the commit conflicts.
    let resp = kv
        .prewrite(vec![put(b"c1", b"late")], b"c1", early, 3000)
        .await;
    let conflict = resp
        .errors
        .first()
        .and_then(|e| e.conflict.clone())
        .expect("write conflict");
    assert_eq!(conflict.start_ts, early);
    assert_eq!(conflict.conflict_commit_ts, commit);
    assert_eq!(conflict.key, b("c1"));

    // Insert of an existing key.
    let start = kv.ts();
    let resp = kv
        .prewrite(vec![op(Op::Insert, b"c1")], b"c1", start, 3000)
        .await;
    let exists = resp.errors.first().and_then(|e| e.already_exist.clone());
    assert_eq!(exists.map(|e| e.key), Some(b("c1")));

    // A second prewrite meets the first one's lock.
    let s1 = kv.ts();
    assert!(
        kv.prewrite(vec![put(b"c2", b"a")], b"c2", s1, 3000)
            .await
            .errors
            .is_empty()
    );
    let s2 = kv.ts();
    let resp = kv.prewrite(vec![put(b"c2", b"b")], b"c2", s2, 3000).await;
    let lock = resp.errors.first().and_then(|e| e.locked.clone());
    assert_eq!(lock.map(|l| l.lock_version), Some(s1));

    // Commit below the lock's min_commit_ts is refused as expired.
    let s3 = kv.ts();
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: kv.txn_ctx(b"c3"),
            mutations: vec![put(b"c3", b"v")],
            primary_lock: b("c3"),
            start_version: s3,
            lock_ttl: 3000,
            min_commit_ts: s3 + 100,
            ..Default::default()
        })
        .await
        .expect("prewrite")
        .into_inner();
    assert!(resp.errors.is_empty(), "{resp:?}");
    let resp = kv.commit(&[b("c3")], s3, s3 + 1).await;
    let expired = resp
        .error
        .and_then(|e| e.commit_ts_expired)
        .expect("expired");
    assert_eq!(expired.min_commit_ts, s3 + 100);
    kv.observe(s3 + 100);

    // Rolling back s1, then committing it, fails without a lock.
    let resp = kv
        .c()
        .kv_batch_rollback(kvrpcpb::BatchRollbackRequest {
            context: kv.txn_ctx(b"c2"),
            start_version: s1,
            keys: vec![b("c2")],
        })
        .await
        .expect("rollback")
        .into_inner();
    assert!(resp.error.is_none(), "{resp:?}");
    let resp = kv.commit(&[b("c2")], s1, kv.ts()).await;
    assert!(resp.error.is_some_and(|e| !e.retryable.is_empty()));
}

#[tokio::test]
async fn check_txn_status_covers_every_branch() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    let start = kv.ts();
    assert!(
        kv.prewrite(vec![put(b"p", b"v")], b"p", start, 5_000)
            .await
            .errors
            .is_empty()
    );

    // Locked and alive.
    let now = kv.ts();
    let resp = kv.check_txn_status(b"p", start, now, false).await;
    assert!(resp.error.is_none(), "{resp:?}");
    assert_eq!((resp.commit_version, resp.lock_ttl), (0, 5_000));
    assert_eq!(resp.lock_info.map(|l| l.lock_version), Some(start));

    // Heartbeat extends the TTL.
    let resp = kv
        .c()
        .kv_txn_heart_beat(kvrpcpb::TxnHeartBeatRequest {
            context: kv.txn_ctx(b"p"),
            primary_lock: b("p"),
            start_version: start,
            advise_lock_ttl: 9_000,
            ..Default::default()
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!(resp.lock_ttl, 9_000, "{resp:?}");

    // Expired (the caller's clock is ahead, within the allowed drift):
    // rolled back now.
    let physical = TimeStamp::new(start).physical();
    let later = TimeStamp::compose(physical + 30_000, 0).into_inner();
    let resp = kv.check_txn_status(b"p", start, later, false).await;
    assert_eq!(resp.action, kvrpcpb::Action::TtlExpireRollback as i32);
    assert_eq!((resp.commit_version, resp.lock_ttl), (0, 0));
    // Asking again: already rolled back.
    let resp = kv.check_txn_status(b"p", start, later, false).await;
    assert_eq!(resp.action, kvrpcpb::Action::NoAction as i32);
    assert!(resp.lock_info.is_none() && resp.commit_version == 0);

    // Committed.
    let (q_start, commit) = kv.write_txn(&[(b"q", b"v")]).await;
    assert!(kv.locks(kv.ts()).await.is_empty());
    let resp = kv.check_txn_status(b"q", q_start, kv.ts(), false).await;
    assert_eq!(
        (resp.commit_version, resp.lock_ttl),
        (commit, 0),
        "{resp:?}"
    );

    // Never seen: txn_not_found, then rolled back on request.
    let ghost = kv.ts();
    let resp = kv.check_txn_status(b"ghost", ghost, kv.ts(), false).await;
    let nf = resp
        .error
        .and_then(|e| e.txn_not_found)
        .expect("txn_not_found");
    assert_eq!((nf.start_ts, nf.primary_key), (ghost, b("ghost")));
    let resp = kv.check_txn_status(b"ghost", ghost, kv.ts(), true).await;
    assert_eq!(resp.action, kvrpcpb::Action::LockNotExistRollback as i32);
    // The rollback mark now refuses the late prewrite.
    let resp = kv
        .prewrite(vec![put(b"ghost", b"v")], b"ghost", ghost, 3000)
        .await;
    assert!(
        resp.errors.first().is_some_and(|e| e.conflict.is_some()),
        "{resp:?}"
    );

    // Cleanup of a committed key answers with its commit ts.
    let resp = kv
        .c()
        .kv_cleanup(kvrpcpb::CleanupRequest {
            context: kv.txn_ctx(b"q"),
            key: b("q"),
            start_version: q_start,
            current_ts: 0,
        })
        .await
        .expect("cleanup")
        .into_inner();
    assert_eq!(resp.commit_version, commit, "{resp:?}");
}

#[tokio::test]
async fn pessimistic_lock_returns_values_in_request_order() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;
    kv.write(&[(b"pa", b"va")]).await;
    let start = kv.ts();
    let lock_req = |start: u64, return_values: bool| kvrpcpb::PessimisticLockRequest {
        context: kv.txn_ctx(b"pa"),
        mutations: vec![
            op(Op::PessimisticLock, b"pb"),
            op(Op::PessimisticLock, b"pa"),
        ],
        primary_lock: b("pa"),
        start_version: start,
        lock_ttl: 20_000,
        for_update_ts: start,
        return_values,
        ..Default::default()
    };
    let resp = kv
        .c()
        .kv_pessimistic_lock(lock_req(start, true))
        .await
        .expect("pessimistic lock")
        .into_inner();
    assert!(
        resp.errors.is_empty() && resp.region_error.is_none(),
        "{resp:?}"
    );
    assert_eq!(resp.values, vec![Vec::new(), b("va")]);
    assert_eq!(resp.not_founds, vec![true, false]);

    // Another transaction is blocked by the pessimistic locks.
    let other = kv.ts();
    let resp = kv
        .c()
        .kv_pessimistic_lock(lock_req(other, false))
        .await
        .expect("pessimistic lock")
        .into_inner();
    let lock = resp
        .errors
        .first()
        .and_then(|e| e.locked.clone())
        .expect("locked");
    assert_eq!(lock.lock_version, start);
    assert_eq!(lock.lock_type, Op::PessimisticLock as i32);

    // Prewrite (with the pessimistic check) and commit.
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: kv.txn_ctx(b"pa"),
            mutations: vec![put(b"pa", b"new-a"), put(b"pb", b"new-b")],
            primary_lock: b("pa"),
            start_version: start,
            lock_ttl: 20_000,
            for_update_ts: start,
            // tikv-client sends the whole transaction's action list to
            // every region it prewrites in; extra entries are ignored.
            pessimistic_actions: vec![1, 1, 1],
            ..Default::default()
        })
        .await
        .expect("prewrite")
        .into_inner();
    assert!(resp.errors.is_empty(), "{resp:?}");
    let commit = kv.ts();
    assert!(
        kv.commit(&[b("pa"), b("pb")], start, commit)
            .await
            .error
            .is_none()
    );
    assert_eq!(kv.value(b"pb", kv.ts()).await, Some(b("new-b")));

    // A pessimistic lock that is rolled back leaves the key writable.
    let s = kv.ts();
    let resp = kv
        .c()
        .kv_pessimistic_lock(lock_req(s, false))
        .await
        .expect("lock")
        .into_inner();
    assert!(resp.errors.is_empty() && resp.values.is_empty(), "{resp:?}");
    let resp = kv
        .c()
        .kv_pessimistic_rollback(kvrpcpb::PessimisticRollbackRequest {
            context: kv.txn_ctx(b"pa"),
            start_version: s,
            for_update_ts: s,
            keys: vec![b("pa"), b("pb")],
        })
        .await
        .expect("pessimistic rollback")
        .into_inner();
    assert!(resp.errors.is_empty(), "{resp:?}");
    kv.write(&[(b"pa", b"after")]).await;
}

#[tokio::test]
async fn one_pc_and_async_commit() {
    let server = TestServer::start();
    let kv = Kv::connect(&server).await;

    // 1PC commits at once and says at which ts; without it the ts is 0.
    let start = kv.ts();
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: kv.txn_ctx(b"o1"),
            mutations: vec![put(b"o1", b"v")],
            primary_lock: b("o1"),
            start_version: start,
            lock_ttl: 3000,
            try_one_pc: true,
            ..Default::default()
        })
        .await
        .expect("1pc prewrite")
        .into_inner();
    assert!(resp.errors.is_empty(), "{resp:?}");
    assert!(resp.one_pc_commit_ts > start, "{resp:?}");
    kv.observe(resp.one_pc_commit_ts);
    assert_eq!(kv.value(b"o1", kv.ts()).await, Some(b("v")));
    let resp = kv
        .prewrite(vec![put(b"o2", b"v")], b"o2", kv.ts(), 3000)
        .await;
    assert_eq!(resp.one_pc_commit_ts, 0, "{resp:?}");

    // Async commit: the primary records the secondaries; the secondary's
    // lock is reported by CheckSecondaryLocks.
    let start = kv.ts();
    let resp = kv
        .c()
        .kv_prewrite(kvrpcpb::PrewriteRequest {
            context: kv.txn_ctx(b"a1"),
            mutations: vec![put(b"a1", b"x"), put(b"a2", b"y")],
            primary_lock: b("a1"),
            start_version: start,
            lock_ttl: 3000,
            use_async_commit: true,
            secondaries: vec![b("a2")],
            ..Default::default()
        })
        .await
        .expect("async prewrite")
        .into_inner();
    assert!(resp.errors.is_empty(), "{resp:?}");
    assert!(resp.min_commit_ts > start, "{resp:?}");
    let resp = kv
        .c()
        .kv_check_secondary_locks(kvrpcpb::CheckSecondaryLocksRequest {
            context: kv.txn_ctx(b"a2"),
            keys: vec![b("a2")],
            start_version: start,
        })
        .await
        .expect("check secondary locks")
        .into_inner();
    assert_eq!(resp.locks.len(), 1, "{resp:?}");
    assert!(resp.locks[0].use_async_commit);
    assert_eq!(resp.commit_ts, 0);
}
