//! What a changefeed is: its name, the range it follows, its key mode, its
//! format and where it started. A sink keeps this definition beside its
//! checkpoint, so a restart (or `kvfeed verify`) learns everything from the
//! sink, and a sink that holds another changefeed is refused rather than
//! mixed into.

use std::fmt;

use kvfeed_client::KeyMode;
use kvfeed_client::text::hex;
use kvfeed_types::TimeStamp;
use serde::{Deserialize, Serialize};

use crate::error::DefError;

/// The longest changefeed id, in bytes. It names a PD service safe point
/// (PD caps those ids too) and appears in file names and message ids.
pub const MAX_ID_LEN: usize = 128;

/// A changefeed's name: 1 to [`MAX_ID_LEN`] characters out of ASCII letters,
/// digits, `-`, `_` and `.`, not starting with `.` — safe in a file name, a
/// URL, a NATS subject and a Kafka header alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChangefeedId(String);

impl ChangefeedId {
    /// Checks `id` against the rules above.
    pub fn new(id: impl Into<String>) -> Result<ChangefeedId, DefError> {
        let id = id.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if id.is_empty() || id.len() > MAX_ID_LEN || id.starts_with('.') || !id.chars().all(allowed)
        {
            return Err(DefError::BadId { id });
        }
        Ok(ChangefeedId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ChangefeedId {
    type Error = DefError;
    fn try_from(id: String) -> Result<Self, DefError> {
        ChangefeedId::new(id)
    }
}

impl From<ChangefeedId> for String {
    fn from(id: ChangefeedId) -> String {
        id.0
    }
}

impl fmt::Display for ChangefeedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How rows are written into the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// kvfeed's own JSON object per row (see `format`).
    Json,
    /// The Debezium change-event envelope (`before`, `after`, `op`,
    /// `source`), so existing Debezium consumers read it.
    Debezium,
}

impl Format {
    /// Parses `json` or `debezium`.
    pub fn parse(text: &str) -> Result<Format, DefError> {
        match text {
            "json" => Ok(Format::Json),
            "debezium" => Ok(Format::Debezium),
            other => Err(DefError::BadFormat {
                format: other.to_owned(),
            }),
        }
    }

    /// The name `parse` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Debezium => "debezium",
        }
    }
}

/// The key space, as the definition stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Transactional keys.
    Txn,
    /// Raw keys.
    Raw,
}

impl From<Mode> for KeyMode {
    fn from(mode: Mode) -> KeyMode {
        match mode {
            Mode::Txn => KeyMode::Txn,
            Mode::Raw => KeyMode::Raw,
        }
    }
}

/// A changefeed's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangefeedDef {
    /// Its name, unique per sink and per PD (it names the GC service safe point).
    pub id: ChangefeedId,
    /// Transactional or raw keys.
    pub mode: Mode,
    /// Inclusive lower bound of the followed user keys (empty = from the first).
    #[serde(with = "hex_bytes")]
    pub start: Vec<u8>,
    /// Exclusive upper bound (empty = unbounded).
    #[serde(with = "hex_bytes")]
    pub end: Vec<u8>,
    /// Row format in the sink.
    pub format: Format,
    /// Whether rows carry the value before the change (asked of the server
    /// with `extra_op = ReadOldValue`). Always on for [`Format::Debezium`],
    /// whose `before` and `op` need it.
    pub old_value: bool,
    /// Changes committed after it are delivered, on the first run; a restart
    /// resumes from the sink's checkpoint instead.
    #[serde(with = "ts_u64")]
    pub start_ts: TimeStamp,
}

impl ChangefeedDef {
    /// Checks the parts that can be wrong on their own: the range must not
    /// be empty (`start < end` unless `end` is unbounded).
    pub fn validate(&self) -> Result<(), DefError> {
        if !self.end.is_empty() && self.start >= self.end {
            return Err(DefError::EmptyRange {
                start: hex(&self.start),
                end: hex(&self.end),
            });
        }
        if self.format == Format::Debezium && !self.old_value {
            return Err(DefError::DebeziumNeedsOldValue);
        }
        Ok(())
    }

    /// Whether `other` describes the same changefeed: everything but the
    /// start ts, which only matters before the first checkpoint.
    pub fn same_feed(&self, other: &ChangefeedDef) -> bool {
        let strip = |d: &ChangefeedDef| ChangefeedDef {
            start_ts: TimeStamp::ZERO,
            ..d.clone()
        };
        strip(self) == strip(other)
    }
}

/// Byte strings as lower-case hex in the stored definition: exact, and
/// readable next to the `_hex` fields of the rows.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&kvfeed_client::text::hex(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        crate::def::parse_hex(&text).ok_or_else(|| serde::de::Error::custom("invalid hex"))
    }
}

/// A timestamp as the plain integer TiKV's tools print.
pub mod ts_u64 {
    use kvfeed_types::TimeStamp;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises `ts` as its `u64`.
    pub fn serialize<S: Serializer>(ts: &TimeStamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(ts.into_inner())
    }

    /// Reads a `u64` as a timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TimeStamp, D::Error> {
        u64::deserialize(d).map(TimeStamp::new)
    }
}

pub use kvfeed_client::text::parse_hex;

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> ChangefeedDef {
        ChangefeedDef {
            id: ChangefeedId::new("orders-1").expect("id"),
            mode: Mode::Txn,
            start: b"a".to_vec(),
            end: vec![0xff, 0x00],
            format: Format::Json,
            old_value: false,
            start_ts: TimeStamp::new(42),
        }
    }

    #[test]
    fn ids_are_checked() {
        for good in ["a", "orders-1", "x_y.z", &"n".repeat(MAX_ID_LEN)] {
            assert!(ChangefeedId::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"n".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(ChangefeedId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definitions_round_trip_through_json() {
        let text = serde_json::to_string(&def()).expect("serialise");
        assert!(text.contains("\"end\":\"ff00\""), "{text}");
        let back: ChangefeedDef = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, def());
        let bad = text.replace("orders-1", "a/b");
        assert!(serde_json::from_str::<ChangefeedDef>(&bad).is_err());
    }

    #[test]
    fn empty_ranges_and_debezium_without_old_values_are_refused() {
        assert!(def().validate().is_ok());
        let empty = ChangefeedDef {
            end: b"a".to_vec(),
            ..def()
        };
        assert!(matches!(empty.validate(), Err(DefError::EmptyRange { .. })));
        let unbounded = ChangefeedDef {
            end: Vec::new(),
            ..def()
        };
        assert!(unbounded.validate().is_ok());
        let debezium = ChangefeedDef {
            format: Format::Debezium,
            ..def()
        };
        assert!(debezium.validate().is_err());
    }

    #[test]
    fn same_feed_ignores_only_the_start_ts() {
        let later = ChangefeedDef {
            start_ts: TimeStamp::new(99),
            ..def()
        };
        assert!(def().same_feed(&later));
        let raw = ChangefeedDef {
            mode: Mode::Raw,
            ..def()
        };
        assert!(!def().same_feed(&raw));
    }
}
