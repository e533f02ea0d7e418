//! `kvfeed bench churn`: feed connections opened and ended as fast as
//! clients can, each at a random stage, then a leak check.
//!
//! A "connection" is one `EventFeed` call, which is what the server
//! registers, owns and must release. Each client loop keeps one HTTP/2
//! connection and opens its calls on it, as TiCDC does; opening a TCP
//! connection per call would exhaust the ephemeral ports (TIME_WAIT) long
//! before the server's limit. Every call subscribes from checkpoint 0 to a
//! range holding `--preload` keys, so each one starts a catch-up scan that
//! most stages then abandon. The stages:
//! - `before_request`: the call is opened and dropped with no request;
//! - `after_register`: Registers are sent and the call dropped at once;
//! - `mid_stream`: dropped after the first message (usually mid-scan);
//! - `half_close`: after INITIALIZED the request side is closed and the
//!   call read to its end (the server must end it cleanly);
//! - `drop`: after INITIALIZED the call is dropped.
//!
//! Afterwards `/metrics` is polled (with a deadline) until the feed's
//! connection, subscription and pending-bytes gauges (and, when the server
//! has them, connection tasks and ongoing scans) are back to their values
//! before the run — 0 on a server without other feed clients. Anything
//! else is a leak and fails the run.
//!
//! The same churn runs for `--warmup` first, unmeasured, and the gauges
//! must settle after it too; the "before" figures are taken then. A fresh
//! server's first connections grow its allocator's arenas and its tasks'
//! pools once, so RSS growth measured from a cold start would mostly be
//! that, not what churn leaves behind; after a warm-up, growth over the run
//! is what a leak would show as. The cold figure is reported as well.
//!
//! On etcd (`--target etcd://...`) a connection is one `Watch` call with
//! one watch of the preloaded range from the revision of its first key, so
//! etcd replays them as kvfeed's catch-up scan does; the stages map onto
//! it as `etcd::churn_one` says, and the leak check reads etcd's watch
//! stream and watcher gauges and its open `Watch` calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_proto::cdcpb::event::LogType;
use serde_json::json;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::load::{self, prefix_end};
use super::report::Report;
use super::scrape::{CONNECTIONS, PENDING_BYTES, SUBSCRIPTIONS, Scrape, poll_until, scrape};
use rand::RngExt;

use super::stats::{self, Rng, per_second};
use super::subscribe::{FeedStream, Item, Plan, connect, describe, for_each_item};
use super::target::System;
use super::{BenchError, TargetArgs, check_duration, check_range, progress, run_prefix, secs};
use kvfeed_client::KeyMode;
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "churn";
/// Bound on one connection's life, whatever its stage.
const STAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of each preloaded value.
const PRELOAD_VALUE_SIZE: usize = 64;
/// How often the leak check polls.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A figure that must return to its value before the run.
struct Leak {
    /// Report key.
    key: &'static str,
    /// What the table shows (the metric's name).
    label: &'static str,
    /// Every server must have it; otherwise it is checked when present (a
    /// labelled gauge appears only once used, so absent counts as 0).
    required: bool,
    read: fn(&Scrape) -> Option<f64>,
}

impl Leak {
    fn value_or_zero(&self, scrape: &Scrape) -> f64 {
        (self.read)(scrape).unwrap_or(0.0)
    }
}

/// What the leak check reads on `system`.
fn leaks(system: &System) -> Vec<Leak> {
    match system {
        System::Kvfeed(_) => vec![
            Leak {
                key: "cdc_connections",
                label: CONNECTIONS,
                required: true,
                read: |s| s.get(CONNECTIONS),
            },
            Leak {
                key: "cdc_subscriptions",
                label: SUBSCRIPTIONS,
                required: true,
                read: |s| s.get(SUBSCRIPTIONS),
            },
            Leak {
                key: "cdc_pending_bytes",
                label: PENDING_BYTES,
                required: true,
                read: |s| s.get(PENDING_BYTES),
            },
            Leak {
                key: "cdc_connection_tasks",
                label: "kvfeed_cdc_connection_tasks",
                required: false,
                read: |s| s.get("kvfeed_cdc_connection_tasks"),
            },
            Leak {
                key: "cdc_scans_ongoing",
                label: "kvfeed_cdc_scan_tasks{state=\"ongoing\"}",
                required: false,
                read: |s| s.get("kvfeed_cdc_scan_tasks{state=\"ongoing\"}"),
            },
        ],
        #[cfg(feature = "etcd")]
        System::Etcd(_) => {
            use super::etcd::{WATCH_STREAMS, WATCHERS, open_watch_calls};
            vec![
                Leak {
                    key: "etcd_watch_streams",
                    label: WATCH_STREAMS,
                    required: true,
                    read: |s| s.get(WATCH_STREAMS),
                },
                Leak {
                    key: "etcd_watchers",
                    label: WATCHERS,
                    required: true,
                    read: |s| s.get(WATCHERS),
                },
                Leak {
                    key: "etcd_watch_calls_open",
                    label: "Watch calls open (gRPC started - handled)",
                    required: true,
                    read: open_watch_calls,
                },
            ]
        }
    }
}

