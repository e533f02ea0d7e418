//! `kvfeed bench`: measurements of a running server's change feed that
//! can be trusted.
//!
//! What makes a figure trustworthy here:
//! - correctness is measured with the speed: every put carries its send
//!   time and a (writer, seq) id, so each consumer checks exactly that
//!   every acknowledged put arrived once; a lost or duplicated event, or a
//!   feed gauge left above 0, fails the run (exit status 1) however good
//!   the numbers are;
//! - the server's memory and CPU come from the server itself (its
//!   `process_*` gauges, scraped from `--status`), never from the
//!   bench process, which usually runs on the same machine;
//! - latency is a full distribution (p50 to max) with bounded error, and an
//!   open-loop load (`--rate`) stamps puts with their scheduled time so a
//!   server that falls behind cannot hide it;
//! - everything is bounded: durations and counts are capped, every wait has
//!   a deadline, and traffic goes only to loopback addresses unless
//!   `--allow-remote` says otherwise.
//!
//! Output: a table on stdout, then one JSON object (`{"bench":"feed",...}`)
//! as the last line of stdout; progress goes to stderr.
//!
//! Subcommands, one module each: [`feed`], [`scan`], [`kv_scan`],
//! [`batch_put`], [`regions`], [`churn`], [`idle`], [`slow`], [`changefeed`],
//! [`engine`] (with
//! [`grpc`]). Shared pieces: [`load`] (writers
//! and preloading), [`subscribe`] and [`watcher`] (the consumer side),
//! [`scrape`] (`/metrics`), [`stats`] and [`report`]. `feed`, `churn` and
//! `idle` can drive etcd instead of kvfeed, for a comparison: [`target`]
//! chooses, and the `etcd` module (feature `etcd`) speaks etcd's API.

#![warn(missing_docs)]

pub mod batch_put;
pub mod changefeed;
pub mod churn;
pub mod engine;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod feed;
pub mod grpc;
pub mod idle;
pub mod kv_scan;
pub mod load;
pub mod regions;
pub mod report;
pub mod scan;
pub mod scrape;
pub mod slow;
pub mod stats;
pub mod subscribe;
pub mod target;
pub mod txn_load;
pub mod watcher;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use kvfeed_client::DEFAULT_PD;
use kvfeed_client::{ClientError, Cluster, StoreConn};
use kvfeed_types::units::ReadableDuration;
use report::Report;
use target::TargetKind;

/// Where `kvfeed serve` puts its status server by default.
pub const DEFAULT_STATUS: &str = "127.0.0.1:20180";
/// Longest run any benchmark accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(600);

/// The arguments of `kvfeed bench`: which benchmark, and its flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The benchmark to run.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// One `kvfeed bench` subcommand per benchmark; the variant's doc is its
/// `--help` text.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Write and watch at the same time: puts/s, events/s, put→event
    /// latency, lost and duplicated events, resolved-ts lag, server CPU and
    /// memory.
    Feed(feed::FeedArgs),
    /// Catch-up scan speed: preload keys, subscribe from checkpoint 0, time
    /// until every subscription is INITIALIZED; checks every row arrives once.
    Scan(scan::ScanArgs),
    /// Range reads through the KV API: preload raw and transactional keys,
    /// read each range start to end with the client's paged scan; compares
    /// the two rates.
    KvScan(kv_scan::KvScanArgs),
    /// Connection churn: clients open feed connections, subscribe and end
    /// them at random stages; afterwards the feed's gauges must return to 0.
    Churn(churn::ChurnArgs),
    /// Server memory per idle connection holding one subscription.
    Idle(idle::IdleArgs),
    /// A consumer that stops reading while others write: time until it is
    /// told `congested`, peak server memory, and that a fast consumer of the
    /// same range loses nothing.
    Slow(slow::SlowArgs),
    /// Small raw puts through BatchCommands (one stream, --in-flight puts
    /// at once) against unary RawPut calls with as many in flight, from
    /// one client: both rates and their ratio.
    BatchPut(batch_put::BatchPutArgs),
    /// Many regions, one consumer: time to register them all, server
    /// memory per subscribed region, resolved-ts lag under a light load;
    /// then a split of a subscribed region under load (exactly-once,
    /// time until resolved ts resumes, rows re-scanned).
    Regions(regions::RegionsArgs),
    /// A changefeed (`kvfeed changefeed run`, a child process with a file
    /// sink): initial delivery rows/s, commit → checkpoint latency, memory
    /// growth under one huge transaction, exactly-once across SIGKILLs.
    Changefeed(changefeed::ChangefeedArgs),
    /// The physical limits, in this process: fjall writes and scans on a
    /// temporary directory, and (--grpc) loopback gRPC streaming.
    Engine(engine::EngineArgs),
}

