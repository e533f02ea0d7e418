//! The client's errors, typed so callers can react per kind.
//!
//! Three families, because they call for three different reactions:
//! - transport and protocol failures (connect, timeout, a gRPC status, a PD
//!   header error, a malformed response): the caller gives up and reports;
//! - region errors ([`RegionError`]): the request reached the wrong region or
//!   a stale epoch; [`RegionError::is_retryable`] says whether asking PD again
//!   and retrying can help — the retry loops in this module rely on it;
//! - key errors (locked, write conflict, ...): the outcome of a transaction
//!   rule, reported with enough detail for a person to act on.

use std::time::Duration;

use kvfeed_proto::{errorpb, kvrpcpb};
use kvfeed_types::RegionId;
use kvfeed_types::TimeStamp;

use crate::text::escape;

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An address the client cannot use: not `host:port`, a scheme other
    /// than `http://`, or a port that is not a number. Found before any
    /// connection is attempted.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCP connection or the HTTP/2 handshake to an address failed
    /// (refused, unreachable, or past the connect timeout).
    #[error("cannot connect to {addr}")]
    Connect {
        /// The `host:port` dialled.
        addr: String,
        /// The transport's own error, kept as the source for error chains.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call, or the whole connect sequence, outlived its limit from
    /// [`ConnectOptions`](crate::ConnectOptions).
    #[error("{what} at {addr} did not answer within {after:?}")]
    Timeout {
        /// What was waited for: the RPC method, or `"PD"` for the connect
        /// sequence.
        what: &'static str,
        /// The `host:port` that did not answer in time.
        addr: String,
        /// The limit that ran out.
        after: Duration,
    },
    /// A call failed with a gRPC status (including a broken connection).
    #[error("{method} failed: {message} ({code:?})")]
    Rpc {
        /// The RPC method that failed.
        method: &'static str,
        /// The status code the server (or the transport) gave.
        code: tonic::Code,
        /// The status message, followed by its source chain (see
        /// [`ClientError::rpc`]).
        message: String,
    },
    /// PD answered with an error in its response header.
    #[error("PD {method} failed: {message}")]
    Pd {
        /// The PD method that failed.
        method: &'static str,
        /// PD's error type name and message, `"TYPE: message"`.
        message: String,
    },
    /// A response lacks something the protocol promises.
    #[error("malformed {method} response: {reason}")]
    BadResponse {
        /// The method whose response was malformed.
        method: &'static str,
        /// What was missing or out of range.
        reason: String,
    },
    /// The request reached the wrong region, a stale epoch or a busy
    /// server; see [`RegionError`] for which ones a retry can fix.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A raw command's own error string.
    #[error("{method} failed: {message}")]
    Raw {
        /// The raw command that failed.
        method: &'static str,
        /// The server's error text, verbatim.
        message: String,
    },
    /// A live lock of another transaction is in the way.
    #[error("{0}; retry after the lock expires")]
    Locked(Lock),
    /// The commit ts was below the lock's min commit ts; a newer one works.
    #[error("commit ts {attempted} is below the lock's min commit ts {min_commit_ts}")]
    CommitTsExpired {
        /// The commit ts the commit asked for.
        attempted: TimeStamp,
        /// The lowest commit ts the lock now accepts.
        min_commit_ts: TimeStamp,
    },
    /// Another transaction committed the key after this one started, so
    /// this one cannot commit: it must start again with a new start ts.
    #[error(
        "write conflict on key {}: transaction {start_ts} lost to transaction \
         {conflict_ts} committed at {conflict_commit_ts}",
        escape(key)
    )]
    WriteConflict {
        /// The user key both transactions wrote.
        key: Vec<u8>,
        /// The start ts of the transaction that lost.
        start_ts: TimeStamp,
        /// The start ts of the transaction that won.
        conflict_ts: TimeStamp,
        /// The commit ts of the transaction that won, above `start_ts`.
        conflict_commit_ts: TimeStamp,
    },
    /// Any other key error, described.
    #[error("{method}: {message}")]
    Key {
        /// The command that got the key error.
        method: &'static str,
        /// The key error's description.
        message: String,
    },
    /// A bounded retry loop ([`Backoff`](crate::retry::Backoff)) spent its
    /// budget while the failure persisted.
    #[error("{what} still failing after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// What was being retried: the RPC method, or a phase such as
        /// `"transaction"`, `"commit"` or `"lock resolution"`.
        what: &'static str,
        /// Attempts made, counting the first.
        attempts: u32,
        /// The error of the last attempt.
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// A gRPC status from `method`, with its source chain flattened into the
    /// message (a broken connection's cause is otherwise lost).
    pub fn rpc(method: &'static str, status: &tonic::Status) -> ClientError {
        let mut message = status.message().to_owned();
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        ClientError::Rpc {
            method,
            code: status.code(),
            message,
        }
    }

    pub(crate) fn bad(method: &'static str, reason: impl Into<String>) -> ClientError {
        ClientError::BadResponse {
            method,
            reason: reason.into(),
        }
    }

    /// Whether re-asking PD for the region and retrying can help.
    pub fn is_retryable_region_error(&self) -> bool {
        matches!(self, ClientError::Region(e) if e.is_retryable())
    }
}

