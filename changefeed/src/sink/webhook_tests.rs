#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use bytes::Bytes;
use kvfeed_client::feed::Op;

use super::*;
use crate::def::{ChangefeedId, Format, Mode};

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Waits this long, then answers 200 (the client has timed out).
    Slow(Duration),
}

/// A request as the receiver saw it, with the status it answered.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    body: serde_json::Value,
    status: u16,
}

/// A tiny HTTP/1.1 receiver on 127.0.0.1: answers from a script, then 200.
struct Receiver {
    url: String,
    script: Arc<Mutex<VecDeque<Answer>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    fn start(script: &[Answer]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (script.clone(), seen.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (s, v) = (s.clone(), v.clone());
                thread::spawn(move || serve(stream, &s, &v));
            }
        });
        Receiver { url, script, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The accepted requests, one per key (a replay must repeat the body).
    fn delivered(&self) -> Vec<Seen> {
        let mut out: Vec<Seen> = Vec::new();
        for s in self.seen().into_iter().filter(|s| s.status == 200) {
            if let Some(prev) = out.iter().find(|p| p.key == s.key) {
                assert_eq!(prev.body, s.body, "a replay with another body");
                continue;
            }
            out.push(s);
        }
        out
    }
}

fn serve(stream: TcpStream, script: &Mutex<VecDeque<Answer>>, seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut key = String::new();
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "idempotency-key" => key = value.trim().to_owned(),
                    "content-length" => length = value.trim().parse().unwrap(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let answer = script.lock().unwrap().pop_front();
        let status = match answer {
            None => 200,
            Some(Answer::Status(s)) => s,
            Some(Answer::Slow(d)) => {
                thread::sleep(d);
                200
            }
        };
        seen.lock().unwrap().push(Seen {
            key,
            body: serde_json::from_slice(&body).unwrap(),
            status,
        });
        let text = format!("status {status}");
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn def() -> ChangefeedDef {
    ChangefeedDef {
        id: ChangefeedId::new("feed").unwrap(),
        mode: Mode::Txn,
        start: Vec::new(),
        end: Vec::new(),
        format: Format::Json,
        old_value: false,
        start_ts: TimeStamp::new(10),
    }
}

fn options() -> WebhookOptions {
    WebhookOptions {
        max_batch_rows: 3,
        backoff_start: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        ..WebhookOptions::default()
    }
}

/// `n` rows of the transaction committed at `commit`.
fn txn(commit: u64, n: usize) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            start_ts: TimeStamp::new(commit - 1),
            commit_ts: TimeStamp::new(commit),
            op: Op::Put,
            key: Bytes::from(format!("k{commit}-{i}")),
            value: Bytes::from_static(b"v"),
            old_value: Bytes::new(),
        })
        .collect()
}

