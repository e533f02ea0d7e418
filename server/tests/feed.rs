//! End-to-end tests of the `cdcpb.ChangeData` service: the real binary,
//! tonic's generated client, and writes from the official `tikv-client`
//! (optimistic, pessimistic, one-phase, raw) and from kvfeed's own client
//! (a prewrite that is rolled back).
//!
//! Exactness is proven with markers: after the expected rows, a marker key
//! is written into the same subscription's range; rows reach a
//! subscription in apply order, so anything unexpected would arrive before
//! the marker's rows. Waits are bounded by timeouts, never sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use common::TestServer;
use kvfeed_client::feed::Registration;
use kvfeed_client::txn::Mutation;
use kvfeed_client::{Cluster, KeyMode, RegionInfo};
use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::change_data_request::{self, KvApi};
use kvfeed_proto::cdcpb::event::{self, LogType, Row, row::OpType};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, ChangeDataRequest, Header};
use kvfeed_proto::kvrpcpb;
use kvfeed_storage::mvcc::encode_bytes;
use tikv_client::{RawClient, TimestampExt, TransactionClient, TransactionOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// Bound on waiting for one expected event.
const EVENT_WAIT: Duration = Duration::from_secs(20);
/// Bound on polling the status server for an expected state.
const POLL_DEADLINE: Duration = Duration::from_secs(20);
const VERSION: &str = "8.5.0";

/// One client stream, with events buffered per request id so a test can
/// wait for one subscription while others' events keep arriving.
struct FeedConn {
    requests: mpsc::Sender<ChangeDataRequest>,
    events: Streaming<ChangeDataEvent>,
    buffered: HashMap<u64, VecDeque<cdcpb::Event>>,
}

impl FeedConn {
    async fn open(channel: &Channel) -> FeedConn {
        let (requests, rx) = mpsc::channel(64);
        let mut client = ChangeDataClient::new(channel.clone());
        let events = tokio::time::timeout(EVENT_WAIT, client.event_feed(ReceiverStream::new(rx)))
            .await
            .expect("EventFeed answers in time")
            .expect("EventFeed opens")
            .into_inner();
        FeedConn {
            requests,
            events,
            buffered: HashMap::new(),
        }
    }

    async fn send(&self, request: ChangeDataRequest) {
        self.requests
            .send(request)
            .await
            .expect("request stream open");
    }

    /// The next event for `request_id` (resolved timestamps are skipped).
    async fn next_for(&mut self, request_id: u64) -> cdcpb::Event {
        loop {
            if let Some(event) = self
                .buffered
                .get_mut(&request_id)
                .and_then(VecDeque::pop_front)
            {
                return event;
            }
            let message = tokio::time::timeout(EVENT_WAIT, self.events.message())
                .await
                .unwrap_or_else(|_| panic!("no event for request {request_id} in {EVENT_WAIT:?}"))
                .expect("stream healthy")
                .expect("stream open");
            for event in message.events {
                if !matches!(event.event, Some(event::Event::ResolvedTs(_))) {
                    self.buffered
                        .entry(event.request_id)
                        .or_default()
                        .push_back(event);
                }
            }
        }
    }

    /// The next `n` rows of `request_id`; an error event fails the test.
    async fn rows(&mut self, request_id: u64, n: usize) -> Vec<Row> {
        let mut rows = Vec::new();
        while rows.len() < n {
            match self.next_for(request_id).await.event {
                Some(event::Event::Entries(entries)) => rows.extend(entries.entries),
                other => panic!("request {request_id}: expected rows, got {other:?}"),
            }
        }
        assert_eq!(
            rows.len(),
            n,
            "request {request_id}: more rows than expected: {rows:?}"
        );
        rows
    }

    async fn initialized(&mut self, request_id: u64) {
        let rows = self.rows(request_id, 1).await;
        assert_eq!(rows[0].r#type, LogType::Initialized as i32, "{rows:?}");
    }

    async fn error(&mut self, request_id: u64) -> cdcpb::Error {
        match self.next_for(request_id).await.event {
            Some(event::Event::Error(error)) => error,
            other => panic!("request {request_id}: expected an error, got {other:?}"),
        }
    }

    /// Rows of `request_id` up to the commit of `marker`, without the
    /// marker's own rows.
    async fn rows_before_marker(&mut self, request_id: u64, marker: &[u8]) -> Vec<Row> {
        let mut rows = Vec::new();
        loop {
            let row = self.rows(request_id, 1).await.remove(0);
            if row.key == marker {
                let t = LogType::try_from(row.r#type);
                if matches!(t, Ok(LogType::Commit | LogType::Committed)) {
                    return rows;
                }
                continue;
            }
            rows.push(row);
        }
    }

    fn nothing_buffered_for(&self, request_id: u64) -> bool {
        self.buffered
            .get(&request_id)
            .is_none_or(VecDeque::is_empty)
    }
}

/// What a test compares: (type, op, key, value, start_ts, commit_ts).
type Seen = (LogType, OpType, Vec<u8>, Vec<u8>, u64, u64);

fn seen(rows: &[Row]) -> Vec<Seen> {
    rows.iter()
        .map(|r| {
            (
                LogType::try_from(r.r#type).unwrap_or(LogType::Unknown),
                OpType::try_from(r.op_type).unwrap_or(OpType::Unknown),
                r.key.to_vec(),
                r.value.to_vec(),
                r.start_ts,
                r.commit_ts,
            )
        })
        .collect()
}

struct Env {
    server: TestServer,
    channel: Channel,
    cluster: Cluster,
    regions: Vec<RegionInfo>,
}

impl Env {
    async fn start() -> Env {
        let server = TestServer::start();
        let channel = server.channel().await;
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("client connects");
        let regions = cluster.regions_in_range(b"", b"").await.expect("regions");
        assert!(regions.len() >= 2, "{regions:?}");
        Env {
            server,
            channel,
            cluster,
            regions,
        }
    }

    /// The first region, where every ordinary key lives in both modes.
    fn low(&self) -> &RegionInfo {
        &self.regions[0]
    }

    async fn now(&self) -> u64 {
        self.cluster.tso().await.expect("tso").into_inner()
    }

    /// A Register for `[start, end)` (user keys; encoded for TiDB) of the
    /// first region, checkpoint now.
    async fn register(
        &self,
        request_id: u64,
        start: &[u8],
        end: &[u8],
        kv_api: KvApi,
    ) -> ChangeDataRequest {
        let (start, end) = match kv_api {
            KvApi::RawKv => (start.to_vec(), end.to_vec()),
            _ => (encode_bytes(start), encode_bytes(end)),
        };
        let mut request = request_for(self.server.cluster_id(), self.low(), request_id);
        request.start_key = start;
        request.end_key = end;
        request.kv_api = kv_api.into();
        request.checkpoint_ts = self.now().await;
        request
    }

    fn metrics(&self) -> String {
        tokio::task::block_in_place(|| self.server.metrics())
    }

    fn debug_cdc(&self) -> serde_json::Value {
        let (code, body) = tokio::task::block_in_place(|| self.server.http_get("/debug/cdc"));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/debug/cdc is JSON")
    }
}

/// A Register of all of `region` with a current header.
fn request_for(cluster_id: u64, region: &RegionInfo, request_id: u64) -> ChangeDataRequest {
    Registration {
        cluster_id,
        request_id,
        region,
        start: &region.start_key,
        end: &region.end_key,
        checkpoint_ts: 0,
        mode: KeyMode::Txn,
        old_value: false,
    }
    .request()
}

/// A Deregister of `region_id` (0: every region) of `request_id`.
fn deregister(cluster_id: u64, region_id: u64, request_id: u64) -> ChangeDataRequest {
    let request = change_data_request::Request::Deregister(change_data_request::Deregister {});
    ChangeDataRequest {
        region_id,
        request_id,
        request: Some(request),
        ..request_for_header(cluster_id)
    }
}

fn request_for_header(cluster_id: u64) -> ChangeDataRequest {
    ChangeDataRequest {
        header: Some(Header {
            cluster_id,
            ticdc_version: VERSION.to_owned(),
        }),
        ..ChangeDataRequest::default()
    }
}

/// Commits `txn`: (start_ts, commit_ts).
async fn commit_txn(mut txn: tikv_client::Transaction) -> (u64, u64) {
    let start = txn.start_timestamp().version();
    let commit = txn.commit().await.expect("commit").expect("a commit ts");
    (start, commit.version())
}

async fn bounded<T>(work: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .expect("the test finished in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_reach_subscribers_as_prewrite_commit_rollback_and_committed() {
    bounded(async {
        let env = Env::start().await;
        let mut conn = FeedConn::open(&env.channel).await;
        conn.send(env.register(1, b"t/", b"t0", KvApi::TiDb).await)
            .await;
        conn.initialized(1).await;
        let client = TransactionClient::new(vec![env.server.pd_endpoint()])
            .await
            .expect("tikv-client connects");
        use LogType::{Commit, Committed, Prewrite, Rollback};
        use OpType::{Delete, Put, Unknown};

        // Optimistic, two keys: a PREWRITE and a COMMIT each (the secondary
        // commits in the background, so compare per key and as a set).
        let mut txn = client.begin_optimistic().await.expect("begin");
        txn.put(b"t/oa".to_vec(), b"va".to_vec())
            .await
            .expect("put");
        txn.delete(b"t/ob".to_vec()).await.expect("delete");
        let (start, commit) = commit_txn(txn).await;
        let mut rows = seen(&conn.rows(1, 4).await);
        let order: Vec<(Vec<u8>, LogType)> = rows.iter().map(|r| (r.2.clone(), r.0)).collect();
        for key in [b"t/oa".to_vec(), b"t/ob".to_vec()] {
            let kinds: Vec<LogType> = order
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, t)| *t)
                .collect();
            assert_eq!(kinds, vec![Prewrite, Commit], "{key:?} in {order:?}");
        }
        rows.sort_by_key(|r| (r.0 as i32, r.2.clone()));
        assert_eq!(
            rows,
            vec![
                (Prewrite, Put, b"t/oa".to_vec(), b"va".to_vec(), start, 0),
                (Prewrite, Delete, b"t/ob".to_vec(), vec![], start, 0),
                (Commit, Put, b"t/oa".to_vec(), b"va".to_vec(), start, commit),
                (Commit, Delete, b"t/ob".to_vec(), vec![], start, commit),
            ]
        );

        // Pessimistic: the pessimistic lock itself produces no row.
        let mut txn = client.begin_pessimistic().await.expect("begin");
        txn.put(b"t/pa".to_vec(), b"vp".to_vec())
            .await
            .expect("put");
        let (start, commit) = commit_txn(txn).await;
        assert_eq!(
            seen(&conn.rows(1, 2).await),
            vec![
                (Prewrite, Put, b"t/pa".to_vec(), b"vp".to_vec(), start, 0),
                (Commit, Put, b"t/pa".to_vec(), b"vp".to_vec(), start, commit),
            ]
        );

        // A prewrite rolled back: ROLLBACK with commit_ts 0.
        let start_ts = env.cluster.tso().await.expect("tso");
        let key = b"t/ra".to_vec();
        let put = Mutation::Put {
            key: key.clone(),
            value: b"vr".to_vec(),
        };
        env.cluster
            .prewrite(&put, start_ts, 3_000)
            .await
            .expect("prewrite");
        let region = env
            .cluster
            .region_for_key(&KeyMode::Txn.region_key(&key))
            .await
            .expect("region");
        let mut kv = env
            .cluster
            .store(region.leader.store_id)
            .await
            .expect("leader's store")
            .kv();
        let rolled_back = kv
            .kv_batch_rollback(kvrpcpb::BatchRollbackRequest {
                context: Some(region.context()),
                start_version: start_ts.into_inner(),
                keys: vec![key.clone()],
            })
            .await
            .expect("rollback")
            .into_inner();
        assert!(rolled_back.error.is_none() && rolled_back.region_error.is_none());
        let start = start_ts.into_inner();
        assert_eq!(
            seen(&conn.rows(1, 2).await),
            vec![
                (Prewrite, Put, key.clone(), b"vr".to_vec(), start, 0),
                (Rollback, Unknown, key, vec![], start, 0),
            ]
        );

        // One-phase commit: a single COMMITTED row with its value.
        let options = TransactionOptions::new_optimistic().try_one_pc();
        let mut txn = client.begin_with_options(options).await.expect("begin");
        txn.put(b"t/1a".to_vec(), b"v1".to_vec())
            .await
            .expect("put");
        let (start, commit) = commit_txn(txn).await;
        assert_eq!(
            seen(&conn.rows(1, 1).await),
            vec![(
                Committed,
                Put,
                b"t/1a".to_vec(),
                b"v1".to_vec(),
                start,
                commit
            )]
        );

        // Nothing else arrived: the marker's rows come next.
        env.cluster
            .txn_put(b"t/marker", b"m")
            .await
            .expect("marker");
        assert_eq!(conn.rows_before_marker(1, b"t/marker").await, vec![]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_reach_only_raw_subscriptions() {
    bounded(async {
        let env = Env::start().await;
        let mut conn = FeedConn::open(&env.channel).await;
        conn.send(env.register(1, b"r/", b"r0", KvApi::RawKv).await)
            .await;
        // The transactional subscription covers the same user keys.
        conn.send(env.register(2, b"r/", b"r0", KvApi::TiDb).await)
            .await;
        conn.initialized(1).await;
        conn.initialized(2).await;

        let raw = RawClient::new(vec![env.server.pd_endpoint()])
            .await
            .expect("raw client connects");
        raw.put(b"r/a".to_vec(), b"1".to_vec())
            .await
            .expect("raw put");
        raw.delete(b"r/a".to_vec()).await.expect("raw delete");
        let rows = conn.rows(1, 2).await;
        let kinds: Vec<(i32, i32, &[u8], &[u8])> = rows
            .iter()
            .map(|r| (r.r#type, r.op_type, r.key.as_ref(), r.value.as_ref()))
            .collect();
        let committed = LogType::Committed as i32;
        assert_eq!(
            kinds,
            vec![
                (committed, OpType::Put as i32, &b"r/a"[..], &b"1"[..]),
                (committed, OpType::Delete as i32, &b"r/a"[..], &b""[..]),
            ]
        );
        for row in &rows {
            assert_eq!(
                row.start_ts, row.commit_ts,
                "raw rows carry one ts: {row:?}"
            );
        }
        assert!(rows[0].commit_ts < rows[1].commit_ts);

        env.cluster
            .txn_put(b"r/marker", b"m")
            .await
            .expect("txn marker");
        assert_eq!(conn.rows_before_marker(2, b"r/marker").await, vec![]);
        env.cluster
            .raw_put(b"r/marker", b"m")
            .await
            .expect("raw marker");
        assert_eq!(conn.rows_before_marker(1, b"r/marker").await, vec![]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_get_their_own_rows_until_deregistered() {
    bounded(async {
        let env = Env::start().await;
        let cluster_id = env.server.cluster_id();
        let region = env.low().id.0;
        let mut conn = FeedConn::open(&env.channel).await;
        conn.send(env.register(10, b"o/a", b"o/m", KvApi::TiDb).await)
            .await;
        conn.send(env.register(11, b"o/f", b"o/z", KvApi::TiDb).await)
            .await;
        // The same request id on another connection is another subscription.
        let mut other = FeedConn::open(&env.channel).await;
        other
            .send(env.register(10, b"o/", b"o0", KvApi::TiDb).await)
            .await;
        conn.initialized(10).await;
        conn.initialized(11).await;
        other.initialized(10).await;

        for key in [&b"o/g"[..], b"o/b", b"o/x"] {
            env.cluster.txn_put(key, b"v").await.expect("put");
        }
        let keys = |rows: Vec<Row>| -> Vec<Vec<u8>> {
            rows.into_iter()
                .filter(|r| r.r#type == LogType::Commit as i32)
                .map(|r| r.key.to_vec())
                .collect()
        };
        assert_eq!(
            keys(conn.rows(10, 4).await),
            vec![b"o/g".to_vec(), b"o/b".to_vec()]
        );
        assert_eq!(
            keys(conn.rows(11, 4).await),
            vec![b"o/g".to_vec(), b"o/x".to_vec()]
        );
        assert_eq!(
            keys(other.rows(10, 6).await),
            vec![b"o/g".to_vec(), b"o/b".to_vec(), b"o/x".to_vec()]
        );

        // After deregistering 11, a key in both ranges reaches only 10.
        conn.send(deregister(cluster_id, region, 11)).await;
        let mut gone = false;
        let deadline = Instant::now() + POLL_DEADLINE;
        while !gone {
            assert!(Instant::now() < deadline, "request 11 still listed");
            let debug = env.debug_cdc();
            let subs = &debug["connections"][0]["subscriptions"];
            gone = subs
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["request_id"] != 11));
            tokio::task::yield_now().await;
        }
        env.cluster.txn_put(b"o/h", b"v").await.expect("put");
        env.cluster
            .txn_put(b"o/i", b"marker")
            .await
            .expect("marker");
        assert_eq!(
            keys(conn.rows_before_marker(10, b"o/i").await),
            vec![b"o/h".to_vec()]
        );
        // Rows reach a connection in apply order: anything for 11 would
        // have been read by now.
        assert!(
            conn.nothing_buffered_for(11),
            "{:?}",
            conn.buffered.get(&11)
        );

        // Region id 0 deregisters every region of a request id.
        other.send(deregister(cluster_id, 0, 10)).await;
        let deadline = Instant::now() + POLL_DEADLINE;
        loop {
            let text = env.metrics();
            if text.contains("kvfeed_cdc_subscriptions 1\n") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "subscriptions not released:\n{text}"
            );
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_half_close_ends_with_ok_and_unknown_features_are_unimplemented() {
    bounded(async {
        let env = Env::start().await;
        let mut client = ChangeDataClient::new(env.channel.clone());

        // TiCDC's probe: half-close at once, expect a clean end.
        let mut request = tonic::Request::new(tokio_stream::empty::<ChangeDataRequest>());
        request
            .metadata_mut()
            .insert("features", "stream-multiplexing".parse().expect("ascii"));
        let mut events = client
            .event_feed_v2(request)
            .await
            .expect("V2 opens")
            .into_inner();
        let end = tokio::time::timeout(EVENT_WAIT, events.message())
            .await
            .expect("ends in time");
        assert!(matches!(end, Ok(None)), "{end:?}");

        let mut request = tonic::Request::new(tokio_stream::empty::<ChangeDataRequest>());
        request.metadata_mut().insert(
            "features",
            "stream-multiplexing, teleport".parse().expect("ascii"),
        );
        let status = match client.event_feed_v2(request).await {
            Err(status) => status,
            Ok(response) => {
                let mut events = response.into_inner();
                let first = tokio::time::timeout(EVENT_WAIT, events.message()).await;
                first
                    .expect("ends in time")
                    .expect_err("an unknown feature fails the call")
            }
        };
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(status.message().contains("teleport"), "{status:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_txn_status_is_unimplemented_and_the_server_keeps_serving() {
    bounded(async {
        let env = Env::start().await;
        let mut healthy = FeedConn::open(&env.channel).await;
        healthy
            .send(env.register(1, b"n/", b"n0", KvApi::TiDb).await)
            .await;
        healthy.initialized(1).await;

        let mut refused = FeedConn::open(&env.channel).await;
        refused
            .send(env.register(1, b"n/", b"n0", KvApi::TiDb).await)
            .await;
        refused.initialized(1).await;
        let mut notify = request_for(env.server.cluster_id(), env.low(), 2);
        notify.request = Some(change_data_request::Request::NotifyTxnStatus(
            change_data_request::NotifyTxnStatus { txn_status: vec![] },
        ));
        refused.send(notify).await;
        let status = loop {
            match tokio::time::timeout(EVENT_WAIT, refused.events.message()).await {
                Ok(Err(status)) => break status,
                Ok(Ok(Some(_))) => {}
                other => panic!("expected UNIMPLEMENTED, got {other:?}"),
            }
        };
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(status.message().contains("NotifyTxnStatus"), "{status:?}");

        env.cluster.txn_put(b"n/a", b"still").await.expect("put");
        let rows = healthy.rows(1, 2).await;
        assert_eq!(rows[1].r#type, LogType::Commit as i32);
        assert_eq!(rows[1].value, &b"still"[..]);
        assert!(
            env.metrics()
                .contains("kvfeed_cdc_aborted_connections_total{reason=\"bad_request\"} 1"),
            "{}",
            env.metrics()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registers_are_answered_while_another_connection_keeps_working() {
    bounded(async {
        let env = Env::start().await;
        let cluster_id = env.server.cluster_id();
        let (low, high) = (env.low().clone(), env.regions[1].clone());
        let mut healthy = FeedConn::open(&env.channel).await;
        healthy
            .send(env.register(1, b"b/", b"b0", KvApi::TiDb).await)
            .await;
        healthy.initialized(1).await;
        let mut conn = FeedConn::open(&env.channel).await;

        conn.send(request_for(cluster_id ^ 1, &low, 1)).await;
        let e = conn
            .error(1)
            .await
            .cluster_id_mismatch
            .expect("cluster_id_mismatch");
        assert_eq!((e.current, e.request), (cluster_id, cluster_id ^ 1));

        let mut stale = request_for(cluster_id, &low, 2);
        stale.region_epoch = Some(kvfeed_proto::metapb::RegionEpoch {
            conf_ver: low.epoch.conf_ver,
            version: low.epoch.version + 1,
        });
        conn.send(stale).await;
        let e = conn
            .error(2)
            .await
            .epoch_not_match
            .expect("epoch_not_match");
        assert_eq!(e.current_regions.first().map(|r| r.id), Some(low.id.0));

        let mut unknown = request_for(cluster_id, &low, 3);
        unknown.region_id = 999;
        conn.send(unknown).await;
        let e = conn
            .error(3)
            .await
            .region_not_found
            .expect("region_not_found");
        assert_eq!(e.region_id, 999);

        conn.send(request_for(cluster_id, &low, 4)).await;
        conn.send(request_for(cluster_id, &low, 4)).await;
        // The first one's INITIALIZED (after its catch-up scan) and the
        // second one's refusal may come in either order.
        let mut answers = Vec::new();
        for _ in 0..2 {
            answers.push(conn.next_for(4).await.event);
        }
        let duplicate = answers.iter().find_map(|a| match a {
            Some(event::Event::Error(e)) => e.duplicate_request,
            _ => None,
        });
        let initialized = answers.iter().any(|a| match a {
            Some(event::Event::Entries(e)) => e
                .entries
                .iter()
                .all(|r| r.r#type == LogType::Initialized as i32),
            _ => false,
        });
        assert!(initialized, "{answers:?}");
        let e = duplicate.unwrap_or_else(|| panic!("no duplicate_request in {answers:?}"));
        assert_eq!(e.region_id, low.id.0);

        // A range of the first region sent for the second one.
        let mut outside = request_for(cluster_id, &high, 5);
        outside.start_key = encode_bytes(b"a");
        outside.end_key = encode_bytes(b"b");
        conn.send(outside).await;
        assert!(conn.error(5).await.epoch_not_match.is_some());

        // The other connection was never disturbed.
        env.cluster.txn_put(b"b/1", b"v").await.expect("put");
        assert_eq!(healthy.rows(1, 2).await[1].key, &b"b/1"[..]);

        // 10,000 registers on one connection: each answered exactly once,
        // by INITIALIZED or, past the catch-up scan queue limit, by
        // server_is_busy.
        const MANY: u64 = 10_000;
        let mut flood = FeedConn::open(&env.channel).await;
        let sender = flood.requests.clone();
        let mut template = request_for(cluster_id, &low, 0);
        template.checkpoint_ts = env.now().await;
        let sending = tokio::spawn(async move {
            for id in 1..=MANY {
                let mut request = template.clone();
                request.request_id = id;
                sender.send(request).await.expect("request stream open");
            }
        });
        let mut answered = std::collections::BTreeSet::new();
        let mut busy = 0;
        while (answered.len() as u64) < MANY {
            let message = tokio::time::timeout(EVENT_WAIT, flood.events.message())
                .await
                .expect("answers keep coming")
                .expect("stream healthy")
                .expect("stream open");
            for event in message.events {
                let id = event.request_id;
                let first = match event.event {
                    Some(event::Event::Entries(e)) => {
                        let types: Vec<i32> = e.entries.iter().map(|r| r.r#type).collect();
                        assert_eq!(types, vec![LogType::Initialized as i32], "request {id}");
                        answered.insert(id)
                    }
                    Some(event::Event::Error(e)) if e.server_is_busy.is_some() => {
                        busy += 1;
                        answered.insert(id)
                    }
                    Some(event::Event::ResolvedTs(_)) => true,
                    other => panic!("unexpected answer to {id}: {other:?}"),
                };
                assert!(first, "request {id} answered twice");
            }
        }
        assert_eq!(answered.first().copied(), Some(1));
        assert_eq!(answered.last().copied(), Some(MANY));
        assert!(busy < MANY, "some registers must succeed");
        sending.await.expect("sender finished");
        env.cluster.txn_put(b"b/2", b"v").await.expect("put");
        assert_eq!(healthy.rows(1, 2).await[1].key, &b"b/2"[..]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_cdc_and_metrics_show_live_connections() {
    bounded(async {
        let env = Env::start().await;
        let mut conn = FeedConn::open(&env.channel).await;
        conn.send(env.register(7, b"d/", b"d0", KvApi::TiDb).await)
            .await;
        conn.send(env.register(8, b"e/", b"e0", KvApi::RawKv).await)
            .await;
        conn.initialized(7).await;
        conn.initialized(8).await;

        let debug = env.debug_cdc();
        let connections = debug["connections"].as_array().expect("connections");
        assert_eq!(connections.len(), 1, "{debug:#}");
        let c = &connections[0];
        assert_eq!(c["version"], VERSION);
        assert!(
            c["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{c}"
        );
        let subs = c["subscriptions"].as_array().expect("subscriptions");
        let mut listed: Vec<(u64, String, String, String)> = subs
            .iter()
            .map(|s| {
                (
                    s["request_id"].as_u64().unwrap_or(0),
                    s["kv_api"].as_str().unwrap_or("").to_owned(),
                    s["state"].as_str().unwrap_or("").to_owned(),
                    s["start_key"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        listed.sort();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            listed,
            vec![
                (7, "TiDB".into(), "normal".into(), hex(&encode_bytes(b"d/"))),
                (8, "RawKV".into(), "normal".into(), hex(b"e/")),
            ]
        );

        let text = env.metrics();
        for line in [
            "kvfeed_cdc_connections 1",
            "kvfeed_cdc_subscriptions 2",
            "kvfeed_cdc_connection_tasks 1",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing:\n{text}"
            );
        }
        for name in [
            "kvfeed_cdc_pending_bytes",
            "kvfeed_cdc_events_sent_total",
            "kvfeed_cdc_sent_bytes_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
    })
    .await;
}
