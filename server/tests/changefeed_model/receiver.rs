//! A webhook receiver for the tests: HTTP/1.1 on `127.0.0.1:0`, one thread
//! per connection (keep-alive), seeded flakiness, and the de-duplication a
//! receiver is told to do by the webhook sink's module comment.
//!
//! # De-duplication
//!
//! Both rules of `changefeed/src/sink/webhook.rs`, in this order:
//! 1. an `Idempotency-Key` seen before is acknowledged and dropped (a
//!    replayed window sends the same batches with the same keys; the test
//!    also checks that a repeated key carries the very same body);
//! 2. of a batch with a new key, every transaction at or below the last
//!    `(commit_ts, start_ts)` applied is dropped (windows may be cut
//!    differently after a restart, so a replayed transaction can come in a
//!    batch of a new key; transactions arrive whole and in order).
//!
//! # Flakiness
//!
//! Per request, seeded: some are answered 500 without being applied, some
//! are applied and then answered 500 (a lost answer: the retry must be
//! dropped as a repeat), some connections are closed without an answer
//! (before or after applying), and some answers come a little late (well within the sink's default
//! 10 s request timeout, which the CLI does not change: timeouts are not
//! exercised here). With `refuse`, every request is answered 400.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvfeed_changefeed::def::Format;
use kvfeed_client::feed::Row;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// One POST of rows the receiver answered, repeats included.
#[derive(Debug, Clone)]
pub struct Batch {
    pub key: String,
    pub rows: Vec<Row>,
}

/// What the receiver got and did.
#[derive(Debug, Default)]
pub struct Received {
    /// Every batch it parsed (whatever it answered), in arrival order.
    pub batches: Vec<Batch>,
    /// Rows applied, in order.
    pub applied: Vec<Row>,
    /// Transactions applied.
    pub applied_txns: usize,
    /// The last `(commit_ts, start_ts)` applied.
    pub last: Option<(u64, u64)>,
    /// Each watermark received, with the transactions applied by then.
    pub resolved: Vec<(u64, usize)>,
    /// Bodies by idempotency key.
    pub keys: HashMap<String, Vec<u8>>,
    /// Batches dropped by rule 1, transactions dropped by rule 2.
    pub repeats: usize,
    pub replayed: usize,
    /// Answers by status; connections closed unanswered; late answers.
    pub statuses: BTreeMap<u16, usize>,
    pub hung_up: usize,
    pub late: usize,
    /// Requests that break the webhook protocol.
    pub errors: Vec<String>,
}

/// The receiver; stops accepting when dropped.
pub struct Receiver {
    pub addr: String,
    pub received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    received: Arc<Mutex<Received>>,
    rng: Mutex<StdRng>,
    refuse: bool,
}

