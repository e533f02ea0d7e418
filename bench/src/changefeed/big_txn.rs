//! The `big-txn` scenario: one transaction of `--keys` keys of
//! `--value-size` bytes (1 GiB by default), and how much the changefeed's
//! memory grows while it delivers it.
//!
//! The transaction is written the way a client writes a large one: every
//! key is prewritten (in requests of about [`BATCH_BYTES`], the primary's
//! batch first, a few at once), then the primary is committed alone — the
//! transaction's commit point — and then the secondaries in batches. The
//! store caps one request at 16 MiB and one value at 8 MiB but has no
//! limit on a transaction's size, so a 1 GiB transaction is possible.
//!
//! The locks' TTL is [`LOCK_TTL_MS`], far longer than the prewrite takes,
//! so no heartbeat is needed: a lock is only ever rolled back by a reader
//! that meets it after its TTL (CheckTxnStatus), and nothing reads the
//! fresh prefix while the transaction is open; the server expires nothing
//! by itself. A prewrite slower than the TTL fails the run rather than
//! measure a transaction that could have been rolled back.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfeed_client::{ClientError, KeyMode, RegionInfo};
use serde_json::json;
use tokio::task::JoinSet;

use super::{ChangefeedArgs, NAME, Setup, count_rows};
use crate::load::{prefix_end, preload_key};
use crate::report::Report;
use crate::txn_load::{self, Prewrite, REGION_RETRIES};
use crate::{BenchError, Server, progress, secs};

/// Bytes of values per prewrite request: half the server's 16 MiB cap.
pub const BATCH_BYTES: usize = 8 << 20;
/// Keys per commit request of the secondaries.
const COMMIT_BATCH: usize = 50_000;
/// Requests in flight at once.
const PARALLEL: usize = 2;
/// The locks' TTL, ms (10 minutes).
pub const LOCK_TTL_MS: u64 = 600_000;
/// How long the changefeed runs idle before its baseline RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// The target: the changefeed's RSS grows by at most this much.
const TARGET_GROWTH: u64 = 128 << 20;

/// Runs the scenario; see the module comment.
pub async fn run(
    args: &ChangefeedArgs,
    setup: &mut Setup,
    report: &mut Report,
) -> Result<(), BenchError> {
    crate::check_range("--keys", args.keys, 1, 10_000_000)?;
    let value_size = args.value_size.unwrap_or(1024);
    crate::check_range("--value-size", value_size, 1, 1 << 20)?;
    progress(NAME, "starting the changefeed");
    let (mut proc, poller) = setup.start_now().await?;
    tokio::time::sleep(SETTLE).await;
    let baseline = proc.memory().ok_or_else(|| proc.died())?;
    progress(
        NAME,
        &format!(
            "baseline RSS {:.1} MiB; writing one transaction of {} keys × {value_size} B",
            baseline.rss as f64 / 1048576.0,
            args.keys
        ),
    );
    let server = setup.server.clone();
    let keys: Vec<Vec<u8>> = (0..args.keys)
        .map(|i| preload_key(&setup.prefix, i))
        .collect();
    let keys = Arc::new(keys);
    let (start, end) = KeyMode::Txn.region_range(&setup.prefix, &prefix_end(&setup.prefix));
    let regions = Arc::new(server.cluster.regions_in_range(&start, &end).await?);
    let start_ts = server.cluster.tso().await?.into_inner();
    let txn = Prewrite {
        start_ts,
        txn_size: args.keys,
        value_size,
        lock_ttl_ms: LOCK_TTL_MS,
    };
    let prewrite_started = Instant::now();
    let per_request = (BATCH_BYTES / (value_size + 64)).max(1);
    in_batches(0..keys.len(), per_request, true, |batch| {
        let (server, regions, keys) = (server.clone(), Arc::clone(&regions), Arc::clone(&keys));
        async move { prewrite_batch(&server, &regions, &keys[batch], &keys[0], txn).await }
    })
    .await?;
    let prewrite = prewrite_started.elapsed();
    if prewrite >= Duration::from_millis(LOCK_TTL_MS) {
        return Err(BenchError::Feed(format!(
            "the prewrite took {prewrite:?}, longer than the locks' TTL"
        )));
    }
    let commit_ts = server.cluster.tso().await?.into_inner();
    let commit_started = Instant::now();
    // The primary alone first: once it is committed, so is the transaction.
    commit_batch(&server, &regions, &keys[..1], &keys[0], start_ts, commit_ts).await?;
    in_batches(1..keys.len(), COMMIT_BATCH, false, |batch| {
        let (server, regions, keys) = (server.clone(), Arc::clone(&regions), Arc::clone(&keys));
        async move {
            commit_batch(
                &server,
                &regions,
                &keys[batch],
                &keys[0],
                start_ts,
                commit_ts,
            )
            .await
        }
    })
    .await?;
    let committed = Instant::now();
    let commit = commit_started.elapsed();
    drop(keys);
    progress(NAME, "committed; waiting for the sink");
    let waited = poller
        .wait_for(commit_ts, &mut proc, setup.timeout, "big-txn")
        .await;
    let memory = proc.memory();
    let peak_sampled = poller.peak_rss();
    proc.kill()?;
    drop(poller.finish());
    let delivered = waited?;

    progress(NAME, "counting the sink's rows");
    let counted = count_rows(&setup.spec.sink, |row| {
        row.commit_ts.into_inner() == commit_ts && row.start_ts.into_inner() == start_ts
    })
    .await?;
    let growth = memory.map(|m| m.hwm.saturating_sub(baseline.rss));
    report.json(
        "params",
        json!({"keys": args.keys, "value_size": value_size, "memory_mib": args.memory_mib}),
    );
    report.section("The transaction");
    report.int("keys", "keys", args.keys);
    report.bytes(
        "txn_bytes",
        "values",
        Some(args.keys as f64 * value_size as f64),
    );
    report.float("prewrite_seconds", "prewrite", secs(prewrite), 2, "s");
    report.float("commit_seconds", "commit", secs(commit), 2, "s");
    report.float(
        "delivery_seconds",
        "commit acknowledged → sink checkpoint ≥ commit ts",
        secs(delivered.saturating_duration_since(committed)),
        2,
        "s",
    );
    report.section("Changefeed memory");
    report.bytes(
        "baseline_rss_bytes",
        "RSS before (steady)",
        Some(baseline.rss as f64),
    );
    report.bytes(
        "peak_rss_bytes",
        "peak RSS (VmHWM)",
        memory.map(|m| m.hwm as f64),
    );
    report.bytes(
        "sampled_peak_rss_bytes",
        "peak RSS (sampled every 50 ms)",
        Some(peak_sampled as f64),
    );
    report.bytes(
        "rss_growth_bytes",
        "growth (VmHWM − RSS before)",
        growth.map(|g| g as f64),
    );
    report.flag(
        "target_met",
        "growth ≤ 128 MiB",
        growth.is_some_and(|g| g <= TARGET_GROWTH),
    );
    report.section("Sink");
    report.int("rows_in_sink", "rows", counted.rows);
    report.int(
        "txn_rows_in_sink",
        "rows of the transaction",
        counted.matching,
    );
    if counted.matching != args.keys || counted.rows != args.keys {
        report.fail(format!(
            "the sink holds {} rows, {} of the transaction; it wrote {} keys",
            counted.rows, counted.matching, args.keys
        ));
    }
    counted.faults.into_iter().for_each(|f| report.fail(f));
    Ok(())
}

