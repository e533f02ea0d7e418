//! The server's configuration: a TOML file, overridden by command-line flags.
//!
//! Precedence is built-in default < file < flag; the flags are merged in
//! [`crate::cli::ServeArgs::load_config`]. Every section and the root refuse
//! unknown keys (`deny_unknown_fields`): a misspelt key is an error naming it,
//! never a silently ignored setting. Keys are kebab-case; the `[cdc]`,
//! `[coprocessor]` and `[raftstore]` sections keep TiKV's names and
//! defaults (so a TiKV `[cdc]` block carries over), `[schedule]` PD's. A
//! [`Config`] that [`Config::validate`] accepted is what the rest of the
//! server relies on: nothing downstream re-checks these bounds.

use std::path::{Path, PathBuf};

use kvfeed_cdc::{FeedConfig, MIN_TS_INTERVAL_FLOOR};
use kvfeed_storage::region::{RegionMap, STORE_ID};
use serde::{Deserialize, Serialize};

use crate::units::{ReadableDuration, ReadableSize};
use kvfeed_client::text::parse_hex;

mod changefeed;
mod regions;

pub use changefeed::ChangefeedConfig;
pub use regions::{CoprocessorConfig, RaftstoreConfig, ScheduleConfig};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A `[[changefeed]]` table that cannot run, named by its position
    /// (1-based, in file order) and id.
    #[error("invalid [[changefeed]] table {number} (id {id:?}): {reason}")]
    Changefeed {
        number: usize,
        id: String,
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// `[server]`: listening addresses and the data directory.
    pub server: ServerConfig,
    /// `[storage]`: durability of writes.
    pub storage: StorageConfig,
    /// `[cdc]`: the change feed, with TiKV's key names and defaults.
    pub cdc: CdcConfig,
    /// `[coprocessor]`: when regions split automatically (TiKV's names).
    pub coprocessor: CoprocessorConfig,
    /// `[raftstore]`: how often regions are checked (TiKV's name).
    pub raftstore: RaftstoreConfig,
    /// `[schedule]`: when small regions merge automatically (PD's names).
    pub schedule: ScheduleConfig,
    /// `[[changefeed]]` tables: changefeeds the server runs itself (see
    /// [`ChangefeedConfig`]). Default none.
    #[serde(rename = "changefeed", skip_serializing_if = "Vec::is_empty")]
    pub changefeed: Vec<ChangefeedConfig>,
}

/// `[server]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// `addr`: where the gRPC services (PD, KV, ChangeData) listen, as
    /// `host:port`. Port 0 picks a free port; the startup line reports it.
    /// Default `"127.0.0.1:20160"` (TiKV's port).
    pub addr: String,
    /// `status-addr`: where the HTTP status server (`/healthz`, `/metrics`,
    /// `/debug/...`) listens. Default `"127.0.0.1:20180"`.
    pub status_addr: String,
    /// `advertise-addr`: the gRPC address handed to clients (PD `GetMembers`,
    /// `GetStore`), which they reconnect to. Empty (the default) means the
    /// bound `addr` (with the real port when `addr` asks for port 0); it must
    /// be set when `addr` listens on all interfaces (`0.0.0.0`, `[::]`).
    pub advertise_addr: String,
    /// `data-dir`: directory holding the database and its lock file; created
    /// if missing. Default `"./kvfeed-data"`.
    pub data_dir: PathBuf,
    /// `split-keys`: extra region boundaries, as hex strings of *encoded*
    /// keys (TiKV's memcomparable encoding, as `tikv-client` sends them). The
    /// key space is always split at the encoding of eight `0xFF` bytes as
    /// well (see the README). Each must be a complete, valid encoding:
    /// an invalid boundary is refused at start, never "repaired". Default
    /// empty.
    pub split_keys: Vec<String>,
    /// `stores`: how many store endpoints this process serves, each with
    /// its own gRPC address and store id (1, 2, …) in PD, over the one
    /// engine. Store 1 listens on `addr`, store `k` on `addr`'s port plus
    /// `k - 1` (any free port when `addr` asks for port 0). Region leaders
    /// are spread over them; a request reaching a store that does not lead
    /// its region gets TiKV's `not_leader`. Nothing is replicated: this
    /// exists so consumers meet the routing failures of a cluster. A data
    /// directory keeps the number it was created with. Default 1, at most
    /// 16.
    pub stores: u64,
    /// `max-connections`: most connections open at once on each gRPC port;
    /// past it a new connection is closed at once. 0 (the default): the
    /// process's open-file limit less 256 for the store's files, at least 64.
    pub max_connections: usize,
    /// `handshake-timeout`: a gRPC connection that has not sent its HTTP/2
    /// preface within it is closed, so stalled peers cannot pile up. From
    /// 100ms to 1h. Default `"10s"`.
    pub handshake_timeout: ReadableDuration,
    /// Test-only: serve `/debug/fault/feed` (see [`crate::faults`]). Set by
    /// the hidden `--fault-injection` flag, never read from the file.
    #[serde(skip)]
    pub fault_injection: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:20160".to_owned(),
            status_addr: "127.0.0.1:20180".to_owned(),
            advertise_addr: String::new(),
            data_dir: PathBuf::from("./kvfeed-data"),
            split_keys: Vec::new(),
            stores: 1,
            max_connections: 0,
            handshake_timeout: ReadableDuration::secs(10),
            fault_injection: false,
        }
    }
}

