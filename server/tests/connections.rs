//! The gRPC port admits connections instead of just taking them: peers
//! that stall in the HTTP/2 handshake are closed after
//! `server.handshake-timeout`, connections past `server.max-connections`
//! are closed at once, and a normal client is served throughout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use kvfeed_proto::pdpb::GetMembersRequest;
use kvfeed_proto::pdpb::pd_client::PdClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether the server closed `conn` within `limit` (a read sees the end).
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A normal client's call, timed.
async fn served_within(server: &TestServer, limit: Duration) {
    let started = Instant::now();
    let call = async {
        let mut pd = PdClient::new(server.channel().await);
        pd.get_members(GetMembersRequest { header: None })
            .await
            .expect("GetMembers")
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| panic!("a normal client was not served within {limit:?}"));
    assert!(started.elapsed() <= limit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_surplus_connections_are_closed_and_clients_served() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("kvfeed.toml");
    std::fs::write(
        &config,
        "[server]\nmax-connections = 64\nhandshake-timeout = \"700ms\"\n",
    )
    .expect("config");
    let config = config.display().to_string();
    let server = TestServer::start_in_with(&tmp.path().join("data"), &["--config", &config]);

    // Forty peers that stop after half of the HTTP/2 preface.
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let mut conn = TcpStream::connect(server.addr()).await.expect("connect");
        conn.write_all(b"PRI * HTTP/").await.expect("write");
        stalled.push(conn);
    }
    served_within(&server, Duration::from_secs(1)).await;

    // Forty more that send nothing: past the cap of 64 they are closed at
    // once, long before the handshake timeout.
    let mut surplus = Vec::new();
    for _ in 0..40 {
        surplus.push(TcpStream::connect(server.addr()).await.expect("connect"));
    }
    let mut closed_at_once = 0;
    for conn in &mut surplus {
        if closed_within(conn, Duration::from_millis(50)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 10,
        "only {closed_at_once} connections past the cap were closed at once"
    );

    // Every stalled peer is gone after the handshake timeout, and their
    // slots are free again.
    for conn in &mut stalled {
        assert!(
            closed_within(conn, Duration::from_secs(5)).await,
            "a stalled connection outlived the handshake timeout"
        );
    }
    for conn in &mut surplus {
        assert!(closed_within(conn, Duration::from_secs(5)).await);
    }
    served_within(&server, Duration::from_secs(1)).await;
    let (code, _) = server.http_get("/healthz");
    assert_eq!(code, 200);
}
