//! The `cdcpb.ChangeData` gRPC service: a translation layer between tonic's
//! streams and the change feed ([`kvfeed_cdc`]), which owns all semantics.
//!
//! Per call (`EventFeed` or `EventFeedV2`):
//! 1. V2 only: the `features` metadata is parsed first; an unknown feature
//!    ends the call with UNIMPLEMENTED naming it, before anything is
//!    registered.
//! 2. `Feed::connect` registers the connection and hands back its two
//!    halves: the [`Connection`] (requests in) and the [`EventStream`]
//!    (events out).
//! 3. One task per call owns the `Connection` (and a [`TaskGuard`] counting
//!    it) and runs [`Connection::serve`] over the client's request stream.
//!    The response stream ([`FeedStream`]) owns the `EventStream`.
//!
//! # Why neither half can outlive the call
//!
//! The connection's registry entry is released by the cdc crate's guard
//! when the `Connection` is dropped, so all that matters is that the task
//! ends on every path:
//! - the client half-closes, the request stream fails, a request is
//!   refused: `serve` returns;
//! - the feed ends the connection (congestion, a closed event channel,
//!   shutdown): `serve` sees `Connection::ended` and returns;
//! - the client vanishes: tonic drops the response stream. The feed alone
//!   would notice only at its next send, which may never come for an idle
//!   connection, so [`FeedStream`] holds the sending half of a oneshot
//!   whose receiver sits in the task's request source: dropping the
//!   response stream makes the next `next_request` an error, which ends
//!   `serve` (reason `stream_error`) at once. (The request stream usually
//!   fails too when the client goes; nothing relies on it.) If `serve` is
//!   not waiting for a request at that moment — after a half-close it
//!   flushes, waiting for the connection's catch-up scans — the task drops
//!   the `serve` future instead (`run_connection`); the guard inside the
//!   dropped connection deregisters it.
//!
//! # How a call ends
//!
//! The response stream yields every event the feed queued, then the
//! outcome the task reports: an error status for a refused request
//! (NotifyTxnStatus → UNIMPLEMENTED), otherwise a clean end (OK). The event
//! stream always ends before the outcome is read, and it ends only once the
//! connection has left the registry, so a refused request can never be
//! reported as a clean end.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kvfeed_cdc::{
    ConnInfo, Connection, EventStream, Features, FeedError, RequestSource, ServeEnd, TaskGuard,
};
use kvfeed_proto::cdcpb::change_data_server::{ChangeData, ChangeDataServer};
use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::faults::{Outgoing, RequestHook, ResponseHook};
use crate::node::Node;

/// The metadata key listing the features an `EventFeedV2` client wants.
pub const FEATURES_METADATA: &str = "features";

/// Largest `ChangeDataRequest` accepted. Requests are small (two keys and a
/// header); this only has to clear the largest key pair with room to spare.
pub const MAX_REQUEST_SIZE: usize = 8 * 1024 * 1024;

/// Largest `ChangeDataEvent` sent. The feed packs messages to
/// [`kvfeed_cdc::CHANGE_DATA_EVENT_MAX_BYTES`] (6 MiB), but one row travels
/// alone even when larger, and a row can carry an 8 MiB value, an 8 MiB old
/// value and an 8 KiB key. Refusing to encode it would fail the whole
/// stream, so the cap sits above the largest possible row.
pub const MAX_EVENT_SIZE: usize = 32 * 1024 * 1024;

/// The service of store `store_id`, ready to be added to the router, with
/// its size limits.
pub fn service(node: &Arc<Node>, store_id: u64) -> ChangeDataServer<FeedService> {
    ChangeDataServer::new(FeedService {
        node: Arc::clone(node),
        store_id,
    })
    .max_decoding_message_size(MAX_REQUEST_SIZE)
    .max_encoding_message_size(MAX_EVENT_SIZE)
}

/// Serves `cdcpb.ChangeData` from the node's feed, as one store: only the
/// regions it leads can be subscribed through it.
pub struct FeedService {
    node: Arc<Node>,
    store_id: u64,
}

#[tonic::async_trait]
impl ChangeData for FeedService {
    type EventFeedStream = FeedStream;
    type EventFeedV2Stream = FeedStream;

