//! The node: one data directory opened by one server process, and everything
//! the services share (store, timestamp oracle, cluster id, metrics, the
//! shutdown trigger, the change feed).
//!
//! Layout of the data directory:
//! - `LOCK`: held with an exclusive OS file lock for as long as the node is
//!   open, and holding the owner's pid (for the error message only: the lock,
//!   not the content, is what counts). The file is never deleted, since
//!   deleting a lock file races with a process about to lock it.
//! - `db/`: the storage engine's files.
//!
//! Invariants:
//! - The lock is taken before anything in the directory is read or written,
//!   so a second server fails fast with a message naming the directory
//!   instead of tripping over the engine's own lock.
//! - The cluster id is non-zero, chosen once on the first start, and stored
//!   in [`Cf::Meta`] under [`CLUSTER_ID_KEY`]; every later start reads it
//!   back, so clients (which check it) can tell this cluster from another.
//! - Opening allocates one timestamp: the oracle is proven to work before the
//!   server announces itself, and `/debug/node`'s `last_ts` already exceeds
//!   everything an earlier incarnation on this directory handed out.
//! - The change feed is started separately ([`Node::start_feed`]) because it
//!   needs a Tokio runtime and opening does not; it is started at most once
//!   and its metrics live in the node's registry.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use kvfeed_cdc::{Feed, FeedConfig, FeedDeps, FeedError};
use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::{Cf, Engine, WriteBatch};
use kvfeed_storage::mvcc::TxnStore;
use kvfeed_storage::raw::RawStore;
use kvfeed_storage::region::{Regions, STORE_ID};
use kvfeed_storage::store::{BatchSource, Store};
use kvfeed_storage::tso::{SystemClock, Tso};

use crate::config::{CdcConfig, Config};
use crate::faults::FeedFaults;
use crate::kv::safe_ts::SafeTs;
use crate::metrics::{Metrics, MetricsError};
use crate::shutdown::Shutdown;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Directory of the storage engine inside the data directory.
pub const ENGINE_DIR: &str = "db";
/// Key in [`Cf::Meta`] holding the cluster id (8 bytes, big-endian).
pub const CLUSTER_ID_KEY: &[u8] = b"cluster_id";

/// The cluster id PD reports and CDC requests carry. Never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(u64);

impl ClusterId {
    /// `None` for zero, which the protocol treats as "unset".
    pub fn new(id: u64) -> Option<ClusterId> {
        (id != 0).then_some(ClusterId(id))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// A fresh random id. Hashes the time and pid with std's randomly keyed
    /// hasher: uniqueness between clusters is all that is needed, not
    /// unpredictability.
    fn generate() -> ClusterId {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        loop {
            // Each RandomState gets different keys, so a retry after the
            // (2^-64 likely) zero yields a different value.
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u128(now);
            hasher.write_u32(std::process::id());
            if let Some(id) = ClusterId::new(hasher.finish()) {
                return id;
            }
        }
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why the node could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create data directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {dir} is in use by another kvfeed process{holder}: \
         lock file {lock_file} is held"
    )]
    Locked {
        dir: PathBuf,
        lock_file: PathBuf,
        /// `" (pid N)"` when the holder's pid could be read, else empty.
        holder: String,
    },
    #[error("cannot lock {lock_file}: {source}")]
    Lock {
        lock_file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Storage {
        context: String,
        #[source]
        source: kvfeed_storage::Error,
    },
    #[error("corrupt cluster id in {dir}: {reason}")]
    CorruptClusterId { dir: PathBuf, reason: String },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot start the change feed: {0}")]
    Feed(#[source] FeedError),
}

/// The exclusive claim on a data directory. Released when dropped (the OS
/// also releases it if the process dies).
#[derive(Debug)]
pub struct DataDirLock {
    dir: PathBuf,
    file: File,
}

impl DataDirLock {
    /// Creates `dir` if missing and locks it. Fails at once, without waiting,
    /// if another process holds the lock.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, NodeError> {
        std::fs::create_dir_all(dir).map_err(|source| NodeError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        // Canonical, so messages and /debug/node name the real directory.
        let dir = std::fs::canonicalize(dir).map_err(|source| NodeError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        let lock_file = dir.join(LOCK_FILE);
        let lock_err = |source| NodeError::Lock {
            lock_file: lock_file.clone(),
            source,
        };
        // Not truncated on open: if it is held, its content names the holder.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_file)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut content = String::new();
                // Best effort: the holder may be mid-write or the content
                // foreign; the error is the same without it.
                let _ = file.read_to_string(&mut content);
                let holder = content
                    .trim()
                    .parse::<u32>()
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(NodeError::Locked {
                    dir,
                    lock_file,
                    holder,
                });
            }
            Err(TryLockError::Error(source)) => return Err(lock_err(source)),
        }
        file.set_len(0).map_err(lock_err)?;
        file.seek(SeekFrom::Start(0)).map_err(lock_err)?;
        writeln!(file, "{}", std::process::id()).map_err(lock_err)?;
        Ok(DataDirLock { dir, file })
    }

    /// The canonical path of the locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the
        // release explicit and independent of other handles to the file.
        if let Err(err) = self.file.unlock() {
            tracing::warn!(%err, dir = %self.dir.display(), "releasing the data-dir lock failed");
        }
    }
}

