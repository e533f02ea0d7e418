//! kvfeed's server and command-line tools.
//!
//! The binary (`main.rs`) only parses the command line, sets up logging and
//! dispatches here, so the library exports what the binary and the
//! integration tests use and nothing else: whatever no path reaches is dead
//! code the compiler reports. Module map:
//! - [`cli`]: subcommands and flags; `config` and [`units`]: the TOML file.
//! - `node`: the data directory (lock, cluster id), storage and oracle.
//! - [`serve`]: start-up and shutdown of `kvfeed serve`; `grpc` attaches
//!   the gRPC services (`pd`, `kv`, `changedata`), `status` is the HTTP
//!   status server, `metrics` the Prometheus registry, `shutdown` the
//!   signal tasks stop on, `gc` the GC worker, `split_check` automatic
//!   region split and merge, `health` the standard gRPC health service,
//!   `etcd` the read-only etcd `KV` of PD's address.
//! - `changedata`: the `cdcpb.ChangeData` service over the `kvfeed-cdc`
//!   feed; `faults`: test-only fault injection into it.
//! - `changefeeds`: the `[[changefeed]]` tables run inside `kvfeed serve`,
//!   managed through the status server.
//! - [`cmd`]: `put`, `get`, `delete`, `scan` and `watch`, on `kvfeed-client`.
//! - [`logging`]: the tracing subscriber.

mod admin;
mod changedata;
mod changefeeds;
pub mod cli;
pub mod cmd;
mod config;
mod etcd;
mod faults;
mod gc;
mod grpc;
mod health;
mod kv;
pub mod logging;
mod metrics;
mod node;
mod pd;
pub mod serve;
mod shutdown;
mod split_check;
mod status;
pub use kvfeed_types::units;
