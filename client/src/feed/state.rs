//! The feed client's protocol state, free of I/O: what each event of the
//! feed means for the subscriptions, for recovery and for the items handed
//! to the consumer. The driver in the parent module owns the streams and PD.
//!
//! Invariants:
//! - a subscription's `floor` only rises, and only from resolved timestamps
//!   received after its INITIALIZED row, so everything committed at or below
//!   it has been delivered;
//! - a subscription leaves `subs` on its error event or when its store's
//!   stream is lost, and then its range is parked with its floor, never
//!   lower: a range is always either subscribed or parked, so none is lost;
//! - a re-registration starts from the floor, so the server sends only rows
//!   above it; rows at or below it are dropped should they come anyway, and
//!   rows above it already delivered are recognised in `delivered` (which
//!   holds only pairs above the lowest floor, at most [`MAX_REMEMBERED`]);
//! - a staged value lives from its PREWRITE to its COMMIT or ROLLBACK;
//! - the span's resolved ts is the minimum floor over subscribed and parked
//!   ranges, and is handed out only when it rises.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use bytes::Bytes;
use kvfeed_proto::cdcpb::event::row::OpType;
use kvfeed_proto::cdcpb::event::{self, LogType};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, ChangeDataRequest};
use kvfeed_types::TimeStamp;
use prost::Message;
use tokio::time::Instant;

use super::request::{Registration, describe};
use super::staging::{MemoryStaging, Staged, Staging};
use super::{Cause, FeedError, FeedEvent, Op, Row};
use crate::region::clip;
use crate::{KeyMode, RegionInfo};

/// Delivered (commit_ts, key) pairs kept for de-duplication. A pair is
/// forgotten once every floor has reached its commit_ts, or, past this
/// many, lowest commit_ts first; the bound caps the feed's memory at about
/// this many keys however long resolved ts stalls.
pub const MAX_REMEMBERED: usize = 100_000;

/// Part of a received message still to be worked through.
#[derive(Debug)]
enum Pending {
    /// Change rows of one subscription.
    Rows {
        request_id: u64,
        rows: std::vec::IntoIter<cdcpb::event::Row>,
    },
    /// An error ending one subscription.
    Error {
        request_id: u64,
        error: cdcpb::Error,
    },
    /// A resolved ts for regions of one stream.
    Resolved {
        request_id: u64,
        regions: Vec<u64>,
        ts: u64,
    },
}

/// One registered subscription.
#[derive(Debug, Clone)]
pub(super) struct Sub {
    pub(super) region: RegionInfo,
    /// The store whose stream carries it.
    pub(super) store: u64,
    /// The subscribed range (PD's key space): the watched range ∩ region.
    start: Vec<u8>,
    end: Vec<u8>,
    /// Everything committed at or below it has been delivered.
    floor: u64,
    initialized: bool,
    /// Retries in a row that led to this subscription, and why.
    attempts: u32,
    cause: Cause,
}

/// A range to look up in PD and subscribe again.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    pub(super) start: Vec<u8>,
    pub(super) end: Vec<u8>,
    pub(super) floor: u64,
    pub(super) attempts: u32,
    pub(super) cause: Cause,
    /// Not looked up before then (the backoff).
    pub(super) due: Instant,
}

impl Parked {
    fn new(range: (Vec<u8>, Vec<u8>), floor: u64, attempts: u32, cause: Cause) -> Parked {
        Parked {
            start: range.0,
            end: range.1,
            floor,
            attempts,
            cause,
            due: Instant::now() + cause.delay(attempts),
        }
    }
}

/// The protocol state of a feed.
#[derive(Debug)]
pub(super) struct State {
    mode: KeyMode,
    /// Registrations ask for old values.
    old_value: bool,
    cluster_id: u64,
    next_request_id: u64,
    subs: BTreeMap<u64, Sub>,
    /// The floors of `subs` as a multiset (floor → subscriptions at it),
    /// and how many of `subs` are initialized: kept with `subs` so that a
    /// resolved ts or an INITIALIZED row costs O(log n), not a pass over
    /// every subscription — a feed of thousands of regions gets one
    /// resolved ts message per region and interval.
    floors: BTreeMap<u64, usize>,
    initialized: usize,
    pub(super) parked: Vec<Parked>,
    /// Prewritten values by (key, start_ts), until COMMIT or ROLLBACK.
    pub(super) staged: Box<dyn Staging>,
    /// Delivered (commit_ts, key) pairs above the floors.
    delivered: BTreeSet<(u64, Bytes)>,
    /// The last span resolved ts handed out.
    resolved: u64,
    /// Whether every range has been initialized once (catch-up is over).
    caught_up: bool,
    /// Items for the consumer, in order.
    pub(super) out: VecDeque<FeedEvent>,
    /// Received messages not yet worked through, in order; see
    /// [`State::pump`].
    inbox: VecDeque<Pending>,
}

