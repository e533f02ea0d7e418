//! The transactional API: Percolator reads and single-key writes.
//!
//! A write is one optimistic transaction: `start_ts` from the oracle,
//! prewrite (the key is its own primary), `commit_ts` from the oracle,
//! commit. Between the two phases the key holds a lock with a short TTL
//! ([`LOCK_TTL_MS`]), so a writer that dies mid-way blocks the key only
//! briefly: the next reader or writer finds the lock expired and resolves it.
//!
//! Lock handling, shared by reads and writes: a lock in the way is resolved
//! only when its transaction is decided or its TTL has run out
//! (CheckTxnStatus on the primary decides, rolling back an expired one, then
//! ResolveLock clears the key). A live lock is reported at once as
//! [`ClientError::Locked`], naming the transaction — the tools never wait
//! on someone else's transaction without a bound.
//!
//! Retries are bounded: a write conflict restarts the transaction with new
//! timestamps a few times ([`Backoff::conflict`]); an expired commit ts is
//! renewed a few times ([`Backoff::lock`]).

use kvfeed_proto::kvrpcpb;
use kvfeed_types::TimeStamp;

use super::error::{Lock, check_region, key_error};
use super::region::RegionInfo;
use super::retry::Backoff;
use super::scan::Pair;
use super::{ClientError, Cluster, KeyMode, Result, StoreConn};

/// TTL of the lock a write holds between prewrite and commit.
pub const LOCK_TTL_MS: u64 = 3_000;

/// One key's change in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Set `key` to `value`.
    Put {
        /// The user key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Delete `key`: a reader at a later timestamp finds nothing.
    Delete {
        /// The user key.
        key: Vec<u8>,
    },
}

impl Mutation {
    /// The user key the mutation writes; a single-key transaction's primary.
    pub fn key(&self) -> &[u8] {
        match self {
            Mutation::Put { key, .. } | Mutation::Delete { key } => key,
        }
    }

    fn to_proto(&self) -> kvrpcpb::Mutation {
        match self {
            Mutation::Put { key, value } => kvrpcpb::Mutation {
                op: kvrpcpb::Op::Put.into(),
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            },
            Mutation::Delete { key } => kvrpcpb::Mutation {
                op: kvrpcpb::Op::Del.into(),
                key: key.clone(),
                ..Default::default()
            },
        }
    }
}

/// The timestamps of a committed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The transaction's start ts: its snapshot, and the version the lock
    /// carried while it was prewritten.
    pub start_ts: TimeStamp,
    /// The commit ts, above `start_ts`: the version readers and the change
    /// feed see the write at.
    pub commit_ts: TimeStamp,
}

