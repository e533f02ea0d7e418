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
//! scans harder than raw ones. A region error (the layout changed: a large
//! preload splits regions on its own) makes a phase look its regions up
//! and run again, a bounded number of times.

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
    Ok(preload_txn_ts(server, prefix, count, value_size).await?.0)
}

/// [`preload_txn`], also returning the highest commit ts of its
/// transactions: once a changefeed's checkpoint reaches it, every
/// preloaded key has been delivered.
pub async fn preload_txn_ts(
    server: &Server,
    prefix: &[u8],
    count: u64,
    value_size: usize,
) -> Result<(Duration, u64), BenchError> {
    let (start, end) = KeyMode::Txn.region_range(prefix, &prefix_end(prefix));
    let regions = server.cluster.regions_in_range(&start, &end).await?;
    let started = Instant::now();
    let mut max_commit_ts = 0;
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
            let written =
                done.map_err(|e| BenchError::Feed(format!("a preload transaction failed: {e}")))??;
            max_commit_ts = max_commit_ts.max(written.commit_ts);
        }
    }
    Ok((started.elapsed(), max_commit_ts))
}

/// The timestamps of one written transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnTs {
    /// Its start ts.
    pub start_ts: u64,
    /// Its commit ts (0 for a transaction without keys).
    pub commit_ts: u64,
}

/// How often one phase of a preload transaction is retried after a region
/// error (a split, merge or leader move since the lookup).
pub const REGION_RETRIES: u32 = 20;

/// One transaction putting `keys` (the first is the primary) with values
/// of `value_size` bytes, found in `regions` (a lookup of their range). A
/// phase that meets a region error looks its keys' regions up again and is
/// repeated: prewrite and commit are idempotent for one start ts, and the
/// layout may change under a long preload (automatic splits).
pub async fn write_txn(
    server: &Server,
    regions: &[RegionInfo],
    keys: Vec<Vec<u8>>,
    value_size: usize,
) -> Result<TxnTs, BenchError> {
    let Some(primary) = keys.first().cloned() else {
        return Ok(TxnTs {
            start_ts: 0,
            commit_ts: 0,
        });
    };
    let txn_size = keys.len() as u64;
    let start_ts = server.cluster.tso().await?.into_inner();
    let mut layout = regions.to_vec();
    let mut attempt = 0;
    loop {
        match prewrite(
            server,
            &layout,
            &keys,
            &primary,
            Prewrite {
                start_ts,
                txn_size,
                value_size,
                lock_ttl_ms: LOCK_TTL_MS,
            },
        )
        .await
        {
            Err(BenchError::Client(ClientError::Region(e))) if attempt < REGION_RETRIES => {
                attempt += 1;
                tracing::debug!(%e, attempt, "preload prewrite: region changed");
                layout = relocate(server, &keys).await?;
            }
            other => break other?,
        }
    }
    let commit_ts = server.cluster.tso().await?.into_inner();
    // The primary first (its group leads), then the rest.
    loop {
        match commit(server, &layout, &keys, &primary, start_ts, commit_ts).await {
            Err(BenchError::Client(ClientError::Region(e))) if attempt < REGION_RETRIES => {
                attempt += 1;
                tracing::debug!(%e, attempt, "preload commit: region changed");
                layout = relocate(server, &keys).await?;
            }
            other => {
                other?;
                return Ok(TxnTs {
                    start_ts,
                    commit_ts,
                });
            }
        }
    }
}

/// The regions holding `keys` (in key order) now.
pub async fn relocate(server: &Server, keys: &[Vec<u8>]) -> Result<Vec<RegionInfo>, BenchError> {
    let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
        return Ok(Vec::new());
    };
    let mut end = last.clone();
    end.push(0);
    let (start, end) = KeyMode::Txn.region_range(first, &end);
    Ok(server.cluster.regions_in_range(&start, &end).await?)
}

/// Keys of one region.
type Group = (RegionInfo, Vec<Vec<u8>>);

/// `keys` by region, the primary's region first: it commits first.
fn by_region(regions: &[RegionInfo], keys: &[Vec<u8>]) -> Result<Vec<Group>, BenchError> {
    let mut groups: Vec<Group> = Vec::new();
    for key in keys {
        let encoded = KeyMode::Txn.region_key(key);
        let region = regions
            .iter()
            .find(|r| r.contains(&encoded))
            .ok_or_else(|| BenchError::Feed("no region holds a preloaded key".to_owned()))?;
        match groups.iter_mut().find(|(r, _)| r.id == region.id) {
            Some((_, group)) => group.push(key.clone()),
            None => groups.push((region.clone(), vec![key.clone()])),
        }
    }
    Ok(groups)
}

/// What a prewrite of some of a transaction's keys carries.
#[derive(Debug, Clone, Copy)]
pub struct Prewrite {
    /// The transaction's start ts.
    pub start_ts: u64,
    /// Keys in the whole transaction.
    pub txn_size: u64,
    /// Bytes per value (every value is `v` repeated).
    pub value_size: usize,
    /// The locks' TTL, ms.
    pub lock_ttl_ms: u64,
}

/// Prewrites `keys` (one request per region of `regions`) for the
/// transaction `txn` whose primary is `primary`. A region error comes back
/// as [`ClientError::Region`]: look the keys up again and repeat.
pub async fn prewrite(
    server: &Server,
    regions: &[RegionInfo],
    keys: &[Vec<u8>],
    primary: &[u8],
    txn: Prewrite,
) -> Result<(), BenchError> {
    let Prewrite {
        start_ts,
        txn_size,
        value_size,
        lock_ttl_ms,
    } = txn;
    for (region, group) in by_region(regions, keys)? {
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
            primary_lock: primary.to_vec(),
            start_version: start_ts,
            lock_ttl: lock_ttl_ms,
            txn_size,
            ..Default::default()
        };
        let response = server
            .cluster
            .store(region.leader.store_id)
            .await?
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
    Ok(())
}

/// Commits `keys` (one request per region of `regions`) of the
/// transaction `start_ts` at `commit_ts`. The primary's group goes first,
/// so with the primary among `keys` it commits before the others; a region
/// error comes back as [`ClientError::Region`].
pub async fn commit(
    server: &Server,
    regions: &[RegionInfo],
    keys: &[Vec<u8>],
    primary: &[u8],
    start_ts: u64,
    commit_ts: u64,
) -> Result<(), BenchError> {
    for (region, group) in by_region(regions, keys)? {
        let request = kvrpcpb::CommitRequest {
            context: Some(region.context()),
            start_version: start_ts,
            keys: group,
            commit_version: commit_ts,
            primary_key: primary.to_vec(),
            ..Default::default()
        };
        let response = server
            .cluster
            .store(region.leader.store_id)
            .await?
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
