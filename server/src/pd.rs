//! The placement driver (`pdpb.PD`) service: what TiKV clients ask PD, answered
//! for a cluster of one node.
//!
//! The node is its own PD: one member (the leader, reachable at store 1's
//! advertised gRPC address), the stores it serves (one, or `server.stores`)
//! and the live region layout
//! ([`Regions`](kvfeed_storage::region::Regions)), with each region's
//! leader peer. Clients such as `tikv-client` and TiCDC connect here first,
//! learn the cluster id from `GetMembers`, take timestamps from the `Tso`
//! stream and route requests with `GetRegion` / `GetStore`.
//!
//! Invariants clients rely on (several panic otherwise):
//! - every response carries `header { cluster_id }`; an error goes into
//!   `header.error`, never a missing header;
//! - a request naming another cluster is answered with a header error
//!   quoting both ids in PD's wording ("mismatch cluster id, need X but got
//!   Y", which clients match on). Zero or a missing header means "not known
//!   yet" and is accepted only where a client cannot know it yet —
//!   `GetMembers`, which tells it, and `GetClusterInfo`, which client-go
//!   sends without a header — as PD does; everywhere else it is a mismatch,
//!   so a client that never asked which cluster this is cannot move safe
//!   points or take timestamps by accident;
//! - a region always comes with its epoch, a store always with its address;
//! - the `Tso` stream answers each request exactly once, in order, with the
//!   *highest* timestamp of the batch and the requested count.
//!
//! Calls that may fsync (the oracle extending its window, safe point writes)
//! run on the blocking pool so they never stall the async workers.
//!
//! GC safe points are persisted by [`SafePoints`]; this service is the only
//! writer of them (the GC worker only reads), which is the single-writer
//! invariant that module requires.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use std::time::{SystemTime, UNIX_EPOCH};

use kvfeed_cdc::meta::{leader_peer, region_meta};
use kvfeed_proto::metapb;
use kvfeed_proto::pdpb::pd_server::{Pd, PdServer};
use kvfeed_proto::pdpb::{
    self, ErrorType, GetAllStoresRequest, GetAllStoresResponse, GetClusterInfoRequest,
    GetClusterInfoResponse, GetGcSafePointRequest, GetGcSafePointResponse, GetMembersRequest,
    GetMembersResponse, GetRegionByIdRequest, GetRegionRequest, GetRegionResponse, GetStoreRequest,
    GetStoreResponse, Member, RequestHeader, ResponseHeader, ScanRegionsRequest,
    ScanRegionsResponse, TsoRequest, TsoResponse, UpdateGcSafePointRequest,
    UpdateGcSafePointResponse, UpdateServiceGcSafePointRequest, UpdateServiceGcSafePointResponse,
};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::region::{Region, RegionId, RegionMap};
use kvfeed_storage::safepoint::{SafePointError, SafePoints, ServiceId};
use kvfeed_storage::tso::Tso;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::node::Node;
use crate::shutdown::ShutdownSignal;

mod batch_scan;
mod operators;

/// The TiKV version the store reports. TiCDC parses it as semver and refuses
/// stores older than its minimum, so it names a current TiKV release whose
/// protocol kvfeed follows.
pub const TIKV_COMPATIBLE_VERSION: &str = "8.5.0";

/// The single PD member's name and id.
pub const MEMBER_NAME: &str = "kvfeed";
pub const MEMBER_ID: u64 = 1;

/// Responses buffered per `Tso` stream. Small: each answers one request, and
/// the client waits for them in order anyway.
const TSO_STREAM_BUFFER: usize = 16;

/// The PD service attached to the node's gRPC server.
pub fn service(node: &Arc<Node>) -> PdServer<PdService> {
    PdServer::new(PdService::new(Arc::clone(node)))
}

/// Answers PD calls from the node's state.
pub struct PdService {
    node: Arc<Node>,
    safe_points: Arc<SafePoints>,
    /// Unix seconds when the service was created (the store's start time).
    started_at_secs: i64,
    /// Numbers `Tso` streams for logs.
    next_stream_id: AtomicU64,
}

impl PdService {
    pub fn new(node: Arc<Node>) -> Self {
        let safe_points = Arc::new(SafePoints::new(
            Arc::clone(node.store()),
            Arc::clone(node.tso().clock()),
        ));
        PdService {
            node,
            safe_points,
            started_at_secs: unix_now().as_secs().try_into().unwrap_or(i64::MAX),
            next_stream_id: AtomicU64::new(1),
        }
    }

