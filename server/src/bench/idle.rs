//! `kvfeed bench idle`: what an idle subscriber costs the server.
//!
//! `--connections` feed connections are opened, each on its own TCP
//! connection (so the figure includes everything a real idle client
//! costs: socket, HTTP/2 state, the feed's connection and one
//! subscription), in parallel batches of `--batch`. Each subscribes to a
//! small key range from now and waits for INITIALIZED; a task per
//! connection then keeps reading (resolved timestamps keep arriving), so
//! nothing piles up on the server because of the client. Once the feed's
//! gauges show them all, RSS per connection = (RSS after − RSS before) / K,
//! both read from the server's own `/metrics`.
//!
//! Each connection needs a file descriptor in the bench and one in the
//! server: at the open-files limit the run stops with an error that says
//! so (raise it with `ulimit -n`).

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::task::JoinSet;

use super::load::prefix_end;
use super::report::Report;
use super::scrape::{CONNECTIONS, SUBSCRIPTIONS, poll_until, scrape};
use super::stats::per_second;
use super::subscribe::{FeedStream, Plan, connect};
use super::watcher::INIT_TIMEOUT;
use super::{BenchError, Server, TargetArgs, check_range, progress, run_prefix, secs};
use crate::client::KeyMode;

const NAME: &str = "idle";
/// How long the gauges may take to show (or drop) the connections.
const SETTLE: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Each connection uses a file descriptor in the bench and one in the \
                        server; for many connections raise the open-files limit of both shells \
                        first, e.g. `ulimit -n 65536`."
)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Idle connections to open, each with one subscription.
    #[arg(long, value_name = "K", default_value_t = 1000)]
    pub connections: usize,

    /// Connections opened at the same time.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub batch: usize,
}

