//! `kvfeed bench scan`: how fast a new subscriber catches up.
//!
//! `--keys` raw keys are preloaded under a fresh prefix with RawBatchPut,
//! then one stream subscribes to every region of the prefix from
//! checkpoint 0, so the catch-up scan must deliver every key. With
//! `--txn`, as many transactional keys are preloaded under the same prefix
//! (in 256-key transactions, as clients write them) and caught up on the
//! same way, after the raw ones, and the report compares the two rates. The clock
//! runs from the first Register to the last INITIALIZED. Every row's key
//! is mapped back to its index, so "each key exactly once" is checked
//! exactly, not inferred from a count.
//!
//! The yardstick: afterwards the same keys and values are written, in this
//! process, through kvfeed's raw store into a fresh fjall engine in a
//! temporary directory (removed afterwards), and one forward scan of its
//! raw family is timed (the engine alone, as `bench engine` measures it).
//! The report gives the catch-up rate as a share of that rate. Both run on
//! the same machine; the catch-up figure also pays for the bench's own
//! decoding, on the same cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_proto::cdcpb::event::LogType;
use kvfeed_storage::engine::Engine;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::store::{Durability, Store};
use kvfeed_storage::tso::{Clock, SystemClock, Tso};
use prost::Message;
use serde_json::json;

use super::engine::{TempDir, scan_raw_family};
use super::load::{self, PreloadArgs, prefix_end, preload_index, preload_key};
use super::report::Report;
use super::scrape::{SCANNED_BYTES, Sampler, Scrape, scrape};
use super::stats::{SeqSet, per_second};
use super::subscribe::{FeedStream, Item, Plan, connect, describe, for_each_item};
use super::txn_load;
use super::{BenchError, Server, TargetArgs, progress, report_server_use, run_prefix, secs};
use kvfeed_client::KeyMode;
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "scan";
const MIB: f64 = 1024.0 * 1024.0;

/// The flags of `kvfeed bench scan`.
#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// How many keys to preload and catch up on, and the time limit.
    #[command(flatten)]
    pub preload: PreloadArgs,

    /// Also preload the same number of keys in transactions (256 keys
    /// each, prewrite then commit) and catch up on those too, so the two
    /// key spaces are compared in one run.
    #[arg(long)]
    pub txn: bool,

    /// Where to create the temporary database of the engine comparison
    /// [default: the system's temporary directory]. Use the disk the
    /// server's data lives on.
    #[arg(long, value_name = "DIR")]
    pub engine_dir: Option<PathBuf>,
}

/// Keys per write while filling the comparison engine.
const ENGINE_FILL_BATCH: u64 = 1024;

