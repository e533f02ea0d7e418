//! `kvfeed bench engine`: the physical limits beneath the feed, measured
//! in this process, so the other figures can be read as a fraction of
//! what the machine can do at all.
//!
//! fjall, on fresh databases in a temporary directory (removed afterwards),
//! with the engine kvfeed uses (`FjallEngine`, column family `raw`):
//! - random writes in batches of 1000 with one fsync per batch (what group
//!   commit can reach when many writers share an fsync);
//! - the same batches without fsync (the journal and memtable alone);
//! - one write call per key without fsync (the per-call overhead);
//! - a full range scan of the first database (entries/s and MiB/s), whose
//!   entry count must equal `--keys`.
//!
//! With `--grpc`, loopback gRPC streaming of `ChangeDataEvent`s (see
//! [`super::grpc`]).
//!
//! Keys are 16 bytes: 8 from a seeded generator, for random placement,
//! then the index, so no two collide.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::{Cf, Engine, EngineSnapshot, WriteBatch};
use serde_json::json;

use super::report::Report;
use rand::RngExt;

use super::stats::{self, Rng, per_second};
use super::{BenchError, check_duration, check_range, grpc, progress, secs};
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "engine";
const BATCH: u64 = 1000;
const MIB: f64 = 1024.0 * 1024.0;

/// The flags of `kvfeed bench engine`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Keys written by each write test (and then scanned).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub keys: u64,

    /// Bytes per value.
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// Where to create the temporary databases [default: the system's
    /// temporary directory]. Use the disk the server's data lives on.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Also measure loopback gRPC streaming of ChangeDataEvent messages.
    #[arg(long)]
    pub grpc: bool,

    /// Encoded bytes of each streamed message (with --grpc).
    #[arg(long, value_name = "B", default_value_t = 65_536)]
    pub message_size: usize,

    /// How long to stream (with --grpc).
    #[arg(long, value_name = "D", default_value = "5s")]
    pub grpc_duration: ReadableDuration,
}

