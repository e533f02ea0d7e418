//! `kvfeed bench regions`: one consumer of many regions, and a split under
//! load.
//!
//! Order of a run, and why:
//! 1. the run's key range is cut into `--regions` regions through the
//!    status server's `POST /admin/split` (at most 1024 keys a call), and
//!    one region of it is preloaded, so that a catch-up which re-read that
//!    region would show in the scan counter;
//! 2. the server's RSS is read, then one [`Feed`] (the consumer library,
//!    one stream) subscribes to the whole range from a fresh timestamp; the
//!    time until every region is INITIALIZED is the registration time, and
//!    RSS read right then, minus the first reading, over the regions, is
//!    the memory per subscribed region;
//! 3. a light open-loop write load runs for `--lag-duration`; at each
//!    resolved ts the feed hands out, now − the ts's physical time is
//!    recorded (the span's resolved ts is the minimum over all regions, so
//!    this is the lag of the slowest one);
//! 4. the preloaded region is written at `--split-rate` and split a third
//!    of the way in; a timestamp taken from the oracle once the split has
//!    been answered marks it, and the time until the span's resolved ts
//!    passes it is the resume time. The rows catch-up scans found in the
//!    meantime (`kvfeed_cdc_scanned_rows_total`) are the re-scan cost.
//!
//! Every acknowledged put of both loads must arrive exactly once, and no
//! preloaded row (older than the feed's start) may arrive at all; anything
//! else, or a feed error, fails the run. The targets are printed with the
//! figures but do not decide the exit status.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::load::{self, Backend, LoadResult, LoadSpec, RawWriter, STAMP_LEN, Stamp};
use super::report::Report;
use super::scrape::{self, Scrape, scrape};
use super::stats::{Histogram, Insert, SeqSet};
use super::{
    BenchError, Server, TargetArgs, check_duration, check_range, progress, run_prefix, secs,
};
use kvfeed_client::feed::{Feed, FeedEvent, FeedSpec};
use kvfeed_client::{KeyMode, region::prefix_successor};
use kvfeed_types::units::ReadableDuration;

const NAME: &str = "regions";
/// Split keys per `POST /admin/split` (the endpoint's limit).
const SPLIT_KEYS_PER_CALL: usize = 1024;
/// Longest request path sent: the status server reads at most 16 KiB of
/// request head, and the keys travel in the query string.
const MAX_PATH: usize = 12 * 1024;
/// Bound on one admin call (each is an fsynced write of the region map).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Writer tasks of each load; the split puts the first half of them left
/// of the split key and the rest right of it.
const WRITERS: u32 = 4;
/// How often the run looks at what the consumer has seen.
const POLL: Duration = Duration::from_millis(2);
/// The scanned-rows counter the re-scan figure comes from.
pub const SCANNED_ROWS: &str = "kvfeed_cdc_scanned_rows_total";
/// The server's `min-ts-interval`, if it exports it.
pub const MIN_TS_INTERVAL: &str = "kvfeed_cdc_min_ts_interval_seconds";

/// The flags of `kvfeed bench regions`.
#[derive(Debug, Clone, Args)]
pub struct RegionsArgs {
    /// The server under test.
    #[command(flatten)]
    pub target: TargetArgs,

    /// Regions to create in the run's key range; the consumer subscribes
    /// to all of them.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub regions: u32,

    /// Puts/s of the light load while resolved-ts lag is measured (raw
    /// puts into one region of the range, open loop).
    #[arg(long, value_name = "R", default_value_t = 100.0)]
    pub lag_rate: f64,

    /// How long resolved-ts lag is measured under that load.
    #[arg(long, value_name = "D", default_value = "10s")]
    pub lag_duration: ReadableDuration,

    /// The server's min-ts-interval, used only when its /metrics does not
    /// export kvfeed_cdc_min_ts_interval_seconds; the targets need it.
    #[arg(long, value_name = "D")]
    pub min_ts_interval: Option<ReadableDuration>,

    /// Puts/s into the region that is split (open loop).
    #[arg(long, value_name = "R", default_value_t = 1000.0)]
    pub split_rate: f64,

    /// How long the split region is written; the split comes a third of
    /// the way in.
    #[arg(long, value_name = "D", default_value = "6s")]
    pub split_duration: ReadableDuration,

