//! The protocol state alone: what each feed event becomes, and how ranges
//! are parked and registered again.

use super::*;
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use kvfeed_proto::cdcpb::event::{Entries, Row as WireRow};
use kvfeed_proto::cdcpb::{ClusterIdMismatch, ResolvedTs};
use kvfeed_proto::errorpb::EpochNotMatch;
use kvfeed_proto::metapb;
use kvfeed_types::{RegionId, encode_bytes};

use crate::feed::REGION_ATTEMPTS;
use std::time::Duration;

fn region(id: u64, store: u64, start: &[u8], end: &[u8]) -> RegionInfo {
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
            store_id: store,
            ..Default::default()
        },
    }
}

/// A state over raw [a, z) from ts 100, subscribed to `regions`.
fn state(regions: Vec<RegionInfo>) -> (State, Vec<(u64, ChangeDataRequest)>) {
    let mut state = State::new(KeyMode::Raw, 42, (b"a".to_vec(), b"z".to_vec()), 100);
    let parked = state.parked.pop().expect("the whole range is parked");
    let requests = state.subscribe(&parked, regions);
    (state, requests)
}

fn row(kind: LogType, op: OpType, key: &[u8], value: &[u8], start: u64, commit: u64) -> WireRow {
    WireRow {
        r#type: kind as i32,
        op_type: op as i32,
        key: Bytes::copy_from_slice(key),
        value: Bytes::copy_from_slice(value),
        start_ts: start,
        commit_ts: commit,
        ..WireRow::default()
    }
}

fn rows(request_id: u64, rows: Vec<WireRow>) -> ChangeDataEvent {
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

fn resolved(request_id: u64, regions: Vec<u64>, ts: u64) -> ChangeDataEvent {
    ChangeDataEvent {
        events: vec![],
        resolved_ts: Some(ResolvedTs {
            regions,
            ts,
            request_id,
        }),
    }
}

fn initialized() -> WireRow {
    row(LogType::Initialized, OpType::Unknown, b"", b"", 0, 0)
}

/// Feeds `event` and returns the items it produced.
fn feed(state: &mut State, event: ChangeDataEvent) -> Vec<FeedEvent> {
    state
        .on_event(event, REGION_ATTEMPTS)
        .expect("no fatal error");
    state.out.drain(..).collect()
}

fn committed_keys(items: &[FeedEvent]) -> Vec<(Vec<u8>, u64)> {
    items
        .iter()
        .filter_map(|i| match i {
            FeedEvent::Row(r) => Some((r.key.to_vec(), r.commit_ts.into_inner())),
            _ => None,
        })
        .collect()
}

#[test]
fn registers_clip_the_range_to_each_region_on_its_leaders_store() {
    let (_, requests) = state(vec![region(2, 1, b"", b"m"), region(3, 7, b"m", b"")]);
    let summary: Vec<String> = requests
        .iter()
        .map(|(store, r)| {
            let start = String::from_utf8_lossy(&r.start_key);
            let end = String::from_utf8_lossy(&r.end_key);
            format!(
                "store {store}: {} {} [{start}, {end}) {}",
                r.request_id, r.region_id, r.checkpoint_ts
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec!["store 1: 1 2 [a, m) 100", "store 7: 2 3 [m, z) 100"]
    );
    let header = requests[0].1.header.clone().expect("header");
    assert_eq!(
        (header.cluster_id, header.ticdc_version.as_str()),
        (42, "8.5.0")
    );
    assert_eq!(requests[0].1.kv_api, KvApi::RawKv as i32);
    assert_eq!(requests[0].1.region_epoch.map(|e| e.version), Some(3));
}

#[test]
fn commits_carry_the_prewritten_value_and_rollbacks_nothing() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"")]);
    let items = feed(
        &mut state,
        rows(
            1,
            vec![
                row(LogType::Prewrite, OpType::Put, b"pk", b"big", 110, 0),
                row(LogType::Prewrite, OpType::Put, b"pr", b"gone", 111, 0),
                row(LogType::Rollback, OpType::Unknown, b"pr", b"", 111, 0),
                row(LogType::Commit, OpType::Put, b"pk", b"", 110, 112),
                row(LogType::Committed, OpType::Delete, b"pd", b"", 113, 113),
            ],
        ),
    );
    let changes: Vec<&Row> = items
        .iter()
        .filter_map(|i| match i {
            FeedEvent::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(changes.len(), 2, "{items:?}");
    assert_eq!(
        (changes[0].op, &changes[0].value[..], changes[0].commit_ts),
        (Op::Put, &b"big"[..], TimeStamp::new(112))
    );
    assert_eq!(changes[1].op, Op::Delete);
    assert!(state.staged.is_empty(), "{:?}", state.staged);
    // The same change delivered again (a replay) is not delivered twice.
    let again = feed(
        &mut state,
        rows(
            1,
            vec![row(
                LogType::Committed,
                OpType::Delete,
                b"pd",
                b"",
                113,
                113,
            )],
        ),
    );
    assert!(committed_keys(&again).is_empty(), "{again:?}");
}

#[test]
fn initialized_counts_regions_and_catch_up_rows_count_until_then() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"m"), region(3, 1, b"m", b"")]);
    let first = feed(
        &mut state,
        rows(
            1,
            vec![
                row(LogType::Committed, OpType::Put, b"b", b"v", 101, 101),
                initialized(),
            ],
        ),
    );
    assert!(matches!(first[0], FeedEvent::CatchUp { rows: 1, .. }));
    assert!(first.contains(&FeedEvent::Initialized {
        regions_done: 1,
        regions_total: 2
    }));
    let second = feed(&mut state, rows(2, vec![initialized()]));
    assert_eq!(
        second,
        vec![FeedEvent::Initialized {
            regions_done: 2,
            regions_total: 2
        }]
    );
    let live = feed(
        &mut state,
        rows(
            2,
            vec![row(LogType::Committed, OpType::Put, b"n", b"v", 120, 120)],
        ),
    );
    assert!(
        !live.iter().any(|i| matches!(i, FeedEvent::CatchUp { .. })),
        "{live:?}"
    );
}

