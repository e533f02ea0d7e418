//! End-to-end tests of the PD service: the real binary, called with the
//! generated `pdpb` client over gRPC, checking what TiKV clients rely on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::TestServer;
use kvfeed_proto::metapb;
use kvfeed_proto::pdpb;
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{
    ErrorType, GetAllStoresRequest, GetClusterInfoRequest, GetGcSafePointRequest,
    GetMembersRequest, GetRegionByIdRequest, GetRegionRequest, GetRegionResponse, GetStoreRequest,
    RequestHeader, ResponseHeader, ScanRegionsRequest, TsoRequest, TsoResponse,
    UpdateGcSafePointRequest, UpdateServiceGcSafePointRequest,
};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::region::{RegionMap, STORE_ID};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

async fn pd(server: &TestServer) -> PdClient<Channel> {
    PdClient::new(server.channel().await)
}

fn header(cluster_id: u64) -> Option<RequestHeader> {
    Some(RequestHeader {
        cluster_id,
        ..RequestHeader::default()
    })
}

/// Asserts a successful response header for `server`'s cluster.
fn assert_ok(server: &TestServer, header: Option<&ResponseHeader>) {
    let header = header.expect("every response has a header");
    assert_eq!(header.cluster_id, server.cluster_id());
    assert_eq!(header.error, None);
}

/// The split key of the default two-region layout.
fn split_key() -> Vec<u8> {
    RegionMap::default_split_keys()
        .into_iter()
        .next()
        .expect("one split key")
}

fn ts_of(response: &TsoResponse) -> TimeStamp {
    let ts = response.timestamp.as_ref().expect("timestamp present");
    let physical = u64::try_from(ts.physical).expect("physical is positive");
    let logical = u64::try_from(ts.logical).expect("logical is positive");
    TimeStamp::compose(physical, logical)
}

#[tokio::test]
async fn get_members_names_the_advertised_leader() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    // Clients call it first, without knowing the cluster id.
    let members = client
        .get_members(GetMembersRequest::default())
        .await
        .expect("GetMembers")
        .into_inner();
    assert_ok(&server, members.header.as_ref());
    let leader = members.leader.clone().expect("leader");
    let url = format!("http://{}", server.addr());
    assert_eq!(leader.client_urls, vec![url.clone()]);
    assert_eq!(leader.peer_urls, vec![url]);
    assert_eq!(leader.name, "kvfeed");
    assert_eq!(leader.member_id, 1);
    assert_eq!(members.members, vec![leader.clone()]);
    assert_eq!(members.etcd_leader, Some(leader));

    let info = client
        .get_cluster_info(GetClusterInfoRequest::default())
        .await
        .expect("GetClusterInfo")
        .into_inner();
    assert_ok(&server, info.header.as_ref());
}

#[tokio::test]
async fn advertised_address_is_what_clients_are_given() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = TestServer::start_in_with(
        &tmp.path().join("data"),
        &["--advertise-addr", "kv.example:20160"],
    );
    let mut client = pd(&server).await;
    let members = client
        .get_members(GetMembersRequest::default())
        .await
        .expect("GetMembers")
        .into_inner();
    let leader = members.leader.expect("leader");
    assert_eq!(
        leader.client_urls,
        vec!["http://kv.example:20160".to_owned()]
    );
    let store = client
        .get_store(GetStoreRequest {
            header: header(server.cluster_id()),
            store_id: STORE_ID,
        })
        .await
        .expect("GetStore")
        .into_inner()
        .store
        .expect("store");
    assert_eq!(store.address, "kv.example:20160");
}

/// Sends every request on one stream before reading any response, then
/// half-closes; returns the responses in arrival order.
async fn tso_batch(
    client: &mut PdClient<Channel>,
    cluster_id: u64,
    counts: &[u32],
) -> Vec<Result<TsoResponse, tonic::Status>> {
    let requests: Vec<(u64, u32)> = counts.iter().map(|&c| (cluster_id, c)).collect();
    tso_pipelined(client, &requests).await
}