    /// Keys written to the split region before the feed starts: what a
    /// catch-up that re-read the whole region would find.
    #[arg(long, value_name = "K", default_value_t = 10_000)]
    pub split_preload: u64,

    /// Bytes per value (at least 20: each carries its send time and id).
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// Longest wait for every region to be INITIALIZED.
    #[arg(long, value_name = "D", default_value = "60s")]
    pub register_timeout: ReadableDuration,

    /// After each load, how long to wait for every acknowledged put (and,
    /// after the split, for the resolved ts to pass it).
    #[arg(long, value_name = "D", default_value = "30s")]
    pub drain_timeout: ReadableDuration,
}

impl RegionsArgs {
    fn check(&self) -> Result<[Duration; 4], BenchError> {
        check_range("--regions", self.regions, 1, 100_000)?;
        check_range("--lag-rate", self.lag_rate, 1.0, 1e5)?;
        check_range("--split-rate", self.split_rate, 1.0, 1e5)?;
        check_range("--split-preload", self.split_preload, 0, 1_000_000)?;
        check_range("--value-size", self.value_size, STAMP_LEN, 1 << 20)?;
        if let Some(d) = self.min_ts_interval {
            check_duration("--min-ts-interval", d)?;
        }
        Ok([
            check_duration("--lag-duration", self.lag_duration)?,
            check_duration("--split-duration", self.split_duration)?,
            check_duration("--register-timeout", self.register_timeout)?,
            check_duration("--drain-timeout", self.drain_timeout)?,
        ])
    }
}

/// Which part of the run a resolved ts arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Other = 0,
    Lag = 1,
    Split = 2,
}

/// What the consumer task has seen; shared with the run under a mutex
/// held only to record or read.
struct Seen {
    phase: Phase,
    regions_done: usize,
    regions_total: usize,
    /// When every region was first INITIALIZED.
    all_initialized: Option<Instant>,
    /// Resolved-ts lag by phase, microseconds.
    lag: [Histogram; 3],
    /// A resolved ts to wait for, and when the feed passed it.
    goal: Option<(u64, Option<Instant>)>,
    lag_rows: SeqSet,
    split_rows: SeqSet,
    duplicates: u64,
    /// Rows of neither load, or without a readable stamp.
    foreign: u64,
    /// Preloaded rows delivered (older than the feed's start: never due).
    preloaded: u64,
    region_retries: u64,
    streams_lost: u64,
    error: Option<String>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            phase: Phase::Other,
            regions_done: 0,
            regions_total: 0,
            all_initialized: None,
            lag: Default::default(),
            goal: None,
            lag_rows: SeqSet::new(WRITERS as usize),
            split_rows: SeqSet::new(WRITERS as usize),
            duplicates: 0,
            foreign: 0,
            preloaded: 0,
            region_retries: 0,
            streams_lost: 0,
            error: None,
        }
    }
}

fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key prefixes the consumer sorts rows by.
#[derive(Clone)]
struct Prefixes {
    /// The light load's keys.
    lag: Vec<u8>,
    /// The split region's keys: the split load's, and the preload's.
    split: Vec<u8>,
    /// The preload's keys, inside `split`.
    preload: Vec<u8>,
}

