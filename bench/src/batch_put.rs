//! `kvfeed bench batch-put`: small raw puts through `BatchCommands` (one
//! stream, a fixed number of puts in flight) against the same puts as
//! unary `RawPut` calls with the same number in flight, from the same
//! client on the same connection.
//!
//! The batched side behaves like client-go's batch client: whenever answers
//! free slots, the requests waiting for them go out together in one
//! `BatchCommandsRequest`, each with its own id, and answers are matched by
//! id whatever their order. Both sides put `--puts` fresh keys of one
//! region (looked up once; keys under a fresh prefix), so they do the same
//! storage work; only the transport differs. Every answer is checked: an
//! error, a region error, a missing, unknown or repeated id fails the run.
//! The report gives both rates and their ratio.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use kvfeed_client::RegionInfo;
use kvfeed_proto::kvrpcpb;
use kvfeed_proto::tikvpb::batch_commands_request::Request as BatchRequest;
use kvfeed_proto::tikvpb::batch_commands_request::request::Cmd as ReqCmd;
use kvfeed_proto::tikvpb::batch_commands_response::response::Cmd as RespCmd;
use kvfeed_proto::tikvpb::{BatchCommandsRequest, BatchCommandsResponse};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::report::Report;
use super::stats::per_second;
use super::{BenchError, Server, TargetArgs, check_range, progress, run_prefix, secs};

const NAME: &str = "batch-put";
/// Bound on each of the two runs.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Flags of `kvfeed bench batch-put`: small raw puts through
/// `BatchCommands` against the same client's unary calls.
#[derive(Debug, Clone, Args)]
pub struct BatchPutArgs {
    /// The server to measure.
    #[command(flatten)]
    pub target: TargetArgs,

    /// Puts per transport (each side writes this many fresh keys).
    #[arg(long, default_value_t = 20_000)]
    pub puts: u64,

    /// Puts in flight at once, on the stream and in unary calls alike
    /// (client-go's default batch size is 128; the server runs at most 512
    /// commands of one stream at once).
    #[arg(long, default_value_t = 128)]
    pub in_flight: u64,

    /// Bytes per value.
    #[arg(long, default_value_t = 16)]
    pub value_size: usize,
}

/// One transport's run.
struct Run {
    elapsed: Duration,
    faults: Vec<String>,
}

/// Runs both transports one after the other and reports each rate and
/// their ratio; a put answered wrongly or not at all is a failure.
pub async fn run(args: &BatchPutArgs) -> Result<Report, BenchError> {
    check_range("--puts", args.puts, 1, 1_000_000)?;
    check_range("--in-flight", args.in_flight, 1, 512)?;
    check_range("--value-size", args.value_size, 1, 64 * 1024)?;
    let server = Server::connect(&args.target).await?;
    let prefix = run_prefix(NAME);
    // Raw keys are their own region keys; every key of the prefix lies in
    // the region of the prefix (the prefix is far from any split key).
    let region = server.cluster.region_for_key(&prefix).await?;
    let end = super::load::prefix_end(&prefix);
    if !(region.end_key.is_empty() || end <= region.end_key) {
        return Err(BenchError::Usage(format!(
            "the keys of {} span more than one region",
            String::from_utf8_lossy(&prefix)
        )));
    }
    let keys = Keys {
        prefix,
        region,
        value: vec![b'v'; args.value_size],
    };

    progress(NAME, &format!("{} unary RawPut calls", args.puts));
    let unary = bounded(unary(&server, &keys, args)).await?;
    progress(
        NAME,
        &format!("{} RawPut commands on one BatchCommands stream", args.puts),
    );
    let batched = bounded(batched(&server, &keys, args)).await?;

    let mut report = Report::new(NAME);
    report.json(
        "params",
        json!({"puts": args.puts, "in_flight": args.in_flight, "value_size": args.value_size}),
    );
    let mut rates = Vec::new();
    for (run, key, title) in [
        (unary, "unary_", "Unary RawPut"),
        (
            batched,
            "batch_",
            "RawPut through BatchCommands (one stream)",
        ),
    ] {
        let rate = per_second(args.puts as f64, secs(run.elapsed));
        report.section(title);
        report.float(&format!("{key}seconds"), "time", secs(run.elapsed), 3, "s");
        report.float(&format!("{key}puts_per_sec"), "puts/s", rate, 0, "");
        for fault in run.faults {
            report.fail(format!("{title}: {fault}"));
        }
        rates.push(rate);
    }
    if let [unary, batch] = rates[..] {
        report.section("Comparison");
        report.float(
            "batch_vs_unary",
            "BatchCommands puts/s ÷ unary puts/s",
            if unary > 0.0 { batch / unary } else { 0.0 },
            2,
            "×",
        );
    }
    Ok(report)
}

async fn bounded(run: impl Future<Output = Result<Run, BenchError>>) -> Result<Run, BenchError> {
    tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .map_err(|_| BenchError::Feed(format!("a run took longer than {RUN_TIMEOUT:?}")))?
}