/// Runs `one` over `all` cut in ranges of `per`, [`PARALLEL`] at once;
/// with `first_alone`, the first range (it holds the primary) before the
/// others.
async fn in_batches<F, Fut>(
    all: Range<usize>,
    per: usize,
    first_alone: bool,
    one: F,
) -> Result<(), BenchError>
where
    F: Fn(Range<usize>) -> Fut,
    Fut: Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let end = all.end;
    let mut ranges = all.step_by(per.max(1)).map(|s| s..(s + per).min(end));
    if first_alone && let Some(first) = ranges.next() {
        one(first).await?;
    }
    let mut tasks = JoinSet::new();
    for range in ranges {
        while tasks.len() >= PARALLEL {
            join_one(&mut tasks).await?;
        }
        tasks.spawn(one(range));
    }
    while !tasks.is_empty() {
        join_one(&mut tasks).await?;
    }
    Ok(())
}

async fn join_one(tasks: &mut JoinSet<Result<(), BenchError>>) -> Result<(), BenchError> {
    match tasks.join_next().await {
        Some(done) => done.map_err(|e| BenchError::Feed(format!("a request task failed: {e}")))?,
        None => Ok(()),
    }
}

/// Prewrites `keys`, looking their regions up again after a region error.
async fn prewrite_batch(
    server: &Server,
    regions: &[RegionInfo],
    keys: &[Vec<u8>],
    primary: &[u8],
    txn: Prewrite,
) -> Result<(), BenchError> {
    let mut layout = regions.to_vec();
    for attempt in 0.. {
        match txn_load::prewrite(server, &layout, keys, primary, txn).await {
            Err(BenchError::Client(ClientError::Region(e))) if attempt < REGION_RETRIES => {
                tracing::debug!(%e, attempt, "big-txn prewrite: region changed");
                layout = txn_load::relocate(server, keys).await?;
            }
            other => return other,
        }
    }
    Ok(())
}

/// Commits `keys`, looking their regions up again after a region error.
async fn commit_batch(
    server: &Server,
    regions: &[RegionInfo],
    keys: &[Vec<u8>],
    primary: &[u8],
    start_ts: u64,
    commit_ts: u64,
) -> Result<(), BenchError> {
    let mut layout = regions.to_vec();
    for attempt in 0.. {
        match txn_load::commit(server, &layout, keys, primary, start_ts, commit_ts).await {
            Err(BenchError::Client(ClientError::Region(e))) if attempt < REGION_RETRIES => {
                tracing::debug!(%e, attempt, "big-txn commit: region changed");
                layout = txn_load::relocate(server, keys).await?;
            }
            other => return other,
        }
    }
    Ok(())
}