#[test]
fn region_errors_park_the_range_from_its_floor_until_attempts_run_out() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"")]);
    feed(&mut state, rows(1, vec![initialized()]));
    let items = feed(&mut state, resolved(1, vec![2], 150));
    assert_eq!(items, vec![FeedEvent::ResolvedTs(TimeStamp::new(150))]);
    let stale = cdcpb::Error {
        epoch_not_match: Some(EpochNotMatch::default()),
        ..cdcpb::Error::default()
    };
    let items = feed(&mut state, error(1, stale.clone()));
    assert!(
        matches!(&items[0], FeedEvent::RegionRetry { region: 2, reason } if reason.contains("epoch_not_match")),
        "{items:?}"
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
        let requests = state.subscribe(&parked, vec![region(2, 1, b"", b"")]);
        assert_eq!(requests[0].1.checkpoint_ts, 150, "from the floor");
        match state.on_event(
            error(requests[0].1.request_id, stale.clone()),
            REGION_ATTEMPTS,
        ) {
            Ok(()) => parked = state.parked.pop().expect("parked again"),
            Err(FeedError::RegionRetries {
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
fn a_lost_store_parks_only_its_subscriptions() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"m"), region(3, 7, b"m", b"")]);
    state.store_lost(7, "gone", 3).expect("within the budget");
    assert_eq!(state.subs.len(), 1);
    let parked = state.parked.pop().expect("parked");
    assert_eq!(
        (parked.start.as_slice(), parked.cause),
        (&b"m"[..], Cause::Stream)
    );
    assert!(
        parked.due > Instant::now(),
        "a lost stream waits its backoff"
    );
}