/// What both transports put.
#[derive(Clone)]
struct Keys {
    prefix: Vec<u8>,
    region: RegionInfo,
    value: Vec<u8>,
}

impl Keys {
    fn request(&self, transport: &str, i: u64) -> kvrpcpb::RawPutRequest {
        let mut key = self.prefix.clone();
        key.extend_from_slice(format!("{transport}/{i:012}").as_bytes());
        kvrpcpb::RawPutRequest {
            context: Some(self.region.context()),
            key,
            value: self.value.clone(),
            ..Default::default()
        }
    }
}

/// What is wrong with one put's answer, if anything.
fn check(resp: &kvrpcpb::RawPutResponse) -> Option<String> {
    if let Some(err) = &resp.region_error {
        return Some(format!("region error: {}", err.message));
    }
    (!resp.error.is_empty()).then(|| resp.error.clone())
}

/// Keeps the first few faults (one broken run would otherwise repeat
/// the same one thousands of times).
fn note(faults: &mut Vec<String>, fault: String) {
    if faults.len() < 10 {
        faults.push(fault);
    }
}

async fn unary(server: &Server, keys: &Keys, args: &BatchPutArgs) -> Result<Run, BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(keys.clone());
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..args.in_flight {
        let (next, keys, puts) = (Arc::clone(&next), Arc::clone(&keys), args.puts);
        // One client: every worker shares the store's connection.
        let mut kv = server.store.kv();
        workers.spawn(async move {
            let mut faults = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= puts {
                    return faults;
                }
                match kv.raw_put(keys.request("unary", i)).await {
                    Ok(resp) => {
                        if let Some(fault) = check(resp.get_ref()) {
                            note(&mut faults, format!("put {i}: {fault}"));
                        }
                    }
                    Err(status) => note(&mut faults, format!("put {i}: {status}")),
                }
            }
        });
    }
    let mut faults = Vec::new();
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(found) => faults.extend(found),
            Err(err) => note(&mut faults, format!("a writer task failed: {err}")),
        }
    }
    faults.truncate(10);
    Ok(Run {
        elapsed: started.elapsed(),
        faults,
    })
}

async fn batched(server: &Server, keys: &Keys, args: &BatchPutArgs) -> Result<Run, BenchError> {
    // Room for one message per slot: the sender never waits on it.
    let (tx, rx) = mpsc::channel::<BatchCommandsRequest>(args.in_flight as usize + 1);
    let mut kv = server.store.kv();
    let started = Instant::now();
    // Ids go out in order: `sent` is the next one, `pending` the ids in
    // flight.
    let (mut sent, mut answered) = (0u64, 0u64);
    let mut pending: HashSet<u64> = HashSet::new();
    let mut faults = Vec::new();
    let refill = |sent: &mut u64, pending: &mut HashSet<u64>| {
        let room = args.in_flight.saturating_sub(pending.len() as u64);
        let count = room.min(args.puts - *sent);
        let mut message = BatchCommandsRequest::default();
        for _ in 0..count {
            let id = *sent;
            message.requests.push(BatchRequest {
                cmd: Some(ReqCmd::RawPut(keys.request("batch", id))),
            });
            message.request_ids.push(id);
            pending.insert(id);
            *sent += 1;
        }
        (count > 0).then_some(message)
    };
    if let Some(first) = refill(&mut sent, &mut pending) {
        tx.try_send(first)
            .map_err(|err| BenchError::Feed(format!("queueing the first batch: {err}")))?;
    }
    let mut stream = kv
        .batch_commands(ReceiverStream::new(rx))
        .await
        .map_err(|status| BenchError::Feed(format!("opening BatchCommands: {status}")))?
        .into_inner();
    while answered < args.puts {
        let message: BatchCommandsResponse = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => {
                note(
                    &mut faults,
                    format!("the stream ended after {answered} answers"),
                );
                break;
            }
            Err(status) => {
                note(
                    &mut faults,
                    format!("the stream failed after {answered} answers: {status}"),
                );
                break;
            }
        };
        if message.responses.len() != message.request_ids.len() {
            note(
                &mut faults,
                "a response message with unequal lists".to_owned(),
            );
        }
        for (id, response) in message.request_ids.iter().zip(&message.responses) {
            if !pending.remove(id) {
                note(&mut faults, format!("an answer for id {id}, not in flight"));
                continue;
            }
            answered += 1;
            match &response.cmd {
                Some(RespCmd::RawPut(resp)) => {
                    if let Some(fault) = check(resp) {
                        note(&mut faults, format!("put {id}: {fault}"));
                    }
                }
                other => note(&mut faults, format!("put {id}: answered with {other:?}")),
            }
        }
        if let Some(message) = refill(&mut sent, &mut pending)
            && tx.try_send(message).is_err()
        {
            note(&mut faults, "the request stream closed early".to_owned());
            break;
        }
    }
    let elapsed = started.elapsed();
    drop(tx);
    Ok(Run { elapsed, faults })
}
