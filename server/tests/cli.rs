//! End-to-end tests of `kvfeed put | get | delete | scan`: the real binary
//! against a real `kvfeed serve` on loopback, in raw and transactional mode,
//! with text, `--hex` and `--json` output. Some setups (many keys, a lock
//! left behind) use the client library directly, as a second writer would.
//!
//! Every process is waited for with a bound, so a hang fails the test
//! instead of stalling it; nothing waits on sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use kvfeed_client::txn::Mutation;
use kvfeed_client::{ClientError, Cluster, KeyMode};

/// A key in the second region in both modes: nine leading `0xFF` bytes sort
/// above the split key (the encoding of eight `0xFF` bytes) whether the key
/// is compared raw or encoded first.
const HIGH_KEY_HEX: &str = "ffffffffffffffffff01";

/// How a client command ended.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        &self.stdout
    }

    /// Asserts failure (status 1, nothing on stdout) and returns stderr.
    fn failed(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected status 1: {self:?}");
        assert_eq!(self.stdout, "", "nothing on stdout on failure");
        &self.stderr
    }

    fn lines(&self) -> Vec<&str> {
        self.ok().lines().collect()
    }
}

/// Runs `kvfeed <args>` to completion, killing it after [`WAIT`].
fn run(args: &[&str]) -> Ran {
    let started = Instant::now();
    let common::Run {
        code,
        stdout,
        stderr,
    } = common::run_to_end(args, WAIT);
    Ran {
        code,
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

/// Runs `kvfeed <cmd> --pd <server> <args>`.
fn kv(server: &TestServer, cmd: &str, args: &[&str]) -> Ran {
    let pd = server.pd_endpoint();
    let mut all = vec![cmd, "--pd", pd.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

/// `mode` flags followed by `args`.
fn cat<'a>(mode: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
    [mode, args].concat()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// put / get / delete / get-missing, in one mode (`extra` = `[]` or
/// `["--raw"]`).
fn crud(extra: &[&str]) {
    let server = TestServer::start();
    assert_eq!(
        kv(&server, "put", &cat(extra, &["greeting", "hello world"])).ok(),
        "OK\n"
    );
    assert_eq!(
        kv(&server, "get", &cat(extra, &["greeting"])).ok(),
        "hello world\n"
    );
    // Overwrite, then read the new value.
    kv(&server, "put", &cat(extra, &["greeting", "hi"])).ok();
    assert_eq!(kv(&server, "get", &cat(extra, &["greeting"])).ok(), "hi\n");
    assert_eq!(
        kv(&server, "delete", &cat(extra, &["greeting"])).ok(),
        "OK\n"
    );
    let missing = kv(&server, "get", &cat(extra, &["greeting"]));
    assert_eq!(missing.failed(), "kvfeed: key not found\n");
    // Deleting a missing key is not an error.
    kv(&server, "delete", &cat(extra, &["never-written"])).ok();
}

#[test]
fn txn_put_get_delete() {
    crud(&[]);
}

#[test]
fn raw_put_get_delete() {
    crud(&["--raw"]);
}

#[test]
fn raw_and_txn_keys_are_separate() {
    let server = TestServer::start();
    kv(&server, "put", &["--raw", "k", "raw value"]).ok();
    kv(&server, "get", &["k"]).failed();
    kv(&server, "put", &["k", "txn value"]).ok();
    assert_eq!(kv(&server, "get", &["--raw", "k"]).ok(), "raw value\n");
    assert_eq!(kv(&server, "get", &["k"]).ok(), "txn value\n");
}

#[test]
fn hex_and_escaped_values() {
    let server = TestServer::start();
    for mode in [&[][..], &["--raw"]] {
        // Key "k\x01", value bytes ff 00 'a' '\n'.
        kv(&server, "put", &cat(mode, &["--hex", "6b01", "ff00610a"])).ok();
        assert_eq!(
            kv(&server, "get", &cat(mode, &["--hex", "6b01"])).ok(),
            "ff00610a\n"
        );
        // Not UTF-8: shown escaped in text mode, key given as text.
        assert_eq!(
            kv(&server, "get", &cat(mode, &["k\u{1}"])).ok(),
            "\\xff\\x00a\\x0a\n"
        );
        // Scan lines escape keys and values alike.
        assert_eq!(
            kv(&server, "scan", &cat(mode, &["--prefix", "k"])).lines(),
            ["k\\x01 = \\xff\\x00a\\x0a"]
        );
        // Valid UTF-8 (with a newline) is printed as it is.
        kv(&server, "put", &cat(mode, &["text", "é\nz"])).ok();
        assert_eq!(kv(&server, "get", &cat(mode, &["text"])).ok(), "é\nz\n");
    }
    let bad = run(&["get", "--hex", "zz"]);
    assert!(
        bad.failed().starts_with("kvfeed: invalid hex key"),
        "{bad:?}"
    );
}

#[test]
fn json_output() {
    let server = TestServer::start();
    let put = kv(&server, "put", &["--json", "--hex", "6b", "ff76"]);
    let put: serde_json::Value = serde_json::from_str(put.ok()).expect("one JSON line");
    assert_eq!(put["key"], "k");
    assert_eq!(put["value"], "\\xffv");
    assert_eq!(put["value_hex"], "ff76");
    let start = put["start_ts"].as_u64().expect("start_ts");
    let commit = put["commit_ts"].as_u64().expect("commit_ts");
    assert!(commit > start && start > 0, "{put}");

    let got = kv(&server, "get", &["--json", "k"]);
    let got: serde_json::Value = serde_json::from_str(got.ok()).expect("one JSON line");
    assert_eq!(got["key"], "k");
    assert_eq!(got["key_hex"], "6b");
    assert_eq!(got["value"], "\\xffv");
    assert_eq!(got["value_hex"], "ff76");

    kv(&server, "put", &["--raw", "--json", "r", "plain"]).ok();
    let got = kv(&server, "get", &["--raw", "--json", "r"]);
    let got: serde_json::Value = serde_json::from_str(got.ok()).expect("one JSON line");
    assert_eq!(got["value"], "plain");
    assert!(got.get("commit_ts").is_none());

    let deleted = kv(&server, "delete", &["--json", "k"]);
    let deleted: serde_json::Value = serde_json::from_str(deleted.ok()).expect("JSON");
    assert!(deleted["commit_ts"].as_u64().expect("commit_ts") > commit);
}

/// Writes a, b, c and the second-region key, then scans in `mode`.
fn scan_both_regions(mode: &[&str]) {
    let server = TestServer::start();
    for (k, v) in [
        ("62", "32"),
        ("61", "31"),
        (HIGH_KEY_HEX, "39"),
        ("63", "33"),
    ] {
        kv(&server, "put", &cat(mode, &["--hex", k, v])).ok();
    }
    let all = kv(&server, "scan", &cat(mode, &["--hex"]));
    assert_eq!(
        all.lines(),
        [
            "61 = 31",
            "62 = 32",
            "63 = 33",
            &format!("{HIGH_KEY_HEX} = 39")
        ]
    );
    let text = kv(&server, "scan", &cat(mode, &["--limit", "2"]));
    assert_eq!(text.lines(), ["a = 1", "b = 2"]);
    let from = kv(&server, "scan", &cat(mode, &["--from", "b", "--to", "c"]));
    assert_eq!(from.lines(), ["b = 2"]);
    let upper = kv(&server, "scan", &cat(mode, &["--hex", "--from", "63"]));
    assert_eq!(upper.lines(), ["63 = 33", &format!("{HIGH_KEY_HEX} = 39")]);
    // An all-0xFF prefix has no successor: the scan runs to the end.
    let prefix = kv(&server, "scan", &cat(mode, &["--hex", "--prefix", "ffff"]));
    assert_eq!(prefix.lines(), [format!("{HIGH_KEY_HEX} = 39")]);
    let json = kv(&server, "scan", &cat(mode, &["--json", "--prefix", "a"]));
    let line: serde_json::Value = serde_json::from_str(json.ok()).expect("JSON line");
    assert_eq!((&line["key"], &line["value"]), (&"a".into(), &"1".into()));
    assert!(
        kv(&server, "scan", &cat(mode, &["--prefix", "zz"]))
            .ok()
            .is_empty()
    );

    // The scan really crossed a region boundary.
    let mode = if mode.is_empty() {
        KeyMode::Txn
    } else {
        KeyMode::Raw
    };
    runtime().block_on(async {
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("connect");
        let low = cluster
            .region_for_key(&mode.region_key(b"a"))
            .await
            .expect("region of a");
        let high_key = [vec![0xff; 9], vec![0x01]].concat();
        let high = cluster
            .region_for_key(&mode.region_key(&high_key))
            .await
            .expect("region of the high key");
        assert_ne!(low.id, high.id);
        let regions = cluster.regions_in_range(b"", b"").await.expect("regions");
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].end_key, regions[1].start_key);
    });
}

#[test]
fn txn_scan_across_regions() {
    scan_both_regions(&[]);
}

#[test]
fn raw_scan_across_regions() {
    scan_both_regions(&["--raw"]);
}

#[test]
fn scans_page_through_many_keys() {
    let server = TestServer::start();
    // More keys than one page (256), written through the library.
    let count = 300;
    runtime().block_on(async {
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("connect");
        for i in 0..count {
            let key = format!("key{i:04}");
            cluster
                .raw_put(key.as_bytes(), b"v")
                .await
                .expect("raw put");
            cluster
                .txn_put(key.as_bytes(), b"v")
                .await
                .expect("txn put");
        }
    });
    for mode in [&[][..], &["--raw"]] {
        let all = kv(&server, "scan", &[mode, &["--limit", "0"]].concat());
        let lines = all.lines();
        assert_eq!(lines.len(), count);
        let expected: Vec<String> = (0..count).map(|i| format!("key{i:04} = v")).collect();
        assert_eq!(lines, expected);
        let limited = kv(&server, "scan", &[mode, &["--limit", "260"]].concat());
        assert_eq!(limited.lines().len(), 260);
        let default = kv(&server, "scan", mode);
        assert_eq!(
            default.lines().len(),
            count,
            "default limit is above {count}"
        );
    }
}

#[test]
fn a_live_lock_is_reported_and_an_expired_one_resolved() {
    let server = TestServer::start();
    let lock_ts = runtime().block_on(async {
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("connect");
        // A writer that prewrote and vanished: one long lock, one expired.
        let long = cluster.tso().await.expect("ts");
        let held = Mutation::Put {
            key: b"held".to_vec(),
            value: b"x".to_vec(),
        };
        cluster
            .prewrite(&held, long, 600_000)
            .await
            .expect("prewrite");
        let short = cluster.tso().await.expect("ts");
        let stale = Mutation::Put {
            key: b"stale".to_vec(),
            value: b"x".to_vec(),
        };
        cluster.prewrite(&stale, short, 0).await.expect("prewrite");
        long
    });
    let get = kv(&server, "get", &["held"]);
    let err = get.failed();
    assert!(
        err.contains(&format!("locked by transaction {lock_ts}")) && err.contains("primary held"),
        "{err}"
    );
    let put = kv(&server, "put", &["held", "y"]);
    assert!(put.failed().contains("locked by transaction"), "{put:?}");
    // The expired lock is rolled back: the key reads as missing, then
    // takes a new write.
    assert_eq!(
        kv(&server, "get", &["stale"]).failed(),
        "kvfeed: key not found\n"
    );
    kv(&server, "put", &["stale", "fresh"]).ok();
    assert_eq!(kv(&server, "get", &["stale"]).ok(), "fresh\n");
}

#[test]
fn a_write_conflict_is_typed() {
    let server = TestServer::start();
    runtime().block_on(async {
        let cluster = Cluster::connect(&server.pd_endpoint())
            .await
            .expect("connect");
        let early = cluster.tso().await.expect("ts");
        let written = cluster.txn_put(b"k", b"later").await.expect("put");
        assert!(written.commit_ts > early);
        let late = Mutation::Put {
            key: b"k".to_vec(),
            value: b"early".to_vec(),
        };
        let err = cluster
            .prewrite(&late, early, 3_000)
            .await
            .expect_err("a newer commit exists");
        assert!(matches!(err, ClientError::WriteConflict { .. }), "{err}");
        assert_eq!(
            cluster.txn_get(b"k").await.expect("get"),
            Some(b"later".to_vec())
        );
    });
}

#[test]
fn data_survives_a_restart() {
    let mut server = TestServer::start();
    kv(&server, "put", &["durable", "yes"]).ok();
    kv(&server, "put", &["--raw", "durable", "raw yes"]).ok();
    server.restart();
    assert_eq!(kv(&server, "get", &["durable"]).ok(), "yes\n");
    assert_eq!(kv(&server, "get", &["--raw", "durable"]).ok(), "raw yes\n");
}

#[test]
fn pd_address_may_carry_the_http_scheme() {
    let server = TestServer::start();
    let pd = format!("http://{}", server.pd_endpoint());
    run(&["put", "--pd", &pd, "k", "v"]).ok();
    assert_eq!(run(&["get", "--pd", &pd, "k"]).ok(), "v\n");
}

#[test]
fn an_unreachable_pd_fails_promptly() {
    // A port nothing listens on (bound, then released).
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let pd = format!("127.0.0.1:{port}");
    let refused = run(&["get", "--pd", &pd, "k"]);
    let err = refused.failed();
    assert!(
        err.starts_with(&format!("kvfeed: cannot connect to {pd}")),
        "{err}"
    );
    assert!(refused.took < Duration::from_secs(5), "{refused:?}");

    let bad = run(&["get", "--pd", "https://127.0.0.1:1", "k"]);
    assert!(bad.failed().contains("invalid address"), "{bad:?}");
}

#[test]
fn a_silent_pd_times_out_instead_of_hanging() {
    // Accepts connections (the kernel's backlog does) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let pd = listener.local_addr().expect("addr").to_string();
    let silent = run(&["scan", "--pd", &pd]);
    let err = silent.failed();
    assert!(err.contains("did not answer within 5s"), "{err}");
    assert!(silent.took < Duration::from_secs(15), "{silent:?}");
    drop(listener);
}
