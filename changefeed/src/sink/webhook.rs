//! The webhook sink: rows POSTed to an HTTP endpoint in batches of whole
//! transactions, as CockroachDB's webhook sink does.
//!
//! Requests (one at a time, in order, `Content-Type: application/json`):
//! - a batch of rows: `{"payload":[<row>,…],"length":N}`, each row
//!   [`format::encode`]d, with the header
//!   `Idempotency-Key: <id>-<first commit_ts>-<first start_ts>-<last commit_ts>-<last start_ts>`
//!   (the changefeed id, then the `(commit_ts, start_ts)` of the batch's
//!   first and last transaction, decimal);
//! - a watermark at the end of a window: `{"resolved":"<to>"}` with
//!   `Idempotency-Key: <id>-resolved-<to>`. It says every row committed at
//!   or below `to` has been delivered. It is sent for every window with
//!   rows and otherwise at most once per [`WebhookOptions::resolved_interval`].
//!
//! Batches: a transaction (the adjacent rows sharing `(commit_ts,
//! start_ts)`) is never split. A batch takes transactions in order while it
//! stays within [`WebhookOptions::max_batch_rows`] and
//! [`WebhookOptions::max_batch_bytes`]; a transaction bigger than that goes
//! alone in its batch; the last batch of a window is sent at
//! `commit_window`. The cut depends only on the rows and the window, so a
//! window replayed after a restart sends the same batches with the same
//! keys, and a receiver that remembers keys drops the repeats. (Windows may
//! be cut differently after a restart; a receiver can also drop any
//! transaction at or below the last `(commit_ts, start_ts)` it applied,
//! since transactions arrive whole and in order.)
//!
//! Responses: 2xx is delivered; 408, 429, 5xx, connection errors and
//! timeouts are retried with a doubling backoff, up to
//! [`WebhookOptions::max_attempts`] attempts, and then fail with the
//! transient [`SinkError::Unreachable`] (the runner may reopen and replay);
//! any other status is a permanent [`SinkError::Refused`].
//!
//! The endpoint cannot be read back, so the definition, checkpoint
//! (`webhook-checkpoint.json`) and lock live in a local state directory,
//! with the same rules as the file sink's. The checkpoint is written at
//! every `commit_window`, after the window's requests were accepted.
//!
//! After any error or a cancelled call the sink must be reopened.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use super::state::{StateDir, blocking, not_open};
use super::{Sink, SinkError};
use crate::def::ChangefeedDef;
use crate::format;

/// The webhook sink's checkpoint file in its state directory.
pub const CHECKPOINT_FILE: &str = "webhook-checkpoint.json";

/// How much of a refusing response's body an error quotes.
const SNIPPET_BYTES: usize = 512;

/// Tuning of the webhook sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookOptions {
    /// Most rows in a batch, unless one transaction has more (default 1000).
    pub max_batch_rows: usize,
    /// Most bytes of a batch's body, unless one transaction needs more
    /// (default 1 MiB).
    pub max_batch_bytes: usize,
    /// Timeout of one request, connection to response (default 10 s).
    pub request_timeout: Duration,
    /// First wait before a retry (default 100 ms); it doubles per attempt.
    pub backoff_start: Duration,
    /// Longest wait between retries (default 5 s).
    pub backoff_max: Duration,
    /// Attempts per request before giving up with a transient error
    /// (default 30: about two minutes with the default backoff).
    pub max_attempts: u32,
    /// Least time between watermark POSTs for windows without rows
    /// (default 1 s); windows with rows always send one.
    pub resolved_interval: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            max_batch_rows: 1000,
            max_batch_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            backoff_start: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_attempts: 30,
            resolved_interval: Duration::from_secs(1),
        }
    }
}

/// POSTs to an HTTP endpoint; see the module comment.
#[derive(Debug)]
pub struct WebhookSink {
    url: String,
    state_dir: PathBuf,
    options: WebhookOptions,
    /// Taken out during every call, so a cancelled call leaves it closed.
    open: Option<Box<Open>>,
}

