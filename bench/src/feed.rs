//! `kvfeed bench feed`: write and watch at the same time.
//!
//! Order of a run, and why:
//! 1. every watcher subscribes (from a fresh timestamp) and waits until all
//!    its subscriptions are INITIALIZED — only then can no put be missed
//!    for a reason other than a fault;
//! 2. the writers write for `--duration`; a sampler scrapes the server's
//!    memory and CPU every 250 ms meanwhile;
//! 3. the watchers are told how many puts were acknowledged and keep
//!    reading until each has seen that many distinct puts, or until
//!    `--drain-timeout`;
//! 4. loss is computed against the exact set of acknowledged puts.
//!
//! events/s counts data rows delivered to all watchers, over the time from
//! the first put until the last watcher had everything: a feed that
//! buffers instead of delivering gains nothing by it.
//!
//! With `--target etcd://...` the same run drives etcd: Puts instead of
//! RawPuts, one watch per watcher instead of one subscription per region
//! (ready at `created` instead of INITIALIZED), no resolved ts; the
//! measurement and the report are the same code (see [`super::target`]).

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::load::{self, LoadSpec, STAMP_LEN};
use super::report::{Report, ms};
use super::scrape::{Sampler, scrape};
use super::stats::{Histogram, per_second};
use super::target::{System, TargetKind};
use super::watcher::{Seen, Target};
use super::{
    BenchError, TargetArgs, check_duration, check_range, progress, report_server_use, run_prefix,
    secs,
};
use kvfeed_client::KeyMode;
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "feed";

/// The flags of `kvfeed bench feed`.
#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// Writer tasks.
    #[arg(long, value_name = "W", default_value_t = 4)]
    pub writers: u32,

    /// Total puts per second across all writers, sent on schedule whether
    /// or not earlier puts finished (open loop); latency then counts from
    /// the scheduled time. Without it each writer sends its next put when
    /// the previous one is acknowledged (closed loop).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// EventFeed streams, each on its own connection and subscribed to
    /// every region of the written key range (on etcd: Watch streams, each
    /// on its own connection with one watch of the range).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub watchers: u32,

    /// Bytes per value (at least 20: each value carries its send time and
    /// a writer/sequence id).
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// How long the writers write.
    #[arg(long, value_name = "D", default_value = "10s")]
    pub duration: ReadableDuration,

    /// Raw puts (the default): RawPut requests with kvfeed's client types,
    /// regions looked up once and again after a region error (on etcd:
    /// Put requests).
    #[arg(long, conflicts_with = "txn")]
    pub raw: bool,

    /// Transactional puts through kvfeed's own client: each put is a
    /// single-key transaction (two timestamps, prewrite, commit), so
    /// expect far fewer puts/s than with --raw. kvfeed only.
    #[arg(long)]
    pub txn: bool,

    /// After the writers stop, how long to wait for every watcher to see
    /// every acknowledged put.
    #[arg(long, value_name = "D", default_value = "30s")]
    pub drain_timeout: ReadableDuration,
}

impl FeedArgs {
    fn mode(&self) -> KeyMode {
        if self.txn { KeyMode::Txn } else { KeyMode::Raw }
    }

    fn check(&self) -> Result<(Duration, Duration), BenchError> {
        check_range("--writers", self.writers, 1, 1024)?;
        check_range("--watchers", self.watchers, 1, 1024)?;
        check_range("--value-size", self.value_size, STAMP_LEN, 1 << 20)?;
        if let Some(rate) = self.rate {
            check_range("--rate", rate, 1.0, 1e6)?;
        }
        Ok((
            check_duration("--duration", self.duration)?,
            check_duration("--drain-timeout", self.drain_timeout)?,
        ))
    }
}

