//! `kvfeed watch`: print every change to a key range as it is committed, in
//! the manner of `etcdctl watch`, from the server's `cdcpb.ChangeData` feed.
//!
//! The range is split along PD's regions; each piece becomes one
//! subscription (its own request id) on a single `EventFeed` stream. Lines
//! go to stdout, one per committed change; everything else (the `watching`
//! line once every subscription is initialized, retries, progress) goes to
//! stderr, so stdout stays machine-readable. With `--from-ts`, catch-up
//! progress (rows, rows/s, bytes) goes to stderr until then: one line
//! redrawn in place on a terminal, a line every few seconds otherwise, and
//! a `caught up: …` summary just before `watching`.
//!
//! What a transaction looks like on the feed, and so what is printed:
//! PREWRITE rows stage a value and print nothing; COMMIT prints the change,
//! with the prewritten value when the COMMIT row carries none (large values
//! travel only with the PREWRITE); ROLLBACK discards the staged value;
//! COMMITTED (one-phase commits, raw writes, catch-up rows) prints as it is.
//! Staged values are keyed by (key, start_ts) and dropped at COMMIT or
//! ROLLBACK, so they live only as long as the lock they mirror.
//!
//! Recovery, all bounded:
//! - a retryable region error (`epoch_not_match`, `region_not_found`,
//!   `not_leader`, `server_is_busy`, `congested`) ends one subscription: its
//!   range is looked up in PD again and subscribed anew after a backoff,
//!   giving up after [`REGION_ATTEMPTS`] tries in a row;
//! - the stream ending or failing reconnects and re-subscribes everything,
//!   giving up after [`RECONNECT_ATTEMPTS`] tries in a row;
//! - any other refusal (cluster id, compatibility, duplicate) is an error.
//!
//! A re-subscription resumes from the subscription's *floor*: the highest
//! resolved ts it received, or the original checkpoint. Every change at or
//! below it has been delivered, so nothing is lost; changes above it may be
//! delivered again, so printed (commit_ts, key) pairs above the floors are
//! remembered (at most [`MAX_REMEMBERED`]) and not printed twice.
//!
//! The core, [`watch`], takes its writers and a cancellation future so that
//! it can run inside tests; [`run`] wires it to stdout, stderr and SIGINT /
//! SIGTERM, both of which end the watch with status 0.

mod progress;
mod render;
mod state;

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use kvfeed_proto::cdcpb::ChangeDataRequest;
use kvfeed_proto::cdcpb::change_data_client::ChangeDataClient;
use kvfeed_proto::cdcpb::change_data_request::KvApi;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::format::{Style, prefix_successor};
use super::{ClientArgs, CmdError};
use kvfeed_client::retry::Backoff;
use kvfeed_client::{ClientError, Cluster, KeyMode};
use state::{Lines, Parked, State};

pub use render::wall_time;

/// The client version announced: current enough for batched resolved ts
/// and cluster-id checks.
pub const TICDC_VERSION: &str = "8.5.0";
/// Tries in a row to re-subscribe one range after region errors.
pub const REGION_ATTEMPTS: u32 = 10;
/// Tries in a row to reconnect after the stream ended or failed.
pub const RECONNECT_ATTEMPTS: u32 = 10;
/// Printed (commit_ts, key) pairs kept for de-duplication.
pub const MAX_REMEMBERED: usize = 100_000;
/// The largest event accepted: the server's own cap.
const MAX_EVENT_SIZE: usize = crate::feed::MAX_EVENT_SIZE;
/// Register requests queued ahead of the transport.
const REQUEST_QUEUE: usize = 64;
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

    /// The range in PD's key space (encoded for transactions).
    fn region_range(&self) -> (Vec<u8>, Vec<u8>) {
        let bound = |key: &[u8]| match (key.is_empty(), self.mode) {
            (true, _) | (false, KeyMode::Raw) => key.to_vec(),
            (false, KeyMode::Txn) => self.mode.region_key(key),
        };
        (bound(&self.start), bound(&self.end))
    }

    fn kv_api(&self) -> KvApi {
        match self.mode {
            KeyMode::Txn => KvApi::TiDb,
            KeyMode::Raw => KvApi::RawKv,
        }
    }
}

