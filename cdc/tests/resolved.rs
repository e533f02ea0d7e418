//! Resolved timestamps: they advance with the interval, wait for open
//! locks and for writes still in flight, never precede INITIALIZED, and
//! take the wire form the client's version and features ask for. Every
//! `Events` also checks, on everything it reads, that they only increase
//! and are never followed by a commit at or below them (see `common`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use common::{Env, Events, Resolved, env, env_before_feed, env_with, put, register, register_raw};
use kvfeed_cdc::{Connection, Features, FeedConfig};
use kvfeed_proto::cdcpb::{ChangeDataRequest, Header};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::Cf;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::store::{ChangeBatch, Observer};

/// Registers `req` from now on (fresh checkpoint) and waits for its
/// INITIALIZED.
async fn subscribe(env: &Env, conn: &mut Connection, events: &mut Events, req: ChangeDataRequest) {
    let (request_id, region_id) = (req.request_id, req.region_id);
    let req = ChangeDataRequest {
        checkpoint_ts: env.ts().into_inner(),
        ..req
    };
    conn.handle(req).await.expect("handle");
    events.expect_initialized(request_id, region_id).await;
}

/// Reads resolved timestamps until one for `region` exceeds `ts` (at most
/// a thousand, so a value that never comes fails instead of spinning).
async fn until_past(events: &mut Events, region: u64, ts: TimeStamp) -> Resolved {
    for _ in 0..1000 {
        let r = events.next_resolved().await;
        if r.regions.contains(&region) && r.ts > ts.into_inner() {
            return r;
        }
    }
    panic!("region {region} never resolved past {ts}");
}

