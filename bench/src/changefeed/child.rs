//! The changefeed under test, as a child process, and what the benchmark
//! reads of it from outside: its memory from `/proc/<pid>/status` and its
//! progress from the file sink's directory.
//!
//! Why a child process: the changefeed's memory is the figure of two
//! scenarios, and it must not be mixed with the writers' and pollers' own
//! allocations; a process of its own also lets the `kill` scenario end it
//! with SIGKILL, the way a crash would.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvfeed_changefeed::sink::NatsUri;
use kvfeed_changefeed::sink::file::{CHECKPOINT_FILE, DATA_SUFFIX, FileSinkReader};
use kvfeed_changefeed::sink::nats::NatsCheckpoints;

use crate::BenchError;

/// TTL of the service GC safe point the child holds, seconds: long enough
/// for any run, short enough that a bench that died without removing it
/// does not hold GC back for TiCDC's default day.
const GC_TTL_SECS: u64 = 3600;

/// How to start `kvfeed changefeed run` for one benchmark run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The binary (the running `kvfeed`).
    pub exe: PathBuf,
    /// PD address.
    pub pd: String,
    /// The changefeed id (and PD service id).
    pub id: String,
    /// Where rows go.
    pub sink: SinkTarget,
    /// The changefeed's state directory.
    pub state_dir: PathBuf,
    /// The key prefix followed (valid UTF-8 without escapes).
    pub prefix: String,
    /// `--start-ts`: only the first run uses it, restarts resume.
    pub start_ts: u64,
    /// `--memory-mib`.
    pub memory_mib: usize,
    /// Where the child's stderr (its log) is appended.
    pub log: PathBuf,
}

/// The sink under test.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// A file sink in this directory (the default).
    File(PathBuf),
    /// A NATS JetStream sink (`--sink nats://…`).
    Nats(NatsUri),
}

impl SinkTarget {
    /// The sink's URI.
    pub fn uri(&self) -> String {
        match self {
            SinkTarget::File(dir) => format!("file://{}", dir.display()),
            SinkTarget::Nats(uri) => uri.uri.clone(),
        }
    }
}

impl Spec {
    /// The sink's URI.
    pub fn sink_uri(&self) -> String {
        self.sink.uri()
    }