/// As [`tso_batch`], each request `(cluster id, count)` of its own.
async fn tso_pipelined(
    client: &mut PdClient<Channel>,
    requests: &[(u64, u32)],
) -> Vec<Result<TsoResponse, tonic::Status>> {
    let (tx, rx) = mpsc::channel(requests.len().max(1));
    for &(cluster_id, count) in requests {
        tx.send(TsoRequest {
            header: header(cluster_id),
            count,
            dc_location: String::new(),
        })
        .await
        .expect("queue request");
    }
    drop(tx);
    let mut inbound = client
        .tso(ReceiverStream::new(rx))
        .await
        .expect("Tso stream")
        .into_inner();
    let mut out = Vec::new();
    loop {
        match inbound.message().await {
            Ok(Some(response)) => out.push(Ok(response)),
            Ok(None) => break,
            Err(status) => {
                out.push(Err(status));
                break;
            }
        }
    }
    out
}

#[tokio::test]
async fn tso_answers_each_request_in_order_with_the_highest_of_the_batch() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let counts = [1, 7, 3, 100, 1, 42];
    let responses = tso_batch(&mut client, server.cluster_id(), &counts).await;
    assert_eq!(responses.len(), counts.len(), "one response per request");
    let mut previous_highest = TimeStamp::ZERO;
    for (response, &count) in responses.iter().zip(&counts) {
        let response = response.as_ref().expect("no error");
        assert_ok(&server, response.header.as_ref());
        assert_eq!(response.count, count, "answers arrive in request order");
        let highest = ts_of(response);
        let lowest = TimeStamp::new(highest.into_inner() - u64::from(count) + 1);
        assert_eq!(
            highest.physical(),
            lowest.physical(),
            "a batch shares one physical part"
        );
        assert!(
            lowest > previous_highest,
            "batches are disjoint and increasing: {lowest} after {previous_highest}"
        );
        previous_highest = highest;
    }
    // A second stream continues above the first.
    let again = tso_batch(&mut client, server.cluster_id(), &[1]).await;
    let next = ts_of(again[0].as_ref().expect("no error"));
    assert!(next > previous_highest, "{next} > {previous_highest}");
    // The physical part is wall-clock milliseconds.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        next.physical().abs_diff(now_ms) < 60_000,
        "{}",
        next.physical()
    );
}

#[tokio::test]
async fn tso_count_zero_ends_the_stream_with_an_error() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let responses = tso_batch(&mut client, server.cluster_id(), &[2, 0, 5]).await;
    assert_eq!(responses.len(), 2, "{responses:?}");
    assert_eq!(responses[0].as_ref().expect("first is fine").count, 2);
    let status = responses[1].as_ref().expect_err("count 0 is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("count"), "{}", status.message());
}

fn assert_region(server: &TestServer, response: &GetRegionResponse, start: &[u8], end: &[u8]) {
    assert_ok(server, response.header.as_ref());
    let region = response.region.as_ref().expect("region");
    assert_eq!(region.start_key, start);
    assert_eq!(region.end_key, end);
    let epoch = region.region_epoch.as_ref().expect("epoch");
    assert!(epoch.version > 0 && epoch.conf_ver > 0, "{epoch:?}");
    let leader = response.leader.as_ref().expect("leader");
    assert_eq!(leader.store_id, STORE_ID);
    assert_eq!(leader.role, metapb::PeerRole::Voter as i32);
    assert_eq!(region.peers, vec![*leader]);
}

