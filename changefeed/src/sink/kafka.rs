//! The Kafka sink: one message per row, every window one Kafka
//! transaction, the checkpoint in the same transaction.
//!
//! Messages:
//! - a row goes to the topic's partition `key_bucket(key, n)` (FNV-1a of
//!   the user key, see [`super::key_bucket`]), `n` = `partition-num` or,
//!   when the URI does not set it, the topic's partition count: a key
//!   always goes to one partition, so each key's changes stay in order.
//!   The message key is the user key, the value the row
//!   [`format::encode`]d;
//! - after every window's rows a watermark goes to *every* partition of
//!   the topic, with an empty key and the value `{"resolved":"<to>"}`:
//!   every row committed at or below `to` came before it, so a consumer
//!   merging the partitions may emit everything up to the lowest watermark
//!   it has seen in all of them.
//!
//! Headers: `kvfeed-changefeed` (the id), `kvfeed-commit-ts` and
//! `kvfeed-start-ts` on rows, `kvfeed-resolved-ts` on watermarks, and
//! `kvfeed-value-omitted: true` on a row whose message would exceed
//! `max-message-bytes`: it is sent with an empty value and old value
//! (key-only) instead of halting the changefeed, and counted.
//!
//! Exactly once:
//! 1. The producer is idempotent and transactional, its `transactional.id`
//!    `kvfeed-<id>`. `open` calls `init_transactions`, which aborts a
//!    transaction an interrupted run left open and fences any older
//!    producer of the same changefeed: that one fails with
//!    [`SinkError::BrokerRefused`] at its next call.
//! 2. A window is one transaction: `begin_window` begins it, `write`
//!    produces the rows, `commit_window` produces the watermarks and the
//!    checkpoint record and commits. Consumers reading with
//!    `isolation.level=read_committed` see a window whole or not at all.
//! 3. The checkpoint record goes to the progress topic (`progress-topic`,
//!    default `TOPIC.kvfeed-progress`; created compacted with one partition
//!    when missing and `create-progress-topic` is on): key = the changefeed
//!    id, value `{"def": ..., "topic": ..., "checkpoint_ts": N}`. `open`
//!    reads it back with `read_committed` after `init_transactions` (so no
//!    transaction of this changefeed is pending): the last record with the
//!    id wins. A fresh sink writes a record with `checkpoint_ts: null` in a
//!    transaction of its own, so the definition is stored (and checked on
//!    the next open, and found by `kvfeed verify`) before any window.
//!
//! Errors inside a window abort the transaction (best effort) and close
//! the sink; the runner reopens it and replays from the checkpoint. A
//! fenced or otherwise fatal producer is [`SinkError::BrokerRefused`],
//! timeouts and unreachable brokers are [`SinkError::Broker`].
//!
//! Limits: changing the topic's partition count while `partition-num` is
//! unset moves keys to other partitions (set `partition-num` to pin it);
//! the topic is not created (a broker with `auto.create.topics.enable`
//! creates it on the first metadata request); consumers that do not read
//! with `read_committed` also see the rows of aborted transactions.
//! Exactly once needs a broker that keeps transaction markers and lists
//! aborted transactions in its fetch answers, as Apache Kafka does:
//! librdkafka's mock cluster answers an empty list, so there a
//! `read_committed` consumer (and this sink's own checkpoint read) sees
//! aborted records too — a replayed window shows up twice in the topic
//! (delivery is at least once), which a consumer undoes by dropping a row
//! not above the last one it read from the same partition, as
//! [`KafkaReader`] (and so `kvfeed verify`) does, counting them; tansu 0.6
//! does not offer the `EndTxn` versions librdkafka speaks, so the sink
//! cannot commit there.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfeed_client::feed::Row;
use kvfeed_types::TimeStamp;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

pub use read::KafkaReader;
use read::read_progress;

use super::state::{check_window, not_open};
use super::{SinkError, SinkUri, key_bucket};
use crate::def::ChangefeedDef;
use crate::format;
use crate::sink::uri::KafkaUri;

/// Undelivered messages at most; past it `write` waits for the oldest.
pub const MAX_PENDING: usize = 10_000;

/// How long connecting and each metadata or read request may take, by
/// default (see [`KafkaSink::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `init_transactions`, `commit_transaction` and
/// `abort_transaction` may take (the commit flushes the window).
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// Room for the message's headers and framing in `max-message-bytes`.
const OVERHEAD: usize = 256;

