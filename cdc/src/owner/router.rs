//! Which subscriptions get which rows of an observed batch.
//!
//! A row's routing key (encoded for transactional rows, raw for raw rows)
//! locates its region; only that region's subscriptions can want it, since
//! a subscription's range lies inside its region. Each candidate first
//! decides whether the batch concerns it at all (`Subscription::accepts`:
//! state, arming, and the batch's seq against its catch-up snapshot), then
//! per row by kind, range and loop filter (`Subscription::wants`). Lock
//! changes are routed the same way but without the loop filter. Rows are
//! collected per subscription in apply order; a Normal subscription's
//! become its `Entries` events and its lock changes update its lock set,
//! while an initializing subscription holds both back with the batch's seq
//! until its scan is done. So a key's rows reach every subscriber in the
//! order the store applied them, after the scan's rows for that key.
//!
//! Held-back data is charged to the connection's memory quota. An
//! initializing subscription whose held-back data outgrows
//! `FeedConfig::scan_buffer_bytes`, or takes its connection beyond its
//! memory cap (or the feed beyond its quota), is stopped with `congested`,
//! alone: the rest of its connection is unaffected.
//!
//! # Old values
//!
//! A subscription with `extra_op = ReadOldValue` gets, on PREWRITE and
//! one-phase COMMITTED rows, the newest committed value below the
//! transaction's read point (`max(start_ts, for_update_ts)` for a prewrite,
//! just below `commit_ts` for a 1PC), empty for none or a delete. It is read
//! from a store snapshot taken once per batch, lazily, only when some
//! subscriber wants an old value, and cached per (key, ts) within the batch;
//! rows held back for an initializing subscription get theirs now too, at
//! observation time. Cost, acceptable for now: taking the snapshot waits for
//! the store's publish lock (which is held across a commit group's fsync),
//! on the owner task, and each lookup is a seek. The snapshot is taken after
//! the batch was applied, so a lagging feed reads later state; versions
//! below the read point cannot change unless garbage collection has since
//! removed them, in which case the old value is missing. An old-value cache
//! fed at write time (as TiKV has) will replace this.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use kvfeed_proto::cdcpb::event::Row;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{Key, MvccReader};
use kvfeed_storage::region::RegionMap;
use kvfeed_storage::store::{ChangeBatch, Snapshot, Store};

use crate::ids::{ConnId, RegionId, RequestId};
use crate::subscription::{RowKind, SubscriptionState};
use crate::ts_sampler::LockChange;

use super::outbound::{Outbox, entries_events};
use super::registry::Registry;
use super::rows::{LockTracker, decode_batch};
use super::validate::Refusal;

type SubKey = (ConnId, RequestId, RegionId);

/// What one batch brings one subscription.
#[derive(Default)]
struct ForSub {
    rows: Vec<Row>,
    locks: Vec<LockChange>,
}

/// Routes one observed batch: into `outbox` for Normal subscriptions, held
/// back for initializing ones (at most `hold_cap` bytes each).
pub(crate) fn route_batch(
    registry: &mut Registry,
    regions: &RegionMap,
    store: &Store,
    locks: &mut LockTracker,
    outbox: &mut Outbox,
    batch: &ChangeBatch,
    hold_cap: usize,
) {
    // Decoded even with nobody subscribed, to keep the lock tracker exact.
    let decoded = decode_batch(batch, locks);
    if (decoded.rows.is_empty() && decoded.locks.is_empty()) || registry.subscription_count() == 0 {
        return;
    }
    let mut old_values = OldValues::new(store);
    let mut per_sub: BTreeMap<SubKey, ForSub> = BTreeMap::new();
    for row in &decoded.rows {
        let region = regions.locate(&row.routing_key).id;
        for (conn, sub) in registry.region_subscribers(region) {
            if !sub.accepts(batch.seq) || !sub.wants(row.kind, &row.routing_key, &row.row) {
                continue;
            }
            let mut out = row.row.clone();
            if sub.spec().old_value
                && let Some(ts) = row.old_value_ts
            {
                out.old_value = old_values.get(&row.row.key, ts);
            }
            per_sub
                .entry((conn.id, sub.spec().request_id, region))
                .or_default()
                .rows
                .push(out);
        }
    }
    for change in &decoded.locks {
        let region = regions.locate(&change.key).id;
        for (conn, sub) in registry.region_subscribers(region) {
            if sub.accepts(batch.seq) && sub.covers(RowKind::Txn, &change.key) {
                per_sub
                    .entry((conn.id, sub.spec().request_id, region))
                    .or_default()
                    .locks
                    .push(change.clone());
            }
        }
    }
    let mut overflowed = Vec::new();
    for ((conn, request_id, region_id), for_sub) in per_sub {
        let Some(sub) = registry.sub_mut(conn, request_id, region_id) else {
            continue;
        };
        match sub.state() {
            SubscriptionState::Normal => {
                sub.apply_locks(for_sub.locks);
                if !for_sub.rows.is_empty() {
                    outbox.extend(conn, entries_events(request_id, region_id, for_sub.rows));
                }
            }
            SubscriptionState::Initializing => {
                if sub
                    .hold_back(batch.seq, for_sub.rows, for_sub.locks, hold_cap)
                    .is_err()
                {
                    overflowed.push((conn, request_id, region_id));
                }
            }
            SubscriptionState::Stopped => {}
        }
    }
    for (conn, request_id, region_id) in overflowed {
        if registry.remove_sub(conn, request_id, region_id).is_some() {
            registry.note_congested(1);
            tracing::warn!(
                conn_id = conn.0,
                region_id = region_id.0,
                request_id = request_id.0,
                cap = hold_cap,
                "live rows held back during the catch-up scan exceed the cap; stopped as congested"
            );
            outbox.push(
                conn,
                super::outbound::error_event(
                    request_id,
                    region_id,
                    Refusal::Congested(region_id).to_wire(regions),
                ),
            );
        }
    }
}

/// Old values read for one batch; see the module docs. Keys and values are
/// `Bytes`, so a hit (one per further subscriber of the same row) is two
/// reference-count bumps rather than two copies.
struct OldValues<'a> {
    store: &'a Store,
    snapshot: Option<Snapshot>,
    cache: HashMap<(Bytes, TimeStamp), Bytes>,
}

impl<'a> OldValues<'a> {
    fn new(store: &'a Store) -> Self {
        OldValues {
            store,
            snapshot: None,
            cache: HashMap::new(),
        }
    }

    fn get(&mut self, key: &Bytes, ts: TimeStamp) -> Bytes {
        let cache_key = (key.clone(), ts);
        if let Some(v) = self.cache.get(&cache_key) {
            return v.clone();
        }
        let snapshot = self.snapshot.get_or_insert_with(|| self.store.snapshot());
        let value = match MvccReader::new(&**snapshot).get(&Key::from_raw(key), ts) {
            Ok(v) => Bytes::from(v.unwrap_or_default()),
            Err(e) => {
                tracing::warn!(error = %e, "old value unreadable; sent empty");
                Bytes::new()
            }
        };
        self.cache.insert(cache_key, value.clone());
        value
    }
}
