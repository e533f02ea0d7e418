//! The standard gRPC health service on the PD address, called with the
//! `grpc.health.v1` client the `tonic-health` crate generates: what
//! client-go's PD client checks, and that an open Watch does not hold up
//! shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::TestServer;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

fn serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_serving_and_watch_ends_at_shutdown() {
    let server = TestServer::start();
    let mut client = HealthClient::new(server.channel().await);
    for name in ["", "pdpb.PD", "tikvpb.Tikv", "cdcpb.ChangeData"] {
        let answer = client.check(request(name)).await.expect("Check");
        assert_eq!(answer.into_inner(), serving(), "service {name:?}");
    }
    let status = client
        .check(request("no.Such"))
        .await
        .expect_err("an unknown service");
    assert_eq!(status.code(), tonic::Code::NotFound);

    let mut watch = client.watch(request("")).await.expect("Watch").into_inner();
    let first = watch.message().await.expect("healthy").expect("a status");
    assert_eq!(first, serving());

    // Shutdown ends the Watch stream instead of waiting for it.
    server.stop_without_grace().await;
    assert!(
        !matches!(watch.message().await, Ok(Some(_))),
        "no status after shutdown"
    );
}
