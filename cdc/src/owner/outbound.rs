//! Getting events to connections: sizing, queueing and congestion.
//!
//! # Sizes
//!
//! Rows of one subscription are grouped into `Event`s whose row payload is
//! at most [`EVENT_MAX_ROW_BYTES`] (a larger row travels alone), and a
//! connection's events into `ChangeDataEvent`s of at most
//! [`CHANGE_DATA_EVENT_MAX_BYTES`] encoded. Grouping never reorders: rows
//! and events keep the order they were produced in. A catch-up scan's
//! batch is fenced by boundaries in the outbox, so it travels as a message
//! of its own (at most 1 MiB of rows): the client can tell its batches
//! apart and no message grows from mixing them with live traffic.
//!
//! # Queueing without blocking
//!
//! Each connection has a queue (module `queue`) of `sink_capacity +`
//! [`RESERVED_SLOTS`] messages. The owner is its only sender and never
//! waits, so a slow reader never stalls the owner (and with it every other
//! connection, or the writers). Ordinary events may use all but the
//! reserved slot and must fit the memory quota (module `quota`): the
//! connection's charge plus the event within `conn_memory_quota`, the
//! feed's within `sink_memory_quota`. The congestion notice may use the
//! reserved slot and is admitted beyond the quota (it is a few bytes per
//! subscription). Since nobody else adds, room seen by the owner stays
//! free until it uses it.
//!
//! # Congestion
//!
//! When an ordinary event finds no free slot or would take its connection
//! beyond its cap, that connection is congested: everything queued and
//! not yet taken is purged (uncharged at once), every subscription it has
//! is stopped and removed (releasing what initializing ones held back),
//! and one notice carries a `congested` error for each of them, plus one
//! for every Register whose only answer (an error) was purged or could not
//! be queued, so every request still gets exactly one final answer. The
//! rest is dropped, which is correct because the subscriptions it was for
//! are gone. Only this connection is affected (TiKV errors every
//! subscriber of the region instead). If a notice was still unread (the
//! client has not read since the last congestion), the connection is
//! ended ("congested"); a closed queue ends it as "send_failed".
//!
//! When an event fits its connection's cap but not the feed-wide quota,
//! the connections holding the most bytes (and at least one subscription)
//! are congested, largest first, as long as they hold more than the
//! event's own connection; if room is still missing, the event's
//! connection is congested. So a reader that keeps up is not punished for
//! readers that do not, and a connection is never congested for less than
//! what the one it makes room for holds.
//!
//! Resolved timestamps are offered, never forced: one that does not fit
//! stays pending (replaced by newer ones) and is offered again at the next
//! flush; it congests nobody. Its limit: while the quota is held by
//! others, a connection with no rows flowing waits for its resolved ts
//! until rows (which can congest the holders) or reads make room.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;

use kvfeed_proto::cdcpb::event::{self, Entries, LogType, Row};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, Congested, Event};

use crate::connection::CloseReason;
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::PendingBytes;
use crate::queue::{PushError, QueueTx, Queued, WeakQueue};
use crate::{CHANGE_DATA_EVENT_MAX_BYTES, EVENT_MAX_ROW_BYTES};

use super::registry::Registry;

/// Slots of each connection's queue kept for the congestion notice.
pub(crate) const RESERVED_SLOTS: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// No ordinary slot, or over the connection's byte cap.
    Full,
    /// Over the feed-wide quota (the connection's own cap has room).
    Global,
    Closed,
}

/// The owner's end of a connection's event queue.
#[derive(Debug)]
pub(crate) struct Sink {
    tx: QueueTx,
    pending: Arc<PendingBytes>,
}

impl Sink {
    pub(crate) fn new(tx: QueueTx, pending: Arc<PendingBytes>) -> Sink {
        Sink { tx, pending }
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending.get()
    }

    /// Whether the connection's event stream is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Bytes charged to the connection (queued plus held back).
    pub(crate) fn charged(&self) -> u64 {
        self.pending.charged()
    }

    /// Queues `event` unless that would take a reserved slot or go beyond
    /// the memory quota (both allowed only for a notice). Gives the event
    /// back when refused.
    fn send(
        &self,
        event: ChangeDataEvent,
        bytes: usize,
        notice: bool,
    ) -> Result<(), (Refused, ChangeDataEvent)> {
        if self.tx.is_closed() {
            return Err((Refused::Closed, event));
        }
        if !notice {
            if self.tx.free() <= RESERVED_SLOTS || !self.pending.fits_conn(bytes) {
                return Err((Refused::Full, event));
            }
            if !self.pending.quota().fits(bytes) {
                return Err((Refused::Global, event));
            }
        }
        let queued = Queued {
            event,
            bytes,
            notice,
        };
        self.tx.try_push(queued).map_err(|(why, q)| {
            let why = match why {
                PushError::Full => Refused::Full,
                PushError::Closed => Refused::Closed,
            };
            (why, q.event)
        })
    }
}

