//! Sink addresses: `file://`, `http(s)://`, `kafka://` and `nats://`.
//!
//! Broker URIs carry their options as query parameters. Every parameter is
//! checked when the URI is parsed — an unknown name, a repeated one or a
//! value out of range is an error naming it — so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::SinkError;
use crate::def::Format;

/// A sink's address, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkUri {
    /// `file:///DIR` (or `file://DIR` for a relative directory).
    File(PathBuf),
    /// `http://…` or `https://…`, used as it is.
    Webhook(String),
    /// `kafka://HOST:PORT[,HOST:PORT…]/TOPIC?…`.
    Kafka(KafkaUri),
    /// `nats://HOST:PORT[,HOST:PORT…]/SUBJECT_PREFIX?…`.
    Nats(NatsUri),
}

/// A Kafka sink's address and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaUri {
    /// The URI as given.
    pub uri: String,
    /// `HOST:PORT` of the bootstrap brokers, comma-separated.
    pub brokers: String,
    /// The topic rows go to.
    pub topic: String,
    /// `partition-num`: partitions rows are spread over by key; default:
    /// all of the topic's partitions.
    pub partition_num: Option<u32>,
    /// `format`: the row format, when the URI sets it.
    pub format: Option<Format>,
    /// `max-message-bytes`: larger rows are sent without their value
    /// (default 1 MiB, Kafka's default `message.max.bytes`).
    pub max_message_bytes: usize,
    /// `progress-topic`: where checkpoints go (default `TOPIC.kvfeed-progress`).
    pub progress_topic: String,
    /// `create-progress-topic`: whether a missing progress topic is created
    /// (compacted, one partition); default true.
    pub create_progress_topic: bool,
}

/// A NATS JetStream sink's address and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUri {
    /// The URI as given.
    pub uri: String,
    /// `nats://HOST:PORT` addresses of the servers, comma-separated.
    pub servers: String,
    /// Rows go to `PREFIX.<bucket>`, watermarks to `PREFIX.resolved`.
    pub subject_prefix: String,
    /// `stream`: the JetStream stream (default: the prefix with `.` turned
    /// into `_`); created over `PREFIX.>` when missing.
    pub stream: String,
    /// `subject-buckets`: how many row subjects keys are hashed over
    /// (default 16).
    pub subject_buckets: u32,
    /// `format`: the row format, when the URI sets it.
    pub format: Option<Format>,
    /// `max-message-bytes`: larger rows are sent without their value
    /// (default: the server's `max_payload` less room for headers).
    pub max_message_bytes: Option<usize>,
    /// `kv-bucket`: the key-value bucket checkpoints go to (default
    /// `kvfeed-changefeeds`).
    pub kv_bucket: String,
    /// `duplicate-window`: the duplicate window of a stream the sink
    /// creates, in seconds (default 600).
    pub duplicate_window: Duration,
}

impl SinkUri {
    /// Parses a sink URI; an unknown scheme is refused with the list of
    /// known ones.
    pub fn parse(uri: &str) -> Result<SinkUri, SinkError> {
        let bad = |reason: &str| SinkError::BadUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = uri.strip_prefix("file://") {
            if path.is_empty() {
                return Err(bad("no directory after file://"));
            }
            return Ok(SinkUri::File(PathBuf::from(path)));
        }
        if uri.starts_with("http://") || uri.starts_with("https://") {
            let host = uri.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            if host.is_empty() || host.starts_with('/') {
                return Err(bad("no host"));
            }
            return Ok(SinkUri::Webhook(uri.to_owned()));
        }
        if let Some(rest) = uri.strip_prefix("kafka://") {
            return parse_kafka(uri, rest).map(SinkUri::Kafka);
        }
        if let Some(rest) = uri.strip_prefix("nats://") {
            return parse_nats(uri, rest).map(SinkUri::Nats);
        }
        let scheme = uri.split_once("://").map_or(uri, |(scheme, _)| scheme);
        Err(SinkError::UnknownScheme {
            uri: uri.to_owned(),
            scheme: scheme.to_owned(),
        })
    }