    fn cluster_id(&self) -> u64 {
        self.node.cluster_id().get()
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id(),
            error: None,
        })
    }

    fn error_header(&self, kind: ErrorType, message: String) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.cluster_id(),
            error: Some(pdpb::Error {
                r#type: kind as i32,
                message,
            }),
        })
    }

    /// The answer of a single-region lookup: a header error if the request
    /// names another cluster, else the region `find` picks with its leader;
    /// no region (not found) is still a success, as in PD.
    fn region_reply(
        &self,
        header: Option<&RequestHeader>,
        method: &'static str,
        find: impl FnOnce(&RegionMap) -> Option<&Region>,
    ) -> GetRegionResponse {
        if let Some(header) = self.reject(request_cluster_id(header), method) {
            return GetRegionResponse {
                header,
                ..GetRegionResponse::default()
            };
        }
        let map = self.node.regions().current();
        let region = find(&map);
        tracing::trace!(method, region_id = region.map(|r| r.id.0), "region lookup");
        GetRegionResponse {
            header: self.header(),
            region: region.map(region_meta),
            leader: region.map(leader_peer),
            ..GetRegionResponse::default()
        }
    }

    /// `Some(error header)` if the request names another cluster (or
    /// none, where it must name one).
    fn reject(&self, requested: u64, method: &'static str) -> Option<Option<ResponseHeader>> {
        let ours = self.cluster_id();
        if requested == ours || (requested == 0 && ZERO_CLUSTER_ID_OK.contains(&method)) {
            return None;
        }
        tracing::warn!(
            method,
            cluster_id = ours,
            requested,
            "request for another cluster"
        );
        Some(self.error_header(ErrorType::InvalidValue, mismatch_message(ours, requested)))
    }

    fn member(&self) -> Member {
        let url = format!("http://{}", self.node.endpoints().advertise_addr);
        Member {
            name: MEMBER_NAME.to_owned(),
            member_id: MEMBER_ID,
            peer_urls: vec![url.clone()],
            client_urls: vec![url],
            binary_version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Member::default()
        }
    }

    /// Store `id` as PD describes it, if this node serves it.
    fn store(&self, id: u64) -> Option<metapb::Store> {
        let endpoints = self.node.endpoints();
        let store = endpoints.store(id)?;
        Some(metapb::Store {
            id,
            address: store.advertise_addr.clone(),
            state: metapb::StoreState::Up as i32,
            labels: Vec::new(),
            version: TIKV_COMPATIBLE_VERSION.to_owned(),
            peer_address: store.advertise_addr.clone(),
            status_address: status_address(&store.advertise_addr, endpoints.status_addr),
            start_timestamp: self.started_at_secs,
            // The node is alive whenever it answers, so "now" is accurate.
            last_heartbeat: unix_now().as_nanos().try_into().unwrap_or(i64::MAX),
            node_state: metapb::NodeState::Serving as i32,
            ..metapb::Store::default()
        })
    }

    /// Runs a safe point operation on the blocking pool (it may fsync).
    async fn with_safe_points<T: Send + 'static>(
        &self,
        op: impl FnOnce(&SafePoints) -> Result<T, SafePointError> + Send + 'static,
    ) -> Result<Result<T, SafePointError>, Status> {
        let safe_points = Arc::clone(&self.safe_points);
        tokio::task::spawn_blocking(move || op(&safe_points))
            .await
            .map_err(|err| Status::internal(format!("safe point task failed: {err}")))
    }

    /// Refuses a safe point above every timestamp the oracle has handed
    /// out (PD itself takes any): GC would be held, or every feed from an
    /// earlier ts refused, for as long as the oracle takes to catch up —
    /// for `2^64 - 1`, for good.
    fn future_safe_point(&self, method: &'static str, ts: TimeStamp) -> Option<ResponseHeader> {
        let now = self.node.tso().current();
        if ts <= now {
            return None;
        }
        tracing::warn!(method, %ts, %now, "safe point above the current timestamp refused");
        self.error_header(
            ErrorType::InvalidValue,
            format!(
                "{method}: safe point {ts} is above the current timestamp {now}; a safe point must be a timestamp the oracle has handed out"
            ),
        )
    }

    /// The header for a failed safe point operation.
    fn safe_point_error(
        &self,
        method: &'static str,
        err: &SafePointError,
    ) -> Option<ResponseHeader> {
        let kind = match err {
            SafePointError::EmptyServiceId | SafePointError::ServiceIdTooLong { .. } => {
                ErrorType::InvalidValue
            }
            SafePointError::TooManyServices { .. } | SafePointError::Storage(_) => {
                ErrorType::Unknown
            }
        };
        tracing::warn!(method, %err, "safe point request failed");
        self.error_header(kind, err.to_string())
    }
}