/// Most store endpoints one process serves (`server.stores`).
pub const MAX_STORES: u64 = 16;

/// `[storage]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StorageConfig {
    /// `sync-on-commit`: fsync every write before acknowledging it
    /// (concurrent writers share one fsync). `false` acknowledges once the
    /// write reached the engine: faster, but a power loss can drop the most
    /// recent acknowledged writes. Default `true`.
    pub sync_on_commit: bool,
    /// `max-ts-drift-allowance` (TiKV's name): how far beyond the current
    /// timestamp a client's read or write timestamp may lie. One further is
    /// refused: it would raise the store's `max_ts`, and with it the commit
    /// timestamps of async-commit and 1PC writes, past what reads at the
    /// oracle's time see. From 1s to 24h. Default `"60s"`.
    pub max_ts_drift_allowance: ReadableDuration,
    /// `max-service-safe-point-ttl`: the longest TTL a PD service GC safe
    /// point (`UpdateServiceGCSafePoint`) is granted; a longer one is cut to
    /// it, so no client can hold GC back for
    /// good. From 1s to 365d. Default `"7d"` (changefeeds ask for 24h).
    pub max_service_safe_point_ttl: ReadableDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            sync_on_commit: true,
            max_ts_drift_allowance: ReadableDuration::secs(60),
            max_service_safe_point_ttl: ReadableDuration::secs(7 * 86_400),
        }
    }
}

/// `[cdc]` section. Names and defaults are TiKV's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CdcConfig {
    /// `min-ts-interval`: how often resolved timestamps are computed and sent.
    /// At least 10ms. Default `"1s"`.
    pub min_ts_interval: ReadableDuration,
    /// `incremental-scan-threads`: threads running catch-up scans of newly
    /// registered regions. At least 1. Default `4`.
    pub incremental_scan_threads: usize,
    /// `incremental-scan-concurrency`: catch-up scans running at once; must be
    /// at least `incremental-scan-threads`. Default `6`.
    pub incremental_scan_concurrency: usize,
    /// `incremental-scan-concurrency-limit`: catch-up scans allowed to wait or
    /// run; a registration beyond it is answered `server_is_busy`. At least 1.
    /// Default `10000`.
    pub incremental_scan_concurrency_limit: usize,
    /// `incremental-scan-speed-limit`: bytes per second read by all catch-up
    /// scans together, as a size string; `"0"` means unlimited. Default `"0"`
    /// (TiKV's is `"128MB"`).
    pub incremental_scan_speed_limit: ReadableSize,
    /// `sink-memory-quota`: bytes that change-feed events queued for
    /// subscribers (and rows held back during catch-up scans) may hold in
    /// all; one connection may hold at most 64 MiB of it. An event that does
    /// not fit congests the connection over its share, or the connections
    /// holding the most: their subscriptions get the `congested` error and
    /// their unread events are freed. Greater than zero. Default `"512MB"`
    /// (binary units: 512 MiB).
    pub sink_memory_quota: ReadableSize,
}

impl Default for CdcConfig {
    /// The feed's own defaults: they are defined once, in `FeedConfig`.
    fn default() -> Self {
        let feed = FeedConfig::default();
        CdcConfig {
            min_ts_interval: ReadableDuration(feed.min_ts_interval),
            incremental_scan_threads: feed.incremental_scan_threads,
            incremental_scan_concurrency: feed.incremental_scan_concurrency,
            incremental_scan_concurrency_limit: feed.incremental_scan_concurrency_limit,
            incremental_scan_speed_limit: ReadableSize::bytes(feed.incremental_scan_speed_limit),
            sink_memory_quota: ReadableSize::bytes(feed.sink_memory_quota),
        }
    }
}

