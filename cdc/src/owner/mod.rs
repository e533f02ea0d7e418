//! The owner task: the only code that touches the registry.
//!
//! Everything mutable about the feed (connections, subscriptions, the
//! region index, the lock tracker, events waiting to be sent) lives in one
//! [`Owner`] value moved into one task. Handlers reach it only through the
//! typed messages below. The task is split by concern so that no part is a
//! god object: [`registry`] (who is subscribed to what), [`validate`]
//! (whether a Register may become a subscription), [`init`] (catch-up
//! scans: starting them and turning their messages into rows and
//! INITIALIZED), [`rows`] (what an applied batch means as feed rows),
//! [`router`] (which subscriptions get which rows), [`layout`] (region
//! splits, merges and leader moves), [`resolved_ts`] (resolved
//! timestamps) and [`outbound`] (sizing, queueing, congestion).
//!
//! # Steps
//!
//! The task waits for a message, then handles it and whatever else is
//! already queued (up to [`STEP_BUDGET`] messages), then *flushes*: the
//! events produced during the step are packed per connection and queued
//! on each connection's channel. Batching a step's answers this way means a
//! burst of Registers costs one channel slot, not one per answer. Every
//! event for a connection is appended to the step's outbox in the order it
//! was produced, so per-subscription order (INITIALIZED before rows, rows in
//! apply order) survives the batching.
//!
//! Queries, `Close` and shutdown flush before they act, so what they
//! observe or end includes everything produced before them. A flush queues
//! the step's events first and pending resolved timestamps after them, so a
//! resolved ts never overtakes a row produced before it.
//!
//! `Close` (the client half-closed) waits for the connection's catch-up
//! scans: every Register it sent gets its scan rows and INITIALIZED (or an
//! error) before the stream ends. Live rows keep flowing meanwhile.
//!
//! # Ordering between the two inbound channels
//!
//! Requests come on a bounded channel, control messages (connect,
//! deregister, observed batches, resolved-ts samples, shutdown) on an
//! unbounded one, and catch-up scan messages on a third, bounded one.
//! Before handling a request the owner handles every control and scan
//! message already queued. Whatever a handler did before sending the
//! request therefore takes effect first: a connection's `Connect` precedes
//! its requests, a test that dropped a connection and then asks for a
//! snapshot sees it gone, and a query sent after a scan finished sees its
//! INITIALIZED queued. Observed batches and resolved-ts samples share the
//! control channel, so a sample is always applied after every batch
//! announced before it was taken (the resolved-ts argument needs this).
//! A request for a connection that is no longer registered is ignored.
//! The price of this rule: when writes outpace the owner, a request waits
//! behind every batch queued before it. The control channel is unbounded
//! (the memory quota covers events queued for connections, not it); its
//! backlog is measured by `kvfeed_cdc_observed_queue_bytes`.

mod init;
mod layout;
mod outbound;
mod registry;
mod resolved_ts;
mod router;
mod rows;
mod validate;

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_storage::region::RegionMap;
use kvfeed_storage::store::{ChangeBatch, ObserverId, Store};

use crate::config::FeedConfig;
use crate::connection::CloseReason;
use crate::debug::{DebugSnapshot, FeedCounts};
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::{FeedMetrics, PendingBytes};
use crate::protocol::{Features, ProtocolVersion};
use crate::queue::QueueTx;
use crate::scan::{ScanMsg, ScanPool};
use crate::ts_sampler::MinTs;

pub(crate) use outbound::RESERVED_SLOTS;
pub(crate) use rows::{is_loop, prewrite_old_value_ts, prewrite_row, raw_committed_row};
pub(crate) use validate::Refusal;

use outbound::Outbox;
use registry::Registry;
use rows::LockTracker;

/// Messages handled per step before the outbox is flushed, so a flood on one
/// channel cannot postpone delivery indefinitely.
const STEP_BUDGET: usize = 256;

