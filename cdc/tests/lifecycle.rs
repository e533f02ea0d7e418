//! The connection lifecycle under faults: every way a connection can end
//! leaves nothing behind (registry, gauges, queued bytes, task gauge), and
//! is counted under the right reason.
//!
//! Fault injection is explicit: the tests play the server's part (a task
//! per connection holding a `TaskGuard`, a request source) and inject the
//! fault at the chosen stage: dropping, a failing request stream, a refused
//! request, a vanished client, half close, feed shutdown, task abort, and a
//! panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Barrier, mpsc, oneshot};

use common::{Events, Item, env, register, register_raw};
use kvfeed_cdc::{ConnInfo, Features, FeedError, ServeEnd};
use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_proto::cdcpb::change_data_request::{self, NotifyTxnStatus};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

type Requests = mpsc::Receiver<Result<ChangeDataRequest, String>>;

fn requests() -> (mpsc::Sender<Result<ChangeDataRequest, String>>, Requests) {
    mpsc::channel(16)
}

#[tokio::test(start_paused = true)]
async fn dropped_before_the_first_request() {
    let env = env();
    let (conn, mut events) = env.connect();
    assert_eq!(env.settle().await.connections, 1);
    drop(conn);
    assert!(events.drain_to_end().await.is_empty());
    drop(events);
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("dropped"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_bad_first_request_ends_the_connection() {
    let env = env();
    let (conn, mut events) = env.connect();
    let (tx, mut rx) = requests();
    let notify = ChangeDataRequest {
        request: Some(change_data_request::Request::NotifyTxnStatus(
            NotifyTxnStatus::default(),
        )),
        ..register(1, &env.region_a())
    };
    tx.send(Ok(notify)).await.expect("queue");
    let outcome = conn.serve(&mut rx).await;
    assert!(
        matches!(outcome, Err(FeedError::Unsupported(_))),
        "{outcome:?}"
    );
    assert!(events.drain_to_end().await.is_empty());
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("bad_request"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_error_in_the_loop_ends_the_connection() {
    let env = env();
    let region = env.region_a();
    let (conn, mut events) = env.connect();
    let (tx, mut rx) = requests();
    tx.send(Ok(register(1, &region))).await.expect("queue");
    tx.send(Err("connection reset".to_owned()))
        .await
        .expect("queue");
    let outcome = conn.serve(&mut rx).await;
    assert!(
        matches!(&outcome, Err(FeedError::RequestStream(e)) if e.to_string().contains("reset")),
        "{outcome:?}"
    );
    // The register was handled before the error; its answer may or may not
    // have been queued before the deregistration overtook it, and either is
    // fine for a client that is gone. Nothing else may appear.
    let rest = events.drain_to_end().await;
    assert!(
        rest.len() <= 1 && rest.iter().all(Item::is_initialized),
        "{rest:?}"
    );
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("stream_error"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_vanished_client_is_noticed_on_the_next_send() {
    let env = env();
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;
    drop(events); // the client is gone; the request side does not know yet
    assert_eq!(env.settle().await.subscriptions, 1);

    env.put(b"k", b"v");
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("send_failed"), 1);
    assert!(conn.is_ended());
    assert!(matches!(
        conn.handle(register(2, &region)).await,
        Err(FeedError::ConnectionEnded(_))
    ));
    drop(conn);
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("dropped"), 0, "ended only once");
}

#[tokio::test(start_paused = true)]
async fn half_close_flushes_queued_events_then_ends_cleanly() {
    let env = env();
    let region = env.region_a();
    let (conn, mut events) = env.connect();
    let (tx, mut rx) = requests();
    for request_id in 1..=3 {
        tx.send(Ok(register(request_id, &region)))
            .await
            .expect("queue");
    }
    drop(tx); // half close
    assert_eq!(conn.serve(&mut rx).await.ok(), Some(ServeEnd::HalfClosed));
    let rest = events.drain_to_end().await;
    // The three scans run side by side, so their INITIALIZED rows may come
    // in any order; the half close waited for all of them.
    let mut ids: Vec<(u64, u64)> = rest.iter().map(Item::ids).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![(1, region.id.0), (2, region.id.0), (3, region.id.0)]
    );
    assert!(rest.iter().all(Item::is_initialized));
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("half_close"), 1);
}

#[tokio::test(start_paused = true)]
async fn feed_shutdown_ends_every_stream_and_releases_the_store() {
    let env = env();
    let region = env.region_a();
    let mut held = Vec::new();
    for request_id in 1..=3 {
        let (mut conn, mut events) = env.connect();
        conn.handle(register(request_id, &region))
            .await
            .expect("handle");
        events.expect_initialized(request_id, region.id.0).await;
        held.push((conn, events));
    }
    // Queued but unread events still reach the client before the end.
    env.put(b"k", b"v");
    env.settle().await;
    env.feed.shutdown().await;

    let metrics = env.feed.metrics().clone();
    assert_eq!(metrics.connections(), 0);
    assert_eq!(metrics.subscriptions(), 0);
    assert_eq!(metrics.aborted("shutdown"), 3);
    for (mut conn, mut events) in held {
        let rest = events.drain_to_end().await;
        assert_eq!(rest.len(), 2, "prewrite and commit still delivered");
        assert!(matches!(
            conn.handle(register(9, &region)).await,
            Err(FeedError::ShuttingDown)
        ));
    }
    assert_eq!(metrics.pending_bytes(), 0);
    assert_eq!(metrics.connection_tasks(), 0);
    assert!(matches!(
        env.feed.connect(ConnInfo {
            peer: "late".to_owned(),
            features: Features::default(),
            store_id: kvfeed_storage::region::STORE_ID,
        }),
        Err(FeedError::ShuttingDown)
    ));
    assert!(matches!(
        env.feed.counts().await,
        Err(FeedError::ShuttingDown)
    ));
    // The owner dropped its store handle, and with it the observer.
    assert_eq!(Arc::strong_count(&env.store), env.store_refs_without_feed);
    env.feed.shutdown().await; // idempotent
    env.put(b"k2", b"v2"); // the store no longer calls into the feed
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_feed_handle_stops_the_owner() {
    let mut env = env();
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    conn.handle(register(1, &region)).await.expect("handle");
    events.expect_initialized(1, region.id.0).await;
    let metrics = env.feed.metrics().clone();
    // Replace the only handle with one of a second, unrelated feed.
    let other = common::env();
    env.feed = other.feed.clone();
    assert!(events.drain_to_end().await.is_empty());
    assert_eq!(metrics.aborted("shutdown"), 1);
    assert_eq!(metrics.connections(), 0);
    assert_eq!(Arc::strong_count(&env.store), env.store_refs_without_feed);
    assert!(matches!(
        conn.handle(register(2, &region)).await,
        Err(FeedError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_connection_task_deregisters() {
    let env = env();
    let region = env.region_a();
    let (conn, mut events) = env.connect();
    let (tx, mut rx) = requests();
    let guard = env.feed.task_guard();
    let task = tokio::spawn(async move {
        let _guard = guard;
        // Never half-closes: only cancellation ends this.
        conn.serve(&mut rx).await
    });
    tx.send(Ok(register(1, &region))).await.expect("queue");
    events.expect_initialized(1, region.id.0).await;
    assert_eq!(env.feed.metrics().connection_tasks(), 1);
    task.abort();
    let joined = task.await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_cancelled()),
        "{joined:?}"
    );
    assert!(events.drain_to_end().await.is_empty());
    drop(events);
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("dropped"), 1);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_connection_task_deregisters() {
    let env = env();
    let region = env.region_a();
    let (mut conn, mut events) = env.connect();
    let (go, wait) = oneshot::channel::<()>();
    let guard = env.feed.task_guard();
    let req = register(1, &region);
    let task = tokio::spawn(async move {
        let _guard = guard;
        conn.handle(req).await.expect("handle");
        let _ = wait.await;
        // An injected fault: unwinding drops the connection mid-loop.
        std::panic::resume_unwind(Box::new("injected fault"));
    });
    events.expect_initialized(1, region.id.0).await;
    go.send(()).expect("task waits");
    let joined = task.await;
    assert!(joined.as_ref().is_err_and(|e| e.is_panic()), "{joined:?}");
    assert!(events.drain_to_end().await.is_empty());
    drop(events);
    env.assert_clean().await;
    assert_eq!(env.feed.metrics().aborted("panic"), 1);
}

/// Skips catch-up rows: the first INITIALIZED row or error.
async fn until_initialized(events: &mut Events) -> Item {
    loop {
        let item = events.expect().await;
        if item.is_initialized() || matches!(item, Item::Error { .. }) {
            return item;
        }
    }
}

/// How a churn connection ends.
#[derive(Clone, Copy, Debug)]
enum Stage {
    BeforeFirstRequest,
    AfterRegistering,
    MidStream,
    HalfClose,
    StreamDroppedFirst,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_a_thousand_connections_leaves_nothing_behind() {
    const CONNECTIONS: usize = 1000;
    let env = Arc::new(env());
    let region = env.region_a();
    let mut rng = StdRng::seed_from_u64(0x5eed_cdc0);
    let stages = [
        Stage::BeforeFirstRequest,
        Stage::AfterRegistering,
        Stage::MidStream,
        Stage::HalfClose,
        Stage::StreamDroppedFirst,
    ];

    // A writer keeps raw writes flowing until every connection is done,
    // one at a time: it waits for the feed to have routed each write before
    // the next, so it cannot outrun the owner (the observed-batch channel
    // is unbounded until a memory quota arrives).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let env = Arc::clone(&env);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                env.raw
                    .put(format!("churn-{}", i % 64).as_bytes(), b"value", None)
                    .expect("raw put");
                env.settle().await;
                i += 1;
            }
            i
        })
    };

    let start = Arc::new(Barrier::new(CONNECTIONS));
    let mut tasks = Vec::with_capacity(CONNECTIONS);
    for n in 0..CONNECTIONS {
        let stage = stages[rng.random_range(0..stages.len())];
        let request_id = n as u64 + 1;
        let (env, start, region) = (Arc::clone(&env), Arc::clone(&start), region.clone());
        tasks.push(tokio::spawn(async move {
            let _guard = env.feed.task_guard();
            let (mut conn, stream) = env
                .feed
                .connect(ConnInfo {
                    peer: format!("client-{n}"),
                    features: Features::default(),
                    store_id: kvfeed_storage::region::STORE_ID,
                })
                .expect("connect");
            let mut events = Events::new(stream);
            start.wait().await;
            let req = register_raw(request_id, &region, b"", b"");
            match stage {
                Stage::BeforeFirstRequest => drop(conn),
                Stage::AfterRegistering => {
                    conn.handle(req).await.expect("handle");
                    let first = until_initialized(&mut events).await;
                    assert!(first.is_initialized() || first.error().congested.is_some());
                }
                Stage::MidStream => {
                    conn.handle(req).await.expect("handle");
                    let first = until_initialized(&mut events).await;
                    if first.is_initialized() {
                        // Any next event: a row, or congestion.
                        events.expect().await;
                    }
                }
                Stage::HalfClose => {
                    let (tx, mut rx) = mpsc::channel::<Result<ChangeDataRequest, String>>(1);
                    tx.send(Ok(req)).await.expect("queue");
                    drop(tx);
                    let end = conn.serve(&mut rx).await.expect("serve");
                    assert_eq!(end, ServeEnd::HalfClosed);
                    // The scan's rows (the writer's earlier writes), then
                    // INITIALIZED exactly once, before the stream ends.
                    let rest = events.drain_to_end().await;
                    let initialized = rest.iter().filter(|i| i.is_initialized()).count();
                    assert_eq!(initialized, 1, "{} items", rest.len());
                }
                Stage::StreamDroppedFirst => {
                    conn.handle(req).await.expect("handle");
                    drop(events);
                    return;
                }
            }
            drop(events);
        }));
    }
    for task in tasks {
        task.await.expect("connection task");
    }
    stop.store(true, Ordering::Release);
    let writes = writer.await.expect("writer");
    assert!(writes > 0);

    env.assert_clean().await;
    let m = env.feed.metrics();
    let ended: u64 = [
        "half_close",
        "stream_error",
        "bad_request",
        "send_failed",
        "congested",
        "shutdown",
        "panic",
        "dropped",
    ]
    .iter()
    .map(|r| m.aborted(r))
    .sum();
    assert_eq!(
        ended, CONNECTIONS as u64,
        "every connection ended exactly once"
    );
}
