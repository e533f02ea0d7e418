//! Smoke runs of `kvfeed bench`: every subcommand, tiny and short, through
//! the real binary against a real `kvfeed serve`.
//!
//! Only counting is checked — puts were made, nothing was lost or
//! duplicated, the feed's gauges came back to 0, a scan delivered exactly
//! the preloaded keys — never a speed: timing depends on the machine, and
//! a test that asserts it would fail on a busy one while proving nothing.
//! Each test has a server of its own, because churn and idle compare the
//! server's feed gauges before and after and must not see another test's
//! connections. Every bench process is killed if it outlives [`LIMIT`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

#[path = "brokers/nats.rs"]
mod broker;
mod common;

use std::time::Duration;

use common::{
    Run, TestServer, assert_churn_counts, assert_open_loop_200, json_int, json_number, run_to_end,
};
use serde_json::Value;

/// Longest a smoke run may take before it is killed (and the test fails).
const LIMIT: Duration = Duration::from_secs(120);

impl Run {
    /// The JSON line of a run that must have succeeded, with no failures.
    fn ok(&self, bench: &str) -> Value {
        let json = self.bench_ok(bench);
        assert_eq!(json["failures"], Value::Array(Vec::new()), "{json}");
        json
    }
}

/// Runs `kvfeed <args>`, killing it after [`LIMIT`].
fn run(args: &[String]) -> Run {
    run_to_end(args, LIMIT)
}

