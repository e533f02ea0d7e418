//! Fault tests of the ChangeData service against the real binary: every
//! way a feed call can end must give back everything it held. After each
//! scenario `/metrics` must show no connection, subscription, pending byte
//! or connection task left (polled with a bounded deadline, since the
//! release is asynchronous); server shutdown with a stream open must exit
//! 0 promptly.
//!
//! Paths: the client cancels its call without half-closing (RST_STREAM),
//! the client half-closes, the client vanishes mid-stream (its connection
//! dies with the runtime it lived on, as with a killed process), the server
//! is stopped, and 200 concurrent connections end at random (seeded) stages
//! in random ways.
//!
//! Dropping only the response stream of a tonic call whose request stream
//! stays open is not among them: the HTTP/2 stream then stays open on the
//! client's side and no server can tell it from a slow reader.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::TestServer;
use kvfeed_client::feed::Registration;
use kvfeed_client::{Cluster, KeyMode, RegionInfo};
use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::change_data_request::{self, Deregister, NotifyTxnStatus};
use kvfeed_proto::cdcpb::event::{self, LogType};
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest};
use kvfeed_storage::mvcc::encode_bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::CancellationHandle;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(20);
/// Gauges that must all read 0 once every call has ended.
const GAUGES: [&str; 4] = [
    "kvfeed_cdc_connections",
    "kvfeed_cdc_subscriptions",
    "kvfeed_cdc_pending_bytes",
    "kvfeed_cdc_connection_tasks",
];

/// A request stream that stays open after its sender is dropped: ending
/// it would be a half-close, which some scenarios must avoid.
type Requests = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = ChangeDataRequest> + Send>>;

fn never_ending(rx: mpsc::Receiver<ChangeDataRequest>) -> Requests {
    Box::pin(ReceiverStream::new(rx).chain(tokio_stream::pending()))
}

struct Call {
    requests: mpsc::Sender<ChangeDataRequest>,
    events: Streaming<ChangeDataEvent>,
    /// Resets the stream (RST_STREAM), as a client dropping its call does.
    cancel: CancellationHandle,
}

async fn open(channel: Channel, half_close_on_drop: bool) -> Call {
    let (requests, rx) = mpsc::channel(16);
    let stream: Requests = if half_close_on_drop {
        Box::pin(ReceiverStream::new(rx))
    } else {
        never_ending(rx)
    };
    let mut request = tonic::Request::new(stream);
    let cancel = request.cancellation_handle();
    let mut client = ChangeDataClient::new(channel);
    let events = tokio::time::timeout(WAIT, client.event_feed(request))
        .await
        .expect("EventFeed answers in time")
        .expect("EventFeed opens")
        .into_inner();
    Call {
        requests,
        events,
        cancel,
    }
}

/// A client connection on a runtime of its own, so it can vanish the way a
/// killed process does: shutting the runtime down drops the connection's
/// tasks and closes its socket with no HTTP/2 goodbye.
struct Doomed {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Doomed {
    fn new(url: &str) -> Doomed {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("client runtime");
        // The channel's tasks (and so its socket) live on that runtime.
        let channel = {
            let _entered = runtime.enter();
            tonic::transport::Endpoint::from_shared(url.to_owned())
                .expect("endpoint")
                .connect_lazy()
        };
        Doomed { runtime, channel }
    }

    fn vanish(self) {
        drop(self.channel);
        self.runtime.shutdown_background();
    }
}

fn register(
    cluster_id: u64,
    region: &RegionInfo,
    request_id: u64,
    prefix: &[u8],
) -> ChangeDataRequest {
    let mut end = prefix.to_vec();
    end.push(0xff);
    Registration {
        cluster_id,
        request_id,
        region,
        start: &encode_bytes(prefix),
        end: &encode_bytes(&end),
        checkpoint_ts: 0,
        mode: KeyMode::Txn,
        old_value: false,
    }
    .request()
}

impl Call {
    async fn send(&self, request: ChangeDataRequest) {
        let sent = self.requests.send(request).await;
        sent.expect("request stream open");
    }

