//! A real `nats-server -js` for the sink tests: started on a random
//! loopback port with its JetStream store in a directory the test owns,
//! stopped (and restartable on the same port and store, to play a broker
//! that goes away) and killed when dropped.
//!
//! `.ci/run` installs Debian's `nats-server`; a machine without it fails
//! these tests with a message saying so rather than skipping them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long the server may take to say it is ready.
const READY: Duration = Duration::from_secs(20);

/// A running (or stopped) nats-server.
pub struct NatsServer {
    store: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream storing under `store`.
    pub fn start(store: &Path) -> NatsServer {
        let mut server = NatsServer {
            store: store.to_owned(),
            port: 0,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-sd"])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}): install it (Debian: apt-get install nats-server)")
            });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut log = Vec::new();
        loop {
            let line = rx.recv_timeout(READY).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "nats-server did not become ready; it said:\n{}",
                    log.join("\n")
                )
            });
            if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                let port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                self.port = port.expect("a port in the listening line");
            }
            let ready = line.contains("Server is ready");
            log.push(line);
            if ready {
                break;
            }
        }
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A sink URI: `nats://127.0.0.1:PORT/PREFIX` plus `query` (with `?`).
    pub fn sink(&self, prefix: &str, query: &str) -> String {
        format!("nats://{}/{prefix}{query}", self.addr())
    }

    /// Kills the server (as a crash or a network loss would look to a client).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    #[allow(dead_code)] // not every test restarts its broker
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The parts of a NATS sink URI.
#[allow(dead_code)] // not every test reads its sink back
pub fn nats_uri(sink: &str) -> kvfeed_changefeed::sink::NatsUri {
    match kvfeed_changefeed::sink::SinkUri::parse(sink).expect("a sink URI") {
        kvfeed_changefeed::sink::SinkUri::Nats(uri) => uri,
        other => panic!("not a NATS URI: {other:?}"),
    }
}

/// Waits until changefeed `id` in the NATS `sink` has a checkpoint of at
/// least `ts`; answers the checkpoint. `watch(false)` is called while
/// waiting (to fail when the changefeed died), `watch(true)` once `limit`
/// passed, for the logs to fail with.
#[allow(dead_code)] // not every test waits on a checkpoint
pub async fn wait_checkpoint(
    sink: &str,
    id: &str,
    ts: u64,
    limit: Duration,
    mut watch: impl FnMut(bool) -> String,
) -> u64 {
    let uri = nats_uri(sink);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let at = kvfeed_changefeed::sink::nats::read_checkpoint(&uri, id)
            .await
            .ok()
            .flatten()
            .map_or(0, |t| t.into_inner());
        if at >= ts {
            return at;
        }
        watch(false);
        if std::time::Instant::now() >= deadline {
            panic!(
                "NATS checkpoint {at} did not reach {ts}; logs:\n{}",
                watch(true)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every item the NATS sink holds up to its checkpoint, in stream order,
/// and the checkpoint.
#[allow(dead_code)] // not every test reads its sink back
pub async fn items(sink: &str) -> (Vec<kvfeed_changefeed::verify::SinkItem>, u64) {
    let mut reader = kvfeed_changefeed::sink::nats::NatsReader::open(&nats_uri(sink))
        .await
        .expect("read the stream");
    let checkpoint = reader.checkpoint().into_inner();
    let mut items = Vec::new();
    while let Some(item) = reader.next().await.expect("an item") {
        items.push(item);
    }
    (items, checkpoint)
}