/// A lock left by a transaction, as a key error reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The locked user key.
    pub key: Vec<u8>,
    /// The transaction's primary key, whose state decides the transaction.
    pub primary: Vec<u8>,
    /// The transaction's start ts.
    pub lock_ts: TimeStamp,
    /// The lock's time to live in milliseconds, as its transaction set it
    /// (or as CheckTxnStatus last reported it): until it has passed, the
    /// lock is live and is not resolved.
    pub ttl_ms: u64,
}

impl Lock {
    pub(crate) fn from_proto(lock: &kvrpcpb::LockInfo) -> Lock {
        Lock {
            key: lock.key.clone(),
            primary: lock.primary_lock.clone(),
            lock_ts: TimeStamp::new(lock.lock_version),
            ttl_ms: lock.lock_ttl,
        }
    }
}

impl std::fmt::Display for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {} is locked by transaction {} (primary {}, ttl {} ms)",
            escape(&self.key),
            self.lock_ts,
            escape(&self.primary),
            self.ttl_ms
        )
    }
}

/// A region error from the KV service, one variant per reaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The store is not the region's leader (any more). Retried at once:
    /// PD already knows the new leader.
    #[error("region {region} has moved its leader")]
    NotLeader {
        /// The region the request was sent to.
        region: RegionId,
    },
    /// The request's region epoch is stale: the region was split or merged
    /// since PD was asked. Retried after asking PD again.
    #[error("region {region} epoch does not match (the region layout changed)")]
    EpochNotMatch {
        /// The region the request was sent to.
        region: RegionId,
    },
    /// The store does not know the region (it moved, or was merged away).
    /// Retried after asking PD again.
    #[error("region {region} not found")]
    RegionNotFound {
        /// The region the request was sent to.
        region: RegionId,
    },
    /// A key of the request lies outside the region's range, which happens
    /// when the layout changed between the PD lookup and the request.
    /// Retried after asking PD again.
    #[error("key {} is not in region {region}", escape(key))]
    KeyNotInRegion {
        /// The region the request was sent to.
        region: RegionId,
        /// The key the store refused, as the store reported it.
        key: Vec<u8>,
    },
    /// The command was overtaken by a change of the region; retried.
    #[error("stale command in region {region}")]
    StaleCommand {
        /// The region the request was sent to.
        region: RegionId,
    },
    /// The store refused the request for load. Not retried: whether to
    /// try again later is the user's decision.
    #[error("server is busy: {reason}")]
    ServerIsBusy {
        /// The store's explanation.
        reason: String,
    },
    /// A region error of a kind the client does not distinguish; not
    /// retried.
    #[error("region {region} error: {message}")]
    Other {
        /// The region the request was sent to.
        region: RegionId,
        /// The error's message field.
        message: String,
    },
}

impl RegionError {
    /// Converts the wire error of a request sent to `region`.
    pub fn from_proto(region: RegionId, err: &errorpb::Error) -> RegionError {
        if err.not_leader.is_some() {
            RegionError::NotLeader { region }
        } else if err.epoch_not_match.is_some() {
            RegionError::EpochNotMatch { region }
        } else if err.region_not_found.is_some() {
            RegionError::RegionNotFound { region }
        } else if let Some(k) = &err.key_not_in_region {
            RegionError::KeyNotInRegion {
                region,
                key: k.key.clone(),
            }
        } else if err.stale_command.is_some() {
            RegionError::StaleCommand { region }
        } else if let Some(busy) = &err.server_is_busy {
            RegionError::ServerIsBusy {
                reason: busy.reason.clone(),
            }
        } else {
            RegionError::Other {
                region,
                message: err.message.clone(),
            }
        }
    }

