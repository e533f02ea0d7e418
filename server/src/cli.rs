//! The command line: `kvfeed <subcommand> [flags]`.
//!
//! Each subcommand is one [`Command`] variant with its own argument struct, so
//! a new tool (`put`, `get`, `scan`, `watch`, `bench`) is a new variant plus a
//! dispatch arm in `main`. Flags that every subcommand shares (logging) live
//! on [`Cli`] and are `global`, so they may be written after the subcommand.
//!
//! Flags that override the config file are `Option`s without a clap default:
//! only a flag the user actually typed may override the file. The defaults
//! shown in `--help` are those of the `config` module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError};

/// kvfeed: a transactional key-value store with a TiKV-compatible change feed.
#[derive(Debug, Parser)]
#[command(name = "kvfeed", version, propagate_version = true)]
pub struct Cli {
    /// Log filter, e.g. `info`, `debug`, `kvfeed=debug,info`. The RUST_LOG
    /// environment variable, when set, takes precedence.
    #[arg(long, global = true, value_name = "FILTER", default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: PD, KV and ChangeData gRPC services plus an HTTP
    /// status server.
    Serve(ServeArgs),
    /// Set a key to a value (transactional unless --raw); prints OK.
    Put(crate::cmd::kv::PutArgs),
    /// Print the value of a key: as it is when valid UTF-8, else with
    /// non-printable bytes escaped as \xNN (hex with --hex).
    ///
    /// A missing key prints nothing on stdout and exits with status 1 and
    /// `kvfeed: key not found` on stderr.
    Get(crate::cmd::kv::GetArgs),
    /// Delete a key (transactional unless --raw); prints OK, also when the
    /// key did not exist.
    Delete(crate::cmd::kv::DeleteArgs),
    /// Print the pairs of a key range in key order, one `key = value` line
    /// each (keys and values escaped), across all regions.
    ///
    /// Without --prefix, --from or --to the whole key space is scanned
    /// (still subject to --limit).
    Scan(crate::cmd::kv::ScanArgs),
    /// Print every change to a key, a prefix or a range as it is committed,
    /// one line per change (like `etcdctl watch`), until Ctrl-C.
    ///
    /// `PUT key value  ts=<commit ts> (<UTC time>)` or
    /// `DELETE key  ts=...`; with --json one object per line. Without KEY,
    /// --prefix, --from-key or --to-key every key is watched. A `watching`
    /// line on stderr says when every subscription is in place.
    Watch(crate::cmd::watch::WatchArgs),
    /// Measure a running server's change feed: throughput and latency
    /// (feed), catch-up scans (scan), connection churn (churn), memory per
    /// idle connection (idle), a stalled consumer (slow), and the physical
    /// limits beneath them (engine).
    ///
    /// Each prints a table, then one JSON object on the last line of
    /// stdout; progress goes to stderr. A correctness failure (a lost or
    /// duplicated event, a gauge left above 0) exits with status 1.
    Bench(kvfeed_bench::BenchArgs),
    /// Change a running server's region layout (split, merge, move a
    /// leader) or print it, through its status address.
    Admin(crate::cmd::admin::AdminArgs),
    /// Deliver the changes of a key range into a sink (files, a webhook)
    /// exactly once, in commit order, whole transactions together.
    Changefeed(crate::cmd::changefeed::ChangefeedArgs),
    /// Check that a changefeed's sink holds exactly the store's history up
    /// to its checkpoint: every change once, in commit order, transactions
    /// whole. Exits with status 1 on any problem.
    Verify(crate::cmd::verify::VerifyArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data directory [default: ./kvfeed-data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// gRPC listen address; port 0 picks a free port [default: 127.0.0.1:20160]
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: Option<String>,

    /// Address advertised to clients [default: the bound --addr]
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise_addr: Option<String>,

    /// HTTP status listen address [default: 127.0.0.1:20180]
    #[arg(long, value_name = "HOST:PORT")]
    pub status_addr: Option<String>,

    /// Store endpoints to serve, each on its own port from --addr's upward
    /// (a test aid: consumers meet a cluster's routing failures) [default: 1]
    #[arg(long, value_name = "N")]
    pub stores: Option<u64>,

    /// Test-only: lets `/debug/fault/feed` inject feed faults.
    #[arg(long, hide = true)]
    pub fault_injection: bool,
}

impl ServeArgs {
    /// The effective configuration: defaults, then the file, then the flags,
    /// validated as a whole.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let mut config = Config::load(self.config.as_deref())?;
        self.apply_to(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply_to(&self, config: &mut Config) {
        let server = &mut config.server;
        if let Some(dir) = &self.data_dir {
            server.data_dir.clone_from(dir);
        }
        if let Some(addr) = &self.addr {
            server.addr.clone_from(addr);
        }
        if let Some(addr) = &self.advertise_addr {
            server.advertise_addr.clone_from(addr);
        }
        if let Some(addr) = &self.status_addr {
            server.status_addr.clone_from(addr);
        }
        if let Some(stores) = self.stores {
            server.stores = stores;
        }
        server.fault_injection |= self.fault_injection;
    }
}

pub use kvfeed_client::error::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_parse() {
        let cli = Cli::try_parse_from([
            "kvfeed",
            "serve",
            "--data-dir",
            "d",
            "--addr",
            "127.0.0.1:0",
            "--status-addr",
            "127.0.0.1:1",
            "--log-level",
            "debug",
        ])
        .expect("parse");
        assert_eq!(cli.log_level, "debug");
        // Refutable once more subcommands exist.
        #[allow(irrefutable_let_patterns)]
        let Command::Serve(args) = cli.command else {
            panic!("expected the serve subcommand");
        };
        assert_eq!(args.data_dir, Some(PathBuf::from("d")));
        assert_eq!(args.addr.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(args.config, None);
    }

    #[test]
    fn log_level_defaults_to_info() {
        let cli = Cli::try_parse_from(["kvfeed", "serve"]).expect("parse");
        assert_eq!(cli.log_level, "info");
    }

    #[test]
    fn flags_override_the_file_and_only_typed_flags_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("kvfeed.toml");
        std::fs::write(
            &file,
            "[server]\naddr = \"127.0.0.1:7000\"\nstatus-addr = \"127.0.0.1:7001\"\n\
             [cdc]\nmin-ts-interval = \"250ms\"\n",
        )
        .expect("write config");
        let args = ServeArgs {
            config: Some(file),
            addr: Some("127.0.0.1:0".to_owned()),
            ..ServeArgs::default()
        };
        let cfg = args.load_config().expect("load");
        assert_eq!(cfg.server.addr, "127.0.0.1:0", "flag wins");
        assert_eq!(cfg.server.status_addr, "127.0.0.1:7001", "file kept");
        assert_eq!(
            cfg.server.data_dir,
            PathBuf::from("./kvfeed-data"),
            "default"
        );
        assert_eq!(
            cfg.cdc.min_ts_interval.as_duration(),
            std::time::Duration::from_millis(250)
        );
    }

    #[test]
    fn flags_are_validated() {
        let args = ServeArgs {
            status_addr: Some("no-port".to_owned()),
            ..ServeArgs::default()
        };
        let err = args.load_config().expect_err("invalid").to_string();
        assert!(err.contains("server.status-addr"), "{err}");
    }

    #[test]
    fn missing_config_file_is_named() {
        let args = ServeArgs {
            config: Some(PathBuf::from("does/not/exist.toml")),
            ..ServeArgs::default()
        };
        let err = args.load_config().expect_err("missing").to_string();
        assert!(err.contains("does/not/exist.toml"), "{err}");
    }
}
