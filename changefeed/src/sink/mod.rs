//! Where a changefeed's rows go, and how a sink makes delivery exactly once.
//!
//! The runner hands a sink one **window** at a time: every row committed in
//! `(from, to]`, sorted by `(commit_ts, start_ts, key)` — so each
//! transaction's rows are adjacent, a transaction being the rows that share
//! `(commit_ts, start_ts)` — then `commit_window`, after which `to` is the
//! sink's checkpoint: everything committed at or below it is durably in the
//! sink, nothing above it is. Windows come in order, `from` of one being
//! `to` of the one before; a window may hold no rows (a watermark alone).
//!
//! Exactly once rests on three rules every sink keeps:
//! 1. `open` returns the checkpoint the sink durably holds; the runner
//!    resumes the feed from it, so every row above it comes again and none
//!    at or below it does.
//! 2. What a window wrote before its `commit_window` returned is either
//!    invisible after a crash (a file under a temporary name) or replaced
//!    by an identical write when the window comes again (a webhook batch
//!    with the same `Idempotency-Key`, a NATS message with the same id).
//! 3. The checkpoint moves only after the window's rows are durable.
//!
//! Each sink also keeps the changefeed's definition beside its checkpoint:
//! `open` refuses a sink that holds another changefeed, and `kvfeed verify`
//! needs nothing but the sink's URI.

pub mod file;
pub mod kafka;
pub mod nats;
mod state;
mod uri;
pub mod webhook;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;

use crate::def::{ChangefeedDef, ChangefeedId};
use crate::format::FormatError;

pub use file::{FileRow, FileRows, FileSink, FileSinkReader};
pub use kafka::{KafkaReader, KafkaSink};
pub use nats::NatsSink;
pub use uri::{KafkaUri, NatsUri, SinkUri};
pub use webhook::{WebhookOptions, WebhookSink};

/// Where rows go; see the module comment for the contract.
pub trait Sink: Send {
    /// Prepares the sink for `def`: a fresh sink stores the definition and
    /// answers `None`; a sink that holds the same changefeed (see
    /// [`ChangefeedDef::same_feed`]) answers its checkpoint, after undoing
    /// whatever an interrupted window left behind; a sink that holds
    /// another changefeed is an error. Also takes whatever lock keeps a
    /// second process from writing the same sink.
    fn open(
        &mut self,
        def: &ChangefeedDef,
    ) -> impl Future<Output = Result<Option<TimeStamp>, SinkError>> + Send;

    /// Starts the window `(from, to]`.
    fn begin_window(
        &mut self,
        from: TimeStamp,
        to: TimeStamp,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// The window's next rows, in order; one call may end or begin in the
    /// middle of a transaction (a sink that sends whole transactions
    /// buffers until it sees the next one start, or the window end).
    fn write(&mut self, rows: &[Row]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Makes the window's rows durable and then `to` the checkpoint.
    fn commit_window(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// A sink of either kind, so the runner needs no trait objects.
#[derive(Debug)]
pub enum AnySink {
    /// NDJSON files in a directory.
    File(FileSink),
    /// POSTs to an HTTP endpoint.
    Webhook(WebhookSink),
    /// Publishes to NATS JetStream.
    Nats(NatsSink),
    /// Produces to Kafka in transactions.
    Kafka(KafkaSink),
}

impl Sink for AnySink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        match self {
            AnySink::File(s) => s.open(def).await,
            AnySink::Webhook(s) => s.open(def).await,
            AnySink::Nats(s) => s.open(def).await,
            AnySink::Kafka(s) => s.open(def).await,
        }
    }

    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        match self {
            AnySink::File(s) => s.begin_window(from, to).await,
            AnySink::Webhook(s) => s.begin_window(from, to).await,
            AnySink::Nats(s) => s.begin_window(from, to).await,
            AnySink::Kafka(s) => s.begin_window(from, to).await,
        }
    }

    async fn write(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        match self {
            AnySink::File(s) => s.write(rows).await,
            AnySink::Webhook(s) => s.write(rows).await,
            AnySink::Nats(s) => s.write(rows).await,
            AnySink::Kafka(s) => s.write(rows).await,
        }
    }

    async fn commit_window(&mut self) -> Result<(), SinkError> {
        match self {
            AnySink::File(s) => s.commit_window().await,
            AnySink::Webhook(s) => s.commit_window().await,
            AnySink::Nats(s) => s.commit_window().await,
            AnySink::Kafka(s) => s.commit_window().await,
        }
    }
}

/// The bucket of `key` among `buckets`: FNV-1a of the key, modulo
/// `buckets`. Stable across versions and machines, so a key always goes to
/// one NATS subject or Kafka partition.
pub fn key_bucket(key: &[u8], buckets: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(buckets.max(1))) as u32
}