fn keys_of(body: &serde_json::Value) -> Vec<String> {
    body["payload"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect()
}

async fn sink(receiver: &Receiver, dir: &Path, options: WebhookOptions) -> WebhookSink {
    let mut sink = WebhookSink::new(receiver.url.clone(), dir.to_owned(), options);
    assert_eq!(sink.open(&def()).await.unwrap(), None);
    sink
}

#[tokio::test]
async fn batches_hold_whole_transactions_in_order() {
    let receiver = Receiver::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let mut sink = sink(&receiver, state.path(), options()).await;
    let rows: Vec<Row> = [txn(20, 2), txn(30, 2), txn(40, 5), txn(50, 1)].concat();
    sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
        .await
        .unwrap();
    // Calls split transactions anywhere.
    for chunk in rows.chunks(3) {
        sink.write(chunk).await.unwrap();
    }
    sink.commit_window().await.unwrap();
    let seen = receiver.seen();
    let keys: Vec<&str> = seen.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "feed-20-19-20-19",
            "feed-30-29-30-29",
            "feed-40-39-40-39",
            "feed-50-49-50-49",
            "feed-resolved-60",
        ]
    );
    let batches: Vec<Vec<String>> = seen[..4].iter().map(|s| keys_of(&s.body)).collect();
    let sent: Vec<String> = batches.concat();
    let expected: Vec<String> = rows
        .iter()
        .map(|r| String::from_utf8(r.key.to_vec()).unwrap())
        .collect();
    assert_eq!(sent, expected);
    // The five-row transaction is alone, whole, over the three-row limit.
    assert_eq!(batches[2].len(), 5);
    assert_eq!(seen[2].body["length"], 5);
    assert_eq!(seen[4].body, serde_json::json!({"resolved": "60"}));
    let ckpt = std::fs::read_to_string(state.path().join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(ckpt, r#"{"checkpoint_ts":60}"#);
}

#[tokio::test]
async fn small_transactions_share_batches() {
    let receiver = Receiver::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let mut sink = sink(&receiver, state.path(), options()).await;
    let rows: Vec<Row> = [txn(20, 1), txn(30, 1), txn(40, 1), txn(50, 1)].concat();
    sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
        .await
        .unwrap();
    sink.write(&rows).await.unwrap();
    sink.commit_window().await.unwrap();
    let keys: Vec<String> = receiver.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(
        keys,
        ["feed-20-19-40-39", "feed-50-49-50-49", "feed-resolved-60"]
    );
}

#[tokio::test]
async fn a_flaky_receiver_gets_every_batch_once_in_order() {
    let receiver = Receiver::start(&[
        Answer::Status(500),
        Answer::Slow(Duration::from_millis(1500)),
        Answer::Status(429),
        Answer::Status(503),
    ]);
    let state = tempfile::tempdir().unwrap();
    let options = WebhookOptions {
        request_timeout: Duration::from_millis(300),
        ..options()
    };
    let mut sink = sink(&receiver, state.path(), options).await;
    let rows: Vec<Row> = [txn(20, 3), txn(30, 3)].concat();
    sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
        .await
        .unwrap();
    sink.write(&rows).await.unwrap();
    sink.commit_window().await.unwrap();
    assert!(receiver.script.lock().unwrap().is_empty());
    let delivered = receiver.delivered();
    let keys: Vec<&str> = delivered.iter().map(|s| s.key.as_str()).collect();
    // The slow answer may land after its retry; either way once per key.
    let mut sorted = keys.clone();
    sorted.sort_by_key(|k| k.contains("resolved"));
    assert_eq!(
        sorted,
        ["feed-20-19-20-19", "feed-30-29-30-29", "feed-resolved-60"]
    );
    let first_tries: Vec<u16> = receiver.seen().iter().take(2).map(|s| s.status).collect();
    assert_eq!(first_tries[0], 500);
}

#[tokio::test]
async fn a_client_error_stops_the_changefeed() {
    let receiver = Receiver::start(&[Answer::Status(400)]);
    let state = tempfile::tempdir().unwrap();
    let mut sink = sink(&receiver, state.path(), options()).await;
    sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
        .await
        .unwrap();
    sink.write(&txn(20, 1)).await.unwrap();
    let err = sink.commit_window().await.unwrap_err();
    assert!(
        matches!(err, SinkError::Refused { status: 400, .. }),
        "{err}"
    );
    assert!(err.is_permanent());
    assert!(err.to_string().contains("status 400"), "{err}");
    // No checkpoint: the window was not delivered.
    assert!(!state.path().join(CHECKPOINT_FILE).exists());
    // The failed sink must be reopened.
    assert!(
        sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn retries_are_bounded() {
    let receiver = Receiver::start(&[Answer::Status(502); 3]);
    let state = tempfile::tempdir().unwrap();
    let options = WebhookOptions {
        max_attempts: 3,
        ..options()
    };
    let mut sink = sink(&receiver, state.path(), options).await;
    sink.begin_window(TimeStamp::new(10), TimeStamp::new(60))
        .await
        .unwrap();
    let err = sink.commit_window().await.unwrap_err();
    assert!(
        matches!(err, SinkError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn empty_windows_send_throttled_watermarks_but_always_checkpoint() {
    let receiver = Receiver::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let throttled = WebhookOptions {
        resolved_interval: Duration::from_secs(3600),
        ..options()
    };
    let mut sink = sink(&receiver, state.path(), throttled.clone()).await;
    for (from, to) in [(10, 20), (20, 30)] {
        sink.begin_window(TimeStamp::new(from), TimeStamp::new(to))
            .await
            .unwrap();
        sink.commit_window().await.unwrap();
    }
    let keys: Vec<String> = receiver.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, ["feed-resolved-20"]);
    let ckpt = std::fs::read_to_string(state.path().join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(ckpt, r#"{"checkpoint_ts":30}"#);

    // The state directory is locked and keeps the definition.
    let mut other = WebhookSink::new(receiver.url.clone(), state.path().to_owned(), throttled);
    let err = other.open(&def()).await.unwrap_err();
    assert!(matches!(err, SinkError::Locked { .. }), "{err}");
    drop(sink);
    assert_eq!(other.open(&def()).await.unwrap(), Some(TimeStamp::new(30)));
    drop(other);
    let renamed = ChangefeedDef {
        id: ChangefeedId::new("other").unwrap(),
        ..def()
    };
    let mut third = WebhookSink::new(receiver.url.clone(), state.path().to_owned(), options());
    let err = third.open(&renamed).await.unwrap_err();
    assert!(matches!(err, SinkError::DefMismatch { .. }), "{err}");
}
