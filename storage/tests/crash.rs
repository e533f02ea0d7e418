//! Crash recovery: a child process writes through a fjall-backed store with
//! `SyncOnCommit` and reports every acknowledged batch; the parent kills it
//! with SIGKILL mid-stream, reopens the store and checks that
//! - every acknowledged batch is present,
//! - every batch is all-or-nothing (it writes the same tag to two families),
//! - the recovered sequence number covers every acknowledged one and equals
//!   the number of batches present (numbering and data are one atomic write).
//!
//! Three rounds run on the same directory, so recovery of a recovered
//! database is covered too. The child is this test binary re-executed with
//! [`CHILD_DIR_VAR`] set, running only [`crash_child`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::ops::Bound;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;

use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::{Cf, EngineSnapshot, WriteBatch};
use kvfeed_storage::store::{BatchSource, Durability, Store};

const CHILD_DIR_VAR: &str = "KVFEED_CRASH_CHILD_DIR";
const CHILD_ROUND_VAR: &str = "KVFEED_CRASH_CHILD_ROUND";
const WRITER_THREADS: usize = 4;
/// Upper bound on a child's writes, so a child the parent fails to kill
/// still ends.
const MAX_WRITES_PER_THREAD: usize = 20_000;

/// The writer side. Does nothing unless started by [`crash_and_recover`].
#[test]
fn crash_child() {
    let (Some(dir), Some(round)) = (
        std::env::var_os(CHILD_DIR_VAR),
        std::env::var_os(CHILD_ROUND_VAR),
    ) else {
        return;
    };
    let round = round.to_string_lossy().into_owned();
    let engine = FjallEngine::open(Path::new(&dir)).expect("child: open engine");
    let store = Arc::new(
        Store::open(Arc::new(engine), Durability::SyncOnCommit).expect("child: open store"),
    );
    let writers: Vec<_> = (0..WRITER_THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            let round = round.clone();
            thread::spawn(move || {
                for i in 0..MAX_WRITES_PER_THREAD {
                    let key = format!("r{round}/t{t}/{i:06}");
                    let mut batch = WriteBatch::new();
                    // The same tag in two families: both or neither may survive.
                    batch.put(Cf::Raw, key.clone(), format!("tag {key}"));
                    batch.put(Cf::Default, key.clone(), format!("tag {key}"));
                    let seq = store
                        .apply(batch, BatchSource::Client)
                        .expect("child: apply");
                    // Acknowledged only now: print, then flush so the parent
                    // sees it before any kill can land.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {key} {}", seq.0).expect("child: stdout");
                    out.flush().expect("child: flush");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("child: writer");
    }
}

/// Kills the child if the parent unwinds before doing so.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one child until `kill_after` acknowledgements, kills it, and returns
/// every acknowledgement it completed: (key, seq).
fn run_child(dir: &Path, round: usize, kill_after: usize) -> Vec<(String, u64)> {
    let exe = std::env::current_exe().expect("current_exe");
    let child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_VAR, dir)
        .env(CHILD_ROUND_VAR, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("child stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acks = Vec::new();
    let parse = |line: &str| -> Option<(String, u64)> {
        let mut parts = line.strip_prefix("ACK ")?.split(' ');
        let key = parts.next()?.to_string();
        let seq = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((key, seq))
    };
    while acks.len() < kill_after {
        let Some(line) = lines.next() else {
            panic!("child exited after {} acks", acks.len());
        };
        acks.extend(parse(&line.expect("read child")));
    }
    child.0.kill().expect("kill child");
    // Lines completed before the kill landed are acknowledgements too; a
    // torn last line does not parse and is not one.
    for line in lines {
        let Ok(line) = line else { break };
        acks.extend(parse(&line));
    }
    acks
}

fn scan_cf(snap: &dyn EngineSnapshot, cf: Cf) -> BTreeMap<Vec<u8>, Vec<u8>> {
    snap.iter(cf, Bound::Unbounded, Bound::Unbounded, false)
        .map(|kv| kv.expect("scan"))
        .collect()
}

#[test]
fn crash_and_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut all_acks: Vec<(String, u64)> = Vec::new();
    for (round, kill_after) in [(1, 250), (2, 400), (3, 300)] {
        let acks = run_child(dir.path(), round, kill_after);
        all_acks.extend(acks);

        let engine = FjallEngine::open(dir.path()).expect("reopen after kill");
        let store =
            Store::open(Arc::new(engine), Durability::SyncOnCommit).expect("store after kill");
        let snap = store.snapshot();
        let raw = scan_cf(&*snap, Cf::Raw);
        let default = scan_cf(&*snap, Cf::Default);

        for (key, seq) in &all_acks {
            let value = raw.get(key.as_bytes());
            assert_eq!(
                value,
                Some(&format!("tag {key}").into_bytes()),
                "round {round}: lost ack {key} (seq {seq})"
            );
        }
        assert_eq!(
            raw, default,
            "round {round}: a batch was torn across families"
        );
        let highest_ack = all_acks.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        let recovered = store.last_seq().0;
        assert!(
            recovered >= highest_ack,
            "round {round}: recovered seq {recovered} < acked {highest_ack}"
        );
        // Seqs are dense and each batch has its own key: the recovered
        // number is exactly the count of batches present.
        assert_eq!(
            raw.len() as u64,
            recovered,
            "round {round}: seq and data disagree"
        );
    }
}
