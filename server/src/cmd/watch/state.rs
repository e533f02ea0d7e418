//! The protocol state of a watch, free of I/O: what each feed event means
//! for the output, for the subscriptions and for recovery. The driver in
//! the parent module feeds it events and writes the lines it produces.
//!
//! Invariants:
//! - a subscription's `floor` only rises, and only from resolved
//!   timestamps received after its INITIALIZED row, so everything committed
//!   at or below it has been delivered;
//! - a subscription leaves `subs` on its error event, never otherwise
//!   (a lost stream keeps every subscription, to be registered again);
//! - a staged value lives from its PREWRITE to its COMMIT or ROLLBACK;
//! - `printed` holds only pairs above the lowest floor (and at most
//!   [`MAX_REMEMBERED`]), so it is bounded by what is still replayable.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use kvfeed_proto::cdcpb::change_data_request::{self, Register};
use kvfeed_proto::cdcpb::event::row::OpType;
use kvfeed_proto::cdcpb::event::{self, LogType, Row};
use kvfeed_proto::cdcpb::{self, ChangeDataEvent, ChangeDataRequest, Header};
use prost::Message;

use super::progress::CatchUp;
use super::render::{Change, describe, wall_time};
use super::{
    MAX_REMEMBERED, PROGRESS_INTERVAL, REGION_ATTEMPTS, TICDC_VERSION, WatchError, WatchSpec,
};
use kvfeed_client::region::clip;
use kvfeed_client::{KeyMode, RegionInfo};

/// Lines produced by one event.
#[derive(Debug, Default)]
pub(super) struct Lines {
    pub(super) out: Vec<String>,
    pub(super) notices: Vec<String>,
    /// Catch-up progress, when due: transient, shown in place on a terminal.
    pub(super) status: Option<String>,
}

/// One subscription on the current stream.
#[derive(Debug, Clone)]
struct Sub {
    region: RegionInfo,
    /// The subscribed range (PD's key space): the watched range ∩ region.
    start: Vec<u8>,
    end: Vec<u8>,
    /// Everything committed at or below it has been delivered.
    floor: u64,
    initialized: bool,
    /// Region-error retries in a row that led to this subscription.
    attempts: u32,
}

/// A range to look up in PD and subscribe again.
#[derive(Debug, Clone)]
pub(super) struct Parked {
    pub(super) start: Vec<u8>,
    pub(super) end: Vec<u8>,
    pub(super) floor: u64,
    pub(super) attempts: u32,
}

/// The protocol state of a watch, free of I/O so it can be tested alone.
#[derive(Debug)]
pub(super) struct State {
    pub(super) spec: WatchSpec,
    cluster_id: u64,
    pub(super) checkpoint: u64,
    next_request_id: u64,
    subs: BTreeMap<u64, Sub>,
    pub(super) parked: Vec<Parked>,
    /// Prewritten values by (key, start_ts), until COMMIT or ROLLBACK.
    staged: HashMap<(Bytes, u64), Bytes>,
    /// Printed (commit_ts, key) pairs above the floors.
    printed: BTreeSet<(u64, Bytes)>,
    announced: bool,
    last_progress: Option<tokio::time::Instant>,
    /// Counts the catch-up of `--from-ts` until every region is initialized.
    catch_up: Option<CatchUp>,
}

impl State {
    pub(super) fn new(spec: WatchSpec, cluster_id: u64) -> State {
        let catch_up = spec
            .from_ts
            .map(|_| CatchUp::new(tokio::time::Instant::now(), spec.progress_tty));
        State {
            catch_up,
            spec,
            cluster_id,
            checkpoint: 0,
            next_request_id: 1,
            subs: BTreeMap::new(),
            parked: Vec::new(),
            staged: HashMap::new(),
            printed: BTreeSet::new(),
            announced: false,
            last_progress: None,
        }
    }

