//! The `live` scenario, and the open-loop transactional writer that the
//! `kill` scenario shares.
//!
//! Each of `--writers` tasks starts a transaction of `--keys-per-txn` keys
//! every `writers / rate` seconds on a fixed schedule (a writer that falls
//! behind starts the next one at once and counts it as late). A
//! transaction's commit ts and the instant its last commit call returned
//! are recorded; the latency of a transaction is from that instant until
//! the poller first saw the sink's checkpoint at or above its commit ts.
//! The server's `[cdc] min-ts-interval` (from `/metrics`) bounds how often
//! the resolved ts, and so the checkpoint, can move.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfeed_client::{KeyMode, RegionInfo};
use serde_json::json;
use tokio::task::JoinSet;

use super::child::passed_at;
use super::{ChangefeedArgs, NAME, Setup, count_rows, verify};
use crate::load::{key, prefix_end};
use crate::report::{Report, ms};
use crate::stats::{Histogram, per_second};
use crate::{BenchError, Server, progress, scrape, secs, txn_load};

/// Longest one transaction may take before it counts as failed.
const TXN_TIMEOUT: Duration = Duration::from_secs(10);
/// A transaction started this much after its scheduled time is late.
const LATE: Duration = Duration::from_millis(10);
/// Value size of the writers' keys when `--value-size` is not given.
const DEFAULT_VALUE_SIZE: usize = 128;

/// One acknowledged transaction.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// Its commit ts.
    pub commit_ts: u64,
    /// When its commit returned.
    pub at: Instant,
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct Written {
    /// Acknowledged transactions.
    pub acked: Vec<Acked>,
    /// Transactions that failed or timed out (they may still have
    /// committed).
    pub errors: u64,
    /// The first failure's text.
    pub first_error: Option<String>,
    /// Transactions started more than 10 ms after their schedule.
    pub late: u64,
    /// From the first scheduled start to the last answer.
    pub elapsed: Duration,
}

/// The writers' parameters.
#[derive(Debug, Clone, Copy)]
pub struct WriterSpec {
    /// Transactions per second, all writers together.
    pub rate: f64,
    /// Keys per transaction.
    pub keys_per_txn: u64,
    /// Writer tasks.
    pub writers: u32,
    /// Bytes per value.
    pub value_size: usize,
    /// How long transactions are started.
    pub duration: Duration,
}

impl WriterSpec {
    /// The writers' flags, checked.
    pub fn from_args(args: &ChangefeedArgs, default_duration: u64) -> Result<Self, BenchError> {
        crate::check_range("--rate", args.rate, 1.0, 100_000.0)?;
        crate::check_range("--keys-per-txn", args.keys_per_txn, 1, 1024)?;
        crate::check_range("--writers", args.writers, 1, 256)?;
        let value_size = args.value_size.unwrap_or(DEFAULT_VALUE_SIZE);
        crate::check_range("--value-size", value_size, 1, 1 << 20)?;
        let duration = match args.duration {
            Some(d) => crate::check_duration("--duration", d)?,
            None => Duration::from_secs(default_duration),
        };
        Ok(WriterSpec {
            rate: args.rate,
            keys_per_txn: args.keys_per_txn,
            writers: args.writers,
            value_size,
            duration,
        })
    }
}

/// Runs the open-loop writers on keys under `prefix` until
/// `spec.duration` has passed and every started transaction has answered.
pub async fn write(
    server: &Server,
    prefix: &[u8],
    spec: WriterSpec,
) -> Result<Written, BenchError> {
    let (start, end) = KeyMode::Txn.region_range(prefix, &prefix_end(prefix));
    let regions: Arc<Vec<RegionInfo>> =
        Arc::new(server.cluster.regions_in_range(&start, &end).await?);
    let interval = Duration::from_secs_f64(f64::from(spec.writers) / spec.rate);
    let started = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    for writer in 0..spec.writers {
        let (server, regions, prefix) = (server.clone(), Arc::clone(&regions), prefix.to_vec());
        // Writers start spread over one interval, not all at once.
        let offset = interval.mul_f64(f64::from(writer) / f64::from(spec.writers));
        tasks.spawn(async move {
            let mut out = Written::default();
            let mut seq = 0u64;
            loop {
                let at = started + offset + interval.mul_f64(seq as f64);
                if at.duration_since(started) >= spec.duration {
                    break;
                }
                tokio::time::sleep_until(at).await;
                if at.elapsed() > LATE {
                    out.late += 1;
                }
                let keys = (0..spec.keys_per_txn)
                    .map(|j| key(&prefix, writer, seq * spec.keys_per_txn + j))
                    .collect();
                let txn = txn_load::write_txn(&server, &regions, keys, spec.value_size);
                match tokio::time::timeout(TXN_TIMEOUT, txn).await {
                    Ok(Ok(ts)) => out.acked.push(Acked {
                        commit_ts: ts.commit_ts,
                        at: Instant::now(),
                    }),
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| e.to_string());
                    }
                    Err(_) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| {
                            format!("a transaction took over {TXN_TIMEOUT:?}")
                        });
                    }
                }
                seq += 1;
            }
            out
        });
    }
    let mut all = Written::default();
    while let Some(done) = tasks.join_next().await {
        let out = done.map_err(|e| BenchError::Feed(format!("a writer failed: {e}")))?;
        all.acked.extend(out.acked);
        all.errors += out.errors;
        all.late += out.late;
        if all.first_error.is_none() {
            all.first_error = out.first_error;
        }
    }
    all.elapsed = started.elapsed();
    all.acked.sort_by_key(|a| a.commit_ts);
    Ok(all)
}

