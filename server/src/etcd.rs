//! etcd's `KV` service on the PD address, read-only.
//!
//! PD embeds etcd and serves its API on the same address, and PD clients
//! read a few keys through it. client-go, every second, reads
//! [`SAVED_SAFE_POINT_KEY`] (a decimal string; a missing key counts as 0)
//! with a plain etcd `Get`, which is `KV/Range` with `key` set and
//! `range_end` empty. Without an answer it keeps its safe point cache
//! stale, and after 100 s every transactional read fails with "start
//! timestamp may fall behind safe point". So `Range` is served over a
//! small fixed key set computed on each request:
//!
//! - [`SAVED_SAFE_POINT_KEY`] → the node's GC safe point in decimal
//!   (`"0"` until first raised). It is read from the store on every
//!   request, so it always equals what `GetGCSafePoint` answers; in PD it
//!   is the GC worker that writes it, with the same value it then raises
//!   the GC safe point to.
//!
//! Every write (`Put`, `DeleteRange`, `Txn`, `Compact`) is refused with
//! `FAILED_PRECONDITION`: nothing a client writes here would be read back
//! by kvfeed, so accepting it would silently lose it.
//!
//! Revisions: kvfeed keeps no etcd history. `header.revision` is the store's
//! apply sequence number (at least 1), which only grows; each key reports
//! revision 1 for its creation and modification, and version 1. Clients
//! reading these keys look at values only.

use std::sync::Arc;

use kvfeed_proto::etcdserverpb::kv_server::{Kv, KvServer};
use kvfeed_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use kvfeed_proto::mvccpb::KeyValue;
use kvfeed_storage::safepoint::SafePoints;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::pd::MEMBER_ID;

/// The key client-go (and TiDB's GC worker) keep the GC safe point under.
pub const SAVED_SAFE_POINT_KEY: &[u8] = b"/tidb/store/gcworker/saved_safe_point";

/// The raft term reported in headers: one member, never re-elected.
const RAFT_TERM: u64 = 1;

/// The etcd `KV` service attached to the node's gRPC server.
pub fn service(node: &Arc<Node>) -> KvServer<EtcdKvService> {
    KvServer::new(EtcdKvService {
        node: Arc::clone(node),
        // A second reader over the store: reads take their own snapshot,
        // and only the PD service writes (see `SafePoints`).
        safe_points: Arc::new(SafePoints::new(
            Arc::clone(node.store()),
            Arc::clone(node.tso().clock()),
        )),
    })
}

/// Answers etcd range reads from the node's state.
pub struct EtcdKvService {
    node: Arc<Node>,
    safe_points: Arc<SafePoints>,
}

impl EtcdKvService {
    fn header(&self) -> ResponseHeader {
        let revision = i64::try_from(self.node.store().last_seq().0).unwrap_or(i64::MAX);
        ResponseHeader {
            cluster_id: self.node.cluster_id().get(),
            member_id: MEMBER_ID,
            revision: revision.max(1),
            raft_term: RAFT_TERM,
        }
    }

    /// The served keys with their values, in key order.
    async fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Status> {
        let safe_points = Arc::clone(&self.safe_points);
        // A store snapshot read: kept off the async workers like PD's.
        let safe_point = tokio::task::spawn_blocking(move || safe_points.gc_safe_point())
            .await
            .map_err(|err| Status::internal(format!("safe point task failed: {err}")))?
            .map_err(|err| Status::internal(format!("reading the GC safe point: {err}")))?;
        Ok(vec![(
            SAVED_SAFE_POINT_KEY.to_vec(),
            safe_point.into_inner().to_string().into_bytes(),
        )])
    }
}

/// Whether `key` lies in the request's range, with etcd's conventions: an
/// empty `range_end` means `key` alone, `"\0"` means every key >= `key`.
fn in_range(request: &RangeRequest, key: &[u8]) -> bool {
    match request.range_end.as_slice() {
        [] => key == request.key.as_slice(),
        [0] => key >= request.key.as_slice(),
        end => key >= request.key.as_slice() && key < end,
    }
}

