//! `kvfeed serve`: start-up, the serving phase and shutdown, in that order.
//!
//! Start-up order matters:
//! 1. signal handlers, so a SIGTERM at any later point shuts down cleanly
//!    instead of killing the process;
//! 2. the data-dir lock, so a second server on the same directory fails
//!    before it binds ports or touches the database;
//! 3. both listeners, so the real ports (for port 0) are known;
//! 4. the node (storage, cluster id, oracle), then the gRPC servers, then
//!    the embedded changefeeds (`[[changefeed]]`, which are clients of
//!    those servers and connect in the background), then the status server
//!    (whose routes manage them);
//! 5. the startup line on stdout, which promises that both addresses accept
//!    connections.
//!
//! Shutdown (first SIGINT/SIGTERM, or a server failing): trigger the node's
//! shutdown signal, stop the embedded changefeeds, stop the change feed,
//! wait (bounded by
//! [`SHUTDOWN_GRACE`]) for the servers and every other signal holder, sync
//! the store, then drop the node, which closes the engine and releases the
//! lock last. The feed is stopped before the gRPC server is waited for
//! because its streams are calls in flight: tonic's graceful shutdown waits
//! for them, and stopping the feed is what ends each one (with OK). The
//! embedded changefeeds stop first (each within
//! `changefeeds::JOB_STOP_GRACE`): their feed streams are such
//! calls too, and a changefeed that outlived the feed would only see its
//! streams end and retry against a server going away. A
//! second signal during shutdown exits at once with status 1; the OS
//! releases the lock.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::cli::ServeArgs;
use crate::config::{Config, ConfigError};
use crate::node::{ClusterId, DataDirLock, Endpoints, Node, NodeError};
use crate::shutdown::OsSignals;
use crate::{changefeeds, gc, grpc, split_check, status};

/// How long shutdown waits for connections and tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why `serve` failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the {0} stopped unexpectedly")]
    Stopped(&'static str),
}

/// Runs the server until a shutdown signal; `Ok` means a clean shutdown.
pub fn run(args: &ServeArgs) -> Result<(), ServeError> {
    let config = args.load_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvfeed")
        .build()
        .map_err(ServeError::Runtime)?;
    let (node, result) = runtime.block_on(serve(config));
    // Tasks still running after the grace period are dropped with the
    // runtime; only then can the node's last reference go away.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if let Some(node) = node {
        close(node);
    }
    result
}

