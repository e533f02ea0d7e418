//! Catch-up progress of `watch --from-ts`: until every subscription is
//! initialized, how many rows (and bytes) the catch-up scans delivered and
//! how fast. On a terminal it is one line that overwrites itself; otherwise
//! a line now and then. A summary line ends it, just before `watching`.
//!
//! Free of I/O and of the clock: the caller passes the current instant.

use std::time::Duration;

use tokio::time::Instant;

/// A non-terminal gets a progress line at most this often.
pub(super) const LINE_INTERVAL: Duration = Duration::from_secs(2);
/// A terminal line is redrawn at most this often.
pub(super) const REDRAW_INTERVAL: Duration = Duration::from_millis(100);

/// Counts what a catch-up delivered.
#[derive(Debug)]
pub(super) struct CatchUp {
    started: Instant,
    rows: u64,
    bytes: u64,
    last_shown: Option<Instant>,
    interval: Duration,
}

impl CatchUp {
    /// `tty`: stderr is a terminal (redraw often, in place).
    pub(super) fn new(now: Instant, tty: bool) -> CatchUp {
        CatchUp {
            started: now,
            rows: 0,
            bytes: 0,
            last_shown: None,
            interval: if tty { REDRAW_INTERVAL } else { LINE_INTERVAL },
        }
    }

    /// Counts `rows` rows of `bytes` bytes; the progress text when one is
    /// due (the first interval after the start, then every interval).
    pub(super) fn add(&mut self, rows: u64, bytes: u64, now: Instant) -> Option<String> {
        self.rows += rows;
        self.bytes += bytes;
        let since = self.last_shown.unwrap_or(self.started);
        if now.duration_since(since) < self.interval {
            return None;
        }
        self.last_shown = Some(now);
        Some(format!("catching up: {}", self.figures(now)))
    }

    /// The closing line, once every subscription is initialized.
    pub(super) fn summary(&self, now: Instant) -> String {
        format!("caught up: {}", self.figures(now))
    }

    fn figures(&self, now: Instant) -> String {
        let elapsed = now.duration_since(self.started);
        let secs = elapsed.as_secs_f64();
        // Below a millisecond a rate means nothing; show the count alone.
        let rate = if secs >= 0.001 {
            self.rows as f64 / secs
        } else {
            0.0
        };
        let plural = if self.rows == 1 { "" } else { "s" };
        format!(
            "{} row{plural}, {rate:.0} rows/s, {} in {:.1}s",
            self.rows,
            bytes(self.bytes),
            secs
        )
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.0 GiB`.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_naturally() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(bytes(5 << 40), "5120.0 GiB");
    }

    #[test]
    fn lines_come_at_most_once_an_interval_and_the_summary_counts_all() {
        let start = Instant::now();
        let mut catch_up = CatchUp::new(start, false);
        assert_eq!(catch_up.add(10, 100, start), None);
        let later = start + LINE_INTERVAL;
        let line = catch_up.add(10, 100, later).expect("due");
        assert_eq!(line, "catching up: 20 rows, 10 rows/s, 200 B in 2.0s");
        assert_eq!(catch_up.add(1, 1, later + LINE_INTERVAL / 2), None);
        assert_eq!(
            catch_up.summary(start + LINE_INTERVAL * 3),
            "caught up: 21 rows, 4 rows/s, 201 B in 6.0s"
        );
        let mut tty = CatchUp::new(start, true);
        assert!(tty.add(1, 1, start + REDRAW_INTERVAL).is_some());
    }
}