/// Where the node can be reached, known once the listeners are bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The bound gRPC address of store 1, where PD is found (the real port
    /// when port 0 was asked for).
    pub addr: SocketAddr,
    /// The bound HTTP status address.
    pub status_addr: SocketAddr,
    /// Store 1's gRPC address handed to clients: `server.advertise-addr`,
    /// or `addr` when that is empty.
    pub advertise_addr: String,
    /// Every store endpoint, store 1 first.
    pub stores: Vec<StoreEndpoint>,
}

/// One store's gRPC endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEndpoint {
    /// The store's id in PD (1, 2, …).
    pub id: u64,
    /// The bound address.
    pub addr: SocketAddr,
    /// The address handed to clients: the advertised host with this
    /// store's port, or the bound address.
    pub advertise_addr: String,
}

impl Endpoints {
    /// `addrs` are the bound gRPC addresses of stores 1, 2, … (at least
    /// one).
    pub fn new(config: &Config, addrs: &[SocketAddr], status_addr: SocketAddr) -> Endpoints {
        let advertised_host = config
            .server
            .advertise_addr
            .rsplit_once(':')
            .map(|(host, _)| host.to_owned());
        let stores: Vec<StoreEndpoint> = addrs
            .iter()
            .zip(1u64..)
            .map(|(addr, id)| StoreEndpoint {
                id,
                addr: *addr,
                advertise_addr: match (&advertised_host, id) {
                    (Some(_), 1) => config.server.advertise_addr.clone(),
                    (Some(host), _) => format!("{host}:{}", addr.port()),
                    (None, _) => addr.to_string(),
                },
            })
            .collect();
        let first = stores.first().cloned().unwrap_or(StoreEndpoint {
            id: STORE_ID,
            addr: status_addr,
            advertise_addr: status_addr.to_string(),
        });
        Endpoints {
            addr: first.addr,
            status_addr,
            advertise_addr: first.advertise_addr,
            stores,
        }
    }

    /// The endpoint of store `id`.
    pub fn store(&self, id: u64) -> Option<&StoreEndpoint> {
        self.stores.iter().find(|s| s.id == id)
    }

    /// The ids of every store served.
    pub fn store_ids(&self) -> Vec<u64> {
        self.stores.iter().map(|s| s.id).collect()
    }
}

