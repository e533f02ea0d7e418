//! End-to-end tests of `kvfeed watch`: the real binary watching a real
//! server while `kvfeed put` / `delete` write, in text, `--json` and
//! `--raw` forms; and the library core, stopped by its cancellation future.
//!
//! Every wait is bounded: lines are read on threads and received with a
//! timeout, processes are waited for with a watchdog. A watcher announces
//! `watching` on stderr once it is subscribed, and the tests write only
//! after that, so nothing depends on timing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;

use common::nemesis::{self, Nemesis};
use common::{TestServer, WAIT, kvfeed};
use kvfeed::cmd::format::Style;
use kvfeed::cmd::watch::{WatchSpec, wall_time, watch};
use kvfeed_client::{Cluster, KeyMode};

/// A running `kvfeed watch` whose output lines arrive on channels.
struct Watcher {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

impl Watcher {
    /// Starts `kvfeed watch --pd <server> <args>` and waits for `watching`.
    fn start(server: &TestServer, args: &[&str]) -> Watcher {
        Self::start_with_notices(server, args).0
    }

    /// Like [`Watcher::start`], also returning the stderr lines before
    /// `watching`.
    fn start_with_notices(server: &TestServer, args: &[&str]) -> (Watcher, Vec<String>) {
        let mut child = kvfeed()
            .arg("watch")
            .args(["--pd", &server.pd_endpoint()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvfeed watch");
        let stdout = lines_of(child.stdout.take().expect("piped"));
        let stderr = lines_of(child.stderr.take().expect("piped"));
        let mut watcher = Watcher {
            child,
            stdout,
            stderr,
        };
        let mut seen = Vec::new();
        loop {
            match watcher.stderr.recv_timeout(WAIT) {
                Ok(line) if line.starts_with("watching ") => return (watcher, seen),
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = watcher.child.kill();
                    panic!("no `watching` line for {args:?}; stderr: {seen:?}");
                }
            }
        }
    }

    /// The next `n` lines on stdout.
    fn lines(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.stdout
                    .recv_timeout(WAIT)
                    .unwrap_or_else(|_| panic!("line {} of {n} did not arrive", i + 1))
            })
            .collect()
    }

    /// SIGINT, then the exit status (bounded).
    fn interrupt(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(self.child.wait());
        });
        rx.recv_timeout(WAIT)
            .expect("watch exits after SIGINT")
            .expect("wait")
    }
}

/// Runs `kvfeed <args> --pd <server>` and returns stdout.
fn run(server: &TestServer, args: &[&str]) -> String {
    let output = kvfeed()
        .args(args)
        .args(["--pd", &server.pd_endpoint()])
        .stdin(Stdio::null())
        .output()
        .expect("run kvfeed");
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("utf-8")
}

/// `kvfeed put|delete --json ...`: (start_ts, commit_ts).
fn write_json(server: &TestServer, args: &[&str]) -> (u64, u64) {
    let line = run(server, &[args, &["--json"]].concat());
    let json: serde_json::Value = serde_json::from_str(line.trim()).expect("json");
    let ts = |field: &str| {
        json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {line}"))
    };
    (ts("start_ts"), ts("commit_ts"))
}

#[test]
fn watch_prints_changes_under_the_prefix_in_text_and_json() {
    let server = TestServer::start();
    let text = Watcher::start(&server, &["--prefix", "p"]);
    let json = Watcher::start(&server, &["--prefix", "p", "--json"]);

    let (s1, c1) = write_json(&server, &["put", "p1", "v1"]);
    // Outside the prefix: must not be printed.
    run(&server, &["put", "q1", "outside"]);
    let (s2, c2) = write_json(&server, &["delete", "p1"]);
    // Bytes that are not text: printed escaped, exact in the hex fields.
    let (s3, c3) = write_json(&server, &["put", "--hex", "7033", "ff0a"]);

    assert_eq!(
        text.lines(3),
        vec![
            format!("PUT p1 v1  ts={c1} ({})", wall_time(c1)),
            format!("DELETE p1  ts={c2} ({})", wall_time(c2)),
            format!("PUT p3 \\xff\\x0a  ts={c3} ({})", wall_time(c3)),
        ]
    );
    let objects: Vec<serde_json::Value> = json
        .lines(3)
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let expect = |op: &str, value: Option<(&str, &str)>, key: (&str, &str), s, c| {
        serde_json::json!({
            "op": op,
            "key": key.0,
            "key_hex": key.1,
            "value": value.map(|v| v.0),
            "value_hex": value.map(|v| v.1),
            "start_ts": s,
            "commit_ts": c,
            "wall_time": wall_time(c),
        })
    };
    assert_eq!(
        objects,
        vec![
            expect("PUT", Some(("v1", "7631")), ("p1", "7031"), s1, c1),
            expect("DELETE", None, ("p1", "7031"), s2, c2),
            expect("PUT", Some(("\\xff\\x0a", "ff0a")), ("p3", "7033"), s3, c3),
        ]
    );

    for watcher in [text, json] {
        assert_eq!(watcher.interrupt().code(), Some(0));
    }
}

