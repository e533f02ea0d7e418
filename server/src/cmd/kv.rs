//! `kvfeed put`, `get`, `delete` and `scan`: one key-value operation per
//! run, transactional by default, raw with `--raw`.
//!
//! Output contract (what scripts may rely on):
//! - `put` and `delete` print `OK` (with `--json`, the key and, for
//!   transactions, the start and commit timestamps);
//! - `get` prints the value alone: as it is when valid UTF-8, escaped
//!   otherwise (`\xNN`), hex with `--hex`. A missing key prints nothing on
//!   stdout and fails with `kvfeed: key not found`, so `$?` tells absence
//!   from an empty value;
//! - `scan` prints one `key = value` line per pair, keys and values escaped
//!   so a line never breaks; nothing at all for an empty range.

use clap::Args;

use super::format::{JsonEntry, Style, prefix_successor};
use super::{ClientArgs, CmdError, Output, block_on};
use kvfeed_client::Cluster;
use kvfeed_client::txn::Written;

/// Default `--limit` of `scan`.
pub const DEFAULT_SCAN_LIMIT: u64 = 1000;

#[derive(Debug, Clone, Args)]
pub struct PutArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The key (use `--` before a key that starts with `-`).
    pub key: String,
    /// The value.
    pub value: String,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The key (use `--` before a key that starts with `-`).
    pub key: String,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The key (use `--` before a key that starts with `-`).
    pub key: String,
}

#[derive(Debug, Clone, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Only keys that start with PREFIX.
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["from", "to"])]
    pub prefix: Option<String>,

    /// First key of the range (inclusive) [default: the first key]
    #[arg(long, value_name = "KEY")]
    pub from: Option<String>,

    /// End of the range (exclusive) [default: no end]
    #[arg(long, value_name = "KEY")]
    pub to: Option<String>,

    /// Print at most N pairs; 0 means no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SCAN_LIMIT)]
    pub limit: u64,
}

impl ScanArgs {
    /// The scan's `[start, end)` in user keys (empty `end` = unbounded).
    pub fn range(&self) -> Result<(Vec<u8>, Vec<u8>), CmdError> {
        let c = &self.client;
        if let Some(prefix) = &self.prefix {
            let start = c.parse("prefix", prefix)?;
            let end = prefix_successor(&start).unwrap_or_default();
            return Ok((start, end));
        }
        let start = match &self.from {
            Some(from) => c.parse("--from key", from)?,
            None => Vec::new(),
        };
        let end = match &self.to {
            Some(to) => c.parse("--to key", to)?,
            None => Vec::new(),
        };
        if self.to.is_some() && end <= start {
            return Err(CmdError::Usage(
                "--to must sort after --from (the range is [from, to))".to_owned(),
            ));
        }
        Ok((start, end))
    }
}

fn parse_key(client: &ClientArgs, arg: &str) -> Result<Vec<u8>, CmdError> {
    let key = client.parse("key", arg)?;
    if key.is_empty() {
        return Err(CmdError::Usage("the key must not be empty".to_owned()));
    }
    Ok(key)
}

/// The `--json` line of a write.
fn written_entry(key: &[u8], value: Option<&[u8]>, written: Option<Written>) -> String {
    let mut entry = match value {
        Some(value) => JsonEntry::pair(key, value),
        None => JsonEntry::key(key),
    };
    if let Some(w) = written {
        entry.start_ts = Some(w.start_ts.into_inner());
        entry.commit_ts = Some(w.commit_ts.into_inner());
    }
    entry.to_line()
}

/// `kvfeed put KEY VALUE`.
pub fn put(args: &PutArgs) -> Result<(), CmdError> {
    let c = &args.client;
    let key = parse_key(c, &args.key)?;
    let value = c.parse("value", &args.value)?;
    block_on(async {
        let cluster = Cluster::connect(&c.pd).await?;
        let written = if c.raw {
            cluster.raw_put(&key, &value).await?;
            None
        } else {
            Some(cluster.txn_put(&key, &value).await?)
        };
        let mut out = Output::stdout();
        if c.json {
            out.line(&written_entry(&key, Some(&value), written))?;
        } else {
            out.line("OK")?;
        }
        out.flush()
    })
}

/// `kvfeed get KEY`.
pub fn get(args: &GetArgs) -> Result<(), CmdError> {
    let c = &args.client;
    let key = parse_key(c, &args.key)?;
    block_on(async {
        let cluster = Cluster::connect(&c.pd).await?;
        let value = if c.raw {
            cluster.raw_get(&key).await?
        } else {
            cluster.txn_get(&key).await?
        };
        let value = value.ok_or(CmdError::NotFound)?;
        let mut out = Output::stdout();
        if c.json {
            out.line(&JsonEntry::pair(&key, &value).to_line())?;
        } else {
            out.line(&c.style().show_value(&value))?;
        }
        out.flush()
    })
}

/// `kvfeed delete KEY`.
pub fn delete(args: &DeleteArgs) -> Result<(), CmdError> {
    let c = &args.client;
    let key = parse_key(c, &args.key)?;
    block_on(async {
        let cluster = Cluster::connect(&c.pd).await?;
        let written = if c.raw {
            cluster.raw_delete(&key).await?;
            None
        } else {
            Some(cluster.txn_delete(&key).await?)
        };
        let mut out = Output::stdout();
        if c.json {
            out.line(&written_entry(&key, None, written))?;
        } else {
            out.line("OK")?;
        }
        out.flush()
    })
}

