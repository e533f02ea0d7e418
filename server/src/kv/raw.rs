//! Raw key-value commands: keys are taken as they are (API v1), compared
//! with region boundaries unencoded, and served by the node's raw store.
//!
//! Every handler checks, in order: the column family, the input limits,
//! then region membership, and only then touches storage, so a refused
//! request writes nothing. Raw data lives in one column family; a request
//! naming `lock` or `write` (which TiKV would read from its transactional
//! families) is refused with a message naming the family rather than
//! served from the wrong data.

use kvfeed_proto::kvrpcpb;

use super::context::{Direction, KeySpace, Scope};
use super::errors::KvError;
use super::limits;
use crate::node::Node;

/// Refuses column families other than the default one.
fn check_cf(cf: &str) -> Result<(), KvError> {
    match cf {
        "" | "default" => Ok(()),
        other => Err(KvError::Input(format!(
            "column family {other:?} is not supported for raw requests: \
             only \"default\" (or empty) is served"
        ))),
    }
}

/// A TTL of 0 means the value never expires.
fn ttl(ttl: u64) -> Option<u64> {
    (ttl != 0).then_some(ttl)
}

fn pairs(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<kvrpcpb::KvPair> {
    kvs.into_iter()
        .map(|(key, value)| kvrpcpb::KvPair {
            key,
            value,
            ..Default::default()
        })
        .collect()
}

fn point_key(scope: &Scope, cf: &str, key: &[u8]) -> Result<(), KvError> {
    check_cf(cf)?;
    limits::check_key(key)?;
    scope.check_key(KeySpace::Raw, key)
}

fn many_keys(scope: &Scope, cf: &str, keys: &[Vec<u8>]) -> Result<(), KvError> {
    check_cf(cf)?;
    limits::check_keys(keys)?;
    scope.check_keys(KeySpace::Raw, keys.iter().map(Vec::as_slice))
}

pub fn get(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawGetRequest,
) -> Result<kvrpcpb::RawGetResponse, KvError> {
    point_key(scope, &req.cf, &req.key)?;
    Ok(match node.raw().get(&req.key)? {
        Some(value) => kvrpcpb::RawGetResponse {
            value,
            ..Default::default()
        },
        None => kvrpcpb::RawGetResponse {
            not_found: true,
            ..Default::default()
        },
    })
}

pub fn batch_get(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawBatchGetRequest,
) -> Result<kvrpcpb::RawBatchGetResponse, KvError> {
    many_keys(scope, &req.cf, &req.keys)?;
    Ok(kvrpcpb::RawBatchGetResponse {
        pairs: pairs(node.raw().batch_get(&req.keys)?),
        ..Default::default()
    })
}

pub fn get_key_ttl(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawGetKeyTtlRequest,
) -> Result<kvrpcpb::RawGetKeyTtlResponse, KvError> {
    point_key(scope, &req.cf, &req.key)?;
    Ok(match node.raw().get_key_ttl(&req.key)? {
        Some(ttl) => kvrpcpb::RawGetKeyTtlResponse {
            ttl,
            ..Default::default()
        },
        None => kvrpcpb::RawGetKeyTtlResponse {
            not_found: true,
            ..Default::default()
        },
    })
}

pub fn put(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawPutRequest,
) -> Result<kvrpcpb::RawPutResponse, KvError> {
    point_key(scope, &req.cf, &req.key)?;
    limits::check_value(&req.value)?;
    node.raw().put(&req.key, &req.value, ttl(req.ttl))?;
    Ok(kvrpcpb::RawPutResponse::default())
}

pub fn batch_put(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawBatchPutRequest,
) -> Result<kvrpcpb::RawBatchPutResponse, KvError> {
    check_cf(&req.cf)?;
    for pair in &req.pairs {
        limits::check_key(&pair.key)?;
        limits::check_value(&pair.value)?;
    }
    scope.check_keys(KeySpace::Raw, req.pairs.iter().map(|p| p.key.as_slice()))?;
    // Older clients send one TTL for every pair in `ttl`.
    let ttls = if req.ttls.is_empty() && req.ttl != 0 {
        vec![req.ttl]
    } else {
        req.ttls
    };
    let kvs: Vec<(Vec<u8>, Vec<u8>)> = req.pairs.into_iter().map(|p| (p.key, p.value)).collect();
    node.raw().batch_put(&kvs, &ttls)?;
    Ok(kvrpcpb::RawBatchPutResponse::default())
}

pub fn delete(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawDeleteRequest,
) -> Result<kvrpcpb::RawDeleteResponse, KvError> {
    point_key(scope, &req.cf, &req.key)?;
    node.raw().delete(&req.key)?;
    Ok(kvrpcpb::RawDeleteResponse::default())
}

pub fn batch_delete(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawBatchDeleteRequest,
) -> Result<kvrpcpb::RawBatchDeleteResponse, KvError> {
    many_keys(scope, &req.cf, &req.keys)?;
    node.raw().batch_delete(&req.keys)?;
    Ok(kvrpcpb::RawBatchDeleteResponse::default())
}

pub fn delete_range(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawDeleteRangeRequest,
) -> Result<kvrpcpb::RawDeleteRangeResponse, KvError> {
    check_cf(&req.cf)?;
    limits::check_bound(&req.start_key)?;
    limits::check_bound(&req.end_key)?;
    let range = scope.clamp(
        KeySpace::Raw,
        &req.start_key,
        &req.end_key,
        Direction::Forward,
    )?;
    let deleted = node.raw().delete_range(&range.lower, &range.upper)?;
    tracing::debug!(region_id = %scope.id(), deleted, "raw delete range");
    Ok(kvrpcpb::RawDeleteRangeResponse::default())
}

/// One scan of a range given in the request's convention: forward
/// `[start, end)`; reverse with `start` the exclusive upper bound.
/// The answer's bytes come out of `budget`, shared by a request's scans.
#[allow(clippy::too_many_arguments)] // the request's fields, one by one
fn scan_range(
    node: &Node,
    scope: &Scope,
    start: &[u8],
    end: &[u8],
    limit: u32,
    key_only: bool,
    reverse: bool,
    budget: &mut usize,
) -> Result<Vec<kvrpcpb::KvPair>, KvError> {
    limits::check_bound(start)?;
    limits::check_bound(end)?;
    let kvs = if reverse {
        let r = scope.clamp(KeySpace::Raw, end, start, Direction::Reverse)?;
        node.raw()
            .scan_within(&r.upper, &r.lower, limit as usize, key_only, true, budget)?
    } else {
        let r = scope.clamp(KeySpace::Raw, start, end, Direction::Forward)?;
        node.raw()
            .scan_within(&r.lower, &r.upper, limit as usize, key_only, false, budget)?
    };
    Ok(pairs(kvs))
}

pub fn scan(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawScanRequest,
) -> Result<kvrpcpb::RawScanResponse, KvError> {
    check_cf(&req.cf)?;
    let mut budget = kvfeed_storage::MAX_ANSWER_BYTES;
    let kvs = scan_range(
        node,
        scope,
        &req.start_key,
        &req.end_key,
        req.limit,
        req.key_only,
        req.reverse,
        &mut budget,
    )?;
    Ok(kvrpcpb::RawScanResponse {
        kvs,
        ..Default::default()
    })
}

pub fn batch_scan(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawBatchScanRequest,
) -> Result<kvrpcpb::RawBatchScanResponse, KvError> {
    check_cf(&req.cf)?;
    let mut kvs = Vec::new();
    let mut budget = kvfeed_storage::MAX_ANSWER_BYTES;
    for range in &req.ranges {
        kvs.extend(scan_range(
            node,
            scope,
            &range.start_key,
            &range.end_key,
            req.each_limit,
            req.key_only,
            req.reverse,
            &mut budget,
        )?);
    }
    Ok(kvrpcpb::RawBatchScanResponse {
        kvs,
        ..Default::default()
    })
}

pub fn compare_and_swap(
    node: &Node,
    scope: &Scope,
    req: kvrpcpb::RawCasRequest,
) -> Result<kvrpcpb::RawCasResponse, KvError> {
    point_key(scope, &req.cf, &req.key)?;
    limits::check_value(&req.value)?;
    if req.delete {
        return Err(KvError::Input(
            "compare-and-swap with delete = true is not supported; \
             swap in a value instead"
                .to_owned(),
        ));
    }
    let expected = (!req.previous_not_exist).then_some(req.previous_value);
    let (succeed, previous) =
        node.raw()
            .compare_and_swap_with_ttl(&req.key, expected, req.value, ttl(req.ttl))?;
    Ok(kvrpcpb::RawCasResponse {
        succeed,
        previous_not_exist: previous.is_none(),
        previous_value: previous.unwrap_or_default(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_default_cf_is_served() {
        assert!(check_cf("").is_ok());
        assert!(check_cf("default").is_ok());
        match check_cf("write") {
            Err(KvError::Input(m)) => assert!(m.contains("\"write\""), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn zero_ttl_is_forever() {
        assert_eq!(ttl(0), None);
        assert_eq!(ttl(5), Some(5));
    }
}
