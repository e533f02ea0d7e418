//! Shared harness for end-to-end tests: the real `kvfeed` binary on loopback.
//!
//! A [`TestServer`] starts `kvfeed serve` with port 0 for both listeners and
//! reads the bound addresses from the startup line, so tests never race for
//! fixed ports. Waiting is done on the process's own output (the startup
//! line, its exit), never on sleeps; every wait is bounded by [`WAIT`] so a
//! hang fails the test instead of stalling it. A server is killed when its
//! `TestServer` is dropped, so a test that fails half-way leaves nothing
//! running.
//!
//! Each test binary uses a different subset of these helpers, hence the
//! `dead_code` allowances.

#![allow(dead_code)]

pub mod nemesis;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Upper bound for the server to print its startup line or to exit.
pub const WAIT: Duration = Duration::from_secs(30);

/// How often [`TestServer::start_restartable`] tries another base port, and
/// [`TestServer::restart_same_port`] tries the old one again.
const BIND_ATTEMPTS: u32 = 20;

/// How a server process ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Exited {
    /// Panics (showing stderr) unless the process exited with status 0.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.status.code(),
            Some(0),
            "kvfeed did not exit cleanly; stderr:\n{}",
            self.stderr
        );
    }
}

/// The `kvfeed` binary with a clean logging environment.
pub fn kvfeed() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvfeed"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// `serve --data-dir <dir> --addr 127.0.0.1:0 --status-addr 127.0.0.1:0`.
pub fn serve_args(data_dir: &Path) -> Vec<String> {
    vec![
        "serve".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--status-addr".into(),
        "127.0.0.1:0".into(),
    ]
}

/// Runs the binary to completion (for start-up failures).
pub fn run_to_exit(args: &[String]) -> Exited {
    let mut child = kvfeed()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvfeed");
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let status = wait_bounded(&mut child);
    Exited {
        status,
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// How a `kvfeed` process that was run to its end ended.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The JSON object on the last non-empty line of stdout (where every
    /// `kvfeed bench` subcommand puts its result).
    pub fn last_json(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no output; stderr:\n{}", self.stderr));
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "the last line is not JSON ({e}): {line}\nstderr:\n{}",
                self.stderr
            )
        })
    }
}

