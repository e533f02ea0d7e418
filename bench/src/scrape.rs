//! Reading the server's `/metrics` from outside: its memory and CPU (the
//! standard `process_*` gauges, which kvfeed and etcd both export) and the
//! feed's own gauges.
//!
//! The server measures itself (from `/proc/self`, at scrape time), so the
//! bench never confuses its own memory or CPU with the server's, even when
//! both run on one machine. A [`Sampler`] scrapes every 250 ms for peaks
//! and time series; one-off [`scrape`]s take before/after values.
//!
//! HTTP is `ureq`'s (plain HTTP, on a blocking thread): one GET with a
//! deadline on the whole exchange and a bound on the body.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::BenchError;

/// Resident memory of the server, bytes.
pub const RSS: &str = "process_resident_memory_bytes";
/// CPU time of the server, seconds.
pub const CPU: &str = "process_cpu_seconds_total";
/// Open feed connections (gauge): back to its value before a run, or the
/// run leaked.
pub const CONNECTIONS: &str = "kvfeed_cdc_connections";
/// Live feed subscriptions (gauge); it falls when a congested consumer's
/// subscriptions are dropped.
pub const SUBSCRIPTIONS: &str = "kvfeed_cdc_subscriptions";
/// Bytes of events queued for feed clients and not yet taken (gauge).
pub const PENDING_BYTES: &str = "kvfeed_cdc_pending_bytes";
/// Bytes read by catch-up scans since the server started (counter).
pub const SCANNED_BYTES: &str = "kvfeed_cdc_scanned_bytes_total";
/// How often a [`Sampler`] scrapes.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Bound on one scrape, connect to last byte.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `/metrics` body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One scrape: every sample by its full name as rendered, labels included
/// (`name` or `name{label="value"}`).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    values: HashMap<String, f64>,
}

impl Scrape {
    /// Parses the Prometheus text format (comments skipped; a line whose
    /// value does not parse is skipped, not guessed).
    pub fn parse(text: &str) -> Scrape {
        let mut values = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The value follows the name (and its `{...}`), before an
            // optional timestamp.
            let name_end = match line.find('{') {
                Some(open) => line[open..].find('}').map(|close| open + close + 1),
                None => line.find(char::is_whitespace),
            };
            let Some(name_end) = name_end else { continue };
            let (name, rest) = line.split_at(name_end);
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            if let Ok(value) = value.parse::<f64>() {
                values.insert(name.to_owned(), value);
            }
        }
        Scrape { values }
    }

    /// The sample named `name` exactly as rendered (labels included, see
    /// [`Scrape`]); `None` when the server does not export it.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// Like [`Scrape::get`], but a missing metric is an error naming it.
    pub fn require(&self, name: &str) -> Result<f64, BenchError> {
        self.get(name).ok_or_else(|| BenchError::Metrics {
            reason: format!("the server's /metrics has no {name}"),
        })
    }

    /// The sum of every series of metric `name` whose labels contain
    /// `label` (`None` if there is none).
    pub fn sum(&self, name: &str, label: &str) -> Option<f64> {
        let mut found = None;
        for (key, value) in &self.values {
            let matches = key
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label));
            if matches {
                found = Some(found.unwrap_or(0.0) + value);
            }
        }
        found
    }

    /// The server's resident memory, bytes.
    pub fn rss(&self) -> Option<f64> {
        self.get(RSS)
    }

    /// The server's CPU time, seconds (as [`Scrape::rss`]).
    pub fn cpu(&self) -> Option<f64> {
        self.get(CPU)
    }
}

/// GET `/metrics` from `addr`.
pub async fn scrape(addr: &str) -> Result<Scrape, BenchError> {
    let failed = |reason: String| BenchError::Metrics {
        reason: format!("cannot read http://{addr}/metrics: {reason}"),
    };
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get(addr, "/metrics"))
        .await
        .map_err(|_| failed(format!("no answer within {SCRAPE_TIMEOUT:?}")))?
        .map_err(failed)?;
    Ok(Scrape::parse(&body))
}

async fn get(addr: &str, path: &str) -> Result<String, String> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(&addr, &path, SCRAPE_TIMEOUT))
            .await
            .map_err(|e| e.to_string())??;
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    Ok(body)
}

/// One plain-HTTP GET of `path` from `addr` (`host:port`): the status code
/// and the body (at most 16 MiB), the whole exchange bounded by
/// `timeout`. The benchmarks and the tests read the status server with it.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let response = agent(timeout).get(&format!("http://{addr}{path}")).call();
    status_and_body(response)
}

