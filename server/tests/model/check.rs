//! The model validator: one consumer's rows (of every subscription or feed
//! it had) checked against what the writers did and the final state. The
//! rules that depend on arrival order are checked as rows arrive, in
//! `consumer`; their findings are carried in `Seen::violations`.

use std::collections::{HashMap, HashSet};

use kvfeed_proto::cdcpb::change_data_request::KvApi;

use super::consumer::{Got, Seen};
use super::workload::{Model, Outcome};

/// Checks one consumer against the model and the final snapshot.
pub fn check(
    seen: &Seen,
    model: &Model,
    snapshot: &HashMap<Vec<u8>, Option<Vec<u8>>>,
) -> Vec<String> {
    let mut bad = seen.violations.clone();
    let raw = seen.kv_api == KvApi::RawKv as i32;
    let all: Vec<&Got> = seen.subs.iter().flat_map(|s| s.rows.iter()).collect();
    let delivered: HashSet<(Vec<u8>, u64)> =
        all.iter().map(|g| (g.key.clone(), g.commit_ts)).collect();
    // Every delivered row was written and not rolled back.
    for got in &all {
        if raw {
            let known = got
                .value
                .as_ref()
                .and_then(|v| model.raw.get(v))
                .is_some_and(|(key, _)| *key == got.key);
            if !known {
                bad.push(format!("raw row not written: {got:?}"));
            }
            continue;
        }
        let Some(txn) = model.txns.get(&got.start_ts) else {
            bad.push(format!("row of an unknown transaction: {got:?}"));
            continue;
        };
        match txn.outcome {
            Outcome::RolledBack => bad.push(format!("row of a rolled-back transaction: {got:?}")),
            Outcome::Committed(ts) if ts != got.commit_ts => {
                bad.push(format!("row with commit_ts other than {ts}: {got:?}"));
            }
            _ => {}
        }
        if !txn.writes.contains(&(got.key.clone(), got.value.clone())) {
            bad.push(format!(
                "row not among the mutations {:?}: {got:?}",
                txn.writes
            ));
        }
    }
    // Every commit after the checkpoint was delivered.
    if raw {
        let from = seen.raw_from();
        let values: HashSet<&Vec<u8>> = all.iter().filter_map(|g| g.value.as_ref()).collect();
        for (value, (key, begun)) in &model.raw {
            if (seen.checkpoint == 0 || *begun > from) && !values.contains(value) {
                bad.push(format!("raw put {key:?} = {value:?} not delivered"));
            }
        }
    } else {
        for (start_ts, txn) in &model.txns {
            if let Outcome::Committed(ts) = txn.outcome
                && ts > seen.checkpoint
            {
                for (key, _) in &txn.writes {
                    if !delivered.contains(&(key.clone(), ts)) {
                        bad.push(format!("commit {start_ts}->{ts} of {key:?} not delivered"));
                    }
                }
            }
        }
    }
    // The final view matches the snapshot.
    let mut view: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)> = HashMap::new();
    for got in &all {
        let entry = view.entry(got.key.clone()).or_insert((0, None));
        if got.commit_ts >= entry.0 {
            *entry = (got.commit_ts, got.value.clone());
        }
    }
    for (key, expected) in snapshot {
        match view.get(key) {
            Some((_, value)) if value != expected => bad.push(format!(
                "final view of {key:?} is {value:?}, the store has {expected:?}"
            )),
            None if seen.checkpoint == 0 && expected.is_some() => {
                bad.push(format!("final view lacks {key:?} = {expected:?}"));
            }
            _ => {}
        }
    }
    bad.into_iter()
        .map(|b| format!("{}: {b}", seen.name))
        .collect()
}
