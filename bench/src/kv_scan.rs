//! `kvfeed bench kv-scan`: how fast a client reads a range, raw and
//! transactional, in one run.
//!
//! `--keys` raw keys and as many transactional keys (in 256-key
//! transactions, as clients write them) are preloaded under a fresh
//! prefix; then each range is read once, start to end, with the client's
//! paged scan — RawScan or KvScan pages across regions, what `kvfeed scan
//! --limit 0` does and what every transactional client's iterator pays.
//! Every key must come back exactly once, in order, with its value.
//! The report gives both rates and the transactional one as a share of
//! the raw one.
//!
//! With `--versions N` every key is written N times (N preload passes, each
//! a new version of every key) before the reads, which must still return
//! each key once: the cost of a history the reads have to skip.

use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_client::KeyMode;
use serde_json::json;

use super::load::{self, PreloadArgs, prefix_end, preload_index};
use super::report::Report;
use super::stats::per_second;
use super::{BenchError, Server, TargetArgs, progress, run_prefix};
use super::{secs, txn_load};

const NAME: &str = "kv-scan";

/// The flags of `kvfeed bench kv-scan`.
#[derive(Debug, Clone, Args)]
pub struct KvScanArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// How many keys to preload and read, and the read's time limit.
    #[command(flatten)]
    pub preload: PreloadArgs,

    /// Versions written of every key (preload passes) before reading.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub versions: u64,
}

/// Runs `kvfeed bench kv-scan`: preloads both key spaces and reads each
/// range once. A key out of place (missing, repeated or out of order), a
/// value of the wrong size or a wrong count is recorded as a failure.
pub async fn run(args: &KvScanArgs) -> Result<Report, BenchError> {
    let timeout = args.preload.check()?;
    super::check_range("--versions", args.versions, 1, 1_000)?;
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    for pass in 1..=args.versions {
        progress(
            NAME,
            &format!(
                "preloading {} raw keys (version {pass} of {})",
                args.preload.keys, args.versions
            ),
        );
        load::preload(&server, &prefix, args.preload.keys, args.preload.value_size).await?;
        progress(
            NAME,
            &format!(
                "preloading {} transactional keys (version {pass} of {})",
                args.preload.keys, args.versions
            ),
        );
        txn_load::preload_txn(&server, &prefix, args.preload.keys, args.preload.value_size).await?;
    }

    args.preload.settle(NAME).await;
    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({
            "keys": args.preload.keys,
            "value_size": args.preload.value_size,
            "versions": args.versions,
        }),
    );
    let mut rates = Vec::new();
    for (mode, key, title) in [
        (KeyMode::Raw, "raw_", "Raw scan (RawScan pages)"),
        (KeyMode::Txn, "txn_", "Transactional scan (KvScan pages)"),
    ] {
        progress(NAME, &format!("reading: {title}"));
        let read = tokio::time::timeout(timeout, read_all(&server, mode, &prefix, args))
            .await
            .map_err(|_| {
                BenchError::Feed(format!("{title} took longer than {}", args.preload.timeout))
            })??;
        let rate = per_second(read.pairs as f64, secs(read.elapsed));
        report.section(title);
        report.int(&format!("{key}pairs"), "pairs read", read.pairs);
        report.float(&format!("{key}seconds"), "time", secs(read.elapsed), 3, "s");
        report.float(&format!("{key}pairs_per_sec"), "pairs/s", rate, 0, "");
        for fault in read.faults {
            report.fail(format!("{title}: {fault}"));
        }
        rates.push(rate);
    }
    if let [raw, txn] = rates[..] {
        report.section("Comparison");
        report.float(
            "txn_vs_raw_percent",
            "transactional pairs/s ÷ raw pairs/s",
            if raw > 0.0 { 100.0 * txn / raw } else { 0.0 },
            1,
            "%",
        );
    }
    Ok(report)
}

/// One full read of a range.
struct Read {
    pairs: u64,
    elapsed: Duration,
    /// What was wrong with what came back.
    faults: Vec<String>,
}

/// Reads the prefix's keys of `mode` from start to end, checking that key
/// `i` comes back `i`-th with its value.
async fn read_all(
    server: &Server,
    mode: KeyMode,
    prefix: &[u8],
    args: &KvScanArgs,
) -> Result<Read, BenchError> {
    let started = Instant::now();
    let mut scanner = server
        .cluster
        .scan(mode, prefix, &prefix_end(prefix), None)
        .await?;
    let (mut pairs, mut faults) = (0u64, Vec::new());
    while let Some(page) = scanner.next_page().await? {
        for pair in page {
            if preload_index(prefix, &pair.key) != Some(pairs) && faults.len() < 10 {
                faults.push(format!("pair {pairs} has an unexpected key"));
            }
            if pair.value.len() != args.preload.value_size && faults.len() < 10 {
                faults.push(format!(
                    "pair {pairs} has a value of {} bytes",
                    pair.value.len()
                ));
            }
            pairs += 1;
        }
    }
    let elapsed = started.elapsed();
    if pairs != args.preload.keys {
        faults.push(format!(
            "{pairs} pairs read, {} were written",
            args.preload.keys
        ));
    }
    Ok(Read {
        pairs,
        elapsed,
        faults,
    })
}