/// The server under test, for every benchmark that needs one.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The system to benchmark: `kvfeed` (the server at --pd and --status)
    /// or `etcd://HOST:PORT`, an etcd's client URL, whose /metrics gives
    /// its memory and CPU (--pd and --status are then not used). Only
    /// feed, churn and idle drive etcd, and only in a kvfeed built with
    /// the `etcd` feature.
    #[arg(
        long,
        value_name = "kvfeed|etcd://HOST:PORT",
        default_value = "kvfeed",
        value_parser = target::parse_target
    )]
    pub target: TargetKind,

    /// PD address of the server (kvfeed serves PD on its gRPC address);
    /// `http://` is optional.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_PD)]
    pub pd: String,

    /// The server's HTTP status address; its /metrics gives the server's
    /// own memory and CPU use and the feed's gauges.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_STATUS)]
    pub status: String,

    /// Allow a server that is not on a loopback address. A benchmark sends
    /// as much traffic as it can; aiming it at another machine should be a
    /// decision, not an accident.
    #[arg(long)]
    pub allow_remote: bool,
}

/// Why a benchmark could not run, or found a fault.
#[derive(Debug, thiserror::Error)]
///
/// Every variant but [`BenchError::Failed`] means the benchmark could not
/// run (or not to the end); `Failed` means it ran and found a fault, and
/// its figures were printed before it.
pub enum BenchError {
    /// A cluster call (PD, KV, the feed client) failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A flag is out of range or the arguments do not fit together; the
    /// text says which and what is allowed.
    #[error("{0}")]
    Usage(String),
    /// A benchmark's own connection (one HTTP/2 connection per feed stream)
    /// could not be opened in time.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The `host:port` dialled.
        addr: String,
        /// The transport's error chain, or the time limit that ran out.
        reason: String,
    },
    /// The status server's `/metrics` could not be fetched or parsed, or
    /// lacks a metric the benchmark needs.
    #[error("{reason}")]
    Metrics {
        /// What went wrong, naming the address or the metric.
        reason: String,
    },
    /// The change feed (or the load feeding it) misbehaved in a way that
    /// stops the run: a stream ended or failed, a subscription was refused,
    /// a deadline passed, a task panicked.
    #[error("change feed: {0}")]
    Feed(String),
    /// The storage engine failed in the engine benchmark.
    #[error("engine: {0}")]
    Engine(#[from] kvfeed_storage::Error),
    /// Opening connections hit the process's open-files limit, a setting
    /// of the machine rather than a fault of the server.
    #[error(
        "the open-files limit was reached after {opened} connections ({reason}); raise it \
         with `ulimit -n` in the shell that runs the bench and in the one that runs the server"
    )]
    OpenFiles {
        /// Connections opened before the limit was hit.
        opened: usize,
        /// The error that showed the limit.
        reason: String,
    },
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Stdout could not be written (e.g. the reader went away).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
    /// The run completed but found correctness faults (lost or duplicated
    /// events, gauges left above zero, ...): the process exits non-zero
    /// however good the figures are.
    #[error("bench {bench} failed: {reasons}")]
    Failed {
        /// The benchmark's name (`feed`, `churn`, ...).
        bench: &'static str,
        /// Every recorded failure, joined with `; `.
        reasons: String,
    },
}

