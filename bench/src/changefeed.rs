//! `kvfeed bench changefeed`: a changefeed (`kvfeed changefeed run`, as a
//! child process writing into a file sink) against a running server.
//!
//! Scenarios (`--scenario`):
//! - `initial`: `--keys` transactional keys are preloaded, then a
//!   changefeed from ts 0 delivers them all: rows/s from the process's
//!   start until the sink's checkpoint passes a ts taken after the
//!   preload, the rows found in the sink (must be every key), peak RSS;
//! - `live` ([`live`]): an open-loop transactional writer; latency from a
//!   commit's acknowledgement until the sink's checkpoint passes its
//!   commit ts;
//! - `big-txn` ([`big_txn`]): one transaction of `--keys` keys; the
//!   changefeed's memory growth while it delivers it;
//! - `kill` ([`kill`]): a steady writer while the changefeed is killed
//!   with SIGKILL and restarted again and again; then `kvfeed verify`.
//!
//! The changefeed's progress is read from outside, as a consumer of the
//! sink would: the durable checkpoint (`checkpoint.json`, rolled forward
//! over the data files' names) is polled every millisecond by a thread of
//! its own ([`child::Poller`]). Its memory is `VmRSS` / `VmHWM` of
//! `/proc/<pid>/status`. Correctness faults — rows missing or extra,
//! `kvfeed verify` finding a problem — fail the run.

pub mod big_txn;
pub mod child;
pub mod kill;
pub mod live;

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_changefeed::sink::file::FileSinkReader;
use kvfeed_changefeed::sink::nats::NatsReader;
use kvfeed_changefeed::sink::{SinkError, SinkUri};
use kvfeed_changefeed::verify::SinkItem;
use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;
use kvfeed_types::units::ReadableDuration;
use serde_json::json;

use super::report::Report;
use super::stats::per_second;
use super::{BenchError, Server, TargetArgs, progress, run_prefix, secs, txn_load};
use child::{Poller, SinkTarget, Spec};

const NAME: &str = "changefeed";

/// The measured scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Deliver `--keys` preloaded keys from ts 0: rows/s and peak RSS.
    Initial,
    /// Open-loop transactions: commit → sink checkpoint latency.
    Live,
    /// One transaction of `--keys` keys: the changefeed's RSS growth.
    BigTxn,
    /// SIGKILL and restart the changefeed under load, then verify the sink.
    Kill,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Initial => "initial",
            Scenario::Live => "live",
            Scenario::BigTxn => "big-txn",
            Scenario::Kill => "kill",
        }
    }
}

/// The flags of `kvfeed bench changefeed`.
#[derive(Debug, Clone, Args)]
pub struct ChangefeedArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// What to measure.
    #[arg(long, value_enum)]
    pub scenario: Scenario,

    /// Keys preloaded (initial) or in the one transaction (big-txn).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub keys: u64,

    /// Bytes per value [default: 1024 for big-txn, 128 otherwise].
    #[arg(long, value_name = "B")]
    pub value_size: Option<usize>,

    /// Transactions per second the writers start (live, kill).
    #[arg(long, value_name = "TXN/S", default_value_t = 1000.0)]
    pub rate: f64,

    /// Keys per transaction (live, kill).
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub keys_per_txn: u64,

    /// Concurrent writer tasks, each starting `--rate / --writers`
    /// transactions per second (live, kill).
    #[arg(long, value_name = "W", default_value_t = 32)]
    pub writers: u32,

    /// How long the writers run [default: 30s for live, 60s for kill].
    #[arg(long, value_name = "D")]
    pub duration: Option<ReadableDuration>,

    /// Time between kills: `D`, or `MIN-MAX` for a seeded random time
    /// in that range (kill).
    #[arg(long, value_name = "D|MIN-MAX", default_value = "3s-5s", value_parser = parse_kill_every)]
    pub kill_every: KillEvery,

    /// Seed of the kill times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// The changefeed's `--memory-mib`.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub memory_mib: usize,

    /// Longest wait for the changefeed to deliver what was written.
    #[arg(long, value_name = "D", default_value = "10m")]
    pub timeout: ReadableDuration,

    /// The sink: nats://HOST:PORT/PREFIX?… (a fresh `.r<hex>` token is
    /// added to the prefix per run, so each run has its own stream)
    /// [default: a file sink in a scratch directory].
    #[arg(long, value_name = "URI")]
    pub sink: Option<String>,
}