impl Config {
    /// Reads `path`, or returns the defaults when there is no file. Does not
    /// validate: flags may still change values, so call [`Config::validate`]
    /// after merging them.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every bound the rest of the server relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        check_addr("server.addr", &self.server.addr)?;
        if !(1..=MAX_STORES).contains(&self.server.stores) {
            return invalid(
                "server.stores",
                format!("must be 1 to {MAX_STORES}, not {}", self.server.stores),
            );
        }
        if self.server.stores > 1 {
            let (_, port) = split_host_port(&self.server.addr).unwrap_or_default();
            let port: u64 = port.parse().unwrap_or(0);
            if port != 0 && port + self.server.stores - 1 > u64::from(u16::MAX) {
                return invalid(
                    "server.stores",
                    format!(
                        "{} stores need ports {port}..{} above server.addr's, past 65535",
                        self.server.stores,
                        port + self.server.stores - 1
                    ),
                );
            }
        }
        check_addr("server.status-addr", &self.server.status_addr)?;
        if !self.server.advertise_addr.is_empty() {
            check_addr("server.advertise-addr", &self.server.advertise_addr)?;
            let (host, port) = split_host_port(&self.server.advertise_addr).unwrap_or_default();
            if port == "0" || host == "0.0.0.0" || host == "[::]" {
                return invalid(
                    "server.advertise-addr",
                    format!(
                        "{:?} is not an address clients can connect to",
                        self.server.advertise_addr
                    ),
                );
            }
        } else {
            let (host, _) = split_host_port(&self.server.addr).unwrap_or_default();
            if host == "0.0.0.0" || host == "[::]" {
                return invalid(
                    "server.advertise-addr",
                    format!(
                        "must be set when server.addr ({}) listens on all interfaces: \
                         clients need an address they can reach",
                        self.server.addr
                    ),
                );
            }
        }
        self.split_keys()?;
        if self.server.data_dir.as_os_str().is_empty() {
            return invalid("server.data-dir", "must not be empty".to_owned());
        }
        check_duration(
            "server.handshake-timeout",
            self.server.handshake_timeout,
            ReadableDuration::millis(100),
            ReadableDuration::secs(3600),
        )?;
        check_duration(
            "storage.max-ts-drift-allowance",
            self.storage.max_ts_drift_allowance,
            ReadableDuration::secs(1),
            ReadableDuration::secs(86_400),
        )?;
        check_duration(
            "storage.max-service-safe-point-ttl",
            self.storage.max_service_safe_point_ttl,
            ReadableDuration::secs(1),
            ReadableDuration::secs(365 * 86_400),
        )?;
        let cdc = &self.cdc;
        if cdc.min_ts_interval.as_duration() < MIN_TS_INTERVAL_FLOOR {
            return invalid(
                "cdc.min-ts-interval",
                format!("must be at least 10ms, got {}", cdc.min_ts_interval),
            );
        }
        if cdc.incremental_scan_threads == 0 {
            return invalid(
                "cdc.incremental-scan-threads",
                "must be at least 1".to_owned(),
            );
        }
        if cdc.incremental_scan_concurrency < cdc.incremental_scan_threads {
            return invalid(
                "cdc.incremental-scan-concurrency",
                format!(
                    "must be at least incremental-scan-threads ({}), got {}",
                    cdc.incremental_scan_threads, cdc.incremental_scan_concurrency
                ),
            );
        }
        if cdc.incremental_scan_concurrency_limit == 0 {
            return invalid(
                "cdc.incremental-scan-concurrency-limit",
                "must be at least 1".to_owned(),
            );
        }
        if cdc.sink_memory_quota.as_bytes() == 0 {
            return invalid("cdc.sink-memory-quota", "must be greater than 0".to_owned());
        }
        regions::validate(&self.coprocessor, &self.raftstore)?;
        changefeed::validate(&self.changefeed)
    }

    /// The boundaries the server itself keeps: the default split plus
    /// `server.split-keys` (encoded keys). A new data directory starts with
    /// exactly these regions; an existing one is split at any it lacks.
    pub fn split_keys(&self) -> Result<Vec<Vec<u8>>, ConfigError> {
        let mut keys = RegionMap::default_split_keys();
        for text in &self.server.split_keys {
            let key = parse_hex(text.trim()).ok_or_else(|| ConfigError::Invalid {
                key: "server.split-keys",
                reason: format!("{text:?} is not a hex string"),
            })?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        // Validates every key as a boundary (complete encodings, no repeats).
        RegionMap::new(keys.clone(), &[STORE_ID]).map_err(|e| ConfigError::Invalid {
            key: "server.split-keys",
            reason: e.to_string(),
        })?;
        Ok(keys)
    }

    pub fn durability(&self) -> kvfeed_storage::store::Durability {
        use kvfeed_storage::store::Durability;
        if self.storage.sync_on_commit {
            Durability::SyncOnCommit
        } else {
            Durability::NoSync
        }
    }
}