#[test]
fn raw_watch_sees_raw_writes_only() {
    let server = TestServer::start();
    let raw = Watcher::start(&server, &["--raw", "--prefix", "r"]);
    // A transactional write to the same user key space is not raw.
    run(&server, &["put", "r0", "txn"]);
    run(&server, &["put", "--raw", "r1", "rv"]);
    run(&server, &["delete", "--raw", "r1"]);
    let lines = raw.lines(2);
    let ts = |line: &str, head: &str| -> u64 {
        let rest = line
            .strip_prefix(head)
            .unwrap_or_else(|| panic!("{line:?}"));
        let (ts, wall) = rest.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let ts: u64 = ts.parse().unwrap_or_else(|_| panic!("{line:?}"));
        assert_eq!(wall, format!("({})", wall_time(ts)), "{line:?}");
        ts
    };
    let put = ts(&lines[0], "PUT r1 rv  ts=");
    let delete = ts(&lines[1], "DELETE r1  ts=");
    assert!(put < delete, "{lines:?}");
    assert_eq!(raw.interrupt().code(), Some(0));
}

#[test]
fn watch_of_one_key_ignores_its_neighbours() {
    let server = TestServer::start();
    let one = Watcher::start(&server, &["k"]);
    run(&server, &["put", "k0", "neighbour"]);
    run(&server, &["put", "j", "neighbour"]);
    let (_, c) = write_json(&server, &["put", "k", "mine"]);
    assert_eq!(
        one.lines(1),
        vec![format!("PUT k mine  ts={c} ({})", wall_time(c))]
    );
    assert_eq!(one.interrupt().code(), Some(0));
}

/// A writer that forwards complete lines to a channel.
struct LineWriter {
    partial: Vec<u8>,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
}

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            let text = String::from_utf8_lossy(&line[..at]).into_owned();
            // The test may have stopped listening; the watch need not care.
            let _ = self.lines.send(text);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn line_writer() -> (LineWriter, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (lines, rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = LineWriter {
        partial: Vec::new(),
        lines,
    };
    (writer, rx)
}

async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a line in time")
        .expect("the watch is still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_watch_ends_with_ok_when_cancelled() {
    let server = TestServer::start();
    let cluster = Cluster::connect(&server.pd_endpoint())
        .await
        .expect("connect");
    let spec = WatchSpec {
        mode: KeyMode::Txn,
        start: b"w/".to_vec(),
        end: b"w0".to_vec(),
        description: "prefix w/".to_owned(),
        from_ts: None,
        style: Style::Hex,
        json: false,
        progress: false,
        progress_tty: false,
    };
    let (mut out, mut out_rx) = line_writer();
    let (mut notices, mut notice_rx) = line_writer();
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let watching = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let cancel = async move {
                let _ = cancel_rx.await;
            };
            watch(&cluster, &spec, &mut out, &mut notices, cancel).await
        })
    };
    let notice = next_line(&mut notice_rx).await;
    assert!(
        notice.starts_with("watching prefix w/ (transactional keys, 1 region)"),
        "{notice}"
    );
    let written = cluster.txn_put(b"w/1", b"x").await.expect("put");
    let c = written.commit_ts.into_inner();
    assert_eq!(
        next_line(&mut out_rx).await,
        format!("PUT 772f31 78  ts={c} ({})", wall_time(c))
    );
    cancel_tx.send(()).expect("the watch is waiting");
    let ended = tokio::time::timeout(WAIT, watching)
        .await
        .expect("the watch stops in time")
        .expect("the watch task");
    assert!(ended.is_ok(), "{ended:?}");
}

#[test]
fn from_ts_replays_what_was_committed_since() {
    let server = TestServer::start();
    let (_, before) = write_json(&server, &["put", "h0", "old"]);
    let (_, c1) = write_json(&server, &["put", "h1", "replayed"]);
    let from = (before + c1) / 2;
    let watcher = Watcher::start(&server, &["--prefix", "h", "--from-ts", &from.to_string()]);
    let (_, c2) = write_json(&server, &["put", "h2", "live"]);
    assert_eq!(
        watcher.lines(2),
        vec![
            format!("PUT h1 replayed  ts={c1} ({})", wall_time(c1)),
            format!("PUT h2 live  ts={c2} ({})", wall_time(c2)),
        ]
    );
    assert_eq!(watcher.interrupt().code(), Some(0));
}

