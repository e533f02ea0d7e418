//! Live change events through the real storage libraries: every kind of
//! transactional write, raw writes, filters, ranges, old values, batching,
//! and batches that must produce nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Env, Events, delete, env, put, register, register_raw};
use kvfeed_cdc::{Connection, EVENT_MAX_ROW_BYTES};
use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_proto::cdcpb::event::{self, LogType, Row, row::OpType};
use kvfeed_proto::kvrpcpb::ExtraOp;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{
    PessimisticAction, PessimisticKey, PessimisticLockRequest, PrewriteRequest, encode_bytes,
};
use prost::Message;

/// A connection with one subscription per request, each answered. Each
/// starts from now (a fresh checkpoint), so earlier writes are not part of
/// its catch-up scan: these tests are about live rows.
async fn subscribe(env: &Env, requests: Vec<ChangeDataRequest>) -> (Connection, Events) {
    let (mut conn, mut events) = env.connect();
    for mut req in requests {
        req.checkpoint_ts = env.ts().into_inner();
        let (request_id, region_id) = (req.request_id, req.region_id);
        conn.handle(req).await.expect("handle");
        events.expect_initialized(request_id, region_id).await;
    }
    (conn, events)
}

/// Everything queued after the feed settled, as rows (no errors expected).
async fn rows_now(env: &Env, events: &mut Events) -> Vec<(u64, Row)> {
    env.settle().await;
    let mut rows = Vec::new();
    while let Some(item) = events.try_next() {
        rows.push((item.ids().0, item.row().clone()));
    }
    rows
}

fn kind(row: &Row) -> (LogType, OpType) {
    (
        LogType::try_from(row.r#type).expect("log type"),
        OpType::try_from(row.op_type).expect("op type"),
    )
}

fn ts(row: &Row) -> (TimeStamp, TimeStamp) {
    (TimeStamp::new(row.start_ts), TimeStamp::new(row.commit_ts))
}

#[tokio::test(start_paused = true)]
async fn optimistic_two_phase_commit() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let start = env.prewrite(vec![put(b"k1", b"v1"), delete(b"k2")]);
    let prewrites = rows_now(&env, &mut events).await;
    assert_eq!(prewrites.len(), 2);
    let (r1, r2) = (&prewrites[0].1, &prewrites[1].1);
    assert_eq!(kind(r1), (LogType::Prewrite, OpType::Put));
    assert_eq!(
        (r1.key.as_ref(), r1.value.as_ref()),
        (&b"k1"[..], &b"v1"[..])
    );
    assert_eq!(kind(r2), (LogType::Prewrite, OpType::Delete));
    assert_eq!(r2.key, b"k2".to_vec());
    assert!(
        prewrites
            .iter()
            .all(|(_, r)| ts(r) == (start, TimeStamp::ZERO))
    );

    let commit = env.commit(&[b"k1", b"k2"], start);
    let commits = rows_now(&env, &mut events).await;
    let got: Vec<_> = commits
        .iter()
        .map(|(_, r)| (kind(r), r.key.to_vec(), r.value.to_vec(), ts(r)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                (LogType::Commit, OpType::Put),
                b"k1".to_vec(),
                b"v1".to_vec(),
                (start, commit)
            ),
            (
                (LogType::Commit, OpType::Delete),
                b"k2".to_vec(),
                Vec::new(),
                (start, commit)
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn pessimistic_transaction() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let start = env.ts();
    let for_update = env.ts();
    env.txn
        .acquire_pessimistic_lock(&PessimisticLockRequest {
            keys: vec![PessimisticKey {
                key: b"p".to_vec(),
                should_not_exist: false,
            }],
            primary: b"p".to_vec(),
            start_ts: start,
            for_update_ts: for_update,
            lock_ttl: 3000,
            ..PessimisticLockRequest::default()
        })
        .expect("lock");
    assert!(
        rows_now(&env, &mut events).await.is_empty(),
        "no row for a pessimistic lock"
    );

    let mut m = put(b"p", b"pv");
    m.pessimistic_action = PessimisticAction::DoPessimisticCheck;
    env.prewrite_at(start, vec![m], |req| req.for_update_ts = for_update);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(kind(&rows[0].1), (LogType::Prewrite, OpType::Put));
    assert_eq!(rows[0].1.value, b"pv".to_vec());

    let commit = env.commit(&[b"p"], start);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(kind(&rows[0].1), (LogType::Commit, OpType::Put));
    assert_eq!(ts(&rows[0].1), (start, commit));
}

#[tokio::test(start_paused = true)]
async fn one_phase_commits_are_committed_rows() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let start = env.ts();
    let large = vec![b'L'; 1000];
    let outcome = env
        .txn
        .prewrite(&PrewriteRequest {
            mutations: vec![put(b"a", b"short"), put(b"b", &large)],
            primary: b"a".to_vec(),
            start_ts: start,
            lock_ttl: 3000,
            try_one_pc: true,
            ..PrewriteRequest::default()
        })
        .expect("1pc");
    let commit = outcome.one_pc_commit_ts;
    assert!(!commit.is_zero());
    let rows = rows_now(&env, &mut events).await;
    let got: Vec<_> = rows
        .iter()
        .map(|(_, r)| (kind(r), r.value.to_vec(), ts(r)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                (LogType::Committed, OpType::Put),
                b"short".to_vec(),
                (start, commit)
            ),
            ((LogType::Committed, OpType::Put), large, (start, commit)),
        ]
    );

    // A pessimistic transaction's 1PC removes its pessimistic lock; that is
    // still one phase (no PREWRITE was ever sent).
    let start = env.ts();
    let for_update = env.ts();
    env.txn
        .acquire_pessimistic_lock(&PessimisticLockRequest {
            keys: vec![PessimisticKey {
                key: b"c".to_vec(),
                should_not_exist: false,
            }],
            primary: b"c".to_vec(),
            start_ts: start,
            for_update_ts: for_update,
            lock_ttl: 3000,
            ..PessimisticLockRequest::default()
        })
        .expect("lock");
    let mut m = put(b"c", b"cv");
    m.pessimistic_action = PessimisticAction::DoPessimisticCheck;
    let outcome = env
        .txn
        .prewrite(&PrewriteRequest {
            mutations: vec![m],
            primary: b"c".to_vec(),
            start_ts: start,
            for_update_ts: for_update,
            lock_ttl: 3000,
            try_one_pc: true,
            ..PrewriteRequest::default()
        })
        .expect("pessimistic 1pc");
    assert!(!outcome.one_pc_commit_ts.is_zero());
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(kind(&rows[0].1), (LogType::Committed, OpType::Put));
    assert_eq!(ts(&rows[0].1), (start, outcome.one_pc_commit_ts));
}

