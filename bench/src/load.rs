//! The write side of the benchmarks: stamped values, writer tasks (closed
//! or open loop, raw or transactional) and batch preloading.
//!
//! Every value starts with a [`Stamp`]: its send time (unix nanoseconds)
//! and a (writer, seq) id. A watcher therefore needs nothing but the event
//! itself to compute put→event latency and to check, exactly, that each
//! acknowledged put arrived once.
//!
//! Raw puts are sent as RawPut requests built with kvfeed's client types
//! on the store's channel, with regions looked up once and looked up again
//! after a region error, as TiKV clients do with their region cache.
//! (`Cluster::raw_put` asks PD before every put, which would make the
//! writers measure PD lookups.) Transactional puts use `Cluster::txn_put`
//! as it is: each put is a transaction of its own (two timestamps, a
//! prewrite and a commit), which is what `--txn` is meant to measure; they
//! run on a thread of their own (see `TxnExecutor` for why).
//!
//! On etcd (`--target etcd://...`) a put is one `KV.Put` on a connection
//! all writers share, as the raw puts share the store's; everything else
//! here is the same for both systems.
//!
//! Open loop (`--rate`): each writer sends at fixed intervals whether or
//! not earlier puts have finished, and stamps each value with its
//! *scheduled* time, so a server that falls behind shows up as latency
//! instead of silently slowing the load down (coordinated omission).
//! In-flight puts are bounded; a put that would exceed the bound is not
//! sent and is counted as skipped.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvfeed_proto::kvrpcpb;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::stats::{Histogram, SeqSet};
use super::{BenchError, Server};
use kvfeed_client::error::check_region;
use kvfeed_client::{ClientError, Cluster, KeyMode, RegionInfo};

/// Bytes of the stamp at the start of every value.
pub const STAMP_LEN: usize = 20;
/// Bound on one put, retries included.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Region-error retries of one raw put.
const REGION_RETRIES: u32 = 5;
/// In-flight puts per open-loop writer.
const MAX_IN_FLIGHT: usize = 256;
/// Keys per RawBatchPut when preloading, and batches in flight.
pub const PRELOAD_BATCH: usize = 1024;
const PRELOAD_PARALLEL: usize = 4;

/// Wall-clock now in unix nanoseconds (both ends of a measurement run on
/// one machine, so their clocks agree).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What a value says about its put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
///
/// Encoded big-endian at the start of the value: `sent_ns` (8 bytes),
/// `writer` (4), `seq` (8), [`STAMP_LEN`] bytes in all.
pub struct Stamp {
    /// When the put was sent, in unix nanoseconds; in open loop, when it
    /// was *scheduled* (see the module docs). Latency is measured from it.
    pub sent_ns: u64,
    /// Which writer task sent it, `0..writers`.
    pub writer: u32,
    /// The put's number within its writer, from 0 up; with `writer` it
    /// names the put uniquely within a run.
    pub seq: u64,
}

impl Stamp {
    /// A value of `size` bytes (at least [`STAMP_LEN`]) starting with the
    /// stamp.
    pub fn value(self, size: usize) -> Vec<u8> {
        let mut value = Vec::with_capacity(size.max(STAMP_LEN));
        value.extend_from_slice(&self.sent_ns.to_be_bytes());
        value.extend_from_slice(&self.writer.to_be_bytes());
        value.extend_from_slice(&self.seq.to_be_bytes());
        value.resize(size.max(STAMP_LEN), b'.');
        value
    }

    /// Reads the stamp back from the start of a value; `None` when the
    /// value is shorter than [`STAMP_LEN`] (it was not written by a
    /// benchmark writer). Bytes after the stamp are ignored.
    pub fn parse(value: &[u8]) -> Option<Stamp> {
        let sent_ns = u64::from_be_bytes(value.get(0..8)?.try_into().ok()?);
        let writer = u32::from_be_bytes(value.get(8..12)?.try_into().ok()?);
        let seq = u64::from_be_bytes(value.get(12..20)?.try_into().ok()?);
        Some(Stamp {
            sent_ns,
            writer,
            seq,
        })
    }
}

/// The key of put `seq` of `writer`: readable with `kvfeed scan`.
pub fn key(prefix: &[u8], writer: u32, seq: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("w{writer:04}/{seq:012}").as_bytes());
    key
}

/// The smallest key above every key starting with `prefix` (prefixes here
/// never end in 0xff).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    kvfeed_client::region::prefix_successor(prefix).unwrap_or_default()
}

