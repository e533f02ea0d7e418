//! Who is connected and subscribed to what.
//!
//! Invariants (checked by `check` in tests):
//! - A subscription lives inside its connection's entry (`ConnState::subs`),
//!   so removing a connection cannot leave one behind.
//! - `by_region` holds `(conn, request)` for region `r` iff that connection
//!   has a subscription `(request, r)`; every insert and removal of a
//!   subscription goes through this module and updates both sides.
//! - The connection and subscription gauges move only here, in the same
//!   functions as the maps, and `subscriptions` equals the number of
//!   subscriptions in all entries.
//! - Removing a connection drops its event channel sender and its `ended`
//!   signal: its stream ends once drained and its handler learns it ended.
//!   Dropping the registry (the owner ending, even by panic) removes
//!   every connection the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::CloseReason;
use crate::debug::{ConnectionSnapshot, DebugSnapshot, FeedCounts, SubscriptionSnapshot, hex};
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::FeedMetrics;
use crate::protocol::{Features, ProtocolVersion};
use crate::subscription::Subscription;

use super::NewConnection;
use super::outbound::Sink;

/// One registered connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub id: ConnId,
    pub peer: String,
    pub features: Features,
    /// The store the client connected to.
    pub store_id: u64,
    /// Fixed by the first request the owner sees from it.
    pub version: Option<ProtocolVersion>,
    pub created: Instant,
    pub sink: Sink,
    pub subs: SubMap,
    pub span: tracing::Span,
    _ended: watch::Sender<()>,
}

/// A connection's subscriptions by (request, region).
///
/// Boxed values: a B-tree allocates whole nodes of eleven slots, so with
/// subscriptions stored inline a connection holding one subscription would
/// pay for eleven (about 3 KiB). Boxing makes an empty slot cost a pointer.
pub(crate) type SubMap = BTreeMap<(RequestId, RegionId), Box<Subscription>>;

#[derive(Debug)]
pub(crate) struct Registry {
    conns: HashMap<ConnId, ConnState>,
    by_region: HashMap<RegionId, BTreeSet<(ConnId, RequestId)>>,
    subscriptions: usize,
    metrics: FeedMetrics,
}

impl Registry {
    pub(crate) fn new(metrics: FeedMetrics) -> Registry {
        Registry {
            conns: HashMap::new(),
            by_region: HashMap::new(),
            subscriptions: 0,
            metrics,
        }
    }

    pub(crate) fn insert_conn(&mut self, new: NewConnection) {
        if self.conns.contains_key(&new.id) {
            // Ids are allocated once each; a repeat would be a feed bug.
            // Keep the first, and let the duplicate's channels drop.
            tracing::error!(conn_id = new.id.0, "connection id registered twice");
            return;
        }
        tracing::info!(parent: &new.span, "connection opened");
        self.metrics.connections.inc();
        self.conns.insert(
            new.id,
            ConnState {
                id: new.id,
                peer: new.peer,
                features: new.features,
                store_id: new.store_id,
                version: None,
                created: Instant::now(),
                sink: Sink::new(new.sink, new.pending),
                subs: BTreeMap::new(),
                span: new.span,
                _ended: new.ended,
            },
        );
    }

    /// Removes a connection and everything it holds. Unknown ids are
    /// ignored (idempotent); returns whether it was registered.
    pub(crate) fn remove_conn(&mut self, id: ConnId, reason: CloseReason) -> bool {
        let Some(mut conn) = self.conns.remove(&id) else {
            return false;
        };
        let subs = std::mem::take(&mut conn.subs);
        let count = subs.len();
        for ((request_id, region_id), mut sub) in subs {
            sub.stop();
            self.unindex(id, request_id, region_id);
        }
        self.forget_subscriptions(count);
        self.metrics.connections.dec();
        self.metrics
            .aborted
            .with_label_values(&[reason.as_str()])
            .inc();
        tracing::info!(
            parent: &conn.span,
            reason = reason.as_str(),
            subscriptions = count,
            "connection ended"
        );
        true
    }

