//! A region layout that changes while clients use it: TiKV's `SplitRegion`
//! RPC, the admin endpoints (`kvfeed admin`), stale-epoch KV requests, PD's
//! view, persistence across kill -9, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{TestServer, WAIT, kvfeed};
use kvfeed_proto::kvrpcpb::{self, Context, RawPutRequest, SplitRegionRequest};
use kvfeed_proto::metapb;
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{GetMembersRequest, GetRegionRequest, RequestHeader, ScanRegionsRequest};
use kvfeed_proto::tikvpb::tikv_client::TikvClient;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::RegionMap;
use tonic::transport::Channel;

fn post(server: &TestServer, path: &str) -> (u16, String) {
    kvfeed_bench::scrape::http_post(server.status_addr(), path, WAIT)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

fn layout(server: &TestServer) -> serde_json::Value {
    let (code, body) = server.http_get("/debug/regions");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The header PD requests need, with the cluster id learnt from
/// `GetMembers` as a client learns it.
async fn pd_header(pd: &mut PdClient<Channel>) -> Option<RequestHeader> {
    let members = pd
        .get_members(GetMembersRequest { header: None })
        .await
        .expect("GetMembers")
        .into_inner();
    Some(RequestHeader {
        cluster_id: members.header.expect("a header").cluster_id,
        ..RequestHeader::default()
    })
}

async fn region_for(pd: &mut PdClient<Channel>, key: &[u8]) -> metapb::Region {
    let header = pd_header(pd).await;
    pd.get_region(GetRegionRequest {
        header,
        region_key: key.to_vec(),
        ..GetRegionRequest::default()
    })
    .await
    .expect("GetRegion")
    .into_inner()
    .region
    .expect("a region")
}

fn context(region: &metapb::Region) -> Option<Context> {
    Some(Context {
        region_id: region.id,
        region_epoch: region.region_epoch,
        peer: region.peers.first().cloned(),
        ..Context::default()
    })
}

#[tokio::test]
async fn split_region_rpc_answers_as_tikv() {
    let server = TestServer::start();
    let channel = server.channel().await;
    let mut pd = PdClient::new(channel.clone());
    let mut kv = TikvClient::new(channel);
    let parent = region_for(&mut pd, &encode_bytes(b"k")).await;

    // Transactional split keys are encoded by the server and sorted.
    let split = kv
        .split_region(SplitRegionRequest {
            context: context(&parent),
            split_keys: vec![b"t".to_vec(), b"g".to_vec()],
            ..SplitRegionRequest::default()
        })
        .await
        .expect("SplitRegion")
        .into_inner();
    assert_eq!(split.region_error, None);
    let ids: Vec<u64> = split.regions.iter().map(|r| r.id).collect();
    assert_eq!(split.regions.len(), 3, "{split:?}");
    assert_eq!(split.regions[0].end_key, encode_bytes(b"g"));
    assert_eq!(split.regions[1].end_key, encode_bytes(b"t"));
    assert_eq!(
        split.regions[2].id, parent.id,
        "the right part keeps the id"
    );
    let version = parent.region_epoch.as_ref().map(|e| e.version).unwrap_or(0);
    for r in &split.regions {
        assert_eq!(
            r.region_epoch.as_ref().map(|e| e.version),
            Some(version + 2)
        );
    }
    // PD serves the new layout.
    let mid = region_for(&mut pd, &encode_bytes(b"k")).await;
    assert_eq!(mid, split.regions[1]);
    let header = pd_header(&mut pd).await;
    let all = pd
        .scan_regions(ScanRegionsRequest {
            header,
            ..ScanRegionsRequest::default()
        })
        .await
        .expect("ScanRegions")
        .into_inner();
    assert_eq!(all.regions.len(), 4);

    // The old epoch is stale now: KV requests and a second split get
    // epoch_not_match with the current regions.
    let stale = kv
        .raw_put(RawPutRequest {
            context: context(&parent),
            key: b"a".to_vec(),
            value: b"v".to_vec(),
            ..RawPutRequest::default()
        })
        .await
        .expect("RawPut")
        .into_inner();
    let current = stale
        .region_error
        .and_then(|e| e.epoch_not_match)
        .expect("epoch_not_match")
        .current_regions;
    assert!(
        current.iter().any(|r| *r == split.regions[2]),
        "{current:?}"
    );
    let again = kv
        .split_region(SplitRegionRequest {
            context: context(&parent),
            split_keys: vec![b"w".to_vec()],
            ..SplitRegionRequest::default()
        })
        .await
        .expect("SplitRegion")
        .into_inner();
    assert!(again.region_error.and_then(|e| e.epoch_not_match).is_some());

    // A raw split key is a boundary as it is; the deprecated single key
    // gets left and right.
    let last = region_for(&mut pd, &[0xff; 20]).await;
    #[allow(deprecated)]
    let raw = kv
        .split_region(SplitRegionRequest {
            context: context(&last),
            split_key: vec![0xff; 12],
            is_raw_kv: true,
            ..SplitRegionRequest::default()
        })
        .await
        .expect("SplitRegion")
        .into_inner();
    #[allow(deprecated)]
    {
        assert_eq!(
            raw.left.as_ref().map(|r| r.end_key.clone()),
            Some(vec![0xff; 12])
        );
        assert_eq!(raw.right.as_ref().map(|r| r.id), Some(last.id));
    }

    // Bad input: a key outside the region, none at all, the region's own
    // start, a repeated key. Nothing changes.
    let before = layout(&server);
    let first = region_for(&mut pd, b"").await;
    for keys in [
        vec![b"zz".to_vec()],
        vec![],
        vec![b"a".to_vec(), b"a".to_vec()],
    ] {
        let resp = kv
            .split_region(SplitRegionRequest {
                context: context(&first),
                split_keys: keys.clone(),
                ..SplitRegionRequest::default()
            })
            .await
            .expect("SplitRegion")
            .into_inner();
        let err = resp.region_error.expect("refused");
        assert!(!err.message.is_empty(), "{keys:?}: {err:?}");
        if keys == [b"zz".to_vec()] {
            assert!(err.key_not_in_region.is_some(), "{err:?}");
        }
        assert!(resp.regions.is_empty());
    }
    let _ = ids;
    assert_eq!(layout(&server)["regions"], before["regions"]);
}

#[tokio::test]
async fn admin_changes_the_layout_and_refuses_bad_input() {
    let server = TestServer::start();
    let (code, body) = post(
        &server,
        &format!("/admin/split?key={}&key={}", hex(b"b"), hex(b"m")),
    );
    assert_eq!(code, 200, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(made.as_array().map(Vec::len), Some(3), "{made}");
    let view = layout(&server);
    assert_eq!(view["regions"].as_array().map(Vec::len), Some(4), "{view}");
    let first = view["regions"][0]["id"].as_u64().expect("id");
    let third = view["regions"][2]["id"].as_u64().expect("id");

    let before = layout(&server);
    for (path, want) in [
        // Unsorted and repeated keys; an existing boundary.
        (
            format!("/admin/split?key={}&key={}", hex(b"x"), hex(b"c")),
            400,
        ),
        (
            format!("/admin/split?key={}&key={}", hex(b"c"), hex(b"c")),
            400,
        ),
        (
            format!("/admin/split?key={}", hex(&encode_bytes(b"b"))) + "&raw=true",
            400,
        ),
        ("/admin/split".to_owned(), 400),
        ("/admin/split?key=zz".to_owned(), 400),
        ("/admin/split?key=61&bogus=1".to_owned(), 400),
        // Not adjacent, itself, unknown regions.
        (format!("/admin/merge?region={first}&target={third}"), 400),
        (format!("/admin/merge?region={first}&target={first}"), 400),
        ("/admin/merge?region=999999".to_owned(), 404),
        ("/admin/merge".to_owned(), 400),
        // A store that does not exist.
        (
            format!("/admin/transfer-leader?region={first}&store=9"),
            400,
        ),
        (
            "/admin/transfer-leader?region=999999&store=1".to_owned(),
            404,
        ),
    ] {
        let (code, body) = post(&server, &path);
        assert_eq!(code, want, "{path}: {body}");
        assert!(!body.trim().is_empty(), "{path}: a reason is given");
    }
    assert_eq!(layout(&server), before, "refusals change nothing");
    // Changes are POST only.
    let (code, _) = server.http_get("/admin/split?key=61");
    assert_eq!(code, 405);

    let (code, body) = post(&server, &format!("/admin/merge?region={first}"));
    assert_eq!(code, 200, "{body}");
    let view = layout(&server);
    assert_eq!(view["regions"].as_array().map(Vec::len), Some(3), "{view}");
    assert_eq!(view["splits"], 1);
    assert_eq!(view["merges"], 1);
    let metrics = server.metrics();
    assert!(metrics.contains("kvfeed_regions 3"), "{metrics}");
    assert!(
        metrics.contains("kvfeed_region_splits_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kvfeed_region_merges_total 1"),
        "{metrics}"
    );

    // The command line drives the same endpoints.
    let out = kvfeed()
        .args(["admin", "--status-addr", server.status_addr(), "split", "q"])
        .output()
        .expect("run kvfeed admin");
    assert!(out.status.success(), "{out:?}");
    let out = kvfeed()
        .args([
            "admin",
            "--status-addr",
            server.status_addr(),
            "merge",
            "999999",
        ])
        .output()
        .expect("run kvfeed admin");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("region 999999 not found"), "{stderr}");
    let out = kvfeed()
        .args(["admin", "--status-addr", server.status_addr(), "regions"])
        .output()
        .expect("run kvfeed admin");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        shown["regions"].as_array().map(Vec::len),
        Some(4),
        "{shown}"
    );
}

#[tokio::test]
async fn the_layout_survives_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = TestServer::start_in(&data);
    let (code, body) = post(&server, &format!("/admin/split?key={}", hex(b"k")));
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&server, &format!("/admin/split?key={}", hex(b"s")));
    assert_eq!(code, 200, "{body}");
    let view = layout(&server);
    let merged = view["regions"][1]["id"].as_u64().expect("id");
    let (code, body) = post(&server, &format!("/admin/merge?region={merged}"));
    assert_eq!(code, 200, "{body}");
    let before = layout(&server);
    server.stop("KILL");

    let server = TestServer::start_in(&data);
    let after = layout(&server);
    assert_eq!(after["regions"], before["regions"]);
    assert_eq!(after["generation"], before["generation"]);
    // Ids keep growing: the merged-away id is not handed out again.
    let (code, body) = post(&server, &format!("/admin/split?key={}", hex(b"n")));
    assert_eq!(code, 200, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(made[0]["id"].as_u64().expect("id") > merged, "{made}");
    // And data written before still reads through the new regions.
    let mut pd = PdClient::new(server.channel().await);
    let region = region_for(&mut pd, &encode_bytes(b"m")).await;
    let mut kv = TikvClient::new(server.channel().await);
    let got = kv
        .kv_get(kvrpcpb::GetRequest {
            context: context(&region),
            key: b"m".to_vec(),
            version: u64::MAX >> 2,
            ..kvrpcpb::GetRequest::default()
        })
        .await
        .expect("KvGet")
        .into_inner();
    assert_eq!(got.region_error, None);
}