/// The sink `--sink` names, with the run's token added to a broker's
/// subject prefix (and stream, when the URI leaves it to the default).
fn sink_target(args: &ChangefeedArgs, dir: &Path, token: &str) -> Result<SinkTarget, BenchError> {
    let Some(uri) = &args.sink else {
        return Ok(SinkTarget::File(dir.join("sink")));
    };
    let (main, query) = uri.split_once('?').unwrap_or((uri, ""));
    let with_token = if query.is_empty() {
        format!("{main}.{token}")
    } else {
        format!("{main}.{token}?{query}")
    };
    match SinkUri::parse(&with_token).map_err(|e| BenchError::Usage(format!("--sink: {e}")))? {
        SinkUri::Nats(nats) => Ok(SinkTarget::Nats(nats)),
        _ => Err(BenchError::Usage(format!(
            "--sink {uri}: only nats:// sinks (or the default file sink) are measured"
        ))),
    }
}

/// `--kill-every`: a fixed time or a range to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillEvery {
    /// Shortest time between kills.
    pub min: Duration,
    /// Longest time between kills.
    pub max: Duration,
}

fn parse_kill_every(text: &str) -> Result<KillEvery, String> {
    let one = |s: &str| {
        s.trim()
            .parse::<ReadableDuration>()
            .map(|d| d.as_duration())
            .map_err(|e| format!("{s}: {e}"))
    };
    let (min, max) = match text.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => (one(text)?, one(text)?),
    };
    if min.is_zero() || min > max {
        return Err(format!(
            "{text}: need 0 < MIN <= MAX (a duration or MIN-MAX)"
        ));
    }
    Ok(KillEvery { min, max })
}

/// What every scenario shares: the server, a fresh prefix, a scratch
/// directory with the sink and the changefeed's state, and how to start it.
pub struct Setup {
    /// The server under test.
    pub server: Server,
    /// The fresh prefix the changefeed follows.
    pub prefix: Vec<u8>,
    /// How to start the changefeed (start ts still to be set).
    pub spec: Spec,
    /// The longest wait for delivery.
    pub timeout: Duration,
    /// Holds the scratch directory (removed when dropped).
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(args: &ChangefeedArgs) -> Result<Setup, BenchError> {
        let timeout = super::check_duration("--timeout", args.timeout)?;
        super::check_range("--memory-mib", args.memory_mib, 1, 1 << 20)?;
        let server = Server::connect(&args.target).await?;
        let prefix = run_prefix(NAME);
        let prefix_text = String::from_utf8(prefix.clone())
            .map_err(|_| BenchError::Usage("the run prefix is not UTF-8".to_owned()))?;
        let dir = tempfile::Builder::new()
            .prefix("kvfeed-bench-changefeed-")
            .tempdir()
            .map_err(|e| BenchError::Feed(format!("cannot make a scratch directory: {e}")))?;
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Feed(format!("cannot find the kvfeed binary: {e}")))?;
        let id = format!(
            "bench-{}-{:x}",
            args.scenario.name(),
            super::load::unix_nanos()
        );
        let spec = Spec {
            exe,
            pd: server.cluster.pd_addr().to_owned(),
            id,
            sink: sink_target(
                args,
                dir.path(),
                &format!("r{:x}", super::load::unix_nanos()),
            )?,
            state_dir: dir.path().join("state"),
            prefix: prefix_text,
            start_ts: 0,
            memory_mib: args.memory_mib,
            log: dir.path().join("changefeed.log"),
        };
        Ok(Setup {
            server,
            prefix,
            spec,
            timeout,
            _dir: dir,
        })
    }

    /// Starts the changefeed at a fresh ts and waits until its sink has a
    /// checkpoint above it: from then on, what is written is followed.
    pub async fn start_now(&mut self) -> Result<(child::Proc, Poller), BenchError> {
        self.spec.start_ts = self.server.cluster.tso().await?.into_inner();
        let mut proc = self.spec.spawn()?;
        let poller = Poller::start(
            self.spec.sink.clone(),
            &self.spec.id,
            POLL_EVERY,
            proc.pid(),
        )?;
        poller
            .wait_for(
                self.spec.start_ts + 1,
                &mut proc,
                self.timeout,
                "waiting for the changefeed to start",
            )
            .await?;
        Ok((proc, poller))
    }

    /// Removes the changefeed's PD service safe point (it would hold GC
    /// back for its TTL otherwise). Best effort.
    pub async fn release(&self) {
        let released = self
            .server
            .cluster
            .update_service_safe_point(&self.spec.id, 0, TimeStamp::new(0))
            .await;
        if let Err(e) = released {
            progress(
                NAME,
                &format!("could not remove the service safe point: {e}"),
            );
        }
    }
}