    /// Ends every connection with `reason`.
    pub(crate) fn end_all(&mut self, reason: CloseReason) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.remove_conn(id, reason);
        }
    }

    pub(crate) fn conn(&self, id: ConnId) -> Option<&ConnState> {
        self.conns.get(&id)
    }

    pub(crate) fn conn_mut(&mut self, id: ConnId) -> Option<&mut ConnState> {
        self.conns.get_mut(&id)
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// Adds `sub` to connection `conn`. Returns false (dropping `sub`) if the
    /// connection is unknown or already has that (request, region).
    pub(crate) fn insert_sub(&mut self, conn: ConnId, sub: Subscription) -> bool {
        let key = (sub.spec().request_id, sub.spec().region_id);
        let Some(state) = self.conns.get_mut(&conn) else {
            return false;
        };
        if state.subs.contains_key(&key) {
            return false;
        }
        state.subs.insert(key, Box::new(sub));
        self.by_region
            .entry(key.1)
            .or_default()
            .insert((conn, key.0));
        self.subscriptions += 1;
        self.metrics.subscriptions.inc();
        true
    }

    pub(crate) fn sub_mut(
        &mut self,
        conn: ConnId,
        request_id: RequestId,
        region_id: RegionId,
    ) -> Option<&mut Subscription> {
        self.conns
            .get_mut(&conn)?
            .subs
            .get_mut(&(request_id, region_id))
            .map(|sub| &mut **sub)
    }

    /// Every connection.
    pub(crate) fn conns(&self) -> impl Iterator<Item = &ConnState> {
        self.conns.values()
    }

    /// Counts subscriptions stopped with `congested`.
    pub(crate) fn note_congested(&self, subscriptions: usize) {
        self.metrics
            .congested
            .inc_by(u64::try_from(subscriptions).unwrap_or(u64::MAX));
    }

    /// Every connection, mutably (the resolved-ts round visits them all).
    pub(crate) fn conns_mut(&mut self) -> impl Iterator<Item = &mut ConnState> {
        self.conns.values_mut()
    }

    /// Whether `conn` has a subscription still waiting for its scan.
    pub(crate) fn has_initializing(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            c.subs
                .values()
                .any(|s| s.state() == crate::SubscriptionState::Initializing)
        })
    }

    /// Removes one subscription, returned Stopped.
    pub(crate) fn remove_sub(
        &mut self,
        conn: ConnId,
        request_id: RequestId,
        region_id: RegionId,
    ) -> Option<Subscription> {
        let mut sub = self
            .conns
            .get_mut(&conn)?
            .subs
            .remove(&(request_id, region_id))?;
        sub.stop();
        self.unindex(conn, request_id, region_id);
        self.forget_subscriptions(1);
        Some(*sub)
    }

    /// Removes every subscription of `request_id` on `conn`, returned Stopped.
    pub(crate) fn remove_request(
        &mut self,
        conn: ConnId,
        request_id: RequestId,
    ) -> Vec<Subscription> {
        let Some(state) = self.conns.get(&conn) else {
            return Vec::new();
        };
        let regions: Vec<RegionId> = state
            .subs
            .range((
                Bound::Included((request_id, RegionId(0))),
                Bound::Included((request_id, RegionId(u64::MAX))),
            ))
            .map(|((_, region), _)| *region)
            .collect();
        regions
            .into_iter()
            .filter_map(|region| self.remove_sub(conn, request_id, region))
            .collect()
    }

    /// Removes every subscription of `conn` (the connection stays).
    pub(crate) fn remove_all_subs(&mut self, conn: ConnId) -> Vec<Subscription> {
        let Some(state) = self.conns.get_mut(&conn) else {
            return Vec::new();
        };
        let subs = std::mem::take(&mut state.subs);
        let mut out = Vec::with_capacity(subs.len());
        for ((request_id, region_id), mut sub) in subs {
            sub.stop();
            self.unindex(conn, request_id, region_id);
            out.push(*sub);
        }
        self.forget_subscriptions(out.len());
        out
    }

    /// Subscriptions on `region`, with their connections.
    pub(crate) fn region_subscribers(
        &self,
        region: RegionId,
    ) -> impl Iterator<Item = (&ConnState, &Subscription)> {
        self.by_region
            .get(&region)
            .into_iter()
            .flatten()
            .filter_map(move |(conn, request_id)| {
                let state = self.conns.get(conn)?;
                let sub = state.subs.get(&(*request_id, region))?;
                Some((state, &**sub))
            })
    }

    pub(crate) fn snapshot(&self) -> DebugSnapshot {
        let mut connections: Vec<ConnectionSnapshot> = self
            .conns
            .values()
            .map(|c| ConnectionSnapshot {
                id: c.id.0,
                peer: c.peer.clone(),
                version: c.version.map(|v| v.to_string()),
                features: c.features.names(),
                age_secs: c.created.elapsed().as_secs(),
                pending_bytes: c.sink.pending_bytes(),
                subscriptions: c
                    .subs
                    .values()
                    .map(|s| SubscriptionSnapshot {
                        request_id: s.spec().request_id.0,
                        region_id: s.spec().region_id.0,
                        state: s.state(),
                        start_key: hex(&s.spec().start_key),
                        end_key: hex(&s.spec().end_key),
                        kv_api: s.spec().kv_api,
                        checkpoint_ts: s.spec().checkpoint_ts,
                        resolved_ts: s.resolved.sent.into_inner(),
                        tracked_locks: s.tracked_locks(),
                    })
                    .collect(),
            })
            .collect();
        connections.sort_by_key(|c| c.id);
        DebugSnapshot { connections }
    }

    pub(crate) fn counts(&self) -> FeedCounts {
        FeedCounts {
            connections: self.conns.len(),
            subscriptions: self.subscriptions,
            pending_bytes: u64::try_from(self.metrics.pending_bytes.get()).unwrap_or(0),
            // The owner fills this in from the scan pool.
            scans: 0,
        }
    }

    fn unindex(&mut self, conn: ConnId, request_id: RequestId, region_id: RegionId) {
        if let Some(set) = self.by_region.get_mut(&region_id) {
            set.remove(&(conn, request_id));
            if set.is_empty() {
                self.by_region.remove(&region_id);
            }
        }
    }

    fn forget_subscriptions(&mut self, count: usize) {
        self.subscriptions -= count;
        self.metrics
            .subscriptions
            .sub(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Panics if an invariant of the module docs is broken (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let in_entries: usize = self.conns.values().map(|c| c.subs.len()).sum();
        let in_index: usize = self.by_region.values().map(BTreeSet::len).sum();
        assert_eq!(in_entries, self.subscriptions);
        assert_eq!(in_index, self.subscriptions);
        for (region, set) in &self.by_region {
            for (conn, request) in set {
                let state = self.conns.get(conn).expect("indexed connection exists");
                assert!(state.subs.contains_key(&(*request, *region)));
            }
        }
        assert_eq!(self.metrics.subscriptions.get(), self.subscriptions as i64);
        assert_eq!(self.metrics.connections.get(), self.conns.len() as i64);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Normally already empty (the owner ends everything on its way
        // out); this covers the owner unwinding.
        self.end_all(CloseReason::Shutdown);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::FeedConfig;
    use crate::ids::KvApi;
    use crate::metrics::PendingBytes;
    use crate::queue::{self, QueueRx};
    use crate::quota::MemoryQuota;
    use crate::subscription::SubscriptionSpec;

    fn conn(id: u64, metrics: &FeedMetrics) -> (NewConnection, QueueRx) {
        let quota = Arc::new(MemoryQuota::new(&FeedConfig::default(), metrics));
        let pending = Arc::new(PendingBytes::new(metrics, quota));
        let (sink, rx) = queue::channel(4, Arc::clone(&pending));
        let (ended, _) = watch::channel(());
        let new = NewConnection {
            id: ConnId(id),
            peer: format!("peer-{id}"),
            features: Features::default(),
            store_id: 1,
            sink,
            pending,
            ended,
            span: tracing::Span::none(),
        };
        (new, rx)
    }

    fn sub(request: u64, region: u64) -> Subscription {
        Subscription::new(SubscriptionSpec {
            request_id: RequestId(request),
            region_id: RegionId(region),
            kv_api: KvApi::TiDb,
            start_key: Vec::new(),
            end_key: Vec::new(),
            old_value: false,
            filter_loop: false,
            checkpoint_ts: 0,
        })
    }

    #[tokio::test]
    async fn every_removal_path_keeps_the_index_and_gauges_exact() {
        let metrics = FeedMetrics::new().expect("metrics");
        let mut reg = Registry::new(metrics.clone());
        let (a, mut a_rx) = conn(1, &metrics);
        let (b, _b_rx) = conn(2, &metrics);
        reg.insert_conn(a);
        reg.insert_conn(b);
        for (request, region) in [(1, 2), (1, 3), (2, 2), (3, 3)] {
            assert!(reg.insert_sub(ConnId(1), sub(request, region)));
        }
        assert!(!reg.insert_sub(ConnId(1), sub(1, 2)), "duplicate refused");
        assert!(!reg.insert_sub(ConnId(9), sub(1, 2)), "unknown connection");
        assert!(reg.insert_sub(ConnId(2), sub(1, 2)));
        reg.check();
        assert_eq!(reg.region_subscribers(RegionId(2)).count(), 3);

        let gone = reg.remove_request(ConnId(1), RequestId(1));
        assert_eq!(gone.len(), 2);
        assert!(
            gone.iter()
                .all(|s| s.state() == crate::SubscriptionState::Stopped)
        );
        reg.check();
        assert!(
            reg.remove_sub(ConnId(1), RequestId(2), RegionId(2))
                .is_some()
        );
        assert!(
            reg.remove_sub(ConnId(1), RequestId(2), RegionId(2))
                .is_none()
        );
        reg.check();
        assert_eq!(reg.remove_all_subs(ConnId(2)).len(), 1);
        reg.check();
        assert_eq!(reg.subscription_count(), 1);

        assert!(reg.remove_conn(ConnId(1), CloseReason::Dropped));
        assert!(
            !reg.remove_conn(ConnId(1), CloseReason::Dropped),
            "idempotent"
        );
        reg.check();
        assert!(
            a_rx.recv().await.is_none(),
            "the stream ends with its entry"
        );
        assert_eq!(metrics.aborted("dropped"), 1);

        assert!(reg.insert_sub(ConnId(2), sub(5, 3)));
        drop(reg);
        assert_eq!(metrics.connections(), 0);
        assert_eq!(metrics.subscriptions(), 0);
        assert_eq!(metrics.aborted("shutdown"), 1);
    }
}