/// Header names.
const H_CHANGEFEED: &str = "kvfeed-changefeed";
const H_COMMIT_TS: &str = "kvfeed-commit-ts";
const H_START_TS: &str = "kvfeed-start-ts";
const H_RESOLVED_TS: &str = "kvfeed-resolved-ts";
const H_VALUE_OMITTED: &str = "kvfeed-value-omitted";

/// A record of the progress topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    def: ChangefeedDef,
    topic: String,
    /// `None` until the first window.
    checkpoint_ts: Option<u64>,
}

/// Produces to Kafka; see the module comment.
pub struct KafkaSink {
    uri: KafkaUri,
    timeout: Duration,
    /// Taken out during every call, so a cancelled call leaves it closed.
    open: Option<Box<Open>>,
    omitted: u64,
}

impl fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSink")
            .field("uri", &self.uri.uri)
            .field("open", &self.open.is_some())
            .finish()
    }
}

struct Open {
    /// Always `Some` until dropped (then dropped on the blocking pool:
    /// a producer's drop flushes and joins threads).
    producer: Option<FutureProducer>,
    def: ChangefeedDef,
    checkpoint: TimeStamp,
    /// The topic's partitions: watermarks go to each.
    partitions: i32,
    /// Rows are spread over partitions `0..buckets`.
    buckets: u32,
    window: Option<(TimeStamp, TimeStamp)>,
    /// Whether a transaction is open (to abort on error).
    in_txn: bool,
    pending: VecDeque<DeliveryFuture>,
    omitted: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(producer) = self.producer.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let in_txn = self.in_txn;
            runtime.spawn_blocking(move || {
                if in_txn {
                    let _ = producer.abort_transaction(Duration::from_secs(5));
                }
                drop(producer);
            });
        }
    }
}

impl KafkaSink {
    /// A sink for `uri`; nothing is connected until [`super::Sink::open`].
    pub fn new(uri: KafkaUri) -> KafkaSink {
        KafkaSink {
            uri,
            timeout: DEFAULT_TIMEOUT,
            open: None,
            omitted: 0,
        }
    }

    /// Sets how long connecting and each metadata or read request may
    /// take ([`DEFAULT_TIMEOUT`] unless set).
    pub fn with_timeout(mut self, timeout: Duration) -> KafkaSink {
        self.timeout = timeout;
        self
    }

    /// Rows sent without their value since the sink was made.
    pub fn values_omitted(&self) -> u64 {
        self.omitted + self.open.as_ref().map_or(0, |o| o.omitted)
    }