/// Every resolved ts received for `region`, in order.
fn values_for(events: &Events, region: u64) -> Vec<u64> {
    events
        .resolved
        .iter()
        .filter(|r| r.regions.contains(&region))
        .map(|r| r.ts)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn resolved_ts_advances_every_interval() {
    let interval = Duration::from_millis(200);
    let env = env_with(FeedConfig {
        min_ts_interval: interval,
        ..FeedConfig::default()
    });
    // Nobody subscribed: rounds allocate no timestamps.
    let before = env.tso.current();
    tokio::time::advance(interval * 5).await;
    env.settle().await;
    assert_eq!(env.tso.current(), before);

    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    subscribe(&env, &mut conn, &mut events, register(1, &region)).await;
    let mut last = 0;
    let mut at = tokio::time::Instant::now();
    for _ in 0..3 {
        let r = events.next_resolved().await;
        assert!(r.batched, "a current client gets the batched form");
        assert_eq!((r.request_id, r.regions.clone()), (0, vec![region.id.0]));
        assert!(r.ts > last);
        assert!(at.elapsed() <= interval, "{:?}", at.elapsed());
        at = tokio::time::Instant::now();
        last = r.ts;
    }
    assert!(last < env.ts().into_inner());
    assert!(env.feed.metrics().resolved_ts_lag_seconds() < 1.0);
}

#[tokio::test(start_paused = true)]
async fn an_open_lock_holds_resolved_ts_until_it_commits_or_rolls_back() {
    let env = env();
    let (a, b) = (env.region_a(), env.region_b());
    let (mut conn, mut events) = env.connect();
    subscribe(&env, &mut conn, &mut events, register(1, &a)).await;
    // Region B has no locks: its resolved ts shows that rounds happen.
    subscribe(&env, &mut conn, &mut events, register(2, &b)).await;

    let start = env.prewrite(vec![put(b"k", b"v")]);
    let later = env.ts();
    until_past(&mut events, b.id.0, later).await;
    until_past(&mut events, b.id.0, env.ts()).await;
    let held = values_for(&events, a.id.0);
    assert_eq!(held.last(), Some(&start.into_inner()), "{held:?}");
    assert!(held.iter().all(|&ts| ts <= start.into_inner()));

    // The clock moves on while the lock stays: the lag shows it.
    env.clock.advance(5_000);
    until_past(&mut events, b.id.0, env.ts()).await;
    let lag = env.feed.metrics().resolved_ts_lag_seconds();
    assert!((4.9..6.0).contains(&lag), "{lag}");

    let commit = env.commit(&[b"k"], start);
    let item = events.expect().await; // PREWRITE
    assert_eq!(item.row().start_ts, start.into_inner());
    let item = events.expect().await; // COMMIT, before any resolved ts past it
    assert_eq!(item.row().commit_ts, commit.into_inner());
    until_past(&mut events, a.id.0, commit).await;

    // A rollback releases it the same way.
    let start = env.prewrite(vec![put(b"r", b"v")]);
    until_past(&mut events, b.id.0, env.ts()).await;
    assert_eq!(
        values_for(&events, a.id.0).last(),
        Some(&start.into_inner())
    );
    env.txn
        .batch_rollback(&[b"r".to_vec()], start)
        .expect("rollback");
    until_past(&mut events, a.id.0, start).await;
}

#[tokio::test(start_paused = true)]
async fn locks_found_by_the_catch_up_scan_hold_resolved_ts_too() {
    let env = env();
    let region = env.region_a();
    let start = env.prewrite(vec![put(b"old", b"v")]);
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    let prewrite = events.expect().await;
    assert_eq!(prewrite.row().start_ts, start.into_inner());
    events.expect_initialized(1, region.id.0).await;
    let first = events.next_resolved().await;
    assert_eq!(first.ts, start.into_inner());
    let commit = env.commit(&[b"old"], start);
    until_past(&mut events, region.id.0, commit).await;
}

#[tokio::test(start_paused = true)]
async fn no_resolved_ts_precedes_initialized() {
    // Two ordinary slots: a scan of 5000 rows with nobody reading waits for
    // room, while rounds pass (as the other connection shows).
    let env = env_with(FeedConfig {
        sink_capacity: 2,
        ..FeedConfig::default()
    });
    let (a, b) = (env.region_a(), env.region_b());
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..5000u32)
        .map(|i| (format!("n{i:05}").into_bytes(), b"v".to_vec()))
        .collect();
    for chunk in pairs.chunks(1000) {
        env.raw.batch_put(chunk, &[]).expect("batch put");
    }
    let (mut clock, mut clock_events) = env.connect();
    subscribe(&env, &mut clock, &mut clock_events, register(1, &b)).await;
    let (mut conn, mut events) = env.connect();
    conn.handle(register_raw(1, &a, b"", b""))
        .await
        .expect("handle");
    for _ in 0..5 {
        clock_events.next_resolved().await;
    }
    let mut rows = 0;
    loop {
        let item = events.expect().await;
        if item.is_initialized() {
            break;
        }
        rows += 1;
    }
    assert_eq!(rows, 5000);
    assert!(events.resolved.is_empty(), "{:?}", events.resolved);
    let first = events.next_resolved().await;
    assert!(first.after_items > rows, "after INITIALIZED");
}