    /// Starts the changefeed; its log is appended to [`Spec::log`].
    pub fn spawn(&self) -> Result<Proc, BenchError> {
        let failed = |e: std::io::Error| {
            BenchError::Feed(format!(
                "cannot start `{} changefeed run`: {e}",
                self.exe.display()
            ))
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(failed)?;
        let child = Command::new(&self.exe)
            .args(["changefeed", "run", "--pd", &self.pd, "--id", &self.id])
            .args(["--sink", &self.sink_uri(), "--prefix", &self.prefix])
            .args(["--start-ts", &self.start_ts.to_string()])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--memory-mib", &self.memory_mib.to_string()])
            .args(["--gc-ttl", &GC_TTL_SECS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(failed)?;
        Ok(Proc {
            child,
            started: Instant::now(),
            log: self.log.clone(),
        })
    }
}

/// A running changefeed process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// When it was spawned.
    pub started: Instant,
    log: PathBuf,
}

/// A process's memory, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now, bytes.
    pub rss: u64,
    /// `VmHWM`: the highest resident size so far, bytes.
    pub hwm: u64,
}

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory now; `None` once it has exited (or off Linux).
    pub fn memory(&self) -> Option<Memory> {
        read_memory(self.pid())
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// An error saying the changefeed exited, with the end of its log.
    pub fn died(&mut self) -> BenchError {
        let status = self
            .exited()
            .map_or_else(|| "still running".to_owned(), |s| s.to_string());
        BenchError::Feed(format!(
            "the changefeed process exited ({status}); its log ends with:\n{}",
            log_tail(&self.log)
        ))
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<(), BenchError> {
        // Kill fails only for a process already reaped; wait says how it
        // ended either way.
        let _ = self.child.kill();
        self.child
            .wait()
            .map(|_| ())
            .map_err(|e| BenchError::Feed(format!("cannot reap the changefeed process: {e}")))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` and `VmHWM` of process `pid`.
pub fn read_memory(pid: u32) -> Option<Memory> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// The last couple of KiB of a log file.
pub fn log_tail(path: &Path) -> String {
    const TAIL: u64 = 2048;
    let Ok(mut file) = File::open(path) else {
        return "(no log)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

/// The sink's durable checkpoint, read cheaply: the larger of
/// `checkpoint.json` and the last data file's end (a window with rows
/// writes only its data file; its name carries the checkpoint). The same
/// figure as [`FileSinkReader::checkpoint`], without reading the
/// definition. `None` before anything was delivered.
pub fn quick_checkpoint(dir: &Path) -> Option<u64> {
    let in_file = fs::read(dir.join(CHECKPOINT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["checkpoint_ts"].as_u64());
    let mut best = in_file;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name();
        let to = name
            .to_str()
            .and_then(|n| n.strip_suffix(DATA_SUFFIX))
            .and_then(|stem| stem.split_once('-'))
            .filter(|(_, to)| to.len() == 20)
            .and_then(|(_, to)| to.parse::<u64>().ok());
        best = best.max(to);
    }
    best
}

/// Reads a sink's checkpoint from the poller's thread.
#[allow(clippy::large_enum_variant)] // one value per poller thread
enum CheckpointReader {
    File(PathBuf),
    /// A runtime of the thread's own, and the connection once made.
    Nats {
        uri: NatsUri,
        id: String,
        runtime: Option<tokio::runtime::Runtime>,
        checkpoints: Option<NatsCheckpoints>,
    },
}

impl CheckpointReader {
    fn new(sink: SinkTarget, id: String) -> CheckpointReader {
        match sink {
            SinkTarget::File(dir) => CheckpointReader::File(dir),
            SinkTarget::Nats(uri) => CheckpointReader::Nats {
                uri,
                id,
                runtime: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok(),
                checkpoints: None,
            },
        }
    }

    /// The checkpoint now; `None` before the first or when unreadable
    /// (the broker is asked again next time).
    fn read(&mut self) -> Option<u64> {
        match self {
            CheckpointReader::File(dir) => quick_checkpoint(dir),
            CheckpointReader::Nats {
                uri,
                id,
                runtime,
                checkpoints,
            } => {
                let runtime = runtime.as_ref()?;
                if checkpoints.is_none() {
                    *checkpoints = runtime.block_on(NatsCheckpoints::connect(uri)).ok();
                }
                let read = runtime.block_on(checkpoints.as_ref()?.get(id));
                match read {
                    Ok(ts) => ts.map(|t| t.into_inner()),
                    Err(_) => {
                        *checkpoints = None;
                        None
                    }
                }
            }
        }
    }
}

/// The checkpoint as `kvfeed verify` and a restarted sink see it.
pub fn durable_checkpoint(dir: &Path) -> Result<Option<u64>, BenchError> {
    let reader = FileSinkReader::open(dir)
        .map_err(|e| BenchError::Feed(format!("cannot read the sink: {e}")))?;
    Ok(reader.checkpoint().map(|ts| ts.into_inner()))
}

/// A thread watching the sink's checkpoint every `every`: it records each
/// new value with the instant it was first seen, and samples the memory of
/// the process in `pid` (0: none) every [`MEMORY_EVERY`].
pub struct Poller {
    stop: Arc<AtomicBool>,
    latest: Arc<AtomicU64>,
    pid: Arc<AtomicU64>,
    peak_rss: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<(Instant, u64)>>>,
}

/// How often the poller samples the child's memory.
pub const MEMORY_EVERY: Duration = Duration::from_millis(50);

impl Poller {
    /// Starts watching changefeed `id`'s checkpoint in `sink`.
    pub fn start(
        sink: SinkTarget,
        id: &str,
        every: Duration,
        pid: u32,
    ) -> Result<Poller, BenchError> {
        let id = id.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(AtomicU64::new(0));
        let pid = Arc::new(AtomicU64::new(u64::from(pid)));
        let peak_rss = Arc::new(AtomicU64::new(0));
        let (s, l, p, r) = (
            Arc::clone(&stop),
            Arc::clone(&latest),
            Arc::clone(&pid),
            Arc::clone(&peak_rss),
        );
        let handle = std::thread::Builder::new()
            .name("bench-sink-poll".to_owned())
            .spawn(move || {
                let mut seen = Vec::new();
                let mut last_memory = Instant::now();
                let mut reader = CheckpointReader::new(sink, id);
                while !s.load(Ordering::Relaxed) {
                    if let Some(ts) = reader.read()
                        && ts > l.load(Ordering::Relaxed)
                    {
                        seen.push((Instant::now(), ts));
                        l.store(ts, Ordering::Relaxed);
                    }
                    if last_memory.elapsed() >= MEMORY_EVERY {
                        last_memory = Instant::now();
                        let pid = p.load(Ordering::Relaxed);
                        if let Some(m) = u32::try_from(pid).ok().and_then(read_memory) {
                            r.fetch_max(m.rss, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(every);
                }
                seen
            })
            .map_err(BenchError::Runtime)?;
        Ok(Poller {
            stop,
            latest,
            pid,
            peak_rss,
            handle: Some(handle),
        })
    }

    /// The highest checkpoint seen so far (0: none).
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::Relaxed)
    }

    /// The process whose memory is sampled from now on.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(u64::from(pid), Ordering::Relaxed);
    }

    /// The highest `VmRSS` sampled so far, bytes.
    pub fn peak_rss(&self) -> u64 {
        self.peak_rss.load(Ordering::Relaxed)
    }

    /// Waits until the checkpoint reaches `ts`, the process exits or
    /// `limit` passes; returns when it was seen reaching `ts`.
    pub async fn wait_for(
        &self,
        ts: u64,
        proc: &mut Proc,
        limit: Duration,
        what: &str,
    ) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + limit;
        loop {
            if self.latest() >= ts {
                return Ok(Instant::now());
            }
            if proc.exited().is_some() {
                return Err(proc.died());
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Feed(format!(
                    "{what}: the sink's checkpoint is {} after {limit:?}, not yet {ts}",
                    self.latest()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops the thread; returns every `(first seen, checkpoint)`, in
    /// increasing checkpoint order.
    pub fn finish(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The first instant at which `samples` (from [`Poller::finish`]) show the
/// checkpoint at or above `ts`.
pub fn passed_at(samples: &[(Instant, u64)], ts: u64) -> Option<Instant> {
    let i = samples.partition_point(|&(_, cp)| cp < ts);
    samples.get(i).map(|&(at, _)| at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_is_readable() {
        let m = read_memory(std::process::id()).expect("/proc/self/status");
        assert!(m.rss > 0 && m.hwm >= m.rss, "{m:?}");
    }

    #[test]
    fn checkpoint_rolls_forward_over_data_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(quick_checkpoint(dir.path()), None);
        fs::write(dir.path().join(CHECKPOINT_FILE), br#"{"checkpoint_ts":7}"#).expect("write");
        assert_eq!(quick_checkpoint(dir.path()), Some(7));
        let name = format!("{:020}-{:020}{DATA_SUFFIX}", 7, 42);
        fs::write(dir.path().join(&name), b"").expect("write");
        fs::write(dir.path().join(format!("{name}.tmp")), b"").expect("write");
        assert_eq!(quick_checkpoint(dir.path()), Some(42));
    }

    #[test]
    fn a_commit_ts_is_passed_by_the_first_checkpoint_at_or_above_it() {
        let t0 = Instant::now();
        let samples = [(t0, 10), (t0 + Duration::from_millis(5), 20)];
        assert_eq!(passed_at(&samples, 5), Some(t0));
        assert_eq!(passed_at(&samples, 10), Some(t0));
        assert_eq!(passed_at(&samples, 11), Some(t0 + Duration::from_millis(5)));
        assert_eq!(passed_at(&samples, 21), None);
    }
}
