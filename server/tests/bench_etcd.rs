//! Smoke runs of `kvfeed bench --target etcd://...` through the real
//! binary against a real etcd (feature `etcd`).
//!
//! As in `bench_smoke.rs`, only counting is checked — puts were made,
//! nothing was lost or duplicated, etcd's watch gauges came back to their
//! values before the run — never a speed. Each test starts an etcd of its
//! own (the binary named by `ETCD_BIN`, else `etcd` on `PATH`) on loopback
//! ports with a temporary data directory, because churn and idle compare
//! its gauges before and after and must not see another test's watches.
//! The feature is opt-in, so a missing etcd fails these tests with a
//! message saying how to get one rather than skipping them quietly.
//!
//! Without the feature, the one test here checks that `--target etcd://`
//! is refused with a message saying how to build a kvfeed that has it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::{Run, run_to_end};
use serde_json::Value;

/// Longest a smoke run may take before it is killed (and the test fails).
const LIMIT: Duration = Duration::from_secs(120);

impl Run {
    /// The JSON line of a run against etcd that must have succeeded.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    fn ok(&self, bench: &str) -> Value {
        let json = self.bench_ok(bench);
        assert_eq!(json["target"], "etcd", "{json}");
        json
    }
}

/// Runs `kvfeed <args>`, killing it after [`LIMIT`].
fn run(args: &[&str]) -> Run {
    run_to_end(args, LIMIT)
}

#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_targets_need_the_feature() {
    let refused = run(&["bench", "feed", "--target", "etcd://127.0.0.1:2379"]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("--features etcd"),
        "{}",
        refused.stderr
    );
    let bad = run(&["bench", "idle", "--target", "zookeeper://127.0.0.1:2181"]);
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("etcd://HOST:PORT"), "{}", bad.stderr);
}

#[cfg(feature = "etcd")]
mod with_etcd {
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    use serde_json::Value;

    use super::common::{assert_churn_counts, assert_open_loop_200, json_int, json_number};
    use super::run;

    /// Upper bound for etcd to become ready.
    const READY: Duration = Duration::from_secs(60);

    /// A throwaway single-member etcd on loopback, killed on drop.
    struct Etcd {
        child: Child,
        /// `--target` for the bench.
        target: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn etcd_binary() -> PathBuf {
        if let Some(bin) = std::env::var_os("ETCD_BIN") {
            return PathBuf::from(bin);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no etcd binary: the `etcd` feature's tests run a real etcd; set ETCD_BIN \
                     or put etcd on PATH (Debian: apt-get install etcd-server)"
                )
            })
    }

    /// A loopback port that was free a moment ago.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    impl Etcd {
        /// Starts etcd and waits (bounded) until it logs that it serves
        /// clients.
        fn start() -> Etcd {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let bin = etcd_binary();
            let mut child = Command::new(&bin)
                .arg("--name=smoke")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=smoke={peer_url}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start etcd ({}): {e}", bin.display()));
            // etcd logs to stderr; its lines are read on a thread and
            // the wait is on them, bounded by READY.
            let stderr = child.stderr.take().expect("piped");
            let (lines, log) = mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if lines.send(line).is_err() {
                        break;
                    }
                }
            });
            let deadline = std::time::Instant::now() + READY;
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match log.recv_timeout(left) {
                    Ok(line) => {
                        let ready = line.contains("ready to serve client requests");
                        seen.push(line);
                        if ready {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "etcd did not become ready ({e}); its log:\n{}",
                            seen.join("\n")
                        );
                    }
                }
            }
            // Keep reading its log so a full pipe never blocks it.
            std::thread::spawn(move || while log.recv().is_ok() {});
            Etcd {
                child,
                target: format!("etcd://127.0.0.1:{client}"),
                _dir: dir,
            }
        }

        fn bench(&self, sub: &str, extra: &[&str]) -> super::Run {
            let mut args = vec!["bench", sub, "--target", &self.target];
            args.extend_from_slice(extra);
            run(&args)
        }
    }

    #[test]
    fn feed_delivers_every_put_once_to_every_watcher() {
        let etcd = Etcd::start();
        let json = etcd
            .bench(
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
        assert_eq!(json_int(&json, "unexpected"), 0, "{json}");
        assert_eq!(json_int(&json, "put_errors"), 0, "{json}");
        assert_eq!(
            json_int(&json, "events"),
            2 * puts,
            "each watcher sees each put"
        );
        assert_eq!(json["params"]["mode"], "put");
        // etcd has no resolved ts: not measured, not zero.
        assert_eq!(json["resolved_lag_p99_ms"], Value::Null, "{json}");
        // Its memory and CPU come from its own /metrics.
        assert!(json_number(&json, "server_rss_peak_bytes") > 0.0, "{json}");
        assert!(json["server_cpu_seconds"].is_number(), "{json}");

        // Open loop: 200 puts/s for 1 s schedules exactly 200 puts.
        let open = etcd
            .bench(
                "feed",
                &["--rate", "200", "--duration", "1s", "--watchers", "2"],
            )
            .ok("feed");
        assert_open_loop_200(&open, 2);
    }

    #[test]
    fn churn_leaves_no_watch_behind() {
        let etcd = Etcd::start();
        let json = etcd
            .bench(
                "churn",
                &[
                    "--clients",
                    "4",
                    "--duration",
                    "1s",
                    "--seed",
                    "7",
                    "--preload",
                    "16",
                ],
            )
            .ok("churn");
        assert_churn_counts(&json);
        for g in [
            "etcd_watch_streams",
            "etcd_watchers",
            "etcd_watch_calls_open",
        ] {
            assert_eq!(
                json_number(&json, g),
                json_number(&json, &format!("{g}_before")),
                "{g}: {json}"
            );
        }
    }

    #[test]
    fn idle_holds_then_releases_every_watch() {
        let etcd = Etcd::start();
        let json = etcd
            .bench("idle", &["--connections", "20", "--batch", "10"])
            .ok("idle");
        assert_eq!(json_int(&json, "connections"), 20, "{json}");
        assert_eq!(json_number(&json, "etcd_watch_streams"), 20.0, "{json}");
        assert!(json["rss_per_connection_kib"].is_number(), "{json}");
    }

    #[test]
    fn kvfeed_only_options_are_refused_on_etcd() {
        let etcd = Etcd::start();
        let txn = etcd.bench("feed", &["--txn", "--duration", "1s"]);
        assert_ne!(txn.code, Some(0));
        assert!(txn.stderr.contains("--txn"), "{}", txn.stderr);
        let scan = etcd.bench("scan", &["--keys", "10"]);
        assert_ne!(scan.code, Some(0));
        assert!(scan.stderr.contains("kvfeed only"), "{}", scan.stderr);
    }
}