/// PD's wording, which clients recognise.
fn mismatch_message(ours: u64, requested: u64) -> String {
    format!("mismatch cluster id, need {ours} but got {requested}")
}

fn request_cluster_id(header: Option<&RequestHeader>) -> u64 {
    header.map_or(0, |h| h.cluster_id)
}

fn unix_now() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The status address clients should use: the bound one, unless it is a
/// wildcard (`0.0.0.0`), which is not reachable as such; then the advertised
/// host with the status port.
fn status_address(advertise_addr: &str, status_addr: SocketAddr) -> String {
    if !status_addr.ip().is_unspecified() {
        return status_addr.to_string();
    }
    match advertise_addr.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{}", status_addr.port()),
        None => status_addr.to_string(),
    }
}

fn timestamp(ts: TimeStamp) -> pdpb::Timestamp {
    // Both parts fit: physical has 46 bits, logical 18.
    pdpb::Timestamp {
        physical: i64::try_from(ts.physical()).unwrap_or(i64::MAX),
        logical: i64::try_from(ts.logical()).unwrap_or(i64::MAX),
        suffix_bits: 0,
    }
}

type TsoStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<TsoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Pd for PdService {
    async fn get_cluster_info(
        &self,
        request: Request<GetClusterInfoRequest>,
    ) -> Result<Response<GetClusterInfoResponse>, Status> {
        let requested = request
            .get_ref()
            .header
            .as_ref()
            .map_or(0, |h| h.cluster_id);
        let header = self
            .reject(requested, "GetClusterInfo")
            .unwrap_or_else(|| self.header());
        Ok(Response::new(GetClusterInfoResponse {
            header,
            service_modes: vec![pdpb::ServiceMode::PdSvcMode as i32],
            tso_urls: Vec::new(),
        }))
    }

    async fn get_members(
        &self,
        request: Request<GetMembersRequest>,
    ) -> Result<Response<GetMembersResponse>, Status> {
        let requested = request_cluster_id(request.get_ref().header.as_ref());
        if let Some(header) = self.reject(requested, "GetMembers") {
            return Ok(Response::new(GetMembersResponse {
                header,
                ..GetMembersResponse::default()
            }));
        }
        let leader = self.member();
        Ok(Response::new(GetMembersResponse {
            header: self.header(),
            members: vec![leader.clone()],
            leader: Some(leader.clone()),
            etcd_leader: Some(leader),
            ..GetMembersResponse::default()
        }))
    }

    type TsoStream = TsoStream;

    async fn tso(
        &self,
        request: Request<Streaming<TsoRequest>>,
    ) -> Result<Response<Self::TsoStream>, Status> {
        let stream_id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(TSO_STREAM_BUFFER);
        let session = TsoSession {
            stream_id,
            cluster_id: self.cluster_id(),
            tso: Arc::clone(self.node.tso()),
            inbound: request.into_inner(),
            tx,
        };
        tokio::spawn(session.run(self.node.shutdown().subscribe()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_store(
        &self,
        request: Request<GetStoreRequest>,
    ) -> Result<Response<GetStoreResponse>, Status> {
        let req = request.into_inner();
        let header = match self.reject(request_cluster_id(req.header.as_ref()), "GetStore") {
            Some(header) => header,
            None => match self.store(req.store_id) {
                Some(store) => {
                    return Ok(Response::new(GetStoreResponse {
                        header: self.header(),
                        store: Some(store),
                    }));
                }
                None => {
                    tracing::debug!(store_id = req.store_id, "GetStore for an unknown store");
                    self.error_header(
                        ErrorType::Unknown,
                        format!("invalid store ID {}, not found", req.store_id),
                    )
                }
            },
        };
        Ok(Response::new(GetStoreResponse {
            header,
            store: None,
        }))
    }

    async fn get_all_stores(
        &self,
        request: Request<GetAllStoresRequest>,
    ) -> Result<Response<GetAllStoresResponse>, Status> {
        let requested = request_cluster_id(request.get_ref().header.as_ref());
        if let Some(header) = self.reject(requested, "GetAllStores") {
            return Ok(Response::new(GetAllStoresResponse {
                header,
                stores: Vec::new(),
            }));
        }
        Ok(Response::new(GetAllStoresResponse {
            header: self.header(),
            stores: self
                .node
                .endpoints()
                .store_ids()
                .into_iter()
                .filter_map(|id| self.store(id))
                .collect(),
        }))
    }

    async fn get_region(
        &self,
        request: Request<GetRegionRequest>,
    ) -> Result<Response<GetRegionResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.region_reply(
            req.header.as_ref(),
            "GetRegion",
            |map| Some(map.locate(&req.region_key)),
        )))
    }

    async fn get_prev_region(
        &self,
        request: Request<GetRegionRequest>,
    ) -> Result<Response<GetRegionResponse>, Status> {
        let req = request.into_inner();
        // As PD: the region ending where the key's region starts; none
        // (still a success) for a key in the first region.
        Ok(Response::new(self.region_reply(
            req.header.as_ref(),
            "GetPrevRegion",
            |map| map.neighbours(map.locate(&req.region_key).id).0,
        )))
    }

    async fn get_region_by_id(
        &self,
        request: Request<GetRegionByIdRequest>,
    ) -> Result<Response<GetRegionResponse>, Status> {
        let req = request.into_inner();
        // As PD: an unknown id is a response without a region, not an error.
        Ok(Response::new(self.region_reply(
            req.header.as_ref(),
            "GetRegionByID",
            |map| map.get(RegionId(req.region_id)),
        )))
    }

    async fn scan_regions(
        &self,
        request: Request<ScanRegionsRequest>,
    ) -> Result<Response<ScanRegionsResponse>, Status> {
        let req = request.into_inner();
        let requested = request_cluster_id(req.header.as_ref());
        if let Some(header) = self.reject(requested, "ScanRegions") {
            return Ok(Response::new(ScanRegionsResponse {
                header,
                ..ScanRegionsResponse::default()
            }));
        }
        // A limit of 0 or below means "no limit", as in PD.
        let limit = usize::try_from(req.limit).unwrap_or(0);
        let map = self.node.regions().current();
        let regions = map.overlapping(&req.start_key, &req.end_key, limit);
        Ok(Response::new(ScanRegionsResponse {
            header: self.header(),
            region_metas: regions.iter().map(|r| region_meta(r)).collect(),
            leaders: regions.iter().map(|r| leader_peer(r)).collect(),
            regions: regions
                .iter()
                .map(|r| pdpb::Region {
                    region: Some(region_meta(r)),
                    leader: Some(leader_peer(r)),
                    ..pdpb::Region::default()
                })
                .collect(),
        }))
    }

    async fn scatter_region(
        &self,
        request: Request<pdpb::ScatterRegionRequest>,
    ) -> Result<Response<pdpb::ScatterRegionResponse>, Status> {
        Ok(Response::new(
            self.scatter_region_reply(request.into_inner()).await,
        ))
    }

    async fn get_operator(
        &self,
        request: Request<pdpb::GetOperatorRequest>,
    ) -> Result<Response<pdpb::GetOperatorResponse>, Status> {
        Ok(Response::new(self.get_operator_reply(request.get_ref())))
    }

    async fn split_regions(
        &self,
        request: Request<pdpb::SplitRegionsRequest>,
    ) -> Result<Response<pdpb::SplitRegionsResponse>, Status> {
        Ok(Response::new(
            self.split_regions_reply(request.into_inner()).await,
        ))
    }

    async fn batch_scan_regions(
        &self,
        request: Request<pdpb::BatchScanRegionsRequest>,
    ) -> Result<Response<pdpb::BatchScanRegionsResponse>, Status> {
        Ok(Response::new(
            self.batch_scan_regions_reply(request.get_ref()),
        ))
    }

    async fn get_gc_safe_point(
        &self,
        request: Request<GetGcSafePointRequest>,
    ) -> Result<Response<GetGcSafePointResponse>, Status> {
        let requested = request_cluster_id(request.get_ref().header.as_ref());
        if let Some(header) = self.reject(requested, "GetGCSafePoint") {
            return Ok(Response::new(GetGcSafePointResponse {
                header,
                safe_point: 0,
            }));
        }
        let response = match self.with_safe_points(|sp| sp.gc_safe_point()).await? {
            Ok(safe_point) => GetGcSafePointResponse {
                header: self.header(),
                safe_point: safe_point.into_inner(),
            },
            Err(err) => GetGcSafePointResponse {
                header: self.safe_point_error("GetGCSafePoint", &err),
                safe_point: 0,
            },
        };
        Ok(Response::new(response))
    }

    async fn update_gc_safe_point(
        &self,
        request: Request<UpdateGcSafePointRequest>,
    ) -> Result<Response<UpdateGcSafePointResponse>, Status> {
        let req = request.into_inner();
        let requested = request_cluster_id(req.header.as_ref());
        if let Some(header) = self.reject(requested, "UpdateGCSafePoint") {
            return Ok(Response::new(UpdateGcSafePointResponse {
                header,
                new_safe_point: 0,
            }));
        }
        let target = TimeStamp::new(req.safe_point);
        if let Some(header) = self.future_safe_point("UpdateGCSafePoint", target) {
            return Ok(Response::new(UpdateGcSafePointResponse {
                header: Some(header),
                new_safe_point: 0,
            }));
        }
        let response = match self
            .with_safe_points(move |sp| sp.update_gc_safe_point(target))
            .await?
        {
            Ok(stored) => UpdateGcSafePointResponse {
                header: self.header(),
                new_safe_point: stored.into_inner(),
            },
            Err(err) => UpdateGcSafePointResponse {
                header: self.safe_point_error("UpdateGCSafePoint", &err),
                new_safe_point: 0,
            },
        };
        Ok(Response::new(response))
    }

    async fn update_service_gc_safe_point(
        &self,
        request: Request<UpdateServiceGcSafePointRequest>,
    ) -> Result<Response<UpdateServiceGcSafePointResponse>, Status> {
        let req = request.into_inner();
        let requested = request_cluster_id(req.header.as_ref());
        if let Some(header) = self.reject(requested, "UpdateServiceGCSafePoint") {
            return Ok(Response::new(UpdateServiceGcSafePointResponse {
                header,
                ..UpdateServiceGcSafePointResponse::default()
            }));
        }
        let service_id = ServiceId::new(req.service_id);
        // A TTL past the configured cap is cut to it: the answer's ttl is
        // what was granted.
        let cap = i64::try_from(
            self.node
                .config()
                .storage
                .max_service_safe_point_ttl
                .as_duration()
                .as_secs(),
        )
        .unwrap_or(i64::MAX);
        let (ttl, safe_point) = (req.ttl.min(cap), TimeStamp::new(req.safe_point));
        if ttl > 0
            && let Some(header) = self.future_safe_point("UpdateServiceGCSafePoint", safe_point)
        {
            return Ok(Response::new(UpdateServiceGcSafePointResponse {
                header: Some(header),
                ..UpdateServiceGcSafePointResponse::default()
            }));
        }
        let log_id = service_id.to_string();
        let outcome = self
            .with_safe_points(move |sp| sp.update_service(&service_id, ttl, safe_point))
            .await?;
        let response = match outcome {
            Ok(update) => {
                tracing::debug!(
                    service_id = %log_id,
                    ttl,
                    %safe_point,
                    updated = update.updated,
                    min_safe_point = %update.min.safe_point,
                    "service GC safe point"
                );
                UpdateServiceGcSafePointResponse {
                    header: self.header(),
                    service_id: update.min.service_id.into_bytes(),
                    ttl: update.min.ttl_secs,
                    min_safe_point: update.min.safe_point.into_inner(),
                }
            }
            Err(err) => UpdateServiceGcSafePointResponse {
                header: self.safe_point_error("UpdateServiceGCSafePoint", &err),
                ..UpdateServiceGcSafePointResponse::default()
            },
        };
        Ok(Response::new(response))
    }
}