/// Reads the feed until it fails (or the task is aborted), recording into
/// `seen`.
async fn consume(mut feed: Feed, seen: Arc<Mutex<Seen>>, prefixes: Prefixes, expected: usize) {
    loop {
        let event = feed.next().await;
        let (now, now_ns) = (Instant::now(), load::unix_nanos());
        let mut s = lock(&seen);
        match event {
            Err(e) => {
                s.error = Some(e.to_string());
                return;
            }
            Ok(FeedEvent::Row(row)) => {
                let stamp = Stamp::parse(&row.value);
                // The preload's prefix lies inside the split load's.
                let set = if row.key.starts_with(&prefixes.preload) {
                    s.preloaded += 1;
                    continue;
                } else if row.key.starts_with(&prefixes.lag) {
                    &mut s.lag_rows
                } else if row.key.starts_with(&prefixes.split) {
                    &mut s.split_rows
                } else {
                    s.foreign += 1;
                    continue;
                };
                match stamp.map(|st| set.insert(st.writer, st.seq)) {
                    Some(Insert::New) => {}
                    Some(Insert::Duplicate) => s.duplicates += 1,
                    Some(Insert::Foreign) | None => s.foreign += 1,
                }
            }
            Ok(FeedEvent::ResolvedTs(ts)) => {
                let physical_ns = ts.physical().saturating_mul(1_000_000);
                let lag_us = now_ns.saturating_sub(physical_ns) / 1000;
                let phase = s.phase as usize;
                s.lag[phase].record(lag_us);
                if let Some((goal, reached @ None)) = &mut s.goal
                    && ts.into_inner() >= *goal
                {
                    *reached = Some(now);
                }
            }
            Ok(FeedEvent::Initialized {
                regions_done,
                regions_total,
            }) => {
                s.regions_done = regions_done;
                s.regions_total = regions_total;
                if regions_done == regions_total
                    && regions_total >= expected
                    && s.all_initialized.is_none()
                {
                    s.all_initialized = Some(now);
                }
            }
            Ok(FeedEvent::RegionRetry { .. }) => s.region_retries += 1,
            Ok(FeedEvent::StreamLost { .. }) => s.streams_lost += 1,
            Ok(FeedEvent::CatchUp { .. }) => {}
        }
    }
}

