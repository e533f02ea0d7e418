//! kvfeed's server and command-line tools.
//!
//! The binary (`main.rs`) only parses the command line, sets up logging and
//! dispatches here. Module map:
//! - [`cli`]: subcommands and flags; [`config`] and [`units`]: the TOML file.
//! - [`node`]: the data directory (lock, cluster id), storage and oracle.
//! - [`serve`]: start-up and shutdown of `kvfeed serve`; [`grpc`] attaches
//!   the gRPC services, [`status`] is the HTTP status server, [`metrics`] the
//!   Prometheus registry, [`shutdown`] the signal tasks stop on, [`health`]
//!   the standard gRPC health service.
//! - [`changedata`]: the `cdcpb.ChangeData` service over the `kvfeed-cdc` feed.
//! - [`logging`]: the tracing subscriber.
//! - [`mod@bench`]: `kvfeed bench`, measurements of a running server's feed.

pub mod bench;
pub mod changedata;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
/// The old path of [`changedata::MAX_EVENT_SIZE`], through which `kvfeed
/// watch` and the benchmarks still size their decoders.
#[doc(hidden)]
pub mod feed {
    pub use crate::changedata::MAX_EVENT_SIZE;
}
pub mod gc;
pub mod grpc;
pub mod health;
pub mod kv;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod pd;
pub mod serve;
pub mod shutdown;
pub mod status;
pub mod units;