/// `kvfeed bench <sub> --pd ... --status ... <extra>` against `server`.
fn bench(server: &TestServer, sub: &str, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec![
        "bench".into(),
        sub.into(),
        "--pd".into(),
        server.pd_endpoint(),
        "--status".into(),
        server.status_addr().to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    run(&args)
}

#[test]
fn feed_delivers_every_raw_put_once_to_every_watcher() {
    let server = TestServer::start();
    let json = bench(
        &server,
        "feed",
        &[
            "--duration",
            "1s",
            "--writers",
            "2",
            "--watchers",
            "2",
            "--value-size",
            "64",
        ],
    )
    .ok("feed");
    let puts = json_int(&json, "puts");
    assert!(puts > 0, "{json}");
    assert_eq!(json_int(&json, "lost"), 0, "{json}");
    assert_eq!(json_int(&json, "duplicated"), 0, "{json}");
    assert_eq!(json_int(&json, "put_errors"), 0, "{json}");
    assert_eq!(
        json_int(&json, "events"),
        2 * puts,
        "each watcher sees each put"
    );
    assert_eq!(json["params"]["mode"], "raw");
}

#[test]
fn feed_counts_transactions_and_open_loop_schedules() {
    let server = TestServer::start();
    let txn = bench(
        &server,
        "feed",
        &[
            "--txn",
            "--duration",
            "1s",
            "--writers",
            "2",
            "--watchers",
            "1",
        ],
    )
    .ok("feed");
    let puts = json_int(&txn, "puts");
    assert!(puts > 0, "{txn}");
    assert_eq!(json_int(&txn, "lost"), 0, "{txn}");
    assert_eq!(json_int(&txn, "duplicated"), 0, "{txn}");
    assert_eq!(json_int(&txn, "events"), puts, "{txn}");
    assert_eq!(txn["params"]["mode"], "txn");

    // Open loop: 200 puts/s for 1 s schedules exactly 200 puts, each of
    // which is acknowledged, failed or skipped.
    let open = bench(
        &server,
        "feed",
        &["--rate", "200", "--duration", "1s", "--writers", "4"],
    )
    .ok("feed");
    assert_open_loop_200(&open, 1);
}

#[test]
fn scan_delivers_exactly_the_preloaded_keys() {
    let server = TestServer::start();
    let json = bench(
        &server,
        "scan",
        &["--keys", "3000", "--value-size", "32", "--txn"],
    )
    .ok("scan");
    for space in ["", "txn_"] {
        assert_eq!(json_int(&json, &format!("{space}rows")), 3000, "{json}");
        assert_eq!(json_int(&json, &format!("{space}duplicated")), 0, "{json}");
        assert_eq!(json_int(&json, &format!("{space}unexpected")), 0, "{json}");
    }
    assert!(json["txn_vs_raw_percent"].as_f64().is_some(), "{json}");
}

#[test]
fn kv_scan_reads_back_both_key_spaces() {
    let server = TestServer::start();
    // 700 keys: several pages of the client's scan, and three transactions
    // (the last one short).
    let json = bench(&server, "kv-scan", &["--keys", "700", "--value-size", "16"]).ok("kv-scan");
    assert_eq!(json_int(&json, "raw_pairs"), 700, "{json}");
    assert_eq!(json_int(&json, "txn_pairs"), 700, "{json}");
    assert!(json["txn_vs_raw_percent"].as_f64().is_some(), "{json}");
}

#[test]
fn kv_scan_returns_each_key_once_over_many_versions() {
    let server = TestServer::start();
    let json = bench(
        &server,
        "kv-scan",
        &["--keys", "300", "--value-size", "16", "--versions", "4"],
    )
    .ok("kv-scan");
    assert_eq!(json_int(&json["params"], "versions"), 4, "{json}");
    assert_eq!(json_int(&json, "raw_pairs"), 300, "{json}");
    assert_eq!(json_int(&json, "txn_pairs"), 300, "{json}");
}

#[test]
fn batch_put_answers_every_put_on_both_transports() {
    let server = TestServer::start();
    // More puts than in flight, so slots are refilled many times.
    let json = bench(
        &server,
        "batch-put",
        &["--puts", "600", "--in-flight", "16"],
    )
    .ok("batch-put");
    assert!(json_number(&json, "unary_puts_per_sec") > 0.0, "{json}");
    assert!(json_number(&json, "batch_puts_per_sec") > 0.0, "{json}");
    assert!(json["batch_vs_unary"].as_f64().is_some(), "{json}");
}

#[test]
fn churn_leaves_no_connection_subscription_or_byte_behind() {
    let server = TestServer::start();
    let json = bench(
        &server,
        "churn",
        &[
            "--clients",
            "4",
            "--duration",
            "1s",
            "--seed",
            "7",
            "--preload",
            "32",
        ],
    )
    .ok("churn");
    assert_churn_counts(&json);
    for g in ["cdc_connections", "cdc_subscriptions", "cdc_pending_bytes"] {
        assert_eq!(json_number(&json, g), 0.0, "{g}: {json}");
    }
    // The bench's own view agrees with the server's.
    let metrics = server.metrics();
    for line in ["kvfeed_cdc_connections 0", "kvfeed_cdc_subscriptions 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// Regression: a client that registers, half-closes and drops the call at
/// once used to leave its connection (and task) behind about once in 400
/// calls, when the drop landed while the server was flushing the
/// half-close. Thousands of such calls must leave nothing.
#[test]
fn churn_of_register_then_drop_leaves_nothing_behind() {
    let server = TestServer::start();
    let json = bench(
        &server,
        "churn",
        &[
            "--clients",
            "16",
            "--duration",
            "3s",
            "--stages",
            "after_register",
            "--preload",
            "32",
        ],
    )
    .ok("churn");
    assert!(json_int(&json, "connections") > 0, "{json}");
    for g in [
        "cdc_connections",
        "cdc_subscriptions",
        "cdc_pending_bytes",
        "cdc_connection_tasks",
    ] {
        assert_eq!(json_number(&json, g), 0.0, "{g}: {json}");
    }
}

#[test]
fn idle_holds_then_releases_every_connection() {
    let server = TestServer::start();
    let json = bench(&server, "idle", &["--connections", "20", "--batch", "10"]).ok("idle");
    assert_eq!(json_int(&json, "connections"), 20, "{json}");
    assert_eq!(json_number(&json, "cdc_connections"), 20.0, "{json}");
    assert!(json["rss_per_connection_kib"].is_number(), "{json}");
}

#[test]
fn slow_consumer_costs_the_fast_one_nothing() {
    let server = TestServer::start();
    let json = bench(&server, "slow", &["--duration", "1s", "--writers", "2"]).ok("slow");
    let puts = json_int(&json, "puts");
    assert!(puts > 0, "{json}");
    assert_eq!(json_int(&json, "fast_lost"), 0, "{json}");
    assert_eq!(json_int(&json, "fast_duplicated"), 0, "{json}");
    assert_eq!(json_int(&json, "fast_rows"), puts, "{json}");
    // Either the server gave up on the slow consumer and said so, or it
    // kept up and the slow consumer got everything.
    let congested = json["congested"].as_bool().expect("congested is a flag");
    assert!(congested || json_int(&json, "slow_missed") == 0, "{json}");
}

#[test]
fn engine_scans_what_it_wrote_and_streams_over_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = run(&[
        "bench".into(),
        "engine".into(),
        "--keys".into(),
        "2000".into(),
        "--dir".into(),
        dir.path().display().to_string(),
        "--grpc".into(),
        "--grpc-duration".into(),
        "200ms".into(),
        "--message-size".into(),
        "4096".into(),
    ])
    .ok("engine");
    assert_eq!(json_int(&json, "scan_entries"), 2000, "{json}");
    assert!(json_int(&json, "grpc_messages") > 0, "{json}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the directory")
        .collect();
    assert!(left.is_empty(), "temporary databases left behind: {left:?}");
}

#[test]
fn bad_targets_are_refused_with_a_reason() {
    let remote = run(&[
        "bench".into(),
        "feed".into(),
        "--pd".into(),
        "192.0.2.1:20160".into(),
    ]);
    assert_ne!(remote.code, Some(0));
    assert!(remote.stderr.contains("loopback"), "{}", remote.stderr);

    let server = TestServer::start();
    // A port that was free a moment ago: nothing answers /metrics there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let no_status = run(&[
        "bench".into(),
        "scan".into(),
        "--pd".into(),
        server.pd_endpoint(),
        "--status".into(),
        closed,
        "--keys".into(),
        "10".into(),
    ]);
    assert_ne!(no_status.code, Some(0));
    assert!(
        no_status.stderr.contains("/metrics"),
        "{}",
        no_status.stderr
    );

    let bad_size = bench(&server, "feed", &["--value-size", "8"]);
    assert_ne!(bad_size.code, Some(0));
    assert!(
        bad_size.stderr.contains("--value-size"),
        "{}",
        bad_size.stderr
    );
}

