//! Golden-script tests of the transaction rules.
//!
//! Each file under `tests/testdata/mvcc/` is a sequence of blocks:
//!
//! ```text
//! # comments and blank lines are kept as they are
//! prewrite start=10 primary=k1 put:k1=v1
//! commit start=10 commit=20 k1
//! ----
//! ok
//! ok
//! ```
//!
//! Every command line before `----` runs against a fresh store per file
//! (through `TxnStore`), once on the in-memory engine and once on fjall, and
//! the concatenated output must equal the lines after `----` (up to the next
//! blank line). Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected blocks from actual output; then
//! review the diff.
//!
//! Command syntax is documented in `tests/testdata/mvcc/README`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvfeed_storage::TimeStamp;
use kvfeed_storage::engine::fjall::FjallEngine;
use kvfeed_storage::engine::memory::MemoryEngine;
use kvfeed_storage::engine::{Cf, Engine};
use kvfeed_storage::mvcc::{
    CheckTxnStatusRequest, Lock, LockInfo, MutationOp, PessimisticAction, PessimisticKey,
    PessimisticLockRequest, PrewriteRequest, ScanItem, ScanOptions, SecondaryLocksStatus, TxnError,
    TxnMutation, TxnStatus, TxnStore, Write, decode_bytes, key::split_versioned,
};
use kvfeed_storage::store::{Durability, Store};

const DEFAULT_TTL: u64 = 3000;

