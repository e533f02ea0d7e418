//! A small TiKV client over the generated gRPC stubs, for kvfeed's own tools
//! (`put`, `get`, `delete`, `scan`, `watch` and `bench`) and for programs
//! built on kvfeed. It depends on the wire definitions and the shared types
//! only, never on the storage engine or the server.
//!
//! [`Cluster`] is the entry point: it asks PD (GetMembers) for the cluster id
//! and the leader, then reuses one channel per address for every call — PD,
//! the timestamp oracle, the KV service and, later, the change feed, which
//! all live on the same address in kvfeed.
//!
//! Invariants the rest of the client relies on:
//! - Nothing waits without a bound. Connecting (TCP plus the first PD call)
//!   is bounded by [`ConnectOptions::connect_timeout`], every later call by
//!   [`ConnectOptions::rpc_timeout`], and every retry loop by a
//!   [`retry::Backoff`]. A wrong address is an error, never a hang.
//! - Regions are not cached: each attempt asks PD, so a retry after a region
//!   error (`not_leader`, `epoch_not_match`, `region_not_found`) always uses
//!   fresh routing. One PD round trip per request is cheap next to a process
//!   start, and it removes cache invalidation from the failure paths.
//! - No store is assumed: every request goes to the store PD names as the
//!   region's leader, whose address comes from PD's GetStore.
//! - Every PD response's header is checked: a missing header or a header
//!   error is reported, never ignored.
//!
//! The change feed ([`feed`]) follows a key range across however many
//! regions hold it, as one stream of committed changes: it re-subscribes
//! after region errors and lost streams from the last resolved ts, drops
//! what the server sends again, and never lets the range's resolved ts move
//! back. Its module docs state exactly what a consumer can rely on.
//!
//! Modules: [`error`] (typed errors), [`region`] (regions and the raw vs
//! transactional key spaces), [`retry`] (backoff), [`raw`] and [`txn`] (the
//! two APIs), [`feed`] (the change-feed consumer), [`scan`] (range scans across regions), [`text`] (byte
//! strings in messages).

#![warn(missing_docs)]

pub mod error;
pub mod feed;
pub mod raw;
pub mod region;
pub mod retry;
pub mod scan;
pub mod text;
pub mod txn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kvfeed_proto::pdpb::{self, pd_client::PdClient};
use kvfeed_proto::tikvpb::tikv_client::TikvClient;
use kvfeed_types::TimeStamp;
use kvfeed_types::timestamp::MAX_LOGICAL;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

pub use error::{ClientError, RegionError};
pub use region::{KeyMode, RegionInfo};

/// Where `kvfeed serve` listens by default, and so where clients look.
pub const DEFAULT_PD: &str = "127.0.0.1:20160";

/// Largest response the client accepts; scans page well below it.
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Time limits for talking to the cluster.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Bound on reaching an address and getting PD's first answer.
    pub connect_timeout: Duration,
    /// Bound on each later call.
    pub rpc_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(10),
        }
    }
}

/// PD's answer to [`Cluster::update_service_safe_point`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSafePoint {
    /// The safe point asked for.
    pub requested: TimeStamp,
    /// The service holding the lowest safe point after the call.
    pub min_service: String,
    /// The lowest service safe point after the call.
    pub min_safe_point: TimeStamp,
}

impl ServiceSafePoint {
    /// Whether PD holds the requested safe point: it refuses one below the
    /// minimum, and then the minimum is above what was asked.
    pub fn held(&self) -> bool {
        self.min_safe_point <= self.requested
    }
}

/// A connection to a kvfeed (or TiKV) cluster. Cheap to clone; clones share
/// channels and the timestamp stream.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` of the PD leader in use.
    pd_addr: String,
    pd_channel: Channel,
    cluster_id: u64,
    options: ConnectOptions,
    /// The open Tso stream, if any. The lock keeps request and response in
    /// pairs: the stream answers in order, one response per request.
    tso: Mutex<Option<TsoStream>>,
    /// Store connections by store id.
    stores: Mutex<HashMap<u64, Arc<StoreConn>>>,
}

struct TsoStream {
    requests: mpsc::Sender<pdpb::TsoRequest>,
    responses: tonic::Streaming<pdpb::TsoResponse>,
}

/// A channel to one store, where the KV service and the change feed live.
#[derive(Debug)]
pub struct StoreConn {
    /// The store's id in PD, as a region's leader peer names it.
    pub id: u64,
    /// `host:port` as advertised by PD.
    pub address: String,
    channel: Channel,
}