/// Runs `kvfeed bench scan`: preloads, subscribes from checkpoint 0 and
/// times the catch-up; a key missing or delivered twice is recorded as a
/// failure.
pub async fn run(args: &ScanArgs) -> Result<Report, BenchError> {
    let timeout = args.preload.check()?;
    let server = Server::connect(&args.target).await?;
    // Raw and transactional keys are separate key spaces: one prefix serves
    // both.
    let prefix = run_prefix(NAME);
    progress(NAME, &format!("preloading {} raw keys", args.preload.keys));
    let preload =
        load::preload(&server, &prefix, args.preload.keys, args.preload.value_size).await?;
    let txn_preload = if args.txn {
        progress(
            NAME,
            &format!(
                "preloading {} transactional keys ({} per transaction)",
                args.preload.keys,
                txn_load::TXN_KEYS
            ),
        );
        Some(
            txn_load::preload_txn(&server, &prefix, args.preload.keys, args.preload.value_size)
                .await?,
        )
    } else {
        None
    };
    args.preload.settle(NAME).await;
    let raw = catch_up(
        &server,
        KeyMode::Raw,
        &prefix,
        timeout,
        args.preload.timeout,
    )
    .await?;
    let txn = match txn_preload {
        Some(_) => Some(
            catch_up(
                &server,
                KeyMode::Txn,
                &prefix,
                timeout,
                args.preload.timeout,
            )
            .await?,
        ),
        None => None,
    };

    progress(
        NAME,
        "scanning the same data with the engine alone, in process",
    );
    let engine = {
        let dir = args.engine_dir.clone().unwrap_or_else(std::env::temp_dir);
        let prefix = prefix.clone();
        let (keys, value_size) = (args.preload.keys, args.preload.value_size);
        tokio::task::spawn_blocking(move || engine_scan(&dir, &prefix, keys, value_size))
            .await
            .map_err(|e| BenchError::Feed(format!("the engine comparison failed: {e}")))??
    };

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"keys": args.preload.keys, "value_size": args.preload.value_size, "regions": raw.regions,
               "txn": args.txn}),
    );
    report.section("Preload");
    report.float(
        "preload_keys_per_sec",
        "raw keys/s (RawBatchPut)",
        per_second(args.preload.keys as f64, secs(preload)),
        0,
        "",
    );
    if let Some(txn_preload) = txn_preload {
        report.float(
            "txn_preload_keys_per_sec",
            "transactional keys/s (prewrite + commit)",
            per_second(args.preload.keys as f64, secs(txn_preload)),
            0,
            "",
        );
    }
    report.section("Catch-up scan, raw keys");
    raw.report(&mut report, "", args.preload.keys);
    if let Some(txn) = &txn {
        report.section("Catch-up scan, transactional keys");
        txn.report(&mut report, "txn_", args.preload.keys);
        report.float(
            "txn_vs_raw_percent",
            "transactional rows/s ÷ raw rows/s",
            percent(txn.rows_per_sec(), raw.rows_per_sec()),
            1,
            "%",
        );
    }
    report.section("The engine alone, same raw data (in process)");
    let engine_per_sec = per_second(engine.entries as f64, secs(engine.elapsed));
    report.int("engine_entries", "entries", engine.entries);
    report.float(
        "engine_entries_per_sec",
        "entries/s (fjall range scan)",
        engine_per_sec,
        0,
        "",
    );
    report.float(
        "engine_mb_per_sec",
        "MiB/s (keys + values)",
        per_second(engine.bytes as f64 / MIB, secs(engine.elapsed)),
        1,
        "",
    );
    report.float(
        "scan_vs_engine_percent",
        "raw catch-up rows/s ÷ engine entries/s",
        percent(raw.rows_per_sec(), engine_per_sec),
        1,
        "%",
    );
    report.section("Server, during the raw catch-up");
    report_server_use(
        &mut report,
        &raw.before,
        &raw.after,
        raw.peak_rss,
        raw.elapsed,
    );

    raw.check(&mut report, "raw", args.preload.keys);
    if let Some(txn) = &txn {
        txn.check(&mut report, "transactional", args.preload.keys);
    }
    if engine.entries != args.preload.keys {
        report.fail(format!(
            "the engine comparison found {} entries, {} were written",
            engine.entries, args.preload.keys
        ));
    }
    Ok(report)
}

/// `part` as a percentage of `whole` (0 when `whole` is 0).
fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// One catch-up from checkpoint 0 over the prefix's regions in one key
/// space, and what the server did meanwhile.
struct CatchUp {
    tally: Tally,
    regions: usize,
    elapsed: Duration,
    before: Scrape,
    after: Scrape,
    peak_rss: Option<f64>,
}

/// Subscribes one stream to every region of `prefix` in `mode` from
/// checkpoint 0 and reads until every region is INITIALIZED.
async fn catch_up(
    server: &Server,
    mode: KeyMode,
    prefix: &[u8],
    timeout: Duration,
    shown: ReadableDuration,
) -> Result<CatchUp, BenchError> {
    let plan = Plan::new(server, mode, prefix, &prefix_end(prefix)).await?;
    let mut stream = FeedStream::open(connect(server.feed_addr()).await?).await?;
    let before = scrape(&server.status).await?;
    let sampler = Sampler::start(&server.status);
    let space = match mode {
        KeyMode::Raw => "raw",
        KeyMode::Txn => "transactional",
    };
    progress(
        NAME,
        &format!(
            "scanning {} region(s) of {space} keys from checkpoint 0",
            plan.subs.len()
        ),
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
            tally.on_message(event, prefix);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, scanning)
        .await
        .map_err(|_| BenchError::Feed(format!("the scan took longer than {shown}")))??;
    let elapsed = started.elapsed();
    let samples = sampler.finish().await;
    let after = scrape(&server.status).await?;
    Ok(CatchUp {
        tally,
        regions: plan.subs.len(),
        elapsed,
        before,
        after,
        peak_rss: samples.peak_rss(),
    })
}