/// What each churned call subscribes to.
#[derive(Clone)]
enum Calls {
    /// EventFeed calls registering every subscription of the plan.
    Kvfeed(Arc<Plan>),
    /// Watch calls replaying the `preloaded` keys under `prefix`, from
    /// the revision of the first.
    #[cfg(feature = "etcd")]
    Etcd {
        prefix: Arc<[u8]>,
        preloaded: u64,
        first_revision: i64,
    },
}

impl Calls {
    fn regions(&self) -> Option<usize> {
        match self {
            Calls::Kvfeed(plan) => Some(plan.subs.len()),
            #[cfg(feature = "etcd")]
            Calls::Etcd { .. } => None,
        }
    }
}

/// The flags of `kvfeed bench churn`.
#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// Concurrent client loops, each on its own HTTP/2 connection.
    #[arg(long, value_name = "C", default_value_t = 64)]
    pub clients: u32,

    /// How long the clients churn.
    #[arg(long, value_name = "D", default_value = "10s")]
    pub duration: ReadableDuration,

    /// Seed for the choice of each connection's last stage.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// Keys preloaded into the subscribed range, so each subscription has
    /// a catch-up scan to run (and to abandon).
    #[arg(long, value_name = "K", default_value_t = 256)]
    pub preload: u64,

    /// Only end connections at these stages (comma list of
    /// before_request, after_register, mid_stream, half_close, drop), to
    /// narrow down a leak [default: all]
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_stage)]
    pub stages: Vec<Stage>,

    /// How long the feed's gauges may take, after the run, to return to
    /// their values before it.
    #[arg(long, value_name = "D", default_value = "20s")]
    pub settle_timeout: ReadableDuration,

    /// Unmeasured churn before the run, after which the "before" figures
    /// (gauges, RSS) are taken; 0s to measure from a cold start.
    #[arg(long, value_name = "D", default_value = "2s")]
    pub warmup: ReadableDuration,
}

/// Where a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
///
/// Each stage leaves the server a different cleanup path to get right,
/// which is why the benchmark spreads connections over all of them.
pub enum Stage {
    /// The call is opened and dropped before any request is sent.
    BeforeRequest,
    /// The Registers are sent and the call dropped at once, without
    /// reading anything: the server is left with scans it must abandon.
    AfterRegister,
    /// The call is dropped after its first message, usually mid-scan.
    MidStream,
    /// After INITIALIZED the request side is closed and the call read to
    /// its end: the server must end it cleanly.
    HalfClose,
    /// After INITIALIZED the call is dropped without closing.
    Drop,
}

impl Stage {
    /// Every stage, in the order they happen in a call's life (and in which
    /// per-stage figures are reported).
    pub const ALL: [Stage; 5] = [
        Stage::BeforeRequest,
        Stage::AfterRegister,
        Stage::MidStream,
        Stage::HalfClose,
        Stage::Drop,
    ];

    /// The stage's name in `--stages` and in the report
    /// (`before_request`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Stage::BeforeRequest => "before_request",
            Stage::AfterRegister => "after_register",
            Stage::MidStream => "mid_stream",
            Stage::HalfClose => "half_close",
            Stage::Drop => "drop",
        }
    }

    /// One of `from` (not empty), chosen by `rng`.
    fn pick(rng: &mut Rng, from: &[Stage]) -> Stage {
        from[rng.random_range(0..from.len())]
    }
}

fn parse_stage(name: &str) -> Result<Stage, String> {
    Stage::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| {
            let names: Vec<_> = Stage::ALL.iter().map(|s| s.name()).collect();
            format!(
                "unknown stage {name:?} (expected one of {})",
                names.join(", ")
            )
        })
}

