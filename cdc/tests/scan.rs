//! What a catch-up scan reports: versions after the checkpoint in commit
//! order per key, deletes, large values, locks as PREWRITE rows, raw
//! versions, old values and the loop filter; then exactly one INITIALIZED,
//! then live rows, with the scan/live boundary neither gapped nor repeated.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::BTreeSet;

use common::{Env, Events, delete, env, env_with, put, register, register_raw};
use kvfeed_cdc::{Connection, FeedConfig};
use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_proto::cdcpb::event::{self, LogType, Row, row::OpType};
use kvfeed_proto::kvrpcpb::ExtraOp;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{PessimisticKey, PessimisticLockRequest, encode_bytes};

/// A connection that registered `req`: the rows before its INITIALIZED,
/// and the connection with its events (positioned after INITIALIZED).
struct Scanned {
    rows: Vec<Row>,
    _conn: Connection,
    events: Events,
}

async fn scan(env: &Env, req: ChangeDataRequest) -> Scanned {
    let (mut conn, mut events) = env.connect();
    let (request_id, region_id) = (req.request_id, req.region_id);
    conn.handle(req).await.expect("handle");
    let rows = rows_until_initialized(&mut events, request_id, region_id).await;
    Scanned {
        rows,
        _conn: conn,
        events,
    }
}

async fn rows_until_initialized(events: &mut Events, request_id: u64, region_id: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    loop {
        let item = events.expect().await;
        assert_eq!(item.ids(), (request_id, region_id), "{item:?}");
        if item.is_initialized() {
            return rows;
        }
        rows.push(item.row().clone());
    }
}

fn from(req: ChangeDataRequest, checkpoint: TimeStamp) -> ChangeDataRequest {
    ChangeDataRequest {
        checkpoint_ts: checkpoint.into_inner(),
        ..req
    }
}