    /// The row format the URI sets, if it sets one.
    pub fn format(&self) -> Option<Format> {
        match self {
            SinkUri::File(_) | SinkUri::Webhook(_) => None,
            SinkUri::Kafka(k) => k.format,
            SinkUri::Nats(n) => n.format,
        }
    }
}

/// A broker URI split into hosts, path and checked parameters.
struct Parts<'a> {
    uri: &'a str,
    hosts: &'a str,
    path: &'a str,
    params: BTreeMap<&'a str, &'a str>,
}

impl<'a> Parts<'a> {
    fn split(uri: &'a str, rest: &'a str, known: &[&str]) -> Result<Parts<'a>, SinkError> {
        let bad = |reason: String| SinkError::BadUri {
            uri: uri.to_owned(),
            reason,
        };
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, path) = main.split_once('/').unwrap_or((main, ""));
        if hosts.is_empty() {
            return Err(bad("no HOST:PORT".to_owned()));
        }
        for host in hosts.split(',') {
            let port = host.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0) {
                return Err(bad(format!("{host:?} is not HOST:PORT")));
            }
        }
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("parameter {pair:?} has no value (NAME=VALUE)")))?;
            if !known.contains(&name) {
                return Err(bad(format!(
                    "unknown parameter {name:?}; known: {}",
                    known.join(", ")
                )));
            }
            if value.is_empty() || value.contains('%') {
                return Err(bad(format!(
                    "parameter {name}: {value:?} is empty or percent-encoded"
                )));
            }
            if params.insert(name, value).is_some() {
                return Err(bad(format!("parameter {name} given twice")));
            }
        }
        Ok(Parts {
            uri,
            hosts,
            path,
            params,
        })
    }

    fn bad(&self, reason: String) -> SinkError {
        SinkError::BadUri {
            uri: self.uri.to_owned(),
            reason,
        }
    }

    fn format(&self) -> Result<Option<Format>, SinkError> {
        self.params
            .get("format")
            .map(|f| Format::parse(f).map_err(|e| self.bad(e.to_string())))
            .transpose()
    }

    fn number<T: std::str::FromStr + PartialOrd>(
        &self,
        name: &str,
        min: T,
        max: T,
    ) -> Result<Option<T>, SinkError> {
        let Some(text) = self.params.get(name) else {
            return Ok(None);
        };
        match text.parse::<T>() {
            Ok(n) if n >= min && n <= max => Ok(Some(n)),
            _ => Err(self.bad(format!(
                "parameter {name}: {text:?} is not a whole number in range"
            ))),
        }
    }

    fn flag(&self, name: &str) -> Result<Option<bool>, SinkError> {
        match self.params.get(name).copied() {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(self.bad(format!(
                "parameter {name}: {other:?} is neither true nor false"
            ))),
        }
    }
}

/// Whether `name` is a legal Kafka topic name.
fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_kafka(uri: &str, rest: &str) -> Result<KafkaUri, SinkError> {
    let parts = Parts::split(
        uri,
        rest,
        &[
            "partition-num",
            "format",
            "max-message-bytes",
            "progress-topic",
            "create-progress-topic",
        ],
    )?;
    if !valid_topic(parts.path) {
        return Err(parts.bad(format!(
            "topic {:?}: 1 to 249 of letters, digits, '.', '_', '-'",
            parts.path
        )));
    }
    let progress_topic = parts
        .params
        .get("progress-topic")
        .map(|t| (*t).to_owned())
        .unwrap_or_else(|| format!("{}.kvfeed-progress", parts.path));
    if !valid_topic(&progress_topic) {
        return Err(parts.bad(format!(
            "progress topic {progress_topic:?} is not a legal topic name"
        )));
    }
    if progress_topic == parts.path {
        return Err(parts.bad("the progress topic must differ from the topic".to_owned()));
    }
    Ok(KafkaUri {
        uri: uri.to_owned(),
        brokers: parts.hosts.to_owned(),
        topic: parts.path.to_owned(),
        partition_num: parts.number("partition-num", 1, 1 << 20)?,
        format: parts.format()?,
        max_message_bytes: parts
            .number("max-message-bytes", 1024, 1 << 30)?
            .unwrap_or(1 << 20),
        progress_topic,
        create_progress_topic: parts.flag("create-progress-topic")?.unwrap_or(true),
    })
}

