//! The client tools: `kvfeed put | get | delete | scan`, and `kvfeed admin`.
//!
//! Each tool parses its arguments ([`kv`]), connects with
//! [`kvfeed_client::Cluster`], and writes its results to stdout in one of
//! three shapes ([`mod@format`]): text, hex (`--hex`) or JSON lines (`--json`).
//! stdout carries results only; errors return as [`CmdError`], which `main`
//! prints to stderr as `kvfeed: <message>` with exit status 1.
//!
//! The tools run on a current-thread runtime: they make one request at a
//! time, and a single thread starts faster than a pool.

pub mod admin;
pub mod changefeed;
pub mod changefeed_admin;
pub mod format;
pub mod kv;
pub mod verify;
pub mod watch;

use std::io::{self, Write};

use clap::Args;

use format::{HexError, Style};
use kvfeed_client::ClientError;

pub use kvfeed_client::DEFAULT_PD;

/// Flags every client tool shares.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// PD address of the cluster (kvfeed serves PD on its gRPC address);
    /// `http://` is optional.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_PD)]
    pub pd: String,

    /// Use the raw key-value API instead of transactions. Raw and
    /// transactional keys are separate: a key written with --raw is read
    /// with --raw.
    #[arg(long)]
    pub raw: bool,

    /// Print one JSON object per line: "key" and "value" as text (escaped
    /// when not UTF-8) plus exact "key_hex" and "value_hex".
    #[arg(long)]
    pub json: bool,

    /// Keys and values are given and shown as hex.
    #[arg(long)]
    pub hex: bool,
}

impl ClientArgs {
    pub fn style(&self) -> Style {
        if self.hex { Style::Hex } else { Style::Text }
    }

    pub fn mode(&self) -> kvfeed_client::KeyMode {
        if self.raw {
            kvfeed_client::KeyMode::Raw
        } else {
            kvfeed_client::KeyMode::Txn
        }
    }

    /// Reads the command-line argument `what` (a key, a value, a bound).
    pub fn parse(&self, what: &'static str, arg: &str) -> Result<Vec<u8>, CmdError> {
        self.style()
            .parse(arg)
            .map_err(|source| CmdError::Hex { what, source })
    }
}

/// Why a client tool failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("invalid hex {what}: {source}")]
    Hex {
        what: &'static str,
        #[source]
        source: HexError,
    },
    #[error("key not found")]
    NotFound,
    #[error("{0}")]
    Usage(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// Runs `work` to completion on a current-thread runtime.
pub(crate) fn block_on<T>(work: impl Future<Output = Result<T, CmdError>>) -> Result<T, CmdError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CmdError::Runtime)?
        .block_on(work)
}

/// Line-oriented stdout that treats a closed pipe (`kvfeed scan | head`) as
/// the reader having seen enough, not as a failure.
pub(crate) struct Output {
    out: io::BufWriter<io::StdoutLock<'static>>,
    closed: bool,
}

impl Output {
    pub(crate) fn stdout() -> Output {
        Output {
            out: io::BufWriter::new(io::stdout().lock()),
            closed: false,
        }
    }

    /// Whether the reader went away; producers may stop early.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    pub(crate) fn line(&mut self, text: &str) -> Result<(), CmdError> {
        if self.closed {
            return Ok(());
        }
        let written = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"));
        self.check(written)
    }

    pub(crate) fn flush(&mut self) -> Result<(), CmdError> {
        if self.closed {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.check(flushed)
    }

    fn check(&mut self, result: io::Result<()>) -> Result<(), CmdError> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other.map_err(CmdError::Output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pd_is_where_serve_listens() {
        assert_eq!(DEFAULT_PD, crate::config::Config::default().server.addr);
    }
}
