//! The feed's guarantees under a seeded random workload: writers keep
//! committing (two-phase, one-phase, deletes, rollbacks, locks left open
//! across registrations, raw writes) while twenty subscriptions register
//! with random ranges and checkpoints on connections of every wire form.
//!
//! For each subscription: the commits with `commit_ts >` its checkpoint in
//! its range arrive exactly once (through the scan or live), each key's in
//! commit order, after exactly one INITIALIZED; and every `Events` checks
//! on the fly that resolved timestamps only increase, never precede
//! INITIALIZED and are never followed by a commit at or below them.
//!
//! A failure names its seed; rerun with that seed to reproduce the choices
//! (thread interleaving still varies).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use common::{Env, Events, Item, Resolved, delete, env_with, put, register, register_raw};
use kvfeed_cdc::{Connection, Features, FeedConfig};
use kvfeed_proto::cdcpb::event::LogType;
use kvfeed_proto::cdcpb::{ChangeDataRequest, Header};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::mvcc::encode_bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const WRITERS: u64 = 2;
const OPS_PER_WRITER: u64 = 500;
const KEYS_PER_WRITER: u64 = 40;
const SUBSCRIPTIONS: u64 = 20;

/// One committed version, as the writers recorded it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Commit {
    raw: bool,
    key: Vec<u8>,
    commit_ts: u64,
}

/// What a subscription asked for.
#[derive(Clone, Debug)]
struct Sub {
    request_id: u64,
    conn: usize,
    raw: bool,
    /// Raw-key bounds; empty = unbounded.
    lo: Vec<u8>,
    hi: Vec<u8>,
    checkpoint: u64,
}

impl Sub {
    fn covers(&self, c: &Commit) -> bool {
        c.raw == self.raw
            && c.key.as_slice() >= self.lo.as_slice()
            && (self.hi.is_empty() || c.key.as_slice() < self.hi.as_slice())
    }
}

fn key(writer: u64, raw: bool, n: u64) -> Vec<u8> {
    format!("w{writer}{}{n:03}", if raw { 'r' } else { 'k' }).into_bytes()
}

/// One writer's operations; records every commit and reports progress.
fn write(
    env: &Env,
    writer: u64,
    seed: u64,
    commits: &Mutex<Vec<Commit>>,
    progress: &mpsc::UnboundedSender<()>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
    // Locks left open, committed a few operations later.
    let mut open: Vec<(Vec<u8>, TimeStamp, u64)> = Vec::new();
    let record = |raw: bool, key: &[u8], ts: TimeStamp| {
        if let Ok(mut c) = commits.lock() {
            c.push(Commit {
                raw,
                key: key.to_vec(),
                commit_ts: ts.into_inner(),
            });
        }
    };
    for op in 0..OPS_PER_WRITER {
        while let Some(pos) = open.iter().position(|(_, _, due)| *due <= op) {
            let (k, start, _) = open.swap_remove(pos);
            let commit = env.commit(&[&k], start);
            record(false, &k, commit);
        }
        let n = rng.random_range(0..KEYS_PER_WRITER);
        let k = key(writer, false, n);
        if open.iter().any(|(o, _, _)| *o == k) {
            continue;
        }
        let value = if rng.random_range(0..8) == 0 {
            vec![b'L'; 300]
        } else {
            format!("{writer}-{op}").into_bytes()
        };
        match rng.random_range(0..8) {
            0 | 1 => {
                let (_, commit) = env.put(&k, &value);
                record(false, &k, commit);
            }
            2 => {
                let start = env.prewrite(vec![delete(&k)]);
                record(false, &k, env.commit(&[&k], start));
            }
            3 => {
                let (_, commit) = env.commit_1pc(vec![put(&k, &value)]);
                record(false, &k, commit);
            }
            4 => {
                let start = env.prewrite(vec![put(&k, &value)]);
                env.txn
                    .batch_rollback(std::slice::from_ref(&k), start)
                    .expect("rollback");
            }
            5 => {
                let start = env.prewrite(vec![put(&k, &value)]);
                open.push((k, start, op + 1 + rng.random_range(0..20)));
            }
            6 => {
                let rk = key(writer, true, n);
                record(true, &rk, env.raw.put(&rk, &value, None).expect("raw put"));
            }
            _ => {
                let rk = key(writer, true, n);
                record(true, &rk, env.raw.delete(&rk).expect("raw delete"));
            }
        }
        let _ = progress.send(());
    }
    for (k, start, _) in open {
        let commit = env.commit(&[&k], start);
        record(false, &k, commit);
    }
}

