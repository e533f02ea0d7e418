//! `kvfeed changefeed list | status | pause | resume | remove`: the
//! changefeeds a running `kvfeed serve` runs itself (its `[[changefeed]]`
//! tables), through its status address, like `kvfeed admin`.
//!
//! The server answers JSON; `--json` prints it as it is, otherwise it is
//! shown for people: a table for `list`, one `name: value` line per field
//! for `status`, one line for a change. A refusal (an unknown id, resuming
//! a removed changefeed) fails with the server's reason; nothing changed
//! then.

use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::CmdError;
use super::admin::DEFAULT_STATUS_ADDR;
use kvfeed_bench::scrape::{http_get, http_post};

/// A change stops a changefeed (bounded by the server at 5 s), calls PD
/// and fsyncs; the server gives up after 20 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server is and how to show its answer.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server's HTTP status address.
    #[arg(long, value_name = "HOST:PORT", default_value = DEFAULT_STATUS_ADDR)]
    pub status_addr: String,

    /// Print the server's JSON answer as it is.
    #[arg(long)]
    pub json: bool,
}

/// One admin request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `GET /changefeeds`.
    List,
    /// `GET /changefeeds/status`.
    Status,
    /// `POST /changefeeds/pause`.
    Pause,
    /// `POST /changefeeds/resume`.
    Resume,
    /// `POST /changefeeds/remove`.
    Remove,
}

impl Action {
    fn path(self, id: Option<&str>) -> String {
        let name = match self {
            Action::List => return "/changefeeds".to_owned(),
            Action::Status => "status",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Remove => "remove",
        };
        format!("/changefeeds/{name}?id={}", id.unwrap_or_default())
    }

    fn done(self) -> &'static str {
        match self {
            Action::List | Action::Status => "",
            Action::Pause => "paused",
            Action::Resume => "resumed",
            Action::Remove => "removed (its PD service safe point is deleted)",
        }
    }
}

/// One changefeed as the server shows it (fields it may add are ignored).
#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    state: String,
    admin_state: String,
    sink: String,
    checkpoint_ts: u64,
    resolved_ts: u64,
    rows_emitted: u64,
    bytes_emitted: u64,
    windows: u64,
    sorter_rows: u64,
    restarts: u64,
    last_error: Option<String>,
    lag_ms: Option<u64>,
}

impl Row {
    /// The state an operator cares about: the admin decision when there
    /// is one, else the runner's.
    fn state(&self) -> &str {
        match self.admin_state.as_str() {
            "removed" => "removed",
            _ => &self.state,
        }
    }
}

/// Runs `action` (on `id`, except for `list`) and prints the answer.
pub fn run(action: Action, id: Option<&str>, server: &ServerArgs) -> Result<(), CmdError> {
    if let Some(id) = id {
        kvfeed_changefeed::ChangefeedId::new(id).map_err(|e| CmdError::Usage(e.to_string()))?;
    }
    let path = action.path(id);
    let sent = match action {
        Action::List | Action::Status => http_get(&server.status_addr, &path, REQUEST_TIMEOUT),
        Action::Pause | Action::Resume | Action::Remove => {
            http_post(&server.status_addr, &path, REQUEST_TIMEOUT)
        }
    };
    let (status, body) = sent.map_err(|e| {
        CmdError::Usage(format!(
            "cannot reach the status server at {}: {e}",
            server.status_addr
        ))
    })?;
    if status != 200 {
        return Err(CmdError::Usage(format!(
            "refused (HTTP {status}): {}",
            body.trim_end()
        )));
    }
    let mut out = super::Output::stdout();
    if server.json {
        out.line(body.trim_end())?;
        return out.flush();
    }
    let bad = |e: serde_json::Error| CmdError::Usage(format!("unexpected answer ({e}): {body}"));
    let text = match action {
        Action::List => table(&serde_json::from_str::<Vec<Row>>(&body).map_err(bad)?),
        Action::Status => details(&serde_json::from_str::<Row>(&body).map_err(bad)?),
        _ => {
            let row: Row = serde_json::from_str(&body).map_err(bad)?;
            format!(
                "changefeed {} {}; state: {}",
                row.id,
                action.done(),
                row.state()
            )
        }
    };
    out.line(text.trim_end())?;
    out.flush()
}

