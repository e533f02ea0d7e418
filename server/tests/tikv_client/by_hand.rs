//! A Percolator client driven by hand through kvfeed's own generated stubs.
//!
//! The official client always finishes what it starts, so the states it
//! never leaves behind on purpose (a prewrite whose client died, a
//! transaction whose secondaries were never committed) are produced here,
//! one RPC at a time. The same stubs also read a key at an exact version,
//! which the official client cannot do below its own timestamps.
//!
//! Like a real client it asks PD for the key's region and its leader's
//! store before every request, sends it to that store, and retries (a
//! bounded number of times) after a region error: the layout may change
//! under it (splits, merges, leader moves).

use kvfeed_proto::errorpb;
use kvfeed_proto::kvrpcpb::{
    CommitRequest, CommitResponse, Context, GetRequest, GetResponse, Mutation, Op, PrewriteRequest,
};
use kvfeed_proto::pdpb::pd_client::PdClient;
use kvfeed_proto::pdpb::{
    GetGcSafePointRequest, GetMembersRequest, GetRegionRequest, GetStoreRequest, RequestHeader,
    TsoRequest,
};
use kvfeed_proto::tikvpb::tikv_client::TikvClient;
use tonic::transport::Channel;

/// Bits of a timestamp below its physical (millisecond) part.
pub const PHYSICAL_SHIFT: u32 = 18;

/// TiKV's memcomparable encoding of a user key: groups of eight bytes, each
/// padded with zeros and followed by `0xFF` minus the padding. Regions are
/// looked up by the encoded key, as the official transactional client does.
pub fn encode_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((key.len() / 8 + 1) * 9);
    for chunk in key.chunks(8) {
        out.extend_from_slice(chunk);
        out.resize(out.len() + 8 - chunk.len(), 0);
        out.push(0xFF - (8 - chunk.len()) as u8);
    }
    if key.len().is_multiple_of(8) {
        out.extend_from_slice(&[0; 8]);
        out.push(0xFF - 8);
    }
    out
}

/// One connection to kvfeed speaking PD and KV with the generated stubs.
pub struct ByHand {
    pd: PdClient<Channel>,
    cluster_id: u64,
}

/// How often a request is retried after a region error.
const ATTEMPTS: u32 = 50;

impl ByHand {
    /// Connects over `channel` and learns the cluster id from GetMembers.
    pub async fn connect(channel: Channel) -> ByHand {
        let mut pd = PdClient::new(channel.clone());
        let members = pd
            .get_members(GetMembersRequest { header: None })
            .await
            .expect("GetMembers succeeds")
            .into_inner();
        let header = members.header.expect("GetMembers answers with a header");
        assert!(header.error.is_none(), "GetMembers error: {header:?}");
        ByHand {
            pd,
            cluster_id: header.cluster_id,
        }
    }

    fn header(&self) -> Option<RequestHeader> {
        Some(RequestHeader {
            cluster_id: self.cluster_id,
            ..RequestHeader::default()
        })
    }

    /// One fresh timestamp from PD's oracle.
    pub async fn timestamp(&mut self) -> u64 {
        let request = TsoRequest {
            header: self.header(),
            count: 1,
            dc_location: String::new(),
        };
        let mut responses = self
            .pd
            .tso(tonic::codegen::tokio_stream::iter([request]))
            .await
            .expect("Tso stream opens")
            .into_inner();
        let response = responses
            .message()
            .await
            .expect("Tso stream answers")
            .expect("Tso answers before closing");
        assert_eq!(response.count, 1, "Tso grants what was asked");
        let ts = response.timestamp.expect("Tso answers with a timestamp");
        let physical = u64::try_from(ts.physical).expect("physical time is positive");
        let logical = u64::try_from(ts.logical).expect("logical time is positive");
        (physical << PHYSICAL_SHIFT) | logical
    }

    /// The GC safe point PD holds.
    pub async fn gc_safe_point(&mut self) -> u64 {
        let request = GetGcSafePointRequest {
            header: self.header(),
        };
        self.pd
            .get_gc_safe_point(request)
            .await
            .expect("GetGCSafePoint succeeds")
            .into_inner()
            .safe_point
    }

    /// The KV request context of the region holding the transactional
    /// `key`, and a client of its leader's store.
    pub async fn route(&mut self, key: &[u8]) -> (Context, TikvClient<Channel>) {
        let context = self.context(key).await;
        let store_id = context.peer.as_ref().map_or(1, |p| p.store_id);
        let store = self
            .pd
            .get_store(GetStoreRequest {
                header: self.header(),
                store_id,
            })
            .await
            .expect("GetStore succeeds")
            .into_inner()
            .store
            .expect("GetStore finds the store");
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", store.address))
            .expect("store address")
            .connect()
            .await
            .expect("the store accepts connections");
        (context, TikvClient::new(channel))
    }

