//! Helpers of the changefeed tests: a `kvfeed changefeed run` process that
//! can be killed and restarted, waits on a file sink's checkpoint, and a
//! writer of multi-key transactions that records what it committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kvfeed_changefeed::sink::file::FileSinkReader;
use kvfeed_client::feed::{Op, Row};
use tikv_client::{TimestampExt, TransactionClient};

use crate::common::{self, TestServer};

/// How long a changefeed may take to pass a timestamp.
pub const CATCH_UP: Duration = Duration::from_secs(60);

/// A `kvfeed changefeed run` process.
pub struct CfProcess {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Processes started so far (for log file names).
    runs: u32,
}

impl CfProcess {
    /// Starts `kvfeed changefeed run` with `args` (after `changefeed run`);
    /// its stderr goes to a file in `log_dir`.
    pub fn start(args: &[String], log_dir: &Path) -> CfProcess {
        let mut cf = CfProcess {
            args: args.to_vec(),
            log: log_dir.to_path_buf(),
            child: None,
            runs: 0,
        };
        cf.spawn();
        cf
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let log = std::fs::File::create(self.log.join(format!("changefeed-{}.log", self.runs)))
            .expect("log file");
        let child = common::kvfeed()
            .args(["changefeed", "run"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kvfeed changefeed run");
        self.child = Some(child);
    }

    /// The latest run's stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.join(format!("changefeed-{}.log", self.runs)))
            .unwrap_or_default()
    }

    /// Every run's stderr, in order.
    #[allow(dead_code)] // used by the broker tests only
    pub fn all_logs(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                std::fs::read_to_string(self.log.join(format!("changefeed-{run}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the process to exit by itself; returns its exit code.
    #[allow(dead_code)] // used by the broker tests only
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "changefeed did not exit within {limit:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, then start again with the same flags.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + common::WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("changefeed did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("started");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("changefeed exited with {status}; log:\n{}", self.log());
        }
    }
}

impl Drop for CfProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The file sink's checkpoint, 0 while it has none.
pub fn checkpoint(dir: &Path) -> u64 {
    FileSinkReader::open(dir)
        .ok()
        .and_then(|r| r.checkpoint())
        .map_or(0, |ts| ts.into_inner())
}

/// Waits until the file sink at `dir` has a checkpoint of at least `ts`.
pub fn wait_checkpoint(dir: &Path, ts: u64, cf: &mut CfProcess) {
    let deadline = Instant::now() + CATCH_UP;
    while checkpoint(dir) < ts {
        cf.assert_running();
        assert!(
            Instant::now() < deadline,
            "checkpoint {} did not reach {ts}; log:\n{}",
            checkpoint(dir),
            cf.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every row the file sink holds up to its checkpoint, in sink order.
pub fn sink_rows(dir: &Path) -> Vec<Row> {
    let reader = FileSinkReader::open(dir).expect("open the sink");
    reader.rows().map(|item| item.expect("row").row).collect()
}

/// One committed transaction: its commit ts and its writes (`None` =
/// delete).
#[derive(Debug, Clone)]
pub struct Committed {
    pub commit_ts: u64,
    pub writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Commits a transaction of `writes`; returns what was committed.
pub async fn commit(
    client: &TransactionClient,
    writes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Committed {
    let mut txn = client.begin_optimistic().await.expect("begin");
    for (key, value) in writes {
        match value {
            Some(value) => txn.put(key.clone(), value.clone()).await.expect("put"),
            None => txn.delete(key.clone()).await.expect("delete"),
        }
    }
    let ts = txn.commit().await.expect("commit").expect("a commit ts");
    Committed {
        commit_ts: ts.version(),
        writes: writes.iter().cloned().collect(),
    }
}

/// The official client on `server`.
pub async fn txn_client(server: &TestServer) -> TransactionClient {
    TransactionClient::new(vec![server.pd_endpoint()])
        .await
        .expect("connect tikv-client")
}

/// Asserts that the sink's rows are exactly `committed` (those at or
/// below `upto`): each transaction whole, at its commit ts, once.
pub fn assert_transactions(rows: &[Row], committed: &[Committed], upto: u64) {
    let mut by_commit: BTreeMap<u64, BTreeMap<Vec<u8>, Option<Vec<u8>>>> = BTreeMap::new();
    for row in rows {
        let value = match row.op {
            Op::Put => Some(row.value.to_vec()),
            Op::Delete => None,
        };
        let txn = by_commit.entry(row.commit_ts.into_inner()).or_default();
        assert!(
            txn.insert(row.key.to_vec(), value).is_none(),
            "key {:?} twice at commit_ts {}",
            row.key,
            row.commit_ts
        );
    }
    let want: BTreeMap<u64, BTreeMap<Vec<u8>, Option<Vec<u8>>>> = committed
        .iter()
        .filter(|c| c.commit_ts <= upto)
        .map(|c| (c.commit_ts, c.writes.clone()))
        .collect();
    let got_ts: Vec<u64> = by_commit.keys().copied().collect();
    let want_ts: Vec<u64> = want.keys().copied().collect();
    assert_eq!(got_ts, want_ts, "the sink's transactions differ");
    assert_eq!(by_commit, want, "a transaction's rows differ");
}

/// `kvfeed verify` on the sink: exit code and stdout.
pub fn verify(server: &TestServer, sink: &str) -> (Option<i32>, String) {
    let out = common::kvfeed()
        .args(["verify", "--pd", &server.pd_endpoint(), "--sink", sink])
        .output()
        .expect("run kvfeed verify");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// A task committing random transactions until stopped: each of one to
/// four distinct keys `PREFIX000`…, a fifth of the writes deletes, values
/// `v<n>` padded with up to `pad` bytes.
#[allow(dead_code)] // used by the broker tests only
pub struct RandomWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Committed>>,
}

#[allow(dead_code)] // used by the broker tests only
impl RandomWriter {
    /// Starts writing keys `prefix` + three digits below `keys`.
    pub async fn start(
        server: &TestServer,
        seed: u64,
        prefix: &str,
        keys: u32,
        pad: usize,
    ) -> RandomWriter {
        use rand::{RngExt, SeedableRng};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = txn_client(server).await;
        let (prefix, stopped) = (prefix.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut committed = Vec::new();
            for n in 0u64.. {
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let writes: BTreeMap<_, _> = (0..rng.random_range(1..5))
                    .map(|_| {
                        let key = format!("{prefix}{:03}", rng.random_range(0..keys));
                        let value = (!rng.random_ratio(1, 5))
                            .then(|| format!("v{n}-{}", "x".repeat(rng.random_range(0..=pad))));
                        (key.into_bytes(), value.map(String::into_bytes))
                    })
                    .collect();
                let writes: Vec<_> = writes.into_iter().collect();
                committed.push(commit(&client, &writes).await);
            }
            committed
        });
        RandomWriter { stop, task }
    }

    /// Stops it; answers every transaction it committed, in order.
    pub async fn stop(self) -> Vec<Committed> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the writer")
    }
}