/// A random range: raw-key bounds inside the writers' key space.
fn range(rng: &mut StdRng, raw: bool) -> (Vec<u8>, Vec<u8>) {
    let bound = |rng: &mut StdRng| {
        key(
            rng.random_range(0..WRITERS),
            raw,
            rng.random_range(0..KEYS_PER_WRITER),
        )
    };
    match rng.random_range(0..3) {
        0 => (Vec::new(), Vec::new()),
        1 => (bound(rng), Vec::new()),
        _ => {
            let (a, b) = (bound(rng), bound(rng));
            if a < b { (a, b) } else { (b, a) }
        }
    }
}

/// What one connection's reader saw.
struct Seen {
    items: Vec<Item>,
    resolved: Vec<Resolved>,
}

async fn read_all(mut events: Events) -> Seen {
    events.keep_messages = false;
    let mut items = Vec::new();
    while let Some(item) = events.next().await {
        items.push(item);
    }
    Seen {
        items,
        resolved: events.resolved,
    }
}

async fn run(seed: u64, config: FeedConfig) -> (Vec<Sub>, Vec<Seen>, Vec<Commit>) {
    let env = Arc::new(env_with(config));
    let region = env.region_a();
    let mut rng = StdRng::seed_from_u64(seed);
    let commits = Arc::new(Mutex::new(Vec::new()));
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (env, commits, tx) = (Arc::clone(&env), Arc::clone(&commits), progress_tx.clone());
            tokio::task::spawn_blocking(move || write(&env, w, seed, &commits, &tx))
        })
        .collect();
    drop(progress_tx);

    // Four connections, one of each wire form and a second plain one.
    let forms: [(Features, &str); 4] = [
        (Features::default(), "8.5.0"),
        (Features::default(), "8.5.0"),
        (
            Features {
                stream_multiplexing: true,
            },
            "8.5.0",
        ),
        (Features::default(), "4.0.7"),
    ];
    let mut conns: Vec<Connection> = Vec::new();
    let mut readers = Vec::new();
    for (features, _) in &forms {
        let (conn, events) = env.connect_with(*features);
        conns.push(conn);
        readers.push(tokio::spawn(read_all(events)));
    }

    let every = WRITERS * OPS_PER_WRITER / (SUBSCRIPTIONS + 2);
    let mut subs = Vec::new();
    let mut ops = 0;
    while subs.len() < SUBSCRIPTIONS as usize {
        if progress.recv().await.is_none() {
            break;
        }
        ops += 1;
        if ops % every != 0 {
            continue;
        }
        let raw = rng.random_range(0..4) == 0;
        let (lo, hi) = range(&mut rng, raw);
        let known: Vec<u64> = commits
            .lock()
            .map(|c| c.iter().map(|c| c.commit_ts).collect())
            .unwrap_or_default();
        let checkpoint = match rng.random_range(0..4) {
            0 => 0,
            1 => env.ts().into_inner(),
            _ if known.is_empty() => 0,
            _ => known[rng.random_range(0..known.len() as u64) as usize],
        };
        let conn = subs.len() % forms.len();
        let request_id = subs.len() as u64 + 1;
        let mut req = if raw {
            register_raw(request_id, &region, &lo, &hi)
        } else {
            ChangeDataRequest {
                start_key: if lo.is_empty() {
                    region.start_key.clone()
                } else {
                    encode_bytes(&lo)
                },
                end_key: if hi.is_empty() {
                    region.end_key.clone()
                } else {
                    encode_bytes(&hi)
                },
                ..register(request_id, &region)
            }
        };
        req.checkpoint_ts = checkpoint;
        req.header = Some(Header {
            cluster_id: common::CLUSTER_ID,
            ticdc_version: forms[conn].1.to_owned(),
        });
        conns[conn].handle(req).await.expect("handle");
        subs.push(Sub {
            request_id,
            conn,
            raw,
            lo,
            hi,
            checkpoint,
        });
    }
    while progress.recv().await.is_some() {}
    for w in writers {
        w.await.expect("writer");
    }
    // Everything written is routed and every scan is done; then the
    // connections end and the readers drain what is queued.
    env.settle().await;
    drop(conns);
    let mut seen = Vec::new();
    for r in readers {
        seen.push(r.await.expect("reader"));
    }
    let commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
    (subs, seen, commits)
}