/// How often the checkpoint is polled.
pub const POLL_EVERY: Duration = Duration::from_millis(1);

/// Runs `kvfeed bench changefeed`.
pub async fn run(args: &ChangefeedArgs) -> Result<Report, BenchError> {
    let mut setup = Setup::new(args).await?;
    let mut report = Report::new(NAME);
    report.text("scenario", "scenario", args.scenario.name());
    report.text("sink", "sink", &setup.spec.sink_uri());
    let outcome = match args.scenario {
        Scenario::Initial => initial(args, &mut setup, &mut report).await,
        Scenario::Live => live::run(args, &mut setup, &mut report).await,
        Scenario::BigTxn => big_txn::run(args, &mut setup, &mut report).await,
        Scenario::Kill => kill::run(args, &mut setup, &mut report).await,
    };
    setup.release().await;
    outcome.map(|()| report)
}

/// The `initial` scenario; see the module comment.
async fn initial(
    args: &ChangefeedArgs,
    setup: &mut Setup,
    report: &mut Report,
) -> Result<(), BenchError> {
    super::check_range("--keys", args.keys, 1, 10_000_000)?;
    let value_size = args.value_size.unwrap_or(128);
    super::check_range("--value-size", value_size, 1, 1 << 20)?;
    let server = setup.server.clone();
    progress(
        NAME,
        &format!("preloading {} transactional keys", args.keys),
    );
    let (preload, last_commit) =
        txn_load::preload_txn_ts(&server, &setup.prefix, args.keys, value_size).await?;
    let target = server.cluster.tso().await?.into_inner();
    setup.spec.start_ts = 0;
    progress(NAME, "starting the changefeed from ts 0");
    let mut proc = setup.spec.spawn()?;
    let started = proc.started;
    let poller = Poller::start(
        setup.spec.sink.clone(),
        &setup.spec.id,
        POLL_EVERY,
        proc.pid(),
    )?;
    let limit = setup.timeout;
    let all_rows = poller
        .wait_for(last_commit, &mut proc, limit, "initial")
        .await?;
    let reached = poller.wait_for(target, &mut proc, limit, "initial").await?;
    let memory = proc.memory();
    proc.kill()?;
    let peak_sampled = poller.peak_rss();
    drop(poller.finish());

    progress(NAME, "counting the sink's rows");
    let counted = count_rows(&setup.spec.sink, |_| true).await?;
    let elapsed = reached.saturating_duration_since(started);
    let rate = per_second(args.keys as f64, secs(elapsed));
    report.json(
        "params",
        json!({"keys": args.keys, "value_size": value_size, "memory_mib": args.memory_mib}),
    );
    report.section("Preload");
    report.int("keys", "transactional keys", args.keys);
    report.float("preload_seconds", "preload time", secs(preload), 2, "s");
    report.section("Initial delivery (changefeed from ts 0)");
    report.float(
        "seconds",
        "process start → checkpoint ≥ ts after preload",
        secs(elapsed),
        3,
        "s",
    );
    report.float(
        "all_rows_seconds",
        "process start → checkpoint ≥ last commit ts",
        secs(all_rows.saturating_duration_since(started)),
        3,
        "s",
    );
    report.float("rows_per_sec", "rows/s", rate, 0, "");
    report.int("rows_in_sink", "rows in the sink", counted.rows);
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
    let (target, label) = match setup.spec.sink {
        SinkTarget::Nats(_) => (50_000.0, "≥ 50,000 rows/s acknowledged by JetStream"),
        SinkTarget::File(_) => (200_000.0, "≥ 200,000 rows/s"),
    };
    report.flag("target_met", label, rate >= target);
    if counted.rows != args.keys {
        report.fail(format!(
            "the sink holds {} rows, {} keys were preloaded",
            counted.rows, args.keys
        ));
    }
    counted.faults.into_iter().for_each(|f| report.fail(f));
    verify(setup, report).await
}