/// An open data directory and the state every service shares.
pub struct Node {
    config: Config,
    endpoints: Endpoints,
    cluster_id: ClusterId,
    engine: Arc<FjallEngine>,
    store: Arc<Store>,
    tso: Arc<Tso>,
    txn: Arc<TxnStore>,
    raw: Arc<RawStore>,
    regions: Arc<Regions>,
    /// The store's safe ts, cached for `GetStoreSafeTS` and stale reads.
    safe_ts: SafeTs,
    metrics: Metrics,
    shutdown: Shutdown,
    /// Set once by [`Node::start_feed`].
    feed: OnceLock<Feed>,
    /// Test-only fault injection into feed calls (see [`crate::faults`]).
    feed_faults: FeedFaults,
    // Declared last so it is dropped last: the engine is closed before the
    // directory is released to another process.
    lock: DataDirLock,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.lock.dir())
            .field("cluster_id", &self.cluster_id)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Opens the storage in the locked directory, loads or creates the
    /// cluster id and starts the timestamp oracle. Blocking (disk I/O and
    /// fsync): call it from a blocking context.
    pub fn open(
        config: Config,
        lock: DataDirLock,
        endpoints: Endpoints,
    ) -> Result<Node, NodeError> {
        let dir = lock.dir().to_owned();
        let split_keys = config.split_keys()?;
        let engine_dir = dir.join(ENGINE_DIR);
        let storage = |context: String| {
            move |source| NodeError::Storage {
                context: context.clone(),
                source,
            }
        };
        let engine = Arc::new(FjallEngine::open(&engine_dir).map_err(storage(format!(
            "cannot open the database in {}",
            engine_dir.display()
        )))?);
        let store = Arc::new(
            Store::open(engine.clone(), config.durability())
                .map_err(storage("cannot open the store".to_owned()))?,
        );
        let cluster_id = load_or_create_cluster_id(&store, &dir)?;
        let regions = Arc::new(
            Regions::open(store.clone(), split_keys, &endpoints.store_ids())
                .map_err(storage("cannot load the region layout".to_owned()))?,
        );
        let tso = Arc::new(
            Tso::open(store.clone(), Arc::new(SystemClock))
                .map_err(storage("cannot start the timestamp oracle".to_owned()))?,
        );
        let first_ts = tso
            .get(1)
            .map_err(storage("cannot allocate a timestamp".to_owned()))?;
        let txn = Arc::new(TxnStore::new(store.clone()));
        // Reads served before a restart may have used timestamps up to the
        // oracle's old window; the fresh timestamp is above all of them, so
        // raising max_ts to it keeps 1PC / async-commit commit_ts above every
        // earlier read.
        txn.concurrency_manager().update_max_ts(first_ts);
        // Client timestamps are checked against the oracle's time plus the
        // allowed drift before they may raise max_ts (see the storage
        // crate's concurrency module).
        let drift_ms = u64::try_from(
            config
                .storage
                .max_ts_drift_allowance
                .as_duration()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let oracle = Arc::clone(&tso);
        txn.concurrency_manager()
            .set_max_ts_limit(Box::new(move || {
                let now = oracle.current();
                TimeStamp::compose(now.physical().saturating_add(drift_ms), 0)
            }));
        let raw = Arc::new(RawStore::new(store.clone(), tso.clone()));
        let safe_ts = SafeTs::new(store.clone(), tso.clone(), txn.clone(), raw.clone());
        let metrics = Metrics::new()?;
        metrics.register(Box::new(
            crate::admin::RegionMetrics::new(Arc::clone(&regions))
                .map_err(MetricsError::Register)?,
        ))?;
        tracing::info!(%cluster_id, %first_ts, data_dir = %dir.display(), "node opened");
        Ok(Node {
            config,
            endpoints,
            cluster_id,
            engine,
            store,
            tso,
            txn,
            raw,
            regions,
            safe_ts,
            metrics,
            shutdown: Shutdown::new(),
            feed: OnceLock::new(),
            feed_faults: FeedFaults::default(),
            lock,
        })
    }

    /// Starts the change feed on the node's store and regions, with its
    /// metrics in the node's registry. Must run inside a Tokio runtime (the
    /// feed's owner task is spawned on it). Calling it again returns the
    /// running feed. Stopping it is the caller's part of shutdown
    /// ([`Feed::shutdown`]); dropping the node stops it too.
    pub fn start_feed(&self) -> Result<Feed, NodeError> {
        if let Some(feed) = self.feed.get() {
            return Ok(feed.clone());
        }
        let feed = Feed::start(FeedDeps {
            store: Arc::clone(&self.store),
            regions: Arc::clone(&self.regions),
            cluster_id: self.cluster_id.get(),
            config: feed_config(&self.config.cdc),
            tso: Arc::clone(&self.tso),
            txn: Arc::clone(&self.txn),
            raw: Arc::clone(&self.raw),
        })
        .map_err(NodeError::Feed)?;
        // On failure the feed handle is dropped here, which stops it.
        feed.metrics()
            .register(self.metrics.registry())
            .map_err(NodeError::Feed)?;
        // Only one caller exists (start-up); were there a racing second one,
        // its metric registration above would already have failed.
        Ok(self.feed.get_or_init(|| feed).clone())
    }

    /// The change feed, once [`Node::start_feed`] has run.
    pub fn feed(&self) -> Option<&Feed> {
        self.feed.get()
    }

    /// The effective (validated) configuration.
    /// The feed's fault-injection switch; only the status server's
    /// `/debug/fault/feed`, present with `--fault-injection`, turns it.
    pub fn feed_faults(&self) -> &FeedFaults {
        &self.feed_faults
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    /// The canonical data directory.
    pub fn data_dir(&self) -> &Path {
        self.lock.dir()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn tso(&self) -> &Arc<Tso> {
        &self.tso
    }

    /// Transactional (Percolator) access to the store.
    pub fn txn(&self) -> &Arc<TxnStore> {
        &self.txn
    }

    /// Raw key-value access to the store.
    pub fn raw(&self) -> &Arc<RawStore> {
        &self.raw
    }

    /// The live region layout clients see.
    pub fn regions(&self) -> &Arc<Regions> {
        &self.regions
    }

    /// The store's safe ts (stale reads at or below it are served).
    pub fn safe_ts(&self) -> &SafeTs {
        &self.safe_ts
    }

    /// The highest timestamp handed out so far; allocates nothing.
    pub fn last_ts(&self) -> TimeStamp {
        self.tso.current()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The shutdown trigger. Long-lived tasks hold a signal from
    /// [`Shutdown::subscribe`] and stop when it fires.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Makes every write so far durable, whatever `sync-on-commit` says.
    /// Blocking.
    pub fn flush(&self) -> Result<(), NodeError> {
        self.engine.sync().map_err(|source| NodeError::Storage {
            context: "cannot sync the database".to_owned(),
            source,
        })
    }
}

/// The feed's tunables from `[cdc]` (same names as TiKV's). The feed's own
/// defaults apply to what `[cdc]` does not name (one connection's share of
/// `sink-memory-quota` is the feed's default, capped at the quota).
fn feed_config(cdc: &CdcConfig) -> FeedConfig {
    FeedConfig {
        min_ts_interval: cdc.min_ts_interval.as_duration(),
        incremental_scan_threads: cdc.incremental_scan_threads,
        incremental_scan_concurrency: cdc.incremental_scan_concurrency,
        incremental_scan_concurrency_limit: cdc.incremental_scan_concurrency_limit,
        incremental_scan_speed_limit: cdc.incremental_scan_speed_limit.as_bytes(),
        sink_memory_quota: cdc.sink_memory_quota.as_bytes(),
        ..FeedConfig::default()
    }
}

/// Reads the stored cluster id, or generates and stores one on first start.
fn load_or_create_cluster_id(store: &Store, dir: &Path) -> Result<ClusterId, NodeError> {
    let read_err = |source| NodeError::Storage {
        context: "cannot read the cluster id".to_owned(),
        source,
    };
    if let Some(raw) = store
        .snapshot()
        .get(Cf::Meta, CLUSTER_ID_KEY)
        .map_err(read_err)?
    {
        let corrupt = |reason: String| NodeError::CorruptClusterId {
            dir: dir.to_owned(),
            reason,
        };
        let bytes: [u8; 8] = raw
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("{} bytes, expected 8", raw.len())))?;
        return ClusterId::new(u64::from_be_bytes(bytes)).ok_or_else(|| corrupt("zero".to_owned()));
    }
    let id = ClusterId::generate();
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, CLUSTER_ID_KEY, id.get().to_be_bytes());
    store
        .apply(batch, BatchSource::Internal)
        .map_err(|source| NodeError::Storage {
            context: "cannot store the cluster id".to_owned(),
            source,
        })?;
    tracing::info!(cluster_id = %id, "new cluster id");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints() -> Endpoints {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Endpoints::new(&Config::default(), &[any], any)
    }

    fn open(dir: &Path) -> Result<Node, NodeError> {
        let lock = DataDirLock::acquire(dir)?;
        Node::open(Config::default(), lock, endpoints())
    }

    #[test]
    fn cluster_id_is_created_once_and_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nested").join("data");
        let node = open(&dir).expect("first open");
        let id = node.cluster_id();
        let ts = node.last_ts();
        assert!(!ts.is_zero());
        assert!(dir.join(LOCK_FILE).exists());
        assert!(dir.join(ENGINE_DIR).is_dir());
        node.flush().expect("flush");
        drop(node);

        let node = open(&dir).expect("second open");
        assert_eq!(node.cluster_id(), id);
        assert!(node.last_ts() > ts, "{} > {}", node.last_ts(), ts);
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = DataDirLock::acquire(tmp.path()).expect("first lock");
        let err = DataDirLock::acquire(tmp.path()).expect_err("second lock");
        let text = err.to_string();
        assert!(matches!(err, NodeError::Locked { .. }), "{err:?}");
        assert!(text.contains(&first.dir().display().to_string()), "{text}");
        assert!(
            text.contains(&format!("(pid {})", std::process::id())),
            "{text}"
        );
        drop(first);
        DataDirLock::acquire(tmp.path()).expect("lock after release");
    }

    #[test]
    fn corrupt_cluster_id_is_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = open(tmp.path()).expect("open");
        let mut batch = WriteBatch::new();
        batch.put(Cf::Meta, CLUSTER_ID_KEY, vec![1, 2, 3]);
        node.store()
            .apply(batch, BatchSource::Internal)
            .expect("apply");
        drop(node);
        let err = open(tmp.path()).expect_err("corrupt");
        assert!(matches!(err, NodeError::CorruptClusterId { .. }), "{err:?}");
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }

    #[test]
    fn cluster_ids_differ_and_are_never_zero() {
        let a = ClusterId::generate();
        let b = ClusterId::generate();
        assert_ne!(a.get(), 0);
        assert_ne!(a, b);
        assert_eq!(ClusterId::new(0), None);
    }

    #[test]
    fn the_feed_takes_its_tunables_from_the_cdc_section() {
        let mut cdc = CdcConfig::default();
        assert_eq!(feed_config(&cdc), FeedConfig::default());
        cdc.min_ts_interval = crate::units::ReadableDuration::millis(250);
        cdc.incremental_scan_concurrency_limit = 7;
        let config = feed_config(&cdc);
        assert_eq!(
            config.min_ts_interval,
            std::time::Duration::from_millis(250)
        );
        assert_eq!(config.incremental_scan_concurrency_limit, 7);
    }

    #[test]
    fn advertise_defaults_to_the_bound_addr() {
        let addr: SocketAddr = ([127, 0, 0, 1], 41_000).into();
        let status: SocketAddr = ([127, 0, 0, 1], 41_001).into();
        let mut config = Config::default();
        assert_eq!(
            Endpoints::new(&config, &[addr], status).advertise_addr,
            "127.0.0.1:41000"
        );
        config.server.advertise_addr = "kv.example:20160".to_owned();
        assert_eq!(
            Endpoints::new(&config, &[addr], status).advertise_addr,
            "kv.example:20160"
        );
        // Further stores advertise the same host with their own port.
        let second: SocketAddr = ([127, 0, 0, 1], 41_007).into();
        let both = Endpoints::new(&config, &[addr, second], status);
        assert_eq!(
            both.store(2).map(|s| s.advertise_addr.as_str()),
            Some("kv.example:41007")
        );
        assert_eq!(both.store_ids(), vec![1, 2]);
    }
}
