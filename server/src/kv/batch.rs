//! `tikvpb.Tikv/BatchCommands`: many KV commands multiplexed on one
//! bidirectional stream, each tagged with a request id (client-go's default
//! transport).
//!
//! Invariants:
//! - One execution path: every command runs through [`KvService::run`] with
//!   the same handler as its unary RPC, so both transports answer alike.
//! - Concurrency: each command is its own task, so a slow command never
//!   holds up the others; answers go out as they complete, grouped in any
//!   way, each tagged with its request id.
//! - Bounded: at most [`MAX_IN_FLIGHT`] commands of one stream are running
//!   or waiting to be sent. While that many are, the stream is not read
//!   (HTTP/2 flow control then stops the client); while the client does not
//!   read answers, the driver blocks on the bounded output queue and stops
//!   reading too. Nothing queues without bound: at most one decoded request
//!   message (itself capped at [`super::limits::MAX_REQUEST_SIZE`]) waits for
//!   slots.
//! - Every malformed part is answered in its own slot and the stream goes
//!   on: a command kind kvfeed does not serve, or a request with no command,
//!   gets a `Response` with no command set (what TiKV sends; clients report
//!   it as an error for that id); an id without a request gets the same; a
//!   request without an id cannot be addressed and is dropped (counted in
//!   `kvfeed_kv_batch_malformed_total`).
//! - No leaks: the stream's driver task owns the command tasks (a
//!   `JoinSet`, aborted when dropped) and a guard that closes the stream in
//!   the metrics; it ends when the client goes, the request stream fails
//!   (the failure, e.g. an oversized message, is the answer stream's final
//!   status) or ends and every answer is sent, or shutdown is triggered. A
//!   command already on the blocking pool finishes there (commands are
//!   atomic) and its answer is dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use kvfeed_proto::tikvpb::batch_commands_request::request::Cmd as ReqCmd;
use kvfeed_proto::tikvpb::batch_commands_response::Response as BatchResponse;
use kvfeed_proto::tikvpb::batch_commands_response::response::Cmd as RespCmd;
use kvfeed_proto::tikvpb::{
    BatchCommandsEmptyResponse, BatchCommandsRequest, BatchCommandsResponse,
};
use prometheus::{IntCounter, IntGauge};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::context::{HasContext, Scope};
use super::errors::{KvError, KvResponse};
use super::{KvService, lock_resolution, raw, txn};
use crate::metrics::{Metrics, MetricsError};
use crate::node::Node;
use crate::shutdown::ShutdownSignal;

/// Commands of one stream running or waiting to be sent. client-go keeps at
/// most 128 per batch message and a few batches in flight.
pub const MAX_IN_FLIGHT: usize = 512;

/// Response messages waiting for the transport; small, because each one
/// already groups many answers.
const OUT_QUEUE: usize = 8;

/// Answers grouped into one response message, at most.
const MAX_GROUP: usize = 128;

/// Encoded bytes after which a response message takes no more answers (one
/// large answer still goes out alone).
const MAX_GROUP_BYTES: usize = 1024 * 1024;

/// Longest delay an `Empty` test command may ask for.
const MAX_EMPTY_DELAY: Duration = Duration::from_secs(60);

/// The answer stream handed to tonic.
pub type ResponseStream = ReceiverStream<Result<BatchCommandsResponse, Status>>;

/// The BatchCommands metrics, shared by every stream of the service.
#[derive(Clone)]
pub struct BatchMetrics {
    streams: IntGauge,
    in_flight: IntGauge,
    requests: IntCounter,
    malformed: IntCounter,
}

