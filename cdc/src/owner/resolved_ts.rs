//! Resolved timestamps: each sample's candidate per initialized
//! subscription, and sending what advanced.
//!
//! # Rules
//!
//! - Only Normal subscriptions are resolved: nothing precedes INITIALIZED.
//! - A value is sent only when it exceeds everything already sent (or
//!   pending) for that subscription, so what a client sees is strictly
//!   increasing.
//! - A value waiting to be sent is replaced by a newer one: each
//!   subscription has one pending slot, so nothing is queued twice, and a
//!   value is never dropped — if the connection has no ordinary slot free
//!   it stays pending and is offered again at the next flush. Unlike rows,
//!   a resolved ts never congests a connection (a later one supersedes it).
//! - A flush queues the step's rows first, then resolved timestamps, so a
//!   resolved ts follows every row produced before its sample was applied.
//!
//! # Wire forms
//!
//! - Clients before 4.0.8: one `Event { resolved_ts }` per subscription,
//!   with its request id and region.
//! - Later clients with `stream-multiplexing`: one `ChangeDataEvent`
//!   `resolved_ts { regions, ts, request_id }` per (request id, ts), as
//!   TiKV sends them — unless a round has more than
//!   [`MAX_BATCHED_MESSAGES`] of those, then the per-subscription form of
//!   old clients, packed. TiCDC shares one request id among a table's
//!   regions, so a round is a few messages; a client with one request id
//!   per region (kvfeed's) would get one message per region and round,
//!   which on a connection of thousands of regions fills its event queue
//!   every round, so that rows then find it full and congest it.
//! - Later clients without it: one per ts, `request_id` 0 (as TiKV), listing
//!   regions. Such a message cannot say which of two subscriptions of one
//!   region it is for, so a region subscribed more than once on the
//!   connection is resolved as a whole: to the lowest candidate of its
//!   subscriptions, only once all of them are initialized, and only above
//!   the highest value any of them was sent. The value is then honest for
//!   each of them and increasing as the client sees it.

use std::collections::{BTreeMap, BTreeSet};

use kvfeed_proto::cdcpb::{ChangeDataEvent, Event, ResolvedTs, event};
use kvfeed_storage::TimeStamp;

use crate::connection::CloseReason;
use crate::ids::{ConnId, KvApi, RegionId, RequestId};
use crate::metrics::FeedMetrics;
use crate::subscription::{Subscription, SubscriptionState};
use crate::ts_sampler::MinTs;

use super::outbound::Offer;
use super::registry::{ConnState, Registry};

/// Per-region resolved-ts events in one message for old clients (each is
/// a few bytes; this keeps a message far below the size cap).
const EVENTS_PER_MESSAGE: usize = 4096;
/// Batched resolved-ts messages of one round beyond which a multiplexed
/// connection gets the packed per-subscription form (see "Wire forms").
const MAX_BATCHED_MESSAGES: usize = 64;

fn candidate(sub: &Subscription, sample: &MinTs) -> TimeStamp {
    match sub.spec().kv_api {
        KvApi::TiDb => sample.for_txn(sub.oldest_lock()),
        KvApi::RawKv => sample.for_raw(),
    }
}

/// Applies one sample: sets the pending value of every subscription that
/// advanced, notes its connection in `pending`, and updates the lag gauge.
pub(super) fn on_min_ts(
    registry: &mut Registry,
    pending: &mut BTreeSet<ConnId>,
    metrics: &FeedMetrics,
    sample: MinTs,
) {
    let mut lowest: Option<TimeStamp> = None;
    for conn in registry.conns_mut() {
        let region_level = conn
            .version
            .is_some_and(|v| v.batches_resolved_ts() && !conn.features.stream_multiplexing);
        let advanced = if region_level {
            advance_by_region(conn, &sample)
        } else {
            advance_each(conn, &sample)
        };
        if advanced {
            pending.insert(conn.id);
        }
        for sub in conn.subs.values() {
            if sub.state() == SubscriptionState::Normal {
                let reached = sub.resolved.reached();
                lowest = Some(lowest.map_or(reached, |l| l.min(reached)));
            }
        }
    }
    let lag_ms = lowest.map_or(0, |l| sample.min_ts.physical().saturating_sub(l.physical()));
    metrics.resolved_ts_lag.set(lag_ms as f64 / 1000.0);
}

fn advance_each(conn: &mut ConnState, sample: &MinTs) -> bool {
    let mut advanced = false;
    for sub in conn.subs.values_mut() {
        if sub.state() != SubscriptionState::Normal {
            continue;
        }
        let ts = candidate(sub, sample);
        if ts > sub.resolved.reached() {
            sub.resolved.pending = Some(ts);
            advanced = true;
        }
    }
    advanced
}

