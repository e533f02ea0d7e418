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
//!
//! On etcd (`--target etcd://...`) each connection carries one `Watch`
//! call with one watch of a small range, ready at `created`; etcd's watch
//! stream and watcher gauges play the part of the feed's connection and
//! subscription gauges, and its RSS comes from its own `/metrics`.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::task::JoinSet;

use super::report::Report;
use super::scrape::{CONNECTIONS, SUBSCRIPTIONS, poll_until, scrape};
use super::stats::per_second;
use super::subscribe::{FeedStream, connect};
use super::target::System;
use super::watcher::{INIT_TIMEOUT, WatchPlan};
use super::{BenchError, TargetArgs, check_range, progress, run_prefix, secs};
use kvfeed_client::KeyMode;

const NAME: &str = "idle";
/// How long the gauges may take to show (or drop) the connections.
const SETTLE: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(100);

/// The flags of `kvfeed bench idle`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Each connection uses a file descriptor in the bench and one in the \
                        server; for many connections raise the open-files limit of both shells \
                        first, e.g. `ulimit -n 65536`."
)]
pub struct IdleArgs {
    /// The server under test.
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
    /// The call's request side, kept open (dropping it would half-close).
    _requests: Box<dyn std::any::Any + Send>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The server's gauges of watch connections and of what they watch, with
/// how much one idle connection adds to the second.
struct Gauges {
    /// Report key of the first while all are open.
    key: &'static str,
    connections: &'static str,
    subscriptions: &'static str,
    subscriptions_each: f64,
}

fn gauges(system: &System, watch: &WatchPlan) -> Gauges {
    match system {
        System::Kvfeed(_) => Gauges {
            key: "cdc_connections",
            connections: CONNECTIONS,
            subscriptions: SUBSCRIPTIONS,
            subscriptions_each: watch.regions().unwrap_or(1) as f64,
        },
        #[cfg(feature = "etcd")]
        System::Etcd(_) => Gauges {
            key: "etcd_watch_streams",
            connections: super::etcd::WATCH_STREAMS,
            subscriptions: super::etcd::WATCHERS,
            subscriptions_each: 1.0,
        },
    }
}

/// Runs `kvfeed bench idle`: opens the connections, measures, closes them
/// and checks the feed's gauges return to where they were.
pub async fn run(args: &IdleArgs) -> Result<Report, BenchError> {
    check_range("--connections", args.connections, 1, 100_000)?;
    check_range("--batch", args.batch, 1, 1000)?;
    let system = System::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    let watch = system.watch_plan(KeyMode::Raw, &prefix).await?;
    let gauges = gauges(&system, &watch);
    let metrics = system.metrics_addr();
    let before = scrape(metrics).await?;
    let base_conns = before.require(gauges.connections)?;
    let base_subs = before.require(gauges.subscriptions)?;
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
            let watch = watch.clone();
            opening.spawn(async move { open_idle(&watch).await });
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
    let (conns, subs) = (gauges.connections, gauges.subscriptions);
    let (after, all_there) = poll_until(metrics, SETTLE, POLL_EVERY, |s| {
        s.get(conns) >= Some(base_conns + k)
            && s.get(subs) >= Some(base_subs + k * gauges.subscriptions_each)
    })
    .await?;
    progress(NAME, "closing");
    drop(open);
    let (closed, all_gone) = poll_until(metrics, SETTLE, POLL_EVERY, |s| {
        s.get(conns) == Some(base_conns) && s.get(subs) == Some(base_subs)
    })
    .await?;

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"target": system.name(), "connections": args.connections,
               "batch": args.batch, "regions": watch.regions()}),
    );
    report.text("target", "target", system.name());
    report.int("connections", "connections opened", args.connections as u64);
    report.float(
        "open_per_sec",
        "opened per second",
        per_second(k, secs(opened_in)),
        0,
        "",
    );
    report.opt_float(
        gauges.key,
        &format!("{conns} while open"),
        after.get(conns),
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

/// Opens one connection as `watch` says, waits until it is ready, then
/// leaves a task reading it.
async fn open_idle(watch: &WatchPlan) -> Result<Idle, BenchError> {
    match watch {
        WatchPlan::Kvfeed {
            addr,
            plan,
            checkpoint,
        } => open_idle_feed(addr, plan.registers(*checkpoint)).await,
        #[cfg(feature = "etcd")]
        WatchPlan::Etcd { addr, prefix } => {
            let watcher = super::etcd::EtcdWatcher::open(addr, prefix).await?;
            let (requests, mut responses) = watcher.into_parts();
            let reader =
                tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
            Ok(Idle {
                _requests: Box::new(requests),
                reader,
            })
        }
    }
}

/// Opens one EventFeed call, subscribes, waits for INITIALIZED.
async fn open_idle_feed(
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
        _requests: Box::new(requests),
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
