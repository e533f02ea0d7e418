//! The sink memory quota: a consumer that never reads is congested once its
//! bytes pass its connection's cap, or once consumers like it fill the
//! feed-wide quota; what it held is released at once; every other consumer
//! of the same region keeps receiving every row; and the charge returns to
//! 0 when everyone is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Env, Events, env_with, register_raw};
use kvfeed_cdc::{Connection, FeedConfig};
use kvfeed_storage::region::Region;

const VALUE: usize = 200;

fn quota(conn: u64, global: u64) -> FeedConfig {
    FeedConfig {
        // Plenty of message slots: only bytes limit the slow readers.
        sink_capacity: 4096,
        conn_memory_quota: conn,
        sink_memory_quota: global,
        ..FeedConfig::default()
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key{i:05}").into_bytes()
}

async fn subscribe(env: &Env, region: &Region) -> (Connection, Events) {
    let (mut conn, events) = env.connect();
    conn.handle(register_raw(1, region, b"", b""))
        .await
        .expect("handle");
    env.settle().await;
    (conn, events)
}

/// The quota's charge is exactly what the connections' queues hold (no
/// subscription is initializing here), and no connection is beyond `cap`
/// by more than one congestion notice.
async fn check_charges(env: &Env, cap: u64) {
    let snap = env.feed.debug_snapshot().await.expect("snapshot");
    let queued: u64 = snap.connections.iter().map(|c| c.pending_bytes).sum();
    assert_eq!(env.feed.metrics().memory_quota_used() as u64, queued);
    for c in &snap.connections {
        assert!(c.pending_bytes <= cap + 64, "{} over its cap", c.id);
    }
}

/// Everything still queued for a consumer that had stopped reading: one or
/// more `congested` errors for request 1 on `region`, and nothing else.
fn assert_only_congested(events: &mut Events, region: u64) {
    let mut seen = 0;
    while let Some(item) = events.try_next() {
        assert!(item.error().congested.is_some(), "{item:?}");
        assert_eq!(item.ids(), (1, region));
        seen += 1;
    }
    assert_eq!(seen, 1, "exactly one final answer");
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_congested_at_its_cap_and_the_other_misses_nothing() {
    let cap = 4096;
    let env = env_with(quota(cap, 1 << 20));
    let region = env.region_a();
    assert_eq!(env.feed.metrics().memory_quota_capacity(), 1 << 20);
    let (_slow, mut slow_events) = subscribe(&env, &region).await;
    let (_fast, mut fast_events) = subscribe(&env, &region).await;
    fast_events.expect_initialized(1, region.id.0).await;

    let writes = 60;
    for i in 0..writes {
        env.raw.put(&key(i), &[b'v'; VALUE], None).expect("put");
        env.settle().await;
        let row = fast_events.expect().await;
        assert_eq!(
            row.row().key,
            key(i),
            "the fast reader gets every row in order"
        );
        check_charges(&env, cap).await;
    }
    // 60 rows of 200 bytes are far beyond 4 KiB: the slow reader was
    // congested, alone.
    let counts = env.settle().await;
    assert_eq!((counts.connections, counts.subscriptions), (2, 1));
    assert_eq!(env.feed.metrics().congested(), 1);
    fast_events.assert_quiet();

    // What is charged now is the slow reader's notice (plus resolved
    // timestamps the fast one has not read yet); reading it frees it.
    assert!(env.feed.metrics().memory_quota_used() > 0);
    assert_only_congested(&mut slow_events, region.id.0);
    while fast_events.try_next().is_some() {}
    check_charges(&env, cap).await;
    assert_eq!(env.feed.metrics().memory_quota_used(), 0);

    drop((_slow, slow_events, _fast, fast_events));
    env.assert_clean().await;
}

#[tokio::test(start_paused = true)]
async fn the_global_quota_congests_the_slow_consumers_and_spares_the_fast_one() {
    // Each connection could hold the whole quota; three slow readers of
    // `key0…` share it, then the fast reader (of `key1…`) needs room.
    let global = 8192;
    let env = env_with(quota(global, global));
    let region = env.region_a();
    let mut slow = Vec::new();
    for _ in 0..3 {
        let (mut conn, events) = env.connect();
        conn.handle(register_raw(1, &region, b"key0", b"key1"))
            .await
            .expect("handle");
        env.settle().await;
        slow.push((conn, events));
    }
    let (mut fast, mut fast_events) = env.connect();
    fast.handle(register_raw(1, &region, b"key1", b""))
        .await
        .expect("handle");
    fast_events.expect_initialized(1, region.id.0).await;
    let used = || env.feed.metrics().memory_quota_used() as u64;

    // Fill the quota with rows only the slow readers get, stopping while a
    // further round still fits (nobody is congested by filling).
    let base = used();
    env.raw.put(&key(0), &[b'v'; VALUE], None).expect("put");
    env.settle().await;
    let round = used() - base;
    let mut filled = 1;
    while used() + round <= global {
        env.raw
            .put(&key(filled), &[b'v'; VALUE], None)
            .expect("put");
        env.settle().await;
        filled += 1;
    }
    assert_eq!(env.feed.metrics().congested(), 0);
    let share = (used() - base) / 3;

    // A row for the fast reader that does not fit: the largest holder is
    // congested (one is enough), not the reader that keeps up.
    let mut fast_rows = 0;
    let fast_key = |i: usize| format!("key1{i:04}").into_bytes();
    let gap = usize::try_from(global - used()).expect("small");
    env.raw
        .put(&fast_key(0), &vec![b'f'; gap + 16], None)
        .expect("put");
    env.settle().await;
    assert_eq!(fast_events.expect().await.row().key, fast_key(0));
    fast_rows += 1;
    assert_eq!(env.feed.metrics().congested(), 1);
    assert_eq!(env.settle().await.subscriptions, 3);
    check_charges(&env, global).await;

    // One that fits only beside a single share: the other two go.
    let big = usize::try_from(global - share + 16).expect("small");
    env.raw
        .put(&fast_key(1), &vec![b'f'; big], None)
        .expect("put");
    env.settle().await;
    assert_eq!(fast_events.expect().await.row().key, fast_key(1));
    fast_rows += 1;
    assert_eq!(env.feed.metrics().congested(), 3);
    assert_eq!(
        env.settle().await.subscriptions,
        1,
        "only the fast reader's remains"
    );

    // The fast reader keeps receiving every row.
    for i in 2..30 {
        env.raw.put(&fast_key(i), b"v", None).expect("put");
        env.settle().await;
        assert_eq!(fast_events.expect().await.row().key, fast_key(i));
        fast_rows += 1;
        check_charges(&env, global).await;
    }
    assert_eq!(fast_rows, 30);
    fast_events.assert_quiet();
    for (_, events) in &mut slow {
        assert_only_congested(events, region.id.0);
    }
    assert!(filled > 1);

    drop(slow);
    drop((fast, fast_events));
    env.assert_clean().await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_dropped_with_queued_events_releases_its_charge() {
    let env = env_with(quota(1 << 20, 1 << 20));
    let region = env.region_a();
    let (conn, events) = subscribe(&env, &region).await;
    for i in 0..10 {
        env.raw.put(&key(i), &[b'v'; VALUE], None).expect("put");
    }
    env.settle().await;
    let used = env.feed.metrics().memory_quota_used();
    assert!(
        used as usize > 10 * VALUE,
        "queued rows are charged: {used}"
    );
    assert_eq!(env.feed.metrics().congested(), 0);
    drop(events);
    assert_eq!(env.feed.metrics().memory_quota_used(), 0);
    drop(conn);
    env.assert_clean().await;
}