#[tokio::test(start_paused = true)]
async fn rollback_rows() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let start = env.prewrite(vec![put(b"r", b"rv")]);
    env.txn
        .batch_rollback(&[b"r".to_vec()], start)
        .expect("rollback");
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(kind(&rows[0].1), (LogType::Prewrite, OpType::Put));
    assert_eq!(LogType::try_from(rows[1].1.r#type), Ok(LogType::Rollback));
    assert_eq!(ts(&rows[1].1), (start, TimeStamp::ZERO));
    assert_eq!(rows[1].1.key, b"r".to_vec());

    // Rolling back a transaction that never locked the key only leaves a
    // protective record: no row.
    let absent = env.ts();
    env.txn
        .batch_rollback(&[b"r".to_vec()], absent)
        .expect("protective rollback");
    assert!(rows_now(&env, &mut events).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_large_value_travels_with_the_prewrite() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let value = vec![b'x'; 300];
    let start = env.prewrite(vec![put(b"big", &value)]);
    // A heartbeat rewrites the lock without its value: not reported again.
    env.txn
        .txn_heart_beat(b"big", start, 10_000)
        .expect("heartbeat");
    env.commit(&[b"big"], start);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(kind(&rows[0].1), (LogType::Prewrite, OpType::Put));
    assert_eq!(rows[0].1.value, value);
    assert_eq!(kind(&rows[1].1), (LogType::Commit, OpType::Put));
    assert!(
        rows[1].1.value.is_empty(),
        "matched with the prewrite by the client"
    );
}

#[tokio::test(start_paused = true)]
async fn raw_writes_go_to_raw_subscriptions_only() {
    let env = env();
    let region = env.region_a();
    let (_conn, mut events) = subscribe(
        &env,
        vec![register(1, &region), register_raw(2, &region, b"", b"")],
    )
    .await;
    let put_ts = env.raw.put(b"rk", b"rv", Some(100)).expect("raw put");
    let del_ts = env.raw.delete(b"rk").expect("raw delete");
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|(request, _)| *request == 2));
    let (p, d) = (&rows[0].1, &rows[1].1);
    assert_eq!(kind(p), (LogType::Committed, OpType::Put));
    assert_eq!(ts(p), (put_ts, put_ts));
    assert_eq!((p.key.as_ref(), p.value.as_ref()), (&b"rk"[..], &b"rv"[..]));
    assert!(p.expire_ts_unix_secs > 0);
    assert_eq!(kind(d), (LogType::Committed, OpType::Delete));
    assert_eq!(ts(d), (del_ts, del_ts));

    // And transactional rows go to the TiDB subscription only.
    env.put(b"tk", b"tv");
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|(request, _)| *request == 1));
}

