//! Process gauges for `/metrics`: this server's resident memory, CPU time
//! and open file descriptors, read from `/proc/self` at scrape time.
//!
//! Why a custom collector rather than a background task: the values change
//! continuously and cost a few small file reads to get, so reading them
//! exactly when someone scrapes is both cheaper (nothing runs between
//! scrapes) and more accurate (no sampling delay). Benchmarks scrape every
//! 250 ms to see a server's memory and CPU use from outside the process.
//!
//! Invariants:
//! - a scrape never fails because of this collector: on a system without
//!   `/proc` (or a file that does not parse) the affected metrics are left
//!   out of that scrape, never reported as 0, which would read as a value;
//! - refresh and collect happen under one lock, so two concurrent scrapes
//!   cannot see the CPU counter between its reset and its new value.

use std::path::Path;
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntGauge};

/// Clock ticks per second of the times in `/proc/<pid>/stat`. The kernel
/// reports them in `USER_HZ`, which its ABI fixes at 100 on every
/// architecture kvfeed runs on, so no `sysconf` call (and no libc
/// dependency) is needed.
const USER_HZ: f64 = 100.0;

/// What one read of `/proc/self` found; `None` where a file was unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// `VmRSS`, bytes.
    pub resident_bytes: Option<u64>,
    /// `VmHWM`, the highest `VmRSS` since the process started, bytes.
    pub resident_max_bytes: Option<u64>,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Entries of `/proc/self/fd`.
    pub open_fds: Option<u64>,
}

impl ProcessSample {
    /// Reads this process's numbers.
    pub fn read() -> ProcessSample {
        let proc_self = Path::new("/proc/self");
        let status = std::fs::read_to_string(proc_self.join("status")).ok();
        let stat = std::fs::read_to_string(proc_self.join("stat")).ok();
        let open_fds = std::fs::read_dir(proc_self.join("fd"))
            .ok()
            .map(|dir| dir.count() as u64);
        ProcessSample {
            resident_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")),
            resident_max_bytes: status.as_deref().and_then(|s| status_kib(s, "VmHWM:")),
            cpu_seconds: stat.as_deref().and_then(stat_cpu_seconds),
            open_fds,
        }
    }
}

/// A `/proc/<pid>/status` field such as `VmRSS:  12345 kB`, in bytes.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let mut words = line[field.len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds. The command
/// name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_whitespace();
    // After the name come state (field 3) ... cmajflt (13), then utime (14)
    // and stime (15): skip 11 to land on utime.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The `kvfeed_process_*` metrics, refreshed on every scrape.
pub struct ProcessCollector {
    resident: IntGauge,
    resident_max: IntGauge,
    cpu: Counter,
    open_fds: IntGauge,
    /// Held from refresh to the end of collect (see the module docs).
    scrape: Mutex<()>,
}

impl ProcessCollector {
    pub fn new() -> Result<ProcessCollector, prometheus::Error> {
        Ok(ProcessCollector {
            resident: IntGauge::new(
                "kvfeed_process_resident_memory_bytes",
                "Resident memory of the server process (VmRSS), in bytes.",
            )?,
            resident_max: IntGauge::new(
                "kvfeed_process_resident_memory_max_bytes",
                "Highest resident memory of the server process since it started (VmHWM), in bytes.",
            )?,
            cpu: Counter::new(
                "kvfeed_process_cpu_seconds_total",
                "User and system CPU time of the server process, in seconds.",
            )?,
            open_fds: IntGauge::new(
                "kvfeed_process_open_fds",
                "Open file descriptors of the server process.",
            )?,
            scrape: Mutex::new(()),
        })
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.resident.desc();
        descs.extend(self.resident_max.desc());
        descs.extend(self.cpu.desc());
        descs.extend(self.open_fds.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A poisoned lock only means another scrape panicked mid-way; the
        // values are rewritten below anyway.
        let _guard = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sample = ProcessSample::read();
        let mut families = Vec::new();
        if let Some(bytes) = sample.resident_bytes {
            self.resident.set(to_i64(bytes));
            families.extend(self.resident.collect());
        }
        if let Some(bytes) = sample.resident_max_bytes {
            self.resident_max.set(to_i64(bytes));
            families.extend(self.resident_max.collect());
        }
        if let Some(seconds) = sample.cpu_seconds {
            // A counter cannot be set; reset and add under the lock.
            self.cpu.reset();
            self.cpu.inc_by(seconds);
            families.extend(self.cpu.collect());
        }
        if let Some(fds) = sample.open_fds {
            self.open_fds.set(to_i64(fds));
            families.extend(self.open_fds.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = "Name:\tkvfeed\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t4\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10_240 * 1024));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20_480 * 1024));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        assert_eq!(status_kib("VmRSS:\t12 pages\n", "VmRSS:"), None);
    }

    #[test]
    fn cpu_time_is_counted_after_the_command_name() {
        // A name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (kv (feed) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 130 0 0 20 0 8 0 12345 1000000 2500 18446744073709551615";
        assert_eq!(stat_cpu_seconds(stat), Some(3.8));
        assert_eq!(stat_cpu_seconds("4242 (short) S 1 2"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_measured_and_exported() {
        let sample = ProcessSample::read();
        assert!(sample.resident_bytes.is_some_and(|b| b > 0), "{sample:?}");
        assert!(sample.cpu_seconds.is_some(), "{sample:?}");
        let collector = ProcessCollector::new().expect("valid definitions");
        let names: Vec<String> = collector
            .collect()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "kvfeed_process_resident_memory_bytes",
            "kvfeed_process_cpu_seconds_total",
            "kvfeed_process_open_fds",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}