impl State {
    /// Keeps prewritten values in `staging`.
    pub(super) fn with_staging(mut self, staging: Box<dyn Staging>) -> State {
        self.staged = staging;
        self
    }

    /// Makes every registration ask for old values.
    pub(super) fn with_old_value(mut self, old_value: bool) -> State {
        self.old_value = old_value;
        self
    }

    pub(super) fn new(mode: KeyMode, cluster_id: u64, range: (Vec<u8>, Vec<u8>), ts: u64) -> State {
        State {
            mode,
            old_value: false,
            cluster_id,
            next_request_id: 1,
            subs: BTreeMap::new(),
            floors: BTreeMap::new(),
            initialized: 0,
            parked: vec![Parked::new(range, ts, 0, Cause::Region)],
            staged: Box::new(MemoryStaging::default()),
            delivered: BTreeSet::new(),
            resolved: ts,
            caught_up: false,
            out: VecDeque::new(),
            inbox: VecDeque::new(),
        }
    }

    /// Subscriptions for `parked`'s range in `regions`, each on the store
    /// its leader is on; returns (store, Register request) pairs.
    pub(super) fn subscribe(
        &mut self,
        parked: &Parked,
        regions: Vec<RegionInfo>,
    ) -> Vec<(u64, ChangeDataRequest)> {
        let mut requests = Vec::new();
        for region in regions {
            let Some((start, end)) = clip(
                &parked.start,
                &parked.end,
                &region.start_key,
                &region.end_key,
            ) else {
                continue;
            };
            let id = self.next_request_id;
            self.next_request_id += 1;
            let sub = Sub {
                store: region.leader.store_id,
                region,
                start,
                end,
                floor: parked.floor,
                initialized: false,
                attempts: parked.attempts,
                cause: parked.cause,
            };
            requests.push((sub.store, self.register(id, &sub)));
            self.insert_sub(id, sub);
        }
        requests
    }

    fn register(&self, request_id: u64, sub: &Sub) -> ChangeDataRequest {
        Registration {
            cluster_id: self.cluster_id,
            request_id,
            region: &sub.region,
            start: &sub.start,
            end: &sub.end,
            checkpoint_ts: sub.floor,
            mode: self.mode,
            old_value: self.old_value,
        }
        .request()
    }