/// Requests of one `Tso` stream answered together at most.
const TSO_BATCH: usize = 256;

/// Timestamps one call to the oracle hands out at most for a batch (well
/// within the logical timestamps of a millisecond, 2^18).
const TSO_BATCH_COUNT: u32 = 1 << 16;

/// The calls a client may make before it knows the cluster id.
const ZERO_CLUSTER_ID_OK: [&str; 2] = ["GetMembers", "GetClusterInfo"];

/// One client's `Tso` stream: requests are read as they come, those
/// already sent answered together (one call to the oracle), and the answers
/// sent in request order.
struct TsoSession {
    stream_id: u64,
    cluster_id: u64,
    tso: Arc<Tso>,
    inbound: Streaming<TsoRequest>,
    tx: mpsc::Sender<Result<TsoResponse, Status>>,
}

impl TsoSession {
    /// Serves the stream until the client half-closes or goes away, an
    /// error is sent, or shutdown fires. Holds `shutdown` throughout, so the
    /// server's shutdown waits for the stream to end.
    async fn run(mut self, mut shutdown: ShutdownSignal) {
        let stream_id = self.stream_id;
        tracing::debug!(stream_id, "tso stream opened");
        let mut answered: u64 = 0;
        loop {
            let next = tokio::select! {
                () = shutdown.recv() => break,
                next = self.inbound.message() => next,
            };
            let mut batch = Vec::new();
            let mut end = None;
            match next {
                Ok(Some(request)) => batch.push(request),
                Ok(None) => break,
                Err(status) => {
                    self.broken(status).await;
                    break;
                }
            }
            // Whatever else the client has already sent (a pipelining
            // client sends many before reading) is answered with it, by one
            // call to the oracle: reading keeps up however far the client
            // runs ahead. `message()` keeps its state in the stream, so
            // asking without waiting loses nothing.
            while batch.len() < TSO_BATCH {
                match self.inbound.message().now_or_never() {
                    Some(Ok(Some(request))) => batch.push(request),
                    Some(Ok(None)) => {
                        end = Some(None);
                        break;
                    }
                    Some(Err(status)) => {
                        end = Some(Some(status));
                        break;
                    }
                    None => break,
                }
            }
            let mut stop = false;
            for reply in self.answer_batch(&batch).await {
                let fatal = reply.is_err();
                if self.tx.send(reply).await.is_err() {
                    // The client stopped reading the responses.
                    stop = true;
                    break;
                }
                if fatal {
                    stop = true;
                    break;
                }
                answered += 1;
            }
            match end {
                _ if stop => break,
                Some(None) => break,
                Some(Some(status)) => {
                    self.broken(status).await;
                    break;
                }
                None => {}
            }
        }
        tracing::debug!(stream_id, answered, "tso stream closed");
    }

