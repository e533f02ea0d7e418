//! `kvfeed watch`: print every change to a key range as it is committed, in
//! the manner of `etcdctl watch`, from the server's `cdcpb.ChangeData` feed.
//!
//! The feed itself — regions, stores, registration, recovery from region
//! errors and lost streams, assembling transactions, de-duplication — is
//! [`kvfeed_client::feed`]; this command only prints what it yields. Lines
//! go to stdout, one per committed change; everything else (the `watching`
//! line once every range is initialized, retries, progress) goes to stderr,
//! so stdout stays machine-readable. With `--from-ts`, catch-up progress
//! (rows, rows/s, bytes) goes to stderr until then: one line redrawn in
//! place on a terminal, a line every few seconds otherwise, and a
//! `caught up: …` summary just before `watching`.
//!
//! The core, [`watch`], takes its writers and a cancellation future so that
//! it can run inside tests; [`run`] wires it to stdout, stderr and SIGINT /
//! SIGTERM, both of which end the watch with status 0.

mod progress;
mod render;
mod view;

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use kvfeed_client::feed::{Feed, FeedError, FeedSpec};
use kvfeed_client::{ClientError, Cluster, KeyMode};
use kvfeed_storage::TimeStamp;
use tracing::Instrument;

use super::format::{Style, prefix_successor};
use super::{ClientArgs, CmdError};
use view::{Lines, View};

pub use render::wall_time;

/// `--progress` prints at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Watch this one key (use `--` before a key that starts with `-`).
    #[arg(conflicts_with_all = ["prefix", "from_key", "to_key"])]
    pub key: Option<String>,

    /// Watch every key that starts with PREFIX.
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["from_key", "to_key"])]
    pub prefix: Option<String>,

    /// First key of the watched range (inclusive) [default: the first key]
    #[arg(long, value_name = "KEY")]
    pub from_key: Option<String>,

    /// End of the watched range (exclusive) [default: no end]
    #[arg(long, value_name = "KEY")]
    pub to_key: Option<String>,

    /// Report changes committed after TS (catch-up from the past) instead
    /// of from now.
    #[arg(long, value_name = "TS")]
    pub from_ts: Option<u64>,

    /// Print the resolved ts to stderr now and then.
    #[arg(long)]
    pub progress: bool,
}

impl WatchArgs {
    /// The watched `[start, end)` in user keys (empty `end` = unbounded),
    /// and how to describe it.
    pub fn range(&self) -> Result<(Vec<u8>, Vec<u8>, String), CmdError> {
        let c = &self.client;
        let style = c.style();
        if let Some(key) = &self.key {
            let key = c.parse("key", key)?;
            if key.is_empty() {
                return Err(CmdError::Usage("the key must not be empty".to_owned()));
            }
            let mut end = key.clone();
            // The smallest key above `key`: the range holds exactly `key`.
            end.push(0);
            let what = format!("key {}", style.show(&key));
            return Ok((key, end, what));
        }
        if let Some(prefix) = &self.prefix {
            let start = c.parse("prefix", prefix)?;
            let end = prefix_successor(&start).unwrap_or_default();
            let what = format!("prefix {}", style.show(&start));
            return Ok((start, end, what));
        }
        let start = match &self.from_key {
            Some(from) => c.parse("--from-key key", from)?,
            None => Vec::new(),
        };
        let end = match &self.to_key {
            Some(to) => c.parse("--to-key key", to)?,
            None => Vec::new(),
        };
        if self.to_key.is_some() && end <= start {
            return Err(CmdError::Usage(
                "--to-key must sort after --from-key (the range is [from, to))".to_owned(),
            ));
        }
        let what = if start.is_empty() && end.is_empty() {
            "all keys".to_owned()
        } else {
            let end_text = if end.is_empty() {
                "end".to_owned()
            } else {
                style.show(&end)
            };
            format!("[{}, {end_text})", style.show(&start))
        };
        Ok((start, end, what))
    }
}