/// Polls `seen` until `done` holds, the consumer failed, or `timeout`.
async fn wait_for(
    seen: &Mutex<Seen>,
    timeout: Duration,
    done: impl Fn(&Seen) -> bool,
) -> Result<bool, BenchError> {
    let give_up = Instant::now() + timeout;
    loop {
        {
            let s = lock(seen);
            if let Some(e) = &s.error {
                return Err(BenchError::Feed(e.clone()));
            }
            if done(&s) {
                return Ok(true);
            }
        }
        if Instant::now() >= give_up {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits at `keys` (raw user keys, ascending) through the admin endpoint,
/// as few calls as the endpoint's key limit and the status server's
/// request-head limit allow.
async fn split(status: &str, keys: &[Vec<u8>]) -> Result<(), BenchError> {
    let mut rest = keys;
    while !rest.is_empty() {
        let mut path = "/admin/split?raw=true".to_owned();
        let mut taken = 0;
        for key in rest.iter().take(SPLIT_KEYS_PER_CALL) {
            if taken > 0 && path.len() + 5 + 2 * key.len() > MAX_PATH {
                break;
            }
            path.push_str("&key=");
            path.push_str(&hex(key));
            taken += 1;
        }
        rest = &rest[taken..];
        let addr = status.to_owned();
        let answer =
            tokio::task::spawn_blocking(move || scrape::http_post(&addr, &path, ADMIN_TIMEOUT))
                .await
                .map_err(|e| BenchError::Feed(format!("the split request task failed: {e}")))?;
        match answer {
            Ok((200, _)) => {}
            Ok((code, body)) => {
                return Err(BenchError::Feed(format!(
                    "POST /admin/split: HTTP {code}: {}",
                    body.trim()
                )));
            }
            Err(e) => return Err(BenchError::Feed(format!("POST /admin/split: {e}"))),
        }
    }
    Ok(())
}

/// Region `i`'s first key: the run's regions are `[prefix, key(1))`,
/// `[key(1), key(2))`, ... `[key(N-1), end of prefix)`.
fn region_key(prefix: &[u8], i: u32) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{i:06}").as_bytes());
    key
}

fn with(prefix: &[u8], tail: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(tail.as_bytes());
    key
}

async fn raw_backend(server: &Server, prefix: &[u8]) -> Result<Backend, BenchError> {
    let end = prefix_successor(prefix).unwrap_or_default();
    Ok(Backend::Raw(RawWriter::new(server, prefix, &end).await?))
}

fn load_spec(prefix: &[u8], rate: f64, duration: Duration, value_size: usize) -> LoadSpec {
    LoadSpec {
        writers: WRITERS,
        rate: Some(rate),
        duration,
        value_size,
        mode: KeyMode::Raw,
        prefix: prefix.to_vec(),
    }
}

fn scanned_rows(s: &Scrape) -> Result<f64, BenchError> {
    s.require(SCANNED_ROWS)
}

fn ms_of(us: Option<u64>) -> Option<f64> {
    us.map(|u| u as f64 / 1000.0)
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "n/a",
    }
}

/// Checks a load's puts against what the consumer saw.
fn check_load(report: &mut Report, what: &str, load: &LoadResult, seen: &SeqSet) -> u64 {
    let lost = load.acked.missing_from(seen);
    if lost > 0 {
        report.fail(format!("{what}: {lost} acknowledged puts never arrived"));
    }
    if load.errors > 0 {
        report.fail(format!(
            "{what}: {} puts failed ({})",
            load.errors,
            load.first_error.as_deref().unwrap_or("no message")
        ));
    }
    lost
}

/// Runs `kvfeed bench regions` in the order the module docs give.
pub async fn run(args: &RegionsArgs) -> Result<Report, BenchError> {
    let [
        lag_duration,
        split_duration,
        register_timeout,
        drain_timeout,
    ] = args.check()?;
    let server = Server::connect(&args.target).await?;
    let n = args.regions;
    let prefix = run_prefix(NAME);
    let end = prefix_successor(&prefix).unwrap_or_default();
    let hot = n / 2;
    let hot_prefix = with(&region_key(&prefix, hot), "/");
    let prefixes = Prefixes {
        lag: with(&prefix, "lag/"),
        preload: with(&hot_prefix, "p/"),
        split: hot_prefix,
    };

    progress(NAME, &format!("creating {n} regions"));
    let created = Instant::now();
    let mut keys = vec![prefix.clone()];
    keys.extend((1..n).map(|i| region_key(&prefix, i)));
    keys.push(end.clone());
    split(&server.status, &keys).await?;
    let create_time = created.elapsed();
    if args.split_preload > 0 {
        load::preload(
            &server,
            &prefixes.preload,
            args.split_preload,
            args.value_size,
        )
        .await?;
    }

    let before = scrape(&server.status).await?;
    let interval = before
        .get(MIN_TS_INTERVAL)
        .map(Duration::from_secs_f64)
        .or(args.min_ts_interval.map(|d| d.as_duration()));
    let interval_source = if before.get(MIN_TS_INTERVAL).is_some() {
        "server /metrics"
    } else if interval.is_some() {
        "--min-ts-interval"
    } else {
        "unknown"
    };

    progress(NAME, &format!("subscribing to {n} regions"));
    let spec = FeedSpec {
        mode: KeyMode::Raw,
        start: prefix.clone(),
        end: end.clone(),
        start_ts: server.cluster.tso().await?,
        old_value: false,
    };
    let seen = Arc::new(Mutex::new(Seen::new()));
    let registered = Instant::now();
    let feed = Feed::open(&server.cluster, &spec);
    let consumer = tokio::spawn(consume(
        feed,
        Arc::clone(&seen),
        prefixes.clone(),
        n as usize,
    ));
    let result = measure(
        args,
        &server,
        &seen,
        &prefixes,
        [
            lag_duration,
            split_duration,
            register_timeout,
            drain_timeout,
        ],
        registered,
        &before,
        interval,
    )
    .await;
    consumer.abort();
    let mut report = result?;
    report.float(
        "create_seconds",
        "creating the regions",
        secs(create_time),
        3,
        "s",
    );
    report.text(
        "min_ts_interval_from",
        "min-ts-interval read from",
        interval_source,
    );
    Ok(report)
}

// The run's pieces, passed as they are rather than bundled for one call.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &RegionsArgs,
    server: &Server,
    seen: &Arc<Mutex<Seen>>,
    prefixes: &Prefixes,
    [
        lag_duration,
        split_duration,
        register_timeout,
        drain_timeout,
    ]: [Duration; 4],
    registered: Instant,
    before: &Scrape,
    interval: Option<Duration>,
) -> Result<Report, BenchError> {
    let n = args.regions as usize;
    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({
            "regions": n,
            "lag_rate": args.lag_rate,
            "lag_duration_secs": secs(lag_duration),
            "split_rate": args.split_rate,
            "split_duration_secs": secs(split_duration),
            "split_preload": args.split_preload,
            "value_size": args.value_size,
        }),
    );
    let interval_ms = interval.map(|d| d.as_secs_f64() * 1000.0);

    // 2. Registration and memory.
    if !wait_for(seen, register_timeout, |s| s.all_initialized.is_some()).await? {
        let s = lock(seen);
        return Err(BenchError::Feed(format!(
            "only {} of {} regions were INITIALIZED within {}",
            s.regions_done, n, args.register_timeout
        )));
    }
    let after_register = scrape(&server.status).await?;
    let register_time = lock(seen)
        .all_initialized
        .map_or(Duration::ZERO, |t| t.duration_since(registered));
    let rss_per_region = match (before.rss(), after_register.rss()) {
        (Some(b), Some(a)) => Some((a - b) / n as f64),
        _ => None,
    };
    report.section("Registration");
    report.int(
        "regions",
        "regions subscribed (one Feed, one stream)",
        n as u64,
    );
    report.float(
        "register_seconds",
        "register → every region INITIALIZED",
        secs(register_time),
        3,
        "s",
    );
    report.text(
        "register_target",
        "target < 2 s",
        verdict(Some(register_time < Duration::from_secs(2))),
    );
    report.bytes(
        "server_rss_before_bytes",
        "server RSS before subscribing",
        before.rss(),
    );
    report.bytes(
        "server_rss_subscribed_bytes",
        "server RSS with every region INITIALIZED",
        after_register.rss(),
    );
    report.opt_float(
        "rss_per_region_bytes",
        "server RSS per subscribed region",
        rss_per_region,
        0,
        "B",
    );
    report.text(
        "rss_target",
        "target ≤ 4 KiB",
        verdict(rss_per_region.map(|b| b <= 4096.0)),
    );

    // 3. Resolved-ts lag under a light load.
    progress(NAME, &format!("light load for {lag_duration:?}"));
    lock(seen).phase = Phase::Lag;
    let lag_spec = load_spec(&prefixes.lag, args.lag_rate, lag_duration, args.value_size);
    let lag_load = load::run_on(raw_backend(server, &prefixes.lag).await?, &lag_spec).await?;
    lock(seen).phase = Phase::Other;
    wait_for(seen, drain_timeout, |s| {
        lag_load.acked.missing_from(&s.lag_rows) == 0
    })
    .await?;
    let after_lag = scrape(&server.status).await?;
    let lag_p99 = {
        let s = lock(seen);
        report.section("Resolved-ts lag (now − resolved ts, at each one the feed hands out)");
        report.opt_float(
            "min_ts_interval_ms",
            "server min-ts-interval",
            interval_ms,
            0,
            "ms",
        );
        report.float(
            "lag_puts_per_sec",
            "light load, puts/s",
            args.lag_rate,
            0,
            "",
        );
        report.int("lag_samples", "resolved ts received", s.lag[1].count());
        report.opt_float(
            "lag_p50_ms",
            "lag p50",
            ms_of(s.lag[1].quantile(0.5)),
            1,
            "ms",
        );
        let p99 = ms_of(s.lag[1].quantile(0.99));
        report.opt_float("lag_p99_ms", "lag p99", p99, 1, "ms");
        report.opt_float("lag_max_ms", "lag max", ms_of(s.lag[1].max()), 1, "ms");
        p99
    };
    let lag_met = match (lag_p99, interval_ms) {
        (Some(p99), Some(i)) => Some(p99 <= i + 50.0),
        _ => None,
    };
    report.text(
        "lag_target",
        "target ≤ min-ts-interval + 50 ms",
        verdict(lag_met),
    );
    report.bytes(
        "server_rss_after_lag_bytes",
        "server RSS after the light load",
        after_lag.rss(),
    );

    // 4. A split under load.
    progress(NAME, "writing the region to split, then splitting it");
    let scanned_before = scanned_rows(&after_lag)?;
    lock(seen).phase = Phase::Split;
    let split_spec = load_spec(
        &prefixes.split,
        args.split_rate,
        split_duration,
        args.value_size,
    );
    let backend = raw_backend(server, &prefixes.split).await?;
    let writers = tokio::spawn(async move { load::run_on(backend, &split_spec).await });
    tokio::time::sleep(split_duration / 3).await;
    // Load keys are `prefix + w{writer:04}/{seq}`: writers 0 and 1 stay
    // left of the split, 2 and 3 go right.
    let split_key = with(&prefixes.split, &format!("w{:04}", WRITERS / 2));
    let split_started = Instant::now();
    split(&server.status, &[split_key]).await?;
    let split_answered = split_started.elapsed();
    let split_ts = server.cluster.tso().await?.into_inner();
    lock(seen).goal = Some((split_ts, None));
    let split_load = writers
        .await
        .map_err(|e| BenchError::Feed(format!("the split load's task failed: {e}")))??;
    wait_for(seen, drain_timeout, |s| {
        split_load.acked.missing_from(&s.split_rows) == 0
            && s.goal.is_some_and(|(_, reached)| reached.is_some())
            && s.regions_done == s.regions_total
    })
    .await?;
    lock(seen).phase = Phase::Other;
    let after_split = scrape(&server.status).await?;
    let rescanned = scanned_rows(&after_split)? - scanned_before;
    let s = lock(seen);
    let resume = s
        .goal
        .and_then(|(_, reached)| reached)
        .map(|t| t.duration_since(split_started));
    report.section("Split of a subscribed region under load");
    report.float(
        "split_puts_per_sec",
        "puts/s into the region",
        args.split_rate,
        0,
        "",
    );
    report.int(
        "split_acked_puts",
        "acknowledged puts",
        split_load.acked.len(),
    );
    report.float(
        "split_answer_ms",
        "split request answered in",
        secs(split_answered) * 1000.0,
        1,
        "ms",
    );
    report.opt_float(
        "split_resume_ms",
        "split → span resolved ts past it",
        resume.map(|d| secs(d) * 1000.0),
        1,
        "ms",
    );
    let resume_met = match (resume, interval) {
        (Some(r), Some(i)) => Some(r <= 2 * i),
        _ => None,
    };
    report.text(
        "split_resume_target",
        "target ≤ 2 × min-ts-interval",
        verdict(resume_met),
    );
    report.opt_float(
        "split_lag_p99_ms",
        "resolved-ts lag p99 around the split",
        ms_of(s.lag[2].quantile(0.99)),
        1,
        "ms",
    );
    report.int(
        "rescanned_rows",
        "rows re-scanned by the re-registration's catch-up",
        rescanned.max(0.0) as u64,
    );
    report.int(
        "split_region_rows",
        "rows in the region (preloaded + written)",
        args.split_preload + split_load.sent,
    );
    report.int(
        "region_retries",
        "region retries seen by the feed",
        s.region_retries,
    );

    report.section("Correctness");
    let lost = check_load(&mut report, "light load", &lag_load, &s.lag_rows)
        + check_load(&mut report, "split load", &split_load, &s.split_rows);
    report.int("lost", "acknowledged puts lost", lost);
    report.int("duplicated", "puts delivered twice", s.duplicates);
    report.int("foreign", "rows of no put of this run", s.foreign);
    report.int(
        "preloaded_delivered",
        "preloaded rows delivered",
        s.preloaded,
    );
    report.int("streams_lost", "streams lost", s.streams_lost);
    for (count, what) in [
        (s.duplicates, "puts were delivered more than once"),
        (s.foreign, "rows matched no put of this run"),
        (
            s.preloaded,
            "rows written before the feed's start ts were delivered",
        ),
    ] {
        if count > 0 {
            report.fail(format!("{count} {what}"));
        }
    }
    if resume.is_none() {
        report.fail(format!(
            "the span's resolved ts did not pass the split within {}",
            args.drain_timeout
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_keys_sort_in_region_order_inside_the_prefix() {
        let prefix = b"p/".to_vec();
        let end = prefix_successor(&prefix).unwrap_or_default();
        let mut keys = vec![prefix.clone()];
        keys.extend((1..12).map(|i| region_key(&prefix, i)));
        keys.push(end);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        // The hot region's keys stay inside it, the light load's in the last.
        let hot = with(&region_key(&prefix, 5), "/w0003/1");
        assert!(region_key(&prefix, 5) < hot && hot < region_key(&prefix, 6));
        assert!(with(&prefix, "lag/w0000") > region_key(&prefix, 999_999));
        assert_eq!(hex(b"\x00a\xff"), "0061ff");
    }
}