#[tokio::test]
async fn pd_split_scatter_and_operators_answer_as_pd() {
    use kvfeed_proto::pdpb::{
        GetAllStoresRequest, GetOperatorRequest, OperatorStatus, ScatterRegionRequest,
        SplitRegionsRequest,
    };
    let server = TestServer::start_with(&["--stores", "3"]);
    let mut pd = PdClient::new(server.channel().await);
    let header = Some(RequestHeader {
        cluster_id: server.cluster_id(),
        ..RequestHeader::default()
    });
    let stores = pd
        .get_all_stores(GetAllStoresRequest {
            header: header.clone(),
            ..GetAllStoresRequest::default()
        })
        .await
        .expect("GetAllStores")
        .into_inner()
        .stores;
    assert_eq!(
        stores.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let mut addrs: Vec<&str> = stores.iter().map(|s| s.address.as_str()).collect();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "each store has its own address");

    // Region keys, as boundaries: one is the default boundary already.
    let keys: Vec<Vec<u8>> = (0..12u8)
        .map(|i| encode_bytes(&[b'a' + i]))
        .chain(RegionMap::default_split_keys())
        .collect();
    let split = pd
        .split_regions(SplitRegionsRequest {
            header: header.clone(),
            split_keys: keys,
            retry_limit: 0,
        })
        .await
        .expect("SplitRegions")
        .into_inner();
    assert_eq!(split.header.and_then(|h| h.error), None);
    assert_eq!(split.finished_percentage, 100);
    assert_eq!(split.regions_id.len(), 12, "{:?}", split.regions_id);
    // New regions inherit their parent's leader: all on one store now.
    let view = layout(&server);
    let leaders = |view: &serde_json::Value| {
        let mut counts = [0usize; 4];
        for r in view["regions"].as_array().expect("regions") {
            counts[r["leader_store"].as_u64().expect("leader") as usize] += 1;
        }
        counts
    };
    let before = leaders(&view);
    assert_eq!(before.iter().sum::<usize>(), 14);

    let scatter = pd
        .scatter_region(ScatterRegionRequest {
            header: header.clone(),
            regions_id: split.regions_id.clone(),
            ..ScatterRegionRequest::default()
        })
        .await
        .expect("ScatterRegion")
        .into_inner();
    assert_eq!(scatter.finished_percentage, 100);
    let after = leaders(&layout(&server));
    let (min, max) = (after[1..].iter().min(), after[1..].iter().max());
    assert!(
        max.zip(min).is_some_and(|(max, min)| max - min <= 1),
        "leaders spread evenly: before {before:?}, after {after:?}"
    );

    let op = pd
        .get_operator(GetOperatorRequest {
            header: header.clone(),
            region_id: split.regions_id[0],
        })
        .await
        .expect("GetOperator")
        .into_inner();
    assert_eq!(op.header.and_then(|h| h.error), None);
    assert_eq!(op.status, OperatorStatus::Success as i32);
    assert!(op.desc.is_empty(), "nothing is running");
    let gone = pd
        .get_operator(GetOperatorRequest {
            header,
            region_id: 999_999,
        })
        .await
        .expect("GetOperator")
        .into_inner();
    assert!(gone.header.and_then(|h| h.error).is_some());
}