#[cfg(target_os = "linux")]
#[test]
fn the_server_reports_its_own_memory_and_cpu() {
    let server = TestServer::start();
    let metrics = server.metrics();
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"));
        let value: f64 = value.parse().expect("a number");
        assert!(value >= 0.0, "{name} = {value}");
    }
    let rss = metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("rss");
    assert!(
        rss > 1024.0 * 1024.0,
        "a running server holds more than 1 MiB: {rss}"
    );

    let help = run(&["bench".into(), "idle".into(), "--help".into()]);
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("ulimit -n"), "{}", help.stdout);
}

#[test]
fn regions_subscribes_to_every_region_and_a_split_loses_and_repeats_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"200ms\"\n").expect("config");
    let config = config.display().to_string();
    let server = TestServer::start_with(&["--config", &config]);
    let json = bench(
        &server,
        "regions",
        &[
            "--regions",
            "200",
            "--lag-rate",
            "50",
            "--lag-duration",
            "1s",
            "--split-rate",
            "200",
            "--split-duration",
            "2s",
            "--split-preload",
            "500",
        ],
    )
    .ok("regions");
    assert_eq!(json_int(&json, "regions"), 200, "{json}");
    assert_eq!(json_int(&json, "lost"), 0, "{json}");
    assert_eq!(json_int(&json, "duplicated"), 0, "{json}");
    assert_eq!(json_int(&json, "preloaded_delivered"), 0, "{json}");
    assert!(json_int(&json, "split_acked_puts") > 0, "{json}");
    assert!(json_int(&json, "lag_samples") > 0, "{json}");
    // The interval comes from the server, not from a flag.
    assert_eq!(json["min_ts_interval_from"], "server /metrics", "{json}");
    assert_eq!(json_number(&json, "min_ts_interval_ms"), 200.0, "{json}");
    assert!(json_number(&json, "split_resume_ms") > 0.0, "{json}");
    // The re-registration catches up from the consumer's resolved ts: it
    // finds the puts since then, never the preloaded region.
    assert!(json_int(&json, "rescanned_rows") < 500, "{json}");
}