fn kind(row: &Row) -> (LogType, OpType) {
    (
        LogType::try_from(row.r#type).expect("log type"),
        OpType::try_from(row.op_type).expect("op type"),
    )
}

/// (key, type, op, start_ts, commit_ts, value) of each row.
type Summary = (Vec<u8>, LogType, OpType, u64, u64, Vec<u8>);

fn summary(rows: &[Row]) -> Vec<Summary> {
    rows.iter()
        .map(|r| {
            let (t, op) = kind(r);
            (
                r.key.to_vec(),
                t,
                op,
                r.start_ts,
                r.commit_ts,
                r.value.to_vec(),
            )
        })
        .collect()
}

fn committed(key: &[u8], op: OpType, ts: (TimeStamp, TimeStamp), value: &[u8]) -> Summary {
    (
        key.to_vec(),
        LogType::Committed,
        op,
        ts.0.into_inner(),
        ts.1.into_inner(),
        value.to_vec(),
    )
}

#[tokio::test(start_paused = true)]
async fn only_versions_after_the_checkpoint_in_commit_order_per_key() {
    let env = env();
    let region = env.region_a();
    let a1 = env.put(b"a", b"a1");
    let b1 = env.put(b"b", b"b1");
    let checkpoint = env.ts();
    let a2 = env.put(b"a", b"a2");
    let start = env.prewrite(vec![delete(b"b")]);
    let b2 = (start, env.commit(&[b"b"], start));
    let a3 = env.put(b"a", b"a3");
    // A rolled-back transaction and a read lock leave write records that
    // change no value: skipped.
    let rolled = env.prewrite(vec![put(b"a", b"never")]);
    env.txn
        .batch_rollback(&[b"a".to_vec()], rolled)
        .expect("rollback");
    let c1 = env.commit_1pc(vec![put(b"c", b"c1")]);

    let rows = scan(&env, from(register(1, &region), checkpoint))
        .await
        .rows;
    assert_eq!(
        summary(&rows),
        vec![
            committed(b"a", OpType::Put, a2, b"a2"),
            committed(b"a", OpType::Put, a3, b"a3"),
            committed(b"b", OpType::Delete, b2, b""),
            committed(b"c", OpType::Put, c1, b"c1"),
        ]
    );
    assert!(a1.1 < checkpoint && b1.1 < checkpoint);

    // From checkpoint 0, everything, still oldest first per key.
    let rows = scan(&env, register(2, &region)).await.rows;
    let a: Vec<u64> = rows
        .iter()
        .filter(|r| r.key == b"a"[..])
        .map(|r| r.commit_ts)
        .collect();
    let want: Vec<u64> = [a1, a2, a3].iter().map(|t| t.1.into_inner()).collect();
    assert_eq!(a, want);
    assert_eq!(rows.len(), 6);
}

#[tokio::test(start_paused = true)]
async fn large_values_come_from_the_default_family() {
    let env = env();
    let region = env.region_a();
    let large = vec![b'L'; 4000];
    let small = env.put(b"s", b"short");
    let big = env.put(b"l", &large);
    let big_1pc = env.commit_1pc(vec![put(b"m", &large)]);
    let rows = scan(&env, register(1, &region)).await.rows;
    assert_eq!(
        summary(&rows),
        vec![
            committed(b"l", OpType::Put, big, &large),
            committed(b"m", OpType::Put, big_1pc, &large),
            committed(b"s", OpType::Put, small, b"short"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn locks_at_the_snapshot_are_prewrite_rows_after_the_keys_versions() {
    let env = env();
    let region = env.region_a();
    let large = vec![b'P'; 1000];
    let committed_first = env.put(b"k", b"old");
    let locked = env.prewrite(vec![
        put(b"k", b"new"),
        put(b"big", &large),
        delete(b"gone"),
    ]);
    // A pessimistic lock writes no data: no row.
    let pessimistic = env.ts();
    env.txn
        .acquire_pessimistic_lock(&PessimisticLockRequest {
            keys: vec![PessimisticKey {
                key: b"p".to_vec(),
                should_not_exist: false,
            }],
            primary: b"p".to_vec(),
            start_ts: pessimistic,
            for_update_ts: env.ts(),
            lock_ttl: 3000,
            ..PessimisticLockRequest::default()
        })
        .expect("pessimistic lock");

    let Scanned {
        rows,
        _conn,
        mut events,
    } = scan(&env, register(1, &region)).await;
    let prewrite = |key: &[u8], op, value: &[u8]| {
        (
            key.to_vec(),
            LogType::Prewrite,
            op,
            locked.into_inner(),
            0,
            value.to_vec(),
        )
    };
    assert_eq!(
        summary(&rows),
        vec![
            prewrite(b"big", OpType::Put, &large),
            prewrite(b"gone", OpType::Delete, b""),
            committed(b"k", OpType::Put, committed_first, b"old"),
            prewrite(b"k", OpType::Put, b"new"),
        ]
    );

    // The transaction commits live: COMMIT rows follow INITIALIZED, and the
    // client matches them with the scanned PREWRITEs.
    let commit = env.commit(&[b"k", b"big", b"gone"], locked);
    env.settle().await;
    let mut live = Vec::new();
    while let Some(item) = events.try_next() {
        live.push(item.row().clone());
    }
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|r| kind(r).0 == LogType::Commit
        && r.start_ts == locked.into_inner()
        && r.commit_ts == commit.into_inner()));
}

#[tokio::test(start_paused = true)]
async fn initialized_comes_once_after_the_scan_and_before_live_rows() {
    let env = env();
    let region = env.region_a();
    for i in 0..10u8 {
        env.put(&[b'k', i], &[i]);
    }
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    env.settle().await;
    env.put(b"live", b"v");
    env.settle().await;
    let mut items = Vec::new();
    while let Some(item) = events.try_next() {
        items.push(item);
    }
    let initialized: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_initialized())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        initialized,
        vec![10],
        "one INITIALIZED, after the 10 scanned rows"
    );
    assert!(
        items[..10]
            .iter()
            .all(|i| kind(i.row()).0 == LogType::Committed)
    );
    let live: Vec<LogType> = items[11..].iter().map(|i| kind(i.row()).0).collect();
    assert_eq!(live, vec![LogType::Prewrite, LogType::Commit]);

    // An empty range still gets its INITIALIZED.
    let empty = ChangeDataRequest {
        start_key: encode_bytes(b"x"),
        end_key: encode_bytes(b"y"),
        ..register(2, &region)
    };
    conn.handle(empty).await.expect("handle");
    events.expect_initialized(2, region.id.0).await;
}

#[tokio::test(start_paused = true)]
async fn raw_scans_report_versions_after_the_checkpoint() {
    let env = env();
    let region = env.region_a();
    let r1 = env.raw.put(b"r", b"1", None).expect("put");
    let checkpoint = env.ts();
    let r2 = env.raw.put(b"r", b"2", Some(60)).expect("put");
    let gone = env.raw.delete(b"r").expect("delete");
    let s = env.raw.put(b"s", b"s", None).expect("put");
    let outside = env.raw.put(b"t", b"t", None).expect("put");
    env.put(b"txn", b"not raw");
    let req = from(register_raw(1, &region, b"", b"t"), checkpoint);
    let rows = scan(&env, req).await.rows;
    let raw = |key: &[u8], op, ts: TimeStamp, value: &[u8]| {
        let t = ts.into_inner();
        (key.to_vec(), LogType::Committed, op, t, t, value.to_vec())
    };
    assert_eq!(
        summary(&rows),
        vec![
            raw(b"r", OpType::Put, r2, b"2"),
            raw(b"r", OpType::Delete, gone, b""),
            raw(b"s", OpType::Put, s, b"s"),
        ]
    );
    assert!(rows[0].expire_ts_unix_secs > 0, "the TTL travels");
    assert!(r1 < checkpoint && outside > checkpoint);
}

#[tokio::test(start_paused = true)]
async fn a_keys_long_history_spans_batches_in_order() {
    let env = env();
    let region = env.region_a();
    let mut want = Vec::new();
    for i in 0..2500u32 {
        want.push(env.raw.put(b"hot", &i.to_be_bytes(), None).expect("put"));
    }
    let Scanned { rows, events, .. } = scan(&env, register_raw(1, &region, b"", b"")).await;
    let got: Vec<TimeStamp> = rows.iter().map(|r| TimeStamp::new(r.commit_ts)).collect();
    assert_eq!(got, want);
    // Three batches (1024 rows at most each), each its own message.
    let scan_messages = events
        .messages
        .iter()
        .filter(|m| m.events.iter().any(|e| e.request_id == 1))
        .count();
    assert!(scan_messages >= 3, "{scan_messages}");
}

#[tokio::test(start_paused = true)]
async fn histories_stay_in_order_when_batches_end_inside_keys() {
    // Keys of 300 versions after the checkpoint (written interleaved, with
    // older ones before it): batches of 1024 rows end inside a key, and
    // the rest of that key comes next, in commit order. One key's history
    // is longer than a batch.
    let env = env();
    let region = env.region_a();
    let keys: [&[u8]; 5] = [b"h1", b"h2", b"h3", b"h4", b"h5"];
    for key in keys {
        env.put(key, b"before");
        env.raw.put(key, b"before", None).expect("put");
    }
    let checkpoint = env.ts();
    let (mut txn_want, mut raw_want) = (Vec::new(), Vec::new());
    for i in 0..300u32 {
        for key in keys {
            let value = i.to_be_bytes();
            txn_want.push(committed(key, OpType::Put, env.put(key, &value), &value));
            let ts = env.raw.put(key, &value, None).expect("put");
            raw_want.push(committed(key, OpType::Put, (ts, ts), &value));
        }
    }
    for i in 0..1100u32 {
        let value = i.to_be_bytes();
        txn_want.push(committed(
            b"long",
            OpType::Put,
            env.put(b"long", &value),
            &value,
        ));
    }
    // Scan order: by key, then oldest first.
    txn_want.sort_by(|a, b| (&a.0, a.4).cmp(&(&b.0, b.4)));
    raw_want.sort_by(|a, b| (&a.0, a.4).cmp(&(&b.0, b.4)));
    let txn = scan(&env, from(register(1, &region), checkpoint)).await;
    assert_eq!(summary(&txn.rows), txn_want);
    let raw = scan(&env, from(register_raw(2, &region, b"", b""), checkpoint)).await;
    assert_eq!(summary(&raw.rows), raw_want);
}

#[tokio::test(start_paused = true)]
async fn old_values_and_the_loop_filter_apply_to_scanned_rows() {
    let env = env();
    let region = env.region_a();
    env.put(b"o", b"v1");
    let checkpoint = env.ts();
    env.put(b"o", b"v2");
    let start = env.ts();
    env.prewrite_at(start, vec![put(b"o", b"v3")], |_| {});
    let looped = env.ts();
    env.prewrite_at(looped, vec![put(b"f", b"from a feed")], |r| {
        r.txn_source = 1
    });
    let req = ChangeDataRequest {
        extra_op: ExtraOp::ReadOldValue as i32,
        filter_loop: true,
        ..from(register(1, &region), checkpoint)
    };
    let rows = scan(&env, req).await.rows;
    let got: Vec<(LogType, Vec<u8>, Vec<u8>)> = rows
        .iter()
        .map(|r| (kind(r).0, r.value.to_vec(), r.old_value.to_vec()))
        .collect();
    assert_eq!(
        got,
        vec![
            (LogType::Committed, b"v2".to_vec(), b"v1".to_vec()),
            (LogType::Prewrite, b"v3".to_vec(), b"v2".to_vec()),
        ],
        "the looped lock on f is filtered out"
    );
}

#[tokio::test(start_paused = true)]
async fn live_writes_during_the_scan_follow_initialized_exactly_once() {
    // Two ordinary slots and no reading: the scan hands over a batch or two
    // and then waits for room, so writes made meanwhile land after its
    // snapshot and must come live, after INITIALIZED.
    let env = env_with(FeedConfig {
        sink_capacity: 2,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..6000u32)
        .map(|i| (format!("k{i:05}").into_bytes(), b"v".to_vec()))
        .collect();
    for chunk in pairs.chunks(1000) {
        env.raw.batch_put(chunk, &[]).expect("batch put");
    }
    let (mut conn, mut events) = env.connect();
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    // The first scanned row proves the snapshot was taken.
    let first = events.expect().await;
    assert_eq!(first.row().key, b"k00000".to_vec());
    let during = [
        env.raw.put(b"k00000", b"again", None).expect("put"),
        env.raw.put(b"k05999", b"again", None).expect("put"),
        env.raw.put(b"new", b"n", None).expect("put"),
    ];
    let mut scanned = 1;
    loop {
        let item = events.expect().await;
        if item.is_initialized() {
            break;
        }
        assert!(
            !during.contains(&TimeStamp::new(item.row().commit_ts)),
            "a write after the snapshot was scanned"
        );
        scanned += 1;
    }
    assert_eq!(scanned, 6000);
    env.settle().await;
    let mut live = Vec::new();
    while let Some(item) = events.try_next() {
        live.push(TimeStamp::new(item.row().commit_ts));
    }
    assert_eq!(live, during.to_vec(), "each live write once, in order");
}

#[tokio::test(start_paused = true)]
async fn scan_rows_are_never_mixed_into_other_messages() {
    let env = env();
    let region = env.region_a();
    for i in 0..50u8 {
        env.put(&[b's', i], b"v");
    }
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    conn.handle(register(2, &region)).await.expect("handle");
    env.settle().await;
    while events.try_next().is_some() {}
    let is_scanned = |e: &kvfeed_proto::cdcpb::Event| match &e.event {
        Some(event::Event::Entries(entries)) => entries
            .entries
            .iter()
            .all(|r| r.r#type == LogType::Committed as i32),
        _ => false,
    };
    let mut scan_messages = 0;
    for message in &events.messages {
        if message.events.iter().any(is_scanned) {
            scan_messages += 1;
            let requests: BTreeSet<u64> = message.events.iter().map(|e| e.request_id).collect();
            assert_eq!(requests.len(), 1, "one scan batch per message");
            assert!(message.events.iter().all(is_scanned), "{message:?}");
        }
    }
    assert_eq!(scan_messages, 2);
}

#[tokio::test(start_paused = true)]
async fn a_half_close_waits_for_running_scans() {
    let env = env();
    let region = env.region_a();
    for i in 0..3000u32 {
        env.raw
            .put(format!("h{i:05}").as_bytes(), b"v", None)
            .expect("put");
    }
    let (conn, mut events) = env.connect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<ChangeDataRequest, String>>(1);
    tx.send(Ok(register_raw(1, &region, b"", b"")))
        .await
        .expect("queue");
    drop(tx); // half close right after the Register
    conn.serve(&mut rx).await.expect("serve");
    let items = events.drain_to_end().await;
    assert_eq!(items.len(), 3001, "every scanned row, then INITIALIZED");
    assert!(items.last().is_some_and(common::Item::is_initialized));
    env.assert_clean().await;
}
