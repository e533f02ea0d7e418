//! A client connection's lifecycle: register → first request fixes the
//! protocol version → request loop → deregistration in a guard's `Drop`.
//!
//! # Why no path leaks a registry entry
//!
//! A connection's registry entry (its subscriptions, region-index entries,
//! event channel and accounted bytes) is created and removed only by the
//! owner task, and removal is a single function that drops all of it. The
//! question is only whether the owner is always *told*. It is:
//!
//! 1. `Feed::connect` queues `Connect` on the control channel and then, with
//!    no await and nothing fallible in between, builds the [`ConnGuard`].
//!    Either the message was never queued (connect returned an error and
//!    there is nothing to clean) or a guard exists.
//! 2. The guard's `Drop` queues `Deregister` on the same channel. `Drop`
//!    runs on every way out of the code holding the [`Connection`]: return,
//!    `?`, the task's future being dropped (cancellation, abort), and
//!    unwinding from a panic. The channel is unbounded, so this send neither
//!    blocks nor fails while the owner lives; if the owner is gone, so is
//!    the registry. Nothing depends on code running "after an await".
//! 3. The control channel is FIFO and `Deregister` is sent after `Connect`,
//!    so the owner always sees them in that order.
//! 4. The owner may end a connection on its own (the client stopped
//!    reading, congestion it cannot report, shutdown) through the same
//!    removal function. The guard's message then names an unknown id and is
//!    ignored; ids are never reused, so it cannot hit another connection.
//!    Requests still queued for a removed connection are ignored the same
//!    way.
//! 5. Dropping the [`EventStream`] closes its queue and frees what it held
//!    (module `queue`), so the bytes are uncharged at once and the owner's
//!    next send sees the closed queue and removes the connection
//!    ("send_failed").
//!
//! # Reasons
//!
//! Each end is counted by [`CloseReason`]. Code paths set the reason as they
//! decide to end (half close, stream error, bad request); `Drop` overrides
//! it with `panic` while unwinding and uses `dropped` when none was set,
//! which is what cancellation looks like.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot, watch};

use kvfeed_proto::cdcpb::{ChangeDataEvent, ChangeDataRequest, change_data_request};

use crate::error::FeedError;
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::FeedMetrics;
use crate::owner::{Command, Control};
use crate::protocol::{Features, ProtocolVersion};
use crate::queue::{QueueRx, Queued, TryRecv};

/// Why a connection ended; the label of `kvfeed_cdc_aborted_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client half-closed its request stream; queued events were
    /// flushed and the event stream ended cleanly.
    HalfClose,
    /// The transport reported an error on the request stream.
    StreamError,
    /// A request the feed refuses to serve (e.g. NotifyTxnStatus).
    BadRequest,
    /// The event stream was gone when the feed sent to it.
    SendFailed,
    /// The event stream stayed full even for the congestion notice.
    Congested,
    /// The feed shut down.
    Shutdown,
    /// The code holding the connection panicked.
    Panic,
    /// The connection was dropped without a reason (e.g. its task was
    /// cancelled).
    Dropped,
}

impl CloseReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HalfClose => "half_close",
            CloseReason::StreamError => "stream_error",
            CloseReason::BadRequest => "bad_request",
            CloseReason::SendFailed => "send_failed",
            CloseReason::Congested => "congested",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Panic => "panic",
            CloseReason::Dropped => "dropped",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is connecting.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address, for logs and the debug page.
    pub peer: String,
    /// Features from the `features` metadata ([`Features::parse`]).
    pub features: Features,
    /// The store whose address the client connected to: only regions that
    /// store leads can be subscribed on the connection.
    pub store_id: u64,
}

/// Sends the connection's deregistration when dropped; see the module docs.
#[derive(Debug)]
pub struct ConnGuard {
    id: ConnId,
    control: mpsc::UnboundedSender<Control>,
    reason: Option<CloseReason>,
}

impl ConnGuard {
    pub(crate) fn new(id: ConnId, control: mpsc::UnboundedSender<Control>) -> ConnGuard {
        ConnGuard {
            id,
            control,
            reason: None,
        }
    }