    async fn event_feed(
        &self,
        request: Request<Streaming<ChangeDataRequest>>,
    ) -> Result<Response<FeedStream>, Status> {
        self.open(request, Features::default())
    }

    async fn event_feed_v2(
        &self,
        request: Request<Streaming<ChangeDataRequest>>,
    ) -> Result<Response<FeedStream>, Status> {
        let features = requested_features(&request)?;
        self.open(request, features)
    }
}

impl FeedService {
    /// Connects to the feed and starts the call's task (see the module docs).
    fn open(
        &self,
        request: Request<Streaming<ChangeDataRequest>>,
        features: Features,
    ) -> Result<Response<FeedStream>, Status> {
        let feed = self
            .node
            .feed()
            .ok_or_else(|| Status::unavailable("the change feed is not running"))?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
        let (connection, events) = feed
            .connect(ConnInfo {
                peer: peer.clone(),
                features,
                store_id: self.store_id,
            })
            .map_err(|err| match err {
                FeedError::ShuttingDown => Status::unavailable("the server is shutting down"),
                other => Status::internal(other.to_string()),
            })?;
        let span = tracing::info_span!("feed_call", conn_id = connection.id().0, %peer);
        let (gone_tx, gone_rx) = oneshot::channel();
        let (abandoned_tx, abandoned_rx) = oneshot::channel();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        let (hook, response_hook) = self.node.feed_faults().call();
        let requests = Requests {
            stream: request.into_inner(),
            gone: Some(gone_rx),
            failure: None,
            hook,
        };
        tokio::spawn(
            run_connection(
                connection,
                requests,
                feed.task_guard(),
                abandoned_rx,
                outcome_tx,
            )
            .instrument(span),
        );
        Ok(Response::new(FeedStream {
            events,
            events_ended: false,
            hook: response_hook,
            dropped: false,
            outcome: Some(outcome_rx),
            _gone: gone_tx,
            _abandoned: abandoned_tx,
        }))
    }
}

/// The features a V2 call asks for. Several `features` entries are read as
/// one comma list.
fn requested_features<T>(request: &Request<T>) -> Result<Features, Status> {
    let mut list = String::new();
    for value in request.metadata().get_all(FEATURES_METADATA) {
        let text = value.to_str().map_err(|_| {
            Status::invalid_argument("the features metadata is not printable ASCII")
        })?;
        list.push_str(text);
        list.push(',');
    }
    Features::parse(&list).map_err(|err| match err {
        FeedError::UnknownFeature(name) => {
            Status::unimplemented(format!("feature {name:?} is not supported"))
        }
        other => Status::invalid_argument(other.to_string()),
    })
}

/// The call's task: runs the request loop and reports how the call ends.
///
/// `abandoned` resolves when the response stream is dropped. The request
/// source already ends `serve` then, but only while `serve` is waiting for a
/// request: after a half-close, `serve` flushes (it waits for the
/// connection's catch-up scans), and a flush towards a client that is gone
/// may never finish. Racing the whole of `serve` against `abandoned` drops
/// the `serve` future — and with it the connection, whose guard deregisters
/// it — on that path too, so the task can never outlive its call.
async fn run_connection(
    connection: Connection,
    mut requests: Requests,
    task: TaskGuard,
    abandoned: oneshot::Receiver<()>,
    outcome: oneshot::Sender<Option<Status>>,
) {
    // Counted for exactly as long as this task holds the connection.
    let _task = task;
    tracing::debug!(features = ?connection.features().names(), "feed call started");
    let served = tokio::select! {
        served = connection.serve(&mut requests) => served,
        _ = abandoned => {
            tracing::debug!("response stream dropped while serving; connection released");
            return;
        }
    };
    let status = match served {
        Ok(ServeEnd::HalfClosed) => {
            tracing::debug!("client half-closed");
            None
        }
        Ok(ServeEnd::EndedByFeed) => {
            tracing::debug!("ended by the feed");
            None
        }
        Err(FeedError::Unsupported(what)) => Some(Status::unimplemented(what)),
        // A request that did not decode (too large, malformed) is the
        // client's to hear about; a reset stream or a dropped response
        // stream has nobody left to tell.
        Err(FeedError::RequestStream(_)) => requests.failure.take(),
        Err(FeedError::ShuttingDown | FeedError::ConnectionEnded(_)) => None,
        Err(other) => Some(Status::internal(other.to_string())),
    };
    // The response stream may already be gone; then nobody is waiting.
    let _ = outcome.send(status);
}

