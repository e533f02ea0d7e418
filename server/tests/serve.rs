//! End-to-end tests of `kvfeed serve`: the real binary on loopback, with
//! port 0 for both listeners and the bound ports read from the startup line
//! (see `common` for the harness).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::net::TcpStream;
use std::path::Path;

use common::{TestServer, canonical, run_to_exit, serve_args};

#[test]
fn serves_status_endpoints_and_stops_cleanly_on_sigterm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let mut server = TestServer::start_in(&dir);
    assert_eq!(
        Path::new(server.field("data_dir")),
        canonical(&dir),
        "the data dir was created and is reported"
    );

    assert_eq!(server.http_get("/healthz"), (200, "ok\n".to_owned()));
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("kvfeed_build_info{version="), "{metrics}");
    assert!(metrics.contains("kvfeed_uptime_seconds"), "{metrics}");
    assert_eq!(server.http_get("/no/such/page").0, 404);

    let info = server.debug_node();
    assert_eq!(
        info["cluster_id"]
            .as_u64()
            .map(|id| id.to_string())
            .as_deref(),
        Some(server.field("cluster_id"))
    );
    assert!(info["last_ts"].as_u64().is_some_and(|ts| ts > 0), "{info}");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["data_dir"], server.field("data_dir"));
    assert_eq!(info["addr"], server.field("addr"));

    // The gRPC address speaks HTTP/2: a real client connects. It and an idle
    // status connection stay open across the shutdown and must not hold it
    // up until the grace period runs out. The client runs on its own worker
    // thread so it answers the server's GOAWAY while this thread waits.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    let _channel = runtime.block_on(server.channel());
    let _idle_status = TcpStream::connect(server.status_addr()).expect("status port accepts");

    let exited = server.stop("TERM");
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    assert!(exited.stderr.contains("shutting down"), "{}", exited.stderr);
    assert!(!exited.stderr.contains("grace period"), "{}", exited.stderr);
}

#[test]
fn second_server_on_the_same_dir_fails_fast() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let mut first = TestServer::start_in(&dir);

    let second = run_to_exit(&serve_args(&dir));
    assert!(!second.status.success(), "second server must fail");
    let dir_text = canonical(&dir).display().to_string();
    assert!(second.stderr.contains(&dir_text), "{}", second.stderr);
    assert!(second.stderr.contains("lock"), "{}", second.stderr);

    // The first server is unaffected.
    assert_eq!(first.http_get("/healthz").0, 200);
    let exited = first.stop("TERM");
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
}

#[test]
fn restart_keeps_the_cluster_id_and_moves_time_forward() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");

    let mut first = TestServer::start_in(&dir);
    let before = first.debug_node();
    let exited = first.stop("INT");
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);

    // Starting again also proves the lock was released.
    let mut second = TestServer::start_in(&dir);
    let after = second.debug_node();
    assert_eq!(after["cluster_id"], before["cluster_id"]);
    let (ts_before, ts_after) = (before["last_ts"].as_u64(), after["last_ts"].as_u64());
    assert!(
        ts_before.is_some() && ts_after > ts_before,
        "last_ts must grow across a restart: {ts_before:?} -> {ts_after:?}"
    );
    let exited = second.stop("TERM");
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
}

#[test]
fn config_file_is_used_and_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("from-file");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\naddr = \"127.0.0.1:0\"\nstatus-addr = \"127.0.0.1:0\"\ndata-dir = {:?}\n\
             [cdc]\nmin-ts-interval = \"100ms\"\n",
            dir.display().to_string()
        ),
    )
    .expect("write config");
    let args = [
        "serve".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    let mut server = TestServer::start_args(args.to_vec());
    assert_eq!(Path::new(server.field("data_dir")), canonical(&dir));
    let exited = server.stop("TERM");
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);

    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"1s\"\nbogus-key = 1\n")
        .expect("write config");
    let failed = run_to_exit(&args);
    assert!(!failed.status.success());
    assert!(failed.stderr.contains("bogus-key"), "{}", failed.stderr);

    std::fs::write(&config, "[cdc]\nmin-ts-interval = \"5ms\"\n").expect("write config");
    let failed = run_to_exit(&args);
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains("cdc.min-ts-interval"),
        "{}",
        failed.stderr
    );
}

#[test]
fn harness_restarts_on_the_same_dir_and_can_keep_the_port() {
    let mut server = TestServer::start_restartable(&[]);
    let dir = server.data_dir();
    let cluster_id = server.cluster_id();

    server.restart();
    assert_eq!(server.data_dir(), dir);
    assert_eq!(server.cluster_id(), cluster_id);

    let port = server.port();
    server.restart_same_port();
    assert_eq!(server.port(), port);
    assert_eq!(server.pd_endpoint(), format!("127.0.0.1:{port}"));
    assert_eq!(server.cluster_id(), cluster_id);
    assert_eq!(server.http_get("/healthz").0, 200);
    server.stop_clean();
}