/// A directory removed on drop, whatever happened in between.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    /// A fresh `kvfeed-bench-<bench>-<unix nanos>` directory under `parent`.
    pub(super) fn new(parent: &Path, bench: &str) -> Result<TempDir, BenchError> {
        let path = parent.join(format!(
            "kvfeed-bench-{bench}-{:x}",
            super::load::unix_nanos()
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| BenchError::Usage(format!("cannot create {}: {e}", path.display())))?;
        Ok(TempDir(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a write test writes: keys per write call, and whether each call
/// is followed by an fsync.
#[derive(Clone, Copy)]
struct Writes {
    per_call: u64,
    fsync: bool,
}

fn key(rng: &mut Rng, i: u64) -> Vec<u8> {
    let mut key = rng.random::<u64>().to_be_bytes().to_vec();
    key.extend_from_slice(&i.to_be_bytes());
    key
}

/// Writes `keys` keys into a fresh engine at `path`; returns the engine
/// (for scanning) and the time taken, final fsync included.
fn write_test(
    path: &Path,
    keys: u64,
    value_size: usize,
    how: Writes,
) -> Result<(FjallEngine, Duration), BenchError> {
    let engine = FjallEngine::open(path)?;
    let mut rng = stats::rng(42);
    let value = vec![b'v'; value_size];
    let started = Instant::now();
    let mut batch = WriteBatch::new();
    for i in 0..keys {
        batch.put(Cf::Raw, key(&mut rng, i), value.clone());
        if (i + 1) % how.per_call == 0 || i + 1 == keys {
            engine.write(&batch)?;
            batch = WriteBatch::new();
            if how.fsync {
                engine.sync()?;
            }
        }
    }
    Ok((engine, started.elapsed()))
}

/// Scans the whole `raw` family of `snapshot`: (entries, bytes, time).
pub fn scan_raw_family(snapshot: &dyn EngineSnapshot) -> Result<(u64, u64, Duration), BenchError> {
    let started = Instant::now();
    let (mut entries, mut bytes) = (0u64, 0u64);
    for pair in snapshot.iter(Cf::Raw, Bound::Unbounded, Bound::Unbounded, false) {
        let (key, value) = pair?;
        entries += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    Ok((entries, bytes, started.elapsed()))
}

/// Runs `kvfeed bench engine` on the calling thread (the timed work is
/// blocking I/O), building its own runtime for the `--grpc` part. A scan
/// that does not see every key written is recorded as a failure.
pub fn run(args: &EngineArgs) -> Result<Report, BenchError> {
    check_range("--keys", args.keys, 1, 10_000_000)?;
    check_range("--value-size", args.value_size, 1, 1 << 20)?;
    check_range(
        "--message-size",
        args.message_size,
        1,
        grpc::MAX_MESSAGE_SIZE / 2,
    )?;
    let grpc_duration = check_duration("--grpc-duration", args.grpc_duration)?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = TempDir::new(&parent, "engine")?;

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"keys": args.keys, "value_size": args.value_size, "grpc": args.grpc,
               "message_size": args.message_size, "dir": parent.display().to_string()}),
    );
    report.section("fjall writes (random keys)");
    let mut scanned_engine = None;
    for (key, label, how, dir) in [
        (
            "writes_per_sec_batch_fsync",
            "1000 per batch, fsync each batch",
            Writes {
                per_call: BATCH,
                fsync: true,
            },
            "a",
        ),
        (
            "writes_per_sec_batch_nosync",
            "1000 per batch, no fsync",
            Writes {
                per_call: BATCH,
                fsync: false,
            },
            "b",
        ),
        (
            "writes_per_sec_single_nosync",
            "1 per write call, no fsync",
            Writes {
                per_call: 1,
                fsync: false,
            },
            "c",
        ),
    ] {
        progress(NAME, &format!("writing {} keys: {label}", args.keys));
        let (engine, took) = write_test(&tmp.path().join(dir), args.keys, args.value_size, how)?;
        report.float(
            key,
            label,
            per_second(args.keys as f64, secs(took)),
            0,
            "writes/s",
        );
        if scanned_engine.is_none() {
            scanned_engine = Some(engine);
        }
    }
    report.section("fjall range scan");
    if let Some(engine) = &scanned_engine {
        let (entries, bytes, took) = scan_raw_family(&*engine.snapshot())?;
        report.int("scan_entries", "entries", entries);
        report.float(
            "scan_entries_per_sec",
            "entries/s",
            per_second(entries as f64, secs(took)),
            0,
            "",
        );
        report.float(
            "scan_mb_per_sec",
            "MiB/s (keys + values)",
            per_second(bytes as f64 / MIB, secs(took)),
            1,
            "",
        );
        if entries != args.keys {
            report.fail(format!(
                "the scan found {entries} entries, {} were written",
                args.keys
            ));
        }
    }
    drop(scanned_engine);

    if args.grpc {
        progress(
            NAME,
            &format!("streaming over loopback gRPC for {}", args.grpc_duration),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(BenchError::Runtime)?;
        let result = runtime.block_on(grpc::measure(args.message_size, grpc_duration))?;
        report.section("loopback gRPC streaming");
        report.int(
            "grpc_message_bytes",
            "message size (encoded)",
            result.message_bytes as u64,
        );
        report.int("grpc_messages", "messages", result.messages);
        report.float(
            "grpc_messages_per_sec",
            "messages/s",
            per_second(result.messages as f64, secs(result.elapsed)),
            0,
            "",
        );
        report.float(
            "grpc_mb_per_sec",
            "MiB/s",
            per_second(
                result.messages as f64 * result.message_bytes as f64 / MIB,
                secs(result.elapsed),
            ),
            1,
            "",
        );
        if result.messages == 0 {
            report.fail("no message arrived over loopback gRPC");
        }
    }
    Ok(report)
}