/// Raw puts with a region cache.
pub struct RawWriter {
    server: Server,
    regions: Mutex<Vec<RegionInfo>>,
    start: Vec<u8>,
    end: Vec<u8>,
}

impl RawWriter {
    /// A writer for raw keys in `[start, end)`.
    pub async fn new(server: &Server, start: &[u8], end: &[u8]) -> Result<RawWriter, BenchError> {
        let regions = server.cluster.regions_in_range(start, end).await?;
        Ok(RawWriter {
            server: server.clone(),
            regions: Mutex::new(regions),
            start: start.to_vec(),
            end: end.to_vec(),
        })
    }

    async fn region_for(&self, key: &[u8]) -> Result<RegionInfo, BenchError> {
        let regions = self.regions.lock().await;
        regions
            .iter()
            .find(|r| r.contains(key))
            .cloned()
            .ok_or_else(|| BenchError::Feed("no cached region holds a written key".to_owned()))
    }

    async fn refresh(&self) -> Result<(), BenchError> {
        let fresh = self
            .server
            .cluster
            .regions_in_range(&self.start, &self.end)
            .await?;
        *self.regions.lock().await = fresh;
        Ok(())
    }

    /// One RawPut, retried after region errors.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), BenchError> {
        let mut attempt = 0;
        loop {
            let region = self.region_for(&key).await?;
            let request = kvrpcpb::RawPutRequest {
                context: Some(region.context()),
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            };
            let mut kv = self.server.store.kv();
            let response = kv
                .raw_put(request)
                .await
                .map_err(|s| ClientError::rpc("RawPut", &s))?
                .into_inner();
            match check_region(region.id, response.region_error.as_ref()) {
                Err(ClientError::Region(e)) if e.is_retryable() && attempt < REGION_RETRIES => {
                    attempt += 1;
                    self.refresh().await?;
                    continue;
                }
                other => other?,
            }
            if !response.error.is_empty() {
                return Err(BenchError::Feed(format!("RawPut: {}", response.error)));
            }
            return Ok(());
        }
    }

    /// One RawBatchPut per region of `pairs`.
    pub async fn batch_put(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), BenchError> {
        let regions = self.regions.lock().await.clone();
        let mut by_region: Vec<Vec<kvrpcpb::KvPair>> = vec![Vec::new(); regions.len()];
        for (key, value) in pairs {
            let index = regions
                .iter()
                .position(|r| r.contains(&key))
                .ok_or_else(|| BenchError::Feed("no region holds a preloaded key".to_owned()))?;
            by_region[index].push(kvrpcpb::KvPair {
                key,
                value,
                ..Default::default()
            });
        }
        for (region, pairs) in regions.iter().zip(by_region) {
            if pairs.is_empty() {
                continue;
            }
            let request = kvrpcpb::RawBatchPutRequest {
                context: Some(region.context()),
                pairs,
                ..Default::default()
            };
            let mut kv = self.server.store.kv();
            let response = kv
                .raw_batch_put(request)
                .await
                .map_err(|s| ClientError::rpc("RawBatchPut", &s))?
                .into_inner();
            check_region(region.id, response.region_error.as_ref())?;
            if !response.error.is_empty() {
                return Err(BenchError::Feed(format!("RawBatchPut: {}", response.error)));
            }
        }
        Ok(())
    }
}

/// Writes `count` raw keys `prefix + {i:010}` with values of `value_size`
/// bytes, [`PRELOAD_BATCH`] keys per request, a few requests at a time.
pub async fn preload(
    server: &Server,
    prefix: &[u8],
    count: u64,
    value_size: usize,
) -> Result<Duration, BenchError> {
    let writer = Arc::new(RawWriter::new(server, prefix, &prefix_end(prefix)).await?);
    let started = Instant::now();
    let mut batches = JoinSet::new();
    let mut next = 0u64;
    while next < count || !batches.is_empty() {
        while next < count && batches.len() < PRELOAD_PARALLEL {
            let end = (next + PRELOAD_BATCH as u64).min(count);
            let pairs: Vec<_> = (next..end)
                .map(|i| (preload_key(prefix, i), vec![b'v'; value_size]))
                .collect();
            let writer = Arc::clone(&writer);
            batches.spawn(async move { writer.batch_put(pairs).await });
            next = end;
        }
        if let Some(done) = batches.join_next().await {
            done.map_err(|e| BenchError::Feed(format!("a preload task failed: {e}")))??;
        }
    }
    Ok(started.elapsed())
}

/// Key `i` of a preloaded range.
pub fn preload_key(prefix: &[u8], i: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{i:010}").as_bytes());
    key
}