#[test]
fn golden_scripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mvcc");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scripts found");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read script");
        let (rendered, mismatches) = run_script(&text, Arc::new(MemoryEngine::new()));
        if update {
            std::fs::write(&file, rendered).expect("write script");
            continue;
        }
        for m in mismatches {
            failures.push(format!("{} (memory engine): {m}", file.display()));
        }
        // The durable engine must give the same answers: iteration bounds and
        // directions are where engines differ.
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = FjallEngine::open(dir.path()).expect("open fjall");
        let (_, mismatches) = run_script(&text, Arc::new(engine));
        for m in mismatches {
            failures.push(format!("{} (fjall engine): {m}", file.display()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// Runs one script; returns it re-rendered with actual outputs, and a
/// description of every block whose output differs.
fn run_script(text: &str, engine: Arc<dyn Engine>) -> (String, Vec<String>) {
    let store = Arc::new(Store::open(engine, Durability::NoSync).expect("open store"));
    let txn = TxnStore::new(store);
    let mut out = String::new();
    let mut mismatches = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((lineno, line)) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut commands = vec![line.to_string()];
        while let Some((_, l)) = lines.next_if(|(_, l)| l.trim() != "----") {
            commands.push(l.to_string());
        }
        lines.next(); // the separator
        let mut expected = Vec::new();
        while let Some((_, l)) = lines.next_if(|(_, l)| !l.trim().is_empty()) {
            expected.push(l.to_string());
        }
        let mut actual = Vec::new();
        for c in &commands {
            actual.extend(run_command(&txn, c).lines().map(str::to_string));
        }
        for c in &commands {
            out.push_str(c);
            out.push('\n');
        }
        out.push_str("----\n");
        for a in &actual {
            out.push_str(a);
            out.push('\n');
        }
        if actual != expected {
            mismatches.push(format!(
                "block at line {}:\n{}\n--- expected\n{}\n--- actual\n{}",
                lineno + 1,
                commands.join("\n"),
                expected.join("\n"),
                actual.join("\n")
            ));
        }
    }
    (out, mismatches)
}

/// Parsed arguments of one command line.
struct Args {
    named: BTreeMap<String, String>,
    positional: Vec<String>,
}

impl Args {
    fn parse(tokens: &[&str]) -> Args {
        let mut named = BTreeMap::new();
        let mut positional = Vec::new();
        for t in tokens {
            match t.split_once('=') {
                Some((k, v)) if !k.contains(':') => {
                    named.insert(k.to_string(), v.to_string());
                }
                _ => positional.push(t.to_string()),
            }
        }
        Args { named, positional }
    }

    fn ts(&self, name: &str) -> TimeStamp {
        self.named
            .get(name)
            .map_or(TimeStamp::ZERO, |v| parse_ts(v))
    }

    fn num(&self, name: &str, default: u64) -> u64 {
        self.named
            .get(name)
            .map_or(default, |v| v.parse().expect("number"))
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        self.named
            .get(name)
            .map_or_else(Vec::new, |v| parse_value(v))
    }

    fn flag(&self, name: &str) -> bool {
        self.positional.iter().any(|p| p == name)
    }

    /// Positional arguments that are not known flags: keys.
    fn keys(&self, flags: &[&str]) -> Vec<Vec<u8>> {
        self.positional
            .iter()
            .filter(|p| !flags.contains(&p.as_str()))
            .map(|p| parse_value(p))
            .collect()
    }

    fn ts_list(&self, name: &str) -> Vec<TimeStamp> {
        self.named.get(name).map_or_else(Vec::new, |v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(parse_ts)
                .collect()
        })
    }
}

/// `123` or `123ms` (a timestamp at physical millisecond 123).
fn parse_ts(s: &str) -> TimeStamp {
    match s.strip_suffix("ms") {
        Some(ms) => TimeStamp::compose(ms.parse().expect("ms"), 0),
        None => TimeStamp::new(s.parse().expect("timestamp")),
    }
}

/// `text`, or `large:N:c` for N copies of byte `c`, or `empty`.
fn parse_value(s: &str) -> Vec<u8> {
    if s == "empty" {
        return Vec::new();
    }
    if let Some(spec) = s.strip_prefix("large:") {
        let (n, c) = spec.split_once(':').expect("large:N:c");
        return vec![c.as_bytes()[0]; n.parse().expect("length")];
    }
    s.as_bytes().to_vec()
}

fn show(bytes: &[u8]) -> String {
    if bytes.len() > 32 && bytes.iter().all(|&b| b == bytes[0]) {
        return format!("{}*{}", char::from(bytes[0]), bytes.len());
    }
    if bytes.is_empty() {
        return "\"\"".to_string();
    }
    bytes.escape_ascii().to_string()
}

fn run_command(txn: &TxnStore, line: &str) -> String {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let args = Args::parse(&tokens[1..]);
    let result: Result<String, TxnError> = match tokens[0] {
        "prewrite" => prewrite(txn, &args),
        "commit" => txn
            .commit(&args.keys(&[]), args.ts("start"), args.ts("commit"))
            .map(|()| "ok".into()),
        "rollback" => txn
            .batch_rollback(&args.keys(&[]), args.ts("start"))
            .map(|()| "ok".into()),
        "cleanup" => txn
            .cleanup(&args.keys(&[])[0], args.ts("start"), args.ts("current"))
            .map(|()| "ok".into()),
        "status" => check_txn_status(txn, &args),
        "heartbeat" => txn
            .txn_heart_beat(&args.bytes("primary"), args.ts("start"), args.num("ttl", 0))
            .map(|ttl| format!("ttl={ttl}")),
        "resolve" => txn
            .resolve_lock_keys(&args.keys(&[]), args.ts("start"), args.ts("commit"))
            .map(|()| "ok".into()),
        "resolve_range" => {
            let status = args.named["txns"]
                .split(',')
                .map(|p| {
                    let (s, c) = p.split_once(':').expect("start:commit");
                    (parse_ts(s), parse_ts(c))
                })
                .collect();
            txn.resolve_locks_in_range(&status, &args.bytes("start"), &args.bytes("end"))
                .map(|()| "ok".into())
        }
        "scan_lock" => txn
            .scan_lock(
                args.ts("max"),
                &args.bytes("start"),
                &args.bytes("end"),
                args.num("limit", 0) as usize,
            )
            .map(|locks| lines(locks.iter().map(fmt_lock_info))),
        "check_secondary" => txn
            .check_secondary_locks(&args.keys(&[]), args.ts("start"))
            .map(|s| match s {
                SecondaryLocksStatus::Locked(locks) => lines(
                    std::iter::once("locked".to_string()).chain(locks.iter().map(fmt_lock_info)),
                ),
                SecondaryLocksStatus::Committed(ts) => format!("committed commit_ts={ts}"),
                SecondaryLocksStatus::RolledBack => "rolled back".into(),
            }),
        "lock" => pessimistic_lock(txn, &args),
        "pessimistic_rollback" => txn
            .pessimistic_rollback(&args.keys(&[]), args.ts("start"), args.ts("for_update"))
            .map(|()| "ok".into()),
        "get" => {
            let key = args.keys(&[]).remove(0);
            txn.get(&key, args.ts("ts"), &args.ts_list("bypass"))
                .map(|v| {
                    format!(
                        "{} => {}",
                        show(&key),
                        v.as_deref().map_or("<none>".into(), show)
                    )
                })
        }
        "batch_get" => txn
            .batch_get(&args.keys(&[]), args.ts("ts"), &args.ts_list("bypass"))
            .map(|items| fmt_items(&items)),
        "scan" => {
            let (start, end, bypass) = (
                args.bytes("start"),
                args.bytes("end"),
                args.ts_list("bypass"),
            );
            let opts = ScanOptions {
                start: &start,
                end: &end,
                ts: args.ts("ts"),
                limit: args.num("limit", 100) as usize,
                key_only: args.flag("key_only"),
                reverse: args.flag("reverse"),
                bypass: &bypass,
                max_bytes: usize::MAX,
            };
            txn.scan(&opts).map(|items| fmt_items(&items))
        }
        "gc" => txn
            .gc(
                args.ts("safe_point"),
                &args.bytes("start"),
                &args.bytes("end"),
            )
            .map(|s| {
                format!(
                    "gc keys={} deleted_writes={} deleted_values={}",
                    s.keys, s.deleted_writes, s.deleted_values
                )
            }),
        "max_ts" => {
            txn.concurrency_manager().update_max_ts(args.ts("ts"));
            Ok(format!("max_ts={}", txn.concurrency_manager().max_ts()))
        }
        "dump" => Ok(dump(txn)),
        other => panic!("unknown command {other:?}"),
    };
    match result {
        Ok(s) if s.is_empty() => "<empty>".into(),
        Ok(s) => s,
        Err(e) => format!("error: {}", fmt_err(&e)),
    }
}

fn lines(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join("\n")
}

fn fmt_items(items: &[ScanItem]) -> String {
    lines(items.iter().map(|i| match i {
        Ok((k, v)) => format!("{} => {}", show(k), show(v)),
        Err(l) => format!("{} => {}", show(&l.key), fmt_lock_info(l)),
    }))
}

fn prewrite(txn: &TxnStore, args: &Args) -> Result<String, TxnError> {
    let for_update = args.ts("for_update");
    let mut mutations = Vec::new();
    for p in &args.positional {
        if p == "1pc" {
            continue;
        }
        let (spec, action) = match p.split_once('/') {
            Some((s, "skip")) => (s, PessimisticAction::SkipPessimisticCheck),
            Some((s, "check")) => (s, PessimisticAction::DoConstraintCheck),
            Some((_, a)) => panic!("unknown pessimistic action {a}"),
            None if !for_update.is_zero() => (p.as_str(), PessimisticAction::DoPessimisticCheck),
            None => (p.as_str(), PessimisticAction::SkipPessimisticCheck),
        };
        let (op, rest) = spec.split_once(':').expect("op:key");
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (parse_value(k), parse_value(v)),
            None => (parse_value(rest), Vec::new()),
        };
        let op = match op {
            "put" => MutationOp::Put(value),
            "insert" => MutationOp::Insert(value),
            "del" => MutationOp::Delete,
            "lock" => MutationOp::Lock,
            "check" => MutationOp::CheckNotExists,
            other => panic!("unknown mutation {other}"),
        };
        mutations.push(TxnMutation {
            key,
            op,
            pessimistic_action: action,
        });
    }
    let req = PrewriteRequest {
        mutations,
        primary: args.bytes("primary"),
        start_ts: args.ts("start"),
        lock_ttl: args.num("ttl", DEFAULT_TTL),
        txn_size: args.num("txn_size", 0),
        for_update_ts: for_update,
        min_commit_ts: args.ts("min_commit"),
        max_commit_ts: args.ts("max_commit"),
        txn_source: args.num("source", 0),
        secondaries: args.named.get("async").map(|s| {
            s.split(',')
                .filter(|k| !k.is_empty())
                .map(parse_value)
                .collect()
        }),
        try_one_pc: args.flag("1pc"),
    };
    let out = txn.prewrite(&req)?;
    let mut s = String::new();
    for l in &out.locks {
        writeln!(s, "locked: {}", fmt_lock_info(l)).ok();
    }
    if out.locks.is_empty() {
        s.push_str("ok");
    }
    if !out.min_commit_ts.is_zero() {
        write!(s, " min_commit_ts={}", out.min_commit_ts).ok();
    }
    if !out.one_pc_commit_ts.is_zero() {
        write!(s, " one_pc_commit_ts={}", out.one_pc_commit_ts).ok();
    }
    Ok(s.trim_end().to_string())
}