#[tokio::test]
async fn get_region_routes_keys_by_the_encoded_boundaries() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let split = split_key();
    let mut below_split = split.clone();
    *below_split.last_mut().expect("non-empty") -= 1;
    let mut above_split = split.clone();
    above_split.push(0);

    let mut lookup = async |key: &[u8]| {
        client
            .get_region(GetRegionRequest {
                header: header(server.cluster_id()),
                region_key: key.to_vec(),
                need_buckets: false,
            })
            .await
            .expect("GetRegion")
            .into_inner()
    };
    for key in [&b""[..], b"a", b"\xff\xff", &below_split] {
        assert_region(&server, &lookup(key).await, b"", &split);
    }
    for key in [&split[..], &above_split, &[0xFF; 40]] {
        assert_region(&server, &lookup(key).await, &split, b"");
    }
    let first = lookup(b"a").await.region.expect("region");
    let second = lookup(&split).await.region.expect("region");
    assert_ne!(first.id, second.id);
    assert_ne!(
        first.peers[0].id, second.peers[0].id,
        "each region has its own peer"
    );

    // By id: the same regions; an unknown id is an empty answer, not an error.
    for expected in [&first, &second] {
        let by_id = client
            .get_region_by_id(GetRegionByIdRequest {
                header: header(server.cluster_id()),
                region_id: expected.id,
                need_buckets: false,
            })
            .await
            .expect("GetRegionByID")
            .into_inner();
        assert_region(&server, &by_id, &expected.start_key, &expected.end_key);
        assert_eq!(by_id.region.as_ref(), Some(expected));
    }
    let unknown = client
        .get_region_by_id(GetRegionByIdRequest {
            header: header(server.cluster_id()),
            region_id: 987_654,
            need_buckets: false,
        })
        .await
        .expect("GetRegionByID")
        .into_inner();
    assert_ok(&server, unknown.header.as_ref());
    assert_eq!(unknown.region, None);
    assert_eq!(unknown.leader, None);
}

#[tokio::test]
async fn get_prev_region_answers_the_region_before_the_keys_region() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let split = split_key();
    let mut above_split = split.clone();
    above_split.push(0);

    let mut prev = async |key: &[u8], cluster_id: u64| {
        client
            .get_prev_region(GetRegionRequest {
                header: header(cluster_id),
                region_key: key.to_vec(),
                need_buckets: false,
            })
            .await
            .expect("GetPrevRegion")
            .into_inner()
    };
    // Keys of the second region (its start key included): the first region.
    for key in [&split[..], &above_split, &[0xFF; 40]] {
        assert_region(&server, &prev(key, server.cluster_id()).await, b"", &split);
    }
    // Keys of the first region have no previous region: a success without one.
    for key in [&b""[..], b"a"] {
        let none = prev(key, server.cluster_id()).await;
        assert_ok(&server, none.header.as_ref());
        assert_eq!((none.region, none.leader), (None, None));
    }
    // Another cluster's request is a header error, as for GetRegion.
    let wrong = server.cluster_id().wrapping_add(1).max(1);
    let refused = prev(&split, wrong).await;
    assert_eq!(refused.region, None);
    let error = refused.header.and_then(|h| h.error).expect("an error");
    assert_eq!(error.r#type, ErrorType::InvalidValue as i32);
}

#[tokio::test]
async fn scan_regions_honours_range_and_limit_and_fills_both_layouts() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let split = split_key();
    let mut scan = async |start: &[u8], end: &[u8], limit: i32| {
        let response = client
            .scan_regions(ScanRegionsRequest {
                header: header(server.cluster_id()),
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                limit,
            })
            .await
            .expect("ScanRegions")
            .into_inner();
        assert_ok(&server, response.header.as_ref());
        assert_eq!(response.regions.len(), response.region_metas.len());
        assert_eq!(response.regions.len(), response.leaders.len());
        for ((region, meta), leader) in response
            .regions
            .iter()
            .zip(&response.region_metas)
            .zip(&response.leaders)
        {
            assert_eq!(region.region.as_ref(), Some(meta));
            assert_eq!(region.leader.as_ref(), Some(leader));
            assert_eq!(leader.store_id, STORE_ID);
        }
        response
            .region_metas
            .into_iter()
            .map(|r| (r.start_key, r.end_key))
            .collect::<Vec<_>>()
    };
    let both = vec![(Vec::new(), split.clone()), (split.clone(), Vec::new())];
    assert_eq!(scan(b"", b"", 0).await, both);
    assert_eq!(scan(b"", b"", -1).await, both, "negative limit: no limit");
    assert_eq!(scan(b"", b"", 1).await, both[..1].to_vec());
    assert_eq!(scan(&split, b"", 0).await, both[1..].to_vec());
    assert_eq!(
        scan(b"a", &split, 0).await,
        both[..1].to_vec(),
        "end is exclusive"
    );
}