impl Run {
    /// The JSON line of a `kvfeed bench <bench>` run that must have
    /// succeeded: exit status 0, the right subcommand, `ok` true.
    pub fn bench_ok(&self, bench: &str) -> serde_json::Value {
        assert_eq!(
            self.code,
            Some(0),
            "bench {bench} failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        let json = self.last_json();
        assert_eq!(json["bench"], bench, "{json}");
        assert_eq!(json["ok"], true, "{json}");
        json
    }
}

/// A count in a bench's JSON line.
pub fn json_int(json: &serde_json::Value, key: &str) -> u64 {
    json[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a count in {json}"))
}

/// A number in a bench's JSON line.
pub fn json_number(json: &serde_json::Value, key: &str) -> f64 {
    json[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {json}"))
}

/// Checks a `bench churn` line's connections: some were made, every one
/// ended at a known stage, none failed.
pub fn assert_churn_counts(json: &serde_json::Value) {
    let connections = json_int(json, "connections");
    assert!(connections > 0, "{json}");
    let by_stage: u64 = [
        "before_request",
        "after_register",
        "mid_stream",
        "half_close",
        "drop",
    ]
    .iter()
    .map(|s| json_int(json, &format!("stage_{s}")))
    .sum();
    assert_eq!(by_stage, connections, "{json}");
    assert_eq!(json_int(json, "errors"), 0, "{json}");
}

/// Checks an open-loop `bench feed --rate 200 --duration 1s` line: exactly
/// 200 puts scheduled (each acknowledged, failed or skipped), nothing lost,
/// every acknowledged put seen by each of `watchers`.
pub fn assert_open_loop_200(open: &serde_json::Value, watchers: u64) {
    let scheduled =
        json_int(open, "puts") + json_int(open, "puts_skipped") + json_int(open, "put_errors");
    assert_eq!(scheduled, 200, "{open}");
    assert_eq!(json_int(open, "lost"), 0, "{open}");
    assert_eq!(
        json_int(open, "events"),
        watchers * json_int(open, "puts"),
        "{open}"
    );
}

/// Runs `kvfeed <args>` to its end with no stdin, killing it if it takes
/// longer than `limit`.
pub fn run_to_end<S: AsRef<std::ffi::OsStr>>(args: &[S], limit: Duration) -> Run {
    let mut child = kvfeed()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvfeed");
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let status = wait_within(&mut child, limit);
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Reads a pipe to its end on a thread, so the child never blocks on it.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Sends `signal` (a name such as "TERM" or "KILL") to `pid`.
fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid} failed");
}

/// Waits for the child to exit, killing it if it takes longer than [`WAIT`].
fn wait_bounded(child: &mut Child) -> ExitStatus {
    wait_within(child, WAIT)
}

/// Waits for the child to exit, killing it if it takes longer than `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> ExitStatus {
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // Watchdog: if the child has not exited in time, kill it so the wait
    // below returns and the test fails on the status instead of hanging.
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let status = child.wait().expect("wait for kvfeed");
    let _ = done_tx.send(());
    let _ = watchdog.join();
    status
}

/// `a=1 b=2 data_dir=rest of line` → map; `data_dir` runs to the end.
pub fn parse_fields(rest: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    let mut remaining = rest;
    while let Some((key, after)) = remaining.split_once('=') {
        if key == "data_dir" {
            fields.insert(key.to_owned(), after.to_owned());
            break;
        }
        let (value, next) = after.split_once(' ').unwrap_or((after, ""));
        fields.insert(key.to_owned(), value.to_owned());
        remaining = next;
    }
    fields
}

/// A GET against the status server at `addr`: status code and body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    kvfeed_bench::scrape::http_get(addr, path, WAIT)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// The canonical form of `dir`, as the server reports it.
pub fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).expect("canonicalize")
}

/// A live process and what it announced.
struct Running {
    child: Child,
    /// key=value pairs of the startup line.
    fields: HashMap<String, String>,
    stderr: JoinHandle<String>,
}

/// Why a start attempt produced no startup line.
struct StartFailed {
    line: String,
    stderr: String,
}

/// Spawns `kvfeed <args>` and waits for its startup line.
fn spawn(args: &[String]) -> Result<Running, StartFailed> {
    let mut child = kvfeed()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvfeed");
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let stdout = child.stdout.take().expect("stdout is piped");
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = line_tx.send(line);
        // Keep reading so later output never blocks the server.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    // An exiting process closes stdout, which ends the wait with "".
    let line = line_rx.recv_timeout(WAIT).unwrap_or_default();
    let Some(rest) = line.trim_end().strip_prefix("kvfeed listening ") else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(StartFailed {
            line,
            stderr: stderr.join().unwrap_or_default(),
        });
    };
    Ok(Running {
        child,
        fields: parse_fields(rest),
        stderr,
    })
}