/// A connection to the server under test.
#[derive(Clone)]
pub struct Server {
    /// PD, the oracle and the KV calls (writers, preloads, region lookups).
    pub cluster: Cluster,
    /// The store, where KV and the feed live.
    pub store: Arc<StoreConn>,
    /// The status address, for `/metrics`.
    pub status: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("pd", &self.cluster.pd_addr())
            .field("store", &self.store.address)
            .field("status", &self.status)
            .finish()
    }
}

impl Server {
    /// Connects to PD and the store, refusing non-loopback addresses
    /// (including the store address PD hands out) unless allowed.
    pub async fn connect(target: &TargetArgs) -> Result<Server, BenchError> {
        if target.target != TargetKind::Kvfeed {
            return Err(BenchError::Usage(
                "this benchmark drives kvfeed only; --target etcd://... works with \
                 feed, churn and idle"
                    .to_owned(),
            ));
        }
        check_loopback(&target.pd, target.allow_remote)?;
        check_loopback(&target.status, target.allow_remote)?;
        let cluster = Cluster::connect(&target.pd).await?;
        check_loopback(cluster.pd_addr(), target.allow_remote)?;
        // The store that leads the first region: where the feed streams go.
        let first = cluster.region_for_key(&[]).await?;
        let store = cluster.store(first.leader.store_id).await?;
        check_loopback(&store.address, target.allow_remote)?;
        // Fail now, with a clear message, rather than after the load.
        scrape::scrape(&target.status).await?;
        Ok(Server {
            cluster,
            store,
            status: target.status.clone(),
        })
    }

    /// The feed's address (the store's).
    pub fn feed_addr(&self) -> &str {
        &self.store.address
    }
}

/// Refuses `addr` unless its host is a loopback address (or `allow`).
pub fn check_loopback(addr: &str, allow: bool) -> Result<(), BenchError> {
    if allow {
        return Ok(());
    }
    let rest = addr.trim().trim_start_matches("http://");
    let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(BenchError::Usage(format!(
            "{addr} is not a loopback address; pass --allow-remote to benchmark another machine"
        )))
    }
}

/// Checks that `value` of flag `name` lies in `lo..=hi`.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    name: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<(), BenchError> {
    if value < lo || value > hi {
        return Err(BenchError::Usage(format!(
            "{name} must be between {lo} and {hi}, got {value}"
        )));
    }
    Ok(())
}

/// Checks a duration flag: above zero, at most [`MAX_DURATION`].
pub fn check_duration(name: &str, value: ReadableDuration) -> Result<Duration, BenchError> {
    let d = value.as_duration();
    if d.is_zero() || d > MAX_DURATION {
        return Err(BenchError::Usage(format!(
            "{name} must be above 0 and at most {}, got {value}",
            ReadableDuration(MAX_DURATION)
        )));
    }
    Ok(d)
}

/// A key prefix no earlier run used: `kvfeed-bench/<bench>/<unix nanos>/`.
pub fn run_prefix(bench: &str) -> Vec<u8> {
    format!("kvfeed-bench/{bench}/{:x}/", load::unix_nanos()).into_bytes()
}

/// Progress, on stderr.
pub fn progress(bench: &str, message: &str) {
    eprintln!("bench {bench}: {message}");
}

/// Seconds of `d`, for reports.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `kvfeed bench <subcommand>`.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    let report = match &args.command {
        BenchCommand::Feed(a) => block_on(feed::run(a))?,
        BenchCommand::Scan(a) => block_on(scan::run(a))?,
        BenchCommand::KvScan(a) => block_on(kv_scan::run(a))?,
        BenchCommand::BatchPut(a) => block_on(batch_put::run(a))?,
        BenchCommand::Regions(a) => block_on(regions::run(a))?,
        BenchCommand::Churn(a) => block_on(churn::run(a))?,
        BenchCommand::Idle(a) => block_on(idle::run(a))?,
        BenchCommand::Slow(a) => block_on(slow::run(a))?,
        BenchCommand::Changefeed(a) => block_on(changefeed::run(a))?,
        // The engine benchmark times blocking work; it builds its own
        // runtime for the gRPC part.
        BenchCommand::Engine(a) => engine::run(a)?,
    };
    report.finish()
}

