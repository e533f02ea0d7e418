//! Which subscriptions get which rows of an observed batch.
//!
//! A row's routing key (encoded for transactional rows, raw for raw rows)
//! locates its region; only that region's subscriptions can want it, since
//! a subscription's range lies inside its region. Each candidate decides by
//! state, kind, range and loop filter (`Subscription::wants`). Rows are
//! appended per subscription in apply order and become that subscription's
//! `Entries` events, so a key's rows reach every subscriber in the order the
//! store applied them.
//!
//! # Old values
//!
//! A subscription with `extra_op = ReadOldValue` gets, on PREWRITE and
//! one-phase COMMITTED rows, the newest committed value below the
//! transaction's read point (`max(start_ts, for_update_ts)` for a prewrite,
//! just below `commit_ts` for a 1PC), empty for none or a delete. It is read
//! from a store snapshot taken once per batch, lazily, only when some
//! subscriber wants an old value, and cached per (key, ts) within the batch.
//! Cost, acceptable for now: taking the snapshot waits for the store's
//! publish lock (which is held across a commit group's fsync), on the owner
//! task, and each lookup is a seek. The snapshot is taken after the batch
//! was applied, so a lagging feed reads later state; versions below the read
//! point cannot change unless garbage collection has since removed them,
//! in which case the old value is missing. An old-value cache fed at write
//! time (as TiKV has) will replace this.

use std::collections::{BTreeMap, HashMap};

use kvfeed_proto::cdcpb::event::Row;
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::{Key, MvccReader};
use kvfeed_storage::region::RegionMap;
use kvfeed_storage::store::{ChangeBatch, Snapshot, Store};

use crate::ids::{ConnId, RegionId, RequestId};

use super::outbound::{Outbox, entries_events};
use super::registry::Registry;
use super::rows::{LockTracker, decode_batch};

/// Routes one observed batch into `outbox`.
pub(crate) fn route_batch(
    registry: &Registry,
    regions: &RegionMap,
    store: &Store,
    locks: &mut LockTracker,
    outbox: &mut Outbox,
    batch: &ChangeBatch,
) {
    // Decoded even with nobody subscribed, to keep the lock tracker exact.
    let rows = decode_batch(batch, locks);
    if rows.is_empty() || registry.subscription_count() == 0 {
        return;
    }
    let mut old_values = OldValues::new(store);
    let mut per_sub: BTreeMap<(ConnId, RequestId, RegionId), Vec<Row>> = BTreeMap::new();
    for decoded in &rows {
        let region = regions.locate(&decoded.routing_key).id;
        for (conn, sub) in registry.region_subscribers(region) {
            if !sub.wants(decoded.kind, &decoded.routing_key, &decoded.row) {
                continue;
            }
            let mut row = decoded.row.clone();
            if sub.spec().old_value
                && let Some(ts) = decoded.old_value_ts
            {
                row.old_value = old_values.get(&decoded.row.key, ts);
            }
            per_sub
                .entry((conn.id, sub.spec().request_id, region))
                .or_default()
                .push(row);
        }
    }
    for ((conn, request_id, region_id), rows) in per_sub {
        outbox.extend(conn, entries_events(request_id, region_id, rows));
    }
}

/// Old values read for one batch; see the module docs.
struct OldValues<'a> {
    store: &'a Store,
    snapshot: Option<Snapshot>,
    cache: HashMap<(Vec<u8>, TimeStamp), Vec<u8>>,
}

impl<'a> OldValues<'a> {
    fn new(store: &'a Store) -> Self {
        OldValues {
            store,
            snapshot: None,
            cache: HashMap::new(),
        }
    }

    fn get(&mut self, key: &[u8], ts: TimeStamp) -> Vec<u8> {
        if let Some(v) = self.cache.get(&(key.to_vec(), ts)) {
            return v.clone();
        }
        let snapshot = self.snapshot.get_or_insert_with(|| self.store.snapshot());
        let value = match MvccReader::new(&**snapshot).get(&Key::from_raw(key), ts) {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "old value unreadable; sent empty");
                Vec::new()
            }
        };
        self.cache.insert((key.to_vec(), ts), value.clone());
        value
    }
}
