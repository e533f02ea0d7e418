//! Log setup: `tracing` events, formatted to stderr.
//!
//! stdout is reserved for machine-readable output (the startup line of
//! `serve`, command results of the client tools), so logs never go there.
//! The filter comes from `RUST_LOG` when that is set and non-empty, else from
//! `--log-level`; an unparsable filter is an error rather than a silent
//! fallback, so a typo does not hide the logs someone asked for.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?} (from {origin}): {reason}")]
    Filter {
        filter: String,
        origin: &'static str,
        reason: String,
    },
    #[error("cannot install the log subscriber: {0}")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The filter to use: `RUST_LOG` if set and non-empty, else `level`.
pub fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, LogError> {
    let (text, origin) = match rust_log.map(str::trim) {
        Some(env) if !env.is_empty() => (env, "RUST_LOG"),
        _ => (level, "--log-level"),
    };
    let error = |reason: String| LogError::Filter {
        filter: text.to_owned(),
        origin,
        reason,
    };
    // A lone word is a level: EnvFilter would read a typo such as `infoo` as
    // a target name and quietly log nothing.
    let is_directive_list = text.contains('=') || text.contains(',');
    if !is_directive_list
        && text
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
    {
        return Err(error(
            "expected a level (trace, debug, info, warn, error, off) or directives such as \
             `kvfeed=debug,info`"
                .to_owned(),
        ));
    }
    // At a plain `info`, the NATS client's every connect and close would
    // be logged; its warnings and errors still are.
    let text = if text.eq_ignore_ascii_case("info") {
        format!("{text},async_nats=warn")
    } else {
        text.to_owned()
    };
    EnvFilter::try_new(&text).map_err(|e| error(e.to_string()))
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: &str) -> Result<(), LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(level, rust_log.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(LogError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_takes_precedence() {
        let f = filter("info", Some("debug")).expect("filter");
        assert_eq!(f.to_string(), "debug");
        let f = filter("warn", Some("  ")).expect("filter");
        assert_eq!(f.to_string(), "warn");
        let f = filter("kvfeed=debug,info", None).expect("filter");
        assert!(f.to_string().contains("kvfeed=debug"), "{f}");
    }

    #[test]
    fn bad_filters_name_their_origin() {
        let err = filter("info", Some("=[")).expect_err("bad").to_string();
        assert!(err.contains("RUST_LOG"), "{err}");
        let err = filter("lots", None).expect_err("bad").to_string();
        assert!(err.contains("--log-level"), "{err}");
    }
}
