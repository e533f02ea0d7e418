//! The gRPC server: the one place where services are attached.
//!
//! [`grpc_router`] builds tonic's router from the node; each service (PD, KV,
//! ChangeData) is one `add_service` call there. With no service attached the
//! server still listens and answers every call with `UNIMPLEMENTED`, so the
//! address is taken and reported from the first version on.
//!
//! Shutdown: when the node's shutdown signal fires, tonic stops accepting,
//! sends GOAWAY on open connections and waits for in-flight calls. Streaming
//! services must therefore end their streams on the same signal (each holds
//! its own [`crate::shutdown::ShutdownSignal`], or, for the change feed,
//! `serve` stops the feed right after triggering it), or the wait lasts
//! until the grace period in `serve` runs out. A peer that ignores GOAWAY
//! also holds the wait until then (a real client closes at once); one that
//! never completes the HTTP/2 handshake is closed by the accept loop
//! ([`incoming`]) after `server.handshake-timeout`.

mod incoming;

use std::sync::Arc;
use std::time::Duration;

pub use incoming::{Admission, default_max_connections};

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::Router;

use crate::kv::KvService;
use crate::metrics::MetricsError;
use crate::node::Node;
use crate::shutdown::ShutdownSignal;

/// HTTP/2 keepalive ping interval and timeout: a client that vanished
/// without closing its connection (a killed changefeed) is noticed within
/// about 13 s and its streams are torn down. TiKV uses the same values.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The gRPC router with every service of `node` attached. Fails if a
/// service's metrics cannot be registered in the node's registry. Must be
/// called inside a Tokio runtime (the health service keeps a task).
///
/// `store_id` is the store this endpoint serves: the KV and ChangeData
/// services answer for the regions it leads. PD answers the same on every
/// endpoint.
pub fn grpc_router(node: &Arc<Node>, kv: KvService) -> Result<Router, MetricsError> {
    let store_id = kv.store_id();
    let mut routes = Routes::builder();
    routes.add_service(crate::kv::service(kv));
    routes.add_service(crate::pd::service(node));
    routes.add_service(crate::changedata::service(node, store_id));
    routes.add_service(crate::health::service(node));
    routes.add_service(crate::etcd::service(node));
    Ok(Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes.routes()))
}

/// Serves `router` on the already bound `listener` until `shutdown` fires
/// and every connection has closed; connections are admitted as
/// [`incoming`] describes.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    admission: Admission,
    mut shutdown: ShutdownSignal,
) -> Result<(), tonic::transport::Error> {
    let incoming = ReceiverStream::new(incoming::admit(listener, admission));
    router
        .serve_with_incoming_shutdown(incoming, async move { shutdown.recv().await })
        .await
}