    /// Records why the connection is ending (the last call wins).
    pub fn set_reason(&mut self, reason: CloseReason) {
        self.reason = Some(reason);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() {
            CloseReason::Panic
        } else {
            self.reason.unwrap_or(CloseReason::Dropped)
        };
        // Fails only when the owner is gone, and with it the registry.
        let _ = self.control.send(Control::Deregister {
            conn: self.id,
            reason,
        });
    }
}

/// How [`Connection::serve`] ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// The client half-closed; queued events were flushed.
    HalfClosed,
    /// The feed ended the connection (stream gone, congestion, shutdown).
    EndedByFeed,
}

/// A stream of client requests, as the transport delivers them.
pub trait RequestSource: Send {
    /// The transport's error, kept as the source of
    /// [`FeedError::RequestStream`].
    type Error: fmt::Display + Send + Into<Box<dyn std::error::Error + Send + Sync>>;

    /// The next request; `None` when the client half-closed.
    fn next_request(
        &mut self,
    ) -> impl Future<Output = Option<Result<ChangeDataRequest, Self::Error>>> + Send;
}

impl<E> RequestSource for mpsc::Receiver<Result<ChangeDataRequest, E>>
where
    E: fmt::Display + Send + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = E;

    fn next_request(
        &mut self,
    ) -> impl Future<Output = Option<Result<ChangeDataRequest, E>>> + Send {
        self.recv()
    }
}

/// The request side of one client stream. Dropping it deregisters the
/// connection.
#[derive(Debug)]
pub struct Connection {
    id: ConnId,
    guard: ConnGuard,
    commands: mpsc::Sender<Command>,
    version: Option<ProtocolVersion>,
    features: Features,
    /// Its sender lives in the registry entry: when the entry goes, this
    /// reports the channel closed.
    ended: watch::Receiver<()>,
    span: tracing::Span,
}

impl Connection {
    pub(crate) fn new(
        guard: ConnGuard,
        commands: mpsc::Sender<Command>,
        features: Features,
        ended: watch::Receiver<()>,
        span: tracing::Span,
    ) -> Connection {
        Connection {
            id: guard.id,
            guard,
            commands,
            version: None,
            features,
            ended,
            span,
        }
    }

    /// The id the registry gave this connection.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The optional protocol features the client announced when it connected.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The version fixed by the first request, if one was handled.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// Records why the connection is ending; see [`CloseReason`].
    pub fn set_reason(&mut self, reason: CloseReason) {
        self.guard.set_reason(reason);
    }

    /// Whether the feed has ended this connection.
    pub fn is_ended(&self) -> bool {
        self.ended.has_changed().is_err()
    }