/// A request from a connection handler (bounded channel).
#[derive(Debug)]
pub(crate) enum Command {
    /// Register (or a request with no kind set).
    Register {
        conn: ConnId,
        version: ProtocolVersion,
        request: Box<ChangeDataRequest>,
    },
    /// Deregister one region of a request id, or (`None`) all of them.
    Deregister {
        conn: ConnId,
        version: ProtocolVersion,
        request_id: RequestId,
        region_id: Option<RegionId>,
    },
    /// The client half-closed: flush, then end the connection.
    Close {
        conn: ConnId,
        done: oneshot::Sender<()>,
    },
    Snapshot {
        reply: oneshot::Sender<DebugSnapshot>,
    },
    Counts {
        reply: oneshot::Sender<FeedCounts>,
    },
}

/// A message that must never wait (unbounded channel): sent from `Drop`,
/// from inside the store's publish lock, or at shutdown.
#[derive(Debug)]
pub(crate) enum Control {
    Connect(Box<NewConnection>),
    Deregister {
        conn: ConnId,
        reason: CloseReason,
    },
    Batch(Observed),
    /// A resolved-ts sample (see `ts_sampler`).
    MinTs(MinTs),
    Shutdown,
}

/// An applied store batch on its way to the owner. Its size is counted in
/// `kvfeed_cdc_observed_queue_bytes` from creation until it is dropped
/// (routed, or discarded with the channel), so the gauge measures the
/// unbounded control channel on every path.
#[derive(Debug)]
pub(crate) struct Observed {
    batch: Arc<ChangeBatch>,
    bytes: i64,
    gauge: prometheus::IntGauge,
}