#[derive(Debug)]
struct Open {
    state: StateDir,
    agent: ureq::Agent,
    window: Option<(TimeStamp, TimeStamp)>,
    window_rows: u64,
    /// Whole transactions waiting to be sent.
    batch: Batch,
    /// The current transaction's rows (it may go on in the next `write`).
    txn: Batch,
    last_resolved: Option<Instant>,
}

/// Encoded rows joined by commas, and the transactions they span.
#[derive(Debug, Default)]
struct Batch {
    rows: Vec<u8>,
    count: usize,
    first: Option<(u64, u64)>,
    last: (u64, u64),
}

impl Batch {
    /// The body's size with these rows.
    fn body_len(&self) -> usize {
        self.rows.len() + 32
    }

    fn append(&mut self, other: Batch) {
        if other.count == 0 {
            return;
        }
        if self.count > 0 {
            self.rows.push(b',');
        }
        self.rows.extend_from_slice(&other.rows);
        self.count += other.count;
        self.first = self.first.or(other.first);
        self.last = other.last;
    }
}

/// What one attempt of a request came to.
enum Attempt {
    Done,
    Retry(String),
    Fail(SinkError),
}

impl WebhookSink {
    /// A sink POSTing to `url`, keeping its state in `state_dir`.
    pub fn new(url: String, state_dir: PathBuf, options: WebhookOptions) -> WebhookSink {
        WebhookSink {
            url,
            state_dir,
            options,
            open: None,
        }
    }

    /// POSTs `body` until it is accepted, retrying what is worth it.
    async fn post(&self, agent: &ureq::Agent, body: Vec<u8>, key: String) -> Result<(), SinkError> {
        let opts = &self.options;
        let mut backoff = opts.backoff_start;
        let mut body = body;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (agent, url, key_now) = (agent.clone(), self.url.clone(), key.clone());
            let (returned, outcome) = blocking(move || {
                let outcome = attempt(&agent, &url, &body, &key_now);
                (body, outcome)
            })
            .await?;
            body = returned;
            match outcome {
                Attempt::Done => return Ok(()),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(last) if attempts >= opts.max_attempts => {
                    return Err(SinkError::Unreachable {
                        url: self.url.clone(),
                        attempts,
                        last,
                    });
                }
                Attempt::Retry(last) => {
                    tracing::warn!(url = %self.url, %key, attempts, %last, "webhook request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(opts.backoff_max);
                }
            }
        }
    }

    /// Sends `batch` as one request.
    async fn send(&self, open: &Open, batch: Batch) -> Result<(), SinkError> {
        let Some((first_commit, first_start)) = batch.first else {
            return Ok(());
        };
        let (last_commit, last_start) = batch.last;
        let key = format!(
            "{}-{first_commit}-{first_start}-{last_commit}-{last_start}",
            open.state.def().id
        );
        let mut body = Vec::with_capacity(batch.body_len());
        body.extend_from_slice(b"{\"payload\":[");
        body.extend_from_slice(&batch.rows);
        body.extend_from_slice(format!("],\"length\":{}}}", batch.count).as_bytes());
        self.post(&open.agent, body, key).await
    }

    /// The current transaction is complete: adds it to the batch, sending
    /// what the limits call for.
    async fn end_txn(&self, open: &mut Open) -> Result<(), SinkError> {
        let txn = std::mem::take(&mut open.txn);
        let opts = &self.options;
        if open.batch.count > 0
            && (open.batch.count + txn.count > opts.max_batch_rows
                || open.batch.body_len() + txn.rows.len() + 1 > opts.max_batch_bytes)
        {
            let batch = std::mem::take(&mut open.batch);
            self.send(open, batch).await?;
        }
        open.batch.append(txn);
        if open.batch.count >= opts.max_batch_rows || open.batch.body_len() >= opts.max_batch_bytes
        {
            let batch = std::mem::take(&mut open.batch);
            self.send(open, batch).await?;
        }
        Ok(())
    }

