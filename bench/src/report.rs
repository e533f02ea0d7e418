//! A benchmark's result, printed twice: a table for people, then one JSON
//! object for programs, as the last line of stdout.
//!
//! Both are built from the same calls, so the table and the JSON cannot
//! disagree. A figure that could not be measured is "n/a" in the table and
//! `null` in the JSON, never 0, which would read as a measurement.
//! Correctness failures are recorded with [`Report::fail`]; they are
//! printed with the results (the numbers still help to understand what
//! went wrong) and then turn into the process's exit status.

use std::io::{self, Write};

use serde_json::{Map, Value};

use super::BenchError;

enum Line {
    Section(String),
    Item { label: String, value: String },
}

/// The result of one benchmark run.
pub struct Report {
    bench: &'static str,
    lines: Vec<Line>,
    json: Map<String, Value>,
    failures: Vec<String>,
}

impl Report {
    /// An empty report for benchmark `bench`, whose name heads the table
    /// and is the JSON's `"bench"` field.
    pub fn new(bench: &'static str) -> Report {
        let mut json = Map::new();
        json.insert("bench".to_owned(), Value::from(bench));
        Report {
            bench,
            lines: Vec::new(),
            json,
            failures: Vec::new(),
        }
    }

    /// A heading in the table (nothing in the JSON).
    pub fn section(&mut self, title: &str) {
        self.lines.push(Line::Section(title.to_owned()));
    }

    fn item(&mut self, key: &str, label: &str, shown: String, value: Value) {
        self.lines.push(Line::Item {
            label: label.to_owned(),
            value: shown,
        });
        self.json.insert(key.to_owned(), value);
    }

    /// A count.
    pub fn int(&mut self, key: &str, label: &str, value: u64) {
        self.item(key, label, value.to_string(), Value::from(value));
    }

    /// A measured figure shown with `decimals` and a unit.
    pub fn float(&mut self, key: &str, label: &str, value: f64, decimals: usize, unit: &str) {
        self.opt_float(key, label, Some(value), decimals, unit);
    }

    /// Like [`Report::float`], "n/a" / `null` when not measured.
    pub fn opt_float(
        &mut self,
        key: &str,
        label: &str,
        value: Option<f64>,
        decimals: usize,
        unit: &str,
    ) {
        let value = value.filter(|v| v.is_finite());
        let shown = match value {
            Some(v) if unit.is_empty() => format!("{v:.decimals$}"),
            Some(v) => format!("{v:.decimals$} {unit}"),
            None => "n/a".to_owned(),
        };
        self.item(key, label, shown, value.map_or(Value::Null, Value::from));
    }

    /// A byte count shown in MiB.
    pub fn bytes(&mut self, key: &str, label: &str, value: Option<f64>) {
        let shown = match value {
            Some(v) => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
            None => "n/a".to_owned(),
        };
        let json = value.map_or(Value::Null, |v| Value::from(v.round() as u64));
        self.item(key, label, shown, json);
    }

    /// A string (a mode, a target), shown as it is.
    pub fn text(&mut self, key: &str, label: &str, value: &str) {
        self.item(key, label, value.to_owned(), Value::from(value));
    }

    /// A yes/no figure: "yes"/"no" in the table, a JSON boolean.
    pub fn flag(&mut self, key: &str, label: &str, value: bool) {
        let shown = if value { "yes" } else { "no" };
        self.item(key, label, shown.to_owned(), Value::from(value));
    }

    /// A JSON-only value (parameters, breakdowns).
    pub fn json(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_owned(), value);
    }

    /// Records a correctness failure.
    pub fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    /// The correctness failures recorded so far, in order; empty means the
    /// run passed.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// The JSON line (without the newline).
    pub fn json_line(&self) -> String {
        let mut json = self.json.clone();
        json.insert("ok".to_owned(), Value::from(self.failures.is_empty()));
        json.insert("failures".to_owned(), Value::from(self.failures.clone()));
        Value::Object(json).to_string()
    }

    /// The table.
    pub fn table(&self) -> String {
        let width = self
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Item { label, .. } => Some(label.chars().count()),
                Line::Section(_) => None,
            })
            .max()
            .unwrap_or(0);
        let mut out = format!("kvfeed bench {}\n", self.bench);
        for line in &self.lines {
            match line {
                Line::Section(title) => out.push_str(&format!("\n{title}\n")),
                Line::Item { label, value } => {
                    out.push_str(&format!("  {label:<width$}  {value}\n"));
                }
            }
        }
        if !self.failures.is_empty() {
            out.push_str("\nFAILED\n");
            for failure in &self.failures {
                out.push_str(&format!("  - {failure}\n"));
            }
        }
        out
    }

    /// Prints the table and the JSON line to stdout, then reports any
    /// correctness failure as an error.
    pub fn finish(self) -> Result<(), BenchError> {
        let mut out = io::stdout().lock();
        let written =
            write!(out, "{}\n{}\n", self.table(), self.json_line()).and_then(|()| out.flush());
        written.map_err(BenchError::Output)?;
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(BenchError::Failed {
                bench: self.bench,
                reasons: self.failures.join("; "),
            })
        }
    }
}

/// Milliseconds from nanoseconds, for latency figures.
pub fn ms(nanos: Option<u64>) -> Option<f64> {
    nanos.map(|n| n as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_json_carry_the_same_figures() {
        let mut report = Report::new("feed");
        report.section("Throughput");
        report.int("puts", "puts", 42);
        report.float("puts_per_sec", "puts/s", 1234.5678, 1, "");
        report.opt_float("lag_p99_ms", "resolved-ts lag p99", None, 1, "ms");
        report.bytes("rss_peak_bytes", "peak RSS", Some(3.0 * 1024.0 * 1024.0));
        let table = report.table();
        assert!(table.contains("puts/s"), "{table}");
        assert!(table.contains("1234.6"), "{table}");
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("3.0 MiB"), "{table}");
        let json: Value = serde_json::from_str(&report.json_line()).expect("valid JSON");
        assert_eq!(json["bench"], "feed");
        assert_eq!(json["puts"], 42);
        assert_eq!(json["lag_p99_ms"], Value::Null);
        assert_eq!(json["rss_peak_bytes"], 3 * 1024 * 1024);
        assert_eq!(json["ok"], true);
    }

    #[test]
    fn failures_are_shown_and_make_the_run_fail() {
        let mut report = Report::new("churn");
        report.fail("kvfeed_cdc_connections is 3, not 0");
        assert!(report.table().contains("FAILED"));
        let json: Value = serde_json::from_str(&report.json_line()).expect("valid JSON");
        assert_eq!(json["ok"], false);
        assert_eq!(json["failures"][0], "kvfeed_cdc_connections is 3, not 0");
        assert!(!report.failures().is_empty());
    }
}
