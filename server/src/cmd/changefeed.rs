//! `kvfeed changefeed run`: one changefeed in this process, against any
//! PD address (`kvfeed serve` or a TiKV cluster), until Ctrl-C or SIGTERM.
//! `list`, `status`, `pause`, `resume` and `remove` manage the changefeeds
//! a server runs itself instead (see [`super::changefeed_admin`]).
//!
//! Everything it does lives in `kvfeed-changefeed`; this module turns flags
//! into a [`ChangefeedDef`] and a sink, checks them before anything runs,
//! and reports progress on stderr.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use kvfeed_changefeed::sink::{AnySink, FileSink, KafkaSink, NatsSink, SinkUri, WebhookSink};
use kvfeed_changefeed::{
    Changefeed, ChangefeedDef, ChangefeedError, ChangefeedId, Format, Mode, RunOptions,
};
use kvfeed_client::Cluster;
use kvfeed_client::region::prefix_successor;
use kvfeed_types::TimeStamp;

use super::CmdError;
use super::changefeed_admin::{self, Action, ServerArgs};
use super::format::Style;

/// `kvfeed changefeed …`.
#[derive(Debug, Clone, Args)]
pub struct ChangefeedArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ChangefeedCommand,
}

/// The changefeed subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ChangefeedCommand {
    /// Run a changefeed in this process until Ctrl-C or SIGTERM: every
    /// change of the range, committed after the start ts, into the sink,
    /// exactly once, in commit order, whole transactions together. Run it
    /// again with the same --id and --sink to resume from the sink's
    /// checkpoint.
    Run(RunArgs),
    /// List the changefeeds a running server runs itself (its
    /// `[[changefeed]]` tables): state, checkpoint, lag, rows, bytes, last
    /// error.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show one of a server's changefeeds in detail.
    Status {
        /// The changefeed's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop one of a server's changefeeds until `resume`, also across
    /// restarts; PD keeps its history for the table's gc-ttl.
    Pause {
        /// The changefeed's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Start a paused (or failed) changefeed of a server again, from its
    /// sink's checkpoint.
    Resume {
        /// The changefeed's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop one of a server's changefeeds for good and release its PD
    /// service safe point. It is not started again while its table stays
    /// in the config; a table with a new id is a new changefeed.
    Remove {
        /// The changefeed's id.
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `kvfeed changefeed run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// PD address of the cluster: a `kvfeed serve` address or a TiKV
    /// cluster's PD.
    #[arg(long, value_name = "HOST:PORT", default_value = super::DEFAULT_PD)]
    pub pd: String,

    /// The changefeed's name: letters, digits, '-', '_', '.'. It names the
    /// PD service GC safe point the changefeed holds.
    #[arg(long)]
    pub id: String,

    /// Where rows go: file:///DIR (NDJSON files), http://… or https://…
    /// (a webhook), nats://HOST:PORT/SUBJECT_PREFIX?stream=… (NATS
    /// JetStream); see the README for each sink's parameters.
    #[arg(long, value_name = "URI")]
    pub sink: String,

    /// Follow the keys under PREFIX.
    #[arg(long, value_name = "PREFIX", conflicts_with_all = ["from_key", "to_key"])]
    pub prefix: Option<String>,

    /// Inclusive start of the range [default: the first key].
    #[arg(long, value_name = "KEY")]
    pub from_key: Option<String>,

    /// Exclusive end of the range [default: unbounded].
    #[arg(long, value_name = "KEY")]
    pub to_key: Option<String>,

    /// Keys are given as hex.
    #[arg(long)]
    pub hex: bool,

    /// Follow raw keys instead of transactional ones.
    #[arg(long)]
    pub raw: bool,

    /// Deliver changes committed after TS [default: now]. Only the first
    /// run uses it; a restart resumes from the sink's checkpoint.
    #[arg(long, value_name = "TS")]
    pub start_ts: Option<u64>,

    /// Row format: json or debezium [default: the sink URI's format
    /// parameter, else json].
    #[arg(long)]
    pub format: Option<String>,

    /// Rows carry the value before the change (always on for debezium).
    #[arg(long)]
    pub old_value: bool,

    /// Scratch space (the sorter's spill, a webhook's checkpoint)
    /// [default: ./kvfeed-changefeed/ID].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Rows kept in memory before sorting spills to disk, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub memory_mib: usize,

    /// TTL of the PD service safe point, in seconds (TiCDC's gc-ttl).
    #[arg(long, value_name = "SECS", default_value_t = 24 * 3600)]
    pub gc_ttl: u64,
}

impl RunArgs {
    /// The definition the flags describe; `start_ts` is filled in later.
    pub fn def(&self) -> Result<ChangefeedDef, CmdError> {
        let usage = |e: &dyn std::fmt::Display| CmdError::Usage(e.to_string());
        let id = ChangefeedId::new(self.id.clone()).map_err(|e| usage(&e))?;
        let format = self.format()?;
        let style = if self.hex { Style::Hex } else { Style::Text };
        let parse = |what: &'static str, arg: &str| {
            style
                .parse(arg)
                .map_err(|source| CmdError::Hex { what, source })
        };
        let (start, end) = match &self.prefix {
            Some(prefix) => {
                let start = parse("prefix", prefix)?;
                let end = prefix_successor(&start).unwrap_or_default();
                (start, end)
            }
            None => (
                self.from_key
                    .as_deref()
                    .map(|k| parse("--from-key key", k))
                    .transpose()?
                    .unwrap_or_default(),
                self.to_key
                    .as_deref()
                    .map(|k| parse("--to-key key", k))
                    .transpose()?
                    .unwrap_or_default(),
            ),
        };
        if self.to_key.is_some() && end.is_empty() {
            return Err(CmdError::Usage("--to-key must not be empty".to_owned()));
        }
        let def = ChangefeedDef {
            id,
            mode: if self.raw { Mode::Raw } else { Mode::Txn },
            start,
            end,
            format,
            old_value: self.old_value || format == Format::Debezium,
            start_ts: TimeStamp::new(self.start_ts.unwrap_or(0)),
        };
        def.validate().map_err(|e| usage(&e))?;
        Ok(def)
    }

    /// The row format: --format, else the sink URI's `format`, else json;
    /// the two must agree when both are given.
    fn format(&self) -> Result<Format, CmdError> {
        let usage = |e: &dyn std::fmt::Display| CmdError::Usage(e.to_string());
        let flag = self
            .format
            .as_deref()
            .map(Format::parse)
            .transpose()
            .map_err(|e| usage(&e))?;
        let in_uri = SinkUri::parse(&self.sink).map_err(|e| usage(&e))?.format();
        match (flag, in_uri) {
            (Some(f), Some(u)) if f != u => Err(CmdError::Usage(format!(
                "the format {} contradicts the sink URI's format={}",
                f.name(),
                u.name()
            ))),
            (f, u) => Ok(f.or(u).unwrap_or(Format::Json)),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("kvfeed-changefeed").join(&self.id))
    }

    /// How the changefeed runs: the memory budget and the safe point's TTL.
    pub(crate) fn options(&self) -> RunOptions {
        RunOptions {
            memory_budget: self.memory_mib.max(1) << 20,
            gc_ttl: Duration::from_secs(self.gc_ttl.max(1)),
            ..RunOptions::default()
        }
    }
}

/// Builds the sink a URI names. Nothing is opened yet: `Sink::open` does
/// that (and reports unwritable places) before the feed starts.
pub fn sink_for(uri: &str, state_dir: PathBuf) -> Result<AnySink, CmdError> {
    let usage = |e: &dyn std::fmt::Display| CmdError::Usage(e.to_string());
    Ok(match SinkUri::parse(uri).map_err(|e| usage(&e))? {
        SinkUri::File(dir) => AnySink::File(FileSink::new(dir)),
        SinkUri::Webhook(url) => {
            AnySink::Webhook(WebhookSink::new(url, state_dir, Default::default()))
        }
        SinkUri::Nats(nats) => AnySink::Nats(NatsSink::new(nats)),
        SinkUri::Kafka(kafka) => AnySink::Kafka(KafkaSink::new(kafka)),
    })
}

/// Why `kvfeed changefeed` failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangefeedCmdError {
    /// Bad flags, or the cluster could not be reached.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// The changefeed stopped with an error.
    #[error("changefeed stopped")]
    Changefeed(#[from] ChangefeedError),
}

/// `kvfeed changefeed …`.
pub fn run(args: &ChangefeedArgs) -> Result<(), ChangefeedCmdError> {
    match &args.command {
        ChangefeedCommand::Run(run) => run_one(run),
        ChangefeedCommand::List { server } => {
            Ok(changefeed_admin::run(Action::List, None, server)?)
        }
        ChangefeedCommand::Status { id, server } => {
            Ok(changefeed_admin::run(Action::Status, Some(id), server)?)
        }
        ChangefeedCommand::Pause { id, server } => {
            Ok(changefeed_admin::run(Action::Pause, Some(id), server)?)
        }
        ChangefeedCommand::Resume { id, server } => {
            Ok(changefeed_admin::run(Action::Resume, Some(id), server)?)
        }
        ChangefeedCommand::Remove { id, server } => {
            Ok(changefeed_admin::run(Action::Remove, Some(id), server)?)
        }
    }
}

fn run_one(args: &RunArgs) -> Result<(), ChangefeedCmdError> {
    let mut def = args.def()?;
    let state_dir = args.state_dir();
    let sink = sink_for(&args.sink, state_dir.clone())?;
    // Several threads: the sorter and the sinks do blocking I/O beside the
    // feed's network work.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CmdError::Runtime)?;
    runtime.block_on(async {
        let mut signals = crate::shutdown::OsSignals::install().map_err(CmdError::Runtime)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            signals.recv().await;
            stop.send_replace(true);
        });
        let cluster = Cluster::connect(&args.pd).await.map_err(CmdError::from)?;
        if args.start_ts.is_none() {
            def.start_ts = cluster.tso().await.map_err(CmdError::from)?;
        }
        eprintln!(
            "changefeed {}: {} keys into {} from ts {} (a restart resumes from the sink's checkpoint)",
            def.id,
            match def.mode {
                Mode::Txn => "transactional",
                Mode::Raw => "raw",
            },
            args.sink,
            def.start_ts
        );
        let changefeed = Changefeed::new(def, cluster, sink, state_dir, args.options());
        let status = changefeed.status();
        let reporter = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = status.lock().clone();
                tracing::info!(
                    changefeed = %s.id,
                    state = ?s.state,
                    checkpoint_ts = s.checkpoint_ts,
                    rows = s.rows_emitted,
                    sorter_rows = s.sorter_rows,
                    "changefeed progress"
                );
            }
        });
        let result = changefeed.run(stopped).await;
        reporter.abort();
        result.map_err(ChangefeedCmdError::from)
    })
}
