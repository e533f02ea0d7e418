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
use super::stats::{SplitMix64, per_second};
use super::subscribe::{FeedStream, Item, Plan, connect, describe, for_each_item};
use super::{
    BenchError, Server, TargetArgs, check_duration, check_range, progress, run_prefix, secs,
};
use crate::client::KeyMode;
use crate::units::ReadableDuration;

const NAME: &str = "churn";
/// Bound on one connection's life, whatever its stage.
const STAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leak check polls.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Gauges that must return to their value before the run, with their
/// report keys. The last two are checked when the server has them (a
/// labelled gauge appears only once used, so absent counts as 0).
const LEAK_GAUGES: [(&str, &str); 5] = [
    ("cdc_connections", CONNECTIONS),
    ("cdc_subscriptions", SUBSCRIPTIONS),
    ("cdc_pending_bytes", PENDING_BYTES),
    ("cdc_connection_tasks", "kvfeed_cdc_connection_tasks"),
    (
        "cdc_scans_ongoing",
        "kvfeed_cdc_scan_tasks{state=\"ongoing\"}",
    ),
];
/// How many of [`LEAK_GAUGES`] every server must have.
const REQUIRED_GAUGES: usize = 3;

fn gauge_or_zero(scrape: &Scrape, name: &str) -> f64 {
    scrape.get(name).unwrap_or(0.0)
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
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
}

/// Where a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    BeforeRequest,
    AfterRegister,
    MidStream,
    HalfClose,
    Drop,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::BeforeRequest,
        Stage::AfterRegister,
        Stage::MidStream,
        Stage::HalfClose,
        Stage::Drop,
    ];

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
    fn pick(rng: &mut SplitMix64, from: &[Stage]) -> Stage {
        from[rng.below(from.len() as u64) as usize]
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
}

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
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    if args.preload > 0 {
        load::preload(&server, &prefix, args.preload, 64).await?;
    }
    let plan = Arc::new(Plan::new(&server, KeyMode::Raw, &prefix, &prefix_end(&prefix)).await?);
    let mut channels = Vec::new();
    for _ in 0..args.clients {
        channels.push(connect(server.feed_addr()).await?);
    }
    let before = scrape(&server.status).await?;
    progress(
        NAME,
        &format!("{} clients churning for {}", args.clients, args.duration),
    );
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut clients = JoinSet::new();
    for (i, channel) in channels.into_iter().enumerate() {
        let (plan, stages) = (Arc::clone(&plan), Arc::clone(&stages));
        // Each client its own stream of choices, all fixed by --seed.
        let mut rng = SplitMix64::new(args.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        clients.spawn(async move { client(channel, &plan, &stages, deadline, &mut rng).await });
    }
    let mut tally = Tally::default();
    while let Some(done) = clients.join_next().await {
        let t = done.map_err(|e| BenchError::Feed(format!("a client task failed: {e}")))?;
        for i in 0..Stage::ALL.len() {
            tally.per_stage[i] += t.per_stage[i];
            tally.stage_time[i] += t.stage_time[i];
        }
        tally.errors += t.errors;
        if tally.first_error.is_none() {
            tally.first_error = t.first_error;
        }
    }
    let elapsed = started.elapsed();
    progress(NAME, "waiting for the feed's gauges to settle");
    let settled_from = Instant::now();
    let (after, settled) = poll_until(&server.status, settle, POLL_EVERY, |s| {
        LEAK_GAUGES
            .iter()
            .all(|(_, g)| gauge_or_zero(s, g) == gauge_or_zero(&before, g))
    })
    .await?;
    let settle_time = settled_from.elapsed();

    let total: u64 = tally.per_stage.iter().sum();
    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"clients": args.clients, "duration_s": secs(duration), "seed": args.seed,
               "stages": stages.iter().map(|s| s.name()).collect::<Vec<_>>(),
               "preload": args.preload, "regions": plan.subs.len()}),
    );
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
    report.int("errors", "errors", tally.errors);
    if let Some(error) = &tally.first_error {
        report.text("first_error", "first error", error);
        report.fail(format!(
            "{} connections failed, the first with: {error}",
            tally.errors
        ));
    }
    report.section("After the run");
    report_gauges(&mut report, &before, &after);
    report.float(
        "settle_seconds",
        "time to settle",
        secs(settle_time),
        2,
        "s",
    );
    if !settled {
        report.fail(format!(
            "the feed's gauges did not return to their values before the run within {}",
            args.settle_timeout
        ));
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

fn report_gauges(report: &mut Report, before: &Scrape, after: &Scrape) {
    for (i, (key, name)) in LEAK_GAUGES.iter().enumerate() {
        let required = i < REQUIRED_GAUGES;
        if required && after.get(name).is_none() {
            report.fail(format!("the server's /metrics has no {name}"));
        }
        let (was, is) = if required {
            (before.get(name), after.get(name))
        } else {
            (
                Some(gauge_or_zero(before, name)),
                Some(gauge_or_zero(after, name)),
            )
        };
        report.opt_float(key, name, is, 0, "");
        report.opt_float(&format!("{key}_before"), "  before the run", was, 0, "");
    }
}

async fn client(
    channel: Channel,
    plan: &Plan,
    stages: &[Stage],
    deadline: tokio::time::Instant,
    rng: &mut SplitMix64,
) -> Tally {
    let mut tally = Tally::default();
    while tokio::time::Instant::now() < deadline {
        let stage = Stage::pick(rng, stages);
        let began = Instant::now();
        let outcome = tokio::time::timeout(STAGE_TIMEOUT, one(&channel, plan, stage)).await;
        let error = match outcome {
            Ok(Ok(())) => None,
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
async fn one(channel: &Channel, plan: &Plan, stage: Stage) -> Result<(), BenchError> {
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
            let mut rng = SplitMix64::new(seed);
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
        let mut rng = SplitMix64::new(3);
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
