//! The changefeed side of the model test: a file sink's rows, in sink
//! order, checked against what the writers did (`workload::Model`).

use std::collections::{BTreeMap, HashMap, HashSet};

use kvfeed_changefeed::sink::file::FileRow;
use kvfeed_client::feed::{Op, Row};

use super::workload::{Model, Outcome};

/// A key or value for a message.
pub fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// The row's mutation: its value, `None` for a delete.
fn mutation(row: &Row) -> Option<Vec<u8>> {
    match row.op {
        Op::Put => Some(row.value.to_vec()),
        Op::Delete => None,
    }
}

fn place(row: &FileRow) -> String {
    format!(
        "{} line {} ({}@{}->{})",
        row.file,
        row.line,
        show(&row.row.key),
        row.row.start_ts,
        row.row.commit_ts
    )
}

/// Rules every sink obeys: `(commit_ts, start_ts, key)` strictly increases
/// through the files, and no key appears twice at one commit ts.
fn order(rows: &[FileRow], bad: &mut Vec<String>) {
    for pair in rows.windows(2) {
        let id = |r: &FileRow| (r.row.commit_ts, r.row.start_ts, r.row.key.clone());
        if id(&pair[0]) >= id(&pair[1]) {
            bad.push(format!(
                "{} does not sort after {}",
                place(&pair[1]),
                place(&pair[0])
            ));
        }
    }
    let mut at = HashSet::new();
    for row in rows {
        if !at.insert((row.row.commit_ts, row.row.key.clone())) {
            bad.push(format!("{}: the key twice at one commit ts", place(row)));
        }
    }
}

/// Checks a transactional sink against the model: every transaction the
/// model knows as committed at or below `checkpoint` is there, whole, at
/// its commit ts, once; nothing of a rolled-back (or orphaned) one; an
/// unknown outcome only whole; transactions contiguous, each inside one
/// data file.
pub fn check_txn(rows: &[FileRow], model: &Model, checkpoint: u64) -> Vec<String> {
    let mut bad = Vec::new();
    order(rows, &mut bad);
    // Runs of adjacent rows of one transaction.
    let mut runs: Vec<((u64, u64), Vec<&FileRow>)> = Vec::new();
    for row in rows {
        let id = (
            row.row.commit_ts.into_inner(),
            row.row.start_ts.into_inner(),
        );
        match runs.last_mut() {
            Some((last, run)) if *last == id => run.push(row),
            _ => runs.push((id, vec![row])),
        }
    }
    let mut ids = HashSet::new();
    // start ts → commit ts of the transactions delivered.
    let mut delivered: HashMap<u64, u64> = HashMap::new();
    for ((commit_ts, start_ts), run) in &runs {
        let first = place(run[0]);
        if !ids.insert((*commit_ts, *start_ts)) {
            bad.push(format!("{first}: the transaction is not contiguous"));
        }
        if run.iter().any(|r| r.file != run[0].file) {
            bad.push(format!("{first}: the transaction spans data files"));
        }
        if let Some(other) = delivered.insert(*start_ts, *commit_ts)
            && other != *commit_ts
        {
            bad.push(format!(
                "{first}: the transaction also at commit ts {other}"
            ));
        }
        let Some(txn) = model.txns.get(start_ts) else {
            bad.push(format!("{first}: a transaction no writer began"));
            continue;
        };
        match txn.outcome {
            Outcome::RolledBack => {
                bad.push(format!("{first}: rows of a rolled-back transaction"));
            }
            Outcome::Committed(ts) if ts != *commit_ts => {
                bad.push(format!("{first}: it committed at {ts}"));
            }
            _ => {}
        }
        let got: BTreeMap<Vec<u8>, Option<Vec<u8>>> = run
            .iter()
            .map(|r| (r.row.key.to_vec(), mutation(&r.row)))
            .collect();
        let want: BTreeMap<Vec<u8>, Option<Vec<u8>>> = txn.writes.iter().cloned().collect();
        if got != want {
            bad.push(format!(
                "{first}: the rows {} are not the transaction's mutations {} ({:?})",
                mutations(&got),
                mutations(&want),
                txn.outcome
            ));
        }
    }
    for (start_ts, txn) in &model.txns {
        if let Outcome::Committed(ts) = txn.outcome
            && ts <= checkpoint
            && !delivered.contains_key(start_ts)
        {
            let want: BTreeMap<Vec<u8>, Option<Vec<u8>>> = txn.writes.iter().cloned().collect();
            bad.push(format!(
                "the transaction {start_ts}->{ts} {} is missing",
                mutations(&want)
            ));
        }
    }
    bad
}

fn mutations(writes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>) -> String {
    let parts: Vec<String> = writes
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{}={}", show(k), show(v)),
            None => format!("-{}", show(k)),
        })
        .collect();
    format!("[{}]", parts.join(" "))
}

/// The step of the writer that wrote `value` (`w{writer}s{seq}k{key}`).
fn step(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let (_, rest) = text.split_once('s')?;
    let (seq, _) = rest.split_once('k')?;
    seq.parse().ok()
}

/// Checks a raw sink against the model: every acknowledged raw put is
/// there once, nothing else is, each key's puts come in the order its one
/// writer made them, and each key ends at its last acknowledged value.
pub fn check_raw(rows: &[FileRow], model: &Model) -> Vec<String> {
    let mut bad = Vec::new();
    order(rows, &mut bad);
    let mut values = HashSet::new();
    let mut last: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for row in rows {
        let Some(value) = mutation(&row.row) else {
            bad.push(format!("{}: a raw delete, never written", place(row)));
            continue;
        };
        match model.raw.get(&value) {
            Some((key, _)) if key[..] == row.row.key[..] => {}
            _ => bad.push(format!(
                "{}: {} was never put there",
                place(row),
                show(&value)
            )),
        }
        if !values.insert(value.clone()) {
            bad.push(format!("{}: {} twice", place(row), show(&value)));
        }
        if let Some(before) = last.get(&row.row.key[..])
            && step(before) >= step(&value)
        {
            bad.push(format!(
                "{}: {} after {}, which its writer put later",
                place(row),
                show(&value),
                show(before)
            ));
        }
        last.insert(row.row.key.to_vec(), value);
    }
    for (value, (key, _)) in &model.raw {
        if !values.contains(value) {
            bad.push(format!(
                "the raw put {}={} is missing",
                show(key),
                show(value)
            ));
        }
    }
    for (key, value) in &model.raw_final {
        if last.get(key) != Some(value) {
            bad.push(format!(
                "{} ends at {:?}, its last acknowledged put is {}",
                show(key),
                last.get(key).map(|v| show(v)),
                show(value)
            ));
        }
    }
    bad
}
