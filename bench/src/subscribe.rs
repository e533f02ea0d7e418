//! The feed client side every benchmark shares: which subscriptions cover
//! a key range, opening an `EventFeed` stream on a connection of its own,
//! and taking a `ChangeDataEvent` apart.
//!
//! Why a TCP connection per stream: HTTP/2 flow control has a window per
//! connection as well as per stream. Streams sharing a connection would
//! share that window, so one consumer that stops reading would stall the
//! others, and the benchmark would measure the client library instead of
//! the server. (TiCDC keeps a connection per store; one consumer per
//! connection is the same thing here.)
//!
//! Subscriptions follow `kvfeed watch`: the range is split along PD's
//! regions, one Register per piece, each with its own request id, all on
//! one stream; the header announces a current TiCDC version so resolved
//! timestamps come batched in `ChangeDataEvent.resolved_ts`.

use std::time::Duration;

use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::event::Row;
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, ChangeDataRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use super::{BenchError, Server};
use kvfeed_client::feed::Registration;
use kvfeed_client::region::clip;
use kvfeed_client::{KeyMode, RegionInfo};

/// Bound on connecting one stream's TCP connection and opening the call.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Register requests queued ahead of the transport.
const REQUEST_QUEUE: usize = 64;

/// One subscription: a region, and the part of the range inside it.
#[derive(Debug, Clone)]
pub struct Sub {
    /// 1, 2, ... in region order: unique within the plan, so every
    /// subscription of one stream has its own.
    pub request_id: u64,
    /// The region as PD described it when the plan was made; a layout
    /// change since is reported by the server as `epoch_not_match`.
    pub region: RegionInfo,
    /// Inclusive start, in PD's key space (encoded for transactions).
    pub start: Vec<u8>,
    /// Exclusive end, in PD's key space; empty = unbounded.
    pub end: Vec<u8>,
}

/// The subscriptions that together cover one key range.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The cluster id PD reported, sent in every Register's header.
    pub cluster_id: u64,
    /// The key space subscribed (the Register's `kv_api`).
    pub mode: KeyMode,
    /// One per region overlapping the range, in key order; never empty.
    pub subs: Vec<Sub>,
}

impl Plan {
    /// Subscriptions for the user-key range `[start, end)` of `mode`.
    pub async fn new(
        server: &Server,
        mode: KeyMode,
        start: &[u8],
        end: &[u8],
    ) -> Result<Plan, BenchError> {
        let (start, end) = mode.region_range(start, end);
        let regions = server.cluster.regions_in_range(&start, &end).await?;
        let mut subs = Vec::new();
        for region in regions {
            if let Some((from, to)) = clip(&start, &end, &region.start_key, &region.end_key) {
                subs.push(Sub {
                    request_id: subs.len() as u64 + 1,
                    region,
                    start: from,
                    end: to,
                });
            }
        }
        if subs.is_empty() {
            return Err(BenchError::Feed(
                "no region covers the key range".to_owned(),
            ));
        }
        Ok(Plan {
            cluster_id: server.cluster.cluster_id(),
            mode,
            subs,
        })
    }

    /// The Register requests of every subscription, from `checkpoint`.
    pub fn registers(&self, checkpoint: u64) -> Vec<ChangeDataRequest> {
        self.subs
            .iter()
            .map(|sub| {
                Registration {
                    cluster_id: self.cluster_id,
                    request_id: sub.request_id,
                    region: &sub.region,
                    start: &sub.start,
                    end: &sub.end,
                    checkpoint_ts: checkpoint,
                    mode: self.mode,
                    old_value: false,
                }
                .request()
            })
            .collect()
    }
}

/// A new HTTP/2 connection to `addr` (see the module docs for why each
/// stream gets its own).
pub async fn connect(addr: &str) -> Result<Channel, BenchError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::Usage(format!("invalid address {addr:?}: {e}")))?
        .connect_timeout(OPEN_TIMEOUT)
        .tcp_nodelay(true);
    match tokio::time::timeout(OPEN_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(BenchError::Connect {
            addr: addr.to_owned(),
            reason: kvfeed_client::error::error_chain(&e),
        }),
        Err(_) => Err(BenchError::Connect {
            addr: addr.to_owned(),
            reason: format!("no connection within {OPEN_TIMEOUT:?}"),
        }),
    }
}