/// What a connection's resolved-ts (or other replaceable) message met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    Queued,
    /// No ordinary slot or byte free; try again later.
    Full,
    /// The stream is gone.
    Closed,
}

impl Sink {
    /// Queues `event` if an ordinary slot and the bytes are free. Unlike
    /// rows, a refused message does not congest anyone: the caller keeps
    /// it (or a newer replacement) for a later try.
    pub(crate) fn offer(&self, event: ChangeDataEvent) -> Offer {
        let bytes = event.encoded_len();
        match self.send(event, bytes, false) {
            Ok(()) => Offer::Queued,
            Err((Refused::Full | Refused::Global, _)) => Offer::Full,
            Err((Refused::Closed, _)) => Offer::Closed,
        }
    }

    /// A handle that does not keep the queue open (for scan pacing).
    pub(crate) fn weak(&self) -> WeakQueue {
        self.tx.weak()
    }

    pub(crate) fn pending(&self) -> &Arc<PendingBytes> {
        &self.pending
    }
}

/// One entry of the outbox.
// Nearly every item is an event; boxing them would allocate per event to
// shrink the rare boundary.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Item {
    Event(Event),
    /// Events on either side travel in different messages.
    Boundary,
}

/// Events produced during one owner step, per connection, in order.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    per_conn: HashMap<ConnId, Vec<Item>>,
}

impl Outbox {
    pub(crate) fn push(&mut self, conn: ConnId, event: Event) {
        self.per_conn
            .entry(conn)
            .or_default()
            .push(Item::Event(event));
    }

    pub(crate) fn extend(&mut self, conn: ConnId, events: impl IntoIterator<Item = Event>) {
        self.per_conn
            .entry(conn)
            .or_default()
            .extend(events.into_iter().map(Item::Event));
    }

    /// Queues `events` as message(s) of their own.
    pub(crate) fn extend_fenced(&mut self, conn: ConnId, events: impl IntoIterator<Item = Event>) {
        let items = self.per_conn.entry(conn).or_default();
        items.push(Item::Boundary);
        items.extend(events.into_iter().map(Item::Event));
        items.push(Item::Boundary);
    }

    pub(crate) fn discard(&mut self, conn: ConnId) {
        self.per_conn.remove(&conn);
    }

    /// Queues everything on the connections' queues, handling congestion,
    /// the memory quota and closed queues as described in the module docs.
    pub(crate) fn flush(&mut self, registry: &mut Registry) {
        let mut work = std::mem::take(&mut self.per_conn);
        let order: Vec<ConnId> = work.keys().copied().collect();
        for conn in order {
            // Gone if congested as a victim earlier in this flush.
            let Some(items) = work.remove(&conn) else {
                continue;
            };
            let mut messages = pack(items).into_iter();
            let mut next = messages.next();
            while let Some((message, bytes)) = next.take() {
                let Some(state) = registry.conn(conn) else {
                    break;
                };
                match state.sink.send(message, bytes, false) {
                    Ok(()) => next = messages.next(),
                    Err((Refused::Closed, _)) => {
                        registry.remove_conn(conn, CloseReason::SendFailed);
                    }
                    Err((Refused::Global, message))
                        if make_room(registry, &mut work, conn, bytes) =>
                    {
                        next = Some((message, bytes));
                    }
                    Err((_, first)) => {
                        let unsent =
                            std::iter::once(first).chain(messages.by_ref().map(|(m, _)| m));
                        congest(registry, conn, unsent.collect());
                    }
                }
            }
        }
    }
}