impl BatchMetrics {
    /// Creates the collectors and registers them with `metrics`.
    pub fn register(metrics: &Metrics) -> Result<BatchMetrics, MetricsError> {
        let new_gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let m = BatchMetrics {
            streams: new_gauge(
                "kvfeed_kv_batch_streams",
                "Open tikvpb.Tikv/BatchCommands streams.",
            )
            .map_err(MetricsError::Register)?,
            in_flight: new_gauge(
                "kvfeed_kv_batch_requests_in_flight",
                "Commands received on BatchCommands streams and not yet answered.",
            )
            .map_err(MetricsError::Register)?,
            requests: IntCounter::new(
                "kvfeed_kv_batch_requests_total",
                "Commands received on BatchCommands streams.",
            )
            .map_err(MetricsError::Register)?,
            malformed: IntCounter::new(
                "kvfeed_kv_batch_malformed_total",
                "BatchCommands entries with no command, an unserved kind, or a \
                 request/id count mismatch.",
            )
            .map_err(MetricsError::Register)?,
        };
        metrics.register(Box::new(m.streams.clone()))?;
        metrics.register(Box::new(m.in_flight.clone()))?;
        metrics.register(Box::new(m.requests.clone()))?;
        metrics.register(Box::new(m.malformed.clone()))?;
        Ok(m)
    }
}

