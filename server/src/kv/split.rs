//! `SplitRegion`: TiKV's region split command, as clients and tools send it.
//!
//! The request's context names the region and the epoch the client saw; the
//! split happens only if the region still has that epoch (else
//! `epoch_not_match`, as TiKV). Split keys are user keys: memcomparable
//! encoded first unless `is_raw_kv`, then sorted (TiKV sorts too). Each must
//! lie strictly inside the region (else `key_not_in_region`); an empty list,
//! an empty key or a repeated key is refused with a region error carrying
//! only a message, which is how TiKV reports them. The answer lists every
//! resulting region in key order; the deprecated `left` / `right` are set
//! when there are exactly two.

use kvfeed_proto::{errorpb, kvrpcpb};
use kvfeed_storage::mvcc::encode_bytes;
use kvfeed_storage::region::{ChangeError, RegionsError};

use super::context::{Scope, region_error};
use super::errors::{KvError, KvResponse, hex};
use crate::node::Node;
use kvfeed_cdc::meta::region_meta;

impl KvResponse for kvrpcpb::SplitRegionResponse {
    fn set_region_error(&mut self, err: errorpb::Error) {
        self.region_error = Some(err);
    }

    /// The response has no other error field; TiKV reports a refused split
    /// as a region error with a message.
    fn set_input_error(&mut self, msg: String) {
        self.region_error = Some(errorpb::Error {
            message: msg,
            ..errorpb::Error::default()
        });
    }
}

/// Serves one `SplitRegion` (on the blocking pool: the change is fsynced).
#[allow(deprecated)] // `split_key`, `left` and `right` are still sent and read
pub fn split_region(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::SplitRegionRequest,
) -> Result<kvrpcpb::SplitRegionResponse, KvError> {
    let keys = if req.split_key.is_empty() {
        req.split_keys
    } else {
        vec![req.split_key]
    };
    let mut keys: Vec<Vec<u8>> = if req.is_raw_kv {
        keys
    } else {
        keys.iter().map(|k| encode_bytes(k)).collect()
    };
    keys.sort();
    let region = scope.region();
    match node.regions().split(region.id, Some(region.epoch), keys) {
        Ok(regions) => {
            tracing::info!(
                region_id = region.id.0,
                regions = ?regions.iter().map(|r| r.id.0).collect::<Vec<_>>(),
                "region split"
            );
            let metas: Vec<_> = regions.iter().map(region_meta).collect();
            let (left, right) = match metas.as_slice() {
                [l, r] => (Some(l.clone()), Some(r.clone())),
                _ => (None, None),
            };
            Ok(kvrpcpb::SplitRegionResponse {
                region_error: None,
                left,
                right,
                regions: metas,
            })
        }
        Err(RegionsError::Change(ChangeError::Region(err))) => {
            Err(region_error(&node.regions().current(), err))
        }
        Err(RegionsError::Change(ChangeError::SplitKeyNotInRegion {
            region,
            key,
            start_key,
            end_key,
        })) => Err(KvError::Region(Box::new(errorpb::Error {
            message: format!(
                "split key {} is not inside region {region} [{}, {})",
                hex(&key),
                hex(&start_key),
                hex(&end_key)
            ),
            key_not_in_region: Some(errorpb::KeyNotInRegion {
                key,
                region_id: region.0,
                start_key,
                end_key,
            }),
            ..errorpb::Error::default()
        }))),
        Err(RegionsError::Change(other)) => Err(KvError::Input(format!(
            "cannot split region {}: {other}",
            region.id
        ))),
        Err(RegionsError::Storage(err)) => Err(KvError::Storage(err)),
    }
}
