//! The etcd side of the comparison (`--target etcd://HOST:PORT`, feature
//! `etcd`): etcd's `KV.Put` and `Watch` spoken with kvfeed's own client
//! stubs ([`kvfeed_proto::etcdserverpb`]).
//!
//! How the benchmarks' notions map onto etcd, and why:
//! - a put is one `KV.Put`. etcd acknowledges it once the raft log entry
//!   holding it is fsynced, and raft batches concurrent proposals into one
//!   fsync: the same durability as kvfeed's `sync-on-commit` with its
//!   commit groups, so the two are compared like for like;
//! - a watcher is one TCP connection carrying one `Watch` call with one
//!   watch of `[prefix, prefix_end)` from the next revision. It is ready
//!   when etcd answers `created`: etcd registers the watch before it
//!   answers, so every later put reaches it (the analog of INITIALIZED).
//!   Its values are counted by the same code as kvfeed's rows
//!   ([`Seen::record`]);
//! - etcd has no resolved timestamp, so the lag figures are n/a;
//! - the server's memory and CPU are etcd's own
//!   `process_resident_memory_bytes` and `process_cpu_seconds_total`, from
//!   `/metrics` on its client URL, as kvfeed's come from its status server;
//! - that watches are released is checked with etcd's gauges
//!   `etcd_debugging_mvcc_watch_stream_total` (Watch streams) and
//!   `etcd_debugging_mvcc_watcher_total` (watches), and with the `Watch`
//!   calls still open (gRPC calls started minus calls handled).
//!
//! etcd (3.4 at least) keeps a `Watch` call open after the client
//! half-closes it: it stops reading requests but ends the call only when
//! the client cancels it, which is how etcd's own clients end watches. The
//! churn stage `half_close` therefore waits [`HALF_CLOSE_GRACE`] for the
//! end and then drops the call, counting it as left open.
//!
//! etcd is a grpc-go server: it sends a call's response headers only with
//! its first message. So a `Watch` call is opened with its create request
//! already queued, and waiting for the call to open means waiting for
//! etcd's first answer; a call that is to be abandoned before any answer
//! ([`abandon`]) is dropped once its request side is being sent, which
//! puts its HTTP/2 headers on the wire ahead of the reset.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use kvfeed_proto::etcdserverpb::kv_client::KvClient;
use kvfeed_proto::etcdserverpb::watch_client::WatchClient;
use kvfeed_proto::etcdserverpb::watch_request::RequestUnion;
use kvfeed_proto::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use kvfeed_proto::mvccpb::event::EventType;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use super::churn::{Ended, Stage};
use super::load::{PUT_TIMEOUT, prefix_end, preload_key, unix_nanos};
use super::scrape::{Scrape, scrape};
use super::subscribe::{OPEN_TIMEOUT, connect};
use super::watcher::{INIT_TIMEOUT, Seen};
use super::{BenchError, check_loopback};
use kvfeed_client::ClientError;

/// etcd's gauge of open Watch streams.
pub const WATCH_STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
/// etcd's gauge of watches (one per watched range per stream).
pub const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
/// The label of etcd's Watch service in its gRPC call counters.
const WATCH_SERVICE: &str = "grpc_service=\"etcdserverpb.Watch\"";
/// Largest watch response accepted: etcd sends all events of a revision
/// range in one response unless asked to fragment.
const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// Puts in flight while preloading.
const PRELOAD_PARALLEL: usize = 16;
/// Watch requests queued ahead of the transport (one create, at most).
const REQUEST_QUEUE: usize = 4;
/// How long a half-closed churn call may take to be ended by etcd before
/// the client drops it.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// A connection to the etcd under test.
#[derive(Debug, Clone)]
pub struct Etcd {
    addr: String,
    channel: Channel,
}

impl Etcd {
    /// Connects to the client URL `addr` (`HOST:PORT`), refusing a remote
    /// one unless allowed; reads `/metrics` there first, so a wrong
    /// address fails at once with a clear message.
    pub async fn connect(addr: &str, allow_remote: bool) -> Result<Etcd, BenchError> {
        check_loopback(addr, allow_remote)?;
        scrape(addr).await?;
        let channel = connect(addr).await?;
        Ok(Etcd {
            addr: addr.to_owned(),
            channel,
        })
    }

