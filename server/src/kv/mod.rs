//! The KV service (`tikvpb.Tikv`): TiKV's transactional and raw commands,
//! served from the node's store so that the official clients work
//! unmodified.
//!
//! This module only dispatches. Every call goes through
//! [`KvService::handle`], which fixes the order all commands share:
//! 1. the region context is checked ([`context`]): region id, epoch, store;
//! 2. the handler ([`raw`], [`txn`], [`lock_resolution`]) checks the input
//!    ([`limits`]), then that its keys lie in the region, then runs the
//!    command;
//! 3. failures are placed where clients look for them ([`errors`]).
//!
//! Steps 1 and 2 run on tokio's blocking pool, never on the async executor:
//! commands wait for latches and fsyncs. A handler that panics is contained
//! there: the call fails with `INTERNAL` naming the method and region, the
//! panic is logged with both, and the server keeps serving (latch guards
//! are released as the panic unwinds, so no key stays blocked).
//!
//! Requests are capped at [`limits::MAX_REQUEST_SIZE`] by the transport, so
//! an oversized message is refused before anything is decoded into memory;
//! on a `BatchCommands` stream ([`batch`]) the cap applies to each message.
//! A command sent on that stream runs through the same [`KvService::run`]
//! as its unary RPC, so both transports give the same answers.

pub mod batch;
pub mod context;
pub mod errors;
pub mod limits;
pub mod lock_resolution;
pub mod raw;
pub mod safe_ts;
pub mod split;
pub mod txn;

use std::sync::Arc;

use kvfeed_proto::tikvpb::tikv_server::{Tikv, TikvServer};
use kvfeed_proto::{kvrpcpb, tikvpb};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::MetricsError;
use crate::node::Node;
use batch::BatchMetrics;
use context::{HasContext, Scope};
use errors::{KvError, KvResponse};
use kvfeed_storage::region::STORE_ID;

/// The gRPC service, ready to be added to the router, with the request
/// size limit applied.
pub fn service(kv: KvService) -> TikvServer<KvService> {
    TikvServer::new(kv).max_decoding_message_size(limits::MAX_REQUEST_SIZE)
}

/// Serves `tikvpb.Tikv` from a node, as one store. Cloning is cheap
/// (shared handles): each `BatchCommands` command runs on a clone.
#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
    batch: BatchMetrics,
    /// The store this service answers as: requests for regions another
    /// store leads get `not_leader`.
    store_id: u64,
}

impl KvService {
    /// A service over `node`, its metrics registered in the node's
    /// registry. The node raised the transaction layer's read-timestamp
    /// floor to the oracle when it opened, so async-commit and 1PC commits
    /// land above every read an earlier run served.
    /// It answers as the first store; see [`KvService::for_store`]. Fails
    /// if the metrics are registered already (a second service on the
    /// node: share this one instead).
    pub fn new(node: Arc<Node>) -> Result<Self, MetricsError> {
        let batch = BatchMetrics::register(node.metrics())?;
        Ok(KvService {
            node,
            batch,
            store_id: STORE_ID,
        })
    }

    /// The store this service answers as.
    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// The same service (and metrics), answering as store `store_id`.
    pub fn for_store(&self, store_id: u64) -> KvService {
        KvService {
            store_id,
            ..self.clone()
        }
    }