fn check_txn_status(txn: &TxnStore, args: &Args) -> Result<String, TxnError> {
    let req = CheckTxnStatusRequest {
        primary_key: args.bytes("primary"),
        lock_ts: args.ts("start"),
        caller_start_ts: args.ts("caller"),
        current_ts: args.ts("current"),
        rollback_if_not_exist: args.flag("rollback_if_not_exist"),
        force_sync_commit: args.flag("force_sync"),
        resolving_pessimistic_lock: args.flag("resolving_pessimistic"),
        verify_is_primary: args.flag("verify_primary"),
    };
    Ok(match txn.check_txn_status(&req)? {
        TxnStatus::RolledBack => "rolled back".into(),
        TxnStatus::TtlExpire => "ttl expired: rolled back now".into(),
        TxnStatus::LockNotExist => "lock not exist: rollback written".into(),
        TxnStatus::Committed { commit_ts } => format!("committed commit_ts={commit_ts}"),
        TxnStatus::Uncommitted {
            lock,
            min_commit_ts_pushed,
        } => format!(
            "uncommitted pushed={min_commit_ts_pushed} {}",
            fmt_lock_info(&lock)
        ),
        TxnStatus::PessimisticRollBack => "pessimistic lock expired: removed".into(),
        TxnStatus::LockNotExistDoNothing => "lock not exist: nothing done".into(),
    })
}