    /// Resolves once the feed has ended this connection.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.ended.clone();
        async move { while ended.changed().await.is_ok() {} }
    }

    /// Handles one client request. The first request fixes the protocol
    /// version. Register (or no request kind) and Deregister are queued for
    /// the owner, waiting while its queue is full; their outcome arrives on
    /// the event stream. NotifyTxnStatus is [`FeedError::Unsupported`] (the
    /// reason is set to `bad_request`; end the connection).
    pub async fn handle(&mut self, req: ChangeDataRequest) -> Result<(), FeedError> {
        let version = *self
            .version
            .get_or_insert_with(|| ProtocolVersion::of_request(&req));
        if self.commands.is_closed() {
            return Err(FeedError::ShuttingDown);
        }
        if self.is_ended() {
            return Err(FeedError::ConnectionEnded(self.id));
        }
        let command = match &req.request {
            None | Some(change_data_request::Request::Register(_)) => Command::Register {
                conn: self.id,
                version,
                request: Box::new(req),
            },
            Some(change_data_request::Request::Deregister(_)) => Command::Deregister {
                conn: self.id,
                version,
                request_id: RequestId(req.request_id),
                region_id: (req.region_id != 0).then_some(RegionId(req.region_id)),
            },
            Some(change_data_request::Request::NotifyTxnStatus(_)) => {
                self.set_reason(CloseReason::BadRequest);
                return Err(FeedError::Unsupported(
                    "NotifyTxnStatus is not implemented".to_owned(),
                ));
            }
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| FeedError::ShuttingDown)
    }

    /// Ends the connection after the client half-closed: every request
    /// handled so far is processed and its events are queued (a Register's
    /// catch-up scan included, so this waits for running scans), then the
    /// event stream ends (after yielding what is queued).
    pub async fn close(mut self) -> Result<(), FeedError> {
        let (done, acked) = oneshot::channel();
        let closed = async {
            self.commands
                .send(Command::Close {
                    conn: self.id,
                    done,
                })
                .await
                .map_err(|_| FeedError::ShuttingDown)?;
            acked.await.map_err(|_| FeedError::ShuttingDown)
        }
        .await;
        match closed {
            Ok(()) => self.set_reason(CloseReason::HalfClose),
            Err(_) => self.set_reason(CloseReason::Shutdown),
        }
        closed
    }

    /// Runs the request loop over `requests` until the client half-closes,
    /// the stream fails, a request is refused, or the feed ends the
    /// connection. Sets the close reason on every path. Errors are for the
    /// server to turn into a stream status ([`FeedError::Unsupported`] →
    /// UNIMPLEMENTED).
    pub async fn serve<S: RequestSource>(
        mut self,
        requests: &mut S,
    ) -> Result<ServeEnd, FeedError> {
        let ended = self.ended();
        tokio::pin!(ended);
        loop {
            let next = tokio::select! {
                next = requests.next_request() => next,
                () = &mut ended => return Ok(ServeEnd::EndedByFeed),
            };
            match next {
                None => return self.close().await.map(|()| ServeEnd::HalfClosed),
                Some(Err(e)) => {
                    self.set_reason(CloseReason::StreamError);
                    tracing::info!(parent: &self.span, error = %e, "request stream failed");
                    return Err(FeedError::RequestStream(e.into()));
                }
                Some(Ok(req)) => match self.handle(req).await {
                    Ok(()) => {}
                    Err(FeedError::ConnectionEnded(_)) => return Ok(ServeEnd::EndedByFeed),
                    Err(e) => {
                        let reason = match e {
                            FeedError::ShuttingDown => CloseReason::Shutdown,
                            _ => CloseReason::BadRequest,
                        };
                        self.set_reason(reason);
                        tracing::info!(parent: &self.span, error = %e, "request refused");
                        return Err(e);
                    }
                },
            }
        }
    }
}

/// What [`EventStream::try_next`] found.
#[derive(Debug)]
pub enum TryNext {
    /// An event was queued; it is now taken.
    Event(ChangeDataEvent),
    /// Nothing queued right now.
    Empty,
    /// The connection ended and everything queued was taken.
    Ended,
}

/// The outbound side of one client stream: the events the feed queued for
/// it, in order. It ends (`None`) once the connection is over and every
/// queued event has been taken.
#[derive(Debug)]
pub struct EventStream {
    id: ConnId,
    rx: QueueRx,
    metrics: FeedMetrics,
}

impl EventStream {
    pub(crate) fn new(id: ConnId, rx: QueueRx, metrics: FeedMetrics) -> EventStream {
        EventStream { id, rx, metrics }
    }

    /// The connection whose events this stream carries.
    pub fn conn_id(&self) -> ConnId {
        self.id
    }

    /// The next event; `None` once the connection has ended and the queue
    /// is empty.
    pub async fn next(&mut self) -> Option<ChangeDataEvent> {
        let queued = self.rx.recv().await?;
        Some(self.take(queued))
    }

    /// Poll form of [`EventStream::next`], for wrapping in a `Stream`.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<ChangeDataEvent>> {
        self.rx
            .poll_recv(cx)
            .map(|queued| queued.map(|q| self.take(q)))
    }

    /// Takes an event if one is queued, without waiting.
    pub fn try_next(&mut self) -> TryNext {
        match self.rx.try_recv() {
            TryRecv::Item(queued) => TryNext::Event(self.take(queued)),
            TryRecv::Empty => TryNext::Empty,
            TryRecv::Ended => TryNext::Ended,
        }
    }

    /// The queue uncharged the bytes when it gave the message up.
    fn take(&self, queued: Queued) -> ChangeDataEvent {
        self.metrics.events_sent.inc();
        self.metrics.sent_bytes.inc_by(queued.bytes as u64);
        queued.event
    }
}