/// Answers `request` over `entries` (sorted by key).
fn range(
    request: &RangeRequest,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    header: ResponseHeader,
) -> Result<RangeResponse, Status> {
    // etcd's own check, with its wording.
    if request.key.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    let matching: Vec<(Vec<u8>, Vec<u8>)> = entries
        .into_iter()
        .filter(|(key, _)| in_range(request, key))
        .collect();
    let count = i64::try_from(matching.len()).unwrap_or(i64::MAX);
    if request.count_only {
        return Ok(RangeResponse {
            header: Some(header),
            kvs: Vec::new(),
            more: false,
            count,
        });
    }
    // etcd treats 0 as no limit; a negative one is treated the same rather
    // than refused.
    let limit = usize::try_from(request.limit)
        .ok()
        .filter(|&limit| limit > 0)
        .unwrap_or(usize::MAX);
    let more = matching.len() > limit;
    let kvs = matching
        .into_iter()
        .take(limit)
        .map(|(key, value)| KeyValue {
            key,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            value: if request.keys_only { Vec::new() } else { value },
            lease: 0,
        })
        .collect();
    Ok(RangeResponse {
        header: Some(header),
        kvs,
        more,
        count,
    })
}

/// The status every etcd write is refused with.
fn write_refused(method: &str) -> Status {
    Status::failed_precondition(format!(
        "etcd writes are not supported: kvfeed serves PD's etcd API read-only \
         (KV/Range over the GC safe point key); {method} refused"
    ))
}

#[tonic::async_trait]
impl Kv for EtcdKvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let entries = self.entries().await?;
        range(request.get_ref(), entries, self.header()).map(Response::new)
    }

    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Err(write_refused("Put"))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(write_refused("DeleteRange"))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        // A read-only Txn would be answerable, but client-go does not send
        // one for the keys served here; refusing all of them keeps one rule.
        Err(write_refused("Txn"))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(write_refused("Compact"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b"/a".to_vec(), b"1".to_vec()),
            (b"/b/x".to_vec(), b"2".to_vec()),
            (b"/b/y".to_vec(), b"3".to_vec()),
        ]
    }

    fn ask(request: RangeRequest) -> RangeResponse {
        range(&request, entries(), ResponseHeader::default()).unwrap()
    }

    fn keys(response: &RangeResponse) -> Vec<&[u8]> {
        response.kvs.iter().map(|kv| kv.key.as_slice()).collect()
    }

    #[test]
    fn ranges_follow_etcd_conventions() {
        let single = ask(RangeRequest {
            key: b"/b/x".to_vec(),
            ..Default::default()
        });
        assert_eq!(keys(&single), [b"/b/x".as_slice()]);
        assert_eq!(single.count, 1);
        let prefix = ask(RangeRequest {
            key: b"/b/".to_vec(),
            range_end: b"/b0".to_vec(),
            ..Default::default()
        });
        assert_eq!(keys(&prefix), [b"/b/x".as_slice(), b"/b/y"]);
        let from = ask(RangeRequest {
            key: b"/b".to_vec(),
            range_end: vec![0],
            ..Default::default()
        });
        assert_eq!(keys(&from), [b"/b/x".as_slice(), b"/b/y"]);
        let all = ask(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        });
        assert_eq!(all.count, 3);
    }

    #[test]
    fn limit_keys_only_and_count_only() {
        let limited = ask(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            limit: 2,
            keys_only: true,
            ..Default::default()
        });
        assert_eq!(keys(&limited), [b"/a".as_slice(), b"/b/x"]);
        assert!(limited.more);
        assert_eq!(limited.count, 3);
        assert!(limited.kvs.iter().all(|kv| kv.value.is_empty()));
        let counted = ask(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        });
        assert!(counted.kvs.is_empty());
        assert_eq!(counted.count, 3);
    }

    #[test]
    fn an_empty_key_is_refused() {
        let status = range(
            &RangeRequest::default(),
            entries(),
            ResponseHeader::default(),
        )
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