fn pessimistic_lock(txn: &TxnStore, args: &Args) -> Result<String, TxnError> {
    let flags = ["return_values", "check_existence"];
    let keys = args
        .keys(&flags)
        .into_iter()
        .map(|k| match k.strip_suffix(b"!") {
            Some(k) => PessimisticKey {
                key: k.to_vec(),
                should_not_exist: true,
            },
            None => PessimisticKey {
                key: k,
                should_not_exist: false,
            },
        })
        .collect();
    let req = PessimisticLockRequest {
        keys,
        primary: args.bytes("primary"),
        start_ts: args.ts("start"),
        for_update_ts: args.ts("for_update"),
        lock_ttl: args.num("ttl", DEFAULT_TTL),
        min_commit_ts: args.ts("min_commit"),
        txn_size: args.num("txn_size", 0),
        return_values: args.flag("return_values"),
        check_existence: args.flag("check_existence"),
    };
    let out = txn.acquire_pessimistic_lock(&req)?;
    if out.values.is_empty() {
        return Ok("ok".into());
    }
    Ok(lines(req.keys.iter().zip(&out.values).map(|(k, v)| {
        format!(
            "{} => {}",
            show(&k.key),
            v.as_deref().map_or("<none>".into(), show)
        )
    })))
}

fn fmt_lock_fields(s: &mut String, l: &LockInfo) {
    write!(
        s,
        "key={} primary={} start_ts={} ttl={} type={:?}",
        show(&l.key),
        show(&l.primary),
        l.start_ts,
        l.ttl,
        l.lock_type
    )
    .ok();
    if !l.for_update_ts.is_zero() {
        write!(s, " for_update_ts={}", l.for_update_ts).ok();
    }
    if !l.min_commit_ts.is_zero() {
        write!(s, " min_commit_ts={}", l.min_commit_ts).ok();
    }
    if l.txn_size != 0 {
        write!(s, " txn_size={}", l.txn_size).ok();
    }
    if l.use_async_commit {
        let secs: Vec<String> = l.secondaries.iter().map(|k| show(k)).collect();
        write!(s, " async secondaries=[{}]", secs.join(",")).ok();
    }
}

fn fmt_lock_info(l: &LockInfo) -> String {
    let mut s = "lock ".to_string();
    fmt_lock_fields(&mut s, l);
    s
}