#[tokio::test(start_paused = true)]
async fn wire_forms_follow_the_client_version_and_features() {
    let env = env();
    let (a, b) = (env.region_a(), env.region_b());
    let old = |req: ChangeDataRequest| ChangeDataRequest {
        header: Some(Header {
            cluster_id: common::CLUSTER_ID,
            ticdc_version: "4.0.7".to_owned(),
        }),
        ..req
    };

    // A 4.0.7 client: one Event.resolved_ts per subscription.
    let (mut conn, mut events) = env.connect();
    subscribe(&env, &mut conn, &mut events, old(register(7, &a))).await;
    subscribe(&env, &mut conn, &mut events, old(register(8, &b))).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let r = events.next_resolved().await;
        assert!(!r.batched);
        seen.insert((r.request_id, r.regions[0]));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![(7, a.id.0), (8, b.id.0)]
    );

    // A current client: one batched message per ts, request id 0.
    let (mut conn, mut events) = env.connect();
    subscribe(&env, &mut conn, &mut events, register(1, &a)).await;
    subscribe(&env, &mut conn, &mut events, register(2, &b)).await;
    let r = events.next_resolved().await;
    let mut regions = r.regions.clone();
    regions.sort_unstable();
    assert!(r.batched);
    assert_eq!((r.request_id, regions), (0, vec![a.id.0, b.id.0]));

    // With stream multiplexing: one per request id.
    let (mut conn, mut events) = env.connect_with(Features {
        stream_multiplexing: true,
    });
    subscribe(&env, &mut conn, &mut events, register(1, &a)).await;
    subscribe(&env, &mut conn, &mut events, register(2, &a)).await;
    let first = events.next_resolved().await;
    let second = events.next_resolved().await;
    let mut requests = vec![first.request_id, second.request_id];
    requests.sort_unstable();
    assert_eq!(requests, vec![1, 2]);
    assert_eq!(first.ts, second.ts, "both resolved in one round");
}

#[tokio::test(start_paused = true)]
async fn many_multiplexed_request_ids_get_packed_per_subscription_events() {
    // One request id per region, as kvfeed's client registers: a round of
    // one batched message per request id would be one message per region,
    // so beyond 64 of them the round is packed into few messages.
    let env = env();
    let a = env.region_a();
    let (mut conn, mut events) = env.connect_with(Features {
        stream_multiplexing: true,
    });
    let n = 100u64;
    for request_id in 1..=n {
        subscribe(&env, &mut conn, &mut events, register(request_id, &a)).await;
    }
    // Rounds sampled after this timestamp found every subscription Normal.
    let all_normal = env.ts().into_inner();
    let mut requests = std::collections::BTreeSet::new();
    let mut ts = None;
    for _ in 0..10_000 {
        let r = events.next_resolved().await;
        if r.ts <= all_normal {
            continue;
        }
        assert!(!r.batched, "packed per-subscription form: {r:?}");
        assert_eq!(r.regions, vec![a.id.0]);
        if *ts.get_or_insert(r.ts) == r.ts {
            requests.insert(r.request_id);
        }
        if requests.len() == n as usize {
            break;
        }
    }
    assert_eq!(requests, (1..=n).collect());
}

#[tokio::test(start_paused = true)]
async fn a_region_subscribed_twice_without_multiplexing_gets_the_lower_value() {
    let env = env();
    let region = env.region_a();
    let ranged = |request_id| ChangeDataRequest {
        start_key: encode_bytes(b"x"),
        end_key: encode_bytes(b"y"),
        ..register(request_id, &region)
    };
    let start = env.prewrite(vec![put(b"c", b"v")]);

    // Request 1 covers the lock, request 2 does not.
    let (mut plain, mut plain_events) = env.connect();
    let (mut muxed, mut muxed_events) = env.connect_with(Features {
        stream_multiplexing: true,
    });
    for (conn, events) in [
        (&mut plain, &mut plain_events),
        (&mut muxed, &mut muxed_events),
    ] {
        conn.handle(register(1, &region)).await.expect("handle");
        assert_eq!(events.expect().await.row().start_ts, start.into_inner());
        events.expect_initialized(1, region.id.0).await;
        subscribe(&env, conn, events, ranged(2)).await;
    }
    let now = env.ts();
    // Multiplexed: request 2 passes the lock, request 1 stays at it.
    let mut r2 = None;
    for _ in 0..1000 {
        let r = muxed_events.next_resolved().await;
        if r.request_id == 2 && r.ts > now.into_inner() {
            r2 = Some(r);
            break;
        }
    }
    let r2 = r2.expect("request 2 resolved past the lock");
    assert!(r2.ts > start.into_inner());
    let r1: Vec<u64> = muxed_events
        .resolved
        .iter()
        .filter(|r| r.request_id == 1)
        .map(|r| r.ts)
        .collect();
    assert_eq!(r1, vec![start.into_inner()]);
    // Region-wide: held at the lock for both.
    let r = plain_events.next_resolved().await;
    assert_eq!((r.request_id, r.ts), (0, start.into_inner()));
}