/// One plain-HTTP POST (empty body) of `path` to `addr`, like [`http_get`]:
/// the status code and the body. `kvfeed admin` sends its changes with it.
pub fn http_post(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let response = agent(timeout)
        .post(&format!("http://{addr}{path}"))
        .send_empty();
    status_and_body(response)
}

/// An agent whose whole exchange is bounded by `timeout` and that hands
/// back error statuses as answers rather than errors.
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

fn status_and_body(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, String), String> {
    let mut response = response.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY as u64)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// One sample of a [`Sampler`]'s time series.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    /// Since the sampler started.
    pub at: Duration,
    /// Server resident memory, bytes ([`RSS`]).
    pub rss: Option<f64>,
    /// Server CPU time so far, seconds ([`CPU`]).
    pub cpu: Option<f64>,
    /// Live feed subscriptions ([`SUBSCRIPTIONS`]); `None` on etcd.
    pub subscriptions: Option<f64>,
    /// Open feed connections ([`CONNECTIONS`]); `None` on etcd.
    pub connections: Option<f64>,
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// The samples in time order, at most one an interval and at most an
    /// hour's worth (later ones are dropped to bound memory).
    pub points: Vec<Point>,
    /// Scrapes that failed (the figures are then from fewer samples).
    pub errors: u64,
}

impl Samples {
    /// The highest server RSS sampled, bytes; `None` without a sample.
    /// A peak between two samples is missed, so it is a lower bound.
    pub fn peak_rss(&self) -> Option<f64> {
        self.points.iter().filter_map(|p| p.rss).reduce(f64::max)
    }
}

/// Scrapes every [`SAMPLE_EVERY`] on a task of its own until stopped.
pub struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Samples>,
}

/// Longest run a sampler records (bounds its memory: 4 points a second).
const MAX_POINTS: usize = 4 * 3600;

impl Sampler {
    /// Starts sampling the status server at `addr` (`host:port`) on a new
    /// task; the first sample is taken at once. Must be called inside a
    /// tokio runtime.
    pub fn start(addr: &str) -> Sampler {
        let addr = addr.to_owned();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Samples::default();
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = ticks.tick() => {}
                }
                match scrape(&addr).await {
                    Ok(s) if samples.points.len() < MAX_POINTS => samples.points.push(Point {
                        at: started.elapsed(),
                        rss: s.rss(),
                        cpu: s.cpu(),
                        subscriptions: s.get(SUBSCRIPTIONS),
                        connections: s.get(CONNECTIONS),
                    }),
                    Ok(_) => {}
                    Err(_) => samples.errors += 1,
                }
            }
            samples
        });
        Sampler { stop, task }
    }

    /// Stops sampling and returns what was seen.
    pub async fn finish(self) -> Samples {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Scrapes every `every` until `done` holds for a scrape or `deadline`
/// passes; returns the last scrape and whether `done` held.
pub async fn poll_until(
    addr: &str,
    deadline: Duration,
    every: Duration,
    done: impl Fn(&Scrape) -> bool,
) -> Result<(Scrape, bool), BenchError> {
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let scrape = scrape(addr).await?;
        if done(&scrape) {
            return Ok((scrape, true));
        }
        if tokio::time::Instant::now() + every > give_up {
            return Ok((scrape, false));
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_parsed_by_full_name() {
        let text = "# HELP kvfeed_cdc_connections Open connections.\n\
                    # TYPE kvfeed_cdc_connections gauge\n\
                    kvfeed_cdc_connections 3\n\
                    kvfeed_cdc_aborted_connections_total{reason=\"half close\"} 7\n\
                    process_resident_memory_bytes 1.2345e7\n\
                    kvfeed_broken NaNx\n\
                    kvfeed_with_ts 5 1700000000000\n";
        let s = Scrape::parse(text);
        assert_eq!(s.get(CONNECTIONS), Some(3.0));
        assert_eq!(
            s.get("kvfeed_cdc_aborted_connections_total{reason=\"half close\"}"),
            Some(7.0)
        );
        assert_eq!(s.rss(), Some(12_345_000.0));
        assert_eq!(s.get("kvfeed_broken"), None);
        assert_eq!(s.get("kvfeed_with_ts"), Some(5.0));
        assert!(s.require(SUBSCRIPTIONS).is_err());
        assert_eq!(
            s.sum("kvfeed_cdc_aborted_connections_total", "half close"),
            Some(7.0)
        );
        assert_eq!(s.sum("kvfeed_cdc_aborted", "half close"), None);
        let etcd =
            Scrape::parse("process_resident_memory_bytes 2e6\nprocess_cpu_seconds_total 1.5\n");
        assert_eq!(etcd.rss(), Some(2e6));
        assert_eq!(etcd.cpu(), Some(1.5));
    }
}