/// One client loop's totals.
#[derive(Debug, Default)]
struct Tally {
    per_stage: [u64; 5],
    /// Time spent in connections of each stage.
    stage_time: [Duration; 5],
    errors: u64,
    first_error: Option<String>,
    /// Half-closed calls the server did not end (see [`Ended`]).
    half_close_left_open: u64,
}

/// How a connection that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// As its stage says.
    AsPlanned,
    /// Half-closed, but the server kept the call open; the client dropped
    /// it after a grace period. kvfeed ends such a call (waiting for it is
    /// bounded by the stage timeout, and an overrun is an error); etcd
    /// keeps it open until the client cancels it, which is what its
    /// clients do instead, so on etcd this is counted, not failed.
    HalfCloseLeftOpen,
}

/// Runs `kvfeed bench churn`: warm-up, measured churn, then the leak check.
/// A gauge that does not return to its value before the run is recorded
/// in the report as a failure; an `Err` means the run could not be made.
pub async fn run(args: &ChurnArgs) -> Result<Report, BenchError> {
    check_range("--clients", args.clients, 1, 4096)?;
    check_range("--preload", args.preload, 0, 1_000_000)?;
    let duration = check_duration("--duration", args.duration)?;
    let settle = check_duration("--settle-timeout", args.settle_timeout)?;
    let stages: Arc<[Stage]> = if args.stages.is_empty() {
        Arc::new(Stage::ALL)
    } else {
        args.stages.clone().into()
    };
    let system = System::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    let calls = match &system {
        System::Kvfeed(server) => {
            if args.preload > 0 {
                load::preload(server, &prefix, args.preload, PRELOAD_VALUE_SIZE).await?;
            }
            let plan = Plan::new(server, KeyMode::Raw, &prefix, &prefix_end(&prefix)).await?;
            Calls::Kvfeed(Arc::new(plan))
        }
        #[cfg(feature = "etcd")]
        System::Etcd(etcd) => {
            let first_revision = etcd
                .preload(&prefix, args.preload, PRELOAD_VALUE_SIZE)
                .await?;
            Calls::Etcd {
                prefix: prefix.clone().into(),
                preloaded: args.preload,
                first_revision,
            }
        }
    };
    let mut channels = Vec::new();
    for _ in 0..args.clients {
        channels.push(connect(system.stream_addr()).await?);
    }
    let metrics = system.metrics_addr();
    let leaks = leaks(&system);
    let cold = scrape(metrics).await?;
    let warmup = args.warmup.as_duration();
    let before = if warmup.is_zero() {
        cold.clone()
    } else {
        check_duration("--warmup", args.warmup)?;
        progress(NAME, &format!("warming up for {}", args.warmup));
        // Its own stream of stage choices, so the run's is the same with
        // or without a warm-up.
        let warm = churn_for(&channels, &calls, &stages, args.seed ^ WARMUP_SEED, warmup).await?;
        if let Some(error) = warm.first_error {
            return Err(BenchError::Feed(format!(
                "{} connections failed during the warm-up, the first with: {error}",
                warm.errors
            )));
        }
        let (settled_scrape, settled) = poll_until(metrics, settle, POLL_EVERY, |s| {
            leaks
                .iter()
                .all(|leak| leak.value_or_zero(s) == leak.value_or_zero(&cold))
        })
        .await?;
        if !settled {
            return Err(BenchError::Feed(format!(
                "the server's gauges did not return to their values within {} of the warm-up",
                args.settle_timeout
            )));
        }
        settled_scrape
    };
    progress(
        NAME,
        &format!("{} clients churning for {}", args.clients, args.duration),
    );
    let started = Instant::now();
    let tally = churn_for(&channels, &calls, &stages, args.seed, duration).await?;
    let elapsed = started.elapsed();
    progress(NAME, "waiting for the server's gauges to settle");
    let settled_from = Instant::now();
    let (after, settled) = poll_until(metrics, settle, POLL_EVERY, |s| {
        leaks
            .iter()
            .all(|leak| leak.value_or_zero(s) == leak.value_or_zero(&before))
    })
    .await?;
    let settle_time = settled_from.elapsed();

    let total: u64 = tally.per_stage.iter().sum();
    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"target": system.name(), "clients": args.clients,
               "duration_s": secs(duration), "seed": args.seed,
               "stages": stages.iter().map(|s| s.name()).collect::<Vec<_>>(),
               "preload": args.preload, "regions": calls.regions(),
               "warmup_s": secs(warmup)}),
    );
    report.text("target", "target", system.name());
    report.section("Connections");
    report.int("connections", "connections", total);
    report.float(
        "connections_per_sec",
        "connections/s",
        per_second(total as f64, secs(elapsed)),
        0,
        "",
    );
    let mut stages = serde_json::Map::new();
    for (i, stage) in Stage::ALL.iter().enumerate() {
        let n = tally.per_stage[i];
        let mean_ms = (n > 0).then(|| secs(tally.stage_time[i]) * 1000.0 / n as f64);
        report.int(
            &format!("stage_{}", stage.name()),
            &format!("  ended {}", stage.name()),
            n,
        );
        report.opt_float(
            &format!("stage_{}_mean_ms", stage.name()),
            "    mean life",
            mean_ms,
            1,
            "ms",
        );
        stages.insert(
            stage.name().to_owned(),
            json!({"count": n, "mean_ms": mean_ms}),
        );
    }
    report.json("stages", serde_json::Value::Object(stages));
    report.int(
        "half_close_left_open",
        "  half-closed calls the server kept open",
        tally.half_close_left_open,
    );
    report.int("errors", "errors", tally.errors);
    if let Some(error) = &tally.first_error {
        report.text("first_error", "first error", error);
        report.fail(format!(
            "{} connections failed, the first with: {error}",
            tally.errors
        ));
    }
    report.section("After the run");
    report_gauges(&mut report, &leaks, &before, &after);
    report.float(
        "settle_seconds",
        "time to settle",
        secs(settle_time),
        2,
        "s",
    );
    if !settled {
        report.fail(format!(
            "the server's gauges did not return to their values before the run within {}",
            args.settle_timeout
        ));
    }
    if !warmup.is_zero() {
        report.bytes(
            "server_rss_cold_bytes",
            "server RSS before the warm-up",
            cold.rss(),
        );
    }
    report.bytes("server_rss_before_bytes", "server RSS before", before.rss());
    report.bytes("server_rss_after_bytes", "server RSS after", after.rss());
    let growth = match (before.rss(), after.rss()) {
        (Some(b), Some(a)) if b > 0.0 => Some((a - b) / b * 100.0),
        _ => None,
    };
    report.opt_float("server_rss_growth_pct", "server RSS growth", growth, 1, "%");
    Ok(report)
}