/// Counts one live thing (a stream, a command task) in a gauge for as long
/// as the guard lives, so every way it ends (return, abort, panic) counts.
struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn inc(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Starts serving one BatchCommands stream; returns its answer stream.
pub fn open(svc: KvService, inbound: Streaming<BatchCommandsRequest>) -> ResponseStream {
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let shutdown = svc.node.shutdown().subscribe();
    let guard = GaugeGuard::inc(&svc.batch.streams);
    tokio::spawn(drive(svc, inbound, out, shutdown, guard));
    ReceiverStream::new(out_rx)
}

/// One command's answer, with the slot it held until it is grouped.
type Done = (u64, BatchResponse, OwnedSemaphorePermit);

/// A command waiting for a slot: its id and its command (none if unset).
type Pending = (u64, Option<ReqCmd>);

async fn drive(
    svc: KvService,
    mut inbound: Streaming<BatchCommandsRequest>,
    out: mpsc::Sender<Result<BatchCommandsResponse, Status>>,
    mut shutdown: ShutdownSignal,
    _guard: GaugeGuard,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A command sends its answer only while holding a slot, so the channel
    // never holds more than MAX_IN_FLIGHT answers and a send never waits.
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(MAX_IN_FLIGHT);
    // Dropped when this function returns, which aborts every command task.
    let mut tasks = JoinSet::new();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut reading = true;
    loop {
        tokio::select! {
            biased;
            () = shutdown.recv() => break,
            () = out.closed() => break,
            Some(first) = done_rx.recv() => {
                let batch = group(first, &mut done_rx);
                let sent = tokio::select! {
                    sent = out.send(Ok(batch)) => sent.is_ok(),
                    () = shutdown.recv() => false,
                };
                if !sent {
                    break;
                }
            }
            Some(joined) = tasks.join_next() => {
                if let Err(err) = joined {
                    tracing::error!(%err, "BatchCommands command task failed");
                }
            }
            slot = Arc::clone(&slots).acquire_owned(), if !pending.is_empty() => {
                let (Ok(slot), Some((id, cmd))) = (slot, pending.pop_front()) else {
                    break;
                };
                let svc = svc.clone();
                let done = done_tx.clone();
                svc.batch.requests.inc();
                tasks.spawn(async move {
                    let _in_flight = GaugeGuard::inc(&svc.batch.in_flight);
                    let resp = svc.dispatch(cmd).await;
                    // Fails only if the stream has ended: nobody to answer.
                    let _ = done.send((id, resp, slot)).await;
                });
            }
            msg = inbound.message(), if reading && pending.is_empty() => match msg {
                Ok(Some(msg)) => enqueue(&svc.batch, msg, &mut pending),
                Ok(None) => reading = false,
                Err(status) => {
                    tracing::debug!(%status, "BatchCommands request stream failed");
                    // The client learns why its stream ends (a message over
                    // the size limit, a malformed frame); commands still
                    // running are dropped with the stream.
                    tokio::select! {
                        _ = out.send(Err(status)) => {}
                        () = shutdown.recv() => {}
                    }
                    break;
                }
            },
        }
        if !reading && pending.is_empty() && slots.available_permits() == MAX_IN_FLIGHT {
            // The client half-closed and every command is answered.
            break;
        }
    }
}

/// Pairs a message's requests with its ids. Ids without a request are
/// answered with an unset command; requests without an id are dropped.
fn enqueue(metrics: &BatchMetrics, msg: BatchCommandsRequest, pending: &mut VecDeque<Pending>) {
    let (requests, ids) = (msg.requests.len(), msg.request_ids.len());
    if requests != ids {
        // Debug, not warn: a broken client would repeat it on every
        // message; the malformed counter is what an operator watches.
        tracing::debug!(
            requests,
            ids,
            "BatchCommands message with unequal request and id counts"
        );
        metrics.malformed.inc_by(requests.abs_diff(ids) as u64);
    }
    let mut commands = msg.requests.into_iter();
    for id in msg.request_ids {
        pending.push_back((id, commands.next().and_then(|r| r.cmd)));
    }
}

/// `first` plus whatever else is ready, up to the group limits.
fn group(first: Done, done_rx: &mut mpsc::Receiver<Done>) -> BatchCommandsResponse {
    let mut batch = BatchCommandsResponse::default();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some((id, resp, _slot)) = next {
        bytes += resp.encoded_len();
        batch.request_ids.push(id);
        batch.responses.push(resp);
        if batch.responses.len() >= MAX_GROUP || bytes >= MAX_GROUP_BYTES {
            break;
        }
        next = done_rx.try_recv().ok();
    }
    batch
}

/// One row per served kind: oneof variant (the same name in the request
/// and the response), the unary method's name (for logs and errors), and
/// the unary RPC's handler.
macro_rules! dispatch_table {
    ($svc:expr, $cmd:expr, $($kind:ident => $method:literal, $handler:path;)*) => {
        match $cmd {
            $(ReqCmd::$kind(r) => $svc.call($method, r, $handler, RespCmd::$kind).await,)*
            ReqCmd::Empty(r) => {
                // The transport's own test command: answered after the
                // requested delay (capped), on this command's task only.
                let delay = Duration::from_millis(r.delay_time).min(MAX_EMPTY_DELAY);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                RespCmd::Empty(BatchCommandsEmptyResponse { test_id: r.test_id })
            }
        }
    };
}

impl KvService {
    /// Runs one batched command through the same handler as its unary RPC.
    async fn dispatch(&self, cmd: Option<ReqCmd>) -> BatchResponse {
        let Some(cmd) = cmd else {
            // An unset command, or a kind not declared in our proto.
            self.batch.malformed.inc();
            return BatchResponse { cmd: None };
        };
        let cmd = dispatch_table!(self, cmd,
            Get => "KvGet", txn::get;
            Scan => "KvScan", txn::scan;
            Prewrite => "KvPrewrite", txn::prewrite;
            Commit => "KvCommit", txn::commit;
            Cleanup => "KvCleanup", lock_resolution::cleanup;
            BatchGet => "KvBatchGet", txn::batch_get;
            BatchRollback => "KvBatchRollback", txn::batch_rollback;
            ScanLock => "KvScanLock", lock_resolution::scan_lock;
            ResolveLock => "KvResolveLock", lock_resolution::resolve_lock;
            Gc => "KvGC", lock_resolution::gc;
            DeleteRange => "KvDeleteRange", lock_resolution::delete_range;
            RawGet => "RawGet", raw::get;
            RawBatchGet => "RawBatchGet", raw::batch_get;
            RawPut => "RawPut", raw::put;
            RawBatchPut => "RawBatchPut", raw::batch_put;
            RawDelete => "RawDelete", raw::delete;
            RawBatchDelete => "RawBatchDelete", raw::batch_delete;
            RawScan => "RawScan", raw::scan;
            RawDeleteRange => "RawDeleteRange", raw::delete_range;
            RawBatchScan => "RawBatchScan", raw::batch_scan;
            PessimisticLock => "KvPessimisticLock", txn::pessimistic_lock;
            PessimisticRollback => "KVPessimisticRollback", txn::pessimistic_rollback;
            CheckTxnStatus => "KvCheckTxnStatus", lock_resolution::check_txn_status;
            TxnHeartBeat => "KvTxnHeartBeat", lock_resolution::txn_heart_beat;
            CheckSecondaryLocks => "KvCheckSecondaryLocks", lock_resolution::check_secondary_locks;
        );
        BatchResponse { cmd: Some(cmd) }
    }

    /// [`KvService::run`] for one batched command. An error the unary RPC
    /// would return as a gRPC status has no place of its own on the stream,
    /// so it becomes the response's input error, naming the status.
    pub(super) async fn call<Req, Resp, F>(
        &self,
        method: &'static str,
        req: Req,
        handler: F,
        wrap: fn(Resp) -> RespCmd,
    ) -> RespCmd
    where
        Req: HasContext,
        Resp: KvResponse,
        F: FnOnce(&Node, &Scope, Req) -> Result<Resp, KvError> + Send + 'static,
    {
        match self.run(method, req, handler).await {
            Ok(resp) => wrap(resp),
            Err(status) => {
                let mut resp = Resp::default();
                resp.set_input_error(format!(
                    "{method}: {:?}: {}",
                    status.code(),
                    status.message()
                ));
                wrap(resp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kvfeed_proto::kvrpcpb;
    use kvfeed_proto::tikvpb::batch_commands_request::Request as BatchRequest;

    use super::*;

    fn metrics() -> BatchMetrics {
        BatchMetrics::register(&Metrics::new().expect("registry")).expect("register")
    }

    fn get(key: &[u8]) -> BatchRequest {
        BatchRequest {
            cmd: Some(ReqCmd::RawGet(kvrpcpb::RawGetRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn ids_pair_with_requests_and_the_surplus_of_either_is_counted() {
        let m = metrics();
        let mut pending = VecDeque::new();
        let msg = BatchCommandsRequest {
            requests: vec![get(b"a"), BatchRequest { cmd: None }],
            request_ids: vec![1, 2, 3],
        };
        enqueue(&m, msg, &mut pending);
        let ids: Vec<(u64, bool)> = pending.iter().map(|(id, c)| (*id, c.is_some())).collect();
        assert_eq!(ids, vec![(1, true), (2, false), (3, false)]);
        assert_eq!(m.malformed.get(), 1);

        pending.clear();
        let msg = BatchCommandsRequest {
            requests: vec![get(b"a"), get(b"b"), get(b"c")],
            request_ids: vec![9],
        };
        enqueue(&m, msg, &mut pending);
        assert_eq!(
            pending.len(),
            1,
            "requests without an id cannot be answered"
        );
        assert_eq!(m.malformed.get(), 3);
    }

    #[tokio::test]
    async fn answers_are_grouped_up_to_the_limit_and_release_their_slots() {
        let slots = Arc::new(Semaphore::new(MAX_GROUP + 10));
        let (tx, mut rx) = mpsc::channel(MAX_GROUP + 10);
        for id in 0..(MAX_GROUP as u64 + 10) {
            let slot = Arc::clone(&slots).acquire_owned().await.expect("slot");
            tx.send((id, BatchResponse::default(), slot))
                .await
                .expect("send");
        }
        let first = rx.recv().await.expect("an answer");
        let batch = group(first, &mut rx);
        assert_eq!(batch.request_ids.len(), MAX_GROUP);
        assert_eq!(batch.responses.len(), MAX_GROUP);
        assert_eq!(batch.request_ids[0], 0);
        assert_eq!(slots.available_permits(), MAX_GROUP);
        let rest = group(rx.recv().await.expect("more"), &mut rx);
        assert_eq!(rest.request_ids.len(), 10);
        assert_eq!(slots.available_permits(), MAX_GROUP + 10);
    }
}