#[tokio::test]
async fn get_store_describes_the_one_store() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let response = client
        .get_store(GetStoreRequest {
            header: header(server.cluster_id()),
            store_id: STORE_ID,
        })
        .await
        .expect("GetStore")
        .into_inner();
    assert_ok(&server, response.header.as_ref());
    let store = response.store.expect("store");
    assert_eq!(store.id, STORE_ID);
    assert_eq!(store.address, server.addr());
    assert_eq!(store.status_address, server.status_addr());
    assert_eq!(store.state, metapb::StoreState::Up as i32);
    assert!(store.labels.is_empty());
    assert!(store.start_timestamp > 0);
    let version: Vec<u64> = store
        .version
        .split('.')
        .map(|p| p.parse().expect("semver part"))
        .collect();
    assert_eq!(version.len(), 3, "{}", store.version);

    let unknown = client
        .get_store(GetStoreRequest {
            header: header(server.cluster_id()),
            store_id: 2,
        })
        .await
        .expect("GetStore")
        .into_inner();
    let error = unknown
        .header
        .expect("header")
        .error
        .expect("unknown store is an error");
    assert!(error.message.contains('2'), "{}", error.message);
    assert_eq!(unknown.store, None);

    let all = client
        .get_all_stores(GetAllStoresRequest {
            header: header(server.cluster_id()),
            exclude_tombstone_stores: true,
        })
        .await
        .expect("GetAllStores")
        .into_inner();
    assert_ok(&server, all.header.as_ref());
    // The heartbeat time is "now" in each answer.
    let without_heartbeat = |s: &metapb::Store| metapb::Store {
        last_heartbeat: 0,
        ..s.clone()
    };
    assert_eq!(
        all.stores.iter().map(without_heartbeat).collect::<Vec<_>>(),
        vec![without_heartbeat(&store)]
    );
}

#[tokio::test]
async fn requests_for_another_cluster_get_a_header_error() {
    let server = TestServer::start();
    let ours = server.cluster_id();
    refused_for_cluster(&server, ours.wrapping_add(1).max(1), true).await;
}

/// A client that never asked `GetMembers` which cluster this is sends 0:
/// only `GetMembers` and `GetClusterInfo` (which client-go sends without a
/// header) answer it, as PD does.
#[tokio::test]
async fn requests_without_a_cluster_id_are_refused_but_for_members_and_cluster_info() {
    let server = TestServer::start();
    refused_for_cluster(&server, 0, false).await;
    let mut client = pd(&server).await;
    let members = client
        .get_members(GetMembersRequest { header: None })
        .await
        .expect("GetMembers")
        .into_inner();
    assert_ok(&server, members.header.as_ref());
    let info = client
        .get_cluster_info(GetClusterInfoRequest { header: None })
        .await
        .expect("GetClusterInfo")
        .into_inner();
    assert_ok(&server, info.header.as_ref());
}