impl Cluster {
    /// The latest committed value of `key`, read at a fresh timestamp.
    pub async fn txn_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let ts = self.tso().await?;
        self.txn_get_at(key, ts).await
    }

    /// The value of `key` in the snapshot at `ts`.
    pub async fn txn_get_at(&self, key: &[u8], ts: TimeStamp) -> Result<Option<Vec<u8>>> {
        self.resolving(async || {
            self.with_region(KeyMode::Txn, key, "KvGet", async |region, store| {
                let request = kvrpcpb::GetRequest {
                    context: Some(region.context()),
                    key: key.to_vec(),
                    version: ts.into_inner(),
                    need_commit_ts: false,
                };
                let mut kv = store.kv();
                let response = self
                    .call("KvGet", &store.address, kv.kv_get(request))
                    .await?;
                check_region(region.id, response.region_error.as_ref())?;
                if let Some(e) = &response.error {
                    return Err(key_error("KvGet", e));
                }
                Ok((!response.not_found).then_some(response.value))
            })
            .await
        })
        .await
    }

    /// Sets `key` to `value` in a transaction of its own.
    pub async fn txn_put(&self, key: &[u8], value: &[u8]) -> Result<Written> {
        self.txn_write(&Mutation::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        })
        .await
    }

    /// Deletes `key` in a transaction of its own.
    pub async fn txn_delete(&self, key: &[u8]) -> Result<Written> {
        self.txn_write(&Mutation::Delete { key: key.to_vec() })
            .await
    }

    /// Applies `mutation` in a transaction of its own: prewrite then commit,
    /// restarting (bounded) on a write conflict.
    pub async fn txn_write(&self, mutation: &Mutation) -> Result<Written> {
        let mut conflicts = Backoff::conflict();
        let start_ts = loop {
            let start_ts = self.tso().await?;
            let prewritten = self
                .resolving(async || self.prewrite(mutation, start_ts, LOCK_TTL_MS).await)
                .await;
            match prewritten {
                Ok(()) => break start_ts,
                Err(e @ ClientError::WriteConflict { .. }) => {
                    if !conflicts.wait(false).await {
                        return Err(ClientError::RetriesExhausted {
                            what: "transaction",
                            attempts: conflicts.attempts(),
                            last: Box::new(e),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        };
        // The lock is ours now; only a stale commit ts needs another try.
        let mut renewals = Backoff::lock();
        loop {
            let commit_ts = self.tso().await?;
            match self.commit(mutation.key(), start_ts, commit_ts).await {
                Ok(()) => {
                    return Ok(Written {
                        start_ts,
                        commit_ts,
                    });
                }
                Err(e @ ClientError::CommitTsExpired { .. }) => {
                    if !renewals.wait(true).await {
                        return Err(ClientError::RetriesExhausted {
                            what: "commit",
                            attempts: renewals.attempts(),
                            last: Box::new(e),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Prewrites `mutation` as its own primary, once (region errors aside).
    /// A lock in the way comes back as [`ClientError::Locked`].
    pub async fn prewrite(
        &self,
        mutation: &Mutation,
        start_ts: TimeStamp,
        lock_ttl_ms: u64,
    ) -> Result<()> {
        let key = mutation.key();
        self.with_region(KeyMode::Txn, key, "KvPrewrite", async |region, store| {
            let request = kvrpcpb::PrewriteRequest {
                context: Some(region.context()),
                mutations: vec![mutation.to_proto()],
                primary_lock: key.to_vec(),
                start_version: start_ts.into_inner(),
                lock_ttl: lock_ttl_ms,
                txn_size: 1,
                ..Default::default()
            };
            let mut kv = store.kv();
            let response = self
                .call("KvPrewrite", &store.address, kv.kv_prewrite(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            match response.errors.first() {
                Some(e) => Err(key_error("KvPrewrite", e)),
                None => Ok(()),
            }
        })
        .await
    }

    /// Commits the transaction `start_ts` whose primary is `key`.
    pub async fn commit(
        &self,
        key: &[u8],
        start_ts: TimeStamp,
        commit_ts: TimeStamp,
    ) -> Result<()> {
        self.with_region(KeyMode::Txn, key, "KvCommit", async |region, store| {
            let request = kvrpcpb::CommitRequest {
                context: Some(region.context()),
                start_version: start_ts.into_inner(),
                keys: vec![key.to_vec()],
                commit_version: commit_ts.into_inner(),
                primary_key: key.to_vec(),
                ..Default::default()
            };
            let mut kv = store.kv();
            let response = self
                .call("KvCommit", &store.address, kv.kv_commit(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            match &response.error {
                Some(e) => Err(key_error("KvCommit", e)),
                None => Ok(()),
            }
        })
        .await
    }

    /// Clears `lock` if its transaction is decided or has expired (rolling
    /// it back then); a live lock is returned as [`ClientError::Locked`].
    pub async fn resolve(&self, lock: &Lock) -> Result<()> {
        let current_ts = self.tso().await?;
        let primary = lock.primary.as_slice();
        let (commit_ts, live_ttl) = self
            .with_region(
                KeyMode::Txn,
                primary,
                "KvCheckTxnStatus",
                async |region, store| {
                    let request = kvrpcpb::CheckTxnStatusRequest {
                        context: Some(region.context()),
                        primary_key: primary.to_vec(),
                        lock_ts: lock.lock_ts.into_inner(),
                        // Zero: never push the holder's min commit ts; this
                        // client only ever clears decided or expired locks.
                        caller_start_ts: 0,
                        current_ts: current_ts.into_inner(),
                        rollback_if_not_exist: true,
                        ..Default::default()
                    };
                    let mut kv = store.kv();
                    let response = self
                        .call(
                            "KvCheckTxnStatus",
                            &store.address,
                            kv.kv_check_txn_status(request),
                        )
                        .await?;
                    check_region(region.id, response.region_error.as_ref())?;
                    if let Some(e) = &response.error {
                        return Err(key_error("KvCheckTxnStatus", e));
                    }
                    Ok((TimeStamp::new(response.commit_version), response.lock_ttl))
                },
            )
            .await?;
        if live_ttl > 0 {
            return Err(ClientError::Locked(Lock {
                ttl_ms: live_ttl,
                ..lock.clone()
            }));
        }
        // Committed: roll the key forward; rolled back (zero): clear it.
        let key = lock.key.as_slice();
        self.with_region(KeyMode::Txn, key, "KvResolveLock", async |region, store| {
            let request = kvrpcpb::ResolveLockRequest {
                context: Some(region.context()),
                start_version: lock.lock_ts.into_inner(),
                commit_version: commit_ts.into_inner(),
                keys: vec![key.to_vec()],
                ..Default::default()
            };
            let mut kv = store.kv();
            let response = self
                .call("KvResolveLock", &store.address, kv.kv_resolve_lock(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            match &response.error {
                Some(e) => Err(key_error("KvResolveLock", e)),
                None => Ok(()),
            }
        })
        .await
    }

    /// Runs `op`, resolving a lock it runs into and trying again (bounded).
    /// A live lock ends the loop with [`ClientError::Locked`].
    pub(crate) async fn resolving<T>(&self, mut op: impl AsyncFnMut() -> Result<T>) -> Result<T> {
        let mut backoff = Backoff::lock();
        loop {
            match op().await {
                Err(ClientError::Locked(lock)) => {
                    self.resolve(&lock).await?;
                    if !backoff.wait(true).await {
                        return Err(ClientError::RetriesExhausted {
                            what: "lock resolution",
                            attempts: backoff.attempts(),
                            last: Box::new(ClientError::Locked(lock)),
                        });
                    }
                }
                other => return other,
            }
        }
    }

    /// Up to `limit` pairs of `[start, end)` (user keys, empty `end` =
    /// unbounded) visible at `ts`, from one region; the range must lie
    /// inside it. A lock in the way comes back as [`ClientError::Locked`].
    pub(crate) async fn kv_scan_region(
        &self,
        region: &RegionInfo,
        store: &StoreConn,
        range: (&[u8], &[u8]),
        limit: u32,
        ts: TimeStamp,
    ) -> Result<Vec<Pair>> {
        let request = kvrpcpb::ScanRequest {
            context: Some(region.context()),
            start_key: range.0.to_vec(),
            limit,
            version: ts.into_inner(),
            end_key: range.1.to_vec(),
            ..Default::default()
        };
        let mut kv = store.kv();
        let response = self
            .call("KvScan", &store.address, kv.kv_scan(request))
            .await?;
        check_region(region.id, response.region_error.as_ref())?;
        if let Some(e) = &response.error {
            return Err(key_error("KvScan", e));
        }
        response
            .pairs
            .into_iter()
            .map(|pair| match &pair.error {
                Some(e) => Err(key_error("KvScan", e)),
                None => Ok(Pair {
                    key: pair.key,
                    value: pair.value,
                }),
            })
            .collect()
    }
}