    async fn write_rows(&self, open: &mut Open, rows: &[Row]) -> Result<(), SinkError> {
        let (from, to) = open.window.ok_or_else(|| SinkError::Protocol {
            reason: "write without begin_window".to_owned(),
        })?;
        for row in rows {
            if row.commit_ts <= from || row.commit_ts > to {
                return Err(SinkError::Protocol {
                    reason: format!(
                        "a row committed at {} in the window ({from}, {to}]",
                        row.commit_ts
                    ),
                });
            }
            let id = (row.commit_ts.into_inner(), row.start_ts.into_inner());
            if open.txn.count > 0 && open.txn.last != id {
                self.end_txn(open).await?;
            }
            let txn = &mut open.txn;
            if txn.count > 0 {
                txn.rows.push(b',');
            }
            format::encode(open.state.def(), row, &mut txn.rows);
            txn.count += 1;
            txn.first = txn.first.or(Some(id));
            txn.last = id;
            open.window_rows += 1;
        }
        Ok(())
    }

    async fn commit(&self, open: &mut Open) -> Result<(), SinkError> {
        let (_, to) = open.window.ok_or_else(|| SinkError::Protocol {
            reason: "commit_window without begin_window".to_owned(),
        })?;
        if open.txn.count > 0 {
            self.end_txn(open).await?;
        }
        let batch = std::mem::take(&mut open.batch);
        self.send(open, batch).await?;
        let due = open
            .last_resolved
            .is_none_or(|at| at.elapsed() >= self.options.resolved_interval);
        if open.window_rows > 0 || due {
            let key = format!("{}-resolved-{to}", open.state.def().id);
            let body = format!("{{\"resolved\":\"{to}\"}}").into_bytes();
            self.post(&open.agent, body, key).await?;
            open.last_resolved = Some(Instant::now());
        }
        open.window = None;
        open.window_rows = 0;
        Ok(())
    }
}

/// One POST, on the blocking pool.
fn attempt(agent: &ureq::Agent, url: &str, body: &[u8], key: &str) -> Attempt {
    let response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", key)
        .send(body);
    match response {
        Ok(mut response) => {
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                return Attempt::Done;
            }
            let mut snippet = Vec::new();
            // A body that cannot be read leaves the snippet short.
            let _ = response
                .body_mut()
                .as_reader()
                .take(SNIPPET_BYTES as u64)
                .read_to_end(&mut snippet);
            let body = String::from_utf8_lossy(&snippet).into_owned();
            if status == 408 || status == 429 || status >= 500 {
                Attempt::Retry(format!("HTTP {status}: {body}"))
            } else {
                Attempt::Fail(SinkError::Refused {
                    url: url.to_owned(),
                    status,
                    body,
                })
            }
        }
        Err(
            e @ (ureq::Error::BadUri(_)
            | ureq::Error::Http(_)
            | ureq::Error::InvalidProxyUrl
            | ureq::Error::RedirectFailed
            | ureq::Error::TooManyRedirects),
        ) => Attempt::Fail(SinkError::BadEndpoint {
            url: url.to_owned(),
            reason: e.to_string(),
        }),
        Err(e) => Attempt::Retry(e.to_string()),
    }
}

impl Sink for WebhookSink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        self.open = None;
        let dir = self.state_dir.clone();
        let def = def.clone();
        let (state, checkpoint) = blocking(move || {
            let lock = StateDir::lock(&dir)?;
            StateDir::adopt(&dir, lock, CHECKPOINT_FILE, &def, None)
        })
        .await??;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.options.request_timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        self.open = Some(Box::new(Open {
            state,
            agent,
            window: None,
            window_rows: 0,
            batch: Batch::default(),
            txn: Batch::default(),
            last_resolved: None,
        }));
        Ok(checkpoint)
    }

    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        let open = self.open.as_mut().ok_or_else(not_open)?;
        open.state.check_window(from, to, open.window.is_some())?;
        open.window = Some((from, to));
        Ok(())
    }

    async fn write(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        self.write_rows(&mut open, rows).await?;
        self.open = Some(open);
        Ok(())
    }

    async fn commit_window(&mut self) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        let to = open.window.map(|(_, to)| to);
        self.commit(&mut open).await?;
        if let Some(to) = to {
            let (returned, result) = blocking(move || {
                let result = open.state.set_checkpoint(to);
                (open, result)
            })
            .await?;
            result?;
            open = returned;
        }
        self.open = Some(open);
        Ok(())
    }
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