    /// The KV request context of the region holding the transactional `key`.
    pub async fn context(&mut self, key: &[u8]) -> Context {
        let request = GetRegionRequest {
            header: self.header(),
            region_key: encode_key(key),
            need_buckets: false,
        };
        let response = self
            .pd
            .get_region(request)
            .await
            .expect("GetRegion succeeds")
            .into_inner();
        let region = response.region.expect("GetRegion finds a region");
        Context {
            region_id: region.id,
            region_epoch: region.region_epoch,
            peer: response.leader,
            ..Context::default()
        }
    }

    /// Prewrites `key = value` for the transaction `start_ts` whose primary
    /// is `primary`, and checks the lock was taken.
    pub async fn prewrite(
        &mut self,
        key: &[u8],
        value: &[u8],
        primary: &[u8],
        start_ts: u64,
        lock_ttl_ms: u64,
    ) {
        let mut attempt = 0;
        let response = loop {
            let (context, mut kv) = self.route(key).await;
            let request = PrewriteRequest {
                context: Some(context),
                mutations: vec![Mutation {
                    op: Op::Put.into(),
                    key: key.to_vec(),
                    value: value.to_vec(),
                    ..Mutation::default()
                }],
                primary_lock: primary.to_vec(),
                start_version: start_ts,
                lock_ttl: lock_ttl_ms,
                txn_size: 1,
                ..PrewriteRequest::default()
            };
            let response = kv
                .kv_prewrite(request)
                .await
                .expect("KvPrewrite succeeds")
                .into_inner();
            if retry(&response.region_error, &mut attempt).await {
                continue;
            }
            break response;
        };
        assert!(
            response.region_error.is_none() && response.errors.is_empty(),
            "prewrite of {key:?} at {start_ts} failed: {response:?}"
        );
    }

    /// Sends KvCommit for `keys` and returns the answer unchecked.
    pub async fn commit(
        &mut self,
        keys: &[&[u8]],
        start_ts: u64,
        commit_ts: u64,
    ) -> CommitResponse {
        // One request per key: a split may have put them in different
        // regions since they were prewritten. The first answer with an
        // error (or the last one) is returned.
        let mut last = CommitResponse::default();
        for key in keys {
            let mut attempt = 0;
            let response = loop {
                let (context, mut kv) = self.route(key).await;
                let request = CommitRequest {
                    context: Some(context),
                    start_version: start_ts,
                    keys: vec![key.to_vec()],
                    commit_version: commit_ts,
                    ..CommitRequest::default()
                };
                let response = kv
                    .kv_commit(request)
                    .await
                    .expect("KvCommit answers")
                    .into_inner();
                if retry(&response.region_error, &mut attempt).await {
                    continue;
                }
                break response;
            };
            let failed = response.error.is_some();
            last = response;
            if failed {
                break;
            }
        }
        let response = last;
        assert!(
            response.region_error.is_none(),
            "commit of {keys:?} hit a region error: {response:?}"
        );
        response
    }

    /// KvGet of `key` as of `version`.
    pub async fn get(&mut self, key: &[u8], version: u64) -> GetResponse {
        let mut attempt = 0;
        let response = loop {
            let (context, mut kv) = self.route(key).await;
            let request = GetRequest {
                context: Some(context),
                key: key.to_vec(),
                version,
                need_commit_ts: false,
            };
            let response = kv
                .kv_get(request)
                .await
                .expect("KvGet answers")
                .into_inner();
            if retry(&response.region_error, &mut attempt).await {
                continue;
            }
            break response;
        };
        assert!(
            response.region_error.is_none(),
            "get of {key:?} hit a region error: {response:?}"
        );
        response
    }
}

#[test]
fn encode_key_matches_the_documented_split_key() {
    let mut split = vec![0xFF; 9];
    split.extend_from_slice(&[0; 8]);
    split.push(0xF7);
    assert_eq!(encode_key(&[0xFF; 8]), split);
    assert_eq!(encode_key(b""), [0, 0, 0, 0, 0, 0, 0, 0, 0xF7]);
    assert_eq!(encode_key(b"abc"), [b'a', b'b', b'c', 0, 0, 0, 0, 0, 0xFA]);
}

/// Whether to try again after `error`: any region error, a bounded number
/// of times (the layout changed between the lookup and the request).
async fn retry(error: &Option<errorpb::Error>, attempt: &mut u32) -> bool {
    if error.is_none() || *attempt >= ATTEMPTS {
        return false;
    }
    *attempt += 1;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    true
}