/// Runs `kvfeed bench feed` in the order the module docs give. Lost,
/// duplicated or foreign rows, failed puts and feed errors are recorded in
/// the report as failures; an `Err` means the run could not be made.
pub async fn run(args: &FeedArgs) -> Result<Report, BenchError> {
    let (duration, drain_timeout) = args.check()?;
    if args.txn && args.target.target != TargetKind::Kvfeed {
        return Err(BenchError::Usage(
            "--txn drives kvfeed's transactions; etcd is written with plain Puts".to_owned(),
        ));
    }
    let system = System::connect(&args.target).await?;
    let mode = args.mode();
    let prefix = run_prefix(NAME);
    let watch = system.watch_plan(mode, &prefix).await?;
    progress(
        NAME,
        &match watch.regions() {
            Some(regions) => format!(
                "subscribing {} watcher(s) to {regions} region(s)",
                args.watchers
            ),
            None => format!("opening {} {} watcher(s)", args.watchers, system.name()),
        },
    );
    let mut opening = JoinSet::new();
    for _ in 0..args.watchers {
        let (watch, writers) = (watch.clone(), args.writers);
        opening.spawn(async move { watch.open(writers).await });
    }
    let mut subscribed = Vec::new();
    while let Some(opened) = opening.join_next().await {
        let opened = opened.map_err(|e| BenchError::Feed(format!("a watcher task failed: {e}")))?;
        subscribed.push(opened?);
    }
    let (target_tx, target_rx) = watch::channel(None::<Target>);
    let watchers: Vec<_> = subscribed
        .into_iter()
        .map(|s| s.spawn(target_rx.clone()))
        .collect();

    let backend = system.writer(mode, &prefix).await?;
    let metrics = system.metrics_addr();
    let before = scrape(metrics).await?;
    let sampler = Sampler::start(metrics);
    progress(
        NAME,
        &format!(
            "{} writer(s), {}, for {}",
            args.writers,
            match args.rate {
                Some(rate) => format!("open loop at {rate} puts/s"),
                None => "closed loop".to_owned(),
            },
            args.duration
        ),
    );
    let started = Instant::now();
    let spec = LoadSpec {
        writers: args.writers,
        rate: args.rate,
        duration,
        value_size: args.value_size,
        mode,
        prefix,
    };
    let load = load::run_on(backend, &spec).await?;
    let writes_done = started.elapsed();
    progress(
        NAME,
        &format!(
            "{} puts acknowledged; waiting for the watchers",
            load.acked.len()
        ),
    );
    target_tx.send_replace(Some(Target {
        puts: load.acked.len(),
        give_up_at: tokio::time::Instant::now() + drain_timeout,
    }));
    let mut seen = Vec::new();
    for watcher in watchers {
        seen.push(
            watcher
                .await
                .map_err(|e| BenchError::Feed(format!("a watcher task failed: {e}")))?,
        );
    }
    let all_done = started.elapsed();
    let samples = sampler.finish().await;
    let after = scrape(metrics).await?;

    let mode_name = match (system.is_kvfeed(), mode) {
        (false, _) => "put",
        (true, KeyMode::Raw) => "raw",
        (true, KeyMode::Txn) => "txn",
    };
    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({
            "target": system.name(),
            "mode": mode_name,
            "writers": args.writers,
            "watchers": args.watchers,
            "rate": args.rate,
            "value_size": args.value_size,
            "duration_s": secs(duration),
            "regions": watch.regions(),
        }),
    );
    report.section("Writes");
    report.text("target", "target", system.name());
    report.text("mode", "mode", mode_name);
    report.int("puts", "puts acknowledged", load.acked.len());
    report.int("put_errors", "put errors", load.errors);
    if args.rate.is_some() {
        report.int(
            "puts_skipped",
            "puts skipped (too many in flight)",
            load.skipped,
        );
    }
    report.float(
        "puts_per_sec",
        "puts/s",
        per_second(load.acked.len() as f64, secs(load.elapsed)),
        0,
        "",
    );
    report.opt_float(
        "put_p50_ms",
        "put latency p50",
        ms(load.put_latency.quantile(0.5)),
        2,
        "ms",
    );
    report.opt_float(
        "put_p99_ms",
        "put latency p99",
        ms(load.put_latency.quantile(0.99)),
        2,
        "ms",
    );
    if let Some(error) = &load.first_error {
        report.text("first_put_error", "first put error", error);
        report.fail(format!(
            "{} puts failed, the first with: {error}",
            load.errors
        ));
    }

    report_events(&mut report, &load.acked, &seen, started, all_done);
    report.float(
        "drain_seconds",
        "writers stopped → watchers complete",
        secs(all_done.saturating_sub(writes_done)),
        2,
        "s",
    );
    report.section("Server");
    report_server_use(&mut report, &before, &after, samples.peak_rss(), all_done);
    Ok(report)
}