/// Why the request side of a call ended abnormally.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// tonic reported an error on the request stream.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Transport(#[source] Status),
    /// The response stream was dropped: the client is gone.
    #[error("the response stream was dropped")]
    ResponseDropped,
}

/// The client's request stream, cut short when the response stream goes.
struct Requests {
    stream: Streaming<ChangeDataRequest>,
    /// Resolves (with an error) when [`FeedStream`] is dropped. `None` once
    /// it has resolved: a oneshot receiver must not be polled again.
    gone: Option<oneshot::Receiver<()>>,
    /// The transport's error, kept to end the response stream with.
    failure: Option<Status>,
    /// Test-only fault injection (inert unless enabled).
    hook: RequestHook,
}

impl RequestSource for Requests {
    type Error = RequestError;

    async fn next_request(&mut self) -> Option<Result<ChangeDataRequest, RequestError>> {
        loop {
            let Some(gone) = self.gone.as_mut() else {
                return Some(Err(RequestError::ResponseDropped));
            };
            if let Some(request) = self.hook.next_injected() {
                return Some(Ok(request));
            }
            return tokio::select! {
                // The response stream first: once it is gone, requests
                // still buffered have nobody to answer.
                biased;
                _ = gone => {
                    self.gone = None;
                    Some(Err(RequestError::ResponseDropped))
                }
                () = self.hook.injection() => continue,
                next = self.stream.message() => match next {
                    Ok(Some(request)) => {
                        self.hook.saw(&request);
                        Some(Ok(request))
                    }
                    Ok(None) => None,
                    Err(status) => {
                        self.failure = Some(status.clone());
                        Some(Err(RequestError::Transport(status)))
                    }
                },
            };
        }
    }
}

/// The response stream of one call: the feed's events, then the outcome.
pub struct FeedStream {
    events: EventStream,
    events_ended: bool,
    /// Test-only fault injection (inert unless enabled).
    hook: ResponseHook,
    /// An injected drop ended the stream.
    dropped: bool,
    /// `None` once read.
    outcome: Option<oneshot::Receiver<Option<Status>>>,
    /// Dropped with the stream, which tells the call's task the client is
    /// gone (see [`Requests`]).
    _gone: oneshot::Sender<()>,
    /// Dropped with the stream too; ends the task wherever `serve` is
    /// waiting (see [`run_connection`]).
    _abandoned: oneshot::Sender<()>,
}

impl fmt::Debug for FeedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedStream")
            .field("conn_id", &self.events.conn_id())
            .field("events_ended", &self.events_ended)
            .finish_non_exhaustive()
    }
}

impl Stream for FeedStream {
    type Item = Result<ChangeDataEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin, so the stream is too.
        let this = self.get_mut();
        match this.hook.poll_injected(cx) {
            Some(Outgoing::Event(event)) => return Poll::Ready(Some(Ok(event))),
            Some(Outgoing::Drop) => {
                this.dropped = true;
                return Poll::Ready(Some(Err(Status::unavailable(
                    "injected fault: the stream was dropped",
                ))));
            }
            None if this.dropped => return Poll::Ready(None),
            None => {}
        }
        while !this.events_ended {
            match this.events.poll_next(cx) {
                Poll::Ready(Some(event)) => {
                    if let Some(event) = this.hook.filter(event) {
                        return Poll::Ready(Some(Ok(event)));
                    }
                }
                Poll::Ready(None) => this.events_ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let Some(outcome) = this.outcome.as_mut() else {
            return Poll::Ready(None);
        };
        // The event stream has ended, so the connection has left the
        // registry: either `serve` returned (its guard went with the
        // connection) or the feed ended it, which `serve` notices at once.
        // Either way the task's outcome is on its way (or the task died
        // without one).
        let result = match Pin::new(outcome).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result,
        };
        this.outcome = None;
        match result {
            Ok(Some(status)) => Poll::Ready(Some(Err(status))),
            Ok(None) => Poll::Ready(None),
            Err(_) => Poll::Ready(Some(Err(Status::internal(
                "the feed connection task ended without an outcome",
            )))),
        }
    }
}
