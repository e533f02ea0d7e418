//! `kvfeed verify --pd HOST:PORT --sink URI`: checks that a changefeed's
//! sink holds exactly the store's history up to its checkpoint (see
//! `kvfeed_changefeed::verify`). Prints a summary and each problem; exits
//! with status 1 when there is any.

use clap::Args;
use kvfeed_changefeed::verify::{VerifyError, verify};
use kvfeed_client::Cluster;

use super::CmdError;

/// `kvfeed verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// PD address of the cluster the changefeed followed.
    #[arg(long, value_name = "HOST:PORT", default_value = super::DEFAULT_PD)]
    pub pd: String,

    /// The changefeed's sink, as given to `kvfeed changefeed run`.
    #[arg(long, value_name = "URI")]
    pub sink: String,

    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Why `kvfeed verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyCmdError {
    /// The cluster could not be reached, or the runtime not started.
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// The sink could not be read or the store not scanned.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The check ran and found problems (listed on stdout).
    #[error("the sink does not match the store: {0} problem(s)")]
    Mismatch(u64),
}

/// `kvfeed verify`.
pub fn run(args: &VerifyArgs) -> Result<(), VerifyCmdError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CmdError::Runtime)?;
    let report = runtime.block_on(async {
        let cluster = Cluster::connect(&args.pd).await.map_err(CmdError::from)?;
        Ok::<_, VerifyCmdError>(verify(&cluster, &args.sink).await?)
    })?;
    if args.json {
        let line = serde_json::to_string(&report).unwrap_or_else(|_| "{}".to_owned());
        println!("{line}");
    } else {
        println!(
            "changefeed {}: checkpoint {}, {} rows in {} transactions, {} keys compared",
            report.id, report.checkpoint_ts, report.rows, report.transactions, report.keys_compared
        );
        if report.replayed_rows > 0 {
            println!(
                "{} rows were there twice (a window written again after a restart, which this broker shows although its transaction was aborted) and were read once",
                report.replayed_rows
            );
        }
        if report.values_omitted > 0 {
            println!(
                "{} rows were larger than the sink's max-message-bytes and hold no value; their keys were not compared",
                report.values_omitted
            );
        }
        for problem in &report.problems {
            println!("problem: {problem}");
        }
        if report.problem_count > report.problems.len() as u64 {
            println!(
                "… and {} more",
                report.problem_count - report.problems.len() as u64
            );
        }
        if report.is_clean() {
            println!("ok: every change exactly once, in commit order, transactions whole");
        }
    }
    if report.is_clean() {
        Ok(())
    } else {
        Err(VerifyCmdError::Mismatch(report.problem_count))
    }
}
