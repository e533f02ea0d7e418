//! The bounds of catch-up scans: batch sizes, cancellation, the queue
//! limit, the held-back buffer cap, the speed limit, and the GC safe point.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::{Env, Events, Item, deregister, env, env_with, put, register, register_raw};
use kvfeed_cdc::{FeedConfig, SCAN_BATCH_MAX_BYTES, SCAN_BATCH_MAX_ROWS};
use kvfeed_proto::cdcpb::event::{self, LogType, Row};
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest};
use kvfeed_storage::TimeStamp;
use prost::Message;

/// Raw keys `prefix00000…` with `value_len`-byte values, `count` of them.
fn fill_raw(env: &Env, prefix: &str, count: usize, value_len: usize) {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                format!("{prefix}{i:06}").into_bytes(),
                vec![b'v'; value_len],
            )
        })
        .collect();
    for chunk in pairs.chunks(1000) {
        env.raw.batch_put(chunk, &[]).expect("batch put");
    }
}

/// Scanned (COMMITTED) rows of one message: (rows, encoded row bytes).
fn scanned_rows(message: &ChangeDataEvent) -> Option<(usize, usize)> {
    let mut rows = 0;
    let mut bytes = 0;
    for e in &message.events {
        if let Some(event::Event::Entries(entries)) = &e.event {
            for r in &entries.entries {
                if r.r#type == LogType::Committed as i32 {
                    rows += 1;
                    bytes += r.encoded_len();
                }
            }
        }
    }
    (rows > 0).then_some((rows, bytes))
}

/// Reads until the INITIALIZED of `request_id`; returns the rows before it.
async fn until_initialized(events: &mut Events, request_id: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    loop {
        let item = events.expect().await;
        if item.is_initialized() && item.ids().0 == request_id {
            return rows;
        }
        rows.push(item.row().clone());
    }
}

#[tokio::test(start_paused = true)]
async fn a_100k_key_scan_arrives_in_batches_of_at_most_1024_rows() {
    let env = env();
    let region = env.region_a();
    for chunk in 0..100 {
        let mutations = (0..1000)
            .map(|i| put(format!("key{:06}", chunk * 1000 + i).as_bytes(), b"value"))
            .collect();
        env.commit_1pc(mutations);
    }
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    let rows = until_initialized(&mut events, 1).await;
    assert_eq!(rows.len(), 100_000);
    assert!(
        rows.windows(2).all(|w| w[0].key < w[1].key),
        "every key once, in key order"
    );
    let batches: Vec<(usize, usize)> = events.messages.iter().filter_map(scanned_rows).collect();
    assert!(
        batches.len() >= 100_000 / SCAN_BATCH_MAX_ROWS,
        "{}",
        batches.len()
    );
    assert!(
        batches
            .iter()
            .all(|&(rows, bytes)| rows <= SCAN_BATCH_MAX_ROWS && bytes <= SCAN_BATCH_MAX_BYTES)
    );
    assert!(
        batches.iter().any(|&(rows, _)| rows == SCAN_BATCH_MAX_ROWS),
        "batches are filled, not trickled"
    );
    let m = env.feed.metrics();
    env.settle().await;
    assert_eq!(
        (
            m.scan_tasks("ongoing"),
            m.scan_tasks("finished"),
            m.scan_tasks("aborted")
        ),
        (0, 1, 0)
    );
    assert!(m.scanned_bytes() > 100_000 * 10);
}