/// The index of a preloaded key, if it is one.
pub fn preload_index(prefix: &[u8], key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.strip_prefix(prefix)?)
        .ok()?
        .parse()
        .ok()
}

/// How the writers write.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Writer tasks, each numbering its own puts.
    pub writers: u32,
    /// Total puts per second (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// How long puts are started; the last ones are then awaited.
    pub duration: Duration,
    /// Bytes of each value, the stamp included (at least [`STAMP_LEN`]).
    pub value_size: usize,
    /// Raw puts or single-key transactions.
    pub mode: KeyMode,
    /// Every key written starts with it (see [`key`]), so a run's keys are
    /// its own and a watcher can subscribe to exactly them.
    pub prefix: Vec<u8>,
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Acknowledged puts.
    pub acked: SeqSet,
    /// Puts sent (acknowledged or failed).
    pub sent: u64,
    /// Puts that failed (after their retries): sent but not acknowledged,
    /// so a watcher may or may not see them.
    pub errors: u64,
    /// The first failure's message, for the report.
    pub first_error: Option<String>,
    /// Open loop: scheduled puts not sent because too many were in flight.
    pub skipped: u64,
    /// Send to acknowledgement, nanoseconds.
    pub put_latency: Histogram,
    /// First put sent to last put acknowledged.
    pub elapsed: Duration,
}

/// How the writers send a put.
pub enum Backend {
    /// RawPut on the store's channel, with a region cache.
    Raw(RawWriter),
    /// One transaction per put (`Cluster::txn_put`), on a thread of its own.
    Txn(TxnExecutor),
    /// `KV.Put` to etcd.
    #[cfg(feature = "etcd")]
    Etcd(super::etcd::EtcdWriter),
}

/// One put for the [`TxnExecutor`].
struct TxnJob {
    key: Vec<u8>,
    value: Vec<u8>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Runs `Cluster::txn_put` on a thread of its own.
///
/// Why: the client's transaction futures are not `Send` in the general
/// form `tokio::spawn` demands (their region-retry closures borrow with
/// higher-ranked lifetimes), so they cannot run on the multi-threaded
/// runtime's tasks. This thread runs them on a current-thread runtime as
/// local tasks, with a cluster connection of its own; writers send it
/// puts and await the answers, which are `Send`. One thread is plenty:
/// transactional puts wait on round trips, not on CPU.
pub struct TxnExecutor {
    jobs: mpsc::Sender<TxnJob>,
}

impl TxnExecutor {
    async fn start(pd: &str) -> Result<TxnExecutor, BenchError> {
        let (jobs, mut incoming) = mpsc::channel::<TxnJob>(MAX_IN_FLIGHT);
        let (ready_tx, ready) = oneshot::channel::<Result<(), BenchError>>();
        let pd = pd.to_owned();
        std::thread::Builder::new()
            .name("bench-txn".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BenchError::Runtime(e)));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let cluster = match Cluster::connect(&pd).await {
                        Ok(cluster) => cluster,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    // Ends when every writer has dropped its sender, by
                    // which time every put has been answered.
                    while let Some(job) = incoming.recv().await {
                        let cluster = cluster.clone();
                        tokio::task::spawn_local(async move {
                            let result = cluster.txn_put(&job.key, &job.value).await;
                            let _ = job
                                .reply
                                .send(result.map(|_| ()).map_err(|e| e.to_string()));
                        });
                    }
                });
            })
            .map_err(BenchError::Runtime)?;
        ready
            .await
            .map_err(|_| BenchError::Feed("the transaction thread ended early".to_owned()))??;
        Ok(TxnExecutor { jobs })
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), BenchError> {
        let (reply, answer) = oneshot::channel();
        let gone = || BenchError::Feed("the transaction thread ended".to_owned());
        self.jobs
            .send(TxnJob { key, value, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(BenchError::Feed)
    }
}

impl Backend {
    /// kvfeed's writers of `mode` for keys under `prefix`.
    pub async fn kvfeed(
        server: &Server,
        mode: KeyMode,
        prefix: &[u8],
    ) -> Result<Backend, BenchError> {
        Ok(match mode {
            KeyMode::Raw => {
                Backend::Raw(RawWriter::new(server, prefix, &prefix_end(prefix)).await?)
            }
            KeyMode::Txn => Backend::Txn(TxnExecutor::start(server.cluster.pd_addr()).await?),
        })
    }

    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), BenchError> {
        let put = async {
            match self {
                Backend::Raw(raw) => raw.put(key, value).await,
                Backend::Txn(txn) => txn.put(key, value).await,
                #[cfg(feature = "etcd")]
                Backend::Etcd(etcd) => etcd.put(key, value).await.map(|_revision| ()),
            }
        };
        tokio::time::timeout(PUT_TIMEOUT, put)
            .await
            .map_err(|_| BenchError::Feed(format!("a put took longer than {PUT_TIMEOUT:?}")))?
    }
}