/// Returns the node (if it was opened) so that the caller can drop it after
/// the runtime, together with the outcome.
async fn serve(config: Config) -> (Option<Arc<Node>>, Result<(), ServeError>) {
    let mut signals = match OsSignals::install() {
        Ok(signals) => signals,
        Err(err) => return (None, Err(ServeError::Signals(err))),
    };
    let Started {
        node,
        mut grpc_task,
        mut status_task,
        mut changefeeds_task,
    } = match start(config).await {
        Ok(started) => started,
        Err(err) => return (None, Err(err)),
    };

    // A task that already ended must not be awaited again, hence the flags.
    let (mut grpc_ended, mut status_ended) = (false, false);
    let mut result = Ok(());
    tokio::select! {
        name = signals.recv() => tracing::info!(signal = name, "shutting down"),
        ended = &mut grpc_task => {
            grpc_ended = true;
            result = Err(grpc_outcome(ended).err().unwrap_or_else(|| {
                ServeError::Stopped("gRPC server")
            }));
        }
        ended = &mut status_task => {
            status_ended = true;
            result = Err(match ended {
                Ok(()) => ServeError::Stopped("status server"),
                Err(source) => ServeError::Task {
                    what: "status server",
                    source,
                },
            });
        }
    }
    if let Err(err) = &result {
        tracing::error!(%err, "shutting down");
    }
    node.shutdown().trigger();
    tokio::spawn(async move {
        let name = signals.recv().await;
        tracing::error!(signal = name, "second signal during shutdown: exiting now");
        std::process::exit(1);
    });

    // One deadline for everything: the change feed, the gRPC server (its
    // error, if any, is the one to report), then every other holder of a
    // shutdown signal, which includes the status server and its connections.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    // The manager saw the trigger too; it stops its jobs within its own,
    // shorter bound. Their streams to this server close with them.
    if tokio::time::timeout_at(deadline, &mut changefeeds_task)
        .await
        .is_err()
    {
        tracing::warn!("the embedded changefeeds did not stop within the grace period");
        changefeeds_task.abort();
    }
    if let Some(feed) = node.feed()
        && tokio::time::timeout_at(deadline, feed.shutdown())
            .await
            .is_err()
    {
        tracing::warn!("the change feed did not stop within the grace period");
    }
    if !grpc_ended {
        match tokio::time::timeout_at(deadline, &mut grpc_task).await {
            Ok(ended) => {
                if let Err(err) = grpc_outcome(ended)
                    && result.is_ok()
                {
                    result = Err(err);
                }
            }
            Err(_) => {
                tracing::warn!("gRPC connections still open after the grace period");
                grpc_task.abort();
            }
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Err(err) = node.shutdown().wait_for_holders(remaining).await {
        tracing::warn!(%err, "shutting down without waiting further");
    }
    if !status_ended {
        status_task.abort();
    }

    let flushing = Arc::clone(&node);
    match tokio::task::spawn_blocking(move || flushing.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::error!(%err, "final sync failed");
            if result.is_ok() {
                result = Err(err.into());
            }
        }
        Err(err) => tracing::error!(%err, "final sync task failed"),
    }
    (Some(node), result)
}

struct Started {
    node: Arc<Node>,
    grpc_task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    status_task: tokio::task::JoinHandle<()>,
    /// The embedded changefeeds' owner; it ends once its jobs stopped.
    changefeeds_task: tokio::task::JoinHandle<()>,
}

/// Steps 2–5 of the start-up order.
async fn start(config: Config) -> Result<Started, ServeError> {
    let data_dir = config.server.data_dir.clone();
    let lock = blocking(move || DataDirLock::acquire(&data_dir)).await??;
    let mut grpc_listeners = Vec::new();
    for addr in store_addrs(&config.server.addr, config.server.stores) {
        grpc_listeners.push(bind("gRPC", &addr).await?);
    }
    let status_listener = bind("status", &config.server.status_addr).await?;
    let addrs = grpc_listeners
        .iter()
        .map(|l| local_addr("gRPC", l))
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints = Endpoints::new(&config, &addrs, local_addr("status", &status_listener)?);
    let node = Arc::new(blocking(move || Node::open(config, lock, endpoints)).await??);
    // Before the router: the ChangeData service serves from the running feed.
    node.start_feed()?;

    // Holds its own shutdown signal, so shutdown waits for a pass in flight.
    gc::GcWorker::for_node(&node)
        .map_err(NodeError::from)?
        .spawn(node.shutdown().subscribe());
    split_check::SplitChecker::for_node(&node)?.spawn(node.shutdown().subscribe());
    // One server per store endpoint; the task ends when all have (or the
    // first fails).
    let kv = crate::kv::KvService::new(Arc::clone(&node)).map_err(NodeError::from)?;
    let mut servers = tokio::task::JoinSet::new();
    let server_config = &node.config().server;
    let admission = grpc::Admission {
        max_connections: match server_config.max_connections {
            0 => grpc::default_max_connections(),
            n => n,
        },
        handshake_timeout: server_config.handshake_timeout.as_duration(),
    };
    tracing::debug!(?admission, "gRPC connection admission");
    for (listener, store) in grpc_listeners.into_iter().zip(node.endpoints().store_ids()) {
        let router = grpc::grpc_router(&node, kv.for_store(store)).map_err(NodeError::from)?;
        servers.spawn(grpc::serve(
            router,
            listener,
            admission,
            node.shutdown().subscribe(),
        ));
    }
    let grpc_task = tokio::spawn(async move {
        while let Some(ended) = servers.join_next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                // A server task that panicked: surface it as this task's.
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => {}
            }
        }
        Ok(())
    });
    // After the gRPC servers: the changefeeds connect to them (in the
    // background, retrying, so nothing here waits for them).
    let (changefeeds, changefeeds_task) = changefeeds::start(
        &node.config().changefeed,
        node.data_dir(),
        node.endpoints().advertise_addr.clone(),
        node.shutdown().subscribe(),
    );
    let status_task = tokio::spawn(status::serve(
        status_listener,
        changefeeds::routes(status::routes(&node), &changefeeds),
        node.shutdown().subscribe(),
    ));

    let endpoints = node.endpoints();
    let mut line = startup_line(
        endpoints.addr,
        endpoints.status_addr,
        node.cluster_id(),
        node.data_dir(),
    );
    if endpoints.stores.len() > 1 {
        // Before data_dir, which runs to the end of the line.
        let stores: Vec<String> = endpoints
            .stores
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        line = line.replacen(
            " data_dir=",
            &format!(" stores={} data_dir=", stores.join(",")),
            1,
        );
    }
    announce(&line);
    tracing::info!(
        addr = %endpoints.addr,
        advertise_addr = %endpoints.advertise_addr,
        status_addr = %endpoints.status_addr,
        cluster_id = %node.cluster_id(),
        "serving"
    );
    Ok(Started {
        node,
        grpc_task,
        status_task,
        changefeeds_task,
    })
}