/// kill -9 while splits and writes are in flight: after the restart the
/// layout is whole (the server would refuse a torn one), every split that
/// was acknowledged is there, and every acknowledged write reads back
/// through the new regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_splits_leaves_layout_and_data_in_agreement() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut server = TestServer::start_in(&data);
    let stop = Arc::new(AtomicBool::new(false));
    // Splits at k/000, k/001, … on a thread, remembering the acknowledged.
    let splitter = {
        let addr = server.status_addr().to_owned();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Acquire) {
                let key = format!("k/{i:03}");
                i += 1;
                let path = format!("/admin/split?key={}", hex(key.as_bytes()));
                match kvfeed_bench::scrape::http_post(&addr, &path, WAIT) {
                    Ok((200, _)) => acked.push(key),
                    Ok((code, body)) => panic!("{path}: {code} {body}"),
                    Err(_) => break, // killed
                }
            }
            acked
        })
    };
    let cluster = kvfeed_client::Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect");
    let mut written = Vec::new();
    for i in 0..200u32 {
        let key = format!("k/{:03}x", i % 150);
        let value = format!("v{i}");
        if i == 120 {
            // Mid-stream, with splits still arriving.
            server.stop("KILL");
            break;
        }
        cluster
            .raw_put(key.as_bytes(), value.as_bytes())
            .await
            .expect("put before the kill");
        written.push((key, value));
    }
    stop.store(true, Ordering::Release);
    let acked = splitter.join().expect("splitter");
    assert!(!acked.is_empty(), "no split happened before the kill");

    let server = TestServer::start_in(&data);
    let view = layout(&server);
    let starts: Vec<String> = view["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| r["start_key"].as_str().unwrap_or_default().to_owned())
        .collect();
    for key in &acked {
        let boundary = hex(&encode_bytes(key.as_bytes()));
        assert!(
            starts.contains(&boundary),
            "acknowledged split at {key} lost"
        );
    }
    let cluster = kvfeed_client::Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect after restart");
    let mut last = std::collections::HashMap::new();
    for (key, value) in &written {
        last.insert(key.clone(), value.clone());
    }
    for (key, value) in last {
        let got = cluster.raw_get(key.as_bytes()).await.expect("get");
        assert_eq!(got.as_deref(), Some(value.as_bytes()), "{key}");
    }
}
