//! Shared helpers of the KV service tests: a generated `TikvClient` plus
//! what it needs to address requests (the default region layout, a local
//! timestamp counter), and request builders that check the routing part of
//! each answer so tests can focus on the rest.
//!
//! Timestamps come from a local counter seeded with the wall clock: the
//! MVCC rules only compare them, and seeding with real milliseconds keeps
//! TTL arithmetic (physical parts) meaningful.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kvfeed_proto::kvrpcpb::{self, Op};
use kvfeed_proto::metapb;
use kvfeed_proto::tikvpb::tikv_client::TikvClient;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::{Region, RegionMap, STORE_ID};
use tonic::transport::Channel;

use crate::common::TestServer;

/// Largest key and value the server accepts.
pub const MAX_KEY: usize = 8 * 1024;
pub const MAX_VALUE: usize = 8 * 1024 * 1024;

/// The context addressing `region` with its current epoch.
pub fn ctx(region: &Region) -> Option<kvrpcpb::Context> {
    Some(kvrpcpb::Context {
        region_id: region.id.0,
        region_epoch: Some(metapb::RegionEpoch {
            conf_ver: region.epoch.conf_ver,
            version: region.epoch.version,
        }),
        peer: Some(metapb::Peer {
            id: region.leader().id,
            store_id: STORE_ID,
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn b(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// A raw key in the second region (above the encoded split key).
pub fn raw_high(suffix: &str) -> Vec<u8> {
    let mut key = vec![0xFF; 10];
    key.extend_from_slice(suffix.as_bytes());
    key
}

/// A transactional key in the second region.
pub fn txn_high(suffix: &str) -> Vec<u8> {
    let mut key = vec![0xFF; 8];
    key.extend_from_slice(suffix.as_bytes());
    key
}

pub fn put(key: &[u8], value: &[u8]) -> kvrpcpb::Mutation {
    kvrpcpb::Mutation {
        op: Op::Put as i32,
        key: key.to_vec(),
        value: value.to_vec(),
        ..Default::default()
    }
}

pub fn op(op: Op, key: &[u8]) -> kvrpcpb::Mutation {
    kvrpcpb::Mutation {
        op: op as i32,
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The only CheckTxnStatus combinations `tikv-client` accepts (it panics
/// on any other).
pub fn assert_status_shape(resp: &kvrpcpb::CheckTxnStatusResponse) {
    let ok = matches!(
        (resp.commit_version, resp.lock_ttl, resp.lock_info.is_some()),
        (0, 0, false) | (1.., 0, false) | (0, 1.., true)
    );
    assert!(ok, "inconsistent CheckTxnStatus response: {resp:?}");
}

/// A client plus what it needs to address requests.
pub struct Kv {
    client: TikvClient<Channel>,
    pub regions: RegionMap,
    next_ts: AtomicU64,
}

impl Kv {
    pub async fn connect(server: &TestServer) -> Kv {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        Kv {
            // Requests above the server's limit must reach it, so the
            // client's own limits are lifted.
            client: TikvClient::new(server.channel().await)
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(usize::MAX),
            regions: RegionMap::new(RegionMap::default_split_keys(), &[STORE_ID])
                .expect("default layout"),
            next_ts: AtomicU64::new(TimeStamp::compose(now_ms, 0).into_inner()),
        }
    }

    /// A client handle (clones share the connection).
    pub fn c(&self) -> TikvClient<Channel> {
        self.client.clone()
    }

    /// The first region (holding ordinary keys).
    pub fn first(&self) -> &Region {
        &self.regions.regions()[0]
    }

    /// A fresh, strictly increasing timestamp.
    pub fn ts(&self) -> u64 {
        self.next_ts.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes later [`Kv::ts`] results exceed `ts` (e.g. a server-chosen
    /// 1PC commit timestamp).
    pub fn observe(&self, ts: u64) {
        self.next_ts.fetch_max(ts, Ordering::SeqCst);
    }

    pub fn raw_ctx(&self, key: &[u8]) -> Option<kvrpcpb::Context> {
        ctx(self.regions.locate(key))
    }

    pub fn txn_ctx(&self, key: &[u8]) -> Option<kvrpcpb::Context> {
        ctx(self.regions.locate(&encode_bytes(key)))
    }

    pub async fn raw_put(&self, key: &[u8], value: &[u8], ttl: u64) {
        let resp = self
            .c()
            .raw_put(kvrpcpb::RawPutRequest {
                context: self.raw_ctx(key),
                key: key.to_vec(),
                value: value.to_vec(),
                ttl,
                ..Default::default()
            })
            .await
            .expect("raw put")
            .into_inner();
        assert!(
            resp.region_error.is_none() && resp.error.is_empty(),
            "{resp:?}"
        );
    }

    pub async fn raw_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let resp = self
            .c()
            .raw_get(kvrpcpb::RawGetRequest {
                context: self.raw_ctx(key),
                key: key.to_vec(),
                ..Default::default()
            })
            .await
            .expect("raw get")
            .into_inner();
        assert!(
            resp.region_error.is_none() && resp.error.is_empty(),
            "{resp:?}"
        );
        (!resp.not_found).then_some(resp.value)
    }

    /// A raw scan addressed to the region of `region_of`; returns the pairs
    /// after checking none carries an error.
    pub async fn raw_scan(
        &self,
        region_of: &[u8],
        req: kvrpcpb::RawScanRequest,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let resp = self
            .c()
            .raw_scan(kvrpcpb::RawScanRequest {
                context: self.raw_ctx(region_of),
                ..req
            })
            .await
            .expect("raw scan")
            .into_inner();
        assert!(resp.region_error.is_none(), "{resp:?}");
        resp.kvs
            .into_iter()
            .map(|p| {
                assert!(p.error.is_none(), "{p:?}");
                (p.key, p.value)
            })
            .collect()
    }

    /// A normal raw write and read, proving the server still serves.
    pub async fn still_serving(&self) {
        let value = format!("probe-{}", self.ts()).into_bytes();
        self.raw_put(b"probe", &value, 0).await;
        assert_eq!(self.raw_get(b"probe").await, Some(value));
    }

    /// Prewrites `mutations`, addressed to the region of the first one.
    pub async fn prewrite(
        &self,
        mutations: Vec<kvrpcpb::Mutation>,
        primary: &[u8],
        start: u64,
        ttl: u64,
    ) -> kvrpcpb::PrewriteResponse {
        let context = mutations
            .first()
            .map_or_else(|| ctx(self.first()), |m| self.txn_ctx(&m.key));
        let resp = self
            .c()
            .kv_prewrite(kvrpcpb::PrewriteRequest {
                context,
                mutations,
                primary_lock: primary.to_vec(),
                start_version: start,
                lock_ttl: ttl,
                txn_size: 1,
                ..Default::default()
            })
            .await
            .expect("prewrite answered")
            .into_inner();
        assert!(resp.region_error.is_none(), "{resp:?}");
        resp
    }

    pub async fn commit(
        &self,
        keys: &[Vec<u8>],
        start: u64,
        commit: u64,
    ) -> kvrpcpb::CommitResponse {
        let resp = self
            .c()
            .kv_commit(kvrpcpb::CommitRequest {
                context: self.txn_ctx(&keys[0]),
                keys: keys.to_vec(),
                start_version: start,
                commit_version: commit,
                ..Default::default()
            })
            .await
            .expect("commit answered")
            .into_inner();
        assert!(resp.region_error.is_none(), "{resp:?}");
        resp
    }

    /// Prewrites and commits `pairs` (one region); returns the commit ts.
    pub async fn write(&self, pairs: &[(&[u8], &[u8])]) -> u64 {
        self.write_txn(pairs).await.1
    }

    /// [`Kv::write`], returning `(start_ts, commit_ts)`.
    pub async fn write_txn(&self, pairs: &[(&[u8], &[u8])]) -> (u64, u64) {
        let start = self.ts();
        let mutations = pairs.iter().map(|(k, v)| put(k, v)).collect();
        let resp = self.prewrite(mutations, pairs[0].0, start, 3000).await;
        assert!(
            resp.errors.is_empty() && resp.region_error.is_none(),
            "{resp:?}"
        );
        let commit = self.ts();
        let keys: Vec<Vec<u8>> = pairs.iter().map(|(k, _)| k.to_vec()).collect();
        let resp = self.commit(&keys, start, commit).await;
        assert!(resp.error.is_none(), "{resp:?}");
        assert_eq!(resp.commit_version, commit);
        (start, commit)
    }

    pub async fn get(&self, key: &[u8], version: u64) -> kvrpcpb::GetResponse {
        let resp = self
            .c()
            .kv_get(kvrpcpb::GetRequest {
                context: self.txn_ctx(key),
                key: key.to_vec(),
                version,
                ..Default::default()
            })
            .await
            .expect("get")
            .into_inner();
        assert!(resp.region_error.is_none(), "{resp:?}");
        resp
    }

    /// The value of `key` at `version`, asserting no lock is in the way.
    pub async fn value(&self, key: &[u8], version: u64) -> Option<Vec<u8>> {
        let resp = self.get(key, version).await;
        assert!(resp.error.is_none(), "{resp:?}");
        (!resp.not_found).then_some(resp.value)
    }

    /// Locks of the first region up to `max_version`.
    pub async fn locks(&self, max_version: u64) -> Vec<kvrpcpb::LockInfo> {
        let resp = self
            .c()
            .kv_scan_lock(kvrpcpb::ScanLockRequest {
                context: ctx(self.first()),
                max_version,
                limit: 1024,
                ..Default::default()
            })
            .await
            .expect("scan lock")
            .into_inner();
        assert!(
            resp.region_error.is_none() && resp.error.is_none(),
            "{resp:?}"
        );
        resp.locks
    }

    pub async fn check_txn_status(
        &self,
        primary: &[u8],
        lock_ts: u64,
        current_ts: u64,
        rollback_if_not_exist: bool,
    ) -> kvrpcpb::CheckTxnStatusResponse {
        let resp = self
            .c()
            .kv_check_txn_status(kvrpcpb::CheckTxnStatusRequest {
                context: self.txn_ctx(primary),
                primary_key: primary.to_vec(),
                lock_ts,
                caller_start_ts: current_ts,
                current_ts,
                rollback_if_not_exist,
                ..Default::default()
            })
            .await
            .expect("check txn status")
            .into_inner();
        assert!(resp.region_error.is_none(), "{resp:?}");
        if resp.error.is_none() {
            assert_status_shape(&resp);
        }
        resp
    }
}