#[test]
fn watch_rides_through_a_server_restart_without_repeating_lines() {
    let mut server = TestServer::start_restartable(&[]);
    let watcher = Watcher::start(&server, &["--prefix", "s"]);
    let (_, c1) = write_json(&server, &["put", "s1", "before"]);
    assert_eq!(
        watcher.lines(1),
        vec![format!("PUT s1 before  ts={c1} ({})", wall_time(c1))]
    );
    // Same port and data directory: the watcher's address stays valid.
    server.restart_same_port();
    let (_, c2) = write_json(&server, &["put", "s2", "after"]);
    let (_, c3) = write_json(&server, &["put", "s3", "marker"]);
    // s1 is not printed again, whatever the re-subscription replays.
    assert_eq!(
        watcher.lines(2),
        vec![
            format!("PUT s2 after  ts={c2} ({})", wall_time(c2)),
            format!("PUT s3 marker  ts={c3} ({})", wall_time(c3)),
        ]
    );
    assert_eq!(watcher.interrupt().code(), Some(0));
}

#[test]
fn from_ts_shows_catch_up_progress_then_each_preloaded_change_once() {
    const PRELOADED: usize = 30;
    let server = TestServer::start();
    let mut expected = Vec::new();
    for i in 0..PRELOADED {
        let (key, value) = (format!("c{i:02}"), format!("v{i}"));
        let (_, c) = write_json(&server, &["put", &key, &value]);
        expected.push(format!("PUT {key} {value}  ts={c} ({})", wall_time(c)));
    }
    // A key outside the prefix, and one deleted: both shape the count.
    run(&server, &["put", "d0", "outside"]);
    let (_, c) = write_json(&server, &["delete", "c00"]);
    expected.push(format!("DELETE c00  ts={c} ({})", wall_time(c)));

    let (watcher, notices) =
        Watcher::start_with_notices(&server, &["--prefix", "c", "--from-ts", "1"]);
    // stderr is a pipe: progress comes as whole lines, and the last one
    // before `watching` sums up the catch-up.
    let summary = notices
        .last()
        .unwrap_or_else(|| panic!("no catch-up summary before `watching`: {notices:?}"));
    let rows = PRELOADED + 1;
    assert!(
        summary.starts_with(&format!("caught up: {rows} rows, ")) && summary.contains(" rows/s, "),
        "{notices:?}"
    );
    assert!(
        !notices.iter().any(|l| l.contains('\r')),
        "no in-place redraws on a pipe: {notices:?}"
    );
    // Commit order per key; keys in key order within one region's scan.
    let mut lines = watcher.lines(expected.len());
    let key_of = |line: &String| line.split(' ').nth(1).map(str::to_owned);
    lines.sort_by_key(key_of);
    let mut sorted = expected.clone();
    sorted.sort_by_key(key_of);
    assert_eq!(lines, sorted);
    // Nothing more: a live marker is the next line.
    let (_, m) = write_json(&server, &["put", "cz", "marker"]);
    assert_eq!(
        watcher.lines(1),
        vec![format!("PUT cz marker  ts={m} ({})", wall_time(m))]
    );
    assert_eq!(watcher.interrupt().code(), Some(0));
}

/// The issue's promise for consumers: a watched range that is split,
/// merged and moved between three stores all the time (a change every few
/// milliseconds) prints every committed change exactly once, per key in
/// commit order.
#[test]
fn watch_prints_every_change_once_while_its_range_splits_merges_and_moves() {
    const PUTS: usize = 150;
    const KEYS: usize = 12;
    let server = TestServer::start_with(&["--stores", "3"]);
    let watcher = Watcher::start(&server, &["--prefix", "w/"]);
    let nemesis = Nemesis::start_in(server.status_addr(), nemesis::seed(5), 3, b"w/");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let written: Vec<(String, String, u64)> = runtime.block_on(async {
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("connect");
        let mut written = Vec::new();
        for i in 0..PUTS {
            let key = format!("w/{:02}", i % KEYS);
            let value = format!("v{i}");
            let done = cluster
                .txn_put(key.as_bytes(), value.as_bytes())
                .await
                .expect("put");
            written.push((key, value, done.commit_ts.into_inner()));
        }
        written
    });
    let done = nemesis.stop();
    assert!(
        done.splits + done.merges + done.transfers >= 10,
        "the layout hardly changed: {done:?}"
    );
    let lines = watcher.lines(PUTS);
    let printed: Vec<String> = written
        .iter()
        .map(|(k, v, ts)| format!("PUT {k} {v}  ts={ts} ({})", wall_time(*ts)))
        .collect();
    let mut got = lines.clone();
    got.sort();
    let mut want = printed.clone();
    want.sort();
    assert_eq!(got, want, "every put exactly once");
    // Per key, in commit order (the lines of one key keep the write order).
    for key in 0..KEYS {
        let key = format!("PUT w/{key:02} ");
        let of_key = |all: &[String]| -> Vec<String> {
            all.iter()
                .filter(|l| l.starts_with(&key))
                .cloned()
                .collect()
        };
        assert_eq!(of_key(&lines), of_key(&printed), "{key}");
    }
    // Nothing more arrives.
    assert!(
        watcher
            .stdout
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err()
    );
    assert_eq!(watcher.interrupt().code(), Some(0));
}
