//! The standard gRPC health service (`grpc.health.v1.Health`) on the gRPC
//! address, which is also the PD address: client-go's PD client calls
//! `Check` to judge members, and load balancers probe it too.
//!
//! Invariants:
//! - While the node serves, the server as a whole (service name `""`) and
//!   each served service (`pdpb.PD`, `tikvpb.Tikv`, `cdcpb.ChangeData`,
//!   `etcdserverpb.KV`)
//!   report `SERVING`; any other name is `NOT_FOUND`, as the protocol says.
//! - At shutdown every status is removed, which ends open `Watch` streams.
//!   Without that they would live on and hold the server's graceful
//!   shutdown until its grace period ran out (see [`crate::grpc`]).

use std::sync::Arc;

use kvfeed_proto::{cdcpb, etcdserverpb, pdpb, tikvpb};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::node::Node;

/// The services kvfeed serves, by their gRPC names.
pub const SERVICES: [&str; 4] = [
    pdpb::pd_server::SERVICE_NAME,
    tikvpb::tikv_server::SERVICE_NAME,
    cdcpb::change_data_server::SERVICE_NAME,
    etcdserverpb::kv_server::SERVICE_NAME,
];

/// The health service of `node`. Must be called inside a Tokio runtime: a
/// small task keeps the statuses and clears them at shutdown.
pub fn service(node: &Arc<Node>) -> HealthServer<impl Health> {
    let (mut reporter, server) = tonic_health::server::health_reporter();
    let mut shutdown = node.shutdown().subscribe();
    tokio::spawn(async move {
        for name in SERVICES {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        shutdown.recv().await;
        // Removing a status drops its sender, which ends its Watch streams.
        for name in std::iter::once("").chain(SERVICES) {
            reporter.clear_service_status(name).await;
        }
    });
    server
}