    /// The stream of `store` is gone: every subscription on it is parked
    /// from its floor, to be looked up again.
    pub(super) fn store_lost(
        &mut self,
        store: u64,
        reason: &str,
        limit: u32,
    ) -> Result<(), FeedError> {
        let lost: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.store == store)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(sub) = self.remove_sub(id) {
                let attempts = match sub.cause {
                    Cause::Stream => sub.attempts + 1,
                    Cause::Region => 1,
                };
                if attempts >= limit {
                    return Err(FeedError::Disconnected {
                        last: reason.to_owned(),
                        attempts,
                    });
                }
                self.park(sub, attempts, Cause::Stream);
            }
        }
        Ok(())
    }

    /// A parked range could not be looked up (PD unreachable): park it again
    /// with one more attempt, or give up.
    pub(super) fn repark(
        &mut self,
        parked: Parked,
        last: String,
        limit: u32,
    ) -> Result<(), FeedError> {
        let attempts = parked.attempts + 1;
        if attempts >= limit {
            return Err(FeedError::Disconnected { last, attempts });
        }
        let range = (parked.start, parked.end);
        self.parked
            .push(Parked::new(range, parked.floor, attempts, Cause::Stream));
        Ok(())
    }

    fn park(&mut self, sub: Sub, attempts: u32, cause: Cause) {
        let range = (sub.start, sub.end);
        self.parked
            .push(Parked::new(range, sub.floor, attempts, cause));
    }

    /// Adds a subscription under a fresh request id, with its floor.
    fn insert_sub(&mut self, id: u64, sub: Sub) {
        *self.floors.entry(sub.floor).or_default() += 1;
        if sub.initialized {
            self.initialized += 1;
        }
        if let Some(old) = self.subs.insert(id, sub) {
            // Request ids are never reused; should one be, forget the old.
            forget_floor(&mut self.floors, old.floor);
            if old.initialized {
                self.initialized -= 1;
            }
        }
    }

    /// Removes a subscription and its floor.
    fn remove_sub(&mut self, id: u64) -> Option<Sub> {
        let sub = self.subs.remove(&id)?;
        forget_floor(&mut self.floors, sub.floor);
        if sub.initialized {
            self.initialized -= 1;
        }
        Some(sub)
    }

    /// Whether `request_id` is still a registered subscription.
    pub(super) fn is_subscribed(&self, request_id: u64) -> bool {
        self.subs.contains_key(&request_id)
    }

    /// Takes in one received message and works through it completely.
    #[cfg(test)]
    pub(super) fn on_event(
        &mut self,
        event: ChangeDataEvent,
        region_limit: u32,
    ) -> Result<(), FeedError> {
        self.accept(event);
        self.pump(region_limit, usize::MAX)
    }

    /// Queues one received message's contents, to be worked through by
    /// [`State::pump`] in order.
    pub(super) fn accept(&mut self, event: ChangeDataEvent) {
        for e in event.events {
            match e.event {
                Some(event::Event::Entries(entries)) => {
                    if self.subs.contains_key(&e.request_id) {
                        self.count_catch_up(&entries.entries);
                        self.inbox.push_back(Pending::Rows {
                            request_id: e.request_id,
                            rows: entries.entries.into_iter(),
                        });
                    }
                }
                Some(event::Event::Error(error)) => {
                    self.inbox.push_back(Pending::Error {
                        request_id: e.request_id,
                        error,
                    });
                }
                Some(event::Event::ResolvedTs(ts)) => {
                    self.inbox.push_back(Pending::Resolved {
                        request_id: e.request_id,
                        regions: vec![e.region_id],
                        ts,
                    });
                }
                Some(event::Event::Admin(_) | event::Event::LongTxn(_)) | None => {}
            }
        }
        if let Some(resolved) = event.resolved_ts {
            self.inbox.push_back(Pending::Resolved {
                request_id: resolved.request_id,
                regions: resolved.regions,
                ts: resolved.ts,
            });
        }
    }

    /// Whether a received message is not yet worked through.
    pub(super) fn has_inbox(&self) -> bool {
        !self.inbox.is_empty()
    }

    /// Works through queued messages until `max_out` items wait for the
    /// consumer: one message of COMMIT rows can carry tens of thousands of
    /// rows, each joined with its staged value, and turning all of them
    /// into items at once would hold them all in memory.
    pub(super) fn pump(&mut self, region_limit: u32, max_out: usize) -> Result<(), FeedError> {
        while self.out.len() < max_out {
            let Some(front) = self.inbox.front_mut() else {
                return Ok(());
            };
            let next_row = match front {
                Pending::Rows { request_id, rows } => Some((*request_id, rows.next())),
                _ => None,
            };
            match next_row {
                Some((request_id, Some(row))) => self.on_row(request_id, row)?,
                Some((_, None)) => {
                    self.inbox.pop_front();
                }
                None => match self.inbox.pop_front() {
                    Some(Pending::Error { request_id, error }) => {
                        self.on_error(request_id, &error, region_limit)?;
                    }
                    Some(Pending::Resolved {
                        request_id,
                        regions,
                        ts,
                    }) => self.on_resolved(request_id, &regions, ts),
                    Some(Pending::Rows { .. }) | None => {}
                },
            }
        }
        Ok(())
    }

    /// Counts change rows toward the catch-up progress while it lasts.
    fn count_catch_up(&mut self, rows: &[cdcpb::event::Row]) {
        if self.caught_up {
            return;
        }
        let changes = rows
            .iter()
            .filter(|r| r.r#type != LogType::Initialized as i32);
        let (rows, bytes) = changes.fold((0u64, 0u64), |(n, b), r| {
            (n + 1, b + r.encoded_len() as u64)
        });
        if rows > 0 {
            self.out.push_back(FeedEvent::CatchUp { rows, bytes });
        }
    }

    fn on_row(&mut self, request_id: u64, row: cdcpb::event::Row) -> Result<(), FeedError> {
        match LogType::try_from(row.r#type) {
            Ok(LogType::Initialized) => {
                if let Some(sub) = self.subs.get_mut(&request_id) {
                    if !sub.initialized {
                        sub.initialized = true;
                        self.initialized += 1;
                    }
                    sub.attempts = 0;
                }
                self.on_initialized();
            }
            Ok(LogType::Prewrite) => {
                let staged = Staged {
                    value: row.value,
                    old_value: row.old_value,
                };
                self.staged.stage(&row.key, row.start_ts, staged)?;
            }
            Ok(LogType::Rollback) => {
                self.staged.take(&row.key, row.start_ts)?;
            }
            Ok(LogType::Commit) => {
                // The COMMIT row carries a short value only; the PREWRITE
                // carried the rest (and the old value), as TiCDC matches them.
                let staged = self
                    .staged
                    .take(&row.key, row.start_ts)?
                    .unwrap_or_default();
                let value = if row.value.is_empty() {
                    staged.value
                } else {
                    row.value.clone()
                };
                let old_value = if row.old_value.is_empty() {
                    staged.old_value
                } else {
                    row.old_value.clone()
                };
                self.deliver(request_id, row, value, old_value);
            }
            Ok(LogType::Committed) => {
                self.staged.take(&row.key, row.start_ts)?;
                let (value, old_value) = (row.value.clone(), row.old_value.clone());
                self.deliver(request_id, row, value, old_value);
            }
            Ok(LogType::Unknown) | Err(_) => {}
        }
        Ok(())
    }

    fn deliver(&mut self, request_id: u64, row: cdcpb::event::Row, value: Bytes, old_value: Bytes) {
        // At or below the floor it was delivered before this registration.
        let floor = self.subs.get(&request_id).map_or(0, |s| s.floor);
        if row.commit_ts <= floor || !self.delivered.insert((row.commit_ts, row.key.clone())) {
            return;
        }
        while self.delivered.len() > MAX_REMEMBERED {
            self.delivered.pop_first();
        }
        let op = if row.op_type == OpType::Delete as i32 {
            Op::Delete
        } else {
            Op::Put
        };
        self.out.push_back(FeedEvent::Row(Row {
            start_ts: TimeStamp::new(row.start_ts),
            commit_ts: TimeStamp::new(row.commit_ts),
            op,
            key: row.key,
            value,
            old_value,
        }));
    }

    fn on_initialized(&mut self) {
        let total = self.subs.len() + self.parked.len();
        let done = self.initialized;
        self.out.push_back(FeedEvent::Initialized {
            regions_done: done,
            regions_total: total,
        });
        if done == total {
            self.caught_up = true;
        }
    }

    fn on_error(
        &mut self,
        request_id: u64,
        error: &cdcpb::Error,
        limit: u32,
    ) -> Result<(), FeedError> {
        let Some(sub) = self.remove_sub(request_id) else {
            return Ok(());
        };
        let region = sub.region.id.0;
        let (reason, retryable) = describe(error);
        if !retryable {
            return Err(FeedError::Refused { region, reason });
        }
        let attempts = match sub.cause {
            Cause::Region => sub.attempts + 1,
            Cause::Stream => 1,
        };
        if attempts >= limit {
            return Err(FeedError::RegionRetries {
                region,
                reason,
                attempts,
            });
        }
        self.out
            .push_back(FeedEvent::RegionRetry { region, reason });
        self.park(sub, attempts, Cause::Region);
        Ok(())
    }

    /// A resolved ts for `regions` of `request_id` (0: of any request, as
    /// servers that predate per-request resolved ts send it).
    fn on_resolved(&mut self, request_id: u64, regions: &[u64], ts: u64) {
        // Before INITIALIZED a resolved ts does not cover the catch-up.
        let mut raise = |sub: &mut Sub| {
            if sub.initialized && ts > sub.floor {
                forget_floor(&mut self.floors, sub.floor);
                *self.floors.entry(ts).or_default() += 1;
                sub.floor = ts;
            }
        };
        if request_id == 0 {
            // One message for every subscription of the listed regions.
            let regions: HashSet<u64> = regions.iter().copied().collect();
            self.subs
                .values_mut()
                .filter(|sub| regions.contains(&sub.region.id.0))
                .for_each(&mut raise);
        } else if let Some(sub) = self.subs.get_mut(&request_id)
            && regions.contains(&sub.region.id.0)
        {
            raise(sub);
        }
        let subs = self.floors.keys().next().copied();
        let parked = self.parked.iter().map(|p| p.floor).min();
        let Some(lowest) = subs.into_iter().chain(parked).min() else {
            return;
        };
        // Pairs at or below every floor can never be delivered again.
        while self
            .delivered
            .first()
            .is_some_and(|(commit_ts, _)| *commit_ts <= lowest)
        {
            self.delivered.pop_first();
        }
        if lowest > self.resolved {
            self.resolved = lowest;
            self.out
                .push_back(FeedEvent::ResolvedTs(TimeStamp::new(lowest)));
        }
    }
}

/// Takes one subscription at `floor` out of the multiset.
fn forget_floor(floors: &mut BTreeMap<u64, usize>, floor: u64) {
    if let Some(count) = floors.get_mut(&floor) {
        *count -= 1;
        if *count == 0 {
            floors.remove(&floor);
        }
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