/// The consumer side of the report: delivery, latency, exactness, lag.
fn report_events(
    report: &mut Report,
    acked: &super::stats::SeqSet,
    seen: &[Seen],
    started: Instant,
    all_done: Duration,
) {
    let mut latency = Histogram::default();
    let mut lag = Histogram::default();
    let (mut rows, mut lost, mut duplicated, mut foreign, mut unacked) = (0, 0, 0, 0, 0);
    let mut last_complete = None::<Instant>;
    let mut incomplete = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        latency.merge(&s.latency);
        lag.merge(&s.resolved_lag_us);
        rows += s.rows;
        duplicated += s.duplicates;
        foreign += s.foreign;
        lost += acked.missing_from(&s.puts);
        unacked += s.puts.missing_from(acked);
        match s.complete_at {
            Some(at) => last_complete = Some(last_complete.map_or(at, |l: Instant| l.max(at))),
            None => incomplete.push(format!(
                "watcher {i}: {}",
                s.ended.as_deref().unwrap_or("drain timeout")
            )),
        }
        for error in &s.errors {
            report.fail(format!("watcher {i} got a feed error: {error}"));
        }
    }
    let span = last_complete.map_or(all_done, |at| at.duration_since(started));
    report.section("Events (all watchers)");
    report.int("events", "events delivered", rows);
    report.float(
        "events_per_sec",
        "events/s",
        per_second(rows as f64, secs(span)),
        0,
        "",
    );
    report.opt_float(
        "latency_p50_ms",
        "put→event p50",
        ms(latency.quantile(0.5)),
        2,
        "ms",
    );
    report.opt_float(
        "latency_p99_ms",
        "put→event p99",
        ms(latency.quantile(0.99)),
        2,
        "ms",
    );
    report.opt_float(
        "latency_p999_ms",
        "put→event p99.9",
        ms(latency.quantile(0.999)),
        2,
        "ms",
    );
    report.opt_float(
        "latency_max_ms",
        "put→event max",
        ms(latency.max()),
        2,
        "ms",
    );
    report.int("lost", "events lost", lost);
    report.int("duplicated", "events duplicated", duplicated);
    report.int("unexpected", "unexpected rows", foreign);
    report.int("unacked_seen", "events of failed puts", unacked);
    let lag_ms = |q| lag.quantile(q).map(|us| us as f64 / 1000.0);
    report.int("resolved_ts_samples", "resolved-ts samples", lag.count());
    report.opt_float(
        "resolved_lag_p50_ms",
        "resolved-ts lag p50",
        lag_ms(0.5),
        1,
        "ms",
    );
    report.opt_float(
        "resolved_lag_p99_ms",
        "resolved-ts lag p99",
        lag_ms(0.99),
        1,
        "ms",
    );
    if lost > 0 {
        report.fail(format!("{lost} acknowledged puts were never delivered"));
    }
    if duplicated > 0 {
        report.fail(format!("{duplicated} events were delivered twice"));
    }
    if foreign > 0 {
        report.fail(format!("{foreign} rows were not puts of this run"));
    }
    for why in incomplete {
        report.fail(format!("incomplete {why}"));
    }
}