#[tokio::test(start_paused = true)]
async fn a_pending_resolved_ts_is_replaced_not_queued_twice() {
    // One ordinary slot: INITIALIZED fills it, so resolved timestamps wait.
    let env = env_with(FeedConfig {
        sink_capacity: 1,
        ..FeedConfig::default()
    });
    let (a, b) = (env.region_a(), env.region_b());
    let (mut clock, mut clock_events) = env.connect();
    subscribe(&env, &mut clock, &mut clock_events, register(1, &b)).await;
    let (mut conn, mut events) = env.connect();
    let req = ChangeDataRequest {
        checkpoint_ts: env.ts().into_inner(),
        ..register(1, &a)
    };
    conn.handle(req).await.expect("handle");
    env.settle().await;
    let mut latest = 0;
    for _ in 0..5 {
        latest = clock_events.next_resolved().await.ts;
    }
    events.expect_initialized(1, a.id.0).await;
    let r = events.next_resolved().await;
    assert!(
        r.ts >= latest,
        "the newest value, not the first: {} < {latest}",
        r.ts
    );
    assert_eq!(events.resolved.len(), 1, "one message, not one per round");
    assert_eq!(env.settle().await.subscriptions, 2, "nobody was congested");
}

/// Holds the first batch writing raw key `held` until released, inside the
/// store's apply (before the feed is told of it): the write is in flight.
struct HoldRawWrite {
    entered: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<std_mpsc::Receiver<()>>,
}

impl Observer for HoldRawWrite {
    fn on_apply(&self, batch: &Arc<ChangeBatch>) {
        let held = encode_bytes(b"held");
        let ours = batch
            .mutations
            .iter()
            .any(|m| m.cf == Cf::Raw && m.key.starts_with(&held));
        if !ours {
            return;
        }
        let entered = self.entered.lock().ok().and_then(|mut e| e.take());
        if let Some(entered) = entered {
            let _ = entered.send(());
            if let Ok(release) = self.release.lock() {
                let _ = release.recv();
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_raw_write_in_flight_holds_raw_subscriptions_back() {
    let (entered_tx, entered_rx) = oneshot::channel();
    let (release_tx, release_rx) = std_mpsc::channel();
    let hold = Arc::new(HoldRawWrite {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
    });
    let env = Arc::new(env_before_feed(FeedConfig::default(), |store| {
        store.add_observer(hold);
    }));
    let (a, b) = (env.region_a(), env.region_b());
    let (mut conn, mut events) = env.connect();
    subscribe(&env, &mut conn, &mut events, register_raw(1, &a, b"", b"")).await;
    subscribe(&env, &mut conn, &mut events, register(2, &b)).await;

    let writer = {
        let env = Arc::clone(&env);
        tokio::task::spawn_blocking(move || env.raw.put(b"held", b"v", None).expect("put"))
    };
    entered_rx.await.expect("the write reached the store");
    // The writer's blocking task stops paused time from advancing by
    // itself; rounds are driven by hand.
    for _ in 0..3 {
        let now = env.tso.current();
        tokio::time::advance(Duration::from_secs(1)).await;
        until_past(&mut events, b.id.0, now).await;
    }
    let before = values_for(&events, a.id.0);
    assert!(!before.is_empty(), "the raw subscription was resolved too");
    release_tx.send(()).expect("release");
    let ts = writer.await.expect("writer");
    assert!(
        before.iter().all(|&r| r < ts.into_inner()),
        "resolved {before:?} passed the write at {ts} still in flight"
    );
    let row = events.expect().await;
    assert_eq!(row.row().commit_ts, ts.into_inner());
    until_past(&mut events, a.id.0, ts).await;
}