/// Why the watch stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the server refused to watch region {region}: {reason}")]
    Refused { region: u64, reason: String },
    #[error("region {region}: still {reason} after {attempts} attempts to subscribe")]
    RegionRetries {
        region: u64,
        reason: String,
        attempts: u32,
    },
    #[error("the change feed is unavailable: {0}")]
    Unsupported(String),
    #[error("lost the change feed stream ({last}); gave up after {attempts} attempts to reconnect")]
    Disconnected { last: String, attempts: u32 },
    #[error("no region covers the watched range")]
    NoRegions,
    #[error("the watched range spans stores {0} and {1}; watch follows one store")]
    ManyStores(u64, u64),
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
        state: State::new(spec.clone(), cluster.cluster_id()),
        out,
        notices,
        store_id: None,
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

/// How one stream's life ended, when the watch goes on.
enum SessionEnd {
    /// Reconnect; the reason is reported if reconnecting fails.
    Lost(String),
    /// The reader of stdout went away: stop quietly.
    OutputClosed,
}

/// The driver: owns the I/O around [`State`].
struct Watcher<'a, O, N> {
    cluster: &'a Cluster,
    state: State,
    out: &'a mut O,
    notices: &'a mut N,
    store_id: Option<u64>,
    /// Characters of the in-place status line on a terminal (0: none).
    status_width: usize,
}