    /// Reads until a row of type `kind` arrives.
    async fn await_row(&mut self, kind: LogType) {
        loop {
            let message = tokio::time::timeout(WAIT, self.events.message())
                .await
                .unwrap_or_else(|_| panic!("no {kind:?} row within {WAIT:?}"))
                .expect("stream healthy")
                .expect("stream open");
            let found = message.events.iter().any(|e| match &e.event {
                Some(event::Event::Entries(entries)) => {
                    entries.entries.iter().any(|r| r.r#type == kind as i32)
                }
                _ => false,
            });
            if found {
                return;
            }
        }
    }

    /// Reads to the end; `Ok` for a clean end, the status otherwise.
    async fn finish(mut self) -> Result<(), tonic::Status> {
        drop(self.requests);
        loop {
            match tokio::time::timeout(WAIT, self.events.message()).await {
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => return Err(status),
                Err(_) => panic!("the call did not end within {WAIT:?}"),
            }
        }
    }
}

/// Polls `/metrics` until every gauge in [`GAUGES`] reads 0.
fn assert_released(server: &TestServer) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = tokio::task::block_in_place(|| server.metrics());
        let nonzero: Vec<&str> = GAUGES
            .iter()
            .copied()
            .filter(|g| !text.lines().any(|l| l == format!("{g} 0")))
            .collect();
        if nonzero.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "still held: {nonzero:?}\n{text}");
        std::thread::yield_now();
    }
}