#[tokio::test(start_paused = true)]
async fn txn_source_is_carried_and_filter_loop_drops_feed_writes() {
    let env = env();
    let region = env.region_a();
    let filtered = ChangeDataRequest {
        filter_loop: true,
        ..register(2, &region)
    };
    let (_conn, mut events) = subscribe(&env, vec![register(1, &region), filtered]).await;

    let start = env.ts();
    env.prewrite_at(start, vec![put(b"s", b"v")], |r| r.txn_source = 0x0301);
    env.commit(&[b"s"], start);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|(request, r)| *request == 1 && r.txn_source == 0x0301)
    );

    // Only the low 8 bits mark a change feed's own writes.
    let start = env.ts();
    env.prewrite_at(start, vec![put(b"s", b"w")], |r| r.txn_source = 0x0300);
    let rows = rows_now(&env, &mut events).await;
    let mut requests: Vec<u64> = rows.iter().map(|(request, _)| *request).collect();
    requests.sort_unstable();
    assert_eq!(requests, vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn overlapping_subscriptions_get_their_own_rows_and_ranges_are_honoured() {
    let env = env();
    let region = env.region_a();
    let ranged = |request_id, start: &[u8], end: &[u8]| ChangeDataRequest {
        start_key: encode_bytes(start),
        end_key: encode_bytes(end),
        ..register(request_id, &region)
    };
    let (_conn, mut events) =
        subscribe(&env, vec![ranged(1, b"a", b"m"), ranged(2, b"f", b"z")]).await;
    let start = env.prewrite(vec![
        put(b"b", b"1"),
        put(b"g", b"2"),
        put(b"x", b"3"),
        put(b"zz", b"4"),
    ]);
    env.commit(&[b"b", b"g", b"x", b"zz"], start);
    let rows = rows_now(&env, &mut events).await;
    let mut seen: Vec<(u64, Vec<u8>, LogType)> = rows
        .iter()
        .map(|(request, r)| (*request, r.key.to_vec(), kind(r).0))
        .collect();
    seen.sort();
    let mut want = Vec::new();
    for (request, key) in [(1, &b"b"[..]), (1, b"g"), (2, b"g"), (2, b"x")] {
        want.push((request, key.to_vec(), LogType::Prewrite));
        want.push((request, key.to_vec(), LogType::Commit));
    }
    want.sort();
    assert_eq!(seen, want);
}

#[tokio::test(start_paused = true)]
async fn rows_of_one_key_keep_apply_order() {
    let env = env();
    let (_conn, mut events) = subscribe(&env, vec![register(1, &env.region_a())]).await;
    let mut want = Vec::new();
    for i in 0..5u8 {
        let (start, commit) = env.put(b"same", &[i]);
        want.push((LogType::Prewrite, start, TimeStamp::ZERO));
        want.push((LogType::Commit, start, commit));
    }
    let rows = rows_now(&env, &mut events).await;
    let got: Vec<_> = rows
        .iter()
        .map(|(_, r)| (kind(r).0, ts(r).0, ts(r).1))
        .collect();
    assert_eq!(got, want);
}

#[tokio::test(start_paused = true)]
async fn old_values_for_subscribers_that_ask() {
    let env = env();
    let region = env.region_a();
    env.put(b"o", b"v1");
    let with_old = ChangeDataRequest {
        extra_op: ExtraOp::ReadOldValue as i32,
        ..register(2, &region)
    };
    let (_conn, mut events) = subscribe(&env, vec![register(1, &region), with_old]).await;

    let start = env.prewrite(vec![put(b"o", b"v2"), put(b"fresh", b"f")]);
    let rows = rows_now(&env, &mut events).await;
    let old_of = |rows: &[(u64, Row)], request: u64, key: &[u8]| {
        rows.iter()
            .find(|(r, row)| *r == request && row.key == key)
            .map(|(_, row)| row.old_value.clone())
            .expect("row present")
    };
    assert_eq!(old_of(&rows, 2, b"o"), b"v1".to_vec());
    assert_eq!(old_of(&rows, 1, b"o"), Vec::<u8>::new(), "not asked for");
    assert_eq!(old_of(&rows, 2, b"fresh"), Vec::<u8>::new(), "no history");
    env.commit(&[b"o", b"fresh"], start);
    let rows = rows_now(&env, &mut events).await;
    assert!(
        rows.iter().all(|(_, r)| r.old_value.is_empty()),
        "not on COMMIT"
    );

    let start = env.prewrite(vec![delete(b"o")]);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(old_of(&rows, 2, b"o"), b"v2".to_vec());
    env.commit(&[b"o"], start);
    rows_now(&env, &mut events).await;

    // A one-phase commit reports the value it replaced (here: deleted).
    let start = env.ts();
    env.prewrite_at(start, vec![put(b"o", b"v3")], |r| r.try_one_pc = true);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(kind(&rows[0].1).0, LogType::Committed);
    assert_eq!(old_of(&rows, 2, b"o"), Vec::<u8>::new());
    let start = env.ts();
    env.prewrite_at(start, vec![put(b"o", b"v4")], |r| r.try_one_pc = true);
    let rows = rows_now(&env, &mut events).await;
    assert_eq!(old_of(&rows, 2, b"o"), b"v3".to_vec());
}

#[tokio::test(start_paused = true)]
async fn many_rows_are_batched_into_events_of_at_most_32_kib() {
    let env = env();
    let (_conn, mut events) =
        subscribe(&env, vec![register_raw(1, &env.region_a(), b"", b"")]).await;
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..1000)
        .map(|i| (format!("b{i:04}").into_bytes(), vec![b'v'; 100]))
        .collect();
    env.raw.batch_put(&pairs, &[]).expect("batch put");
    let rows = rows_now(&env, &mut events).await;
    let keys: Vec<Vec<u8>> = rows.iter().map(|(_, r)| r.key.to_vec()).collect();
    let want: Vec<Vec<u8>> = pairs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, want, "every row, in order");

    let batches: Vec<usize> = events
        .entries_events
        .iter()
        .filter_map(|e| match &e.event {
            Some(event::Event::Entries(entries)) if entries.entries.len() > 1 => {
                Some(entries.entries.iter().map(Row::encoded_len).sum())
            }
            _ => None,
        })
        .collect();
    let total: usize = rows.iter().map(|(_, r)| r.encoded_len()).sum();
    assert!(total > 3 * EVENT_MAX_ROW_BYTES);
    assert!(
        batches.len() >= total.div_ceil(EVENT_MAX_ROW_BYTES),
        "{batches:?}"
    );
    assert!(
        batches.iter().all(|&b| b <= EVENT_MAX_ROW_BYTES),
        "{batches:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn garbage_collection_produces_nothing() {
    let env = env();
    let region = env.region_a();
    for i in 0..3u8 {
        env.put(b"g", &[i]);
        env.raw.put(b"rg", &[i], None).expect("raw put");
    }
    env.raw.delete(b"rg").expect("raw delete");
    let (_conn, mut events) = subscribe(
        &env,
        vec![register(1, &region), register_raw(2, &region, b"", b"")],
    )
    .await;
    let safe_point = env.ts();
    let stats = env.txn.gc(safe_point, b"", b"").expect("gc");
    assert!(stats.deleted_writes > 0, "{stats:?}");
    let raw_stats = env.raw.gc(safe_point).expect("raw gc");
    assert!(raw_stats.versions_removed > 0);
    assert!(rows_now(&env, &mut events).await.is_empty());
}