/// Salt for the warm-up's stage choices.
const WARMUP_SEED: u64 = 0x5741_524D_5550;

/// Runs one client loop per channel, each opening and ending calls until
/// `duration` has passed, and adds up their tallies.
async fn churn_for(
    channels: &[Channel],
    calls: &Calls,
    stages: &Arc<[Stage]>,
    seed: u64,
    duration: Duration,
) -> Result<Tally, BenchError> {
    let deadline = tokio::time::Instant::now() + duration;
    let mut clients = JoinSet::new();
    for (i, channel) in channels.iter().enumerate() {
        let (channel, calls, stages) = (channel.clone(), calls.clone(), Arc::clone(stages));
        // Each client its own stream of choices, all fixed by the seed.
        let mut rng = stats::rng(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        clients.spawn(async move { client(channel, &calls, &stages, deadline, &mut rng).await });
    }
    let mut tally = Tally::default();
    while let Some(done) = clients.join_next().await {
        let t = done.map_err(|e| BenchError::Feed(format!("a client task failed: {e}")))?;
        for i in 0..Stage::ALL.len() {
            tally.per_stage[i] += t.per_stage[i];
            tally.stage_time[i] += t.stage_time[i];
        }
        tally.errors += t.errors;
        tally.half_close_left_open += t.half_close_left_open;
        if tally.first_error.is_none() {
            tally.first_error = t.first_error;
        }
    }
    Ok(tally)
}

fn report_gauges(report: &mut Report, leaks: &[Leak], before: &Scrape, after: &Scrape) {
    for leak in leaks {
        let (was, is) = if leak.required {
            ((leak.read)(before), (leak.read)(after))
        } else {
            (
                Some(leak.value_or_zero(before)),
                Some(leak.value_or_zero(after)),
            )
        };
        if is.is_none() {
            report.fail(format!("the server's /metrics has no {}", leak.label));
        }
        report.opt_float(leak.key, leak.label, is, 0, "");
        report.opt_float(
            &format!("{}_before", leak.key),
            "  before the run",
            was,
            0,
            "",
        );
    }
}

async fn client(
    channel: Channel,
    calls: &Calls,
    stages: &[Stage],
    deadline: tokio::time::Instant,
    rng: &mut Rng,
) -> Tally {
    let mut tally = Tally::default();
    while tokio::time::Instant::now() < deadline {
        let stage = Stage::pick(rng, stages);
        let began = Instant::now();
        let outcome = tokio::time::timeout(STAGE_TIMEOUT, one(&channel, calls, stage)).await;
        let error = match outcome {
            Ok(Ok(Ended::AsPlanned)) => None,
            Ok(Ok(Ended::HalfCloseLeftOpen)) => {
                tally.half_close_left_open += 1;
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "stage {} took longer than {STAGE_TIMEOUT:?}",
                stage.name()
            )),
        };
        match error {
            None => {
                if let Some(i) = Stage::ALL.iter().position(|s| *s == stage) {
                    tally.per_stage[i] += 1;
                    tally.stage_time[i] += began.elapsed();
                }
            }
            Some(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

/// One connection, ended at `stage`.
async fn one(channel: &Channel, calls: &Calls, stage: Stage) -> Result<Ended, BenchError> {
    match calls {
        Calls::Kvfeed(plan) => one_feed(channel, plan, stage)
            .await
            .map(|()| Ended::AsPlanned),
        #[cfg(feature = "etcd")]
        Calls::Etcd {
            prefix,
            preloaded,
            first_revision,
        } => super::etcd::churn_one(channel, prefix, (*preloaded, *first_revision), stage).await,
    }
}

/// One EventFeed call, ended at `stage`.
async fn one_feed(channel: &Channel, plan: &Plan, stage: Stage) -> Result<(), BenchError> {
    let mut stream = FeedStream::open(channel.clone()).await?;
    if stage == Stage::BeforeRequest {
        return Ok(());
    }
    stream.send_all(plan.registers(0)).await?;
    match stage {
        Stage::BeforeRequest | Stage::AfterRegister => Ok(()),
        Stage::MidStream => {
            stream.next().await?;
            Ok(())
        }
        Stage::Drop => until_initialized(&mut stream, plan.subs.len()).await,
        Stage::HalfClose => {
            until_initialized(&mut stream, plan.subs.len()).await?;
            let FeedStream {
                requests,
                mut events,
            } = stream;
            drop(requests);
            // The server must end the call cleanly once the client is done.
            while events
                .message()
                .await
                .map_err(|s| BenchError::Feed(format!("half-close ended with {s}")))?
                .is_some()
            {}
            Ok(())
        }
    }
}

async fn until_initialized(stream: &mut FeedStream, subs: usize) -> Result<(), BenchError> {
    let mut initialized = 0;
    let mut error = None;
    while initialized < subs {
        let Some(event) = stream.next().await? else {
            return Err(BenchError::Feed(
                "the server ended the stream before INITIALIZED".to_owned(),
            ));
        };
        for_each_item(event, |item| match item {
            Item::Row { row, .. } if row.r#type == LogType::Initialized as i32 => {
                initialized += 1;
            }
            Item::Error { error: e, .. } => error = Some(describe(&e)),
            _ => {}
        });
        if let Some(e) = error.take() {
            return Err(BenchError::Feed(format!("a subscription failed: {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_is_chosen_and_the_choice_is_seeded() {
        let picks = |seed| {
            let mut rng = stats::rng(seed);
            (0..200)
                .map(|_| Stage::pick(&mut rng, &Stage::ALL))
                .collect::<Vec<_>>()
        };
        let a = picks(1);
        assert_eq!(a, picks(1));
        assert_ne!(a, picks(2));
        for stage in Stage::ALL {
            assert!(a.contains(&stage), "{stage:?} never chosen");
        }
        let mut rng = stats::rng(3);
        let only = [Stage::HalfClose, Stage::Drop];
        assert!((0..100).all(|_| only.contains(&Stage::pick(&mut rng, &only))));
    }

    #[test]
    fn stages_are_named_on_the_command_line() {
        for stage in Stage::ALL {
            assert_eq!(parse_stage(stage.name()), Ok(stage));
        }
        let err = parse_stage("later").expect_err("unknown");
        assert!(err.contains("half_close"), "{err}");
    }
}