    async fn open_inner(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        let uri = self.uri.clone();
        let timeout = self.timeout;
        let message_max = (uri.max_message_bytes + 64 * 1024).clamp(1_000_000, 1_000_000_000);
        let producer: FutureProducer = client_config(&uri, timeout)
            .set("transactional.id", format!("kvfeed-{}", def.id))
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                TXN_TIMEOUT.as_millis().to_string(),
            )
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", message_max.to_string())
            .set("linger.ms", "5")
            .create()
            .map_err(|e| refused(&uri, format!("creating the producer: {e}")))?;
        let mut open = Box::new(Open {
            producer: Some(producer.clone()),
            def: def.clone(),
            checkpoint: def.start_ts,
            partitions: 0,
            buckets: 0,
            window: None,
            in_txn: false,
            pending: VecDeque::new(),
            omitted: 0,
        });
        let (partitions, progress_exists) = {
            let (uri, producer) = (uri.clone(), producer.clone());
            blocking(move || {
                let partitions = topic_partitions(producer.client(), &uri, &uri.topic, timeout)?;
                let progress = list_topics(producer.client(), &uri, timeout)?
                    .contains_key(&uri.progress_topic);
                Ok((partitions, progress))
            })
            .await?
        };
        let Some(partitions) = partitions else {
            return Err(refused(
                &uri,
                format!(
                    "topic {} does not exist (create it, or enable auto-create)",
                    uri.topic
                ),
            ));
        };
        let buckets = match uri.partition_num {
            Some(n) if i64::from(n) > i64::from(partitions) => {
                return Err(refused(
                    &uri,
                    format!(
                        "partition-num={n} but topic {} has {partitions} partitions",
                        uri.topic
                    ),
                ));
            }
            Some(n) => n,
            None => u32::try_from(partitions).unwrap_or(1),
        };
        open.partitions = partitions;
        open.buckets = buckets;
        if !progress_exists {
            if !uri.create_progress_topic {
                return Err(refused(
                    &uri,
                    format!(
                        "the progress topic {} does not exist and create-progress-topic=false: create it (one partition, cleanup.policy=compact)",
                        uri.progress_topic
                    ),
                ));
            }
            create_progress_topic(&uri, timeout).await?;
        }
        // Fences older producers and settles their transactions, so the
        // progress topic read below holds no pending record of ours.
        {
            let (uri, producer) = (uri.clone(), producer.clone());
            blocking(move || {
                producer
                    .init_transactions(TXN_TIMEOUT)
                    .map_err(|e| kafka_error(&uri, Some(&producer), "initialising transactions", e))
            })
            .await?;
        }
        let stored = {
            let (uri, id) = (uri.clone(), def.id.to_string());
            blocking(move || {
                let all = read_progress(&uri, timeout)?;
                Ok(all.into_iter().find(|(k, _)| *k == id).map(|(_, p)| p))
            })
            .await?
        };
        let answer = match stored {
            Some(p) if !def.same_feed(&p.def) => {
                return Err(refused(
                    &uri,
                    format!(
                        "the progress topic {} holds a different definition of changefeed {}: a changefeed's definition cannot change",
                        uri.progress_topic, def.id
                    ),
                ));
            }
            Some(p) if p.topic != uri.topic => {
                return Err(refused(
                    &uri,
                    format!(
                        "changefeed {} writes to topic {}, not {}",
                        def.id, p.topic, uri.topic
                    ),
                ));
            }
            Some(p) => {
                open.def = p.def.clone();
                let c = p.checkpoint_ts.map_or(p.def.start_ts, TimeStamp::new);
                open.checkpoint = c;
                Some(c)
            }
            None => {
                // Store the definition in a transaction of its own.
                open.begin(&uri)?;
                let progress = Progress {
                    def: def.clone(),
                    topic: uri.topic.clone(),
                    checkpoint_ts: None,
                };
                open.send_progress(&uri, &progress).await?;
                open.commit_txn(&uri).await?;
                None
            }
        };
        tracing::info!(
            uri = %uri.uri, changefeed = %def.id, partitions, buckets,
            checkpoint = ?answer, "kafka sink open"
        );
        self.open = Some(open);
        Ok(answer)
    }
}

impl super::Sink for KafkaSink {
    async fn open(&mut self, def: &ChangefeedDef) -> Result<Option<TimeStamp>, SinkError> {
        if let Some(old) = self.open.take() {
            self.omitted += old.omitted;
        }
        self.open_inner(def).await
    }

    async fn begin_window(&mut self, from: TimeStamp, to: TimeStamp) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        check_window(open.checkpoint, from, to, open.window.is_some())?;
        open.begin(&self.uri)?;
        open.window = Some((from, to));
        self.open = Some(open);
        Ok(())
    }

    async fn write(&mut self, rows: &[Row]) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        open.write(&self.uri, rows).await?;
        self.open = Some(open);
        Ok(())
    }

    async fn commit_window(&mut self) -> Result<(), SinkError> {
        let mut open = self.open.take().ok_or_else(not_open)?;
        open.commit(&self.uri).await?;
        self.open = Some(open);
        Ok(())
    }
}

impl Open {
    fn producer(&self) -> Result<&FutureProducer, SinkError> {
        self.producer.as_ref().ok_or_else(not_open)
    }

    fn begin(&mut self, uri: &KafkaUri) -> Result<(), SinkError> {
        let producer = self.producer()?;
        // Local to the producer: it does not wait on the network.
        producer
            .begin_transaction()
            .map_err(|e| kafka_error(uri, Some(producer), "beginning a transaction", e))?;
        self.in_txn = true;
        Ok(())
    }

