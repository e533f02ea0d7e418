//! The raw API: single-key reads and writes without transactions.
//!
//! Raw keys meet region boundaries unencoded ([`KeyMode::Raw`]). Each call
//! goes through [`Cluster::with_region`], so a stale route is retried with
//! fresh routing; a raw command's own `error` string is reported as
//! [`ClientError::Raw`], never retried (the server has decided).

use kvfeed_proto::kvrpcpb;

use super::error::check_region;
use super::region::RegionInfo;
use super::scan::Pair;
use super::{ClientError, Cluster, KeyMode, Result, StoreConn};

fn raw_error(method: &'static str, error: String) -> Result<()> {
    if error.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Raw {
            method,
            message: error,
        })
    }
}

impl Cluster {
    /// The value of `key`, or `None` when it does not exist.
    pub async fn raw_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.with_region(KeyMode::Raw, key, "RawGet", async |region, store| {
            let request = kvrpcpb::RawGetRequest {
                context: Some(region.context()),
                key: key.to_vec(),
                cf: String::new(),
            };
            let mut kv = store.kv();
            let response = self
                .call("RawGet", &store.address, kv.raw_get(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            raw_error("RawGet", response.error)?;
            Ok((!response.not_found).then_some(response.value))
        })
        .await
    }

    /// Sets `key` to `value`.
    pub async fn raw_put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.with_region(KeyMode::Raw, key, "RawPut", async |region, store| {
            let request = kvrpcpb::RawPutRequest {
                context: Some(region.context()),
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            };
            let mut kv = store.kv();
            let response = self
                .call("RawPut", &store.address, kv.raw_put(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            raw_error("RawPut", response.error)
        })
        .await
    }

    /// Deletes `key` (deleting a missing key is not an error).
    pub async fn raw_delete(&self, key: &[u8]) -> Result<()> {
        self.with_region(KeyMode::Raw, key, "RawDelete", async |region, store| {
            let request = kvrpcpb::RawDeleteRequest {
                context: Some(region.context()),
                key: key.to_vec(),
                ..Default::default()
            };
            let mut kv = store.kv();
            let response = self
                .call("RawDelete", &store.address, kv.raw_delete(request))
                .await?;
            check_region(region.id, response.region_error.as_ref())?;
            raw_error("RawDelete", response.error)
        })
        .await
    }

    /// Up to `limit` pairs of `[start, end)` (empty `end` = unbounded) from
    /// one region; the range must lie inside it.
    pub(crate) async fn raw_scan_region(
        &self,
        region: &RegionInfo,
        store: &StoreConn,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<Vec<Pair>> {
        let request = kvrpcpb::RawScanRequest {
            context: Some(region.context()),
            start_key: start.to_vec(),
            limit,
            end_key: end.to_vec(),
            ..Default::default()
        };
        let mut kv = store.kv();
        let response = self
            .call("RawScan", &store.address, kv.raw_scan(request))
            .await?;
        check_region(region.id, response.region_error.as_ref())?;
        response
            .kvs
            .into_iter()
            .map(|pair| match pair.error {
                Some(e) => Err(ClientError::Raw {
                    method: "RawScan",
                    message: e.abort,
                }),
                None => Ok(Pair {
                    key: pair.key,
                    value: pair.value,
                }),
            })
            .collect()
    }
}