/// Runs a benchmark on a multi-threaded runtime (consumers and writers
/// must not share one thread, or they would measure each other).
fn block_on(bench: impl Future<Output = Result<Report, BenchError>>) -> Result<Report, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?
        .block_on(bench)
}

/// Adds the server's CPU and memory use between two scrapes (and a peak)
/// to `report`.
pub fn report_server_use(
    report: &mut Report,
    before: &scrape::Scrape,
    after: &scrape::Scrape,
    peak_rss: Option<f64>,
    wall: Duration,
) {
    let cpu = match (before.cpu(), after.cpu()) {
        // Two decimals: the kernel counts in hundredths of a second.
        (Some(a), Some(b)) => Some(((b - a) * 100.0).round() / 100.0),
        _ => None,
    };
    report.opt_float("server_cpu_seconds", "server CPU used", cpu, 2, "s");
    report.opt_float(
        "server_cpu_cores",
        "server CPU (cores busy)",
        cpu.map(|c| stats::per_second(c, secs(wall))),
        2,
        "",
    );
    report.bytes("server_rss_before_bytes", "server RSS before", before.rss());
    report.bytes(
        "server_rss_peak_bytes",
        "server RSS peak (sampled every 250 ms)",
        peak_rss.or(after.rss()),
    );
    report.bytes("server_rss_after_bytes", "server RSS after", after.rss());
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The binary's command line, as far as `bench` is concerned.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Bench(BenchArgs),
    }

    #[test]
    fn only_loopback_is_accepted_by_default() {
        for ok in [
            "127.0.0.1:20160",
            "localhost:1",
            "[::1]:20160",
            "http://127.0.0.2:5",
        ] {
            assert!(check_loopback(ok, false).is_ok(), "{ok}");
        }
        for remote in ["10.0.0.1:20160", "example.com:20160", "[2001:db8::1]:1"] {
            assert!(check_loopback(remote, false).is_err(), "{remote}");
            assert!(check_loopback(remote, true).is_ok(), "{remote}");
        }
    }

    #[test]
    fn bench_subcommands_parse_with_their_defaults() {
        let cli = Cli::try_parse_from(["kvfeed", "bench", "feed", "--txn", "--rate", "500"])
            .expect("parse");
        let Command::Bench(BenchArgs {
            command: BenchCommand::Feed(args),
        }) = cli.command
        else {
            panic!("expected bench feed, got {:?}", cli.command);
        };
        assert_eq!(args.writers, 4);
        assert_eq!(args.watchers, 1);
        assert_eq!(args.value_size, 128);
        assert!(args.txn);
        assert_eq!(args.rate, Some(500.0));
        assert_eq!(args.target.pd, DEFAULT_PD);
        assert_eq!(args.target.status, DEFAULT_STATUS);
        assert_eq!(args.target.target, TargetKind::Kvfeed);
        assert!(
            Cli::try_parse_from(["kvfeed", "bench", "feed", "--raw", "--txn"]).is_err(),
            "--raw and --txn exclude each other"
        );
        assert!(Cli::try_parse_from(["kvfeed", "bench", "churn", "--seed", "x"]).is_err());
    }

    #[test]
    fn durations_and_ranges_are_bounded() {
        assert!(check_duration("--duration", ReadableDuration::secs(10)).is_ok());
        assert!(check_duration("--duration", ReadableDuration::secs(0)).is_err());
        assert!(check_duration("--duration", ReadableDuration::secs(601)).is_err());
        assert!(check_range("--writers", 0u32, 1, 1024).is_err());
        assert!(check_range("--writers", 4u32, 1, 1024).is_ok());
        let a = run_prefix("feed");
        assert!(a.starts_with(b"kvfeed-bench/feed/") && a.ends_with(b"/"));
    }
}
