//! The outbound side: pending-byte accounting, congestion of a slow reader
//! (its own subscriptions only, with the error always getting through, and
//! what it had not read dropped), and a reader that never drains.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Item, env, env_with, register, register_raw};
use kvfeed_cdc::FeedConfig;

fn small_sink(slots: usize) -> FeedConfig {
    FeedConfig {
        sink_capacity: slots,
        ..FeedConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn pending_bytes_count_what_the_stream_has_not_taken() {
    let env = env();
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    let counts = env.settle().await;
    assert!(counts.pending_bytes > 0, "INITIALIZED is queued");
    let snap = env.feed.debug_snapshot().await.expect("snapshot");
    assert_eq!(snap.connections[0].pending_bytes, counts.pending_bytes);
    assert_eq!(
        env.feed.metrics().pending_bytes() as u64,
        counts.pending_bytes
    );

    let sent_before = env.feed.metrics().sent_bytes();
    events.expect_initialized(1, region.id.0).await;
    assert_eq!(env.settle().await.pending_bytes, 0);
    assert_eq!(
        env.feed.metrics().sent_bytes() - sent_before,
        counts.pending_bytes,
        "what was pending is what was sent"
    );

    // Dropping the stream with events queued releases their bytes at once.
    env.put(b"k", b"v");
    assert!(env.settle().await.pending_bytes > 0);
    drop(events);
    assert_eq!(env.feed.metrics().pending_bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_congested_connection_loses_its_subscriptions_and_is_told() {
    // Three ordinary slots: the two INITIALIZED answers take one each
    // (settled one at a time, so each is a message of its own), a first
    // write the third.
    let env = env_with(small_sink(3));
    let region = env.region_a();
    let (mut slow, mut slow_events) = env.connect();
    slow.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    env.settle().await;
    slow.handle(register_raw(2, &region, b"a", b"b"))
        .await
        .expect("handle");
    env.settle().await;
    // A reader that keeps up is not affected by the slow one.
    let (mut fast, mut fast_events) = env.connect();
    fast.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    fast_events.expect_initialized(1, region.id.0).await;

    // Writes are settled one at a time (writes settled together would
    // share one message, hence one slot); the fast reader takes each row as
    // it comes.
    for key in [b"k1", b"k2", b"k3"] {
        // k2 finds no room for the slow reader: congested. k3 finds
        // nothing of it subscribed any more.
        env.raw.put(key, b"v", None).expect("put");
        env.settle().await;
        assert_eq!(fast_events.expect().await.row().key, key.to_vec());
    }
    let counts = env.settle().await;
    assert_eq!(counts.connections, 2);
    assert_eq!(counts.subscriptions, 1, "only the fast reader's remains");

    // What the slow reader had not taken (its INITIALIZED rows and k1) was
    // dropped with its subscriptions; only the notice is left.
    let mut items = Vec::new();
    while let Some(item) = slow_events.try_next() {
        items.push(item);
    }
    let mut congested: Vec<(u64, u64)> = items
        .iter()
        .map(|item| {
            assert!(item.error().congested.is_some(), "{item:?}");
            item.ids()
        })
        .collect();
    congested.sort_unstable();
    assert_eq!(congested, vec![(1, region.id.0), (2, region.id.0)]);

    // Once drained, the slow client can subscribe again on the same stream
    // (from now on: the writes above are not scanned again).
    let again = kvfeed_proto::cdcpb::ChangeDataRequest {
        checkpoint_ts: env.ts().into_inner(),
        ..register_raw(1, &region, b"", b"")
    };
    slow.handle(again).await.expect("handle");
    slow_events.expect_initialized(1, region.id.0).await;
    assert_eq!(env.settle().await.subscriptions, 2);
}

#[tokio::test(start_paused = true)]
async fn register_answers_lost_to_congestion_are_answered_as_congested() {
    let env = env_with(small_sink(1));
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    env.settle().await; // INITIALIZED fills the only ordinary slot
    let unknown = kvfeed_proto::cdcpb::ChangeDataRequest {
        region_id: 999,
        ..register(2, &region)
    };
    conn.handle(unknown).await.expect("handle");
    env.settle().await;
    // The unread INITIALIZED went with the congestion; every request gets
    // exactly one final answer.
    let mut congested: Vec<(u64, u64)> = Vec::new();
    while let Some(item) = events.try_next() {
        assert!(item.error().congested.is_some(), "{item:?}");
        congested.push(item.ids());
    }
    congested.sort_unstable();
    assert_eq!(congested, vec![(1, region.id.0), (2, 999)]);
}

#[tokio::test(start_paused = true)]
async fn a_reader_that_never_drains_is_ended() {
    let env = env_with(small_sink(1));
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    env.settle().await; // INITIALIZED takes the only ordinary slot
    env.put(b"k", b"v"); // congested: the notice takes the kept slot
    assert_eq!(env.settle().await.subscriptions, 0);
    conn.handle(register(2, &region)).await.expect("handle");
    // Its scan (which finds k) waits for room until the reader is deemed
    // stalled; then neither its error nor a notice fits: the connection is
    // ended. (Paused time lets the stall timeout pass here.)
    let counts = env.settle().await;
    assert_eq!((counts.connections, counts.subscriptions), (0, 0));
    assert_eq!(env.feed.metrics().aborted("congested"), 1);
    assert!(conn.is_ended());

    // Nothing it never read is kept for it.
    let items = events.drain_to_end().await;
    assert!(items.iter().all(|i| matches!(i, Item::Error { .. })));
    assert_eq!(env.feed.metrics().memory_quota_used(), 0);
    drop((conn, events));
    env.assert_clean().await;
}