/// The feed-wide quota has no room for `bytes` more for `conn`: congests
/// the connections holding the most, largest first, while they hold more
/// than `conn` does. Returns whether `bytes` now fit; false means `conn`
/// is itself (one of) the largest and is the one to congest.
fn make_room(
    registry: &mut Registry,
    work: &mut HashMap<ConnId, Vec<Item>>,
    conn: ConnId,
    bytes: usize,
) -> bool {
    let Some(state) = registry.conn(conn) else {
        return false;
    };
    let own = state.sink.charged();
    let quota = Arc::clone(state.sink.pending().quota());
    while !quota.fits(bytes) {
        // Connections without subscriptions hold only final answers;
        // congesting them frees nothing worth having.
        let victim = registry
            .conns()
            .filter(|c| c.id != conn && !c.subs.is_empty())
            .map(|c| (c.sink.charged(), c.id))
            .max();
        match victim {
            Some((held, victim)) if held > own => {
                let unsent = work
                    .remove(&victim)
                    .map(|items| pack(items).into_iter().map(|(m, _)| m).collect())
                    .unwrap_or_default();
                if let Some(v) = registry.conn(victim) {
                    tracing::warn!(
                        parent: &v.span,
                        held,
                        for_conn = conn.0,
                        "memory quota full; the largest holder is congested"
                    );
                }
                congest(registry, victim, unsent);
            }
            _ => return false,
        }
    }
    true
}

/// Stops every subscription of `conn`, drops what is queued for it and
/// tells the client so.
fn congest(registry: &mut Registry, conn: ConnId, mut unsent: Vec<ChangeDataEvent>) {
    let Some(state) = registry.conn(conn) else {
        return;
    };
    // What the client has not taken yet is for subscriptions about to be
    // stopped: freed now. A notice among it means the client has not read
    // since the last congestion.
    let purged = state.sink.tx.purge();
    let unread_notice = purged.iter().any(|q| q.notice);
    unsent.extend(purged.into_iter().map(|q| q.event));
    let mut keys: BTreeSet<(RequestId, RegionId)> = unsent
        .into_iter()
        .flat_map(|m| m.events)
        .filter(|e| matches!(e.event, Some(event::Event::Error(_))))
        .map(|e| (RequestId(e.request_id), RegionId(e.region_id)))
        .collect();
    let stopped = registry.remove_all_subs(conn);
    registry.note_congested(stopped.len());
    keys.extend(
        stopped
            .iter()
            .map(|s| (s.spec().request_id, s.spec().region_id)),
    );
    let Some(state) = registry.conn(conn) else {
        return;
    };
    tracing::warn!(
        parent: &state.span,
        subscriptions = stopped.len(),
        answers = keys.len(),
        "event queue or memory quota full; the connection's subscriptions are stopped as congested"
    );
    if unread_notice {
        registry.remove_conn(conn, CloseReason::Congested);
        return;
    }
    if keys.is_empty() {
        return;
    }
    let notice = ChangeDataEvent {
        events: keys
            .into_iter()
            .map(|(request_id, region_id)| congested_event(request_id, region_id))
            .collect(),
        resolved_ts: None,
    };
    let bytes = notice.encoded_len();
    match state.sink.send(notice, bytes, true) {
        Ok(()) => {}
        Err((Refused::Full | Refused::Global, _)) => {
            registry.remove_conn(conn, CloseReason::Congested);
        }
        Err((Refused::Closed, _)) => {
            registry.remove_conn(conn, CloseReason::SendFailed);
        }
    }
}

/// Packs events into messages of at most [`CHANGE_DATA_EVENT_MAX_BYTES`]
/// (a single larger event goes alone), each with its exact encoded size. A
/// boundary ends the current message.
pub(crate) fn pack(items: Vec<Item>) -> Vec<(ChangeDataEvent, usize)> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for item in items {
        let event = match item {
            Item::Event(event) => event,
            Item::Boundary => {
                if !current.is_empty() {
                    out.push((message(std::mem::take(&mut current)), size));
                    size = 0;
                }
                continue;
            }
        };
        let len = event.encoded_len();
        // Field 1, length-delimited: one tag byte, the length, the body.
        let framed = 1 + prost::length_delimiter_len(len) + len;
        if !current.is_empty() && size + framed > CHANGE_DATA_EVENT_MAX_BYTES {
            out.push((message(std::mem::take(&mut current)), size));
            size = 0;
        }
        current.push(event);
        size += framed;
    }
    if !current.is_empty() {
        out.push((message(current), size));
    }
    out
}

fn message(events: Vec<Event>) -> ChangeDataEvent {
    ChangeDataEvent {
        events,
        resolved_ts: None,
    }
}

/// Groups one subscription's rows into `Entries` events of at most
/// [`EVENT_MAX_ROW_BYTES`] of row payload, keeping their order.
pub(crate) fn entries_events(
    request_id: RequestId,
    region_id: RegionId,
    rows: Vec<Row>,
) -> Vec<Event> {
    // Sizes first, so each event's vector is allocated once at its final
    // size: a catch-up batch is hundreds of rows per event.
    let mut counts = Vec::new();
    let (mut count, mut size) = (0, 0);
    for row in &rows {
        let len = row.encoded_len();
        if count > 0 && size + len > EVENT_MAX_ROW_BYTES {
            counts.push(count);
            (count, size) = (0, 0);
        }
        count += 1;
        size += len;
    }
    if count > 0 {
        counts.push(count);
    }
    let mut rows = rows.into_iter();
    counts
        .into_iter()
        .map(|n| entries_event(request_id, region_id, rows.by_ref().take(n).collect()))
        .collect()
}