fn fmt_err(e: &TxnError) -> String {
    match e {
        TxnError::KeyIsLocked(l) => format!("key is locked: {}", fmt_lock_info(l)),
        TxnError::WriteConflict {
            start_ts,
            conflict_start_ts,
            conflict_commit_ts,
            key,
            primary,
            reason,
        } => format!(
            "write conflict key={} primary={} start_ts={start_ts} conflict_start_ts={conflict_start_ts} conflict_commit_ts={conflict_commit_ts} reason={reason:?}",
            show(key),
            show(primary)
        ),
        TxnError::AlreadyExist { key } => format!("already exist key={}", show(key)),
        TxnError::CommitTsExpired {
            start_ts,
            attempted_commit_ts,
            min_commit_ts,
            key,
        } => format!(
            "commit ts expired key={} start_ts={start_ts} commit_ts={attempted_commit_ts} min_commit_ts={min_commit_ts}",
            show(key)
        ),
        TxnError::TxnLockNotFound {
            start_ts,
            commit_ts,
            key,
        } => format!(
            "txn lock not found key={} start_ts={start_ts} commit_ts={commit_ts}",
            show(key)
        ),
        TxnError::TxnNotFound { start_ts, key } => {
            format!("txn not found key={} start_ts={start_ts}", show(key))
        }
        TxnError::PessimisticLockNotFound { start_ts, key } => {
            format!(
                "pessimistic lock not found key={} start_ts={start_ts}",
                show(key)
            )
        }
        TxnError::PessimisticLockRolledBack { start_ts, key } => {
            format!(
                "pessimistic lock rolled back key={} start_ts={start_ts}",
                show(key)
            )
        }
        TxnError::LockTypeNotMatch {
            start_ts,
            key,
            pessimistic,
        } => format!(
            "lock type not match key={} start_ts={start_ts} pessimistic={pessimistic}",
            show(key)
        ),
        TxnError::Committed {
            start_ts,
            commit_ts,
            key,
        } => format!(
            "already committed key={} start_ts={start_ts} commit_ts={commit_ts}",
            show(key)
        ),
        TxnError::PrimaryMismatch(l) => format!("primary mismatch: {}", fmt_lock_info(l)),
        TxnError::InvalidTxnTso {
            start_ts,
            commit_ts,
        } => format!("invalid txn tso start_ts={start_ts} commit_ts={commit_ts}"),
        TxnError::Storage(e) => format!("storage: {e}"),
    }
}

/// Every record of the three transactional families, decoded.
fn dump(txn: &TxnStore) -> String {
    let snap = txn.store().snapshot();
    let mut out = Vec::new();
    for cf in [Cf::Lock, Cf::Write, Cf::Default] {
        for item in snap.iter(cf, Bound::Unbounded, Bound::Unbounded, false) {
            let (k, v) = item.expect("iterate");
            out.push(match cf {
                Cf::Lock => {
                    let (key, _) = decode_bytes(&k).expect("lock key");
                    let lock = Lock::from_bytes(&v).expect("lock record");
                    let mut s = format!("lock {}: ", show(&key));
                    let info = lock.to_lock_info(key);
                    fmt_lock_fields(&mut s, &info);
                    if let Some(v) = &lock.short_value {
                        write!(s, " value={}", show(v)).ok();
                    }
                    s
                }
                Cf::Write => {
                    let (key, ts) = split_versioned(&k, Cf::Write).expect("write key");
                    let w = Write::from_bytes(&v).expect("write record");
                    let mut s = format!(
                        "write {}@{ts}: {:?} start_ts={}",
                        show(&key.to_raw().expect("raw")),
                        w.write_type,
                        w.start_ts
                    );
                    if let Some(v) = &w.short_value {
                        write!(s, " value={}", show(v)).ok();
                    }
                    if w.has_overlapped_rollback {
                        s.push_str(" overlapped_rollback");
                    }
                    s
                }
                _ => {
                    let (key, ts) = split_versioned(&k, Cf::Default).expect("default key");
                    format!(
                        "default {}@{ts}: {}",
                        show(&key.to_raw().expect("raw")),
                        show(&v)
                    )
                }
            });
        }
    }
    if out.is_empty() {
        return "<empty>".into();
    }
    lines(out.into_iter())
}