/// Asserts that requests naming cluster `wrong` are refused with a header
/// error (`GetMembers` too when `members`) and change nothing.
async fn refused_for_cluster(server: &TestServer, wrong: u64, members: bool) {
    let mut client = pd(server).await;
    let ours = server.cluster_id();
    let check = |header: Option<ResponseHeader>| {
        let header = header.expect("header");
        assert_eq!(header.cluster_id, ours);
        let error = header.error.expect("mismatch is an error");
        assert_eq!(error.r#type, ErrorType::InvalidValue as i32);
        assert!(
            error.message.contains("mismatch cluster id"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains(&ours.to_string()),
            "{}",
            error.message
        );
        assert!(
            error.message.contains(&wrong.to_string()),
            "{}",
            error.message
        );
    };

    let region = client
        .get_region(GetRegionRequest {
            header: header(wrong),
            region_key: b"a".to_vec(),
            need_buckets: false,
        })
        .await
        .expect("GetRegion")
        .into_inner();
    assert_eq!(region.region, None);
    check(region.header);
    let store = client
        .get_store(GetStoreRequest {
            header: header(wrong),
            store_id: STORE_ID,
        })
        .await
        .expect("GetStore")
        .into_inner();
    assert_eq!(store.store, None);
    check(store.header);
    if members {
        let members = client
            .get_members(GetMembersRequest {
                header: header(wrong),
            })
            .await
            .expect("GetMembers")
            .into_inner();
        check(members.header);
    }
    let gc = client
        .update_gc_safe_point(UpdateGcSafePointRequest {
            header: header(wrong),
            safe_point: 10,
        })
        .await
        .expect("UpdateGCSafePoint")
        .into_inner();
    check(gc.header);
    let tso = tso_batch(&mut client, wrong, &[3, 1]).await;
    assert_eq!(tso.len(), 2, "still one answer per request");
    for response in tso {
        let response = response.expect("answered, not a stream error");
        assert_eq!(response.count, 0);
        assert_eq!(response.timestamp, None);
        check(response.header);
    }

    // The refused update changed nothing.
    let current = client
        .get_gc_safe_point(GetGcSafePointRequest {
            header: header(server.cluster_id()),
        })
        .await
        .expect("GetGCSafePoint")
        .into_inner();
    assert_ok(server, current.header.as_ref());
    assert_eq!(current.safe_point, 0);
}

// Multi-threaded so the dropped client's connection task can answer the
// server's GOAWAY while this thread blocks in the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_safe_points_only_rise_and_survive_a_restart() {
    let mut server = TestServer::start_restartable(&[]);
    let mut client = pd(&server).await;
    let cluster_id = server.cluster_id();
    let update = async |client: &mut PdClient<Channel>, safe_point: u64| {
        let response = client
            .update_gc_safe_point(UpdateGcSafePointRequest {
                header: header(cluster_id),
                safe_point,
            })
            .await
            .expect("UpdateGCSafePoint")
            .into_inner();
        assert_eq!(response.header.as_ref().and_then(|h| h.error.clone()), None);
        response.new_safe_point
    };
    assert_eq!(
        update(&mut client, 100).await,
        100,
        "new == requested: success"
    );
    assert_eq!(update(&mut client, 50).await, 100, "never moves back");
    assert_eq!(update(&mut client, 200).await, 200);
    let get = client
        .get_gc_safe_point(GetGcSafePointRequest {
            header: header(cluster_id),
        })
        .await
        .expect("GetGCSafePoint")
        .into_inner();
    assert_eq!(get.safe_point, 200);

    // Service safe points: one below the minimum is refused and told the
    // minimum; one above it is kept.
    let service = async |client: &mut PdClient<Channel>, id: &str, ttl: i64, sp: u64| {
        client
            .update_service_gc_safe_point(UpdateServiceGcSafePointRequest {
                header: header(cluster_id),
                service_id: id.as_bytes().to_vec(),
                ttl,
                safe_point: sp,
            })
            .await
            .expect("UpdateServiceGCSafePoint")
            .into_inner()
    };
    let refused = service(&mut client, "cdc", 600, 150).await;
    assert_eq!(refused.min_safe_point, 200);
    let kept = service(&mut client, "cdc", 600, 250).await;
    assert_eq!(kept.header.as_ref().and_then(|h| h.error.clone()), None);
    assert_eq!(kept.min_safe_point, 200);
    assert_eq!(update(&mut client, 400).await, 400);
    let held = service(&mut client, "backup", 600, 300).await;
    assert_eq!(held.min_safe_point, 250, "the cdc service holds GC back");
    assert_eq!(held.service_id, b"cdc");
    assert!(held.ttl > 0 && held.ttl <= 600, "{}", held.ttl);
    let empty = service(&mut client, "", 600, 300).await;
    let error = empty
        .header
        .and_then(|h| h.error)
        .expect("empty id refused");
    assert_eq!(error.r#type, ErrorType::InvalidValue as i32);
    let removed = service(&mut client, "cdc", 0, 0).await;
    assert_eq!(removed.min_safe_point, 300, "backup is now the lowest");

    let metrics = server.metrics();
    for name in [
        "kvfeed_gc_safe_point",
        "kvfeed_gc_runs_total",
        "kvfeed_gc_keys_deleted_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    drop(client);
    server.restart_same_port();
    let mut client = pd(&server).await;
    let get = client
        .get_gc_safe_point(GetGcSafePointRequest {
            header: header(cluster_id),
        })
        .await
        .expect("GetGCSafePoint")
        .into_inner();
    assert_eq!(get.safe_point, 400, "persisted");
    assert_eq!(update(&mut client, 300).await, 400, "still monotonic");
    let after = service(&mut client, "backup", 600, 300).await;
    assert_eq!(after.min_safe_point, 300, "service safe points persisted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tso_stream_ends_at_shutdown() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(TsoRequest {
        header: header(server.cluster_id()),
        count: 1,
        dc_location: String::new(),
    })
    .await
    .expect("queue request");
    let mut inbound = client
        .tso(ReceiverStream::new(rx))
        .await
        .expect("Tso stream")
        .into_inner();
    let first = inbound
        .message()
        .await
        .expect("answer")
        .expect("a response");
    assert_eq!(first.count, 1);

    // The request side stays open (`tx` is alive): only the server can end it.
    server.stop_without_grace().await;
    assert!(
        !matches!(inbound.message().await, Ok(Some(_))),
        "no answer after shutdown"
    );
    drop(tx);
}

/// A safe point above every timestamp handed out is refused: PD itself
/// would take it, and from then on GC would be held (service) or every
/// feed from an earlier timestamp refused (GC) for good.
#[tokio::test]
async fn safe_points_from_the_future_are_refused() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let cluster_id = server.cluster_id();
    let refused = |header: Option<ResponseHeader>| {
        let error = header.and_then(|h| h.error).expect("an error header");
        assert_eq!(error.r#type, ErrorType::InvalidValue as i32, "{error:?}");
        assert!(
            error.message.contains("above the current timestamp"),
            "{error:?}"
        );
    };
    let gc = client
        .update_gc_safe_point(UpdateGcSafePointRequest {
            header: header(cluster_id),
            safe_point: u64::MAX,
        })
        .await
        .expect("UpdateGCSafePoint")
        .into_inner();
    refused(gc.header);
    let service = client
        .update_service_gc_safe_point(UpdateServiceGcSafePointRequest {
            header: header(cluster_id),
            service_id: b"future".to_vec(),
            ttl: 3600,
            safe_point: u64::MAX - 1,
        })
        .await
        .expect("UpdateServiceGCSafePoint")
        .into_inner();
    refused(service.header);
    // Nothing moved: the safe point is still 0, and a current one is taken.
    let current = client
        .get_gc_safe_point(GetGcSafePointRequest {
            header: header(cluster_id),
        })
        .await
        .expect("GetGCSafePoint")
        .into_inner();
    assert_eq!(current.safe_point, 0);
    let now = tso_batch(&mut client, cluster_id, &[1]).await;
    let now = now[0]
        .as_ref()
        .expect("a timestamp")
        .timestamp
        .map(|t| TimeStamp::compose(t.physical as u64, t.logical as u64))
        .expect("a timestamp");
    let ok = client
        .update_gc_safe_point(UpdateGcSafePointRequest {
            header: header(cluster_id),
            safe_point: now.into_inner(),
        })
        .await
        .expect("UpdateGCSafePoint")
        .into_inner();
    assert_ok(&server, ok.header.as_ref());
    assert_eq!(ok.new_safe_point, now.into_inner());
}

/// A client that pipelines its Tso requests (tikv-client does) gets every
/// answer, in order, however far it runs ahead of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_tso_client_gets_every_answer_in_order() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let counts = vec![1u32; 30_000];
    let responses = tso_batch(&mut client, server.cluster_id(), &counts).await;
    assert_eq!(responses.len(), counts.len(), "{:?}", responses.last());
    let mut previous = TimeStamp::new(0);
    for response in &responses {
        let response = response.as_ref().expect("answered");
        let ts = ts_of(response);
        assert!(ts > previous, "{ts} after {previous}");
        previous = ts;
    }
}

/// A Tso request that does not decode ends the stream with an error status,
/// never with the OK of a clean close.
#[tokio::test]
async fn an_undecodable_tso_request_ends_the_stream_with_an_error() {
    let server = TestServer::start();
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    // Field 1 of a TsoRequest is its header, a message; a Timestamp's is a
    // number: the wire types clash.
    let garbage = pdpb::Timestamp {
        physical: 5,
        ..pdpb::Timestamp::default()
    };
    let codec = tonic_prost::ProstCodec::<pdpb::Timestamp, TsoResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/pdpb.PD/Tso");
    let request = tonic::Request::new(tokio_stream::iter(vec![garbage]));
    let mut inbound = grpc
        .streaming(request, path, codec)
        .await
        .expect("the stream opens")
        .into_inner();
    let status = inbound
        .message()
        .await
        .expect_err("an error status, not a clean end");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("undecodable"), "{status:?}");
}