/// Everything [`watch`] needs to know about what to print.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub mode: KeyMode,
    /// User keys; empty `end` = unbounded.
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    /// For the `watching` line.
    pub description: String,
    /// `None`: from a fresh timestamp ("now").
    pub from_ts: Option<u64>,
    pub style: Style,
    pub json: bool,
    pub progress: bool,
    /// Notices go to a terminal: catch-up progress redraws one line in
    /// place instead of printing a line every few seconds.
    pub progress_tty: bool,
}

impl WatchSpec {
    pub fn from_args(args: &WatchArgs) -> Result<WatchSpec, CmdError> {
        let (start, end, description) = args.range()?;
        Ok(WatchSpec {
            mode: args.client.mode(),
            start,
            end,
            description,
            from_ts: args.from_ts,
            style: args.client.style(),
            json: args.client.json,
            progress: args.progress,
            progress_tty: io::stderr().is_terminal(),
        })
    }
}

/// Why the watch stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// `kvfeed watch`: runs until SIGINT or SIGTERM (status 0) or an error.
pub fn run(args: &WatchArgs) -> Result<(), WatchError> {
    let spec = WatchSpec::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CmdError::Runtime)?;
    runtime.block_on(async {
        // Installed before connecting, so an early Ctrl-C is a clean stop;
        // a watch channel lets both phases (connecting, watching) see it.
        let mut signals = crate::shutdown::OsSignals::install().map_err(CmdError::Runtime)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signals.recv().await;
            stop.send_replace(true);
        });
        let cancelled = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            // An error means the sender is gone, which never happens first.
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let cluster = tokio::select! {
            biased;
            () = cancelled(stopped.clone()) => return Ok(()),
            cluster = Cluster::connect(&args.client.pd) => cluster?,
        };
        let mut out = io::stdout().lock();
        let mut notices = io::stderr();
        watch(&cluster, &spec, &mut out, &mut notices, cancelled(stopped)).await
    })
}

/// Watches `spec` on `cluster`, printing changes to `out` and notices to
/// `notices`, until `cancel` completes (then `Ok`) or an error. A closed
/// `out` (the reader went away) also ends the watch with `Ok`.
pub async fn watch(
    cluster: &Cluster,
    spec: &WatchSpec,
    out: &mut impl Write,
    notices: &mut impl Write,
    cancel: impl Future<Output = ()>,
) -> Result<(), WatchError> {
    let span = tracing::info_span!("watch", range = %spec.description);
    let mut watcher = Watcher {
        cluster,
        spec,
        out,
        notices,
        status_width: 0,
    };
    let result = tokio::select! {
        biased;
        () = cancel => Ok(()),
        result = watcher.run().instrument(span) => result,
    };
    match watcher.out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe && result.is_ok() => {
            Err(WatchError::Output(e))
        }
        _ => result,
    }
}

/// The driver: pulls the feed and writes what [`View`] makes of it.
struct Watcher<'a, O, N> {
    cluster: &'a Cluster,
    spec: &'a WatchSpec,
    out: &'a mut O,
    notices: &'a mut N,
    /// Characters of the in-place status line on a terminal (0: none).
    status_width: usize,
}

