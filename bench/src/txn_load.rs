//! Transactional preloading: keys written the way TiKV's transactional
//! clients write them, so scans are measured over what such users leave
//! behind.
//!
//! Keys go in transactions of [`TXN_KEYS`]: every key is prewritten (the
//! first one is the primary), then the primary is committed, then the
//! secondaries — Percolator's two phases, with start and commit timestamps
//! from PD. The store then holds, per key, a write record (with the value
//! inline when it is short, as here) and a deletion marker in the lock
//! family where the lock was: exactly the shape that makes transactional
//! scans harder than raw ones. A region error fails the preload (the
//! layout does not change during a benchmark, and a retry would hide a
//! problem worth seeing).

use std::time::{Duration, Instant};

use kvfeed_client::error::check_region;
use kvfeed_client::{ClientError, KeyMode, RegionInfo};
use kvfeed_proto::kvrpcpb;
use tokio::task::JoinSet;

use super::load::{prefix_end, preload_key};
use super::{BenchError, Server};

/// Keys per transaction.
pub const TXN_KEYS: u64 = 256;
/// Transactions in flight at once.
const PARALLEL: usize = 4;
/// Lock TTL of the preload's transactions, ms: long enough that no reader
/// tries to resolve them while they commit.
const LOCK_TTL_MS: u64 = 20_000;

/// Writes `count` transactional keys `prefix + {i:010}` with values of
/// `value_size` bytes, [`TXN_KEYS`] keys per transaction.
pub async fn preload_txn(
    server: &Server,
    prefix: &[u8],
    count: u64,
    value_size: usize,
) -> Result<Duration, BenchError> {
    let (start, end) = KeyMode::Txn.region_range(prefix, &prefix_end(prefix));
    let regions = server.cluster.regions_in_range(&start, &end).await?;
    let started = Instant::now();
    let mut txns = JoinSet::new();
    let mut next = 0u64;
    while next < count || !txns.is_empty() {
        while next < count && txns.len() < PARALLEL {
            let end = (next + TXN_KEYS).min(count);
            let keys: Vec<_> = (next..end).map(|i| preload_key(prefix, i)).collect();
            let (server, regions) = (server.clone(), regions.clone());
            txns.spawn(async move { write_txn(&server, &regions, keys, value_size).await });
            next = end;
        }
        if let Some(done) = txns.join_next().await {
            done.map_err(|e| BenchError::Feed(format!("a preload transaction failed: {e}")))??;
        }
    }
    Ok(started.elapsed())
}

/// One transaction putting `keys` (the first is the primary).
async fn write_txn(
    server: &Server,
    regions: &[RegionInfo],
    keys: Vec<Vec<u8>>,
    value_size: usize,
) -> Result<(), BenchError> {
    let Some(primary) = keys.first().cloned() else {
        return Ok(());
    };
    // Keys by region, the primary's region first: it commits first.
    let mut groups: Vec<(RegionInfo, Vec<Vec<u8>>)> = Vec::new();
    for key in keys {
        let encoded = KeyMode::Txn.region_key(&key);
        let region = regions
            .iter()
            .find(|r| r.contains(&encoded))
            .ok_or_else(|| BenchError::Feed("no region holds a preloaded key".to_owned()))?;
        match groups.iter_mut().find(|(r, _)| r.id == region.id) {
            Some((_, group)) => group.push(key),
            None => groups.push((region.clone(), vec![key])),
        }
    }
    let txn_size = groups.iter().map(|(_, g)| g.len() as u64).sum();
    let start_ts = server.cluster.tso().await?.into_inner();
    for (region, group) in &groups {
        let request = kvrpcpb::PrewriteRequest {
            context: Some(region.context()),
            mutations: group
                .iter()
                .map(|key| kvrpcpb::Mutation {
                    op: kvrpcpb::Op::Put.into(),
                    key: key.clone(),
                    value: vec![b'v'; value_size],
                    ..Default::default()
                })
                .collect(),
            primary_lock: primary.clone(),
            start_version: start_ts,
            lock_ttl: LOCK_TTL_MS,
            txn_size,
            ..Default::default()
        };
        let response = server
            .store
            .kv()
            .kv_prewrite(request)
            .await
            .map_err(|s| ClientError::rpc("KvPrewrite", &s))?
            .into_inner();
        check_region(region.id, response.region_error.as_ref())?;
        if let Some(error) = response.errors.first() {
            return Err(BenchError::Feed(format!("KvPrewrite: {error:?}")));
        }
    }
    let commit_ts = server.cluster.tso().await?.into_inner();
    for (region, group) in &groups {
        let request = kvrpcpb::CommitRequest {
            context: Some(region.context()),
            start_version: start_ts,
            keys: group.clone(),
            commit_version: commit_ts,
            primary_key: primary.clone(),
            ..Default::default()
        };
        let response = server
            .store
            .kv()
            .kv_commit(request)
            .await
            .map_err(|s| ClientError::rpc("KvCommit", &s))?
            .into_inner();
        check_region(region.id, response.region_error.as_ref())?;
        if let Some(error) = &response.error {
            return Err(BenchError::Feed(format!("KvCommit: {error:?}")));
        }
    }
    Ok(())
}