/// A `kvfeed serve` process that can be stopped and restarted on the same
/// data directory. Accessors panic while the server is stopped.
pub struct TestServer {
    args: Vec<String>,
    running: Option<Running>,
    /// Keeps a harness-created data directory alive as long as the server.
    _tmp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server on a fresh temporary data directory.
    pub fn start() -> TestServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut server = TestServer::start_args(serve_args(&tmp.path().join("data")));
        server._tmp = Some(tmp);
        server
    }

    /// A server on a fresh temporary data directory, with further flags.
    pub fn start_with(extra: &[&str]) -> TestServer {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut server = TestServer::start_in_with(&tmp.path().join("data"), extra);
        server._tmp = Some(tmp);
        server
    }

    /// A server on `data_dir` (created if missing; the caller owns it).
    pub fn start_in(data_dir: &Path) -> TestServer {
        TestServer::start_args(serve_args(data_dir))
    }

    /// A server on `data_dir` with further flags after the standard ones
    /// (e.g. `--config FILE`, `--advertise-addr HOST:PORT`). Flags override
    /// the config file, so the ports stay 0.
    pub fn start_in_with(data_dir: &Path, extra: &[&str]) -> TestServer {
        let mut args = serve_args(data_dir);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        TestServer::start_args(args)
    }

    /// A server on a fresh temporary data directory whose gRPC ports (one
    /// per store with `--stores N`) lie below the kernel's ephemeral range,
    /// so that [`TestServer::restart_same_port`] finds them free again. The
    /// base port is random; a taken one is replaced by another.
    pub fn start_restartable(extra: &[&str]) -> TestServer {
        use rand::{RngExt, SeedableRng};
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut args = serve_args(&tmp.path().join("data"));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let stores: u16 =
            flag_value(&args, "--stores").map_or(1, |n| n.parse().expect("--stores N"));
        let (low, _) = ephemeral_ports();
        let range = 10_000..low.saturating_sub(stores).max(10_001);
        let mut last = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let port = rng.random_range(range.clone());
            let args = with_flag(&args, "--addr", &format!("127.0.0.1:{port}"));
            match spawn(&args) {
                Ok(running) => {
                    return TestServer {
                        args,
                        running: Some(running),
                        _tmp: Some(tmp),
                    };
                }
                Err(failed) if failed.stderr.contains("cannot listen on gRPC") => {
                    last = failed.stderr;
                }
                Err(failed) => panic!(
                    "no startup line (got {:?}); stderr:\n{}",
                    failed.line, failed.stderr
                ),
            }
        }
        panic!(
            "no free port below the ephemeral range in {BIND_ATTEMPTS} tries; last stderr:\n{last}"
        );
    }

    /// A server started with exactly `args` (the first being `serve`).
    /// Panics with the process's stderr if no startup line appears.
    pub fn start_args(args: Vec<String>) -> TestServer {
        let running = match spawn(&args) {
            Ok(running) => running,
            Err(failed) => panic!(
                "no startup line (got {:?}); stderr:\n{}",
                failed.line, failed.stderr
            ),
        };
        TestServer {
            args,
            running: Some(running),
            _tmp: None,
        }
    }

    fn running(&self) -> &Running {
        self.running
            .as_ref()
            .expect("the server is stopped; restart it first")
    }

    /// A field of the startup line (`addr`, `status`, `cluster_id`, `data_dir`).
    pub fn field(&self, key: &str) -> &str {
        let fields = &self.running().fields;
        fields
            .get(key)
            .unwrap_or_else(|| panic!("startup line has no {key}: {fields:?}"))
    }

    /// The bound gRPC address, `host:port`.
    pub fn addr(&self) -> &str {
        self.field("addr")
    }

    /// The bound HTTP status address, `host:port`.
    pub fn status_addr(&self) -> &str {
        self.field("status")
    }

    /// The PD endpoint clients are given: `127.0.0.1:port` of the gRPC port.
    pub fn pd_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The gRPC address as a URL for tonic endpoints.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.pd_endpoint())
    }

    /// The bound gRPC port.
    pub fn port(&self) -> u16 {
        let addr = self.addr();
        addr.rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"))
    }

    pub fn cluster_id(&self) -> u64 {
        let id = self.field("cluster_id");
        id.parse()
            .unwrap_or_else(|_| panic!("cluster id {id:?} is not a number"))
    }

    /// The canonical data directory the server reported.
    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(self.field("data_dir"))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.running().child.id()
    }

    /// GET `path` from the status server: status code and body.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.status_addr(), path)
    }

    /// `/debug/node` as JSON.
    pub fn debug_node(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/debug/node");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/debug/node is JSON")
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// A tonic channel to the gRPC port (call from inside a tokio runtime).
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.grpc_url())
            .expect("endpoint")
            .connect_timeout(WAIT)
            .connect()
            .await
            .expect("gRPC client connects")
    }

    /// Sends `signal` ("TERM", "INT", "KILL", ...) and waits (bounded) for
    /// the process to exit. The server is stopped afterwards; `restart`
    /// brings it back on the same data directory.
    pub fn stop(&mut self, signal: &str) -> Exited {
        let mut running = self.running.take().expect("the server is already stopped");
        send_signal(running.child.id(), signal);
        let status = wait_bounded(&mut running.child);
        Exited {
            status,
            stderr: running.stderr.join().unwrap_or_default(),
        }
    }

    /// SIGTERM from a blocking thread (so the caller's runtime keeps
    /// driving its open streams), which must end the process with status 0
    /// without waiting out the shutdown grace period: every open stream
    /// was ended by the server itself.
    pub async fn stop_without_grace(mut self) {
        let exited = tokio::task::spawn_blocking(move || self.stop("TERM"))
            .await
            .expect("stop task");
        exited.assert_clean();
        assert!(!exited.stderr.contains("grace period"), "{}", exited.stderr);
    }

    /// SIGTERM, which must end the process with status 0.
    pub fn stop_clean(&mut self) -> Exited {
        let exited = self.stop("TERM");
        exited.assert_clean();
        exited
    }

    /// Stops cleanly (SIGTERM, exit 0) and starts again on the same data
    /// directory with the same flags. The ports may change: read `addr()`
    /// again afterwards.
    pub fn restart(&mut self) -> Exited {
        let exited = self.stop_clean();
        self.start_again(&self.args.clone());
        exited
    }

    /// Like [`TestServer::restart`], but keeps the gRPC ports (clients that
    /// cached the addresses keep working). Only for servers started by
    /// [`TestServer::start_restartable`]: their ports lie below the
    /// kernel's ephemeral range, so no outgoing connection of a parallel
    /// test can take them while the server is down. (An ephemeral port, or
    /// the ports above it that `--stores N` uses, can be taken that way and
    /// stay taken for the rest of that test.)
    pub fn restart_same_port(&mut self) -> Exited {
        let port = self.port();
        assert!(
            port < ephemeral_ports().0,
            "port {port} is ephemeral: start the server with TestServer::start_restartable"
        );
        let exited = self.stop_clean();
        let args = self.args.clone();
        let mut last = String::new();
        for attempt in 1..=BIND_ATTEMPTS {
            match spawn(&args) {
                Ok(running) => {
                    self.running = Some(running);
                    return exited;
                }
                Err(failed) if failed.stderr.contains("cannot listen on gRPC") => {
                    last = failed.stderr;
                    // Another restartable server may have picked the port
                    // while it was free (rare); its test will move on.
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
                }
                Err(failed) => panic!(
                    "no startup line on restart (got {:?}); stderr:\n{}",
                    failed.line, failed.stderr
                ),
            }
        }
        panic!("port {port} stayed taken over {BIND_ATTEMPTS} attempts; last stderr:\n{last}");
    }

    fn start_again(&mut self, args: &[String]) {
        match spawn(args) {
            Ok(running) => self.running = Some(running),
            Err(failed) => panic!(
                "no startup line on restart (got {:?}); stderr:\n{}",
                failed.line, failed.stderr
            ),
        }
    }

    /// Starts a stopped server again with its original flags.
    pub fn start_stopped(&mut self) {
        assert!(self.running.is_none(), "the server is running");
        self.start_again(&self.args.clone());
    }
}

impl Drop for TestServer {
    /// A test that fails half-way must not leave a server running.
    fn drop(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// `args` with `flag`'s value replaced by `value` (appended if absent).
/// The value after `flag` in `args`, if present.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// The kernel's ephemeral port range (Linux's default when unreadable).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out = args.to_vec();
    match out.iter().position(|a| a == flag) {
        Some(i) if i + 1 < out.len() => out[i + 1] = value.to_owned(),
        _ => {
            out.push(flag.to_owned());
            out.push(value.to_owned());
        }
    }
    out
}