    /// The inbound stream failed. A request that does not decode is the
    /// client's error, and it hears so (a stream that just ended would read
    /// as a clean close); a broken connection has no one left to tell, and
    /// the send fails quietly.
    async fn broken(&self, status: Status) {
        tracing::debug!(stream_id = self.stream_id, %status, "tso stream broken by the client");
        let reply = if status.code() == tonic::Code::Internal {
            Status::invalid_argument(format!("undecodable Tso request: {}", status.message()))
        } else {
            status
        };
        let _ = self.tx.send(Err(reply)).await;
    }

    /// The answers to `batch`, in order: each request checked on its own
    /// (an invalid one is answered as alone, and a fatal one ends the
    /// answers), the valid ones between them served by one call to the
    /// oracle for all their timestamps, each getting its own consecutive
    /// run, earlier requests lower.
    async fn answer_batch(&self, batch: &[TsoRequest]) -> Vec<Result<TsoResponse, Status>> {
        let mut out = Vec::with_capacity(batch.len());
        // The counts of the run being gathered, and their sum.
        let (mut run, mut total): (Vec<u32>, u32) = (Vec::new(), 0);
        for request in batch {
            let count = request.count;
            let batchable = request_cluster_id(request.header.as_ref()) == self.cluster_id
                && count > 0
                && count <= TSO_BATCH_COUNT;
            if batchable && total + count <= TSO_BATCH_COUNT {
                run.push(count);
                total += count;
                continue;
            }
            out.extend(self.serve_run(std::mem::take(&mut run), total).await);
            total = 0;
            if out.last().is_some_and(Result::is_err) {
                return out;
            }
            if batchable {
                // Valid, only too much for the run: it starts the next.
                run.push(count);
                total = count;
                continue;
            }
            let reply = self.answer(request).await;
            let fatal = reply.is_err();
            out.push(reply);
            if fatal {
                return out;
            }
        }
        out.extend(self.serve_run(run, total).await);
        out
    }