impl<O: Write, N: Write> Watcher<'_, O, N> {
    async fn run(&mut self) -> Result<(), WatchError> {
        let checkpoint = match self.state.spec.from_ts {
            Some(ts) => ts,
            None => self.cluster.tso().await?.into_inner(),
        };
        self.state.checkpoint = checkpoint;
        let (start, end) = self.state.spec.region_range();
        self.state.parked.push(Parked {
            start,
            end,
            floor: checkpoint,
            attempts: 0,
        });
        let mut reconnects = reconnect_backoff();
        for session in 1u64.. {
            let span = tracing::debug_span!("watch_stream", session);
            match self.session(&mut reconnects).instrument(span).await? {
                SessionEnd::OutputClosed => return Ok(()),
                SessionEnd::Lost(last) => {
                    tracing::debug!(%last, "stream lost");
                    if !reconnects.wait(false).await {
                        return Err(WatchError::Disconnected {
                            last,
                            attempts: reconnects.attempts(),
                        });
                    }
                    self.notice(&format!("{last}; reconnecting"))?;
                    self.state.requeue_all();
                }
            }
        }
        Ok(())
    }

    /// One EventFeed stream: subscribe everything wanted, then print what
    /// arrives until the stream ends.
    async fn session(&mut self, reconnects: &mut Backoff) -> Result<SessionEnd, WatchError> {
        // The store is known once the first ranges are resolved.
        if self.store_id.is_none()
            && let Some(end) = self.resolve_parked(None).await?
        {
            return Ok(end);
        }
        let Some(store_id) = self.store_id else {
            return Err(WatchError::NoRegions);
        };
        let store = match self.cluster.store(store_id).await {
            Ok(store) => store,
            Err(e) => return Ok(SessionEnd::Lost(e.to_string())),
        };
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let mut client =
            ChangeDataClient::new(store.channel()).max_decoding_message_size(MAX_EVENT_SIZE);
        let mut stream = match client.event_feed(ReceiverStream::new(rx)).await {
            Ok(response) => response.into_inner(),
            Err(status) => return lost_or_fatal("EventFeed", &status),
        };
        for request in self.state.registers() {
            if tx.send(request).await.is_err() {
                return Ok(SessionEnd::Lost("the request stream closed".to_owned()));
            }
        }
        loop {
            if let Some(end) = self.resolve_parked(Some(&tx)).await? {
                return Ok(end);
            }
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(SessionEnd::Lost("the server ended the stream".to_owned())),
                Err(status) => return lost_or_fatal("the change feed stream", &status),
            };
            // The stream works: the next loss gets a fresh budget.
            *reconnects = reconnect_backoff();
            let mut lines = Lines::default();
            self.state.on_event(event, &mut lines)?;
            if let Some(status) = &lines.status {
                self.status(status);
            }
            for notice in &lines.notices {
                self.notice(notice)?;
            }
            if !self.print(&lines.out)? {
                return Ok(SessionEnd::OutputClosed);
            }
        }
    }

    /// Looks the parked ranges up in PD (after each one's backoff) and
    /// subscribes their regions, on `tx` when a stream is open.
    async fn resolve_parked(
        &mut self,
        tx: Option<&mpsc::Sender<ChangeDataRequest>>,
    ) -> Result<Option<SessionEnd>, WatchError> {
        while let Some(parked) = self.state.parked.pop() {
            // `State::on_error` gives up before a range is parked too often.
            if parked.attempts > 0 {
                tokio::time::sleep(region_delay(parked.attempts)).await;
            }
            let regions = match self
                .cluster
                .regions_in_range(&parked.start, &parked.end)
                .await
            {
                Ok(regions) => regions,
                Err(e) => {
                    // PD is unreachable: so is the feed, most likely. Keep
                    // the range for the next stream.
                    self.state.parked.push(parked);
                    return Ok(Some(SessionEnd::Lost(e.to_string())));
                }
            };
            if regions.is_empty() {
                return Err(WatchError::NoRegions);
            }
            for region in &regions {
                let store = region.leader.store_id;
                match self.store_id {
                    None => self.store_id = Some(store),
                    Some(known) if known != store => {
                        return Err(WatchError::ManyStores(known, store));
                    }
                    Some(_) => {}
                }
            }
            let requests = self.state.subscribe(&parked, regions);
            if let Some(tx) = tx {
                for request in requests {
                    if tx.send(request).await.is_err() {
                        return Ok(Some(SessionEnd::Lost(
                            "the request stream closed".to_owned(),
                        )));
                    }
                }
            }
        }
        Ok(None)
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
        if !self.state.spec.progress_tty {
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

/// A failed call: reconnect for transient codes, stop for the others.
fn lost_or_fatal(what: &str, status: &tonic::Status) -> Result<SessionEnd, WatchError> {
    use tonic::Code;
    let text = format!("{what} failed: {} ({:?})", status.message(), status.code());
    match status.code() {
        Code::Unimplemented
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::OutOfRange => Err(WatchError::Unsupported(text)),
        _ => Ok(SessionEnd::Lost(text)),
    }
}

fn reconnect_backoff() -> Backoff {
    Backoff::new(
        RECONNECT_ATTEMPTS,
        Duration::from_millis(100),
        Duration::from_secs(2),
    )
}

/// The wait before the `attempts`-th re-subscription: 10 ms doubling to 1 s.
fn region_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(7);
    Duration::from_millis(10 << doublings).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use kvfeed_storage::mvcc::encode_bytes;

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

    #[test]
    fn transactional_ranges_are_encoded_for_pd_and_raw_ones_are_not() {
        let txn = spec(&["--prefix", "p"]).expect("valid");
        assert_eq!(txn.region_range(), (encode_bytes(b"p"), encode_bytes(b"q")));
        assert_eq!(txn.kv_api(), KvApi::TiDb);
        let raw = spec(&["--raw", "--prefix", "p"]).expect("valid");
        assert_eq!(raw.region_range(), (b"p".to_vec(), b"q".to_vec()));
        assert_eq!(raw.kv_api(), KvApi::RawKv);
        // Unbounded stays unbounded (an encoded empty key would not be).
        let all = spec(&[]).expect("valid");
        assert_eq!(all.region_range(), (vec![], vec![]));
    }

    #[test]
    fn region_retries_back_off_within_a_bound() {
        let delays: Vec<Duration> = (1..=REGION_ATTEMPTS).map(region_delay).collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
    }
}