impl Receiver {
    /// Starts a receiver whose flakiness follows `seed`; with `refuse`,
    /// it answers every request 400.
    pub fn start(seed: u64, refuse: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the receiver");
        let addr = listener.local_addr().expect("local addr").to_string();
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = Arc::new(Shared {
            received: received.clone(),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            refuse,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        Receiver {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL to give `--sink`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accepting thread.
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one connection's requests until the peer closes it.
fn serve(conn: TcpStream, shared: &Shared) {
    // A connection left idle by a killed changefeed ends its thread.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
    let mut writer = conn;
    loop {
        let Some((path, key, body)) = read_request(&mut reader) else {
            return;
        };
        let (status, late, hang_up) = shared.answer(&path, key, &body);
        if hang_up {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
        if let Some(late) = late {
            std::thread::sleep(late);
        }
        let text = if status == 200 { "ok" } else { "flaky" };
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            if status == 200 { "OK" } else { "Error" },
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One request: its path, `Idempotency-Key` and body; `None` at the end
/// of the connection.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, Option<String>, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (mut length, mut key) = (0usize, None);
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("idempotency-key") {
            key = Some(value.to_owned());
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((path, key, body))
}

impl Shared {
    /// The status to answer, a delay before it, and whether to hang up
    /// instead.
    fn answer(
        &self,
        path: &str,
        key: Option<String>,
        body: &[u8],
    ) -> (u16, Option<Duration>, bool) {
        let (roll, late) = {
            let mut rng = self.rng.lock().expect("rng");
            let roll = rng.random_range(0..100);
            (roll, Duration::from_millis(rng.random_range(50..300)))
        };
        let mut received = self.received.lock().expect("received");
        if self.refuse {
            *received.statuses.entry(400).or_default() += 1;
            return (400, None, false);
        }
        let (status, late, hang_up) = match roll {
            0..8 => (500, None, false),
            8..10 => (0, None, true),
            _ => {
                received.apply(path, key, body);
                match roll {
                    10..17 => (500, None, false),
                    17..20 => (0, None, true),
                    20..24 => (200, Some(late), false),
                    _ => (200, None, false),
                }
            }
        };
        if hang_up {
            received.hung_up += 1;
        } else {
            *received.statuses.entry(status).or_default() += 1;
        }
        if late.is_some() {
            received.late += 1;
        }
        (status, late, hang_up)
    }
}

impl Received {
    /// Applies one request under the two rules of the module comment.
    fn apply(&mut self, path: &str, key: Option<String>, body: &[u8]) {
        if path != "/hook" {
            self.errors.push(format!("a POST to {path}"));
        }
        let Some(key) = key else {
            self.errors
                .push("a request without an Idempotency-Key".to_owned());
            return;
        };
        let json: serde_json::Value = match serde_json::from_slice(body) {
            Ok(json) => json,
            Err(e) => {
                self.errors.push(format!("{key}: not JSON: {e}"));
                return;
            }
        };
        if let Some(to) = json.get("resolved") {
            let to = to.as_str().and_then(|t| t.parse::<u64>().ok());
            match to {
                Some(to) if key.ends_with(&format!("-resolved-{to}")) => {
                    self.resolved.push((to, self.applied_txns));
                }
                _ => self.errors.push(format!("{key}: a bad watermark {json}")),
            }
            return;
        }
        let Some(payload) = json.get("payload").and_then(|p| p.as_array()) else {
            self.errors
                .push(format!("{key}: neither rows nor a watermark"));
            return;
        };
        if json.get("length").and_then(|l| l.as_u64()) != Some(payload.len() as u64) {
            self.errors.push(format!("{key}: length is not the rows'"));
        }
        let mut rows = Vec::new();
        for row in payload {
            let line = serde_json::to_vec(row).expect("re-encode");
            match kvfeed_changefeed::format::decode(Format::Json, &line) {
                Ok(row) => rows.push(row),
                Err(e) => self.errors.push(format!("{key}: a bad row {row}: {e}")),
            }
        }
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            self.errors.push(format!("{key}: an empty batch"));
            return;
        };
        let ends = format!(
            "-{}-{}-{}-{}",
            first.commit_ts, first.start_ts, last.commit_ts, last.start_ts
        );
        if !key.ends_with(&ends) {
            self.errors.push(format!(
                "{key}: the key does not name the rows' ends {ends}"
            ));
        }
        self.batches.push(Batch {
            key: key.clone(),
            rows: rows.clone(),
        });
        // Rule 1.
        if let Some(before) = self.keys.get(&key) {
            if before[..] != body[..] {
                self.errors
                    .push(format!("{key}: a repeated key with another body"));
            }
            self.repeats += 1;
            return;
        }
        self.keys.insert(key, body.to_vec());
        // Rule 2, per transaction.
        let mut start = 0;
        while start < rows.len() {
            let id = |r: &Row| (r.commit_ts.into_inner(), r.start_ts.into_inner());
            let txn = id(&rows[start]);
            let end = start + rows[start..].iter().take_while(|&r| id(r) == txn).count();
            if self.last.is_some_and(|last| txn <= last) {
                self.replayed += 1;
            } else {
                self.applied.extend_from_slice(&rows[start..end]);
                self.applied_txns += 1;
                self.last = Some(txn);
            }
            start = end;
        }
    }
}