    /// Runs `handler` for `request` on the blocking pool, after the region
    /// context check, and turns its outcome into the gRPC answer.
    pub async fn handle<Req, Resp, F>(
        &self,
        method: &'static str,
        request: Request<Req>,
        handler: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: HasContext,
        Resp: KvResponse,
        F: FnOnce(&Node, &Scope, Req) -> Result<Resp, KvError> + Send + 'static,
    {
        self.run(method, request.into_inner(), handler)
            .await
            .map(Response::new)
    }

    /// The one execution path of every KV command, unary or batched:
    /// context check and handler on the blocking pool, errors placed where
    /// clients look for them. A `Status` is an error no response field can
    /// carry (missing context, storage failure, handler panic).
    async fn run<Req, Resp, F>(
        &self,
        method: &'static str,
        req: Req,
        handler: F,
    ) -> Result<Resp, Status>
    where
        Req: HasContext,
        Resp: KvResponse,
        F: FnOnce(&Node, &Scope, Req) -> Result<Resp, KvError> + Send + 'static,
    {
        let region_id = req.context().map_or(0, |c| c.region_id);
        tracing::trace!(method, region_id, "kv request");
        let node = Arc::clone(&self.node);
        let store_id = self.store_id;
        let joined = tokio::task::spawn_blocking(move || {
            let scope = context::check(&node.regions().current(), req.context(), store_id)?;
            handler(&node, &scope, req)
        })
        .await;
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(err) => {
                tracing::error!(method, region_id, %err, "kv handler failed");
                return Err(Status::internal(format!(
                    "{method} on region {region_id}: the command failed inside the server \
                     ({err}); nothing is known about its effect"
                )));
            }
        };
        match outcome {
            Ok(resp) => Ok(resp),
            Err(KvError::Region(err)) => {
                tracing::debug!(method, region_id, message = %err.message, "region error");
                let mut resp = Resp::default();
                resp.set_region_error(*err);
                Ok(resp)
            }
            Err(KvError::Input(msg)) => {
                tracing::debug!(method, region_id, message = %msg, "invalid request");
                let mut resp = Resp::default();
                resp.set_input_error(msg);
                Ok(resp)
            }
            Err(err @ (KvError::MissingContext | KvError::Storage(_))) => {
                if matches!(err, KvError::Storage(_)) {
                    tracing::error!(method, region_id, %err, "storage failure");
                } else {
                    tracing::debug!(method, %err, "request without context");
                }
                Err(err.to_status(method))
            }
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Tikv for KvService {
    async fn kv_get(&self, r: Request<kvrpcpb::GetRequest>) -> Reply<kvrpcpb::GetResponse> {
        self.handle("KvGet", r, txn::get).await
    }

    async fn kv_scan(&self, r: Request<kvrpcpb::ScanRequest>) -> Reply<kvrpcpb::ScanResponse> {
        self.handle("KvScan", r, txn::scan).await
    }

    async fn kv_prewrite(
        &self,
        r: Request<kvrpcpb::PrewriteRequest>,
    ) -> Reply<kvrpcpb::PrewriteResponse> {
        self.handle("KvPrewrite", r, txn::prewrite).await
    }

    async fn kv_pessimistic_lock(
        &self,
        r: Request<kvrpcpb::PessimisticLockRequest>,
    ) -> Reply<kvrpcpb::PessimisticLockResponse> {
        self.handle("KvPessimisticLock", r, txn::pessimistic_lock)
            .await
    }

    async fn kv_pessimistic_rollback(
        &self,
        r: Request<kvrpcpb::PessimisticRollbackRequest>,
    ) -> Reply<kvrpcpb::PessimisticRollbackResponse> {
        self.handle("KVPessimisticRollback", r, txn::pessimistic_rollback)
            .await
    }

    async fn kv_txn_heart_beat(
        &self,
        r: Request<kvrpcpb::TxnHeartBeatRequest>,
    ) -> Reply<kvrpcpb::TxnHeartBeatResponse> {
        self.handle("KvTxnHeartBeat", r, lock_resolution::txn_heart_beat)
            .await
    }

    async fn kv_check_txn_status(
        &self,
        r: Request<kvrpcpb::CheckTxnStatusRequest>,
    ) -> Reply<kvrpcpb::CheckTxnStatusResponse> {
        self.handle("KvCheckTxnStatus", r, lock_resolution::check_txn_status)
            .await
    }

    async fn kv_check_secondary_locks(
        &self,
        r: Request<kvrpcpb::CheckSecondaryLocksRequest>,
    ) -> Reply<kvrpcpb::CheckSecondaryLocksResponse> {
        self.handle(
            "KvCheckSecondaryLocks",
            r,
            lock_resolution::check_secondary_locks,
        )
        .await
    }

    async fn kv_commit(
        &self,
        r: Request<kvrpcpb::CommitRequest>,
    ) -> Reply<kvrpcpb::CommitResponse> {
        self.handle("KvCommit", r, txn::commit).await
    }

    async fn kv_cleanup(
        &self,
        r: Request<kvrpcpb::CleanupRequest>,
    ) -> Reply<kvrpcpb::CleanupResponse> {
        self.handle("KvCleanup", r, lock_resolution::cleanup).await
    }

    async fn kv_batch_get(
        &self,
        r: Request<kvrpcpb::BatchGetRequest>,
    ) -> Reply<kvrpcpb::BatchGetResponse> {
        self.handle("KvBatchGet", r, txn::batch_get).await
    }

    async fn kv_batch_rollback(
        &self,
        r: Request<kvrpcpb::BatchRollbackRequest>,
    ) -> Reply<kvrpcpb::BatchRollbackResponse> {
        self.handle("KvBatchRollback", r, txn::batch_rollback).await
    }

    async fn kv_scan_lock(
        &self,
        r: Request<kvrpcpb::ScanLockRequest>,
    ) -> Reply<kvrpcpb::ScanLockResponse> {
        self.handle("KvScanLock", r, lock_resolution::scan_lock)
            .await
    }

    async fn kv_resolve_lock(
        &self,
        r: Request<kvrpcpb::ResolveLockRequest>,
    ) -> Reply<kvrpcpb::ResolveLockResponse> {
        self.handle("KvResolveLock", r, lock_resolution::resolve_lock)
            .await
    }

    async fn kv_gc(&self, r: Request<kvrpcpb::GcRequest>) -> Reply<kvrpcpb::GcResponse> {
        self.handle("KvGC", r, lock_resolution::gc).await
    }

    async fn kv_delete_range(
        &self,
        r: Request<kvrpcpb::DeleteRangeRequest>,
    ) -> Reply<kvrpcpb::DeleteRangeResponse> {
        self.handle("KvDeleteRange", r, lock_resolution::delete_range)
            .await
    }

    async fn raw_get(&self, r: Request<kvrpcpb::RawGetRequest>) -> Reply<kvrpcpb::RawGetResponse> {
        self.handle("RawGet", r, raw::get).await
    }

    async fn raw_batch_get(
        &self,
        r: Request<kvrpcpb::RawBatchGetRequest>,
    ) -> Reply<kvrpcpb::RawBatchGetResponse> {
        self.handle("RawBatchGet", r, raw::batch_get).await
    }

    async fn raw_put(&self, r: Request<kvrpcpb::RawPutRequest>) -> Reply<kvrpcpb::RawPutResponse> {
        self.handle("RawPut", r, raw::put).await
    }

    async fn raw_batch_put(
        &self,
        r: Request<kvrpcpb::RawBatchPutRequest>,
    ) -> Reply<kvrpcpb::RawBatchPutResponse> {
        self.handle("RawBatchPut", r, raw::batch_put).await
    }

    async fn raw_delete(
        &self,
        r: Request<kvrpcpb::RawDeleteRequest>,
    ) -> Reply<kvrpcpb::RawDeleteResponse> {
        self.handle("RawDelete", r, raw::delete).await
    }

    async fn raw_batch_delete(
        &self,
        r: Request<kvrpcpb::RawBatchDeleteRequest>,
    ) -> Reply<kvrpcpb::RawBatchDeleteResponse> {
        self.handle("RawBatchDelete", r, raw::batch_delete).await
    }

    async fn raw_scan(
        &self,
        r: Request<kvrpcpb::RawScanRequest>,
    ) -> Reply<kvrpcpb::RawScanResponse> {
        self.handle("RawScan", r, raw::scan).await
    }

    async fn raw_delete_range(
        &self,
        r: Request<kvrpcpb::RawDeleteRangeRequest>,
    ) -> Reply<kvrpcpb::RawDeleteRangeResponse> {
        self.handle("RawDeleteRange", r, raw::delete_range).await
    }

    async fn raw_batch_scan(
        &self,
        r: Request<kvrpcpb::RawBatchScanRequest>,
    ) -> Reply<kvrpcpb::RawBatchScanResponse> {
        self.handle("RawBatchScan", r, raw::batch_scan).await
    }

    async fn raw_get_key_ttl(
        &self,
        r: Request<kvrpcpb::RawGetKeyTtlRequest>,
    ) -> Reply<kvrpcpb::RawGetKeyTtlResponse> {
        self.handle("RawGetKeyTTL", r, raw::get_key_ttl).await
    }

    async fn raw_compare_and_swap(
        &self,
        r: Request<kvrpcpb::RawCasRequest>,
    ) -> Reply<kvrpcpb::RawCasResponse> {
        self.handle("RawCompareAndSwap", r, raw::compare_and_swap)
            .await
    }

    async fn split_region(
        &self,
        r: Request<kvrpcpb::SplitRegionRequest>,
    ) -> Reply<kvrpcpb::SplitRegionResponse> {
        self.handle("SplitRegion", r, split::split_region).await
    }

    async fn get_store_safe_ts(
        &self,
        r: Request<kvrpcpb::StoreSafeTsRequest>,
    ) -> Reply<kvrpcpb::StoreSafeTsResponse> {
        // No region context: the answer is the store's. Computing it may
        // allocate a timestamp and reads every lock, so off the executor.
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || safe_ts::store_safe_ts(node.safe_ts(), r.get_ref()))
            .await
            .map_err(|err| Status::internal(format!("GetStoreSafeTS failed: {err}")))?
            .map(Response::new)
            .map_err(|err| Status::unavailable(format!("GetStoreSafeTS: {err}")))
    }

    type BatchCommandsStream = batch::ResponseStream;

    async fn batch_commands(
        &self,
        r: Request<Streaming<tikvpb::BatchCommandsRequest>>,
    ) -> Reply<Self::BatchCommandsStream> {
        Ok(Response::new(batch::open(self.clone(), r.into_inner())))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use kvfeed_proto::metapb;
    use kvfeed_storage::region::STORE_ID;

    use super::*;
    use crate::config::Config;
    use crate::node::{DataDirLock, Endpoints};

    fn open_node(dir: &std::path::Path) -> Arc<Node> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let config = Config::default();
        let endpoints = Endpoints::new(&config, &[any], any);
        let lock = DataDirLock::acquire(dir).expect("lock the data dir");
        Arc::new(Node::open(config, lock, endpoints).expect("open the node"))
    }

    fn first_region_ctx(node: &Node) -> Option<kvrpcpb::Context> {
        let map = node.regions().current();
        let r = &map.regions()[0];
        Some(kvrpcpb::Context {
            region_id: r.id.0,
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: r.epoch.conf_ver,
                version: r.epoch.version,
            }),
            peer: Some(metapb::Peer {
                id: r.leader().id,
                store_id: STORE_ID,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_panicking_handler_is_an_internal_error_and_serving_goes_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = open_node(tmp.path());
        let svc = KvService::new(Arc::clone(&node)).expect("register metrics");
        let req = kvrpcpb::RawGetRequest {
            context: first_region_ctx(&node),
            key: b"k".to_vec(),
            ..Default::default()
        };
        let handler =
            |_: &Node,
             _: &Scope,
             _: kvrpcpb::RawGetRequest|
             -> Result<kvrpcpb::RawGetResponse, KvError> { panic!("handler bug") };
        let status = svc
            .handle("RawGetForTest", Request::new(req.clone()), handler)
            .await
            .expect_err("a panic is an error");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("RawGetForTest"), "{status:?}");
        let region = node.regions().current().regions()[0].id.to_string();
        assert!(status.message().contains(&region), "{status:?}");

        // The service still answers normal calls.
        let put = kvrpcpb::RawPutRequest {
            context: first_region_ctx(&node),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        };
        let resp = svc.raw_put(Request::new(put)).await.expect("put");
        assert!(resp.get_ref().error.is_empty(), "{:?}", resp.get_ref());
        let resp = svc.raw_get(Request::new(req.clone())).await.expect("get");
        assert_eq!(resp.get_ref().value, b"v");

        // On a BatchCommands stream the same failure is the slot's error.
        use kvfeed_proto::tikvpb::batch_commands_response::response::Cmd;
        match svc.call("RawGetForTest", req, handler, Cmd::RawGet).await {
            Cmd::RawGet(r) => {
                assert!(r.error.contains("RawGetForTest"), "{r:?}");
                assert!(r.error.contains("Internal"), "{r:?}");
                assert!(r.value.is_empty(), "{r:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}