/// `list`: one line per changefeed under a header, columns aligned.
fn table(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "no changefeeds (add [[changefeed]] tables to the server's config)".to_owned();
    }
    let header = [
        "ID",
        "STATE",
        "CHECKPOINT_TS",
        "LAG",
        "ROWS",
        "BYTES",
        "LAST_ERROR",
    ];
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.state().to_owned(),
                r.checkpoint_ts.to_string(),
                lag(r.lag_ms),
                r.rows_emitted.to_string(),
                r.bytes_emitted.to_string(),
                r.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header = header.map(str::to_owned);
    for line in std::iter::once(&header).chain(&lines) {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            // The last column is not padded: no trailing blanks.
            .map(|(i, (cell, w))| match i {
                6 => cell.clone(),
                _ => format!("{cell:<w$}"),
            })
            .collect();
        text.push_str(&cells.join("  "));
        text.push('\n');
    }
    text
}

/// `status`: every field on its own line.
fn details(r: &Row) -> String {
    let fields = [
        ("id", r.id.clone()),
        ("state", r.state().to_owned()),
        ("admin state", r.admin_state.clone()),
        ("sink", r.sink.clone()),
        ("checkpoint ts", r.checkpoint_ts.to_string()),
        ("resolved ts", r.resolved_ts.to_string()),
        ("lag", lag(r.lag_ms)),
        ("rows", r.rows_emitted.to_string()),
        ("bytes", r.bytes_emitted.to_string()),
        ("windows", r.windows.to_string()),
        ("sorter rows", r.sorter_rows.to_string()),
        ("restarts", r.restarts.to_string()),
        (
            "last error",
            r.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ),
    ];
    fields
        .iter()
        .map(|(name, value)| format!("{:<14}{value}\n", format!("{name}:")))
        .collect()
}

/// A lag for people: `850ms`, `12.3s`, `5m07s`, `2h03m`; `-` when unknown.
fn lag(ms: Option<u64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) if ms < 3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        Some(ms) => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, admin: &str, error: Option<&str>) -> Row {
        Row {
            id: id.to_owned(),
            state: "running".to_owned(),
            admin_state: admin.to_owned(),
            sink: "file:///x".to_owned(),
            checkpoint_ts: 42,
            resolved_ts: 43,
            rows_emitted: 7,
            bytes_emitted: 1024,
            windows: 2,
            sorter_rows: 0,
            restarts: 0,
            last_error: error.map(str::to_owned),
            lag_ms: Some(1500),
        }
    }

    #[test]
    fn lags_read_well() {
        assert_eq!(lag(None), "-");
        assert_eq!(lag(Some(850)), "850ms");
        assert_eq!(lag(Some(12_345)), "12.3s");
        assert_eq!(lag(Some(307_000)), "5m07s");
        assert_eq!(lag(Some(7_380_000)), "2h03m");
    }

    #[test]
    fn the_list_is_an_aligned_table() {
        let text = table(&[
            row("orders", "active", None),
            row("x", "removed", Some("sink: boom")),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("ID      STATE    CHECKPOINT_TS  LAG"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("orders  running  42             1.5s"),
            "{text}"
        );
        assert!(lines[2].starts_with("x       removed"), "{text}");
        assert!(lines[2].ends_with("sink: boom"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
        assert!(table(&[]).contains("no changefeeds"));
    }

    #[test]
    fn status_shows_every_field() {
        let text = details(&row("orders", "paused", None));
        assert!(text.contains("admin state:  paused\n"), "{text}");
        assert!(text.contains("lag:          1.5s\n"), "{text}");
        assert!(text.contains("last error:   -\n"), "{text}");
    }

    #[test]
    fn paths_carry_the_id() {
        assert_eq!(Action::List.path(None), "/changefeeds");
        assert_eq!(Action::Remove.path(Some("a")), "/changefeeds/remove?id=a");
    }
}