/// One open idle connection: dropping it closes it.
struct Idle {
    _requests: tokio::sync::mpsc::Sender<kvfeed_proto::cdcpb::ChangeDataRequest>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

pub async fn run(args: &IdleArgs) -> Result<Report, BenchError> {
    check_range("--connections", args.connections, 1, 100_000)?;
    check_range("--batch", args.batch, 1, 1000)?;
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    let plan = Plan::new(&server, KeyMode::Raw, &prefix, &prefix_end(&prefix)).await?;
    let checkpoint = server.cluster.tso().await?.into_inner();
    let before = scrape(&server.status).await?;
    let base_conns = before.require(CONNECTIONS)?;
    let base_subs = before.require(SUBSCRIPTIONS)?;
    progress(
        NAME,
        &format!(
            "opening {} connections, {} at a time",
            args.connections, args.batch
        ),
    );
    let started = Instant::now();
    let mut open = Vec::with_capacity(args.connections);
    while open.len() < args.connections {
        let batch = args.batch.min(args.connections - open.len());
        let mut opening = JoinSet::new();
        for _ in 0..batch {
            let addr = server.feed_addr().to_owned();
            let register = plan.registers(checkpoint);
            opening.spawn(async move { open_idle(&addr, register).await });
        }
        while let Some(done) = opening.join_next().await {
            let idle = done.map_err(|e| BenchError::Feed(format!("an open task failed: {e}")))?;
            match idle {
                Ok(idle) => open.push(idle),
                Err(e) if is_open_files_limit(&e) => {
                    return Err(BenchError::OpenFiles {
                        opened: open.len(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    return Err(BenchError::Feed(format!(
                        "connection {} of {} failed: {e}",
                        open.len() + 1,
                        args.connections
                    )));
                }
            }
        }
    }
    let opened_in = started.elapsed();
    let k = open.len() as f64;
    let subs_each = plan.subs.len() as f64;
    let (after, all_there) = poll_until(&server.status, SETTLE, POLL_EVERY, |s| {
        s.get(CONNECTIONS) >= Some(base_conns + k)
            && s.get(SUBSCRIPTIONS) >= Some(base_subs + k * subs_each)
    })
    .await?;
    progress(NAME, "closing");
    drop(open);
    let (closed, all_gone) = poll_until(&server.status, SETTLE, POLL_EVERY, |s| {
        s.get(CONNECTIONS) == Some(base_conns) && s.get(SUBSCRIPTIONS) == Some(base_subs)
    })
    .await?;

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"connections": args.connections, "batch": args.batch, "regions": plan.subs.len()}),
    );
    report.int("connections", "connections opened", args.connections as u64);
    report.float(
        "open_per_sec",
        "opened per second",
        per_second(k, secs(opened_in)),
        0,
        "",
    );
    report.opt_float(
        "cdc_connections",
        "kvfeed_cdc_connections while open",
        after.get(CONNECTIONS),
        0,
        "",
    );
    report.bytes("server_rss_before_bytes", "server RSS before", before.rss());
    report.bytes(
        "server_rss_open_bytes",
        "server RSS with all open",
        after.rss(),
    );
    report.bytes(
        "server_rss_closed_bytes",
        "server RSS after closing",
        closed.rss(),
    );
    let per_conn = match (before.rss(), after.rss()) {
        (Some(b), Some(a)) => Some((a - b) / k),
        _ => None,
    };
    report.opt_float(
        "rss_per_connection_kib",
        "server RSS per connection",
        per_conn.map(|b| b / 1024.0),
        1,
        "KiB",
    );
    if !all_there {
        report.fail(format!(
            "the server's gauges did not show all {} connections within {SETTLE:?}",
            args.connections
        ));
    }
    if !all_gone {
        report.fail(format!(
            "connections or subscriptions stayed above their earlier values for {SETTLE:?} \
             after closing"
        ));
    }
    Ok(report)
}

/// Opens one connection, subscribes, waits for INITIALIZED, then leaves a
/// task reading it.
async fn open_idle(
    addr: &str,
    registers: Vec<kvfeed_proto::cdcpb::ChangeDataRequest>,
) -> Result<Idle, BenchError> {
    let subs = registers.len();
    let mut stream = FeedStream::open(connect(addr).await?).await?;
    stream.send_all(registers).await?;
    let mut initialized = 0;
    let waiting = async {
        while initialized < subs {
            let Some(event) = stream.next().await? else {
                return Err(BenchError::Feed(
                    "the stream ended before INITIALIZED".to_owned(),
                ));
            };
            super::subscribe::for_each_item(event, |item| {
                if let super::subscribe::Item::Row { row, .. } = item
                    && row.r#type == kvfeed_proto::cdcpb::event::LogType::Initialized as i32
                {
                    initialized += 1;
                }
            });
        }
        Ok(())
    };
    tokio::time::timeout(INIT_TIMEOUT, waiting)
        .await
        .map_err(|_| BenchError::Feed(format!("no INITIALIZED within {INIT_TIMEOUT:?}")))??;
    let FeedStream {
        requests,
        mut events,
    } = stream;
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = events.message().await {} });
    Ok(Idle {
        _requests: requests,
        reader,
    })
}

/// Whether `error` is the open-files limit (EMFILE / ENFILE), in the
/// bench or, seen as a refused or reset connection, in the server.
fn is_open_files_limit(error: &BenchError) -> bool {
    let text = error.to_string();
    text.contains("os error 24")
        || text.contains("os error 23")
        || text.contains("Too many open files")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_recognised() {
        let limit = BenchError::Connect {
            addr: "127.0.0.1:1".to_owned(),
            reason: "transport error: Too many open files (os error 24)".to_owned(),
        };
        assert!(is_open_files_limit(&limit));
        let refused = BenchError::Connect {
            addr: "127.0.0.1:1".to_owned(),
            reason: "Connection refused (os error 111)".to_owned(),
        };
        assert!(!is_open_files_limit(&refused));
        let text = BenchError::OpenFiles {
            opened: 1017,
            reason: limit.to_string(),
        }
        .to_string();
        assert!(
            text.contains("1017") && text.contains("ulimit -n"),
            "{text}"
        );
    }
}
