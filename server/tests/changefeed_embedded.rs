//! End-to-end tests of embedded changefeeds: `[[changefeed]]` tables in
//! `kvfeed serve`'s config, managed with `kvfeed changefeed list | status |
//! pause | resume | remove` and the status server's `/changefeeds` routes.
//!
//! The first tests never run a changefeed (their tables start paused, from
//! a seeded `admin.json`), so they need no sink; the last one runs one into
//! a file sink.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Run, TestServer, WAIT, run_to_end, run_to_exit, serve_args};

/// Writes the config: a server on free ports plus `tables`.
fn config(dir: &Path, tables: &str) -> String {
    let path = dir.join("kvfeed.toml");
    std::fs::write(
        &path,
        format!("[cdc]\nmin-ts-interval = \"100ms\"\n\n{tables}"),
    )
    .expect("write config");
    path.display().to_string()
}

fn table(id: &str, sink_dir: &Path, extra: &str) -> String {
    format!(
        "[[changefeed]]\nid = {id:?}\nsink = \"file://{}\"\n{extra}\n",
        sink_dir.display()
    )
}

/// Records `state` for `id` as the server would, before it starts.
fn seed(data_dir: &Path, id: &str, state: &str) {
    let dir = data_dir.join("changefeeds").join(id);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("admin.json"), format!("{{\"state\":\"{state}\"}}"))
        .expect("seed admin.json");
}

/// `kvfeed changefeed <args> --status-addr <server>`.
fn changefeed(server: &TestServer, args: &[&str]) -> Run {
    let mut all = vec!["changefeed"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--status-addr", server.status_addr()]);
    run_to_end(&all, WAIT)
}

fn ok(run: &Run) -> &str {
    assert_eq!(
        run.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    &run.stdout
}

fn refused(run: &Run, code: u16) -> &str {
    assert_eq!(run.code, Some(1), "stdout:\n{}", run.stdout);
    assert!(
        run.stderr.contains(&format!("HTTP {code}")),
        "{}",
        run.stderr
    );
    &run.stderr
}

fn post(server: &TestServer, path: &str) -> (u16, String) {
    kvfeed_bench::scrape::http_post(server.status_addr(), path, WAIT)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

fn status_json(server: &TestServer, id: &str) -> serde_json::Value {
    let text = ok(&changefeed(server, &["status", id, "--json"])).to_owned();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Runs `attempt` until it returns `Some`, at most [`WAIT`].
fn eventually<T>(what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = attempt() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `id` runs; a failure (with its error) ends the wait.
fn wait_running(server: &TestServer, id: &str) {
    eventually("the changefeed to run", || {
        let s = status_json(server, id);
        assert_ne!(s["state"], "failed", "{s}");
        (s["state"] == "running").then_some(())
    });
}

#[test]
fn paused_changefeeds_are_listed_paused_and_removed_from_the_command_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    seed(&data, "orders", "paused");
    seed(&data, "audit", "paused");
    let tables = table(
        "orders",
        &tmp.path().join("out-orders"),
        "prefix = \"orders/\"",
    ) + &table("audit", &tmp.path().join("out-audit"), "raw = true");
    let config = config(tmp.path(), &tables);
    let mut server = TestServer::start_in_with(&data, &["--config", &config]);

    let list = ok(&changefeed(&server, &["list"])).to_owned();
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("ID "), "{list}");
    assert!(
        lines[0].contains("CHECKPOINT_TS") && lines[0].contains("LAST_ERROR"),
        "{list}"
    );
    assert!(
        lines[1].starts_with("audit ") && lines[1].contains("paused"),
        "{list}"
    );
    assert!(
        lines[2].starts_with("orders ") && lines[2].contains("paused"),
        "{list}"
    );
    let json: serde_json::Value =
        serde_json::from_str(ok(&changefeed(&server, &["list", "--json"]))).expect("JSON list");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");
    assert_eq!(json[1]["admin_state"], "paused");
    assert_eq!(
        json[1]["sink"].as_str().map(|s| s.starts_with("file://")),
        Some(true)
    );

    let status = ok(&changefeed(&server, &["status", "orders"])).to_owned();
    assert!(status.contains("admin state:  paused"), "{status}");
    let err = refused(&changefeed(&server, &["status", "nope"]), 404).to_owned();
    assert!(err.contains("\"nope\""), "{err}");
    let err = run_to_end(
        &[
            "changefeed",
            "status",
            "a/b",
            "--status-addr",
            server.status_addr(),
        ],
        WAIT,
    );
    assert_eq!(err.code, Some(1));
    assert!(
        err.stderr.contains("invalid changefeed id"),
        "{}",
        err.stderr
    );

    // Pausing a paused one is fine.
    let paused = ok(&changefeed(&server, &["pause", "orders"])).to_owned();
    assert!(paused.contains("changefeed orders paused"), "{paused}");

    // The routes and their status codes.
    assert_eq!(server.http_get("/changefeeds").0, 200);
    assert_eq!(server.http_get("/changefeeds/status?id=orders").0, 200);
    assert_eq!(server.http_get("/changefeeds/status?id=nope").0, 404);
    assert_eq!(server.http_get("/changefeeds/status").0, 400);
    assert_eq!(server.http_get("/changefeeds/pause?id=orders").0, 405);
    assert_eq!(post(&server, "/changefeeds/pause?id=orders").0, 200);
    assert_eq!(post(&server, "/changefeeds/pause?id=nope").0, 404);
    assert_eq!(post(&server, "/changefeeds/remove?id=a/b").0, 400);

    // Removal deletes the safe point through PD, which the manager reaches
    // in the background: it may briefly answer 503.
    let removed = eventually("remove to succeed", || {
        let run = changefeed(&server, &["remove", "audit"]);
        (run.code == Some(0)).then_some(run.stdout)
    });
    assert!(removed.contains("changefeed audit removed"), "{removed}");
    assert_eq!(
        post(&server, "/changefeeds/remove?id=audit").0,
        200,
        "idempotent"
    );
    let err = refused(&changefeed(&server, &["resume", "audit"]), 409).to_owned();
    assert!(err.contains("removed"), "{err}");
    assert_eq!(post(&server, "/changefeeds/resume?id=audit").0, 409);
    assert_eq!(status_json(&server, "audit")["admin_state"], "removed");

    // Both decisions survive a restart; the removed one is named in the log.
    server.restart();
    assert_eq!(status_json(&server, "orders")["admin_state"], "paused");
    assert_eq!(status_json(&server, "orders")["state"], "paused");
    assert_eq!(status_json(&server, "audit")["admin_state"], "removed");
    let list = ok(&changefeed(&server, &["list"])).to_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with("audit ") && l.contains("removed")),
        "{list}"
    );
    let exited = server.stop_clean();
    assert!(
        exited.stderr.contains("not started again"),
        "{}",
        exited.stderr
    );
}

#[test]
fn a_server_without_tables_lists_none() {
    let server = TestServer::start();
    let list = ok(&changefeed(&server, &["list"])).to_owned();
    assert!(list.contains("no changefeeds"), "{list}");
    assert_eq!(ok(&changefeed(&server, &["list", "--json"])).trim(), "[]");
    refused(&changefeed(&server, &["pause", "x"]), 404);
}

#[test]
fn bad_tables_refuse_to_start_naming_the_table() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    for (tables, expect) in [
        (table("a/b", &out, ""), "invalid changefeed id"),
        (
            "[[changefeed]]\nid = \"k\"\nsink = \"amqp://b:5672/q\"\n".to_owned(),
            "unknown sink scheme",
        ),
        (table("f", &out, "format = \"avro\""), "unknown format"),
        (
            table("e", &out, "from-key = \"b\"\nto-key = \"a\""),
            "empty",
        ),
        (
            table("p", &out, "prefix = \"a\"\nto-key = \"b\""),
            "prefix cannot be combined",
        ),
        (table("d", &out, "") + &table("d", &out, ""), "same id"),
    ] {
        let config = config(tmp.path(), &tables);
        let mut args = serve_args(&tmp.path().join("data"));
        args.extend(["--config".to_owned(), config]);
        let exited = run_to_exit(&args);
        assert!(!exited.status.success(), "{tables}");
        assert!(
            exited.stderr.contains("[[changefeed]] table"),
            "{tables}: {}",
            exited.stderr
        );
        assert!(
            exited.stderr.contains(expect),
            "{tables}: {}",
            exited.stderr
        );
    }
}

