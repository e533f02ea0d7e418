//! `[[changefeed]]` tables: changefeeds that `kvfeed serve` runs itself.
//!
//! Each table is one changefeed, as `kvfeed changefeed run` would run it
//! with the same flags (the definition is built by the same code, so a
//! table and a standalone run of the same settings are the same feed):
//!
//! ```toml
//! [[changefeed]]
//! id = "orders"                  # required: letters, digits, '-', '_', '.'
//! sink = "file:///var/lib/orders" # required: file://DIR, http://…, https://…
//! prefix = "orders/"             # or from-key / to-key; none = every key
//! # from-key = "a"               # inclusive start
//! # to-key = "m"                 # exclusive end
//! # hex-keys = true              # prefix / from-key / to-key are hex
//! raw = false                    # raw keys instead of transactional ones
//! # start-ts = 4242              # default: a fresh TSO at the first start
//! format = "json"                # or "debezium"
//! old-value = false              # always on for debezium
//! memory-mib = 64                # rows in memory before the sorter spills
//! gc-ttl = 86400                 # seconds PD keeps history for a stopped feed
//! ```
//!
//! Invariant: every table [`validate`] accepted turns into a definition
//! ([`ChangefeedConfig::def`]) and a sink without error, so nothing is left
//! to fail for bad settings once the server runs; a mistake stops the
//! server at start, naming the table (its number and id).

use kvfeed_changefeed::sink::SinkUri;
use kvfeed_changefeed::{ChangefeedDef, RunOptions};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use super::ConfigError;
use crate::cmd::changefeed::RunArgs;

/// Default `memory-mib`.
const DEFAULT_MEMORY_MIB: usize = 64;
/// Default `gc-ttl`: a day, TiCDC's default.
const DEFAULT_GC_TTL_SECS: u64 = 24 * 3600;

/// One `[[changefeed]]` table; see the module docs for the keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChangefeedConfig {
    /// `id`: the changefeed's name (also its PD service safe point's).
    pub id: String,
    /// `sink`: where rows go, `file:///DIR`, `http://…` or `https://…`.
    pub sink: String,
    /// `prefix`: follow the keys under it (not with `from-key`/`to-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `from-key`: inclusive start of the range (default: the first key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_key: Option<String>,
    /// `to-key`: exclusive end of the range (default: unbounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_key: Option<String>,
    /// `hex-keys`: the keys above are hex. Default false.
    #[serde(default)]
    pub hex_keys: bool,
    /// `raw`: follow raw keys instead of transactional ones. Default false.
    #[serde(default)]
    pub raw: bool,
    /// `start-ts`: deliver changes committed after it; default a fresh TSO
    /// when the changefeed starts without a checkpoint in its sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ts: Option<u64>,
    /// `format`: `json` or `debezium` (default: the sink URI's `format`
    /// parameter, else `json`).
    #[serde(default)]
    pub format: Option<String>,
    /// `old-value`: rows carry the value before the change. Default false
    /// (always on for debezium).
    #[serde(default)]
    pub old_value: bool,
    /// `memory-mib`: rows kept in memory before the sorter spills. At
    /// least 1. Default 64.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// `gc-ttl`: seconds PD keeps history for this changefeed once it
    /// stopped renewing its service safe point. At least 1. Default 86400.
    #[serde(default = "default_gc_ttl")]
    pub gc_ttl: u64,
}

fn default_memory_mib() -> usize {
    DEFAULT_MEMORY_MIB
}

fn default_gc_ttl() -> u64 {
    DEFAULT_GC_TTL_SECS
}

impl ChangefeedConfig {
    /// The table as the flags of `kvfeed changefeed run`, so both build
    /// their definition and options with the same code.
    fn run_args(&self) -> RunArgs {
        RunArgs {
            pd: String::new(),
            id: self.id.clone(),
            sink: self.sink.clone(),
            prefix: self.prefix.clone(),
            from_key: self.from_key.clone(),
            to_key: self.to_key.clone(),
            hex: self.hex_keys,
            raw: self.raw,
            start_ts: self.start_ts,
            format: self.format.clone(),
            old_value: self.old_value,
            state_dir: None,
            memory_mib: self.memory_mib,
            gc_ttl: self.gc_ttl,
        }
    }

    /// The definition the table describes. Its start ts is `start-ts`, or
    /// 0 when unset: the caller fills in a fresh TSO.
    pub fn def(&self) -> Result<ChangefeedDef, String> {
        self.run_args().def().map_err(|e| e.to_string())
    }

    /// How the changefeed runs.
    pub fn options(&self) -> RunOptions {
        self.run_args().options()
    }

    /// Everything that can be wrong with the table on its own.
    fn check(&self) -> Result<(), String> {
        if self.prefix.is_some() && (self.from_key.is_some() || self.to_key.is_some()) {
            return Err("prefix cannot be combined with from-key or to-key".to_owned());
        }
        if self.to_key.as_deref() == Some("") {
            return Err(
                "to-key must not be empty (leave it out for an unbounded range)".to_owned(),
            );
        }
        SinkUri::parse(&self.sink).map_err(|e| format!("sink: {e}"))?;
        if self.memory_mib == 0 {
            return Err("memory-mib must be at least 1".to_owned());
        }
        if self.gc_ttl == 0 {
            return Err("gc-ttl must be at least 1 (second)".to_owned());
        }
        if i64::try_from(self.gc_ttl).is_err() {
            return Err(format!("gc-ttl {} is too large", self.gc_ttl));
        }
        self.def().map(drop)
    }
}

