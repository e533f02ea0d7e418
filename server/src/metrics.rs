//! Prometheus metrics: one registry per node, rendered by the status server.
//!
//! A registry owned by the node (rather than prometheus' process-wide default
//! registry) keeps two nodes in one test process from mixing their numbers.
//! Components register their own collectors with [`Metrics::register`]; every
//! name must start with `kvfeed_` so an operator can find them all, except
//! the standard `process_*` metrics, whose names dashboards already know.
//! Values that are cheap to compute but change continuously (uptime) are
//! refreshed at scrape time instead of by a background task.

use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{Gauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// A metrics failure: a duplicate or malformed registration, or an encoding
/// error while rendering.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metric registration: {0}")]
    Register(#[source] prometheus::Error),
    #[error("metric encoding: {0}")]
    Encode(#[source] prometheus::Error),
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The node's registry and the server-level metrics.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    uptime: Gauge,
}

impl Metrics {
    /// A registry holding `kvfeed_build_info{version}` (always 1),
    /// `kvfeed_uptime_seconds` and, on Linux, prometheus' process collector
    /// (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
    /// `process_open_fds`, ...), read from `/proc` at scrape time.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "kvfeed_build_info",
                "Always 1; the version label carries the running kvfeed version.",
            ),
            &["version"],
        )
        .map_err(MetricsError::Register)?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let uptime = Gauge::new(
            "kvfeed_uptime_seconds",
            "Seconds since this server process opened its node.",
        )
        .map_err(MetricsError::Register)?;
        let metrics = Metrics {
            registry,
            started: Instant::now(),
            uptime,
        };
        metrics.register(Box::new(build_info))?;
        metrics.register(Box::new(metrics.uptime.clone()))?;
        #[cfg(target_os = "linux")]
        metrics.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(metrics)
    }

    /// Adds a collector (a counter, gauge, histogram or a vector of them).
    /// Fails on a name that is already registered.
    pub fn register(&self, collector: Box<dyn Collector>) -> Result<(), MetricsError> {
        self.registry
            .register(collector)
            .map_err(MetricsError::Register)
    }

    /// The registry, for components that build their metrics with
    /// prometheus' `register_*_with_registry!` macros.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let families = self.registry.gather();
        TextEncoder::new()
            .encode_to_string(&families)
            .map_err(MetricsError::Encode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntCounter;

    #[test]
    fn renders_server_metrics() {
        let metrics = Metrics::new().expect("metrics");
        let text = metrics.render().expect("render");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("kvfeed_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kvfeed_uptime_seconds gauge"),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("\n{name} ")), "no {name} in\n{text}");
        }
    }

    #[test]
    fn registered_collectors_are_rendered_once() {
        let metrics = Metrics::new().expect("metrics");
        let counter = IntCounter::new("kvfeed_test_events_total", "test").expect("counter");
        metrics
            .register(Box::new(counter.clone()))
            .expect("register");
        counter.inc_by(7);
        let text = metrics.render().expect("render");
        assert!(text.contains("kvfeed_test_events_total 7"), "{text}");
        let duplicate = IntCounter::new("kvfeed_test_events_total", "test").expect("counter");
        assert!(metrics.register(Box::new(duplicate)).is_err());
    }
}