#[tokio::test(start_paused = true)]
async fn batches_stop_at_1_mib_and_a_larger_row_travels_alone() {
    let env = env();
    let region = env.region_a();
    fill_raw(&env, "big", 3000, 1500);
    env.raw
        .put(b"huge", &vec![b'h'; 2 << 20], None)
        .expect("put");
    let (mut conn, mut events) = env.connect();
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    let rows = until_initialized(&mut events, 1).await;
    assert_eq!(rows.len(), 3001);
    let batches: Vec<(usize, usize)> = events.messages.iter().filter_map(scanned_rows).collect();
    for &(rows, bytes) in &batches {
        assert!(
            rows <= SCAN_BATCH_MAX_ROWS && (bytes <= SCAN_BATCH_MAX_BYTES || rows == 1),
            "{rows} rows, {bytes} bytes"
        );
    }
    assert!(
        batches
            .iter()
            .any(|&(rows, bytes)| rows == 1 && bytes > SCAN_BATCH_MAX_BYTES),
        "the 2 MiB row alone"
    );
    assert!(
        batches
            .iter()
            .any(|&(rows, bytes)| rows < SCAN_BATCH_MAX_ROWS && bytes > SCAN_BATCH_MAX_BYTES / 2),
        "byte-limited batches: {batches:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn deregistering_stops_a_large_scan() {
    // Four slots and a reader that stops reading: the scan can run ahead
    // only by what the connection's queue admits.
    let env = env_with(FeedConfig {
        sink_capacity: 4,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    fill_raw(&env, "c", 100_000, 8);
    let m = env.feed.metrics().clone();
    let (mut conn, mut events) = env.connect();
    events.keep_messages = false;
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    assert!(
        !events.expect().await.is_initialized(),
        "the scan is running"
    );
    conn.handle(deregister(1, region.id.0))
        .await
        .expect("handle");
    // Taking what is queued makes room again; a scan that missed its
    // cancellation would read on (its batches now going nowhere).
    let mut received = 1;
    let mut drain = |events: &mut Events| {
        while let Some(item) = events.try_next() {
            assert!(!item.is_initialized());
            received += 1;
        }
    };
    drain(&mut events);
    let cancelled_at = tokio::time::Instant::now();
    env.settle().await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "the scan stopped at once, not after {:?}",
        cancelled_at.elapsed()
    );
    let cancelled_bytes = m.scanned_bytes();
    drain(&mut events);
    assert!(
        received <= 8 * SCAN_BATCH_MAX_ROWS,
        "{received} rows arrived of 100000"
    );
    assert_eq!(
        (
            m.scan_tasks("ongoing"),
            m.scan_tasks("aborted"),
            m.scan_tasks("finished")
        ),
        (0, 1, 0)
    );
    // Nothing is read after the cancellation, and it came early: compare
    // with a complete scan of the same range.
    env.settle().await;
    assert_eq!(m.scanned_bytes(), cancelled_bytes);
    let (mut other, mut other_events) = env.connect();
    other_events.keep_messages = false;
    other
        .handle(register_raw(2, &region, b"", b""))
        .await
        .expect("handle");
    assert_eq!(until_initialized(&mut other_events, 2).await.len(), 100_000);
    let full = m.scanned_bytes() - cancelled_bytes;
    assert!(cancelled_bytes * 10 < full, "{cancelled_bytes} of {full}");

    // Closing the connection cancels its scans the same way.
    conn.handle(register_raw(3, &region, b"", b""))
        .await
        .expect("handle");
    assert!(!events.expect().await.is_initialized());
    drop(conn);
    drop(events);
    env.feed.scans_idle().await;
    assert_eq!(m.scan_tasks("aborted"), 2);
    drop((other, other_events));
    env.assert_clean().await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_event_stream_while_a_scan_waits_ends_the_connection() {
    // One queue slot and nobody reading: the scan waits for room when the
    // embedder drops the event stream, then half-closes. The owner must
    // learn that the scan ended, or `close` waits for it forever.
    let env = env_with(FeedConfig {
        sink_capacity: 2,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    fill_raw(&env, "g", 20_000, 8);
    let (mut conn, mut events) = env.connect();
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    assert!(
        !events.expect().await.is_initialized(),
        "the scan is running"
    );
    drop(events);
    let closed = tokio::time::timeout(Duration::from_secs(30), conn.close()).await;
    assert!(
        closed.is_ok(),
        "close() still waits for a scan whose event stream is gone"
    );
    let m = env.feed.metrics().clone();
    env.assert_clean().await;
    assert_eq!((m.scan_tasks("aborted"), m.scan_tasks("finished")), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn too_many_queued_scans_answer_server_is_busy() {
    // One slot, one ordinary queue slot and nobody reading: the first scan
    // waits for room, the second for a slot; the third Register is over the
    // limit of two.
    let env = env_with(FeedConfig {
        sink_capacity: 1,
        incremental_scan_concurrency: 1,
        incremental_scan_concurrency_limit: 2,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    fill_raw(&env, "q", 5000, 8);
    let (mut conn, mut events) = env.connect();
    for request_id in 1..=3 {
        conn.handle(register_raw(request_id, &region, b"", b""))
            .await
            .expect("handle");
    }
    let counts = env.feed.counts().await.expect("counts");
    assert_eq!((counts.subscriptions, counts.scans), (2, 2));
    // The refusal is queued behind the first scan batch.
    let busy = loop {
        let item = events.expect().await;
        if let Item::Error { .. } = item {
            break item;
        }
    };
    assert_eq!(busy.ids(), (3, region.id.0));
    let reason = busy.error().server_is_busy.clone().expect("busy").reason;
    assert!(reason.contains("catch-up scans"), "{reason}");

    // Once the scans are gone, registering works again.
    drop((conn, events));
    env.feed.scans_idle().await;
    let (mut conn, mut events) = env.connect();
    let now = ChangeDataRequest {
        checkpoint_ts: env.ts().into_inner(),
        ..register_raw(4, &region, b"", b"")
    };
    conn.handle(now).await.expect("handle");
    events.expect_initialized(4, region.id.0).await;
}

#[tokio::test(start_paused = true)]
async fn live_rows_held_back_beyond_the_cap_stop_the_subscription_as_congested() {
    let env = env_with(FeedConfig {
        sink_capacity: 2,
        scan_buffer_bytes: 1000,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    fill_raw(&env, "h", 10_000, 8);
    let (mut conn, mut events) = env.connect();
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    assert!(
        !events.expect().await.is_initialized(),
        "the scan is running"
    );
    // Held back while the scan waits for the reader: over the cap at once.
    env.raw.put(b"live", &[b'x'; 2000], None).expect("put");
    env.settle().await;
    let mut items = Vec::new();
    while let Some(item) = events.try_next() {
        items.push(item);
    }
    let last = items.pop().expect("an error at the end");
    assert_eq!(last.ids(), (1, region.id.0));
    assert!(last.error().congested.is_some(), "{last:?}");
    assert!(
        items.iter().all(|i| !i.is_initialized()),
        "never initialized"
    );
    assert!(items.len() < 10_000);
    assert_eq!(env.settle().await.subscriptions, 0);
    assert_eq!(env.feed.metrics().scan_tasks("aborted"), 1);
    drop(conn);
}

#[tokio::test(start_paused = true)]
async fn the_speed_limit_paces_scans_on_tokio_time() {
    let env = env_with(FeedConfig {
        incremental_scan_speed_limit: 100_000,
        ..FeedConfig::default()
    });
    let region = env.region_a();
    fill_raw(&env, "s", 20_000, 20);
    let (mut conn, mut events) = env.connect();
    events.keep_messages = false;
    let start = tokio::time::Instant::now();
    conn.handle(register_raw(1, &region, b"", b""))
        .await
        .expect("handle");
    assert_eq!(until_initialized(&mut events, 1).await.len(), 20_000);
    let read = env.feed.metrics().scanned_bytes();
    let elapsed = start.elapsed();
    // The first second's worth is free; the rest waits at 100 kB/s.
    let floor = Duration::from_secs_f64((read as f64 - 100_000.0) / 100_000.0);
    assert!(read > 500_000, "{read}");
    assert!(elapsed >= floor, "{elapsed:?} for {read} bytes");
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_below_the_gc_safe_point_is_refused_as_incompatible() {
    let env = env();
    let region = env.region_a();
    env.put(b"k", b"v1");
    let safe_point = env.ts();
    env.set_gc_safe_point(safe_point);
    let (mut conn, mut events) = env.connect();
    let at = |request_id, ts: TimeStamp| ChangeDataRequest {
        checkpoint_ts: ts.into_inner(),
        ..register(request_id, &region)
    };
    conn.handle(at(1, safe_point.prev())).await.expect("handle");
    let item = events.expect().await;
    assert_eq!(item.ids(), (1, region.id.0));
    let error = item.error();
    let text = error
        .compatibility
        .as_ref()
        .map(|c| c.required_version.clone())
        .expect("compatibility");
    assert!(text.contains(&safe_point.to_string()), "{text}");
    assert!(text.contains("GC safe point"), "{text}");
    assert!(error.server_is_busy.is_none() && error.region_not_found.is_none());

    // At the safe point itself the history is complete.
    conn.handle(at(2, safe_point)).await.expect("handle");
    events.expect_initialized(2, region.id.0).await;
    assert_eq!(env.settle().await.subscriptions, 1);
    assert_eq!(env.feed.metrics().scan_tasks("aborted"), 1);
}
