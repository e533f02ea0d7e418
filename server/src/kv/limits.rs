//! Input limits of the KV service, in one place.
//!
//! | What | Limit | Answer when exceeded |
//! | --- | --- | --- |
//! | key (point key, mutation, primary) | 1 byte ..= [`MAX_KEY_SIZE`] (8 KiB) | input error |
//! | range bound (scan, delete range, scan lock) | 0 ..= [`MAX_KEY_SIZE`]; empty = unbounded | input error |
//! | value | ≤ [`MAX_VALUE_SIZE`] (8 MiB) | input error |
//! | request message | ≤ [`MAX_REQUEST_SIZE`] (16 MiB) | gRPC `OUT_OF_RANGE` from the transport, before any handler runs |
//! | prewrite mutations / pessimistic lock keys | at least one, no key twice | input error |
//! | start_ts of a write command | non-zero | input error |
//! | commit_ts | non-zero and above start_ts | input error |
//! | one scan answer (`RawScan`, `RawBatchScan` — its ranges together — and `KvScan`) | ≤ [`kvfeed_storage::MAX_ANSWER_BYTES`] (16 MiB) of keys and values | input error (one error pair), raised as soon as the scan passes it, so no more than that is ever read into memory |
//!
//! An "input error" is the response's own error field: `KeyError.abort` for
//! transactional calls, the `error` string (or one pair carrying a
//! `KeyError`) for raw calls. It is a final answer, not a region error, so a
//! client does not retry a request that can never succeed.
//!
//! Why check here when storage checks too: the storage layer would refuse
//! these inputs as well, but only once the command runs, and some of them
//! (a zero start_ts, a duplicated mutation) are legal there yet meaningless
//! or state-corrupting on the wire. Checking every request up front, before
//! region membership, gives each bad input one clear message and guarantees
//! nothing is written for it. The sizes are the storage layer's own
//! constants, so the two never disagree.

use std::collections::HashSet;

use kvfeed_storage::TimeStamp;

use super::errors::{KvError, hex};

/// Largest key: 8 KiB (TiKV's default `max-key-size`).
pub const MAX_KEY_SIZE: usize = kvfeed_storage::mvcc::MAX_KEY_SIZE;

/// Largest value of one put: 8 MiB.
pub const MAX_VALUE_SIZE: usize = kvfeed_storage::mvcc::MAX_VALUE_SIZE;

/// Largest request message the server decodes: 16 MiB. Room for one
/// maximal value plus keys and framing; tonic refuses larger messages with
/// `OUT_OF_RANGE` without buffering them into a request.
pub const MAX_REQUEST_SIZE: usize = 16 * 1024 * 1024;

/// A key of a point operation: non-empty and at most [`MAX_KEY_SIZE`].
pub fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::Input("key is empty".to_owned()));
    }
    check_bound(key)
}

/// Every key of `keys` (see [`check_key`]).
pub fn check_keys<'a>(keys: impl IntoIterator<Item = &'a Vec<u8>>) -> Result<(), KvError> {
    keys.into_iter().try_for_each(|k| check_key(k))
}

/// A range bound: may be empty (unbounded), at most [`MAX_KEY_SIZE`].
pub fn check_bound(key: &[u8]) -> Result<(), KvError> {
    if key.len() > MAX_KEY_SIZE {
        return Err(KvError::Input(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_SIZE} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// A value: at most [`MAX_VALUE_SIZE`].
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_SIZE {
        return Err(KvError::Input(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_SIZE} bytes",
            value.len()
        )));
    }
    Ok(())
}

/// A timestamp that identifies a transaction: zero names none.
pub fn check_ts(ts: u64, field: &str) -> Result<TimeStamp, KvError> {
    if ts == 0 {
        return Err(KvError::Input(format!("{field} must not be 0")));
    }
    Ok(TimeStamp::new(ts))
}

/// A commit timestamp: non-zero and above the transaction's start.
pub fn check_commit_ts(start_ts: TimeStamp, commit_ts: u64) -> Result<TimeStamp, KvError> {
    let commit = check_ts(commit_ts, "commit_version")?;
    if commit <= start_ts {
        return Err(KvError::Input(format!(
            "commit_version {commit} must be greater than start_version {start_ts}"
        )));
    }
    Ok(commit)
}

/// A list that must name at least one key, with no key twice. Duplicates
/// are refused because a command's rules are evaluated per key against one
/// snapshot: a key mutated twice in one prewrite could leave a large value
/// behind that no lock refers to.
pub fn check_distinct<'a>(
    keys: impl IntoIterator<Item = &'a [u8]>,
    what: &str,
) -> Result<(), KvError> {
    let mut seen = HashSet::new();
    for key in keys {
        if !seen.insert(key) {
            return Err(KvError::Input(format!(
                "key {} appears twice in the {what}",
                hex(key)
            )));
        }
    }
    if seen.is_empty() {
        return Err(KvError::Input(format!("the {what} is empty")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<impl std::fmt::Debug, KvError>) -> String {
        match r {
            Err(KvError::Input(m)) => m,
            other => format!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn keys_must_be_non_empty_and_bounded() {
        assert!(check_key(b"k").is_ok());
        assert!(check_key(&vec![1; MAX_KEY_SIZE]).is_ok());
        assert_eq!(message(check_key(b"")), "key is empty");
        let text = message(check_key(&vec![1; MAX_KEY_SIZE + 1]));
        assert!(
            text.contains("8193 bytes") && text.contains("8192"),
            "{text}"
        );
        assert!(check_bound(b"").is_ok());
        assert!(check_bound(&vec![1; MAX_KEY_SIZE + 1]).is_err());
    }

    #[test]
    fn values_are_bounded() {
        assert!(check_value(&[]).is_ok());
        assert!(check_value(&vec![0; MAX_VALUE_SIZE]).is_ok());
        let text = message(check_value(&vec![0; MAX_VALUE_SIZE + 1]));
        assert!(text.contains("exceeds the limit"), "{text}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            message(check_ts(0, "start_version")),
            "start_version must not be 0"
        );
        assert_eq!(check_ts(5, "x").ok(), Some(TimeStamp::new(5)));
        let start = TimeStamp::new(10);
        assert!(message(check_commit_ts(start, 0)).contains("commit_version must not be 0"));
        assert!(message(check_commit_ts(start, 10)).contains("greater than start_version 10"));
        assert!(message(check_commit_ts(start, 9)).contains("greater than"));
        assert_eq!(check_commit_ts(start, 11).ok(), Some(TimeStamp::new(11)));
    }

    #[test]
    fn distinct_and_non_empty() {
        assert!(check_distinct([&b"a"[..], b"b"], "mutation list").is_ok());
        assert_eq!(
            message(check_distinct(std::iter::empty(), "mutation list")),
            "the mutation list is empty"
        );
        let text = message(check_distinct([&b"a"[..], b"b", b"a"], "mutation list"));
        assert!(text.contains("61") && text.contains("twice"), "{text}");
    }
}
