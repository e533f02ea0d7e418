//! `kvfeed admin`: change a running server's region layout, or show it.
//!
//! The commands talk to the server's status address (HTTP, see the
//! server's `admin` endpoints), not to PD: splits, merges and leader moves
//! are operator actions, like PD's `pd-ctl operator`. Each prints the
//! server's JSON answer (the regions it produced or changed) and fails with
//! the server's reason when the change was refused; nothing changes then.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::CmdError;
use super::format::Style;
use kvfeed_bench::scrape::{http_get, http_post};

/// Where `kvfeed serve`'s status server listens by default.
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:20180";

/// How long one admin request may take (a change is one fsynced write).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The server's HTTP status address.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_STATUS_ADDR)]
    pub status_addr: String,

    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminAction {
    /// Split regions at KEYs (user keys, in ascending order; each splits
    /// the region holding it). Transactional keys are memcomparable-encoded
    /// first, as TiKV does; with --raw the keys are boundaries as they are.
    Split {
        /// Split keys, strictly ascending.
        #[arg(required = true)]
        keys: Vec<String>,
        /// Use the keys as raw boundaries (not encoded).
        #[arg(long)]
        raw: bool,
        /// The keys are given as hex.
        #[arg(long)]
        hex: bool,
    },
    /// Merge region REGION_ID into a neighbour: --into TARGET, or by
    /// default the region after it (the one before it for the last region).
    Merge {
        /// The region that goes away.
        region_id: u64,
        /// The adjacent region that absorbs it.
        #[arg(long, value_name = "REGION_ID")]
        into: Option<u64>,
    },
    /// Move region REGION_ID's leader to store STORE_ID.
    TransferLeader {
        /// The region.
        region_id: u64,
        /// The store that leads it afterwards.
        store_id: u64,
    },
    /// Print the region layout as JSON.
    Regions,
}

/// Runs one admin command; prints the server's answer.
pub fn run(args: &AdminArgs) -> Result<(), CmdError> {
    let (post, path) = match &args.action {
        AdminAction::Split { keys, raw, hex } => {
            let style = if *hex { Style::Hex } else { Style::Text };
            let mut path = String::from("/admin/split?");
            for key in keys {
                let bytes = style.parse(key).map_err(|source| CmdError::Hex {
                    what: "key",
                    source,
                })?;
                path.push_str("key=");
                path.push_str(&Style::Hex.show(&bytes));
                path.push('&');
            }
            path.push_str(if *raw { "raw=true" } else { "raw=false" });
            (true, path)
        }
        AdminAction::Merge { region_id, into } => {
            let mut path = format!("/admin/merge?region={region_id}");
            if let Some(target) = into {
                path.push_str(&format!("&target={target}"));
            }
            (true, path)
        }
        AdminAction::TransferLeader {
            region_id,
            store_id,
        } => (
            true,
            format!("/admin/transfer-leader?region={region_id}&store={store_id}"),
        ),
        AdminAction::Regions => (false, "/debug/regions".to_owned()),
    };
    let sent = if post {
        http_post(&args.status_addr, &path, ADMIN_TIMEOUT)
    } else {
        http_get(&args.status_addr, &path, ADMIN_TIMEOUT)
    };
    let (status, body) = sent.map_err(|e| {
        CmdError::Usage(format!(
            "cannot reach the status server at {}: {e}",
            args.status_addr
        ))
    })?;
    if status != 200 {
        return Err(CmdError::Usage(format!(
            "refused (HTTP {status}): {}",
            body.trim_end()
        )));
    }
    print!("{body}");
    Ok(())
}