impl CatchUp {
    fn rows_per_sec(&self) -> f64 {
        per_second(self.tally.rows as f64, secs(self.elapsed))
    }

    /// The catch-up's figures, their JSON keys prefixed with `key`.
    fn report(&self, report: &mut Report, key: &str, keys: u64) {
        let tally = &self.tally;
        let secs = secs(self.elapsed);
        report.int(&format!("{key}rows"), "rows received", tally.rows);
        report.int(&format!("{key}keys_expected"), "keys expected", keys);
        report.int(
            &format!("{key}duplicated"),
            "rows duplicated",
            tally.duplicates,
        );
        report.int(
            &format!("{key}unexpected"),
            "unexpected rows",
            tally.foreign,
        );
        report.float(
            &format!("{key}scan_seconds"),
            "register → all INITIALIZED",
            secs,
            3,
            "s",
        );
        report.float(
            &format!("{key}rows_per_sec"),
            "rows/s",
            self.rows_per_sec(),
            0,
            "",
        );
        report.float(
            &format!("{key}mb_per_sec"),
            "MiB/s (keys + values)",
            per_second(tally.payload_bytes as f64 / MIB, secs),
            1,
            "",
        );
        report.float(
            &format!("{key}wire_mb_per_sec"),
            "MiB/s (encoded messages)",
            per_second(tally.wire_bytes as f64 / MIB, secs),
            1,
            "",
        );
        let scanned = match (
            self.before.get(SCANNED_BYTES),
            self.after.get(SCANNED_BYTES),
        ) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        report.bytes(
            &format!("{key}server_scanned_bytes"),
            "server bytes scanned",
            scanned,
        );
    }

    /// Fails the report unless every key arrived exactly once.
    fn check(&self, report: &mut Report, space: &str, keys: u64) {
        let tally = &self.tally;
        if tally.keys.len() != keys {
            report.fail(format!(
                "{space}: {} distinct keys arrived, {keys} were preloaded",
                tally.keys.len()
            ));
        }
        if tally.duplicates > 0 {
            report.fail(format!("{space}: {} rows arrived twice", tally.duplicates));
        }
        if tally.foreign > 0 {
            report.fail(format!(
                "{space}: {} rows were not preloaded keys",
                tally.foreign
            ));
        }
    }
}

/// What the engine alone did with the same data.
struct EngineScan {
    entries: u64,
    bytes: u64,
    elapsed: Duration,
}

/// Writes the preloaded keys and values through a raw store into a fresh
/// engine under `dir` (so they are stored exactly as the server stores
/// them), then times one forward scan of the raw family.
fn engine_scan(
    dir: &Path,
    prefix: &[u8],
    keys: u64,
    value_size: usize,
) -> Result<EngineScan, BenchError> {
    let tmp = TempDir::new(dir, "scan")?;
    let engine: Arc<dyn Engine> = Arc::new(FjallEngine::open(tmp.path())?);
    let store = Arc::new(Store::open(engine, Durability::NoSync)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let tso = Arc::new(Tso::open(Arc::clone(&store), clock)?);
    let raw = RawStore::new(Arc::clone(&store), tso);
    let mut next = 0;
    while next < keys {
        let end = (next + ENGINE_FILL_BATCH).min(keys);
        let pairs: Vec<_> = (next..end)
            .map(|i| (preload_key(prefix, i), vec![b'v'; value_size]))
            .collect();
        raw.batch_put(&pairs, &[])?;
        next = end;
    }
    let (entries, bytes, elapsed) = scan_raw_family(&*store.snapshot())?;
    Ok(EngineScan {
        entries,
        bytes,
        elapsed,
    })
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