/// A service safe point asked for with a TTL beyond
/// `storage.max-service-safe-point-ttl` is granted that TTL only, so no
/// client pins GC for good.
#[tokio::test]
async fn service_safe_point_ttls_are_capped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[storage]\nmax-service-safe-point-ttl = \"1h\"\n").expect("config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config]);
    let mut client = pd(&server).await;
    let update = |service: &str, ttl: i64, safe_point: u64| UpdateServiceGcSafePointRequest {
        header: header(server.cluster_id()),
        service_id: service.as_bytes().to_vec(),
        ttl,
        safe_point,
    };
    let pinned = client
        .update_service_gc_safe_point(update("pinned", 1 << 62, 1))
        .await
        .expect("UpdateServiceGCSafePoint")
        .into_inner();
    assert_ok(&server, pinned.header.as_ref());
    // The answer describes the minimum, which is the service's own entry
    // once the GC safe point passed it: raise it, and ask with another.
    let gc = client
        .update_gc_safe_point(UpdateGcSafePointRequest {
            header: header(server.cluster_id()),
            safe_point: 5,
        })
        .await
        .expect("UpdateGCSafePoint")
        .into_inner();
    assert_ok(&server, gc.header.as_ref());
    let min = client
        .update_service_gc_safe_point(update("probe", 60, 10))
        .await
        .expect("UpdateServiceGCSafePoint")
        .into_inner();
    assert_eq!(min.service_id, b"pinned");
    assert!(
        (3500..=3600).contains(&min.ttl),
        "pinned for {} s, past the 1h cap",
        min.ttl
    );
}

/// Requests the client sent ahead are answered together, yet each keeps
/// its own answer, in order: valid ones their own disjoint, increasing
/// runs of timestamps, one for another cluster its header error.
#[tokio::test]
async fn pipelined_tso_requests_keep_their_own_answers() {
    let server = TestServer::start();
    let mut client = pd(&server).await;
    let ours = server.cluster_id();
    let wrong = ours.wrapping_add(1).max(1);
    let sent = [(ours, 3), (ours, 5), (wrong, 1), (ours, 2), (ours, 1)];
    let responses = tso_pipelined(&mut client, &sent).await;
    assert_eq!(
        responses.len(),
        sent.len(),
        "an answer per request, then a clean end"
    );
    let mut previous = TimeStamp::new(0);
    for ((cluster_id, count), response) in sent.into_iter().zip(responses) {
        let response = response.expect("no error");
        if cluster_id != ours {
            assert!(response.header.and_then(|h| h.error).is_some());
            assert_eq!(response.timestamp, None);
            continue;
        }
        assert_eq!(response.count, count);
        let highest = ts_of(&response);
        let lowest = TimeStamp::new(highest.into_inner() - u64::from(count) + 1);
        assert!(lowest > previous, "{lowest} after {previous}");
        previous = highest;
    }
}