    /// Whether the region may be found again by asking PD: its leader moved,
    /// its epoch changed, it was split or merged, or the command was stale.
    /// A busy server is not retried (the user decides), nor an unknown
    /// error.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RegionError::NotLeader { .. }
                | RegionError::EpochNotMatch { .. }
                | RegionError::RegionNotFound { .. }
                | RegionError::KeyNotInRegion { .. }
                | RegionError::StaleCommand { .. }
        )
    }

    /// Whether a retry may go at once, without backing off: a new leader is
    /// known to exist, so there is nothing to wait for.
    pub fn retry_at_once(&self) -> bool {
        matches!(self, RegionError::NotLeader { .. })
    }
}

/// Turns a response's optional region error into a `Result`.
pub fn check_region(region: RegionId, err: Option<&errorpb::Error>) -> Result<(), ClientError> {
    match err {
        Some(e) => Err(RegionError::from_proto(region, e).into()),
        None => Ok(()),
    }
}

/// Converts a transactional key error returned by `method`.
pub(crate) fn key_error(method: &'static str, err: &kvrpcpb::KeyError) -> ClientError {
    if let Some(lock) = &err.locked {
        return ClientError::Locked(Lock::from_proto(lock));
    }
    if let Some(e) = &err.commit_ts_expired {
        return ClientError::CommitTsExpired {
            attempted: TimeStamp::new(e.attempted_commit_ts),
            min_commit_ts: TimeStamp::new(e.min_commit_ts),
        };
    }
    if let Some(c) = &err.conflict {
        return ClientError::WriteConflict {
            key: c.key.clone(),
            start_ts: TimeStamp::new(c.start_ts),
            conflict_ts: TimeStamp::new(c.conflict_ts),
            conflict_commit_ts: TimeStamp::new(c.conflict_commit_ts),
        };
    }
    let message = if let Some(e) = &err.already_exist {
        format!("key {} already exists", escape(&e.key))
    } else if let Some(e) = &err.txn_not_found {
        format!(
            "transaction {} not found (primary {}); it was rolled back",
            e.start_ts,
            escape(&e.primary_key)
        )
    } else if let Some(e) = &err.deadlock {
        format!("deadlock with transaction {}", e.lock_ts)
    } else if let Some(e) = &err.commit_ts_too_large {
        format!("commit ts {} is too large", e.commit_ts)
    } else if let Some(e) = &err.assertion_failed {
        format!("assertion failed on key {}", escape(&e.key))
    } else if !err.abort.is_empty() {
        err.abort.clone()
    } else if !err.retryable.is_empty() {
        err.retryable.clone()
    } else {
        "unknown key error".to_owned()
    };
    ClientError::Key { method, message }
}

/// `err` followed by its sources in one line, so that a cause deep inside
/// (an I/O error such as `os error 24`) is not lost in what users see.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Many errors already embed their source in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_errors_map_to_reactions() {
        let region = RegionId(2);
        let not_leader = errorpb::Error {
            not_leader: Some(errorpb::NotLeader::default()),
            ..Default::default()
        };
        let e = RegionError::from_proto(region, &not_leader);
        assert_eq!(e, RegionError::NotLeader { region });
        assert!(e.is_retryable() && e.retry_at_once());

        let epoch = errorpb::Error {
            epoch_not_match: Some(errorpb::EpochNotMatch::default()),
            ..Default::default()
        };
        let e = RegionError::from_proto(region, &epoch);
        assert!(e.is_retryable() && !e.retry_at_once());

        let busy = errorpb::Error {
            server_is_busy: Some(errorpb::ServerIsBusy {
                reason: "full".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = RegionError::from_proto(region, &busy);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("full"));

        let unknown = errorpb::Error {
            message: "odd".into(),
            ..Default::default()
        };
        assert!(!RegionError::from_proto(region, &unknown).is_retryable());
    }

    #[test]
    fn key_errors_name_the_lock_holder() {
        let err = kvrpcpb::KeyError {
            locked: Some(kvrpcpb::LockInfo {
                key: b"k\xff".to_vec(),
                primary_lock: b"p".to_vec(),
                lock_version: 42,
                lock_ttl: 3000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = key_error("KvGet", &err);
        let text = e.to_string();
        assert!(text.contains("transaction 42"), "{text}");
        assert!(text.contains("k\\xff"), "{text}");
        assert!(text.contains("primary p"), "{text}");
    }

    #[test]
    fn rpc_errors_keep_code_and_message() {
        let status = tonic::Status::unavailable("gone");
        let e = ClientError::rpc("GetMembers", &status);
        assert!(matches!(
            e,
            ClientError::Rpc {
                code: tonic::Code::Unavailable,
                ..
            }
        ));
        assert!(e.to_string().contains("GetMembers failed: gone"));
    }
}