/// Adds the writers' figures to `report`.
pub fn report_writers(report: &mut Report, spec: &WriterSpec, written: &Written) {
    report.section("Writers (open loop)");
    report.float("rate", "transactions/s scheduled", spec.rate, 0, "");
    report.int(
        "txns",
        "transactions acknowledged",
        written.acked.len() as u64,
    );
    report.float(
        "txn_per_sec",
        "transactions/s achieved",
        per_second(written.acked.len() as f64, secs(written.elapsed)),
        0,
        "",
    );
    report.int(
        "late_txns",
        "transactions started late (> 10 ms)",
        written.late,
    );
    report.int("txn_errors", "transactions failed", written.errors);
    if let Some(e) = &written.first_error {
        report.text("first_txn_error", "first failure", e);
    }
}

/// The `live` scenario; see the module comment.
pub async fn run(
    args: &ChangefeedArgs,
    setup: &mut Setup,
    report: &mut Report,
) -> Result<(), BenchError> {
    let spec = WriterSpec::from_args(args, 30)?;
    let interval = scrape::scrape(&setup.server.status)
        .await?
        .get("kvfeed_cdc_min_ts_interval_seconds");
    progress(NAME, "starting the changefeed");
    let (mut proc, poller) = setup.start_now().await?;
    progress(
        NAME,
        &format!(
            "writing {} transactions/s of {} keys for {:?}",
            spec.rate, spec.keys_per_txn, spec.duration
        ),
    );
    let written = write(&setup.server, &setup.prefix, spec).await?;
    let last = written.acked.last().map_or(0, |a| a.commit_ts);
    let waited = poller
        .wait_for(last, &mut proc, setup.timeout, "live")
        .await;
    let memory = proc.memory();
    let peak_sampled = poller.peak_rss();
    proc.kill()?;
    let samples = poller.finish();
    waited?;

    let mut latency = Histogram::default();
    let mut undelivered = 0u64;
    for txn in &written.acked {
        match passed_at(&samples, txn.commit_ts) {
            Some(at) => latency.record(at.saturating_duration_since(txn.at).as_nanos() as u64),
            None => undelivered += 1,
        }
    }
    report.json(
        "params",
        json!({
            "rate": spec.rate,
            "keys_per_txn": spec.keys_per_txn,
            "writers": spec.writers,
            "value_size": spec.value_size,
            "duration_s": secs(spec.duration),
            "memory_mib": args.memory_mib,
        }),
    );
    report.opt_float(
        "min_ts_interval_ms",
        "server [cdc] min-ts-interval",
        interval.map(|s| s * 1000.0),
        0,
        "ms",
    );
    report_writers(report, &spec, &written);
    report.section("Commit acknowledged → sink checkpoint ≥ commit ts");
    report.opt_float("latency_p50_ms", "p50", ms(latency.quantile(0.5)), 1, "ms");
    report.opt_float("latency_p99_ms", "p99", ms(latency.quantile(0.99)), 1, "ms");
    report.opt_float("latency_max_ms", "max", ms(latency.max()), 1, "ms");
    report.int(
        "checkpoint_moves",
        "checkpoint moves seen",
        samples.len() as u64,
    );
    report.bytes(
        "peak_rss_bytes",
        "changefeed peak RSS (VmHWM)",
        memory.map(|m| m.hwm as f64),
    );
    report.bytes(
        "sampled_peak_rss_bytes",
        "changefeed peak RSS (sampled every 50 ms)",
        Some(peak_sampled as f64),
    );
    let p99_ms = ms(latency.quantile(0.99));
    let target = interval.map(|s| if s <= 0.011 { 60.0 } else { 250.0 });
    report.opt_float("target_p99_ms", "target p99", target, 0, "ms");
    if let (Some(p99), Some(target)) = (p99_ms, target) {
        report.flag("target_met", "p99 within target", p99 <= target);
    }
    if undelivered > 0 {
        report.fail(format!(
            "{undelivered} acknowledged transactions were never passed by the checkpoint"
        ));
    }
    let keys = written.acked.len() as u64 * spec.keys_per_txn;
    let counted = count_rows(&setup.spec.sink, |_| true).await?;
    report.int("rows_in_sink", "rows in the sink", counted.rows);
    if written.errors == 0 && counted.rows != keys {
        report.fail(format!(
            "the sink holds {} rows, {keys} keys were committed",
            counted.rows
        ));
    }
    counted.faults.into_iter().for_each(|f| report.fail(f));
    verify(setup, report).await
}
