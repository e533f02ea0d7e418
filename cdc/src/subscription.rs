//! One subscription: a (connection, request id, region) triple and what it
//! asked to see.
//!
//! # State machine
//!
//! ```text
//!   Register accepted
//!          |
//!          v
//!   Initializing --(INITIALIZED row queued)--> Normal
//!          |                                      |
//!          +-------------> Stopped <--------------+
//!     (deregister, error, congestion, connection end)
//! ```
//!
//! - **Initializing**: the subscription exists (it counts against the
//!   connection's cap and makes a second Register with the same request id
//!   and region a duplicate) but receives no live rows. The catch-up scan
//!   will run in this state and live rows will be held back until it ends;
//!   today there is no scan, so the owner leaves this state in the same step
//!   that creates the subscription, before any observed batch can be
//!   routed.
//! - **Normal**: the INITIALIZED row has been queued; live rows flow. The
//!   protocol forbids rows before INITIALIZED, which is why only Normal
//!   receives them.
//! - **Stopped**: terminal. Set on every removal path; a stopped
//!   subscription is out of the registry and gets nothing more. If it
//!   stopped because of an error, that error is the last event sent for it.
//!
//! Transitions only go forward; `Subscription::mark_initialized` refuses
//! to revive a stopped subscription.

use serde::Serialize;

use kvfeed_proto::cdcpb::event::Row;

use crate::ids::{KvApi, RegionId, RequestId};

/// Where a subscription is in its life; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    Initializing,
    Normal,
    Stopped,
}

/// A validated Register request: everything a subscription needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SubscriptionSpec {
    pub request_id: RequestId,
    pub region_id: RegionId,
    pub kv_api: KvApi,
    /// The requested range intersected with the region: encoded keys for
    /// TiDB, raw keys for RawKV. Empty end = unbounded.
    pub start_key: Vec<u8>,
    pub end_key: Vec<u8>,
    /// `extra_op == ReadOldValue`.
    pub old_value: bool,
    /// Drop rows written by a change feed (`txn_source & 0xFF != 0`).
    pub filter_loop: bool,
    /// Kept for the catch-up scan (rows committed after it).
    pub checkpoint_ts: u64,
}

/// What kind of write a row reports; a subscription takes only its own kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowKind {
    Txn,
    Raw,
}

/// A live subscription in the registry.
#[derive(Debug)]
pub(crate) struct Subscription {
    spec: SubscriptionSpec,
    state: SubscriptionState,
}

impl Subscription {
    pub(crate) fn new(spec: SubscriptionSpec) -> Subscription {
        Subscription {
            spec,
            state: SubscriptionState::Initializing,
        }
    }

    pub(crate) fn spec(&self) -> &SubscriptionSpec {
        &self.spec
    }

    pub(crate) fn state(&self) -> SubscriptionState {
        self.state
    }

    /// Initializing → Normal. Returns false (and changes nothing) from any
    /// other state.
    pub(crate) fn mark_initialized(&mut self) -> bool {
        if self.state == SubscriptionState::Initializing {
            self.state = SubscriptionState::Normal;
            true
        } else {
            false
        }
    }

    /// Any state → Stopped.
    pub(crate) fn stop(&mut self) {
        self.state = SubscriptionState::Stopped;
    }

    /// Whether a row of `kind` at `routing_key` (encoded user key for txn
    /// rows, raw key for raw rows) goes to this subscription.
    pub(crate) fn wants(&self, kind: RowKind, routing_key: &[u8], row: &Row) -> bool {
        if self.state != SubscriptionState::Normal {
            return false;
        }
        let kind_matches = matches!(
            (kind, self.spec.kv_api),
            (RowKind::Txn, KvApi::TiDb) | (RowKind::Raw, KvApi::RawKv)
        );
        if !kind_matches {
            return false;
        }
        if self.spec.filter_loop && row.txn_source & 0xFF != 0 {
            return false;
        }
        routing_key >= self.spec.start_key.as_slice()
            && (self.spec.end_key.is_empty() || routing_key < self.spec.end_key.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kv_api: KvApi, start: &[u8], end: &[u8], filter_loop: bool) -> SubscriptionSpec {
        SubscriptionSpec {
            request_id: RequestId(1),
            region_id: RegionId(2),
            kv_api,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            old_value: false,
            filter_loop,
            checkpoint_ts: 0,
        }
    }

    #[test]
    fn transitions_only_go_forward() {
        let mut s = Subscription::new(spec(KvApi::TiDb, b"", b"", false));
        assert_eq!(s.state(), SubscriptionState::Initializing);
        assert!(s.mark_initialized());
        assert_eq!(s.state(), SubscriptionState::Normal);
        assert!(!s.mark_initialized());
        s.stop();
        assert!(!s.mark_initialized());
        assert_eq!(s.state(), SubscriptionState::Stopped);
    }

    #[test]
    fn wants_checks_state_kind_range_and_loop_filter() {
        let row = Row::default();
        let mut s = Subscription::new(spec(KvApi::TiDb, b"b", b"d", true));
        assert!(!s.wants(RowKind::Txn, b"c", &row), "initializing");
        s.mark_initialized();
        assert!(s.wants(RowKind::Txn, b"b", &row));
        assert!(s.wants(RowKind::Txn, b"c", &row));
        assert!(!s.wants(RowKind::Txn, b"d", &row), "end is exclusive");
        assert!(!s.wants(RowKind::Txn, b"a", &row));
        assert!(!s.wants(RowKind::Raw, b"c", &row), "kind");
        let looped = Row {
            txn_source: 0x0100_0001,
            ..Row::default()
        };
        assert!(!s.wants(RowKind::Txn, b"c", &looped));
        let high_bits_only = Row {
            txn_source: 0x0100,
            ..Row::default()
        };
        assert!(s.wants(RowKind::Txn, b"c", &high_bits_only));
        let mut unbounded = Subscription::new(spec(KvApi::RawKv, b"", b"", false));
        unbounded.mark_initialized();
        assert!(unbounded.wants(RowKind::Raw, &[0xff; 40], &looped));
        s.stop();
        assert!(!s.wants(RowKind::Txn, b"c", &row), "stopped");
    }
}