impl StoreConn {
    /// A KV client on this store's channel.
    pub fn kv(&self) -> TikvClient<Channel> {
        TikvClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// The channel itself, for other services on the same address (the
    /// change feed).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

impl Cluster {
    /// Connects to PD at `pd_addr` (`host:port`, `http://` optional) with
    /// the default time limits.
    pub async fn connect(pd_addr: &str) -> Result<Cluster> {
        Cluster::connect_with(pd_addr, ConnectOptions::default()).await
    }

    /// Connects to PD at `pd_addr`: GetMembers for the cluster id and the
    /// leader, moving to the leader's address when it is another one.
    pub async fn connect_with(pd_addr: &str, options: ConnectOptions) -> Result<Cluster> {
        let addr = normalize_addr(pd_addr)?;
        let limit = options.connect_timeout;
        let connecting = async {
            let channel = open_channel(&addr, options).await?;
            let members = pd_client(channel.clone())
                .get_members(pdpb::GetMembersRequest { header: None })
                .await
                .map_err(|s| ClientError::rpc("GetMembers", &s))?
                .into_inner();
            let cluster_id = check_header("GetMembers", members.header.as_ref())?.cluster_id;
            if cluster_id == 0 {
                return Err(ClientError::bad("GetMembers", "cluster id is 0"));
            }
            // Follow the leader, as TiKV clients do; it is usually this
            // very address.
            let leader_urls = members.leader.map(|m| m.client_urls).unwrap_or_default();
            let leader = leader_urls
                .iter()
                .filter_map(|url| normalize_addr(url).ok())
                .next();
            match leader {
                Some(leader) if leader != addr => {
                    let channel = open_channel(&leader, options).await?;
                    Ok((channel, leader, cluster_id))
                }
                _ => Ok((channel, addr.clone(), cluster_id)),
            }
        };
        let (pd_channel, pd_addr, cluster_id) = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| ClientError::Timeout {
                what: "PD",
                addr: addr.clone(),
                after: limit,
            })??;
        Ok(Cluster {
            inner: Arc::new(Inner {
                pd_addr,
                pd_channel,
                cluster_id,
                options,
                tso: Mutex::new(None),
                stores: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The cluster id PD reported.
    pub fn cluster_id(&self) -> u64 {
        self.inner.cluster_id
    }

    /// The PD address in use (`host:port`).
    pub fn pd_addr(&self) -> &str {
        &self.inner.pd_addr
    }

    fn pd(&self) -> PdClient<Channel> {
        pd_client(self.inner.pd_channel.clone())
    }

    fn header(&self) -> Option<pdpb::RequestHeader> {
        Some(pdpb::RequestHeader {
            cluster_id: self.inner.cluster_id,
            ..Default::default()
        })
    }

    /// Runs one unary call with the call time limit.
    pub(crate) async fn call<T>(
        &self,
        method: &'static str,
        addr: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        let limit = self.inner.options.rpc_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ClientError::rpc(method, &status)),
            Err(_) => Err(ClientError::Timeout {
                what: method,
                addr: addr.to_owned(),
                after: limit,
            }),
        }
    }

    async fn pd_call<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        self.call(method, &self.inner.pd_addr, call).await
    }

    /// A fresh timestamp from the oracle (one Tso request with count 1).
    /// A broken stream is reopened once before giving up.
    pub async fn tso(&self) -> Result<TimeStamp> {
        let mut slot = self.inner.tso.lock().await;
        let mut last_error = None;
        for _ in 0..2 {
            if slot.is_none() {
                match self.open_tso().await {
                    Ok(stream) => *slot = Some(stream),
                    Err(e) => {
                        last_error = Some(e);
                        continue;
                    }
                }
            }
            let Some(stream) = slot.as_mut() else {
                continue;
            };
            match self.tso_once(stream).await {
                Ok(ts) => return Ok(ts),
                Err(e) => {
                    // The stream's state is unknown now; never reuse it.
                    *slot = None;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ClientError::bad("Tso", "no response")))
    }

    async fn open_tso(&self) -> Result<TsoStream> {
        let (requests, rx) = mpsc::channel(4);
        let mut pd = self.pd();
        let responses = self.pd_call("Tso", pd.tso(ReceiverStream::new(rx))).await?;
        Ok(TsoStream {
            requests,
            responses,
        })
    }

    async fn tso_once(&self, stream: &mut TsoStream) -> Result<TimeStamp> {
        let request = pdpb::TsoRequest {
            header: self.header(),
            count: 1,
            dc_location: String::new(),
        };
        let closed = || ClientError::bad("Tso", "the stream closed");
        stream.requests.send(request).await.map_err(|_| closed())?;
        let limit = self.inner.options.rpc_timeout;
        let response = tokio::time::timeout(limit, stream.responses.message())
            .await
            .map_err(|_| ClientError::Timeout {
                what: "Tso",
                addr: self.inner.pd_addr.clone(),
                after: limit,
            })?
            .map_err(|s| ClientError::rpc("Tso", &s))?
            .ok_or_else(closed)?;
        check_header("Tso", response.header.as_ref())?;
        if response.count != 1 {
            return Err(ClientError::bad(
                "Tso",
                format!("asked for 1 timestamp, got {}", response.count),
            ));
        }
        let ts = response
            .timestamp
            .ok_or_else(|| ClientError::bad("Tso", "no timestamp"))?;
        timestamp_from_proto(&ts)
    }

    /// PD's GC safe point: versions at or below it may be gone.
    pub async fn gc_safe_point(&self) -> Result<TimeStamp> {
        let mut pd = self.pd();
        let request = pdpb::GetGcSafePointRequest {
            header: self.header(),
        };
        let response = self
            .pd_call("GetGCSafePoint", pd.get_gc_safe_point(request))
            .await?;
        check_header("GetGCSafePoint", response.header.as_ref())?;
        Ok(TimeStamp::new(response.safe_point))
    }

    /// PD's `UpdateServiceGCSafePoint`: asks PD to keep every version above
    /// `safe_point` for `ttl_secs` on behalf of `service_id` (`ttl_secs <= 0`
    /// removes the service). PD refuses a safe point below the current
    /// minimum of all services; the answer says which, so the caller can
    /// tell (see [`ServiceSafePoint::held`]).
    pub async fn update_service_safe_point(
        &self,
        service_id: &str,
        ttl_secs: i64,
        safe_point: TimeStamp,
    ) -> Result<ServiceSafePoint> {
        let mut pd = self.pd();
        let request = pdpb::UpdateServiceGcSafePointRequest {
            header: self.header(),
            service_id: service_id.as_bytes().to_vec(),
            ttl: ttl_secs,
            safe_point: safe_point.into_inner(),
        };
        let response = self
            .pd_call(
                "UpdateServiceGCSafePoint",
                pd.update_service_gc_safe_point(request),
            )
            .await?;
        check_header("UpdateServiceGCSafePoint", response.header.as_ref())?;
        Ok(ServiceSafePoint {
            requested: safe_point,
            min_service: String::from_utf8_lossy(&response.service_id).into_owned(),
            min_safe_point: TimeStamp::new(response.min_safe_point),
        })
    }

    /// The region containing `region_key` (in PD's key space: see
    /// [`KeyMode::region_key`]).
    pub async fn region_for_key(&self, region_key: &[u8]) -> Result<RegionInfo> {
        let mut pd = self.pd();
        let request = pdpb::GetRegionRequest {
            header: self.header(),
            region_key: region_key.to_vec(),
            need_buckets: false,
        };
        let response = self.pd_call("GetRegion", pd.get_region(request)).await?;
        check_header("GetRegion", response.header.as_ref())?;
        let region = response
            .region
            .ok_or_else(|| ClientError::bad("GetRegion", "no region contains the key"))?;
        RegionInfo::from_proto("GetRegion", region, response.leader)
    }

    /// Regions overlapping `[start, end)` (PD's key space, empty `end` =
    /// unbounded), in key order (ScanRegions, repeated until the range is
    /// covered).
    pub async fn regions_in_range(&self, start: &[u8], end: &[u8]) -> Result<Vec<RegionInfo>> {
        let mut regions: Vec<RegionInfo> = Vec::new();
        let mut cursor = start.to_vec();
        loop {
            let mut pd = self.pd();
            let request = pdpb::ScanRegionsRequest {
                header: self.header(),
                start_key: cursor.clone(),
                limit: 0,
                end_key: end.to_vec(),
            };
            let response = self
                .pd_call("ScanRegions", pd.scan_regions(request))
                .await?;
            check_header("ScanRegions", response.header.as_ref())?;
            let batch = scanned_regions(response)?;
            let Some(last) = batch.last() else {
                return Ok(regions);
            };
            let next = last.end_key.clone();
            // Each round must move forward, or a confused PD would loop us.
            if !next.is_empty() && next <= cursor {
                return Err(ClientError::bad("ScanRegions", "regions do not advance"));
            }
            regions.extend(batch);
            if next.is_empty() || (!end.is_empty() && next.as_slice() >= end) {
                return Ok(regions);
            }
            cursor = next;
        }
    }

    /// The connection to store `id` (GetStore, then one channel, reused).
    pub async fn store(&self, id: u64) -> Result<Arc<StoreConn>> {
        let mut stores = self.inner.stores.lock().await;
        if let Some(store) = stores.get(&id) {
            return Ok(Arc::clone(store));
        }
        let mut pd = self.pd();
        let request = pdpb::GetStoreRequest {
            header: self.header(),
            store_id: id,
        };
        let response = self.pd_call("GetStore", pd.get_store(request)).await?;
        check_header("GetStore", response.header.as_ref())?;
        let store = response
            .store
            .ok_or_else(|| ClientError::bad("GetStore", format!("store {id} is missing")))?;
        let address = normalize_addr(&store.address)?;
        // kvfeed serves PD and KV on one address: share the channel.
        let channel = if address == self.inner.pd_addr {
            self.inner.pd_channel.clone()
        } else {
            open_channel(&address, self.inner.options).await?
        };
        let conn = Arc::new(StoreConn {
            id,
            address,
            channel,
        });
        stores.insert(id, Arc::clone(&conn));
        Ok(conn)
    }

    /// Forgets the connection to store `id`, so the next [`Cluster::store`]
    /// asks PD for its address again (after its stream was lost: the store
    /// may have moved).
    pub async fn forget_store(&self, id: u64) {
        self.inner.stores.lock().await.remove(&id);
    }

    /// Runs `op` against the region holding user key `key` of `mode`,
    /// asking PD again and retrying (bounded) after a retryable region
    /// error.
    pub async fn with_region<T>(
        &self,
        mode: KeyMode,
        key: &[u8],
        what: &'static str,
        mut op: impl AsyncFnMut(&RegionInfo, &StoreConn) -> Result<T>,
    ) -> Result<T> {
        let region_key = mode.region_key(key);
        let mut backoff = retry::Backoff::region();
        loop {
            let region = self.region_for_key(&region_key).await?;
            let store = self.store(region.leader.store_id).await?;
            match op(&region, &store).await {
                Err(ClientError::Region(e)) if e.is_retryable() => {
                    if !backoff.wait(e.retry_at_once()).await {
                        return Err(ClientError::RetriesExhausted {
                            what,
                            attempts: backoff.attempts(),
                            last: Box::new(ClientError::Region(e)),
                        });
                    }
                }
                other => return other,
            }
        }
    }
}

fn pd_client(channel: Channel) -> PdClient<Channel> {
    PdClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE)
}

/// The regions of a ScanRegions answer: the `regions` list when filled, else
/// the older parallel `region_metas` / `leaders` lists.
fn scanned_regions(response: pdpb::ScanRegionsResponse) -> Result<Vec<RegionInfo>> {
    if !response.regions.is_empty() {
        return response
            .regions
            .into_iter()
            .map(|r| {
                let meta = r
                    .region
                    .ok_or_else(|| ClientError::bad("ScanRegions", "entry without a region"))?;
                RegionInfo::from_proto("ScanRegions", meta, r.leader)
            })
            .collect();
    }
    let mut leaders = response.leaders.into_iter();
    response
        .region_metas
        .into_iter()
        .map(|meta| RegionInfo::from_proto("ScanRegions", meta, leaders.next()))
        .collect()
}

/// Checks a PD response header: present, and without an error.
fn check_header<'a>(
    method: &'static str,
    header: Option<&'a pdpb::ResponseHeader>,
) -> Result<&'a pdpb::ResponseHeader> {
    let header = header.ok_or_else(|| ClientError::bad(method, "no response header"))?;
    match &header.error {
        Some(e) if e.r#type != pdpb::ErrorType::Ok as i32 => Err(ClientError::Pd {
            method,
            message: format!("{}: {}", error_type_name(e.r#type), e.message),
        }),
        _ => Ok(header),
    }
}

fn error_type_name(code: i32) -> String {
    pdpb::ErrorType::try_from(code)
        .map(|t| t.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("error {code}"))
}

/// A wire timestamp as a [`TimeStamp`], refusing values that do not fit.
fn timestamp_from_proto(ts: &pdpb::Timestamp) -> Result<TimeStamp> {
    let physical = u64::try_from(ts.physical)
        .ok()
        .filter(|p| *p < 1 << (64 - kvfeed_types::timestamp::LOGICAL_BITS));
    let logical = u64::try_from(ts.logical).ok().filter(|l| *l <= MAX_LOGICAL);
    match (physical, logical) {
        (Some(p), Some(l)) => Ok(TimeStamp::compose(p, l)),
        _ => Err(ClientError::bad(
            "Tso",
            format!(
                "timestamp out of range (physical {}, logical {})",
                ts.physical, ts.logical
            ),
        )),
    }
}

/// `host:port` from an address given with or without `http://`. Other
/// schemes are refused (the client speaks plain HTTP/2), and so is a missing
/// port, which `http://` would otherwise silently turn into port 80.
pub fn normalize_addr(addr: &str) -> Result<String> {
    let invalid = |reason: &str| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = addr.trim();
    let rest = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    if rest.contains("://") {
        return Err(invalid("only plain http:// addresses are supported"));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(invalid("expected host:port"));
    };
    if host.is_empty() || host.contains('/') {
        return Err(invalid("expected host:port"));
    }
    if port.parse::<u16>().is_err() {
        return Err(invalid("the port must be a number from 0 to 65535"));
    }
    Ok(rest.to_owned())
}

/// Opens a channel to `addr` (`host:port`), connecting eagerly so that an
/// unreachable address fails here, within the connect timeout.
async fn open_channel(addr: &str, options: ConnectOptions) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ClientError::InvalidAddress {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_scheme() {
        assert_eq!(
            normalize_addr("127.0.0.1:20160").expect("plain"),
            "127.0.0.1:20160"
        );
        assert_eq!(
            normalize_addr("http://localhost:1/").expect("scheme"),
            "localhost:1"
        );
        assert_eq!(normalize_addr("[::1]:20160").expect("ipv6"), "[::1]:20160");
        for bad in [
            "localhost",
            "https://h:1",
            ":20160",
            "h:port",
            "h:70000",
            "",
            "h:1/x:2",
        ] {
            assert!(normalize_addr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timestamps_compose_and_out_of_range_is_refused() {
        let ok = pdpb::Timestamp {
            physical: 1_700_000_000_000,
            logical: 7,
            suffix_bits: 0,
        };
        assert_eq!(
            timestamp_from_proto(&ok).expect("valid"),
            TimeStamp::compose(1_700_000_000_000, 7)
        );
        for (physical, logical) in [(-1, 0), (1, -1), (1, 1 << 18), (i64::MAX, 0)] {
            let bad = pdpb::Timestamp {
                physical,
                logical,
                suffix_bits: 0,
            };
            assert!(timestamp_from_proto(&bad).is_err(), "{physical} {logical}");
        }
    }

    #[test]
    fn pd_header_errors_are_reported() {
        assert!(check_header("GetStore", None).is_err());
        let ok = pdpb::ResponseHeader {
            cluster_id: 9,
            error: Some(pdpb::Error {
                r#type: pdpb::ErrorType::Ok as i32,
                message: String::new(),
            }),
        };
        assert_eq!(
            check_header("GetStore", Some(&ok))
                .map(|h| h.cluster_id)
                .ok(),
            Some(9)
        );
        let failed = pdpb::ResponseHeader {
            cluster_id: 9,
            error: Some(pdpb::Error {
                r#type: pdpb::ErrorType::NotBootstrapped as i32,
                message: "not yet".into(),
            }),
        };
        let text = check_header("GetStore", Some(&failed))
            .expect_err("error header")
            .to_string();
        assert!(
            text.contains("NOT_BOOTSTRAPPED") && text.contains("not yet"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_prompt_error() {
        // Bind then drop a listener: the port is very likely closed now.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let err = Cluster::connect(&format!("127.0.0.1:{port}"))
            .await
            .err()
            .expect("nothing listens");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts TCP (the kernel backlog does) but never speaks HTTP/2.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let options = ConnectOptions {
            connect_timeout: Duration::from_millis(300),
            rpc_timeout: Duration::from_millis(300),
        };
        let err = Cluster::connect_with(&addr, options)
            .await
            .err()
            .expect("no answer");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        drop(listener);
    }
}