/// One `EventFeed` call: the request sender and the event stream.
pub struct FeedStream {
    /// Dropping it half-closes the request side.
    pub requests: mpsc::Sender<ChangeDataRequest>,
    /// What the server sends on the call.
    pub events: Streaming<ChangeDataEvent>,
}

impl FeedStream {
    /// Opens `EventFeed` on `channel`.
    pub async fn open(channel: Channel) -> Result<FeedStream, BenchError> {
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut client = ChangeDataClient::new(channel)
            .max_decoding_message_size(kvfeed_client::feed::MAX_EVENT_SIZE);
        let call = client.event_feed(ReceiverStream::new(rx));
        let events = match tokio::time::timeout(OPEN_TIMEOUT, call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                return Err(BenchError::Feed(format!(
                    "EventFeed failed: {} ({:?})",
                    status.message(),
                    status.code()
                )));
            }
            Err(_) => {
                return Err(BenchError::Feed(format!(
                    "EventFeed did not answer within {OPEN_TIMEOUT:?}"
                )));
            }
        };
        Ok(FeedStream { requests, events })
    }

    /// Queues `requests` on the call in order, waiting while the queue
    /// ahead of the transport is full; fails once the call is gone.
    pub async fn send_all(&self, requests: Vec<ChangeDataRequest>) -> Result<(), BenchError> {
        for request in requests {
            self.requests
                .send(request)
                .await
                .map_err(|_| BenchError::Feed("the request stream closed".to_owned()))?;
        }
        Ok(())
    }

    /// The next message: `Ok(None)` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<ChangeDataEvent>, BenchError> {
        self.events.message().await.map_err(|status| {
            BenchError::Feed(format!(
                "the event stream failed: {} ({:?})",
                status.message(),
                status.code()
            ))
        })
    }
}

/// The parts of a message, in order.
#[derive(Debug)]
pub enum Item {
    /// A row of any type (INITIALIZED, PREWRITE, COMMIT, ...), as sent.
    Row {
        /// The subscription it belongs to.
        request_id: u64,
        /// The row.
        row: Row,
    },
    /// A subscription's error; nothing more comes for it.
    Error {
        /// The subscription refused or ended.
        request_id: u64,
        /// The error as sent; [`describe`] puts it in words.
        error: cdcpb::Error,
    },
    /// A resolved ts (batched or per region).
    Resolved {
        /// The timestamp; which regions it covers is not kept.
        ts: u64,
    },
}

/// Calls `f` for every row, error and resolved ts of `event`.
pub fn for_each_item(event: ChangeDataEvent, mut f: impl FnMut(Item)) {
    use cdcpb::event::Event as E;
    for e in event.events {
        match e.event {
            Some(E::Entries(entries)) => {
                for row in entries.entries {
                    f(Item::Row {
                        request_id: e.request_id,
                        row,
                    });
                }
            }
            Some(E::Error(error)) => f(Item::Error {
                request_id: e.request_id,
                error,
            }),
            Some(E::ResolvedTs(ts)) => f(Item::Resolved { ts }),
            Some(E::Admin(_) | E::LongTxn(_)) | None => {}
        }
    }
    if let Some(resolved) = event.resolved_ts {
        f(Item::Resolved { ts: resolved.ts });
    }
}

/// A feed error in a few words.
pub fn describe(error: &cdcpb::Error) -> String {
    if error.congested.is_some() {
        "congested".to_owned()
    } else if error.epoch_not_match.is_some() {
        "epoch_not_match".to_owned()
    } else if error.region_not_found.is_some() {
        "region_not_found".to_owned()
    } else if error.not_leader.is_some() {
        "not_leader".to_owned()
    } else if let Some(busy) = &error.server_is_busy {
        format!("server_is_busy: {}", busy.reason)
    } else if error.duplicate_request.is_some() {
        "duplicate_request".to_owned()
    } else if error.cluster_id_mismatch.is_some() {
        "cluster_id_mismatch".to_owned()
    } else if let Some(c) = &error.compatibility {
        format!("compatibility: requires {}", c.required_version)
    } else {
        "an unknown error".to_owned()
    }
}