/// Checks exactly-once delivery and per-key order; returns how many commit
/// rows arrived after some resolved ts of their subscription's connection.
fn check(seed: u64, subs: &[Sub], seen: &[Seen], commits: &[Commit]) -> usize {
    assert_eq!(subs.len(), SUBSCRIPTIONS as usize, "seed {seed}");
    let mut after_resolved = 0;
    for sub in subs {
        let conn = &seen[sub.conn];
        let mine: Vec<(usize, &Item)> = conn
            .items
            .iter()
            .enumerate()
            .filter(|(_, i)| i.ids().0 == sub.request_id)
            .collect();
        let initialized = mine.iter().filter(|(_, i)| i.is_initialized()).count();
        assert_eq!(initialized, 1, "seed {seed} sub {sub:?}");
        assert!(
            mine.iter().all(|(_, i)| matches!(i, Item::Row { .. })),
            "seed {seed}: an error for {sub:?}"
        );
        let first_resolved = conn.resolved.first().map_or(usize::MAX, |r| r.after_items);
        let mut got = BTreeSet::new();
        let mut last_per_key: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for (index, item) in &mine {
            let row = item.row();
            let commit =
                row.r#type == LogType::Commit as i32 || row.r#type == LogType::Committed as i32;
            if !commit {
                continue;
            }
            if !got.insert((row.key.to_vec(), row.commit_ts)) {
                let init = mine.iter().position(|(_, i)| i.is_initialized());
                let rows: Vec<_> = mine
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, i))| matches!(i, Item::Row { row: r, .. } if r.key == row.key))
                    .map(|(n, (_, i))| (n, i.row().r#type, i.row().start_ts, i.row().commit_ts))
                    .collect();
                panic!(
                    "seed {seed}: {:?}@{} twice for {sub:?}; initialized at {init:?}; {rows:?}",
                    String::from_utf8_lossy(&row.key),
                    row.commit_ts
                );
            }
            if let Some(prev) = last_per_key.insert(row.key.to_vec(), row.commit_ts) {
                assert!(
                    prev < row.commit_ts,
                    "seed {seed}: {:?} out of order",
                    row.key
                );
            }
            if *index >= first_resolved {
                after_resolved += 1;
            }
        }
        let got: BTreeSet<(Vec<u8>, u64)> = got
            .into_iter()
            .filter(|(_, ts)| *ts > sub.checkpoint)
            .collect();
        let want: BTreeSet<(Vec<u8>, u64)> = commits
            .iter()
            .filter(|c| sub.covers(c) && c.commit_ts > sub.checkpoint)
            .map(|c| (c.key.clone(), c.commit_ts))
            .collect();
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "seed {seed} sub {sub:?}: missing {missing:?}, unexpected {extra:?}"
        );
    }
    after_resolved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_after_the_checkpoint_arrives_exactly_once() {
    for seed in [0x5eed_0001, 0x5eed_0002] {
        let config = FeedConfig {
            incremental_scan_concurrency: 3,
            incremental_scan_threads: 2,
            ..FeedConfig::default()
        };
        let (subs, seen, commits) = run(seed, config).await;
        assert!(commits.len() > 300, "seed {seed}: a real workload");
        check(seed, &subs, &seen, &commits);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_ts_stays_honest_under_load() {
    let seed = 0x5eed_0003;
    let config = FeedConfig {
        min_ts_interval: Duration::from_millis(10),
        ..FeedConfig::default()
    };
    let (subs, seen, commits) = run(seed, config).await;
    // `Events` checked honesty and monotonicity on every message; make sure
    // it had something to check.
    let after_resolved = check(seed, &subs, &seen, &commits);
    assert!(
        seen.iter().all(|s| !s.resolved.is_empty()),
        "seed {seed}: every connection got resolved timestamps"
    );
    assert!(
        after_resolved > 0,
        "seed {seed}: commits arrived after resolved ts"
    );
}