    async fn write(&mut self, uri: &KafkaUri, rows: &[Row]) -> Result<(), SinkError> {
        let Some((from, to)) = self.window else {
            return Err(SinkError::Protocol {
                reason: "write without begin_window".to_owned(),
            });
        };
        let id = self.def.id.to_string();
        let mut body = Vec::new();
        for row in rows {
            if row.commit_ts <= from || row.commit_ts > to {
                return Err(SinkError::Protocol {
                    reason: format!(
                        "a row at commit_ts {} lies outside the window ({from}, {to}]",
                        row.commit_ts
                    ),
                });
            }
            body.clear();
            format::encode(&self.def, row, &mut body);
            let commit_ts = row.commit_ts.to_string();
            let start_ts = row.start_ts.to_string();
            let size = OVERHEAD
                + row.key.len()
                + body.len()
                + id.len()
                + commit_ts.len()
                + start_ts.len()
                + H_CHANGEFEED.len()
                + H_COMMIT_TS.len()
                + H_START_TS.len()
                + H_VALUE_OMITTED.len();
            let omitted = size > uri.max_message_bytes;
            if omitted {
                let key_only = Row {
                    value: Bytes::new(),
                    old_value: Bytes::new(),
                    ..row.clone()
                };
                body.clear();
                format::encode(&self.def, &key_only, &mut body);
                self.omitted += 1;
                tracing::warn!(
                    uri = %uri.uri, commit_ts = %row.commit_ts, size,
                    "row larger than max-message-bytes: sent without its value"
                );
            }
            let mut headers = OwnedHeaders::new()
                .insert(header(H_CHANGEFEED, &id))
                .insert(header(H_COMMIT_TS, &commit_ts))
                .insert(header(H_START_TS, &start_ts));
            if omitted {
                headers = headers.insert(header(H_VALUE_OMITTED, "true"));
            }
            let partition = key_bucket(&row.key, self.buckets) as i32;
            let record = FutureRecord::to(&uri.topic)
                .partition(partition)
                .key(&row.key[..])
                .payload(&body[..])
                .headers(headers);
            self.send(uri, record).await?;
        }
        Ok(())
    }

    /// Queues a message, waiting for older deliveries while too many are
    /// pending or librdkafka's queue is full.
    async fn send(
        &mut self,
        uri: &KafkaUri,
        mut record: FutureRecord<'_, [u8], [u8]>,
    ) -> Result<(), SinkError> {
        loop {
            while self.pending.len() >= MAX_PENDING {
                self.deliver_one(uri).await?;
            }
            match self.producer()?.send_result(record) {
                Ok(delivery) => {
                    self.pending.push_back(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if !self.pending.is_empty() =>
                {
                    record = back;
                    self.deliver_one(uri).await?;
                }
                Err((e, _)) => {
                    return Err(kafka_error(uri, self.producer.as_ref(), "producing", e));
                }
            }
        }
    }

    /// Waits for the oldest pending message's delivery.
    async fn deliver_one(&mut self, uri: &KafkaUri) -> Result<bool, SinkError> {
        let Some(delivery) = self.pending.pop_front() else {
            return Ok(false);
        };
        match delivery.await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _))) => {
                Err(refused(
                    uri,
                    "the broker refused a message as too large: lower max-message-bytes to the topic's max.message.bytes".to_owned(),
                ))
            }
            Ok(Err((e, _))) => Err(kafka_error(uri, self.producer.as_ref(), "producing", e)),
            Err(_) => Err(SinkError::Task {
                reason: "the producer dropped a delivery report".to_owned(),
            }),
        }
    }

    async fn send_progress(
        &mut self,
        uri: &KafkaUri,
        progress: &Progress,
    ) -> Result<(), SinkError> {
        let value = serde_json::to_vec(progress).map_err(|e| SinkError::Broker {
            uri: uri.uri.clone(),
            what: "encoding the checkpoint".to_owned(),
            source: Box::new(e),
        })?;
        let id = progress.def.id.to_string();
        let record = FutureRecord::to(&uri.progress_topic)
            .partition(0)
            .key(id.as_bytes())
            .payload(&value[..]);
        self.send(uri, record).await
    }

    /// Waits for every delivery, then commits the transaction.
    async fn commit_txn(&mut self, uri: &KafkaUri) -> Result<(), SinkError> {
        while self.deliver_one(uri).await? {}
        let producer = self.producer()?.clone();
        let uri2 = uri.clone();
        blocking(move || {
            producer
                .commit_transaction(TXN_TIMEOUT)
                .map_err(|e| kafka_error(&uri2, Some(&producer), "committing the transaction", e))
        })
        .await?;
        self.in_txn = false;
        Ok(())
    }

    async fn commit(&mut self, uri: &KafkaUri) -> Result<(), SinkError> {
        let Some((_, to)) = self.window else {
            return Err(SinkError::Protocol {
                reason: "commit_window without begin_window".to_owned(),
            });
        };
        let id = self.def.id.to_string();
        let body = format!("{{\"resolved\":\"{to}\"}}");
        let resolved = to.to_string();
        for partition in 0..self.partitions {
            let headers = OwnedHeaders::new()
                .insert(header(H_CHANGEFEED, &id))
                .insert(header(H_RESOLVED_TS, &resolved));
            let record = FutureRecord::to(&uri.topic)
                .partition(partition)
                .key(&[][..])
                .payload(body.as_bytes())
                .headers(headers);
            self.send(uri, record).await?;
        }
        let progress = Progress {
            def: self.def.clone(),
            topic: uri.topic.clone(),
            checkpoint_ts: Some(to.into_inner()),
        };
        self.send_progress(uri, &progress).await?;
        self.commit_txn(uri).await?;
        self.checkpoint = to;
        self.window = None;
        Ok(())
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SinkError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Task {
            reason: e.to_string(),
        })?
}