/// The line printed on stdout once both servers accept connections.
/// `data_dir` comes last and runs to the end of the line, so a path with
/// spaces stays parsable.
pub fn startup_line(
    addr: SocketAddr,
    status_addr: SocketAddr,
    cluster_id: ClusterId,
    data_dir: &Path,
) -> String {
    format!(
        "kvfeed listening addr={addr} status={status_addr} cluster_id={cluster_id} data_dir={}",
        data_dir.display()
    )
}

fn announce(line: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (nobody reading) is not a reason to stop serving.
    if let Err(err) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        tracing::warn!(%err, "cannot print the startup line");
    }
}

/// Drops the node's last reference: the engine closes (and syncs), then the
/// data-dir lock is released.
fn close(node: Arc<Node>) {
    match Arc::try_unwrap(node) {
        Ok(node) => {
            drop(node);
            tracing::info!("stopped");
        }
        // Something leaked a reference past the runtime; the OS closes the
        // files and releases the lock when the process exits right after.
        Err(node) => tracing::warn!(
            references = Arc::strong_count(&node),
            "node still referenced at exit"
        ),
    }
}

/// The listen addresses of stores 1..=`stores`: `addr`, then its port
/// counting up (every store on a free port when `addr` asks for port 0).
/// The configuration was validated, so the ports fit.
fn store_addrs(addr: &str, stores: u64) -> Vec<String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return vec![addr.to_owned()];
    };
    let port: u64 = port.parse().unwrap_or(0);
    (0..stores.max(1))
        .map(|k| match (k, port) {
            (0, _) => addr.to_owned(),
            (_, 0) => format!("{host}:0"),
            (k, port) => format!("{host}:{}", port + k),
        })
        .collect()
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(what: &'static str, listener: &TcpListener) -> Result<SocketAddr, ServeError> {
    listener.local_addr().map_err(|source| ServeError::Bind {
        what,
        addr: "(bound socket)".to_owned(),
        source,
    })
}

/// Runs blocking start-up work (file locks, fsync) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ServeError::Task {
            what: "start-up",
            source,
        })
}

fn grpc_outcome(
    ended: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServeError> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(ServeError::Grpc(err)),
        Err(source) => Err(ServeError::Task {
            what: "gRPC server",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_line_names_everything() {
        let line = startup_line(
            ([127, 0, 0, 1], 41_234).into(),
            ([127, 0, 0, 1], 41_235).into(),
            ClusterId::new(42).expect("non-zero"),
            Path::new("/data/with space"),
        );
        assert_eq!(
            line,
            "kvfeed listening addr=127.0.0.1:41234 status=127.0.0.1:41235 \
             cluster_id=42 data_dir=/data/with space"
        );
    }
}