async fn setup() -> (TestServer, Channel, Cluster, RegionInfo) {
    let server = TestServer::start();
    let channel = server.channel().await;
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("client connects");
    let regions = cluster.regions_in_range(b"", b"").await.expect("regions");
    let low = regions.first().cloned().expect("a region");
    (server, channel, cluster, low)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_call_without_half_close_releases_everything() {
    let (server, channel, _cluster, low) = setup().await;
    let mut call = open(channel.clone(), false).await;
    call.send(register(server.cluster_id(), &low, 1, b"a/"))
        .await;
    call.await_row(LogType::Initialized).await;
    let Call {
        requests,
        events,
        cancel,
    } = call;
    drop(events);
    cancel.cancel();
    // The request sender is still alive: no half-close was ever sent.
    assert_released(&server);
    drop(requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_ends_with_ok_and_releases_everything() {
    let (server, channel, cluster, low) = setup().await;
    let mut call = open(channel.clone(), true).await;
    call.send(register(server.cluster_id(), &low, 1, b"a/"))
        .await;
    call.await_row(LogType::Initialized).await;
    cluster.txn_put(b"a/1", b"v").await.expect("put");
    call.await_row(LogType::Commit).await;
    call.finish().await.expect("a half-close ends with OK");
    assert_released(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_releases_everything() {
    let (server, _shared, cluster, low) = setup().await;
    let doomed = Doomed::new(&server.grpc_url());
    let mut call = open(doomed.channel.clone(), false).await;
    call.send(register(server.cluster_id(), &low, 1, b"a/"))
        .await;
    call.await_row(LogType::Initialized).await;
    // Rows are in flight when the client disappears.
    cluster.txn_put(b"a/1", b"v").await.expect("put");
    doomed.vanish();
    cluster.txn_put(b"a/2", b"v").await.expect("put");
    // The client's side of the stream is gone with its runtime.
    drop(call);
    assert_released(&server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_ok_and_exits_promptly() {
    let (mut server, channel, _cluster, low) = setup().await;
    let mut call = open(channel.clone(), false).await;
    call.send(register(server.cluster_id(), &low, 1, b"a/"))
        .await;
    call.await_row(LogType::Initialized).await;
    let started = Instant::now();
    let exited = tokio::task::block_in_place(|| server.stop("TERM"));
    exited.assert_clean();
    // Well inside the 10 s grace period: the feed ended the stream itself.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let end = tokio::time::timeout(WAIT, call.events.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
}

/// How far a connection gets before it ends.
#[derive(Clone, Copy, Debug)]
enum Stage {
    Opened,
    Registered,
    Initialized,
    Streaming,
}

/// How it ends.
#[derive(Clone, Copy, Debug)]
enum End {
    HalfClose,
    /// RST_STREAM without a half-close.
    Cancel,
    /// Drops both halves unread (a half-close, then a reset).
    DropBoth,
    Vanish,
    Refused,
    DeregisterThenHalfClose,
}

/// What a connection's client still holds after its end: the request
/// sender of a cancelled call (dropping it would half-close).
type Kept = Option<mpsc::Sender<ChangeDataRequest>>;

/// One connection's life: open, reach `stage`, end as `end`. Returns what
/// the client still holds while the server cleans up.
async fn life(
    request_id: u64,
    stage: Stage,
    end: End,
    shared: Channel,
    low: RegionInfo,
    url: String,
    cluster_id: u64,
) -> Kept {
    let doomed = matches!(end, End::Vanish).then(|| Doomed::new(&url));
    let channel = doomed.as_ref().map_or(shared, |d| d.channel.clone());
    let half_close = matches!(
        end,
        End::HalfClose | End::DeregisterThenHalfClose | End::DropBoth
    );
    let mut call = open(channel.clone(), half_close).await;
    if !matches!(stage, Stage::Opened) {
        call.send(register(cluster_id, &low, request_id, b"f/"))
            .await;
    }
    match stage {
        Stage::Initialized => call.await_row(LogType::Initialized).await,
        Stage::Streaming => call.await_row(LogType::Commit).await,
        Stage::Opened | Stage::Registered => {}
    }
    // What the client still holds while the server cleans up.
    let mut kept: Kept = None;
    match end {
        End::HalfClose => {
            call.finish().await.expect("half-close ends with OK");
        }
        End::DeregisterThenHalfClose => {
            let mut dereg = register(cluster_id, &low, request_id, b"f/");
            dereg.request = Some(change_data_request::Request::Deregister(Deregister {}));
            call.send(dereg).await;
            call.finish().await.expect("half-close ends with OK");
        }
        End::Refused => {
            let mut notify = register(cluster_id, &low, request_id, b"f/");
            notify.request = Some(change_data_request::Request::NotifyTxnStatus(
                NotifyTxnStatus { txn_status: vec![] },
            ));
            call.send(notify).await;
            let status = call.finish().await.expect_err("refused");
            assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        }
        End::Cancel => {
            let Call {
                requests,
                events,
                cancel,
            } = call;
            drop(events);
            cancel.cancel();
            kept = Some(requests);
        }
        End::DropBoth => drop(call),
        End::Vanish => {
            drop(channel);
            if let Some(doomed) = doomed {
                doomed.vanish();
            }
            drop(call);
        }
    }
    kept
}

/// Polls every future until all are done (a minimal join without spawning).
async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let mut running: Vec<_> = futures.into_iter().map(Some).collect();
    let mut done: Vec<Option<T>> = running.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, result) in running.iter_mut().zip(done.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *result = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_ending_at_random_stages_release_everything() {
    const CONNECTIONS: usize = 200;
    const SEED: u64 = 0x6b76_6665_6564;
    let (server, _shared, cluster, low) = setup().await;
    let cluster_id = server.cluster_id();
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(server.channel().await);
    }
    let url = server.grpc_url();

    // Seeded, so a failing mix can be replayed.
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut lives: Vec<Pin<Box<dyn Future<Output = Kept>>>> = Vec::new();
    for i in 0..CONNECTIONS {
        let stage = [
            Stage::Opened,
            Stage::Registered,
            Stage::Initialized,
            Stage::Streaming,
        ][rng.random_range(0..4)];
        let end = [
            End::HalfClose,
            End::Cancel,
            End::DropBoth,
            End::Vanish,
            End::Refused,
            End::DeregisterThenHalfClose,
        ][rng.random_range(0..6)];
        let shared = channels[i % channels.len()].clone();
        lives.push(Box::pin(life(
            i as u64 + 1,
            stage,
            end,
            shared,
            low.clone(),
            url.clone(),
            cluster_id,
        )));
    }
    // Rows keep flowing while the connections come and go. The lives run
    // concurrently on this task (the client's futures are not all `Send`).
    let ended = tokio::time::timeout(WAIT * 3, join_all(lives));
    tokio::pin!(ended);
    let mut n = 0u64;
    let kept = loop {
        let key = format!("f/{}", n % 50);
        tokio::select! {
            kept = &mut ended => break kept.expect("every connection reaches its end in time"),
            written = cluster.txn_put(key.as_bytes(), b"v") => {
                written.expect("background put");
                n += 1;
            }
        }
    };
    assert_released(&server);

    // The server still serves new connections afterwards.
    let mut call = open(channels[0].clone(), true).await;
    call.send(register(cluster_id, &low, 1, b"g/")).await;
    call.await_row(LogType::Initialized).await;
    call.finish().await.expect("clean end");
    assert_released(&server);
    drop(kept);
}
