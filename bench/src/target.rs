//! Which system a benchmark drives: kvfeed (the default) or, to compare
//! the two, etcd (`--target etcd://HOST:PORT`, with the `etcd` feature).
//!
//! `feed`, `churn` and `idle` measure the same things on both: they ask a
//! [`System`] for writers ([`Backend`]) and for watchers
//! ([`WatchPlan`]), and everything after that — stamping values, exact
//! sets of seen puts, loss and duplicate counts, draining, percentiles,
//! the report — is one code path. What differs is kept to the edges: how
//! a put is sent, how a watch is opened and read, and which of the
//! server's own metrics say how much memory and CPU it used and whether
//! everything was released.
//!
//! The etcd code is compiled only with the `etcd` feature, so a default
//! build carries none of it; `--target etcd://...` is still parsed
//! there, so that such a build can say what is missing instead of
//! rejecting the flag as unknown.

use std::sync::Arc;

use super::load::{Backend, prefix_end};
use super::subscribe::Plan;
use super::watcher::WatchPlan;
use super::{BenchError, Server, TargetArgs};
use kvfeed_client::KeyMode;

/// What a build without the `etcd` feature says to `--target etcd://...`.
pub const NO_ETCD: &str = "this kvfeed was built without the `etcd` feature; rebuild with \
                           `cargo build --release --features etcd`";

/// The system `--target` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// The kvfeed server at `--pd` / `--status`.
    Kvfeed,
    /// An etcd member's client URL, `HOST:PORT` (gRPC and `/metrics`
    /// share it).
    Etcd {
        /// `HOST:PORT`, without the scheme or a trailing `/`.
        addr: String,
    },
}

/// Parses `kvfeed` or `etcd://HOST:PORT`.
pub fn parse_target(text: &str) -> Result<TargetKind, String> {
    let text = text.trim();
    if text == "kvfeed" {
        return Ok(TargetKind::Kvfeed);
    }
    let Some(addr) = text.strip_prefix("etcd://") else {
        return Err(format!(
            "unknown target {text:?} (expected `kvfeed` or `etcd://HOST:PORT`)"
        ));
    };
    let addr = addr.trim_end_matches('/');
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        && !addr.contains('/');
    if valid {
        Ok(TargetKind::Etcd {
            addr: addr.to_owned(),
        })
    } else {
        Err(format!("{text:?} is not etcd://HOST:PORT"))
    }
}

/// A connected system under test.
pub enum System {
    /// A kvfeed server: PD, its store and its status server.
    Kvfeed(Server),
    /// An etcd member, reached on its client URL.
    #[cfg(feature = "etcd")]
    Etcd(super::etcd::Etcd),
}

impl System {
    /// Connects to what `target` names, refusing remote addresses unless
    /// allowed, and reads its `/metrics` once so a wrong address fails
    /// now rather than after the load.
    pub async fn connect(target: &TargetArgs) -> Result<System, BenchError> {
        match &target.target {
            TargetKind::Kvfeed => Ok(System::Kvfeed(Server::connect(target).await?)),
            TargetKind::Etcd { addr } => connect_etcd(addr, target.allow_remote).await,
        }
    }

    /// `kvfeed` or `etcd`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            System::Kvfeed(_) => "kvfeed",
            #[cfg(feature = "etcd")]
            System::Etcd(_) => "etcd",
        }
    }

    /// Where the server's `/metrics` is.
    pub fn metrics_addr(&self) -> &str {
        match self {
            System::Kvfeed(server) => &server.status,
            #[cfg(feature = "etcd")]
            System::Etcd(etcd) => etcd.addr(),
        }
    }

    /// Where watch streams connect: kvfeed's store, or etcd's client URL.
    pub fn stream_addr(&self) -> &str {
        match self {
            System::Kvfeed(server) => server.feed_addr(),
            #[cfg(feature = "etcd")]
            System::Etcd(etcd) => etcd.addr(),
        }
    }

    /// Whether the target is kvfeed, which has checks etcd lacks (the
    /// feed's gauges, resolved ts, `congested`).
    pub fn is_kvfeed(&self) -> bool {
        matches!(self, System::Kvfeed(_))
    }

    /// Writers for keys under `prefix`.
    pub async fn writer(&self, mode: KeyMode, prefix: &[u8]) -> Result<Backend, BenchError> {
        match self {
            System::Kvfeed(server) => Backend::kvfeed(server, mode, prefix).await,
            #[cfg(feature = "etcd")]
            System::Etcd(etcd) => Ok(Backend::Etcd(etcd.writer())),
        }
    }

    /// How to open watchers of every key under `prefix`, from now: on
    /// kvfeed, subscriptions to every region of the range from a fresh
    /// timestamp; on etcd, one watch of `[prefix, prefix_end)` from the
    /// next revision.
    pub async fn watch_plan(&self, mode: KeyMode, prefix: &[u8]) -> Result<WatchPlan, BenchError> {
        match self {
            System::Kvfeed(server) => {
                let plan = Plan::new(server, mode, prefix, &prefix_end(prefix)).await?;
                let checkpoint = server.cluster.tso().await?.into_inner();
                Ok(WatchPlan::Kvfeed {
                    addr: server.feed_addr().to_owned(),
                    plan: Arc::new(plan),
                    checkpoint,
                })
            }
            #[cfg(feature = "etcd")]
            System::Etcd(etcd) => Ok(WatchPlan::Etcd {
                addr: etcd.addr().to_owned(),
                prefix: prefix.to_vec(),
            }),
        }
    }
}

#[cfg(feature = "etcd")]
async fn connect_etcd(addr: &str, allow_remote: bool) -> Result<System, BenchError> {
    Ok(System::Etcd(
        super::etcd::Etcd::connect(addr, allow_remote).await?,
    ))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(_addr: &str, _allow_remote: bool) -> Result<System, BenchError> {
    Err(BenchError::Usage(NO_ETCD.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_kvfeed_or_an_etcd_address() {
        assert_eq!(parse_target("kvfeed"), Ok(TargetKind::Kvfeed));
        assert_eq!(
            parse_target("etcd://127.0.0.1:2379"),
            Ok(TargetKind::Etcd {
                addr: "127.0.0.1:2379".to_owned()
            })
        );
        assert_eq!(
            parse_target("etcd://[::1]:2379/"),
            Ok(TargetKind::Etcd {
                addr: "[::1]:2379".to_owned()
            })
        );
        for bad in [
            "etcd",
            "etcd://",
            "etcd://host",
            "etcd://:1",
            "etcd://h:x",
            "etcd://h:1/v3",
            "http://h:1",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