/// `kvfeed bench changefeed --scenario <scenario> <extra>`: must succeed,
/// with the scenario's name in its JSON line.
fn changefeed(server: &TestServer, scenario: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--scenario", scenario];
    args.extend_from_slice(extra);
    let json = bench(server, "changefeed", &args).ok("changefeed");
    assert_eq!(json["scenario"], scenario, "{json}");
    json
}

#[test]
fn changefeed_initial_delivers_every_preloaded_key() {
    let server = TestServer::start();
    let json = changefeed(&server, "initial", &["--keys", "2000"]);
    assert_eq!(json_int(&json, "rows_in_sink"), 2000, "{json}");
    assert!(json_number(&json, "rows_per_sec") > 0.0, "{json}");
    assert!(json_int(&json, "peak_rss_bytes") > 0, "{json}");
    assert_eq!(json["verify_clean"], true, "{json}");
    assert_eq!(json_int(&json, "verify_rows"), 2000, "{json}");
}

#[test]
fn changefeed_initial_into_nats_delivers_every_preloaded_key() {
    let server = TestServer::start();
    let store = tempfile::tempdir().expect("tempdir");
    let nats = broker::NatsServer::start(store.path());
    let sink = nats.sink("bench", "");
    let json = changefeed(
        &server,
        "initial",
        &["--keys", "500", "--value-size", "1024", "--sink", &sink],
    );
    assert!(
        json["sink"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{sink}.r"))),
        "{json}"
    );
    assert_eq!(json_int(&json, "rows_in_sink"), 500, "{json}");
    assert_eq!(json["verify_clean"], true, "{json}");
    assert_eq!(json_int(&json, "verify_rows"), 500, "{json}");
}

#[test]
fn changefeed_live_passes_every_acknowledged_commit() {
    let server = TestServer::start();
    let json = changefeed(
        &server,
        "live",
        &["--rate", "200", "--duration", "2s", "--writers", "4"],
    );
    let txns = json_int(&json, "txns");
    assert!(txns > 0, "{json}");
    assert_eq!(json_int(&json, "txn_errors"), 0, "{json}");
    assert_eq!(json_int(&json, "rows_in_sink"), 4 * txns, "{json}");
    let p50 = json_number(&json, "latency_p50_ms");
    assert!(
        p50 >= 0.0 && p50 <= json_number(&json, "latency_max_ms"),
        "{json}"
    );
    // The interval comes from the server's /metrics.
    assert!(json_number(&json, "min_ts_interval_ms") > 0.0, "{json}");
    assert_eq!(json["verify_clean"], true, "{json}");
}

#[test]
fn changefeed_big_txn_delivers_the_whole_transaction() {
    let server = TestServer::start();
    let json = changefeed(
        &server,
        "big-txn",
        &["--keys", "5000", "--value-size", "1024"],
    );
    assert_eq!(json_int(&json, "txn_rows_in_sink"), 5000, "{json}");
    assert_eq!(json_int(&json, "rows_in_sink"), 5000, "{json}");
    assert!(json_int(&json, "baseline_rss_bytes") > 0, "{json}");
    assert!(json["rss_growth_bytes"].is_u64(), "{json}");
}

#[test]
fn changefeed_kill_restarts_and_the_sink_verifies_clean() {
    let server = TestServer::start();
    let json = changefeed(
        &server,
        "kill",
        &[
            "--rate",
            "100",
            "--duration",
            "5s",
            "--kill-every",
            "1s",
            "--writers",
            "2",
        ],
    );
    assert!(json_int(&json, "restarts") >= 3, "{json}");
    let txns = json_int(&json, "txns");
    assert!(txns > 0, "{json}");
    assert_eq!(json_int(&json, "rows_in_sink"), 4 * txns, "{json}");
    assert_eq!(json["verify_clean"], true, "{json}");
    assert_eq!(json_int(&json, "verify_problems"), 0, "{json}");
}