/// Checks every table and that no two share an id.
pub(super) fn validate(tables: &[ChangefeedConfig]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (index, table) in tables.iter().enumerate() {
        let invalid = |reason: String| ConfigError::Changefeed {
            number: index + 1,
            id: table.id.clone(),
            reason,
        };
        table.check().map_err(invalid)?;
        if !seen.insert(table.id.as_str()) {
            return Err(invalid(
                "another [[changefeed]] table has the same id; ids must be unique".to_owned(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kvfeed_changefeed::{Format, Mode};

    use crate::config::Config;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).expect("parses")
    }

    /// The validation error's text for `tables` (a TOML fragment).
    fn refused(tables: &str) -> String {
        let cfg = parse(tables);
        match cfg.validate() {
            Err(err @ ConfigError::Changefeed { .. }) => err.to_string(),
            other => panic!("expected a [[changefeed]] error for {tables}, got {other:?}"),
        }
    }

    #[test]
    fn tables_parse_with_defaults() {
        let cfg = parse(
            r#"
            [[changefeed]]
            id = "orders"
            sink = "file:///tmp/orders"
            prefix = "orders/"

            [[changefeed]]
            id = "raw-all"
            sink = "https://example.com/hook"
            raw = true
            from-key = "61"
            to-key = "7a"
            hex-keys = true
            start-ts = 42
            format = "debezium"
            memory-mib = 8
            gc-ttl = 600
            "#,
        );
        cfg.validate().expect("valid");
        let [orders, raw] = cfg.changefeed.as_slice() else {
            panic!("two tables, got {:?}", cfg.changefeed);
        };
        assert_eq!(orders.format, None);
        assert_eq!(orders.memory_mib, 64);
        assert_eq!(orders.gc_ttl, 86_400);
        assert_eq!(orders.start_ts, None);
        let def = orders.def().expect("def");
        assert_eq!(def.mode, Mode::Txn);
        assert_eq!(def.start, b"orders/".to_vec());
        assert_eq!(def.end, b"orders0".to_vec());
        assert_eq!(def.start_ts.into_inner(), 0);
        assert!(!def.old_value);

        let def = raw.def().expect("def");
        assert_eq!(def.mode, Mode::Raw);
        assert_eq!(
            (def.start.as_slice(), def.end.as_slice()),
            (&b"a"[..], &b"z"[..])
        );
        assert_eq!(def.format, Format::Debezium);
        assert!(def.old_value, "debezium implies old values");
        assert_eq!(def.start_ts.into_inner(), 42);
        let options = raw.options();
        assert_eq!(options.memory_budget, 8 << 20);
        assert_eq!(options.gc_ttl, Duration::from_secs(600));
    }

    #[test]
    fn no_tables_is_the_default() {
        assert!(Config::default().changefeed.is_empty());
        parse("").validate().expect("valid");
    }

    #[test]
    fn missing_and_unknown_keys_are_parse_errors() {
        let err = Config::parse("[[changefeed]]\nsink = \"file:///x\"\n")
            .expect_err("no id")
            .to_string();
        assert!(err.contains("missing field `id`"), "{err}");
        let err = Config::parse("[[changefeed]]\nid = \"a\"\n")
            .expect_err("no sink")
            .to_string();
        assert!(err.contains("missing field `sink`"), "{err}");
        let err = Config::parse("[[changefeed]]\nid = \"a\"\nsink = \"file:///x\"\nsinc = 1\n")
            .expect_err("typo")
            .to_string();
        assert!(err.contains("unknown field `sinc`"), "{err}");
    }

    #[test]
    fn bad_tables_are_refused_naming_the_table() {
        let table = |id: &str, rest: &str| {
            format!(
                "[[changefeed]]\nid = \"ok\"\nsink = \"file:///ok\"\n\
                 [[changefeed]]\nid = {id:?}\n{rest}\n"
            )
        };
        for (text, expect) in [
            (
                table("a/b", "sink = \"file:///x\""),
                "invalid changefeed id",
            ),
            (table("", "sink = \"file:///x\""), "invalid changefeed id"),
            (
                table("k", "sink = \"amqp://broker:5672/q\""),
                "unknown sink scheme \"amqp\"",
            ),
            (table("k", "sink = \"file://\""), "no directory"),
            (
                table("f", "sink = \"file:///x\"\nformat = \"avro\""),
                "unknown format \"avro\"",
            ),
            (
                table(
                    "e",
                    "sink = \"file:///x\"\nfrom-key = \"b\"\nto-key = \"a\"",
                ),
                "is empty",
            ),
            (
                table(
                    "e",
                    "sink = \"file:///x\"\nfrom-key = \"b\"\nto-key = \"b\"",
                ),
                "is empty",
            ),
            (
                table("e", "sink = \"file:///x\"\nto-key = \"\""),
                "to-key must not be empty",
            ),
            (
                table(
                    "p",
                    "sink = \"file:///x\"\nprefix = \"a\"\nfrom-key = \"a\"",
                ),
                "prefix cannot be combined",
            ),
            (
                table("p", "sink = \"file:///x\"\nprefix = \"a\"\nto-key = \"b\""),
                "prefix cannot be combined",
            ),
            (
                table(
                    "h",
                    "sink = \"file:///x\"\nhex-keys = true\nprefix = \"zz\"",
                ),
                "invalid hex",
            ),
            (table("ok", "sink = \"file:///y\""), "same id"),
            (
                table("m", "sink = \"file:///x\"\nmemory-mib = 0"),
                "memory-mib",
            ),
            (table("g", "sink = \"file:///x\"\ngc-ttl = 0"), "gc-ttl"),
        ] {
            let err = refused(&text);
            assert!(err.contains(expect), "{text}: {err}");
            assert!(err.contains("[[changefeed]] table 2"), "{text}: {err}");
        }
        let err = refused(&table("x.y", "sink = \"file:///x\"\nformat = \"avro\""));
        assert!(err.contains("id \"x.y\""), "{err}");
    }
}