/// Needs the file sink (it runs a changefeed for real).
#[test]
fn a_running_changefeed_is_paused_resumed_and_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let out = tmp.path().join("out");
    let config = config(tmp.path(), &table("orders", &out, "prefix = \"orders/\""));
    let mut server = TestServer::start_in_with(&data, &["--config", &config]);
    let put = |server: &TestServer, key: &str| {
        let run = run_to_end(&["put", "--pd", &server.pd_endpoint(), key, "v"], WAIT);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    };
    let rows_at_least = |server: &TestServer, n: u64| {
        eventually("rows in the sink", || {
            let s = status_json(server, "orders");
            assert_ne!(s["state"], "failed", "{s}");
            (s["state"] == "running" && s["rows_emitted"].as_u64() >= Some(n)).then_some(s)
        })
    };

    wait_running(&server, "orders");
    put(&server, "orders/1");
    put(&server, "other/1");
    let s = rows_at_least(&server, 1);
    assert_eq!(s["rows_emitted"], 1, "only the prefix: {s}");
    assert!(s["lag_ms"].as_u64().is_some(), "{s}");
    let list = ok(&changefeed(&server, &["list"])).to_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with("orders ") && l.contains("running")),
        "{list}"
    );

    let paused = ok(&changefeed(&server, &["pause", "orders"])).to_owned();
    assert!(paused.contains("state: paused"), "{paused}");
    put(&server, "orders/2");
    // Paused across a restart, then resumed from the sink's checkpoint.
    server.restart();
    assert_eq!(status_json(&server, "orders")["state"], "paused");
    ok(&changefeed(&server, &["resume", "orders"]));
    rows_at_least(&server, 1);
    put(&server, "orders/3");
    rows_at_least(&server, 2);
    assert!(std::fs::read_dir(&out).expect("sink dir").next().is_some());

    let removed = ok(&changefeed(&server, &["remove", "orders"])).to_owned();
    assert!(removed.contains("removed"), "{removed}");
    assert_eq!(status_json(&server, "orders")["admin_state"], "removed");
    refused(&changefeed(&server, &["resume", "orders"]), 409);

    // A running changefeed does not hold shutdown up to the grace period.
    ok(&changefeed(&server, &["list"]));
    let started = Instant::now();
    let exited = server.stop_clean();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{}",
        exited.stderr
    );
    assert!(!exited.stderr.contains("grace period"), "{}", exited.stderr);
}

/// Needs the file sink: a running changefeed stops with the server without
/// waiting out the grace period, and runs again after a restart.
#[test]
fn running_changefeeds_stop_promptly_with_the_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let config = config(tmp.path(), &table("all", &tmp.path().join("out"), ""));
    let mut server = TestServer::start_in_with(&data, &["--config", &config]);
    wait_running(&server, "all");
    let started = Instant::now();
    let exited = server.restart();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{}",
        exited.stderr
    );
    assert!(!exited.stderr.contains("grace period"), "{}", exited.stderr);
    wait_running(&server, "all");
    server.stop_clean();
}
