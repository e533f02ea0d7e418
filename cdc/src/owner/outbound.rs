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
//! Each connection has a bounded channel of `sink_capacity +`
//! [`RESERVED_SLOTS`] messages. The owner is its only sender and only ever
//! `try_send`s, so a slow reader never stalls the owner (and with it every
//! other connection). Ordinary events may use all but the reserved slot;
//! the congestion notice may use it too. Since nobody else sends, a free
//! slot seen by the owner stays free until it uses it.
//!
//! # Congestion
//!
//! When an ordinary event finds no free slot, the connection is congested:
//! every subscription it has is stopped and removed, and one notice carries
//! a `congested` error for each of them, plus one for every Register whose
//! only answer (an error) could not be queued, so every request still gets
//! exactly one final answer. The rest of what could not be queued is
//! dropped, which is correct because the subscriptions it was for are
//! gone. Only this connection is affected (TiKV errors every subscriber of
//! the region instead). If even the reserved slot is taken (the client has
//! not read since the last notice), the connection cannot be told anything
//! and is ended ("congested"); a closed channel ends it as "send_failed".
//!
//! Bytes are accounted in `PendingBytes` before queueing and unaccounted by
//! the stream when taken, or here if queueing fails.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use kvfeed_proto::cdcpb::event::{self, Entries, LogType, Row};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, Congested, Event};

use crate::connection::CloseReason;
use crate::ids::{ConnId, RegionId, RequestId};
use crate::metrics::PendingBytes;
use crate::{CHANGE_DATA_EVENT_MAX_BYTES, EVENT_MAX_ROW_BYTES};

use super::registry::Registry;

/// Slots of each connection's channel kept for the congestion notice.
pub(crate) const RESERVED_SLOTS: usize = 1;

/// One message in a connection's channel, with its encoded size.
#[derive(Debug)]
pub(crate) struct Queued {
    pub event: ChangeDataEvent,
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    Full,
    Closed,
}

/// The owner's end of a connection's event channel.
#[derive(Debug)]
pub(crate) struct Sink {
    tx: mpsc::Sender<Queued>,
    pending: Arc<PendingBytes>,
}

impl Sink {
    pub(crate) fn new(tx: mpsc::Sender<Queued>, pending: Arc<PendingBytes>) -> Sink {
        Sink { tx, pending }
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending.get()
    }

    /// Queues `event` unless that would take a reserved slot (allowed only
    /// with `use_reserve`). Gives the event back when refused.
    fn send(
        &self,
        event: ChangeDataEvent,
        bytes: usize,
        use_reserve: bool,
    ) -> Result<(), (Refused, ChangeDataEvent)> {
        if self.tx.is_closed() {
            return Err((Refused::Closed, event));
        }
        if !use_reserve && self.tx.capacity() <= RESERVED_SLOTS {
            return Err((Refused::Full, event));
        }
        self.pending.add(bytes);
        match self.tx.try_send(Queued { event, bytes }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(q)) => {
                self.pending.sub(q.bytes);
                Err((Refused::Full, q.event))
            }
            Err(TrySendError::Closed(q)) => {
                self.pending.sub(q.bytes);
                Err((Refused::Closed, q.event))
            }
        }
    }
}

/// What a connection's resolved-ts (or other replaceable) message met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    Queued,
    /// No ordinary slot free; try again later.
    Full,
    /// The stream is gone.
    Closed,
}

impl Sink {
    /// Queues `event` in an ordinary slot if one is free. Unlike rows, a
    /// refused message does not congest the connection: the caller keeps
    /// it (or a newer replacement) for a later try.
    pub(crate) fn offer(&self, event: ChangeDataEvent) -> Offer {
        let bytes = event.encoded_len();
        match self.send(event, bytes, false) {
            Ok(()) => Offer::Queued,
            Err((Refused::Full, _)) => Offer::Full,
            Err((Refused::Closed, _)) => Offer::Closed,
        }
    }

    /// A handle that does not keep the channel open (for scan pacing).
    pub(crate) fn weak(&self) -> mpsc::WeakSender<Queued> {
        self.tx.downgrade()
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

    /// Queues everything on the connections' channels, handling congestion
    /// and closed channels as described in the module docs.
    pub(crate) fn flush(&mut self, registry: &mut Registry) {
        for (conn, events) in self.per_conn.drain() {
            let Some(state) = registry.conn(conn) else {
                continue;
            };
            let mut messages = pack(events).into_iter();
            let mut refused = None;
            for (message, bytes) in messages.by_ref() {
                if let Err((why, message)) = state.sink.send(message, bytes, false) {
                    refused = Some((why, message));
                    break;
                }
            }
            match refused {
                None => {}
                Some((Refused::Closed, _)) => {
                    registry.remove_conn(conn, CloseReason::SendFailed);
                }
                Some((Refused::Full, first)) => {
                    let unsent = std::iter::once(first).chain(messages.map(|(m, _)| m));
                    congest(registry, conn, unsent);
                }
            }
        }
    }
}

/// Stops every subscription of `conn` and tells the client so.
fn congest(registry: &mut Registry, conn: ConnId, unsent: impl Iterator<Item = ChangeDataEvent>) {
    let mut keys: BTreeSet<(RequestId, RegionId)> = unsent
        .flat_map(|m| m.events)
        .filter(|e| matches!(e.event, Some(event::Event::Error(_))))
        .map(|e| (RequestId(e.request_id), RegionId(e.region_id)))
        .collect();
    let stopped = registry.remove_all_subs(conn);
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
        "event queue full; the connection's subscriptions are stopped as congested"
    );
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
        Err((Refused::Full, _)) => {
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
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for row in rows {
        let len = row.encoded_len();
        if !current.is_empty() && size + len > EVENT_MAX_ROW_BYTES {
            out.push(entries_event(
                request_id,
                region_id,
                std::mem::take(&mut current),
            ));
            size = 0;
        }
        current.push(row);
        size += len;
    }
    if !current.is_empty() {
        out.push(entries_event(request_id, region_id, current));
    }
    out
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
    use super::*;

    fn row(value_len: usize) -> Row {
        Row {
            r#type: LogType::Committed as i32,
            key: b"k".to_vec(),
            value: vec![7; value_len],
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