    /// Subscriptions for `parked`'s range in `regions`; returns their
    /// Register requests.
    pub(super) fn subscribe(
        &mut self,
        parked: &Parked,
        regions: Vec<RegionInfo>,
    ) -> Vec<ChangeDataRequest> {
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
                region,
                start,
                end,
                floor: parked.floor,
                initialized: false,
                attempts: parked.attempts,
            };
            requests.push(self.register(id, &sub));
            self.subs.insert(id, sub);
        }
        requests
    }

    /// Register requests for every subscription (a new stream).
    pub(super) fn registers(&self) -> Vec<ChangeDataRequest> {
        self.subs
            .iter()
            .map(|(id, sub)| self.register(*id, sub))
            .collect()
    }

    fn register(&self, request_id: u64, sub: &Sub) -> ChangeDataRequest {
        ChangeDataRequest {
            header: Some(Header {
                cluster_id: self.cluster_id,
                ticdc_version: TICDC_VERSION.to_owned(),
            }),
            region_id: sub.region.id.0,
            region_epoch: Some(sub.region.epoch),
            checkpoint_ts: sub.floor,
            start_key: sub.start.clone(),
            end_key: sub.end.clone(),
            request_id,
            request: Some(change_data_request::Request::Register(Register {})),
            kv_api: self.spec.kv_api().into(),
            ..ChangeDataRequest::default()
        }
    }

    /// After a lost stream: every subscription is registered again on the
    /// next one, from its floor.
    pub(super) fn requeue_all(&mut self) {
        for sub in self.subs.values_mut() {
            sub.initialized = false;
        }
    }

    pub(super) fn on_event(
        &mut self,
        event: ChangeDataEvent,
        lines: &mut Lines,
    ) -> Result<(), WatchError> {
        for e in event.events {
            match e.event {
                Some(event::Event::Entries(entries)) => {
                    if self.subs.contains_key(&e.request_id) {
                        self.count_catch_up(&entries.entries, lines);
                        for row in entries.entries {
                            self.on_row(e.request_id, row, lines);
                        }
                    }
                }
                Some(event::Event::Error(error)) => self.on_error(e.request_id, &error, lines)?,
                Some(event::Event::ResolvedTs(ts)) => {
                    self.on_resolved(e.request_id, &[e.region_id], ts, lines);
                }
                Some(event::Event::Admin(_) | event::Event::LongTxn(_)) | None => {}
            }
        }
        if let Some(resolved) = event.resolved_ts {
            self.on_resolved(resolved.request_id, &resolved.regions, resolved.ts, lines);
        }
        Ok(())
    }

    /// Counts change rows toward the catch-up progress while it lasts.
    fn count_catch_up(&mut self, rows: &[Row], lines: &mut Lines) {
        let Some(catch_up) = &mut self.catch_up else {
            return;
        };
        let changes = rows
            .iter()
            .filter(|r| r.r#type != LogType::Initialized as i32);
        let (count, bytes) = changes.fold((0u64, 0u64), |(n, b), r| {
            (n + 1, b + r.encoded_len() as u64)
        });
        if count == 0 {
            return;
        }
        if let Some(line) = catch_up.add(count, bytes, tokio::time::Instant::now()) {
            lines.status = Some(line);
        }
    }

    fn on_row(&mut self, request_id: u64, row: Row, lines: &mut Lines) {
        let staged_key = (row.key.clone(), row.start_ts);
        match LogType::try_from(row.r#type) {
            Ok(LogType::Initialized) => {
                if let Some(sub) = self.subs.get_mut(&request_id) {
                    sub.initialized = true;
                    sub.attempts = 0;
                }
                self.maybe_announce(lines);
            }
            Ok(LogType::Prewrite) => {
                self.staged.insert(staged_key, row.value);
            }
            Ok(LogType::Rollback) => {
                self.staged.remove(&staged_key);
            }
            Ok(LogType::Commit) => {
                let staged = self.staged.remove(&staged_key);
                let value = match staged {
                    Some(value) if row.value.is_empty() => value,
                    _ => row.value.clone(),
                };
                self.print(&row, value, lines);
            }
            Ok(LogType::Committed) => {
                self.staged.remove(&staged_key);
                let value = row.value.clone();
                self.print(&row, value, lines);
            }
            Ok(LogType::Unknown) | Err(_) => {}
        }
    }

    fn print(&mut self, row: &Row, value: Bytes, lines: &mut Lines) {
        if !self.printed.insert((row.commit_ts, row.key.clone())) {
            return;
        }
        while self.printed.len() > MAX_REMEMBERED {
            self.printed.pop_first();
        }
        let change = Change {
            delete: row.op_type == OpType::Delete as i32,
            key: &row.key,
            value: &value,
            start_ts: row.start_ts,
            commit_ts: row.commit_ts,
        };
        lines.out.push(change.line(self.spec.style, self.spec.json));
    }

    fn maybe_announce(&mut self, lines: &mut Lines) {
        if self.announced || !self.parked.is_empty() {
            return;
        }
        if self.subs.is_empty() || !self.subs.values().all(|s| s.initialized) {
            return;
        }
        self.announced = true;
        if let Some(catch_up) = self.catch_up.take() {
            lines.status = None;
            lines
                .notices
                .push(catch_up.summary(tokio::time::Instant::now()));
        }
        let kind = match self.spec.mode {
            KeyMode::Txn => "transactional",
            KeyMode::Raw => "raw",
        };
        let regions = self.subs.len();
        let plural = if regions == 1 { "" } else { "s" };
        lines.notices.push(format!(
            "watching {} ({kind} keys, {regions} region{plural}) for changes after ts={} ({})",
            self.spec.description,
            self.checkpoint,
            wall_time(self.checkpoint)
        ));
    }

    fn on_error(
        &mut self,
        request_id: u64,
        error: &cdcpb::Error,
        lines: &mut Lines,
    ) -> Result<(), WatchError> {
        let Some(sub) = self.subs.remove(&request_id) else {
            return Ok(());
        };
        let region = sub.region.id.0;
        let (reason, retryable) = describe(error);
        if !retryable {
            return Err(WatchError::Refused { region, reason });
        }
        let attempts = sub.attempts + 1;
        if attempts >= REGION_ATTEMPTS {
            return Err(WatchError::RegionRetries {
                region,
                reason,
                attempts,
            });
        }
        lines
            .notices
            .push(format!("region {region}: {reason}; subscribing again"));
        self.parked.push(Parked {
            start: sub.start,
            end: sub.end,
            floor: sub.floor,
            attempts,
        });
        Ok(())
    }

    /// A resolved ts for `regions` of `request_id` (0: of any request, as
    /// servers that predate per-request resolved ts send it).
    fn on_resolved(&mut self, request_id: u64, regions: &[u64], ts: u64, lines: &mut Lines) {
        for (id, sub) in &mut self.subs {
            let ours = request_id == 0 || request_id == *id;
            // Before INITIALIZED a resolved ts does not cover the catch-up.
            if ours && sub.initialized && regions.contains(&sub.region.id.0) {
                sub.floor = sub.floor.max(ts);
            }
        }
        // Pairs at or below every floor can never be delivered again.
        if let Some(lowest) = self.subs.values().map(|s| s.floor).min() {
            while self
                .printed
                .first()
                .is_some_and(|(commit_ts, _)| *commit_ts <= lowest)
            {
                self.printed.pop_first();
            }
            if self.spec.progress {
                let now = tokio::time::Instant::now();
                if self
                    .last_progress
                    .is_none_or(|last| now.duration_since(last) >= PROGRESS_INTERVAL)
                {
                    self.last_progress = Some(now);
                    lines
                        .notices
                        .push(format!("resolved ts={lowest} ({})", wall_time(lowest)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::format::Style;
    use kvfeed_proto::cdcpb::change_data_request::KvApi;
    use kvfeed_proto::cdcpb::event::Entries;
    use kvfeed_proto::cdcpb::{ClusterIdMismatch, ResolvedTs};
    use kvfeed_proto::errorpb::EpochNotMatch;
    use kvfeed_proto::metapb;
    use kvfeed_storage::region::RegionId;

    fn spec(mode: KeyMode, json: bool) -> WatchSpec {
        WatchSpec {
            mode,
            start: b"p".to_vec(),
            end: b"q".to_vec(),
            description: "prefix p".to_owned(),
            from_ts: None,
            style: Style::Text,
            json,
            progress: false,
            progress_tty: false,
        }
    }

    fn region(id: u64, start: &[u8], end: &[u8]) -> RegionInfo {
        RegionInfo {
            id: RegionId(id),
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            epoch: metapb::RegionEpoch {
                conf_ver: 1,
                version: 3,
            },
            leader: metapb::Peer {
                id: 100 + id,
                store_id: 1,
                ..Default::default()
            },
        }
    }

    /// A state with one raw-space subscription per region over [a, z).
    fn state(regions: Vec<RegionInfo>, json: bool) -> (State, Vec<ChangeDataRequest>) {
        let mut state = State::new(spec(KeyMode::Raw, json), 42);
        let parked = Parked {
            start: b"a".to_vec(),
            end: b"z".to_vec(),
            floor: 100,
            attempts: 0,
        };
        let requests = state.subscribe(&parked, regions);
        (state, requests)
    }

    fn row(kind: LogType, op: OpType, key: &[u8], value: &[u8], start: u64, commit: u64) -> Row {
        Row {
            r#type: kind as i32,
            op_type: op as i32,
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            start_ts: start,
            commit_ts: commit,
            ..Row::default()
        }
    }

    fn rows(request_id: u64, rows: Vec<Row>) -> ChangeDataEvent {
        ChangeDataEvent {
            events: vec![cdcpb::Event {
                request_id,
                event: Some(event::Event::Entries(Entries { entries: rows })),
                ..cdcpb::Event::default()
            }],
            resolved_ts: None,
        }
    }

    fn error(request_id: u64, error: cdcpb::Error) -> ChangeDataEvent {
        ChangeDataEvent {
            events: vec![cdcpb::Event {
                request_id,
                event: Some(event::Event::Error(error)),
                ..cdcpb::Event::default()
            }],
            resolved_ts: None,
        }
    }

    fn feed(state: &mut State, event: ChangeDataEvent) -> Lines {
        let mut lines = Lines::default();
        state.on_event(event, &mut lines).expect("no fatal error");
        lines
    }

    fn initialized() -> Row {
        row(LogType::Initialized, OpType::Unknown, b"", b"", 0, 0)
    }

    #[test]
    fn registers_clip_the_range_to_each_region() {
        let (_, requests) = state(vec![region(2, b"", b"m"), region(3, b"m", b"")], false);
        let summary: Vec<String> = requests
            .iter()
            .map(|r| {
                let start = String::from_utf8_lossy(&r.start_key);
                let end = String::from_utf8_lossy(&r.end_key);
                format!(
                    "{} {} [{start}, {end}) {}",
                    r.request_id, r.region_id, r.checkpoint_ts
                )
            })
            .collect();
        assert_eq!(summary, vec!["1 2 [a, m) 100", "2 3 [m, z) 100"]);
        let header = requests[0].header.clone().expect("header");
        assert_eq!(
            (header.cluster_id, header.ticdc_version.as_str()),
            (42, "8.5.0")
        );
        assert_eq!(requests[0].kv_api, KvApi::RawKv as i32);
        assert_eq!(requests[0].region_epoch.map(|e| e.version), Some(3));
    }

    #[test]
    fn commits_print_the_prewritten_value_and_rollbacks_nothing() {
        let (mut state, _) = state(vec![region(2, b"", b"")], false);
        let lines = feed(
            &mut state,
            rows(
                1,
                vec![
                    row(LogType::Prewrite, OpType::Put, b"pk", b"big", 10, 0),
                    row(LogType::Prewrite, OpType::Put, b"pr", b"gone", 11, 0),
                    row(LogType::Rollback, OpType::Unknown, b"pr", b"", 11, 0),
                    row(LogType::Commit, OpType::Put, b"pk", b"", 10, 12),
                    row(LogType::Committed, OpType::Delete, b"pd", b"", 13, 13),
                ],
            ),
        );
        assert_eq!(
            lines.out,
            vec![
                format!("PUT pk big  ts=12 ({})", wall_time(12)),
                format!("DELETE pd  ts=13 ({})", wall_time(13)),
            ]
        );
        assert!(state.staged.is_empty(), "{:?}", state.staged);
        // The same change delivered again (a replay) is not printed twice.
        let again = feed(
            &mut state,
            rows(
                1,
                vec![row(LogType::Committed, OpType::Delete, b"pd", b"", 13, 13)],
            ),
        );
        assert!(again.out.is_empty(), "{:?}", again.out);
    }

    #[test]
    fn json_lines_carry_every_field() {
        let (mut state, _) = state(vec![region(2, b"", b"")], true);
        let lines = feed(
            &mut state,
            rows(
                1,
                vec![row(
                    LogType::Committed,
                    OpType::Put,
                    b"k",
                    &[0xff],
                    5,
                    6 << 18,
                )],
            ),
        );
        let json: serde_json::Value = serde_json::from_str(&lines.out[0]).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "op": "PUT", "key": "k", "value": "\\xff", "key_hex": "6b", "value_hex": "ff",
                "commit_ts": 6 << 18, "start_ts": 5, "wall_time": "1970-01-01T00:00:00.006Z",
            })
        );
    }

    #[test]
    fn watching_is_announced_once_every_subscription_is_initialized() {
        let (mut state, _) = state(vec![region(2, b"", b"m"), region(3, b"m", b"")], false);
        assert!(
            feed(&mut state, rows(1, vec![initialized()]))
                .notices
                .is_empty()
        );
        let lines = feed(&mut state, rows(2, vec![initialized()]));
        assert_eq!(lines.notices.len(), 1, "{:?}", lines.notices);
        assert!(lines.notices[0].starts_with("watching prefix p (raw keys, 2 regions)"));
        assert!(
            feed(&mut state, rows(2, vec![initialized()]))
                .notices
                .is_empty()
        );
    }

    #[test]
    fn region_errors_park_the_range_from_its_floor_until_attempts_run_out() {
        let (mut state, _) = state(vec![region(2, b"", b"")], false);
        feed(&mut state, rows(1, vec![initialized()]));
        let resolved = ChangeDataEvent {
            events: vec![],
            resolved_ts: Some(ResolvedTs {
                regions: vec![2],
                ts: 150,
                request_id: 1,
            }),
        };
        feed(&mut state, resolved);
        assert_eq!(state.registers()[0].checkpoint_ts, 150);
        let stale = cdcpb::Error {
            epoch_not_match: Some(EpochNotMatch::default()),
            ..cdcpb::Error::default()
        };
        let lines = feed(&mut state, error(1, stale.clone()));
        assert!(
            lines.notices[0].contains("epoch_not_match"),
            "{:?}",
            lines.notices
        );
        assert!(state.subs.is_empty());
        let parked = state.parked.pop().expect("parked");
        assert_eq!((parked.floor, parked.attempts), (150, 1));
        assert_eq!(
            (parked.start.as_slice(), parked.end.as_slice()),
            (&b"a"[..], &b"z"[..])
        );

        // Failing again and again: parked with one more attempt each time,
        // until the budget is spent.
        let mut parked = parked;
        loop {
            let new_ids: Vec<u64> = state
                .subscribe(&parked, vec![region(2, b"", b"")])
                .iter()
                .map(|r| r.request_id)
                .collect();
            let mut lines = Lines::default();
            match state.on_event(error(new_ids[0], stale.clone()), &mut lines) {
                Ok(()) => parked = state.parked.pop().expect("parked again"),
                Err(WatchError::RegionRetries {
                    region, attempts, ..
                }) => {
                    assert_eq!((region, attempts), (2, REGION_ATTEMPTS));
                    break;
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn refusals_that_retrying_cannot_fix_are_fatal() {
        let (mut state, _) = state(vec![region(2, b"", b"")], false);
        let mismatch = cdcpb::Error {
            cluster_id_mismatch: Some(ClusterIdMismatch {
                current: 7,
                request: 42,
            }),
            ..cdcpb::Error::default()
        };
        let mut lines = Lines::default();
        match state.on_event(error(1, mismatch), &mut lines) {
            Err(WatchError::Refused { region, reason }) => {
                assert_eq!(region, 2);
                assert!(reason.contains("cluster_id_mismatch"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn resolved_ts_before_initialized_does_not_raise_the_floor() {
        let (mut state, _) = state(vec![region(2, b"", b"")], false);
        let resolved = |ts| ChangeDataEvent {
            events: vec![],
            resolved_ts: Some(ResolvedTs {
                regions: vec![2],
                ts,
                request_id: 1,
            }),
        };
        feed(&mut state, resolved(500));
        assert_eq!(state.registers()[0].checkpoint_ts, 100);
        feed(&mut state, rows(1, vec![initialized()]));
        feed(
            &mut state,
            rows(
                1,
                vec![row(LogType::Committed, OpType::Put, b"k", b"v", 200, 200)],
            ),
        );
        assert_eq!(state.printed.len(), 1);
        feed(&mut state, resolved(300));
        assert_eq!(state.registers()[0].checkpoint_ts, 300);
        assert!(
            state.printed.is_empty(),
            "pairs below every floor are forgotten"
        );
    }
}