/// A client library's error, kept as the source of a [`SinkError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A sink that failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A URI whose scheme no sink serves.
    #[error(
        "unknown sink scheme {scheme:?} in {uri:?}: expected file://, http://, https://, kafka:// or nats://"
    )]
    UnknownScheme {
        /// The URI given.
        uri: String,
        /// Its scheme.
        scheme: String,
    },
    /// A URI of a known scheme that is malformed.
    #[error("invalid sink URI {uri:?}: {reason}")]
    BadUri {
        /// The URI given.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// The sink's directory cannot be created or written.
    #[error("cannot create or write the sink directory {path}")]
    Unwritable {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Another sink (in this or another process) holds the directory's lock.
    #[error("{path} is held by another changefeed process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The sink holds a different changefeed.
    #[error(
        "{path} holds the changefeed {stored:?}, whose definition differs from that of {given:?}: a sink holds one changefeed"
    )]
    DefMismatch {
        /// The stored definition.
        path: PathBuf,
        /// The id in it.
        stored: ChangefeedId,
        /// The id of the definition given.
        given: ChangefeedId,
    },
    /// A state or data file that does not parse, or data files that do not
    /// chain: the sink was damaged or written by something else.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A data file's line that is not a row of the changefeed's format.
    #[error("{path} line {line}")]
    BadRow {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Why it does not decode.
        #[source]
        source: FormatError,
    },
    /// Reading or writing a file failed after the sink was opened; the
    /// window may be retried after reopening the sink.
    #[error("I/O on {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The runner broke the window protocol (e.g. `write` without
    /// `begin_window`, a window that does not start at the checkpoint, a
    /// row outside its window).
    #[error("sink used out of order: {reason}")]
    Protocol {
        /// What happened.
        reason: String,
    },
    /// A webhook answered with a status that retrying cannot fix.
    #[error("webhook {url} refused a request with HTTP {status}: {body}")]
    Refused {
        /// The endpoint.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// A webhook request failed for good (a bad URL, a redirect) without a
    /// status to blame.
    #[error("webhook {url}: {reason}")]
    BadEndpoint {
        /// The endpoint.
        url: String,
        /// What failed.
        reason: String,
    },
    /// A webhook request kept failing with errors worth retrying.
    #[error("webhook {url} failed {attempts} times, last: {last}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A broker (Kafka, NATS) failed in a way worth retrying: it cannot be
    /// reached, a request timed out, a publish was not acknowledged.
    #[error("{uri}: {what}")]
    Broker {
        /// The sink's URI.
        uri: String,
        /// What the sink was doing.
        what: String,
        /// What the client library said.
        #[source]
        source: BoxError,
    },
    /// A broker refused the sink for good: a topic or stream that does not
    /// exist or does not take the sink's subjects, a checkpoint that does
    /// not parse, another process that took the changefeed over.
    #[error("{uri}: {reason}")]
    BrokerRefused {
        /// The sink's URI.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// A blocking task of the sink panicked or was cancelled; the sink
    /// must be reopened.
    #[error("the sink's blocking task failed: {reason}")]
    Task {
        /// What the runtime said.
        reason: String,
    },
}

impl SinkError {
    /// Whether retrying (reopening the sink and replaying the window)
    /// cannot help: bad URIs and endpoints, a definition mismatch, a
    /// directory that cannot be created or written, a lock held elsewhere,
    /// damaged files, protocol misuse and HTTP 4xx refusals. Transient I/O,
    /// exhausted retries and failed tasks are not permanent.
    pub fn is_permanent(&self) -> bool {
        match self {
            SinkError::UnknownScheme { .. }
            | SinkError::BadUri { .. }
            | SinkError::Unwritable { .. }
            | SinkError::Locked { .. }
            | SinkError::DefMismatch { .. }
            | SinkError::Corrupt { .. }
            | SinkError::BadRow { .. }
            | SinkError::Protocol { .. }
            | SinkError::Refused { .. }
            | SinkError::BadEndpoint { .. }
            | SinkError::BrokerRefused { .. } => true,
            SinkError::Io { .. }
            | SinkError::Unreachable { .. }
            | SinkError::Task { .. }
            | SinkError::Broker { .. } => false,
        }
    }
}
