//! `kvfeed bench slow`: one consumer stops reading while writers write.
//!
//! What a server must do about a stalled consumer: bound the memory it
//! spends on it, tell it (`congested`) rather than drop events silently,
//! and keep every other consumer whole. So two consumers subscribe to the
//! same range, each on its own TCP connection (sharing one would let the
//! stalled stream eat the shared HTTP/2 window and stall the other in the
//! client, not the server). Once both are INITIALIZED the slow one stops
//! reading and the writers start. Measured:
//! - when the server gave up on the slow consumer: the first 250 ms sample
//!   where `kvfeed_cdc_subscriptions` fell (its subscriptions are removed
//!   when it is congested), counted from the first put;
//! - how the slow consumer learns it: afterwards it reads what was queued
//!   for it, which must end with `congested` (or the stream ending);
//! - the server's peak RSS while it was stalled;
//! - that the fast consumer received every acknowledged put exactly once
//!   (a failure otherwise).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::sync::watch;

use super::load::{self, LoadSpec, STAMP_LEN, prefix_end};
use super::report::{Report, ms};
use super::scrape::{SUBSCRIPTIONS, Sampler, scrape};
use super::stats::per_second;
use super::subscribe::Plan;
use super::watcher::{Subscribed, Target};
use super::{
    BenchError, Server, TargetArgs, check_duration, check_range, progress, report_server_use,
    run_prefix, secs,
};
use kvfeed_client::KeyMode;
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "slow";
/// How long the slow consumer may take to read what was queued for it.
const SLOW_DRAIN: Duration = Duration::from_secs(60);

/// The flags of `kvfeed bench slow`.
#[derive(Debug, Clone, Args)]
pub struct SlowArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// Writer tasks (closed loop, raw puts).
    #[arg(long, value_name = "W", default_value_t = 4)]
    pub writers: u32,

    /// How long the writers write while the slow consumer does not read.
    #[arg(long, value_name = "D", default_value = "10s")]
    pub duration: ReadableDuration,

    /// Bytes per value (at least 20).
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// After the writers stop, how long to wait for the fast consumer to
    /// see every acknowledged put.
    #[arg(long, value_name = "D", default_value = "30s")]
    pub drain_timeout: ReadableDuration,
}

/// Runs `kvfeed bench slow`: stalls one consumer while writers write.
/// Failed puts, and a fast consumer that lost or repeated a put or got a
/// feed error, are recorded as failures; whether and when the stalled one
/// was told `congested` is reported, not judged.
pub async fn run(args: &SlowArgs) -> Result<Report, BenchError> {
    check_range("--writers", args.writers, 1, 1024)?;
    check_range("--value-size", args.value_size, STAMP_LEN, 1 << 20)?;
    let duration = check_duration("--duration", args.duration)?;
    let drain_timeout = check_duration("--drain-timeout", args.drain_timeout)?;
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    let plan = Arc::new(Plan::new(&server, KeyMode::Raw, &prefix, &prefix_end(&prefix)).await?);
    let checkpoint = server.cluster.tso().await?.into_inner();
    let addr = server.feed_addr().to_owned();
    let fast = Subscribed::open(&addr, &plan, checkpoint, args.writers).await?;
    let slow = Subscribed::open(&addr, &plan, checkpoint, args.writers).await?;
    let (target_tx, target_rx) = watch::channel(None::<Target>);
    let fast = fast.spawn(target_rx);

    let before = scrape(&server.status).await?;
    let subs_before = before.require(SUBSCRIPTIONS)?;
    let sampler_started = Instant::now();
    let sampler = Sampler::start(&server.status);
    progress(
        NAME,
        &format!(
            "one consumer stalled; {} writer(s) for {}",
            args.writers, args.duration
        ),
    );
    let started = Instant::now();
    let spec = LoadSpec {
        writers: args.writers,
        rate: None,
        duration,
        value_size: args.value_size,
        mode: KeyMode::Raw,
        prefix,
    };
    let load = load::run(&server, &spec).await?;
    target_tx.send_replace(Some(Target {
        puts: load.acked.len(),
        give_up_at: tokio::time::Instant::now() + drain_timeout,
    }));
    let fast = fast
        .await
        .map_err(|e| BenchError::Feed(format!("the fast consumer's task failed: {e}")))?;
    let all_done = started.elapsed();
    let samples = sampler.finish().await;
    let after = scrape(&server.status).await?;
    progress(NAME, "reading what the server queued for the slow consumer");
    let (slow_end, slow_seen) = slow.drain_after_stall(load.acked.len(), SLOW_DRAIN).await;

    // The first sample in which the slow consumer's subscriptions were gone.
    let offset = started.duration_since(sampler_started);
    let gave_up_at = samples
        .points
        .iter()
        .find(|p| p.subscriptions.is_some_and(|s| s < subs_before))
        .map(|p| p.at.saturating_sub(offset));
    let congested = slow_seen.errors.iter().any(|e| e == "congested");

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"writers": args.writers, "duration_s": secs(duration),
               "value_size": args.value_size, "regions": plan.subs.len()}),
    );
    report.section("Writes");
    report.int("puts", "puts acknowledged", load.acked.len());
    report.float(
        "puts_per_sec",
        "puts/s",
        per_second(load.acked.len() as f64, secs(load.elapsed)),
        0,
        "",
    );
    if let Some(error) = &load.first_error {
        report.fail(format!(
            "{} puts failed, the first with: {error}",
            load.errors
        ));
    }
    report.section("Slow consumer");
    report.flag("congested", "told congested", congested);
    report.text("slow_end", "how its stream ended", &slow_end);
    report.opt_float(
        "seconds_to_congested",
        "first put → server gave up (±0.25 s)",
        gave_up_at.map(secs),
        2,
        "s",
    );
    report.int("slow_rows", "rows it received", slow_seen.rows);
    report.int(
        "slow_missed",
        "puts it did not receive",
        load.acked.missing_from(&slow_seen.puts),
    );
    report.section("Fast consumer");
    let lost = load.acked.missing_from(&fast.puts);
    report.int("fast_rows", "rows received", fast.rows);
    report.int("fast_lost", "events lost", lost);
    report.int("fast_duplicated", "events duplicated", fast.duplicates);
    report.opt_float(
        "fast_latency_p99_ms",
        "put→event p99",
        ms(fast.latency.quantile(0.99)),
        2,
        "ms",
    );
    if lost > 0 {
        report.fail(format!("the fast consumer lost {lost} events"));
    }
    if fast.duplicates > 0 {
        report.fail(format!(
            "the fast consumer got {} events twice",
            fast.duplicates
        ));
    }
    for error in &fast.errors {
        report.fail(format!("the fast consumer got a feed error: {error}"));
    }
    if fast.foreign > 0 || slow_seen.foreign > 0 || slow_seen.duplicates > 0 {
        report.fail("rows that were not puts of this run, or duplicates, reached a consumer");
    }
    report.section("Server");
    report_server_use(&mut report, &before, &after, samples.peak_rss(), all_done);
    Ok(report)
}