    /// Serves a run of valid requests (their counts, `total` in all) with
    /// one call to the oracle.
    async fn serve_run(&self, counts: Vec<u32>, total: u32) -> Vec<Result<TsoResponse, Status>> {
        if counts.is_empty() {
            return Vec::new();
        }
        let highest = match self.oracle(total).await {
            Ok(highest) => highest,
            Err(status) => return vec![Err(status)],
        };
        // The batch is one run of consecutive timestamps within a
        // millisecond ending at `highest`; each request's ends where the
        // ones after it begin.
        let mut after: u64 = total.into();
        counts
            .into_iter()
            .map(|count| {
                after -= u64::from(count);
                Ok(TsoResponse {
                    header: Some(ResponseHeader {
                        cluster_id: self.cluster_id,
                        error: None,
                    }),
                    count,
                    timestamp: Some(timestamp(TimeStamp::new(highest.into_inner() - after))),
                })
            })
            .collect()
    }

    /// `count` consecutive timestamps from the oracle; the highest.
    async fn oracle(&self, count: u32) -> Result<TimeStamp, Status> {
        let tso = Arc::clone(&self.tso);
        tokio::task::spawn_blocking(move || tso.get(count))
            .await
            .map_err(|err| Status::internal(format!("timestamp task failed: {err}")))?
            .map_err(|err| match err {
                kvfeed_storage::Error::InvalidInput(msg) => Status::invalid_argument(msg),
                other => {
                    tracing::error!(stream_id = self.stream_id, %other, "timestamp oracle failed");
                    Status::unavailable(format!("timestamp oracle: {other}"))
                }
            })
    }

