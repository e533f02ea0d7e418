//! The `kill` scenario: a steady transactional writer for `--duration`
//! while the changefeed is killed with SIGKILL every `--kill-every` (drawn
//! from the seeded generator when a range) and started again at once with
//! the same sink and state directory. At the end the sink must catch up
//! with a ts taken after the last write, and `kvfeed verify` must find it
//! exactly the store's history: nothing lost, nothing twice, whole
//! transactions in commit order, however the kills fell.

use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::json;

use super::child::{Memory, Poller, Proc};
use super::live::{self, WriterSpec};
use super::{ChangefeedArgs, NAME, Setup, count_rows, verify};
use crate::report::Report;
use crate::stats;
use crate::{BenchError, progress, secs};

/// What the killer did.
#[derive(Debug, Default)]
struct Kills {
    restarts: u64,
    /// The highest `VmHWM` of any incarnation, read just before its kill.
    peak_hwm: u64,
}

/// Runs the scenario; see the module comment.
pub async fn run(
    args: &ChangefeedArgs,
    setup: &mut Setup,
    report: &mut Report,
) -> Result<(), BenchError> {
    let spec = WriterSpec::from_args(args, 60)?;
    progress(NAME, "starting the changefeed");
    let (mut proc, poller) = setup.start_now().await?;
    progress(
        NAME,
        &format!(
            "writing {} transactions/s for {:?}, killing the changefeed every {:?}..{:?}",
            spec.rate, spec.duration, args.kill_every.min, args.kill_every.max
        ),
    );
    let (server, prefix) = (setup.server.clone(), setup.prefix.clone());
    let (written, kills) = tokio::join!(
        live::write(&server, &prefix, spec),
        killer(args, setup, &mut proc, &poller, spec.duration)
    );
    let (written, mut kills) = (written?, kills?);
    let writes_done = Instant::now();
    let final_ts = server.cluster.tso().await?.into_inner();
    progress(NAME, "waiting for the sink to catch up");
    let waited = poller
        .wait_for(final_ts, &mut proc, setup.timeout, "kill")
        .await;
    if let Some(m) = proc.memory() {
        kills.peak_hwm = kills.peak_hwm.max(m.hwm);
    }
    proc.kill()?;
    drop(poller.finish());
    let caught_up = waited?;

    let keys = written.acked.len() as u64 * spec.keys_per_txn;
    let counted = count_rows(&setup.spec.sink, |_| true).await?;
    report.json(
        "params",
        json!({
            "rate": spec.rate,
            "keys_per_txn": spec.keys_per_txn,
            "writers": spec.writers,
            "value_size": spec.value_size,
            "duration_s": secs(spec.duration),
            "kill_every_s": [secs(args.kill_every.min), secs(args.kill_every.max)],
            "seed": args.seed,
            "memory_mib": args.memory_mib,
        }),
    );
    live::report_writers(report, &spec, &written);
    report.section("Kills");
    report.int("restarts", "SIGKILLs and restarts", kills.restarts);
    report.float(
        "catch_up_seconds",
        "last write → checkpoint ≥ final ts",
        secs(caught_up.saturating_duration_since(writes_done)),
        2,
        "s",
    );
    report.bytes(
        "peak_rss_bytes",
        "changefeed peak RSS (VmHWM, any run)",
        Some(kills.peak_hwm as f64),
    );
    report.section("Sink");
    report.int("rows_in_sink", "rows", counted.rows);
    report.int("keys_committed", "keys acknowledged", keys);
    if written.errors == 0 && counted.rows != keys {
        report.fail(format!(
            "the sink holds {} rows, {keys} keys were committed",
            counted.rows
        ));
    }
    counted.faults.into_iter().for_each(|f| report.fail(f));
    verify(setup, report).await
}

/// Kills and restarts the changefeed until `duration` has passed.
async fn killer(
    args: &ChangefeedArgs,
    setup: &Setup,
    proc: &mut Proc,
    poller: &Poller,
    duration: Duration,
) -> Result<Kills, BenchError> {
    let mut rng = stats::rng(args.seed);
    let deadline = Instant::now() + duration;
    let mut kills = Kills::default();
    loop {
        let (lo, hi) = (args.kill_every.min, args.kill_every.max);
        let wait = if hi > lo {
            Duration::from_nanos(rng.random_range(nanos(lo)..=nanos(hi)))
        } else {
            lo
        };
        if Instant::now() + wait >= deadline {
            return Ok(kills);
        }
        tokio::time::sleep(wait).await;
        if proc.exited().is_some() {
            return Err(proc.died());
        }
        let memory: Memory = proc.memory().unwrap_or_default();
        kills.peak_hwm = kills.peak_hwm.max(memory.hwm);
        proc.kill()?;
        *proc = setup.spec.spawn()?;
        poller.set_pid(proc.pid());
        kills.restarts += 1;
        progress(NAME, &format!("killed and restarted ({})", kills.restarts));
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