/// See "Wire forms" in the module docs.
fn advance_by_region(conn: &mut ConnState, sample: &MinTs) -> bool {
    struct Group {
        ready: bool,
        value: TimeStamp,
        reached: TimeStamp,
    }
    let mut groups: BTreeMap<RegionId, Group> = BTreeMap::new();
    for ((_, region), sub) in &conn.subs {
        let group = groups.entry(*region).or_insert(Group {
            ready: true,
            value: TimeStamp::MAX,
            reached: TimeStamp::ZERO,
        });
        if sub.state() != SubscriptionState::Normal {
            group.ready = false;
            continue;
        }
        group.value = group.value.min(candidate(sub, sample));
        group.reached = group.reached.max(sub.resolved.reached());
    }
    let mut advanced = false;
    for ((_, region), sub) in conn.subs.iter_mut() {
        if let Some(group) = groups.get(region)
            && group.ready
            && group.value > group.reached
        {
            sub.resolved.pending = Some(group.value);
            advanced = true;
        }
    }
    advanced
}

/// Offers every pending resolved ts; connections that had no room stay in
/// `pending` for the next flush.
pub(super) fn flush(registry: &mut Registry, pending: &mut BTreeSet<ConnId>) {
    let conns: Vec<ConnId> = pending.iter().copied().collect();
    for id in conns {
        let outcome = match registry.conn_mut(id) {
            Some(conn) => flush_conn(conn),
            None => Offer::Closed,
        };
        match outcome {
            Offer::Queued => {
                pending.remove(&id);
            }
            Offer::Full => {}
            Offer::Closed => {
                pending.remove(&id);
                registry.remove_conn(id, CloseReason::SendFailed);
            }
        }
    }
}

/// Whether the batched form of `items` would take more than `limit`
/// messages, one per (request id, ts). `items` are in key order, so a
/// request's items are adjacent; one whose regions differ in ts may be
/// counted more than once, which only picks the packed form sooner.
fn distinct_requests_exceed(items: &[((RequestId, RegionId), TimeStamp)], limit: usize) -> bool {
    let mut pairs = items
        .iter()
        .map(|((request, _), ts)| (request.0, *ts))
        .collect::<Vec<_>>();
    pairs.dedup();
    pairs.len() > limit
}

fn flush_conn(conn: &mut ConnState) -> Offer {
    let items: Vec<((RequestId, RegionId), TimeStamp)> = conn
        .subs
        .iter()
        .filter(|(_, s)| s.state() == SubscriptionState::Normal)
        .filter_map(|(key, s)| s.resolved.pending.map(|ts| (*key, ts)))
        .collect();
    let multiplexing = conn.features.stream_multiplexing;
    let batched = conn.version.is_some_and(|v| v.batches_resolved_ts())
        && !(multiplexing && distinct_requests_exceed(&items, MAX_BATCHED_MESSAGES));
    let mut messages: Vec<(ChangeDataEvent, Vec<(RequestId, RegionId)>)> = Vec::new();
    if batched {
        let mut groups: BTreeMap<(u64, TimeStamp), Vec<(RequestId, RegionId)>> = BTreeMap::new();
        for (key, ts) in items {
            let request = if multiplexing { key.0.0 } else { 0 };
            groups.entry((request, ts)).or_default().push(key);
        }
        for ((request_id, ts), keys) in groups {
            let mut regions: Vec<u64> = keys.iter().map(|(_, r)| r.0).collect();
            regions.sort_unstable();
            regions.dedup();
            let message = ChangeDataEvent {
                events: Vec::new(),
                resolved_ts: Some(ResolvedTs {
                    regions,
                    ts: ts.into_inner(),
                    request_id,
                }),
            };
            messages.push((message, keys));
        }
    } else {
        for chunk in items.chunks(EVENTS_PER_MESSAGE) {
            let events = chunk
                .iter()
                .map(|((request_id, region_id), ts)| Event {
                    region_id: region_id.0,
                    index: 0,
                    request_id: request_id.0,
                    event: Some(event::Event::ResolvedTs(ts.into_inner())),
                })
                .collect();
            let message = ChangeDataEvent {
                events,
                resolved_ts: None,
            };
            messages.push((message, chunk.iter().map(|(k, _)| *k).collect()));
        }
    }
    for (message, keys) in messages {
        match conn.sink.offer(message) {
            Offer::Queued => {
                for key in keys {
                    if let Some(sub) = conn.subs.get_mut(&key)
                        && let Some(ts) = sub.resolved.pending.take()
                    {
                        sub.resolved.sent = sub.resolved.sent.max(ts);
                    }
                }
            }
            refused => return refused,
        }
    }
    Offer::Queued
}