/// Whether `token` is a legal NATS subject token for a name we make up.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn parse_nats(uri: &str, rest: &str) -> Result<NatsUri, SinkError> {
    let parts = Parts::split(
        uri,
        rest,
        &[
            "stream",
            "subject-buckets",
            "format",
            "max-message-bytes",
            "kv-bucket",
            "duplicate-window",
        ],
    )?;
    if !parts.path.split('.').all(valid_token) {
        return Err(parts.bad(format!(
            "subject prefix {:?}: dot-separated tokens of letters, digits, '_', '-'",
            parts.path
        )));
    }
    let stream = parts
        .params
        .get("stream")
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| parts.path.replace('.', "_"));
    if !valid_token(&stream) {
        return Err(parts.bad(format!("stream {stream:?}: letters, digits, '_', '-'")));
    }
    let kv_bucket = parts
        .params
        .get("kv-bucket")
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| "kvfeed-changefeeds".to_owned());
    if !valid_token(&kv_bucket) {
        return Err(parts.bad(format!(
            "kv-bucket {kv_bucket:?}: letters, digits, '_', '-'"
        )));
    }
    let servers = parts
        .hosts
        .split(',')
        .map(|h| format!("nats://{h}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(NatsUri {
        uri: uri.to_owned(),
        servers,
        subject_prefix: parts.path.to_owned(),
        stream,
        subject_buckets: parts.number("subject-buckets", 1, 1 << 16)?.unwrap_or(16),
        format: parts.format()?,
        max_message_bytes: parts.number("max-message-bytes", 1024, 1 << 30)?,
        kv_bucket,
        duplicate_window: Duration::from_secs(
            parts
                .number("duplicate-window", 1, 7 * 24 * 3600)?
                .unwrap_or(600),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(uri: &str) -> String {
        match SinkUri::parse(uri) {
            Err(SinkError::BadUri { reason, .. }) => reason,
            other => panic!("{uri}: expected BadUri, got {other:?}"),
        }
    }

    #[test]
    fn file_and_webhook_uris_parse() {
        assert_eq!(
            SinkUri::parse("file:///tmp/out").ok(),
            Some(SinkUri::File(PathBuf::from("/tmp/out")))
        );
        assert_eq!(
            SinkUri::parse("file://out").ok(),
            Some(SinkUri::File(PathBuf::from("out")))
        );
        assert_eq!(
            SinkUri::parse("https://example.com/hook").ok(),
            Some(SinkUri::Webhook("https://example.com/hook".to_owned()))
        );
        assert!(matches!(
            SinkUri::parse("amqp://localhost:5672/q"),
            Err(SinkError::UnknownScheme { scheme, .. }) if scheme == "amqp"
        ));
        assert!(matches!(
            SinkUri::parse("/tmp/out"),
            Err(SinkError::UnknownScheme { .. })
        ));
        assert!(SinkUri::parse("file://").is_err());
        assert!(SinkUri::parse("http:///x").is_err());
    }

    #[test]
    fn kafka_uris_parse_with_defaults() {
        let Ok(SinkUri::Kafka(k)) = SinkUri::parse("kafka://127.0.0.1:9092/orders") else {
            panic!("kafka URI refused");
        };
        assert_eq!(k.brokers, "127.0.0.1:9092");
        assert_eq!(k.topic, "orders");
        assert_eq!(k.progress_topic, "orders.kvfeed-progress");
        assert_eq!(k.partition_num, None);
        assert_eq!(k.max_message_bytes, 1 << 20);
        assert!(k.create_progress_topic);
        let Ok(SinkUri::Kafka(k)) = SinkUri::parse(
            "kafka://a:1,b:2/t?partition-num=3&format=debezium&max-message-bytes=4096&progress-topic=p&create-progress-topic=false",
        ) else {
            panic!("kafka URI refused");
        };
        assert_eq!(k.brokers, "a:1,b:2");
        assert_eq!(k.partition_num, Some(3));
        assert_eq!(k.format, Some(Format::Debezium));
        assert_eq!(k.max_message_bytes, 4096);
        assert_eq!(k.progress_topic, "p");
        assert!(!k.create_progress_topic);
    }

    #[test]
    fn nats_uris_parse_with_defaults() {
        let Ok(SinkUri::Nats(n)) = SinkUri::parse("nats://127.0.0.1:4222/cdc.orders") else {
            panic!("nats URI refused");
        };
        assert_eq!(n.servers, "nats://127.0.0.1:4222");
        assert_eq!(n.subject_prefix, "cdc.orders");
        assert_eq!(n.stream, "cdc_orders");
        assert_eq!(n.subject_buckets, 16);
        assert_eq!(n.kv_bucket, "kvfeed-changefeeds");
        assert_eq!(n.duplicate_window, Duration::from_secs(600));
        assert_eq!(n.max_message_bytes, None);
        let Ok(SinkUri::Nats(n)) = SinkUri::parse(
            "nats://h:1,h:2/p?stream=S&subject-buckets=4&format=json&kv-bucket=b&duplicate-window=60&max-message-bytes=2048",
        ) else {
            panic!("nats URI refused");
        };
        assert_eq!(n.servers, "nats://h:1,nats://h:2");
        assert_eq!(n.stream, "S");
        assert_eq!(n.subject_buckets, 4);
        assert_eq!(n.format, Some(Format::Json));
        assert_eq!(n.max_message_bytes, Some(2048));
    }

    #[test]
    fn bad_broker_uris_name_what_is_wrong() {
        assert!(reason("kafka:///t").contains("HOST:PORT"));
        assert!(reason("kafka://h/t").contains("HOST:PORT"));
        assert!(reason("kafka://h:0/t").contains("HOST:PORT"));
        assert!(reason("kafka://h:1/").contains("topic"));
        assert!(reason("kafka://h:1/a b").contains("topic"));
        assert!(reason("kafka://h:1/t?partitions=3").contains("unknown parameter"));
        assert!(reason("kafka://h:1/t?partition-num=0").contains("partition-num"));
        assert!(reason("kafka://h:1/t?partition-num=x").contains("partition-num"));
        assert!(reason("kafka://h:1/t?partition-num=1&partition-num=2").contains("twice"));
        assert!(reason("kafka://h:1/t?format=xml").contains("xml"));
        assert!(reason("kafka://h:1/t?max-message-bytes=1").contains("max-message-bytes"));
        assert!(reason("kafka://h:1/t?progress-topic=t").contains("differ"));
        assert!(reason("kafka://h:1/t?create-progress-topic=yes").contains("true nor false"));
        assert!(reason("kafka://h:1/t?format").contains("no value"));
        assert!(reason("nats://h:1/").contains("subject prefix"));
        assert!(reason("nats://h:1/a..b").contains("subject prefix"));
        assert!(reason("nats://h:1/a.>").contains("subject prefix"));
        assert!(reason("nats://h:1/a?stream=x.y").contains("stream"));
        assert!(reason("nats://h:1/a?subject-buckets=0").contains("subject-buckets"));
        assert!(reason("nats://h:1/a?duplicate-window=0").contains("duplicate-window"));
        assert!(reason("nats://h:1/a?kv-bucket=a.b").contains("kv-bucket"));
        assert!(reason("nats://h:1/a?stream=%41").contains("percent"));
    }
}