fn entries_event(request_id: RequestId, region_id: RegionId, entries: Vec<Row>) -> Event {
    Event {
        region_id: region_id.0,
        index: 0,
        request_id: request_id.0,
        event: Some(event::Event::Entries(Entries { entries })),
    }
}

/// The one INITIALIZED row that ends a subscription's initialization.
pub(crate) fn initialized_event(request_id: RequestId, region_id: RegionId) -> Event {
    let row = Row {
        r#type: LogType::Initialized as i32,
        ..Row::default()
    };
    entries_event(request_id, region_id, vec![row])
}

/// The final event of a refused or stopped subscription.
pub(crate) fn error_event(
    request_id: RequestId,
    region_id: RegionId,
    error: cdcpb::Error,
) -> Event {
    Event {
        region_id: region_id.0,
        index: 0,
        request_id: request_id.0,
        event: Some(event::Event::Error(error)),
    }
}

fn congested_event(request_id: RequestId, region_id: RegionId) -> Event {
    error_event(
        request_id,
        region_id,
        cdcpb::Error {
            congested: Some(Congested {
                region_id: region_id.0,
            }),
            ..cdcpb::Error::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn row(value_len: usize) -> Row {
        Row {
            r#type: LogType::Committed as i32,
            key: Bytes::from_static(b"k"),
            value: vec![7; value_len].into(),
            ..Row::default()
        }
    }

    fn payload(event: &Event) -> usize {
        match &event.event {
            Some(event::Event::Entries(e)) => e.entries.iter().map(Row::encoded_len).sum(),
            _ => 0,
        }
    }

    #[test]
    fn rows_are_grouped_under_the_cap_in_order() {
        let rows: Vec<Row> = (0..500)
            .map(|i| {
                let mut r = row(100 + i % 7);
                r.start_ts = i as u64;
                r
            })
            .collect();
        let total: usize = rows.iter().map(Row::encoded_len).sum();
        let events = entries_events(RequestId(3), RegionId(4), rows);
        assert!(events.len() >= total.div_ceil(EVENT_MAX_ROW_BYTES));
        let mut next_ts = 0;
        for e in &events {
            assert_eq!((e.request_id, e.region_id), (3, 4));
            assert!(payload(e) <= EVENT_MAX_ROW_BYTES);
            let Some(event::Event::Entries(entries)) = &e.event else {
                panic!("entries expected");
            };
            for r in &entries.entries {
                assert_eq!(r.start_ts, next_ts);
                next_ts += 1;
            }
        }
        assert_eq!(next_ts, 500);
    }

    #[test]
    fn an_oversized_row_travels_alone() {
        let events = entries_events(
            RequestId(1),
            RegionId(2),
            vec![row(10), row(EVENT_MAX_ROW_BYTES + 5), row(10)],
        );
        assert_eq!(events.len(), 3);
        assert!(payload(&events[1]) > EVENT_MAX_ROW_BYTES);
    }

    #[test]
    fn pack_respects_the_message_cap_and_reports_exact_sizes() {
        let big = |i: u64| {
            let mut r = row(EVENT_MAX_ROW_BYTES - 64);
            r.start_ts = i;
            entries_event(RequestId(1), RegionId(2), vec![r])
        };
        let events: Vec<Item> = (0..400).map(|i| Item::Event(big(i))).collect();
        let packed = pack(events);
        assert!(packed.len() >= 2);
        let mut count = 0;
        for (message, bytes) in &packed {
            assert_eq!(message.encoded_len(), *bytes);
            assert!(*bytes <= CHANGE_DATA_EVENT_MAX_BYTES);
            count += message.events.len();
        }
        assert_eq!(count, 400);
    }

    #[test]
    fn boundaries_split_messages() {
        let e = |i| entries_event(RequestId(1), RegionId(2), vec![row(i)]);
        let items = vec![
            Item::Boundary,
            Item::Event(e(1)),
            Item::Event(e(2)),
            Item::Boundary,
            Item::Boundary,
            Item::Event(e(3)),
            Item::Boundary,
        ];
        let sizes: Vec<usize> = pack(items).iter().map(|(m, _)| m.events.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
    }
}