/// Splits `host:port`, accepting a bracketed IPv6 host.
fn split_host_port(addr: &str) -> Option<(&str, &str)> {
    let (host, port) = addr.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return None;
    }
    Some((host, port))
}

/// Refuses a duration outside `[min, max]`, naming the key and the bounds.
fn check_duration(
    key: &'static str,
    value: ReadableDuration,
    min: ReadableDuration,
    max: ReadableDuration,
) -> Result<(), ConfigError> {
    let d = value.as_duration();
    if d < min.as_duration() || d > max.as_duration() {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("must be from {min} to {max}, got {value}"),
        });
    }
    Ok(())
}

/// `addr` must be `host:port` with a numeric port; resolution and binding
/// happen later and report their own errors.
fn check_addr(key: &'static str, addr: &str) -> Result<(), ConfigError> {
    let valid = split_host_port(addr).is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{addr:?} is not host:port"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = Config::parse("").expect("parse");
        assert_eq!(cfg, Config::default());
        cfg.validate().expect("defaults are valid");
        assert_eq!(cfg.server.addr, "127.0.0.1:20160");
        assert_eq!(cfg.server.status_addr, "127.0.0.1:20180");
        assert!(cfg.storage.sync_on_commit);
        assert_eq!(
            cfg.cdc.min_ts_interval.as_duration(),
            Duration::from_secs(1)
        );
        assert_eq!(cfg.cdc.incremental_scan_threads, 4);
        assert_eq!(cfg.cdc.incremental_scan_concurrency, 6);
        assert_eq!(cfg.cdc.incremental_scan_concurrency_limit, 10_000);
        assert_eq!(cfg.cdc.incremental_scan_speed_limit.as_bytes(), 0);
        assert_eq!(cfg.cdc.sink_memory_quota.as_bytes(), 512 << 20);
    }

    #[test]
    fn full_file_parses() {
        let cfg = Config::parse(
            r#"
            [server]
            addr = "0.0.0.0:3000"
            status-addr = "127.0.0.1:3001"
            advertise-addr = "10.0.0.5:3000"
            data-dir = "/var/lib/kvfeed"

            [storage]
            sync-on-commit = false

            [cdc]
            min-ts-interval = "200ms"
            incremental-scan-threads = 2
            incremental-scan-concurrency = 3
            incremental-scan-concurrency-limit = 50
            incremental-scan-speed-limit = "128MB"
            sink-memory-quota = "1GiB"
            "#,
        )
        .expect("parse");
        cfg.validate().expect("valid");
        assert_eq!(cfg.server.addr, "0.0.0.0:3000");
        assert_eq!(cfg.server.advertise_addr, "10.0.0.5:3000");
        assert_eq!(cfg.server.data_dir, PathBuf::from("/var/lib/kvfeed"));
        assert_eq!(cfg.durability(), kvfeed_storage::store::Durability::NoSync);
        assert_eq!(cfg.cdc.min_ts_interval, ReadableDuration::millis(200));
        assert_eq!(cfg.cdc.incremental_scan_concurrency_limit, 50);
        assert_eq!(cfg.cdc.incremental_scan_speed_limit, ReadableSize::mib(128));
        assert_eq!(cfg.cdc.sink_memory_quota.as_bytes(), 1 << 30);
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            ("[cdc]\nmin-ts-intervall = \"1s\"\n", "min-ts-intervall"),
            ("[server]\nport = 1\n", "port"),
            ("[log]\nlevel = \"info\"\n", "log"),
            ("sync-on-commit = true\n", "sync-on-commit"),
        ] {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
        }
    }

    #[test]
    fn bad_units_are_reported_with_the_value() {
        let err = Config::parse("[cdc]\nsink-memory-quota = \"12XB\"\n")
            .expect_err("bad size")
            .to_string();
        assert!(err.contains("\"12XB\""), "{err}");
        let err = Config::parse("[cdc]\nmin-ts-interval = \"10\"\n")
            .expect_err("bad duration")
            .to_string();
        assert!(err.contains("missing unit"), "{err}");
        let cfg = Config::parse("[cdc]\nsink-memory-quota = 4096\n").expect("integer size");
        assert_eq!(cfg.cdc.sink_memory_quota.as_bytes(), 4096);
    }

    /// The key a validation error names (also used by the sections'
    /// tests).
    pub(super) fn invalid_key(cfg: &Config) -> &'static str {
        match cfg.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = Config::default();
        cfg.cdc.min_ts_interval = ReadableDuration::millis(9);
        assert_eq!(invalid_key(&cfg), "cdc.min-ts-interval");
        cfg.cdc.min_ts_interval = ReadableDuration::millis(10);
        cfg.validate().expect("10ms is the floor");

        let mut cfg = Config::default();
        cfg.storage.max_ts_drift_allowance = ReadableDuration::millis(999);
        assert_eq!(invalid_key(&cfg), "storage.max-ts-drift-allowance");
        cfg.storage.max_ts_drift_allowance = ReadableDuration::secs(86_401);
        assert_eq!(invalid_key(&cfg), "storage.max-ts-drift-allowance");

        let mut cfg = Config::default();
        cfg.storage.max_service_safe_point_ttl = ReadableDuration::millis(10);
        assert_eq!(invalid_key(&cfg), "storage.max-service-safe-point-ttl");

        let mut cfg = Config::default();
        cfg.cdc.incremental_scan_threads = 0;
        assert_eq!(invalid_key(&cfg), "cdc.incremental-scan-threads");

        let mut cfg = Config::default();
        cfg.cdc.incremental_scan_concurrency = 3;
        assert_eq!(invalid_key(&cfg), "cdc.incremental-scan-concurrency");

        let mut cfg = Config::default();
        cfg.cdc.incremental_scan_concurrency_limit = 0;
        assert_eq!(invalid_key(&cfg), "cdc.incremental-scan-concurrency-limit");

        let mut cfg = Config::default();
        cfg.cdc.sink_memory_quota = ReadableSize::bytes(0);
        assert_eq!(invalid_key(&cfg), "cdc.sink-memory-quota");

        let mut cfg = Config::default();
        cfg.server.data_dir = PathBuf::new();
        assert_eq!(invalid_key(&cfg), "server.data-dir");
    }

    #[test]
    fn addresses_are_checked() {
        for good in ["127.0.0.1:0", "localhost:20160", "[::1]:20160", "0.0.0.0:1"] {
            check_addr("server.addr", good).expect(good);
        }
        for bad in ["", "127.0.0.1", ":80", "host:port", "::1:80", "h:65536"] {
            assert!(check_addr("server.addr", bad).is_err(), "{bad}");
        }
        let mut cfg = Config::default();
        cfg.server.advertise_addr = "0.0.0.0:20160".to_owned();
        assert_eq!(invalid_key(&cfg), "server.advertise-addr");
        cfg.server.advertise_addr = "10.1.1.1:0".to_owned();
        assert_eq!(invalid_key(&cfg), "server.advertise-addr");
        cfg.server.advertise_addr = String::new();
        cfg.server.addr = "0.0.0.0:20160".to_owned();
        assert_eq!(invalid_key(&cfg), "server.advertise-addr");
        cfg.server.advertise_addr = "10.1.1.1:20160".to_owned();
        cfg.validate().expect("advertised");
        cfg.server.status_addr = "nope".to_owned();
        assert_eq!(invalid_key(&cfg), "server.status-addr");
    }

    #[test]
    fn stores_are_bounded() {
        let mut cfg = Config::default();
        for bad in [0, MAX_STORES + 1] {
            cfg.server.stores = bad;
            assert_eq!(invalid_key(&cfg), "server.stores");
        }
        // Their ports must fit above server.addr's.
        cfg.server.stores = 3;
        cfg.server.addr = "127.0.0.1:65534".to_owned();
        assert_eq!(invalid_key(&cfg), "server.stores");
        cfg.server.addr = "127.0.0.1:0".to_owned();
        cfg.validate().expect("free ports for every store");
        cfg.server.stores = MAX_STORES;
        cfg.server.addr = "127.0.0.1:20160".to_owned();
        cfg.validate().expect("16 stores from 20160");
    }

    #[test]
    fn split_keys_are_validated() {
        let ok = Config::parse("[server]\nsplit-keys = [\"6b00000000000000f9\"]").expect("parses");
        let keys = ok.split_keys().expect("a valid encoding");
        assert_eq!(keys.len(), 2);
        for bad in ["\"6b\"", "\"zz\"", "\"6b00000000000000f9ff\""] {
            let cfg = Config::parse(&format!("[server]\nsplit-keys = [{bad}]")).expect("parses");
            let err = cfg.validate().expect_err("invalid split key accepted");
            assert!(err.to_string().contains("server.split-keys"), "{err}");
        }
    }
}
