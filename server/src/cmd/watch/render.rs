//! How a watch puts things into words: a change as a text or JSON line, a
//! timestamp as UTC wall time. Pure functions; what to print, and when, is
//! decided in `view`.

use kvfeed_storage::TimeStamp;
use serde::Serialize;

use crate::cmd::format::{Style, hex, json_text};

/// One printed change.
pub(super) struct Change<'a> {
    pub delete: bool,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub start_ts: u64,
    pub commit_ts: u64,
}

/// The `--json` form of a change.
#[derive(Serialize)]
struct JsonChange {
    op: &'static str,
    key: String,
    value: Option<String>,
    key_hex: String,
    value_hex: Option<String>,
    commit_ts: u64,
    start_ts: u64,
    wall_time: String,
}

impl Change<'_> {
    pub(super) fn line(&self, style: Style, json: bool) -> String {
        let wall = wall_time(self.commit_ts);
        if json {
            let line = JsonChange {
                op: if self.delete { "DELETE" } else { "PUT" },
                key: json_text(self.key),
                value: (!self.delete).then(|| json_text(self.value)),
                key_hex: hex(self.key),
                value_hex: (!self.delete).then(|| hex(self.value)),
                commit_ts: self.commit_ts,
                start_ts: self.start_ts,
                wall_time: wall,
            };
            // Strings and integers always serialise; never abort a watch
            // over one line.
            return serde_json::to_string(&line).unwrap_or_else(|_| "{}".to_owned());
        }
        let key = style.show(self.key);
        if self.delete {
            format!("DELETE {key}  ts={} ({wall})", self.commit_ts)
        } else {
            let value = style.show(self.value);
            format!("PUT {key} {value}  ts={} ({wall})", self.commit_ts)
        }
    }
}

/// The physical part of a timestamp as UTC, to the millisecond:
/// `2024-05-01T12:34:56.789Z`.
pub fn wall_time(ts: u64) -> String {
    let ms = TimeStamp::new(ts).physical();
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 as a proleptic Gregorian date (H. Hinnant's
/// algorithm, for days ≥ 0 only: timestamps are never before the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_times_are_utc_with_milliseconds() {
        assert_eq!(wall_time(0), "1970-01-01T00:00:00.000Z");
        let ts = |ms: u64| TimeStamp::compose(ms, 17).into_inner();
        assert_eq!(wall_time(ts(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(wall_time(ts(1_700_000_000_123)), "2023-11-14T22:13:20.123Z");
        assert_eq!(wall_time(ts(4_102_444_799_999)), "2099-12-31T23:59:59.999Z");
    }
}
