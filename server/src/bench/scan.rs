//! `kvfeed bench scan`: how fast a new subscriber catches up.
//!
//! `--keys` raw keys are preloaded under a fresh prefix with RawBatchPut,
//! then one stream subscribes to every region of the prefix from
//! checkpoint 0, so the catch-up scan must deliver every key. The clock
//! runs from the first Register to the last INITIALIZED. Every row's key
//! is mapped back to its index, so "each key exactly once" is checked
//! exactly, not inferred from a count.

use std::time::Instant;

use clap::Args;
use kvfeed_proto::cdcpb::event::LogType;
use prost::Message;
use serde_json::json;

use super::load::{self, prefix_end, preload_index};
use super::report::Report;
use super::scrape::{SCANNED_BYTES, Sampler, scrape};
use super::stats::{SeqSet, per_second};
use super::subscribe::{FeedStream, Item, Plan, connect, describe, for_each_item};
use super::{
    BenchError, Server, TargetArgs, check_duration, check_range, progress, report_server_use,
    run_prefix, secs,
};
use crate::client::KeyMode;
use crate::units::ReadableDuration;

const NAME: &str = "scan";
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Keys to preload and then scan.
    #[arg(long, value_name = "P", default_value_t = 100_000)]
    pub keys: u64,

    /// Bytes per value.
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// Longest the scan may take.
    #[arg(long, value_name = "D", default_value = "5m")]
    pub timeout: ReadableDuration,
}

pub async fn run(args: &ScanArgs) -> Result<Report, BenchError> {
    check_range("--keys", args.keys, 1, 10_000_000)?;
    check_range("--value-size", args.value_size, 1, 1 << 20)?;
    let timeout = check_duration("--timeout", args.timeout)?;
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    progress(NAME, &format!("preloading {} keys", args.keys));
    let preload = load::preload(&server, &prefix, args.keys, args.value_size).await?;
    let plan = Plan::new(&server, KeyMode::Raw, &prefix, &prefix_end(&prefix)).await?;
    let mut stream = FeedStream::open(connect(server.feed_addr()).await?).await?;

    let before = scrape(&server.status).await?;
    let sampler = Sampler::start(&server.status);
    progress(
        NAME,
        &format!("scanning {} region(s) from checkpoint 0", plan.subs.len()),
    );
    let started = Instant::now();
    stream.send_all(plan.registers(0)).await?;
    let mut tally = Tally {
        keys: SeqSet::new(1),
        ..Tally::default()
    };
    let scanning = async {
        while tally.initialized < plan.subs.len() {
            if !tally.errors.is_empty() {
                return Err(BenchError::Feed(format!(
                    "the scan was stopped: {}",
                    tally.errors.join(", ")
                )));
            }
            let Some(event) = stream.next().await? else {
                return Err(BenchError::Feed(
                    "the server ended the stream during the scan".to_owned(),
                ));
            };
            tally.wire_bytes += event.encoded_len() as u64;
            tally.on_message(event, &prefix);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, scanning)
        .await
        .map_err(|_| BenchError::Feed(format!("the scan took longer than {}", args.timeout)))??;
    let elapsed = started.elapsed();
    let samples = sampler.finish().await;
    let after = scrape(&server.status).await?;
    drop(stream);

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"keys": args.keys, "value_size": args.value_size, "regions": plan.subs.len()}),
    );
    report.section("Preload (RawBatchPut)");
    report.float(
        "preload_keys_per_sec",
        "keys/s",
        per_second(args.keys as f64, secs(preload)),
        0,
        "",
    );
    report.section("Catch-up scan");
    report.int("rows", "rows received", tally.rows);
    report.int("keys_expected", "keys expected", args.keys);
    report.int("duplicated", "rows duplicated", tally.duplicates);
    report.int("unexpected", "unexpected rows", tally.foreign);
    report.float(
        "scan_seconds",
        "register → all INITIALIZED",
        secs(elapsed),
        3,
        "s",
    );
    report.float(
        "rows_per_sec",
        "rows/s",
        per_second(tally.rows as f64, secs(elapsed)),
        0,
        "",
    );
    report.float(
        "mb_per_sec",
        "MiB/s (keys + values)",
        per_second(tally.payload_bytes as f64 / MIB, secs(elapsed)),
        1,
        "",
    );
    report.float(
        "wire_mb_per_sec",
        "MiB/s (encoded messages)",
        per_second(tally.wire_bytes as f64 / MIB, secs(elapsed)),
        1,
        "",
    );
    let scanned = match (before.get(SCANNED_BYTES), after.get(SCANNED_BYTES)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    report.bytes("server_scanned_bytes", "server bytes scanned", scanned);
    report.section("Server");
    report_server_use(&mut report, &before, &after, samples.peak_rss(), elapsed);

    if tally.keys.len() != args.keys {
        report.fail(format!(
            "{} distinct keys arrived, {} were preloaded",
            tally.keys.len(),
            args.keys
        ));
    }
    if tally.duplicates > 0 {
        report.fail(format!("{} rows arrived twice", tally.duplicates));
    }
    if tally.foreign > 0 {
        report.fail(format!("{} rows were not preloaded keys", tally.foreign));
    }
    Ok(report)
}

/// What the scan delivered.
#[derive(Default)]
struct Tally {
    keys: SeqSet,
    rows: u64,
    duplicates: u64,
    foreign: u64,
    payload_bytes: u64,
    wire_bytes: u64,
    initialized: usize,
    errors: Vec<String>,
}

impl Tally {
    fn on_message(&mut self, event: kvfeed_proto::cdcpb::ChangeDataEvent, prefix: &[u8]) {
        for_each_item(event, |item| match item {
            Item::Row { row, .. } => match LogType::try_from(row.r#type) {
                Ok(LogType::Initialized) => self.initialized += 1,
                Ok(LogType::Committed) => {
                    self.rows += 1;
                    self.payload_bytes += (row.key.len() + row.value.len()) as u64;
                    match preload_index(prefix, &row.key).map(|i| self.keys.insert(0, i)) {
                        Some(super::stats::Insert::New) => {}
                        Some(super::stats::Insert::Duplicate) => self.duplicates += 1,
                        Some(super::stats::Insert::Foreign) | None => self.foreign += 1,
                    }
                }
                _ => self.foreign += 1,
            },
            Item::Error { error, .. } => self.errors.push(describe(&error)),
            Item::Resolved { .. } => {}
        });
    }
}