impl<O: Write, N: Write> Watcher<'_, O, N> {
    async fn run(&mut self) -> Result<(), WatchError> {
        let checkpoint = match self.spec.from_ts {
            Some(ts) => ts,
            None => self.cluster.tso().await?.into_inner(),
        };
        let mut view = View::new(self.spec.clone(), checkpoint);
        let mut feed = Feed::open(
            self.cluster,
            &FeedSpec {
                mode: self.spec.mode,
                start: self.spec.start.clone(),
                end: self.spec.end.clone(),
                start_ts: TimeStamp::new(checkpoint),
                old_value: false,
            },
        );
        loop {
            let lines = view.on_event(feed.next().await?);
            if !self.show(&lines)? {
                return Ok(());
            }
        }
    }

    /// Writes one item's lines; `false` when the reader of stdout went away.
    fn show(&mut self, lines: &Lines) -> Result<bool, WatchError> {
        if let Some(status) = &lines.status {
            self.status(status);
        }
        for notice in &lines.notices {
            self.notice(notice)?;
        }
        self.print(&lines.out)
    }

    /// Writes change lines; `false` when the reader went away.
    fn print(&mut self, lines: &[String]) -> Result<bool, WatchError> {
        if lines.is_empty() {
            return Ok(true);
        }
        let mut written = Ok(());
        for line in lines {
            written = writeln!(self.out, "{line}");
            if written.is_err() {
                break;
            }
        }
        match written.and_then(|()| self.out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(WatchError::Output(e)),
        }
    }

    fn notice(&mut self, line: &str) -> Result<(), WatchError> {
        // stderr going away is no reason to stop printing changes.
        let _ = self
            .clear_status()
            .and_then(|()| writeln!(self.notices, "{line}"))
            .and_then(|()| self.notices.flush());
        Ok(())
    }

    /// Shows catch-up progress: in place on a terminal, else as a line.
    fn status(&mut self, line: &str) {
        if !self.spec.progress_tty {
            let _ = self.notice(line);
            return;
        }
        let width = line.chars().count();
        // Pad over the previous, longer text; no newline, so the next
        // status (or notice) overwrites it.
        let pad = self.status_width.saturating_sub(width);
        let _ = write!(self.notices, "\r{line}{:pad$}", "").and_then(|()| self.notices.flush());
        self.status_width = width;
    }

    /// Blanks an in-place status line so a notice starts on a clean line.
    fn clear_status(&mut self) -> io::Result<()> {
        if self.status_width == 0 {
            return Ok(());
        }
        let width = std::mem::take(&mut self.status_width);
        write!(self.notices, "\r{:width$}\r", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn spec(args: &[&str]) -> Result<WatchSpec, CmdError> {
        let cli = Cli::try_parse_from([&["kvfeed", "watch"], args].concat())
            .map_err(|e| CmdError::Usage(e.to_string()))?;
        match cli.command {
            Command::Watch(args) => WatchSpec::from_args(&args),
            other => Err(CmdError::Usage(format!("parsed as {other:?}"))),
        }
    }

    fn range(args: &[&str]) -> (Vec<u8>, Vec<u8>, String) {
        let spec = spec(args).expect("valid arguments");
        (spec.start, spec.end, spec.description)
    }

    #[test]
    fn ranges_follow_etcdctl_shapes() {
        assert_eq!(range(&[]), (vec![], vec![], "all keys".to_owned()));
        assert_eq!(
            range(&["k"]),
            (b"k".to_vec(), b"k\0".to_vec(), "key k".to_owned())
        );
        assert_eq!(
            range(&["--prefix", "ab"]),
            (b"ab".to_vec(), b"ac".to_vec(), "prefix ab".to_owned())
        );
        assert_eq!(
            range(&["--hex", "--prefix", "ffff"]),
            (vec![0xff, 0xff], vec![], "prefix ffff".to_owned())
        );
        assert_eq!(
            range(&["--from-key", "b", "--to-key", "d"]),
            (b"b".to_vec(), b"d".to_vec(), "[b, d)".to_owned())
        );
        assert_eq!(
            range(&["--from-key", "b"]),
            (b"b".to_vec(), vec![], "[b, end)".to_owned())
        );
    }

    #[test]
    fn conflicting_or_empty_ranges_are_refused() {
        for args in [
            &["k", "--prefix", "p"][..],
            &["--prefix", "p", "--from-key", "a"],
            &["--from-key", "d", "--to-key", "b"],
            &["--hex", ""],
            &["--hex", "zz"],
            &["--from-ts", "soon"],
        ] {
            assert!(spec(args).is_err(), "{args:?} accepted");
        }
    }
}