    /// The client URL's `HOST:PORT` (gRPC and `/metrics`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The writers' client: every writer shares this connection.
    pub fn writer(&self) -> EtcdWriter {
        EtcdWriter {
            kv: KvClient::new(self.channel.clone()),
        }
    }

    /// Puts `count` keys `prefix + {i:010}` with values of `value_size`
    /// bytes, a few at a time; returns the revision of the first (0 when
    /// `count` is 0), from which a watch replays them all.
    pub async fn preload(
        &self,
        prefix: &[u8],
        count: u64,
        value_size: usize,
    ) -> Result<i64, BenchError> {
        let writer = self.writer();
        let mut first = None::<i64>;
        let mut puts = JoinSet::new();
        let mut next = 0u64;
        while next < count || !puts.is_empty() {
            while next < count && puts.len() < PRELOAD_PARALLEL {
                let (writer, key) = (writer.clone(), preload_key(prefix, next));
                let value = vec![b'v'; value_size];
                puts.spawn(async move {
                    tokio::time::timeout(PUT_TIMEOUT, writer.put(key, value))
                        .await
                        .map_err(|_| {
                            BenchError::Feed(format!("a put took longer than {PUT_TIMEOUT:?}"))
                        })?
                });
                next += 1;
            }
            if let Some(done) = puts.join_next().await {
                let revision =
                    done.map_err(|e| BenchError::Feed(format!("a preload task failed: {e}")))??;
                first = Some(first.map_or(revision, |f| f.min(revision)));
            }
        }
        Ok(first.unwrap_or(0))
    }
}

/// Sends `KV.Put`s.
#[derive(Debug, Clone)]
pub struct EtcdWriter {
    kv: KvClient<Channel>,
}

impl EtcdWriter {
    /// One Put; returns the revision it created.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<i64, BenchError> {
        let response = self
            .kv
            .clone()
            .put(PutRequest { key, value })
            .await
            .map_err(|s| ClientError::rpc("Put", &s))?
            .into_inner();
        Ok(response.header.map_or(0, |h| h.revision))
    }
}

/// A create request for one watch of every key under `prefix`, from
/// `start_revision` (0: from the next revision).
pub fn create_request(prefix: &[u8], start_revision: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
            start_revision,
            ..WatchCreateRequest::default()
        })),
    }
}

/// One `Watch` call.
pub struct WatchStream {
    /// Dropping it half-closes the call.
    pub requests: mpsc::Sender<WatchRequest>,
    /// etcd's answers: the creation, then events and progress.
    pub responses: Streaming<WatchResponse>,
}

impl WatchStream {
    /// Opens a `Watch` call on `channel` with `create` as its first
    /// request; returns once etcd answered (see the module docs), bounded
    /// by [`OPEN_TIMEOUT`].
    pub async fn open(channel: Channel, create: WatchRequest) -> Result<WatchStream, BenchError> {
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        requests
            .send(create)
            .await
            .map_err(|_| BenchError::Feed("the request stream closed".to_owned()))?;
        let mut client = WatchClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
        let call = client.watch(ReceiverStream::new(rx));
        let responses = match tokio::time::timeout(OPEN_TIMEOUT, call).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Err(ClientError::rpc("Watch", &status).into()),
            Err(_) => {
                return Err(BenchError::Feed(format!(
                    "etcd did not answer Watch within {OPEN_TIMEOUT:?}"
                )));
            }
        };
        Ok(WatchStream {
            requests,
            responses,
        })
    }

    /// The next response: `Ok(None)` when etcd ended the call.
    pub async fn next(&mut self) -> Result<Option<WatchResponse>, BenchError> {
        self.responses
            .message()
            .await
            .map_err(|s| ClientError::rpc("Watch", &s).into())
    }

    /// Reads until etcd has answered the create request and sent `events`
    /// events after it, bounded by [`INIT_TIMEOUT`].
    pub async fn until_caught_up(&mut self, events: u64) -> Result<(), BenchError> {
        let reading = async {
            let (mut created, mut received) = (false, 0u64);
            while !created || received < events {
                let Some(response) = self.next().await? else {
                    return Err(BenchError::Feed(
                        "etcd ended the Watch call before the watch was ready".to_owned(),
                    ));
                };
                if let Some(why) = canceled(&response) {
                    return Err(BenchError::Feed(format!("etcd refused the watch: {why}")));
                }
                created |= response.created;
                received += response.events.len() as u64;
            }
            Ok(())
        };
        tokio::time::timeout(INIT_TIMEOUT, reading)
            .await
            .map_err(|_| {
                BenchError::Feed(format!("the watch was not ready within {INIT_TIMEOUT:?}"))
            })?
    }
}