/// One writer's running totals (kept per writer, merged at the end, so
/// memory does not grow with the number of puts beyond one bit each).
struct Tally {
    writer: u32,
    acked: SeqSet,
    sent: u64,
    errors: u64,
    first_error: Option<String>,
    skipped: u64,
    put_latency: Histogram,
}

impl Tally {
    fn new(spec: &LoadSpec, writer: u32) -> Tally {
        Tally {
            writer,
            acked: SeqSet::new(spec.writers as usize),
            sent: 0,
            errors: 0,
            first_error: None,
            skipped: 0,
            put_latency: Histogram::default(),
        }
    }

    fn record(&mut self, seq: u64, latency_ns: u64, result: Result<(), BenchError>) {
        self.sent += 1;
        match result {
            Ok(()) => {
                self.acked.insert(self.writer, seq);
                self.put_latency.record(latency_ns);
            }
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Runs kvfeed writers for `spec.duration` and waits for their last puts.
pub async fn run(server: &Server, spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    let backend = Backend::kvfeed(server, spec.mode, &spec.prefix).await?;
    run_on(backend, spec).await
}

/// Runs writers on `backend` for `spec.duration` (`spec.mode` is then
/// `backend`'s) and waits for their last puts.
pub async fn run_on(backend: Backend, spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    let backend = Arc::new(backend);
    let started = Instant::now();
    let start_ns = unix_nanos();
    let first = tokio::time::Instant::now();
    let deadline = first + spec.duration;
    let mut writers = JoinSet::new();
    for writer in 0..spec.writers {
        let backend = Arc::clone(&backend);
        let spec = spec.clone();
        writers.spawn(async move {
            let tally = Tally::new(&spec, writer);
            match spec.rate {
                None => closed_loop(&backend, &spec, tally, deadline).await,
                Some(rate) => {
                    let interval = Duration::from_secs_f64(f64::from(spec.writers) / rate);
                    let clock = Schedule {
                        first,
                        deadline,
                        interval,
                        start_ns,
                    };
                    open_loop(&backend, &spec, tally, clock).await
                }
            }
        });
    }
    let mut result = LoadResult {
        acked: SeqSet::new(spec.writers as usize),
        ..LoadResult::default()
    };
    while let Some(done) = writers.join_next().await {
        let tally = done.map_err(|e| BenchError::Feed(format!("a writer task failed: {e}")))?;
        result.acked.union_with(&tally.acked);
        result.sent += tally.sent;
        result.errors += tally.errors;
        result.skipped += tally.skipped;
        if result.first_error.is_none() {
            result.first_error = tally.first_error;
        }
        result.put_latency.merge(&tally.put_latency);
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

async fn closed_loop(
    backend: &Backend,
    spec: &LoadSpec,
    mut tally: Tally,
    deadline: tokio::time::Instant,
) -> Tally {
    let writer = tally.writer;
    let mut seq = 0;
    while tokio::time::Instant::now() < deadline && seq < super::stats::MAX_SEQ {
        let sent_ns = unix_nanos();
        let stamp = Stamp {
            sent_ns,
            writer,
            seq,
        };
        let result = backend
            .put(key(&spec.prefix, writer, seq), stamp.value(spec.value_size))
            .await;
        tally.record(seq, unix_nanos().saturating_sub(sent_ns), result);
        seq += 1;
    }
    tally
}

/// An open-loop writer's clock: puts are due at `first + offset + k ·
/// interval` while before `deadline`, so `R · D` puts are scheduled in all.
#[derive(Clone, Copy)]
struct Schedule {
    first: tokio::time::Instant,
    deadline: tokio::time::Instant,
    interval: Duration,
    /// `first` on the wall clock.
    start_ns: u64,
}

async fn open_loop(
    backend: &Arc<Backend>,
    spec: &LoadSpec,
    mut tally: Tally,
    clock: Schedule,
) -> Tally {
    let Schedule {
        first,
        deadline,
        interval,
        start_ns,
    } = clock;
    let writer = tally.writer;
    // Writers start spread over one interval, not all at once.
    let offset = interval.mul_f64(f64::from(writer) / f64::from(spec.writers.max(1)));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut in_flight = JoinSet::new();
    let mut seq = 0u64;
    let mut tick = 0u32;
    loop {
        let due = first + offset + interval.saturating_mul(tick);
        if due >= deadline || seq >= super::stats::MAX_SEQ {
            break;
        }
        tick = tick.saturating_add(1);
        tokio::time::sleep_until(due).await;
        while let Some(done) = in_flight.try_join_next() {
            record_joined(&mut tally, done);
        }
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tally.skipped += 1;
            continue;
        };
        // The scheduled time, on the wall clock.
        let scheduled_ns = start_ns + u64::try_from((due - first).as_nanos()).unwrap_or(0);
        let stamp = Stamp {
            sent_ns: scheduled_ns,
            writer,
            seq,
        };
        let (key, value) = (key(&spec.prefix, writer, seq), stamp.value(spec.value_size));
        let backend = Arc::clone(backend);
        in_flight.spawn(async move {
            let result = backend.put(key, value).await;
            drop(permit);
            (seq, unix_nanos().saturating_sub(scheduled_ns), result)
        });
        seq += 1;
    }
    while let Some(done) = in_flight.join_next().await {
        record_joined(&mut tally, done);
    }
    tally
}

type Joined = Result<(u64, u64, Result<(), BenchError>), tokio::task::JoinError>;

fn record_joined(tally: &mut Tally, done: Joined) {
    match done {
        Ok((seq, latency_ns, result)) => tally.record(seq, latency_ns, result),
        Err(e) => {
            tally.sent += 1;
            tally.errors += 1;
            tally
                .first_error
                .get_or_insert_with(|| format!("a put task failed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_the_value() {
        let stamp = Stamp {
            sent_ns: 1_700_000_000_123_456_789,
            writer: 3,
            seq: 99,
        };
        let value = stamp.value(64);
        assert_eq!(value.len(), 64);
        assert_eq!(Stamp::parse(&value), Some(stamp));
        assert_eq!(
            stamp.value(1).len(),
            STAMP_LEN,
            "never shorter than the stamp"
        );
        assert_eq!(Stamp::parse(&value[..19]), None);
    }

    #[test]
    fn keys_stay_inside_their_prefix() {
        let prefix = b"kvfeed-bench/feed/abc/";
        let end = prefix_end(prefix);
        for (writer, seq) in [(0, 0), (9999, 999_999_999_999)] {
            let k = key(prefix, writer, seq);
            assert!(k.as_slice() >= prefix.as_slice() && k < end, "{k:?}");
        }
        let k = preload_key(prefix, 42);
        assert_eq!(preload_index(prefix, &k), Some(42));
        assert_eq!(preload_index(prefix, b"other/0000000042"), None);
    }
}

/// What the scan benchmarks preload and how long they wait for a read.
#[derive(Debug, Clone, clap::Args)]
pub struct PreloadArgs {
    /// Keys to preload (in each key space read) and then read.
    #[arg(long, value_name = "P", default_value_t = 100_000)]
    pub keys: u64,

    /// Bytes per value.
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub value_size: usize,

    /// Longest one read of the preloaded keys may take.
    #[arg(long, value_name = "D", default_value = "5m")]
    pub timeout: kvfeed_types::units::ReadableDuration,

    /// Pause between the preload and the reads, so that the store's
    /// flushes and compactions of a large preload are done and the reads
    /// measure a settled store (0s measures reads that compete with them).
    #[arg(long, value_name = "D", default_value = "0s")]
    pub settle: kvfeed_types::units::ReadableDuration,
}

impl PreloadArgs {
    /// Checks the bounds; returns the timeout.
    pub fn check(&self) -> Result<Duration, BenchError> {
        super::check_range("--keys", self.keys, 1, 10_000_000)?;
        super::check_range("--value-size", self.value_size, 1, 1 << 20)?;
        if self.settle.as_duration() > super::MAX_DURATION {
            return Err(BenchError::Usage(format!(
                "--settle {} is longer than {:?}",
                self.settle,
                super::MAX_DURATION
            )));
        }
        super::check_duration("--timeout", self.timeout)
    }

    /// Waits `--settle` after a preload.
    pub async fn settle(&self, bench: &str) {
        let pause = self.settle.as_duration();
        if !pause.is_zero() {
            super::progress(
                bench,
                &format!("letting the store settle for {}", self.settle),
            );
            tokio::time::sleep(pause).await;
        }
    }
}
