//! Initializing subscriptions: starting their catch-up scans and turning
//! the scans' messages into the subscriber's first events.
//!
//! Per subscription the connection receives, in order: the scan's rows
//! (each scan batch a message of its own), exactly one INITIALIZED row, the
//! live rows held back while the scan ran, then live rows as they come.
//! Everything is queued through the step's outbox, so that order holds
//! whatever else the connection receives in between. A scan message for a
//! subscription that no longer exists, or that belongs to an earlier
//! subscription with the same (request id, region), is ignored: the scan id
//! must match (see `scan::ScanId`).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::watch;

use crate::connection::CloseReason;
use crate::ids::ConnId;
use crate::quota::HeldCharge;
use crate::scan::{ScanEvent, ScanId, ScanJob, ScanKey, ScanMsg, ScanSpec};
use crate::subscription::{Subscription, SubscriptionSpec, SubscriptionState};

use super::Owner;
use super::outbound::{self, entries_events};
use super::validate::Refusal;

impl Owner {
    /// Creates the subscription for a validated Register and queues its
    /// scan, or refuses with `server_is_busy` when too many scans are
    /// queued or running.
    pub(super) fn start_subscription(&mut self, conn_id: ConnId, spec: SubscriptionSpec) {
        let (request_id, region_id) = (spec.request_id, spec.region_id);
        let Some(conn) = self.registry.conn(conn_id) else {
            return;
        };
        let ongoing = self.scans.ongoing();
        if ongoing >= self.scans.limit() {
            tracing::info!(
                parent: &conn.span,
                region_id = region_id.0,
                request_id = request_id.0,
                ongoing,
                "register refused: too many catch-up scans"
            );
            let error = Refusal::TooManyScans(ongoing).to_wire(&self.regions);
            self.outbox
                .push(conn_id, outbound::error_event(request_id, region_id, error));
            return;
        }
        let scan = ScanId(self.next_scan);
        self.next_scan += 1;
        let span = tracing::info_span!(
            parent: &conn.span,
            "cdc_scan",
            region_id = region_id.0,
            request_id = request_id.0,
            scan_id = scan.0,
        );
        tracing::debug!(
            parent: &span,
            kv_api = %spec.kv_api,
            checkpoint_ts = spec.checkpoint_ts,
            "subscribed; catch-up scan queued"
        );
        let (cancel_tx, cancel_rx) = watch::channel(());
        let armed = Arc::new(AtomicBool::new(false));
        let job = ScanJob {
            key: ScanKey {
                conn: conn_id,
                request_id,
                region_id,
                scan,
            },
            spec: ScanSpec::of(&spec),
            cancel: cancel_rx,
            armed: Arc::clone(&armed),
            sink: conn.sink.weak(),
            pending: Arc::clone(conn.sink.pending()),
            span,
        };
        let charge = HeldCharge::new(Arc::clone(conn.sink.pending()));
        let sub = Subscription::with_scan(spec, scan, cancel_tx, armed, Some(charge));
        // Validation refused duplicates, so this only fails if the
        // connection vanished, in which case dropping `sub` is the cleanup.
        if self.registry.insert_sub(conn_id, sub) {
            self.scans.spawn(job);
        }
    }

    /// Applies one message of a catch-up scan.
    pub(super) fn on_scan(&mut self, msg: ScanMsg) {
        self.scans_flushed.push(msg.flushed);
        let ScanKey {
            conn,
            request_id,
            region_id,
            scan,
        } = msg.key;
        if let ScanEvent::SinkGone = msg.event {
            // Whichever subscription the scan served, the connection's
            // event stream is gone: nothing can reach the client any more,
            // and a half-close waiting for this scan would wait forever.
            if self.registry.conn(conn).is_some_and(|c| c.sink.is_closed()) {
                self.outbox.discard(conn);
                self.registry.remove_conn(conn, CloseReason::SendFailed);
            }
            return;
        }
        let Some(sub) = self.registry.sub_mut(conn, request_id, region_id) else {
            return;
        };
        if sub.scan_id() != Some(scan) || sub.state() != SubscriptionState::Initializing {
            return;
        }
        match msg.event {
            ScanEvent::Started { seq } => sub.snapshot_taken(seq),
            ScanEvent::Batch { rows, locks } => {
                sub.add_scanned_locks(locks);
                if !rows.is_empty() {
                    self.outbox
                        .extend_fenced(conn, entries_events(request_id, region_id, rows));
                }
            }
            ScanEvent::Done => {
                let Some(held) = sub.complete() else {
                    return;
                };
                tracing::debug!(
                    conn_id = conn.0,
                    region_id = region_id.0,
                    request_id = request_id.0,
                    held_back = held.len(),
                    "initialized"
                );
                self.outbox
                    .push(conn, outbound::initialized_event(request_id, region_id));
                if !held.is_empty() {
                    self.outbox
                        .extend(conn, entries_events(request_id, region_id, held));
                }
            }
            // Handled above, before the subscription is looked up.
            ScanEvent::SinkGone => {}
            ScanEvent::Failed(refusal) => {
                if matches!(refusal, Refusal::Congested(_)) {
                    self.registry.note_congested(1);
                }
                tracing::warn!(
                    conn_id = conn.0,
                    region_id = region_id.0,
                    request_id = request_id.0,
                    error = refusal.name(),
                    "catch-up scan failed; subscription ended"
                );
                self.registry.remove_sub(conn, request_id, region_id);
                let error = refusal.to_wire(&self.regions);
                self.outbox
                    .push(conn, outbound::error_event(request_id, region_id, error));
            }
        }
    }
}