/// `kvfeed scan`.
pub fn scan(args: &ScanArgs) -> Result<(), CmdError> {
    let c = &args.client;
    let (start, end) = args.range()?;
    let limit = (args.limit > 0).then_some(args.limit);
    block_on(async {
        let cluster = Cluster::connect(&c.pd).await?;
        let mut scanner = cluster.scan(c.mode(), &start, &end, limit).await?;
        let mut out = Output::stdout();
        let style = c.style();
        while let Some(page) = scanner.next_page().await? {
            for pair in &page {
                out.line(&scan_line(style, c.json, &pair.key, &pair.value))?;
            }
            if out.is_closed() {
                break;
            }
        }
        out.flush()
    })
}

/// One line of `scan` output.
fn scan_line(style: Style, json: bool, key: &[u8], value: &[u8]) -> String {
    if json {
        JsonEntry::pair(key, value).to_line()
    } else {
        format!("{} = {}", style.show(key), style.show(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kvfeed").chain(args.iter().copied()))
    }

    fn scan_args(args: &[&str]) -> ScanArgs {
        let cli = parse(&[&["scan"], args].concat()).expect("parses");
        match cli.command {
            Command::Scan(a) => a,
            other => panic!("expected scan, got {other:?}"),
        }
    }

    #[test]
    fn put_parses_flags_in_any_order() {
        let cli = parse(&["put", "--raw", "k", "v", "--pd", "http://h:1", "--json"]).expect("ok");
        let Command::Put(a) = cli.command else {
            panic!("expected put");
        };
        assert_eq!((a.key.as_str(), a.value.as_str()), ("k", "v"));
        assert!(a.client.raw && a.client.json && !a.client.hex);
        assert_eq!(a.client.pd, "http://h:1");
    }

    #[test]
    fn defaults_are_transactional_text_and_the_serve_address() {
        let cli = parse(&["get", "k"]).expect("ok");
        let Command::Get(a) = cli.command else {
            panic!("expected get");
        };
        assert!(!a.client.raw && !a.client.json && !a.client.hex);
        assert_eq!(a.client.pd, super::super::DEFAULT_PD);
        assert_eq!(a.client.mode(), kvfeed_client::KeyMode::Txn);
    }

    #[test]
    fn missing_or_extra_arguments_are_refused() {
        assert!(parse(&["put", "k"]).is_err());
        assert!(parse(&["get"]).is_err());
        assert!(parse(&["delete", "a", "b"]).is_err());
        assert!(parse(&["scan", "--prefix", "a", "--from", "b"]).is_err());
        assert!(parse(&["scan", "--limit", "-1"]).is_err());
    }

    #[test]
    fn scan_ranges() {
        let a = scan_args(&[]);
        assert_eq!(a.limit, DEFAULT_SCAN_LIMIT);
        assert_eq!(a.range().expect("range"), (vec![], vec![]));

        let a = scan_args(&["--prefix", "ab"]);
        assert_eq!(a.range().expect("range"), (b"ab".to_vec(), b"ac".to_vec()));

        let a = scan_args(&["--hex", "--prefix", "ffff"]);
        assert_eq!(a.range().expect("range"), (vec![0xff, 0xff], vec![]));

        let a = scan_args(&["--from", "b", "--to", "d", "--limit", "0"]);
        assert_eq!(a.range().expect("range"), (b"b".to_vec(), b"d".to_vec()));
        assert_eq!(a.limit, 0);

        let a = scan_args(&["--from", "d", "--to", "b"]);
        assert!(matches!(a.range(), Err(CmdError::Usage(_))));

        let a = scan_args(&["--hex", "--from", "zz"]);
        assert!(matches!(a.range(), Err(CmdError::Hex { .. })));
    }

    #[test]
    fn empty_and_bad_hex_keys_are_refused() {
        let cli = parse(&["get", "--hex", ""]).expect("parses");
        let Command::Get(a) = cli.command else {
            panic!("expected get");
        };
        assert!(matches!(
            parse_key(&a.client, &a.key),
            Err(CmdError::Usage(_))
        ));
        assert!(matches!(
            parse_key(&a.client, "abc"),
            Err(CmdError::Hex { .. })
        ));
        assert_eq!(parse_key(&a.client, "6b").expect("hex"), b"k".to_vec());
    }

    #[test]
    fn output_lines() {
        assert_eq!(
            scan_line(Style::Text, false, b"k\n", &[0xff]),
            "k\\x0a = \\xff"
        );
        assert_eq!(scan_line(Style::Hex, false, b"k", b"v"), "6b = 76");
        let json: serde_json::Value =
            serde_json::from_str(&scan_line(Style::Hex, true, b"k", b"v")).expect("json");
        assert_eq!(json["key"], "k");
        assert_eq!(json["value_hex"], "76");

        let written = Written {
            start_ts: 5.into(),
            commit_ts: 6.into(),
        };
        let json: serde_json::Value =
            serde_json::from_str(&written_entry(b"k", None, Some(written))).expect("json");
        assert_eq!(json["commit_ts"], 6);
        assert_eq!(json["start_ts"], 5);
        assert!(json.get("value").is_none());
    }
}