/// Rows of a file sink, and what was wrong with them.
pub struct Counted {
    /// Rows read.
    pub rows: u64,
    /// Rows `matches` accepted.
    pub matching: u64,
    /// Damage found (a few, then only counted in `rows`).
    pub faults: Vec<String>,
}

/// Reads every row the sink holds up to its checkpoint.
pub async fn count_rows(
    sink: &SinkTarget,
    matches: impl Fn(&kvfeed_client::feed::Row) -> bool,
) -> Result<Counted, BenchError> {
    let mut counted = Counted {
        rows: 0,
        matching: 0,
        faults: Vec::new(),
    };
    let unreadable = |e: SinkError| BenchError::Feed(format!("cannot read the sink: {e}"));
    let mut count = |item: Result<Row, String>| match item {
        Ok(row) => {
            counted.rows += 1;
            counted.matching += u64::from(matches(&row));
        }
        Err(e) if counted.faults.len() < 10 => counted.faults.push(format!("sink: {e}")),
        Err(_) => {}
    };
    match sink {
        SinkTarget::File(dir) => {
            let reader = FileSinkReader::open(dir).map_err(unreadable)?;
            for item in reader.rows() {
                count(item.map(|r| r.row).map_err(|e| e.to_string()));
            }
        }
        SinkTarget::Nats(uri) => {
            let mut reader = NatsReader::open(uri).await.map_err(unreadable)?;
            loop {
                match reader.next().await {
                    Ok(None) => break,
                    Ok(Some(SinkItem::Row { row, .. })) => count(Ok(row)),
                    Ok(Some(SinkItem::Watermark { .. })) => {}
                    Ok(Some(SinkItem::Problem(problem))) => count(Err(problem)),
                    Err(e) => {
                        count(Err(e.to_string()));
                        break;
                    }
                }
            }
        }
    }
    Ok(counted)
}

/// Runs `kvfeed verify` on the sink (the library call) and records it.
pub async fn verify(setup: &Setup, report: &mut Report) -> Result<(), BenchError> {
    progress(NAME, "verifying the sink against the store");
    let started = Instant::now();
    let found = kvfeed_changefeed::verify::verify(&setup.server.cluster, &setup.spec.sink_uri())
        .await
        .map_err(|e| BenchError::Feed(format!("verify could not check the sink: {e}")))?;
    report.section("kvfeed verify");
    report.int("verify_rows", "rows read", found.rows);
    report.int("verify_transactions", "transactions", found.transactions);
    report.int("verify_keys_compared", "keys compared", found.keys_compared);
    report.int("verify_problems", "problems", found.problem_count);
    report.float(
        "verify_seconds",
        "verify time",
        secs(started.elapsed()),
        2,
        "s",
    );
    report.flag("verify_clean", "clean", found.is_clean());
    if !found.is_clean() {
        report.fail(format!(
            "kvfeed verify found {} problems: {}",
            found.problem_count,
            found.problems.join("; ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_every_is_a_duration_or_a_range() {
        let fixed = parse_kill_every("1s").expect("one duration");
        assert_eq!(
            (fixed.min, fixed.max),
            (Duration::from_secs(1), Duration::from_secs(1))
        );
        let range = parse_kill_every("3s-5s").expect("a range");
        assert_eq!(
            (range.min, range.max),
            (Duration::from_secs(3), Duration::from_secs(5))
        );
        assert!(parse_kill_every("5s-3s").is_err());
        assert!(parse_kill_every("0s").is_err());
        assert!(parse_kill_every("x").is_err());
    }
}