fn refused(uri: &KafkaUri, reason: String) -> SinkError {
    SinkError::BrokerRefused {
        uri: uri.uri.clone(),
        reason,
    }
}

fn broker(uri: &KafkaUri, what: &str, e: KafkaError) -> SinkError {
    SinkError::Broker {
        uri: uri.uri.clone(),
        what: what.to_owned(),
        source: Box::new(e),
    }
}

/// Sorts a producer's error: fenced or fatal is permanent, the rest
/// (timeouts, unreachable brokers) worth a reopen.
fn kafka_error(
    uri: &KafkaUri,
    producer: Option<&FutureProducer>,
    what: &str,
    e: KafkaError,
) -> SinkError {
    let fatal = producer.and_then(|p| p.client().fatal_error());
    let code = fatal
        .as_ref()
        .map(|(c, _)| *c)
        .or_else(|| e.rdkafka_error_code());
    let fenced = matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    let is_fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal()) || fatal.is_some();
    if fenced {
        refused(
            uri,
            format!(
                "{what}: another process took this changefeed over (this producer was fenced): {e}"
            ),
        )
    } else if is_fatal {
        let detail = fatal.map(|(_, s)| s).unwrap_or_default();
        refused(
            uri,
            format!("{what}: the producer failed for good: {e} {detail}"),
        )
    } else {
        broker(uri, what, e)
    }
}

/// The settings every client of the sink shares.
fn client_config(uri: &KafkaUri, timeout: Duration) -> ClientConfig {
    let ms = timeout.as_millis().max(1000).to_string();
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &uri.brokers)
        .set("socket.timeout.ms", &ms)
        .set("socket.connection.setup.timeout.ms", &ms)
        .set("client.id", "kvfeed");
    config
}

/// The partition count of `topic`, `None` when it does not exist.
fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    uri: &KafkaUri,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, SinkError> {
    let metadata = client.fetch_metadata(Some(topic), timeout).map_err(|e| {
        broker(
            uri,
            &format!(
                "reading the metadata of topic {topic} (is a broker up at {}?)",
                uri.brokers
            ),
            e,
        )
    })?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None if t.partitions().is_empty() => Ok(None),
        None => Ok(Some(t.partitions().len() as i32)),
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(e) => Err(broker(
            uri,
            &format!("reading the metadata of topic {topic}"),
            KafkaError::MetadataFetch(e.into()),
        )),
    }
}

/// Every topic the cluster has, with its partition count (a request that
/// does not auto-create anything).
fn list_topics<C: ClientContext>(
    client: &Client<C>,
    uri: &KafkaUri,
    timeout: Duration,
) -> Result<HashMap<String, i32>, SinkError> {
    let metadata = client.fetch_metadata(None, timeout).map_err(|e| {
        broker(
            uri,
            &format!(
                "reading the cluster's metadata (is a broker up at {}?)",
                uri.brokers
            ),
            e,
        )
    })?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_owned(), t.partitions().len() as i32))
        .collect())
}

async fn create_progress_topic(uri: &KafkaUri, timeout: Duration) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> = client_config(uri, timeout)
        .create()
        .map_err(|e| refused(uri, format!("creating the admin client: {e}")))?;
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    // One partition, compacted; the broker's default replication.
    let topic = NewTopic::new(&uri.progress_topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|e| broker(uri, "creating the progress topic", e));
    // The admin client's drop joins its threads.
    tokio::task::spawn_blocking(move || drop(admin));
    for result in results? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(refused(
                    uri,
                    format!(
                        "creating the progress topic {name} failed: {code} (create it by hand: one partition, cleanup.policy=compact)"
                    ),
                ));
            }
        }
    }
    tracing::info!(uri = %uri.uri, topic = %uri.progress_topic, "created the progress topic");
    Ok(())
}

impl From<KafkaUri> for SinkUri {
    fn from(uri: KafkaUri) -> SinkUri {
        SinkUri::Kafka(uri)
    }
}

#[path = "kafka_read.rs"]
mod read;

#[cfg(test)]
#[path = "kafka_tests.rs"]
mod tests;