    async fn answer(&self, request: &TsoRequest) -> Result<TsoResponse, Status> {
        let requested = request_cluster_id(request.header.as_ref());
        if requested != self.cluster_id {
            tracing::warn!(
                stream_id = self.stream_id,
                cluster_id = self.cluster_id,
                requested,
                "tso request for another cluster"
            );
            // Answered (no timestamps granted) so the stream stays one
            // response per request.
            return Ok(TsoResponse {
                header: Some(ResponseHeader {
                    cluster_id: self.cluster_id,
                    error: Some(pdpb::Error {
                        r#type: ErrorType::InvalidValue as i32,
                        message: mismatch_message(self.cluster_id, requested),
                    }),
                }),
                count: 0,
                timestamp: None,
            });
        }
        let count = request.count;
        if count == 0 {
            return Err(Status::invalid_argument(
                "tso request count must be at least 1",
            ));
        }
        let highest = self.oracle(count).await?;
        Ok(TsoResponse {
            header: Some(ResponseHeader {
                cluster_id: self.cluster_id,
                error: None,
            }),
            count,
            timestamp: Some(timestamp(highest)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_address_replaces_a_wildcard_host() {
        let bound: SocketAddr = ([127, 0, 0, 1], 20_180).into();
        assert_eq!(status_address("kv:20160", bound), "127.0.0.1:20180");
        let wildcard: SocketAddr = ([0, 0, 0, 0], 20_180).into();
        assert_eq!(
            status_address("kv.example:20160", wildcard),
            "kv.example:20180"
        );
    }

    #[test]
    fn timestamps_split_into_physical_and_logical() {
        let ts = TimeStamp::compose(1_700_000_000_123, 77);
        let pb = timestamp(ts);
        assert_eq!((pb.physical, pb.logical), (1_700_000_000_123, 77));
        assert_eq!(
            TimeStamp::compose(pb.physical as u64, pb.logical as u64),
            ts
        );
    }

    #[test]
    fn version_is_semver() {
        let parts: Vec<u64> = TIKV_COMPATIBLE_VERSION
            .split('.')
            .map(|p| p.parse().expect("numeric"))
            .collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[0] >= 5, "TiCDC refuses TiKV below 5.x");
    }

    #[test]
    fn mismatch_message_names_both_ids() {
        let msg = mismatch_message(7, 9);
        assert!(msg.contains("mismatch cluster id"), "{msg}");
        assert!(msg.contains('7') && msg.contains('9'), "{msg}");
    }
}
