//! `pdpb.PD/BatchScanRegions` on a real `kvfeed serve`, with the generated
//! client: the same regions as `ScanRegions` per range, a region shared by
//! ranges listed once, the limit, and PD's refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::TestServer;
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{
    BatchScanRegionsRequest, BatchScanRegionsResponse, ErrorType, KeyRange, RequestHeader,
    ScanRegionsRequest,
};
use kvfeed_storage::mvcc::encode_bytes;
use tonic::transport::Channel;

fn header(cluster_id: u64) -> Option<RequestHeader> {
    Some(RequestHeader {
        cluster_id,
        ..RequestHeader::default()
    })
}

fn range(start: &[u8], end: &[u8]) -> KeyRange {
    KeyRange {
        start_key: start.to_vec(),
        end_key: end.to_vec(),
    }
}

async fn batch_scan(
    pd: &mut PdClient<Channel>,
    cluster_id: u64,
    ranges: Vec<KeyRange>,
    limit: i32,
    contain_all_key_range: bool,
) -> BatchScanRegionsResponse {
    pd.batch_scan_regions(BatchScanRegionsRequest {
        header: header(cluster_id),
        ranges,
        limit,
        contain_all_key_range,
    })
    .await
    .expect("BatchScanRegions")
    .into_inner()
}

fn ids(response: &BatchScanRegionsResponse) -> Vec<u64> {
    response
        .regions
        .iter()
        .map(|r| r.region.as_ref().expect("a region").id)
        .collect()
}

#[tokio::test]
async fn batch_scan_matches_scan_regions_and_refuses_what_pd_refuses() {
    let server = TestServer::start();
    let id = server.cluster_id();
    let mut pd = PdClient::new(server.channel().await);

    let scanned = pd
        .scan_regions(ScanRegionsRequest {
            header: header(id),
            ..Default::default()
        })
        .await
        .expect("ScanRegions")
        .into_inner();
    assert!(scanned.regions.len() >= 2, "the default layout has two");
    let whole = batch_scan(&mut pd, id, vec![range(b"", b"")], 0, true).await;
    assert_eq!(whole.header.as_ref().expect("header").error, None);
    assert_eq!(whole.regions, scanned.regions, "the same regions, leaders");

    // Two ranges inside the first region: it is listed once.
    let (a, b, c, d) = (
        encode_bytes(b"a"),
        encode_bytes(b"b"),
        encode_bytes(b"c"),
        encode_bytes(b"d"),
    );
    let first = scanned.regions[0].region.as_ref().expect("a region").id;
    let shared = batch_scan(&mut pd, id, vec![range(&a, &b), range(&c, &d)], 0, true).await;
    assert_eq!(ids(&shared), [first]);
    let limited = batch_scan(&mut pd, id, vec![range(b"", b"")], 1, false).await;
    assert_eq!(ids(&limited), [first]);

    let overlapped = batch_scan(&mut pd, id, vec![range(&a, &c), range(&b, &d)], 0, false).await;
    let error = overlapped.header.expect("header").error.expect("an error");
    assert_eq!(error.r#type, ErrorType::Unknown as i32);
    assert_eq!(error.message, "invalid key range, ranges overlapped");
    assert!(overlapped.regions.is_empty());
    let reversed = batch_scan(&mut pd, id, vec![range(&c, &a)], 0, false).await;
    let error = reversed.header.expect("header").error.expect("an error");
    assert_eq!(error.message, "invalid key range, start key > end key");

    let other = batch_scan(&mut pd, id.wrapping_add(1), vec![range(b"", b"")], 0, false).await;
    let error = other.header.expect("header").error.expect("an error");
    assert!(error.message.contains("mismatch cluster id"), "{error:?}");
    assert!(other.regions.is_empty());
}