#[test]
fn refusals_that_retrying_cannot_fix_are_fatal() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"")]);
    let mismatch = cdcpb::Error {
        cluster_id_mismatch: Some(ClusterIdMismatch {
            current: 7,
            request: 42,
        }),
        ..cdcpb::Error::default()
    };
    match state.on_event(error(1, mismatch), REGION_ATTEMPTS) {
        Err(FeedError::Refused { region, reason }) => {
            assert_eq!(region, 2);
            assert!(reason.contains("cluster_id_mismatch"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn resolved_ts_is_the_minimum_never_moves_back_and_forgets_old_pairs() {
    let (mut state, _) = state(vec![region(2, 1, b"", b"m"), region(3, 1, b"m", b"")]);
    // Before INITIALIZED a resolved ts does not cover the catch-up.
    assert!(feed(&mut state, resolved(1, vec![2], 500)).is_empty());
    feed(&mut state, rows(1, vec![initialized()]));
    feed(&mut state, rows(2, vec![initialized()]));
    let row_200 = row(LogType::Committed, OpType::Put, b"k", b"v", 200, 200);
    feed(&mut state, rows(1, vec![row_200.clone()]));
    assert_eq!(state.delivered.len(), 1);
    // One region ahead: the span waits for the other.
    assert!(feed(&mut state, resolved(1, vec![2], 300)).is_empty());
    let items = feed(&mut state, resolved(2, vec![3], 250));
    assert_eq!(items, vec![FeedEvent::ResolvedTs(TimeStamp::new(250))]);
    assert!(
        state.delivered.is_empty(),
        "pairs below every floor are forgotten"
    );
    // A row at or below its floor that comes again is dropped.
    assert!(committed_keys(&feed(&mut state, rows(1, vec![row_200]))).is_empty());
    // Lower resolved ts never move the span back.
    assert!(feed(&mut state, resolved(0, vec![2, 3], 240)).is_empty());
}

#[test]
fn transactional_ranges_are_encoded_for_pd_and_raw_ones_are_not() {
    assert_eq!(
        KeyMode::Txn.region_range(b"p", b"q"),
        (encode_bytes(b"p"), encode_bytes(b"q"))
    );
    assert_eq!(
        KeyMode::Raw.region_range(b"p", b"q"),
        (b"p".to_vec(), b"q".to_vec())
    );
    // Unbounded stays unbounded (an encoded empty key would not be).
    assert_eq!(KeyMode::Txn.region_range(b"", b""), (vec![], vec![]));
}

#[test]
fn retries_back_off_within_a_bound() {
    for (cause, cap) in [
        (Cause::Region, Duration::from_secs(1)),
        (Cause::Stream, Duration::from_secs(2)),
    ] {
        let delays: Vec<Duration> = (1..=REGION_ATTEMPTS).map(|a| cause.delay(a)).collect();
        assert!(delays[0] > Duration::ZERO);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= cap), "{delays:?}");
    }
    assert_eq!(Cause::Region.delay(0), Duration::ZERO);
}

/// The multiset of floors and the initialized count agree with `subs`.
fn assert_indexes_agree(state: &State) {
    let mut floors = BTreeMap::new();
    for sub in state.subs.values() {
        *floors.entry(sub.floor).or_insert(0usize) += 1;
    }
    assert_eq!(state.floors, floors);
    let initialized = state.subs.values().filter(|s| s.initialized).count();
    assert_eq!(state.initialized, initialized);
}

#[test]
fn many_regions_resolve_to_their_minimum_through_errors_and_both_wire_forms() {
    let n = 300u64;
    let regions = (0..n)
        .map(|i| {
            let start = if i == 0 {
                Vec::new()
            } else {
                format!("k{i:04}").into_bytes()
            };
            let end = if i + 1 == n {
                Vec::new()
            } else {
                format!("k{:04}", i + 1).into_bytes()
            };
            region(10 + i, 1, &start, &end)
        })
        .collect();
    let (mut state, requests) = state(regions);
    assert_eq!(requests.len() as u64, n);
    let mut last = None;
    for id in 1..=n {
        for item in feed(&mut state, rows(id, vec![initialized()])) {
            if let FeedEvent::Initialized {
                regions_done,
                regions_total,
            } = item
            {
                last = Some((regions_done, regions_total));
            }
        }
    }
    assert_eq!(last, Some((n as usize, n as usize)));
    assert_indexes_agree(&state);
    // Per-request messages: the span moves only once the last one has.
    for id in 1..n {
        assert!(feed(&mut state, resolved(id, vec![9 + id], 200 + id)).is_empty());
    }
    let items = feed(&mut state, resolved(n, vec![9 + n], 150));
    assert_eq!(items, vec![FeedEvent::ResolvedTs(TimeStamp::new(150))]);
    assert_indexes_agree(&state);
    // A region of the wrong request id is ignored.
    assert!(feed(&mut state, resolved(n, vec![10], 900)).is_empty());
    // The one request-id-0 message for every region.
    let all: Vec<u64> = (10..10 + n).collect();
    let items = feed(&mut state, resolved(0, all, 400));
    assert_eq!(items, vec![FeedEvent::ResolvedTs(TimeStamp::new(400))]);
    assert_indexes_agree(&state);
    // An error takes its floor out; its parked range holds the span still.
    let stale = cdcpb::Error {
        epoch_not_match: Some(EpochNotMatch::default()),
        ..cdcpb::Error::default()
    };
    feed(&mut state, error(7, stale));
    assert_indexes_agree(&state);
    let others: Vec<u64> = (10..10 + n).filter(|r| *r != 16).collect();
    assert!(feed(&mut state, resolved(0, others, 500)).is_empty());
    assert_eq!(state.parked.len(), 1);
    assert_eq!(state.initialized as u64, n - 1);
}

#[test]
fn old_values_come_from_the_prewrite_when_the_commit_has_none() {
    let (mut state, _) = state(vec![region(1, 1, b"a", b"z")]);
    let with_old = |mut r: WireRow, old: &[u8]| {
        r.old_value = Bytes::copy_from_slice(old);
        r
    };
    let items = feed(
        &mut state,
        rows(
            1,
            vec![
                with_old(
                    row(LogType::Prewrite, OpType::Put, b"k", b"new", 120, 0),
                    b"old",
                ),
                row(LogType::Commit, OpType::Put, b"k", b"", 120, 121),
                with_old(
                    row(LogType::Committed, OpType::Put, b"j", b"v", 122, 122),
                    b"was",
                ),
            ],
        ),
    );
    let changes: Vec<&Row> = items
        .iter()
        .filter_map(|i| match i {
            FeedEvent::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(changes.len(), 2, "{items:?}");
    assert_eq!(
        (&changes[0].value[..], &changes[0].old_value[..]),
        (&b"new"[..], &b"old"[..])
    );
    assert_eq!(&changes[1].old_value[..], b"was");
    assert!(state.staged.is_empty());
}