/// Why etcd ended a watch, if `response` says it did.
fn canceled(response: &WatchResponse) -> Option<String> {
    if !response.canceled {
        return None;
    }
    Some(if !response.cancel_reason.is_empty() {
        format!("canceled: {}", response.cancel_reason)
    } else if response.compact_revision != 0 {
        format!("compacted up to revision {}", response.compact_revision)
    } else {
        "canceled".to_owned()
    })
}

/// A feed watcher on etcd: a connection of its own, one `Watch` call, one
/// watch of the run's prefix.
pub struct EtcdWatcher {
    stream: WatchStream,
    canceled: bool,
}

impl EtcdWatcher {
    /// Connects to `addr`, watches every key under `prefix` from the next
    /// revision and waits (bounded) for `created`.
    pub async fn open(addr: &str, prefix: &[u8]) -> Result<EtcdWatcher, BenchError> {
        let channel = connect(addr).await?;
        let mut stream = WatchStream::open(channel, create_request(prefix, 0)).await?;
        stream.until_caught_up(0).await?;
        Ok(EtcdWatcher {
            stream,
            canceled: false,
        })
    }

    /// Reads one response into `seen`: each PUT's value is counted, any
    /// other event is a row that is not a put of this run.
    pub async fn read(&mut self, seen: &mut Seen) -> Result<(), BenchError> {
        let Some(response) = self.stream.next().await? else {
            return Err(BenchError::Feed("the server ended the stream".to_owned()));
        };
        // One clock reading per response: its events arrived together.
        let now_ns = unix_nanos();
        if let Some(why) = canceled(&response) {
            self.canceled = true;
            seen.errors.push(why);
        }
        for event in response.events {
            match (EventType::try_from(event.r#type), event.kv) {
                (Ok(EventType::Put), Some(kv)) => seen.record(&kv.value, now_ns),
                _ => {
                    seen.rows += 1;
                    seen.foreign += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether the watch is still in place.
    pub fn active(&self) -> bool {
        !self.canceled
    }

    /// The call's two sides, for a reader that only keeps it open.
    pub fn into_parts(self) -> (mpsc::Sender<WatchRequest>, Streaming<WatchResponse>) {
        (self.stream.requests, self.stream.responses)
    }
}

/// A request stream that says when the transport first asks it for a
/// message: by then the call's headers have been handed to HTTP/2.
struct FirstPoll {
    inner: ReceiverStream<WatchRequest>,
    polled: Option<oneshot::Sender<()>>,
}

impl Stream for FirstPoll {
    type Item = WatchRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchRequest>> {
        if let Some(polled) = self.polled.take() {
            let _ = polled.send(());
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// Starts a `Watch` call with `first` (if any) queued and drops it as soon
/// as its request side is being sent, without waiting for an answer
/// (etcd sends none before its first message).
pub async fn abandon(channel: Channel, first: Option<WatchRequest>) -> Result<(), BenchError> {
    let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
    if let Some(first) = first {
        requests
            .send(first)
            .await
            .map_err(|_| BenchError::Feed("the request stream closed".to_owned()))?;
    }
    let (polled_tx, polled) = oneshot::channel();
    let body = FirstPoll {
        inner: ReceiverStream::new(rx),
        polled: Some(polled_tx),
    };
    let mut client = WatchClient::new(channel);
    let call = client.watch(body);
    let sending = async {
        tokio::select! {
            answered = call => answered.map(|_| ()).map_err(|s| ClientError::rpc("Watch", &s).into()),
            _ = polled => Ok(()),
        }
    };
    let result = tokio::time::timeout(OPEN_TIMEOUT, sending)
        .await
        .map_err(|_| BenchError::Feed(format!("Watch was not sent within {OPEN_TIMEOUT:?}")))?;
    drop(requests);
    result
}

/// One churned `Watch` call on `channel`, ended at `stage`. The
/// `preloaded = (count, first revision)` keys under `prefix` are replayed
/// from their first revision, as kvfeed's churn replays them from
/// checkpoint 0; "ready" is etcd's `created` plus every replayed event
/// (the analog of INITIALIZED after a catch-up scan).
pub async fn churn_one(
    channel: &Channel,
    prefix: &[u8],
    preloaded: (u64, i64),
    stage: Stage,
) -> Result<Ended, BenchError> {
    let (count, first_revision) = preloaded;
    let create = create_request(prefix, first_revision);
    match stage {
        Stage::BeforeRequest => abandon(channel.clone(), None).await?,
        Stage::AfterRegister => abandon(channel.clone(), Some(create)).await?,
        Stage::MidStream => {
            // Opening waits for the first message; take it, then drop.
            let mut stream = WatchStream::open(channel.clone(), create).await?;
            stream.next().await?;
        }
        Stage::Drop => {
            let mut stream = WatchStream::open(channel.clone(), create).await?;
            stream.until_caught_up(count).await?;
        }
        Stage::HalfClose => {
            let mut stream = WatchStream::open(channel.clone(), create).await?;
            stream.until_caught_up(count).await?;
            let WatchStream {
                requests,
                mut responses,
            } = stream;
            drop(requests);
            let ending = async {
                while responses
                    .message()
                    .await
                    .map_err(|s| BenchError::Feed(format!("half-close ended with {s}")))?
                    .is_some()
                {}
                Ok::<(), BenchError>(())
            };
            match tokio::time::timeout(HALF_CLOSE_GRACE, ending).await {
                Ok(ended) => ended?,
                Err(_) => return Ok(Ended::HalfCloseLeftOpen),
            }
        }
    }
    Ok(Ended::AsPlanned)
}

/// `Watch` calls etcd has open: gRPC calls started minus calls handled
/// (`None` if its `/metrics` does not count them).
pub fn open_watch_calls(scrape: &Scrape) -> Option<f64> {
    let started = scrape.sum("grpc_server_started_total", WATCH_SERVICE)?;
    let handled = scrape.sum("grpc_server_handled_total", WATCH_SERVICE)?;
    Some(started - handled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_covers_exactly_the_prefix() {
        let request = create_request(b"kvfeed-bench/feed/1/", 7);
        let Some(RequestUnion::CreateRequest(create)) = request.request_union else {
            panic!("not a create request: {request:?}");
        };
        assert_eq!(create.key, b"kvfeed-bench/feed/1/");
        assert_eq!(create.range_end, b"kvfeed-bench/feed/10");
        assert_eq!(create.start_revision, 7);
        assert!(!create.prev_kv && !create.progress_notify);
    }

    #[test]
    fn cancellations_say_why() {
        let ok = WatchResponse {
            created: true,
            ..WatchResponse::default()
        };
        assert_eq!(canceled(&ok), None);
        let compacted = WatchResponse {
            canceled: true,
            compact_revision: 12,
            ..WatchResponse::default()
        };
        assert_eq!(
            canceled(&compacted).as_deref(),
            Some("compacted up to revision 12")
        );
        let refused = WatchResponse {
            canceled: true,
            cancel_reason: "permission denied".to_owned(),
            ..WatchResponse::default()
        };
        assert_eq!(
            canceled(&refused).as_deref(),
            Some("canceled: permission denied")
        );
    }

    #[test]
    fn open_calls_are_started_minus_handled() {
        let text = "grpc_server_started_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 10\n\
                    grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 99\n\
                    grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 3\n\
                    grpc_server_handled_total{grpc_code=\"Canceled\",grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 5\n";
        assert_eq!(open_watch_calls(&Scrape::parse(text)), Some(2.0));
        assert_eq!(open_watch_calls(&Scrape::parse("x 1\n")), None);
    }
}