impl Observed {
    pub(crate) fn new(batch: Arc<ChangeBatch>, metrics: &FeedMetrics) -> Observed {
        let bytes: usize = batch
            .mutations
            .iter()
            .map(|m| {
                let value = match &m.op {
                    kvfeed_storage::engine::Op::Put(v) => v.len(),
                    kvfeed_storage::engine::Op::Delete => 0,
                };
                m.key.len() + value
            })
            .sum();
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let gauge = metrics.observed_queue_bytes.clone();
        gauge.add(bytes);
        Observed {
            batch,
            bytes,
            gauge,
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}

/// Everything the registry keeps for a new connection.
#[derive(Debug)]
pub(crate) struct NewConnection {
    pub id: ConnId,
    pub peer: String,
    pub features: Features,
    pub store_id: u64,
    pub sink: QueueTx,
    pub pending: Arc<PendingBytes>,
    /// Dropped with the registry entry; the `Connection` watches for that.
    pub ended: watch::Sender<()>,
    pub span: tracing::Span,
}

/// Removes the feed's store observer when the owner goes away, however it
/// goes (return, panic, runtime shutdown dropping the task).
struct ObserverGuard {
    store: Arc<Store>,
    id: ObserverId,
}

impl Drop for ObserverGuard {
    fn drop(&mut self) {
        self.store.remove_observer(self.id);
    }
}

/// What the owner needs from the feed that starts it.
pub(crate) struct OwnerDeps {
    pub store: Arc<Store>,
    pub regions: Arc<RegionMap>,
    pub cluster_id: u64,
    pub config: FeedConfig,
    pub metrics: FeedMetrics,
    pub observer: ObserverId,
    pub scans: Arc<ScanPool>,
}

pub(crate) struct Owner {
    regions: Arc<RegionMap>,
    cluster_id: u64,
    config: FeedConfig,
    registry: Registry,
    locks: LockTracker,
    outbox: Outbox,
    scans: Arc<ScanPool>,
    next_scan: u64,
    /// Half-closed connections waiting for their scans, with their closer.
    closing: HashMap<ConnId, oneshot::Sender<()>>,
    /// Connections with a resolved ts waiting to be sent.
    resolved_pending: BTreeSet<ConnId>,
    /// Scan messages handled this step; dropped after the flush, which
    /// tells each scan its events are queued (see `ScanMsg::flushed`).
    scans_flushed: Vec<oneshot::Sender<()>>,
    metrics: FeedMetrics,
    observer: ObserverGuard,
}

enum Inbound {
    Command(Command),
    Control(Control),
    Scan(ScanMsg),
}

impl Owner {
    pub(crate) fn new(deps: OwnerDeps) -> Owner {
        Owner {
            regions: deps.regions,
            cluster_id: deps.cluster_id,
            config: deps.config,
            registry: Registry::new(deps.metrics.clone()),
            locks: LockTracker::default(),
            outbox: Outbox::default(),
            scans: deps.scans,
            next_scan: 1,
            closing: HashMap::new(),
            resolved_pending: BTreeSet::new(),
            scans_flushed: Vec::new(),
            metrics: deps.metrics,
            observer: ObserverGuard {
                store: deps.store,
                id: deps.observer,
            },
        }
    }

    /// Runs until `Control::Shutdown` (or every control sender is gone).
    /// `done` is dropped on exit; `Feed::shutdown` waits for every holder
    /// of it (this task, scan tasks, the resolved-ts task) to be gone.
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut scans: mpsc::Receiver<ScanMsg>,
        done: Arc<watch::Sender<()>>,
    ) {
        let mut commands_open = true;
        'steps: loop {
            let first = tokio::select! {
                msg = control.recv() => match msg {
                    Some(msg) => Inbound::Control(msg),
                    None => break 'steps,
                },
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(cmd) => Inbound::Command(cmd),
                    None => {
                        commands_open = false;
                        continue 'steps;
                    }
                },
                // The pool holds a sender as long as the owner does.
                Some(msg) = scans.recv() => Inbound::Scan(msg),
            };
            let mut next = Some(first);
            let mut budget = STEP_BUDGET;
            while let Some(msg) = next.take() {
                if self.process(msg, &mut control, &mut scans).is_break() {
                    break 'steps;
                }
                budget -= 1;
                if budget == 0 {
                    break;
                }
                next = match commands.try_recv() {
                    Ok(cmd) => Some(Inbound::Command(cmd)),
                    Err(_) => match control.try_recv() {
                        Ok(msg) => Some(Inbound::Control(msg)),
                        Err(_) => scans.try_recv().ok().map(Inbound::Scan),
                    },
                };
            }
            self.flush();
        }
        self.finish(commands, control, scans);
        drop(done);
    }

    fn process(
        &mut self,
        msg: Inbound,
        control: &mut mpsc::UnboundedReceiver<Control>,
        scans: &mut mpsc::Receiver<ScanMsg>,
    ) -> ControlFlow<()> {
        match msg {
            Inbound::Control(msg) => self.on_control(msg),
            Inbound::Scan(msg) => {
                self.on_scan(msg);
                ControlFlow::Continue(())
            }
            Inbound::Command(cmd) => {
                // Control and scan messages sent before this command take
                // effect first (see the module docs). Only those queued now
                // are taken, so a stream of batches cannot starve the
                // command.
                for _ in 0..control.len() {
                    match control.try_recv() {
                        Ok(msg) => self.on_control(msg)?,
                        Err(_) => break,
                    }
                }
                for _ in 0..scans.len() {
                    match scans.try_recv() {
                        Ok(msg) => self.on_scan(msg),
                        Err(_) => break,
                    }
                }
                self.on_command(cmd);
                ControlFlow::Continue(())
            }
        }
    }

    fn on_control(&mut self, msg: Control) -> ControlFlow<()> {
        match msg {
            Control::Connect(conn) => self.registry.insert_conn(*conn),
            Control::Deregister { conn, reason } => {
                // The client is gone: whatever was produced for it this
                // step has nobody to go to.
                self.outbox.discard(conn);
                self.registry.remove_conn(conn, reason);
            }
            Control::Batch(observed) => match &observed.batch.regions {
                Some(change) => layout::on_region_change(
                    &mut self.regions,
                    &mut self.registry,
                    &mut self.outbox,
                    change,
                ),
                None => router::route_batch(
                    &mut self.registry,
                    &self.regions,
                    &self.observer.store,
                    &mut self.locks,
                    &mut self.outbox,
                    &observed.batch,
                    self.config.scan_buffer_bytes,
                ),
            },
            Control::MinTs(sample) => resolved_ts::on_min_ts(
                &mut self.registry,
                &mut self.resolved_pending,
                &self.metrics,
                sample,
            ),
            Control::Shutdown => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Register {
                conn,
                version,
                request,
            } => self.on_register(conn, version, &request),
            Command::Deregister {
                conn,
                version,
                request_id,
                region_id,
            } => self.on_deregister(conn, version, request_id, region_id),
            Command::Close { conn, done } => {
                self.flush();
                if self.registry.has_initializing(conn) {
                    // Finished by `flush` once its scans are done.
                    self.closing.insert(conn, done);
                } else {
                    self.registry.remove_conn(conn, CloseReason::HalfClose);
                    // The closer may have been cancelled; nothing to tell.
                    let _ = done.send(());
                }
            }
            Command::Snapshot { reply } => {
                self.flush();
                let _ = reply.send(self.registry.snapshot());
            }
            Command::Counts { reply } => {
                self.flush();
                let mut counts = self.registry.counts();
                counts.scans = self.scans.ongoing();
                let _ = reply.send(counts);
            }
        }
    }

    fn on_register(&mut self, conn_id: ConnId, version: ProtocolVersion, req: &ChangeDataRequest) {
        let request_id = RequestId(req.request_id);
        let region_id = RegionId(req.region_id);
        let Some(conn) = self.registry.conn_mut(conn_id) else {
            tracing::debug!(
                conn_id = conn_id.0,
                "register for an ended connection ignored"
            );
            return;
        };
        let version = *conn.version.get_or_insert(version);
        let ctx = validate::Context {
            version,
            cluster_id: self.cluster_id,
            regions: &self.regions,
            max_subscriptions: self.config.max_subscriptions_per_conn,
            store_id: conn.store_id,
        };
        match validate::register(req, &ctx, &conn.subs) {
            Err(refusal) => {
                tracing::info!(
                    parent: &conn.span,
                    region_id = region_id.0,
                    request_id = request_id.0,
                    error = refusal.name(),
                    "register refused"
                );
                let error = refusal.to_wire(&self.regions);
                self.outbox
                    .push(conn_id, outbound::error_event(request_id, region_id, error));
            }
            Ok(spec) => self.start_subscription(conn_id, spec),
        }
    }

    fn on_deregister(
        &mut self,
        conn_id: ConnId,
        version: ProtocolVersion,
        request_id: RequestId,
        region_id: Option<RegionId>,
    ) {
        let Some(conn) = self.registry.conn_mut(conn_id) else {
            return;
        };
        conn.version.get_or_insert(version);
        let span = conn.span.clone();
        // An explicit deregistration is not answered: the client knows.
        let removed = match region_id {
            Some(region_id) => self
                .registry
                .remove_sub(conn_id, request_id, region_id)
                .map_or(0, |_| 1),
            None => self.registry.remove_request(conn_id, request_id).len(),
        };
        tracing::debug!(
            parent: &span,
            request_id = request_id.0,
            region_id = region_id.map_or(0, |r| r.0),
            removed,
            "deregistered"
        );
    }

    fn flush(&mut self) {
        self.outbox.flush(&mut self.registry);
        self.scans_flushed.clear();
        resolved_ts::flush(&mut self.registry, &mut self.resolved_pending);
        self.finish_closes();
    }

    /// Ends half-closed connections whose scans are all done (their events
    /// were just queued by `flush`).
    fn finish_closes(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let ready: Vec<ConnId> = self
            .closing
            .keys()
            .copied()
            .filter(|c| !self.registry.has_initializing(*c))
            .collect();
        for conn in ready {
            self.registry.remove_conn(conn, CloseReason::HalfClose);
            if let Some(done) = self.closing.remove(&conn) {
                let _ = done.send(());
            }
        }
    }

    /// Ends every connection (their streams yield what is queued, then
    /// end) and drops whatever is still queued for the owner: a `Connect`
    /// never handled drops its channel ends, so that connection sees the
    /// end too, and waiting queries get a closed reply channel.
    fn finish(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut scans: mpsc::Receiver<ScanMsg>,
    ) {
        self.flush();
        // Ending the connections drops their subscriptions, which cancels
        // their scans; closed channels stop whatever is still sending.
        self.registry.end_all(CloseReason::Shutdown);
        self.closing.clear();
        commands.close();
        control.close();
        scans.close();
        while commands.try_recv().is_ok() {}
        while control.try_recv().is_ok() {}
        while scans.try_recv().is_ok() {}
        tracing::info!("change feed stopped");
    }
}
