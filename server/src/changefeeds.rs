//! Embedded changefeeds: the `[[changefeed]]` tables of the configuration,
//! run inside `kvfeed serve` and managed from the status server.
//!
//! One owner task ([`start`]) holds every job: its definition, sink, live
//! status, stop sender and task handle, and its admin state. Everything
//! else (the HTTP routes, shutdown) talks to it through a bounded command
//! queue with a oneshot answer, so no lock is shared beyond each job's
//! status, and commands on one job are applied one at a time, in order.
//!
//! Each job is what `kvfeed changefeed run` runs (the same definition code,
//! the same sinks, the same `kvfeed-client` feed), connected to this
//! server's own advertised gRPC address. The connection is made in the
//! background with a backoff: the server serves whether or not PD answers
//! its own changefeeds yet. A job's scratch space is
//! `<data-dir>/changefeeds/<id>/`.
//!
//! Invariants:
//! - The admin state (active, paused, removed) is persisted in that
//!   directory's `admin.json` (written to a temporary file, fsynced, then
//!   renamed over) before a command is answered, so a paused changefeed
//!   stays paused across restarts, and a removed one is not started again
//!   while its table remains (a new id is a new changefeed). An unreadable
//!   `admin.json` counts as paused: never run what an operator may have
//!   stopped.
//! - A job never outlives the manager: its handle aborts the task when
//!   dropped ([`RunningJob`]), and the owner task holds the handles, so a
//!   cancelled owner (the runtime shutting down) cancels its jobs too.
//! - On shutdown the owner stops every job and waits at most
//!   [`JOB_STOP_GRACE`] before aborting the rest. `serve` waits for that
//!   before the change feed and the gRPC server are stopped: the jobs' feed
//!   streams are calls to this same server, which its graceful shutdown
//!   would otherwise wait for.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use kvfeed_changefeed::{Changefeed, ChangefeedDef, ChangefeedId, State, Status};
use kvfeed_client::Cluster;
use kvfeed_types::TimeStamp;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cmd::changefeed::sink_for;
use crate::config::ChangefeedConfig;
use crate::shutdown::ShutdownSignal;
use crate::status::{Reply, ReplyFuture, StatusRequest, StatusRoutes};

/// How long a stopping job may take before its task is aborted.
pub const JOB_STOP_GRACE: Duration = Duration::from_secs(5);
/// Commands waiting for the owner task.
const COMMAND_QUEUE: usize = 64;
/// Longest a PD call made on a command's behalf may take.
const PD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest an HTTP request waits for the owner's answer: a stop, a PD call
/// and an fsync, with room to spare.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// How often finished jobs are noticed when nobody asks.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// First and longest wait between attempts to reach PD.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));
/// The admin state's file in a job's directory.
pub const ADMIN_FILE: &str = "admin.json";

/// What an operator decided about a changefeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Runs (the default).
    #[default]
    Active,
    /// Stopped by `pause`; the service safe point stays, with its TTL.
    Paused,
    /// Stopped for good by `remove`; the safe point is gone.
    Removed,
}

#[derive(Serialize, Deserialize)]
struct AdminFile {
    state: AdminState,
}

/// The admin state stored in `dir`; [`AdminState::Active`] when there is
/// none.
pub fn load_admin_state(dir: &Path) -> std::io::Result<AdminState> {
    match std::fs::read(dir.join(ADMIN_FILE)) {
        Ok(bytes) => serde_json::from_slice::<AdminFile>(&bytes)
            .map(|f| f.state)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AdminState::Active),
        Err(e) => Err(e),
    }
}

/// Stores `state` in `dir` durably: a temporary file, fsynced, renamed
/// over the old one, then the directory fsynced, so a crash leaves the old
/// state or the new one, never a torn file.
pub fn store_admin_state(dir: &Path, state: AdminState) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{ADMIN_FILE}.tmp"));
    let body = serde_json::to_vec(&AdminFile { state }).map_err(std::io::Error::other)?;
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(ADMIN_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// One changefeed as the status server shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    /// The runner's status (state, checkpoint, counters, last error).
    #[serde(flatten)]
    pub status: Status,
    /// The operator's decision.
    pub admin_state: AdminState,
    /// The sink's URI.
    pub sink: String,
    /// How far the checkpoint trails the wall clock, in ms; none before a
    /// checkpoint is known.
    pub lag_ms: Option<u64>,
}

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No `[[changefeed]]` table has that id.
    #[error("no changefeed with id {0:?} (see GET /changefeeds)")]
    Unknown(String),
    /// The command contradicts the changefeed's admin state.
    #[error("{0}")]
    Conflict(String),
    /// The cluster (this server's PD) is not reachable yet, or the manager
    /// is gone.
    #[error("{0}")]
    Unavailable(String),
    /// Storing the admin state failed.
    #[error("{0}")]
    Internal(String),
}

impl CommandError {
    fn reply(&self) -> Reply {
        let status = match self {
            CommandError::Unknown(_) => StatusCode::NOT_FOUND,
            CommandError::Conflict(_) => StatusCode::CONFLICT,
            CommandError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            CommandError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Reply::text(status, format!("{self}\n"))
    }
}

type Answer<T> = oneshot::Sender<Result<T, CommandError>>;

enum Command {
    List(Answer<Vec<JobView>>),
    Status(String, Answer<JobView>),
    Pause(String, Answer<JobView>),
    Resume(String, Answer<JobView>),
    Remove(String, Answer<JobView>),
}

/// The way to the owner task; cheap to clone.
#[derive(Debug, Clone)]
pub struct ChangefeedsHandle {
    commands: mpsc::Sender<Command>,
}

impl ChangefeedsHandle {
    async fn ask<T>(&self, command: impl FnOnce(Answer<T>) -> Command) -> Result<T, CommandError> {
        let gone = || CommandError::Unavailable("the changefeed manager is not running".to_owned());
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Every changefeed, by id.
    pub async fn list(&self) -> Result<Vec<JobView>, CommandError> {
        self.ask(Command::List).await
    }

    /// One changefeed.
    pub async fn status(&self, id: String) -> Result<JobView, CommandError> {
        self.ask(|a| Command::Status(id, a)).await
    }

    /// Stops a changefeed until `resume`; idempotent.
    pub async fn pause(&self, id: String) -> Result<JobView, CommandError> {
        self.ask(|a| Command::Pause(id, a)).await
    }

    /// Starts a paused (or failed) changefeed again, from its sink's
    /// checkpoint; idempotent for a running one.
    pub async fn resume(&self, id: String) -> Result<JobView, CommandError> {
        self.ask(|a| Command::Resume(id, a)).await
    }

    /// Stops a changefeed for good and deletes its service safe point.
    pub async fn remove(&self, id: String) -> Result<JobView, CommandError> {
        self.ask(|a| Command::Remove(id, a)).await
    }
}

/// A job's status: a placeholder until the runner exists, then the
/// runner's own (which it updates as it goes).
#[derive(Clone)]
struct SharedStatus(Arc<Mutex<Arc<Mutex<Status>>>>);

impl SharedStatus {
    fn new(def: &ChangefeedDef) -> SharedStatus {
        SharedStatus(Arc::new(Mutex::new(Arc::new(Mutex::new(Status::new(def))))))
    }

    fn snapshot(&self) -> Status {
        let live = Arc::clone(&self.0.lock());
        live.lock().clone()
    }

    fn update(&self, change: impl FnOnce(&mut Status)) {
        let live = Arc::clone(&self.0.lock());
        change(&mut live.lock());
    }

    /// Starts over with a placeholder (a new run).
    fn reset(&self, def: &ChangefeedDef) {
        *self.0.lock() = Arc::new(Mutex::new(Status::new(def)));
    }

    fn attach(&self, live: Arc<Mutex<Status>>) {
        *self.0.lock() = live;
    }
}

/// A running job's task. Dropping it aborts the task, so a job cannot
/// outlive whoever holds this.
struct RunningJob {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), String>>,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts a helper task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Job {
    table: ChangefeedConfig,
    def: ChangefeedDef,
    dir: PathBuf,
    admin: AdminState,
    status: SharedStatus,
    run: Option<RunningJob>,
}

impl Job {
    fn view(&self, now_ms: u64) -> JobView {
        let status = self.status.snapshot();
        let lag_ms = (status.checkpoint_ts != 0).then(|| status.lag_ms(now_ms));
        JobView {
            status,
            admin_state: self.admin,
            sink: self.table.sink.clone(),
            lag_ms,
        }
    }

    /// Sets the state once the job has ended (or before it ever ran).
    fn settle(&self, state: State) {
        self.status.update(|s| s.state = state);
    }
}

/// Starts the owner task for `tables` (validated). Jobs connect to
/// `pd_addr` (this server's advertised gRPC address) once it answers. The
/// task holds `shutdown` until every job has stopped.
pub fn start(
    tables: &[ChangefeedConfig],
    data_dir: &Path,
    pd_addr: String,
    shutdown: ShutdownSignal,
) -> (ChangefeedsHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let manager = Manager::new(tables, data_dir);
    let task = tokio::spawn(manager.own(rx, pd_addr, shutdown));
    (ChangefeedsHandle { commands: tx }, task)
}

struct Manager {
    jobs: BTreeMap<String, Job>,
    cluster: Option<Cluster>,
}

impl Manager {
    fn new(tables: &[ChangefeedConfig], data_dir: &Path) -> Manager {
        let mut jobs = BTreeMap::new();
        for table in tables {
            // Validated with the configuration, so this does not fail.
            let def = match table.def() {
                Ok(def) => def,
                Err(err) => {
                    tracing::error!(changefeed = %table.id, %err, "invalid changefeed skipped");
                    continue;
                }
            };
            let dir = data_dir.join("changefeeds").join(&table.id);
            let status = SharedStatus::new(&def);
            let admin = match load_admin_state(&dir) {
                Ok(state) => state,
                Err(err) => {
                    let err = format!("cannot read {}: {err}; treated as paused", ADMIN_FILE);
                    tracing::error!(changefeed = %table.id, %err, "changefeed admin state");
                    status.update(|s| s.last_error = Some(err));
                    AdminState::Paused
                }
            };
            match admin {
                AdminState::Active => {}
                AdminState::Paused => {
                    status.update(|s| s.state = State::Paused);
                    tracing::info!(changefeed = %table.id, "changefeed is paused; resume it to run it");
                }
                AdminState::Removed => {
                    status.update(|s| s.state = State::Stopped);
                    tracing::warn!(
                        changefeed = %table.id,
                        "changefeed was removed and is not started again while its [[changefeed]] \
                         table remains in the config; give the table another id to start a new one"
                    );
                }
            }
            jobs.insert(
                table.id.clone(),
                Job {
                    table: table.clone(),
                    def,
                    dir,
                    admin,
                    status,
                    run: None,
                },
            );
        }
        Manager {
            jobs,
            cluster: None,
        }
    }

    /// The owner task: commands, the connection to PD, finished jobs and
    /// shutdown, until shutdown (or every handle is gone).
    async fn own(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        pd_addr: String,
        mut shutdown: ShutdownSignal,
    ) {
        let (connected_tx, mut connected) = oneshot::channel();
        // Only when there is something to run or remove: a server without
        // tables never calls itself.
        let _connect = (!self.jobs.is_empty())
            .then(|| AbortOnDrop(tokio::spawn(connect(pd_addr, connected_tx))));
        let mut waiting_for_pd = !self.jobs.is_empty();
        let mut reap = tokio::time::interval(REAP_INTERVAL);
        loop {
            tokio::select! {
                () = shutdown.recv() => break,
                cluster = &mut connected, if waiting_for_pd => {
                    waiting_for_pd = false;
                    if let Ok(cluster) = cluster {
                        self.cluster = Some(cluster);
                        let active: Vec<String> = self
                            .jobs
                            .iter()
                            .filter(|(_, j)| j.admin == AdminState::Active)
                            .map(|(id, _)| id.clone())
                            .collect();
                        for id in active {
                            self.start_job(&id);
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                _ = reap.tick() => self.reap().await,
            }
        }
        self.stop_all().await;
    }

    async fn handle(&mut self, command: Command) {
        self.reap().await;
        // A caller that gave up is no reason to stop: the change is made
        // (and persisted) all the same.
        match command {
            Command::List(answer) => {
                let now = now_ms();
                let _ = answer.send(Ok(self.jobs.values().map(|j| j.view(now)).collect()));
            }
            Command::Status(id, answer) => {
                let _ = answer.send(self.job(&id).map(|j| j.view(now_ms())));
            }
            Command::Pause(id, answer) => {
                let _ = answer.send(self.pause(&id).await);
            }
            Command::Resume(id, answer) => {
                let _ = answer.send(self.resume(&id).await);
            }
            Command::Remove(id, answer) => {
                let _ = answer.send(self.remove(&id).await);
            }
        }
    }

    fn job(&self, id: &str) -> Result<&Job, CommandError> {
        self.jobs
            .get(id)
            .ok_or_else(|| CommandError::Unknown(id.to_owned()))
    }

    async fn pause(&mut self, id: &str) -> Result<JobView, CommandError> {
        match self.job(id)?.admin {
            AdminState::Removed => {
                return Err(CommandError::Conflict(format!(
                    "changefeed {id:?} was removed; there is nothing to pause"
                )));
            }
            AdminState::Paused => return Ok(self.job(id)?.view(now_ms())),
            AdminState::Active => {}
        }
        self.stop_job(id).await;
        self.set_admin(id, AdminState::Paused).await?;
        let job = self.job(id)?;
        job.settle(State::Paused);
        tracing::info!(changefeed = id, "changefeed paused");
        Ok(job.view(now_ms()))
    }

    async fn resume(&mut self, id: &str) -> Result<JobView, CommandError> {
        match self.job(id)?.admin {
            AdminState::Removed => {
                return Err(CommandError::Conflict(format!(
                    "changefeed {id:?} was removed and cannot be resumed; give its \
                     [[changefeed]] table another id to start a new changefeed"
                )));
            }
            AdminState::Paused => self.set_admin(id, AdminState::Active).await?,
            AdminState::Active => {}
        }
        if self.cluster.is_some() {
            self.start_job(id);
        } else {
            self.job(id)?.settle(State::Starting);
        }
        tracing::info!(changefeed = id, "changefeed resumed");
        Ok(self.job(id)?.view(now_ms()))
    }

    async fn remove(&mut self, id: &str) -> Result<JobView, CommandError> {
        if self.job(id)?.admin == AdminState::Removed {
            return Ok(self.job(id)?.view(now_ms()));
        }
        let Some(cluster) = self.cluster.clone() else {
            return Err(CommandError::Unavailable(
                "not connected to PD yet, so the service safe point cannot be deleted; \
                 try again shortly"
                    .to_owned(),
            ));
        };
        self.stop_job(id).await;
        // TTL 0 deletes the service safe point: GC may pass the
        // changefeed's checkpoint from now on.
        let deleted = tokio::time::timeout(
            PD_TIMEOUT,
            cluster.update_service_safe_point(id, 0, TimeStamp::ZERO),
        )
        .await;
        let failure = match deleted {
            Ok(Ok(_)) => None,
            Ok(Err(err)) => Some(kvfeed_client::error::error_chain(&err)),
            Err(_) => Some(format!("PD did not answer within {PD_TIMEOUT:?}")),
        };
        if let Some(failure) = failure {
            // Stopped but not removed: keep it paused so it does not run
            // again, and let the operator retry.
            self.set_admin(id, AdminState::Paused).await?;
            self.job(id)?.settle(State::Paused);
            return Err(CommandError::Unavailable(format!(
                "changefeed {id:?} is stopped (now paused) but its service safe point could \
                 not be deleted: {failure}; run remove again"
            )));
        }
        self.set_admin(id, AdminState::Removed).await?;
        let job = self.job(id)?;
        job.settle(State::Stopped);
        tracing::info!(changefeed = id, "changefeed removed");
        Ok(job.view(now_ms()))
    }

    /// Persists, then records, a job's admin state.
    async fn set_admin(&mut self, id: &str, state: AdminState) -> Result<(), CommandError> {
        let dir = self.job(id)?.dir.clone();
        let stored = tokio::task::spawn_blocking(move || store_admin_state(&dir, state)).await;
        let failure = match stored {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(err) => Some(err.to_string()),
        };
        if let Some(failure) = failure {
            return Err(CommandError::Internal(format!(
                "cannot record changefeed {id:?} as {state:?}: {failure}"
            )));
        }
        if let Some(job) = self.jobs.get_mut(id) {
            job.admin = state;
        }
        Ok(())
    }

    /// Spawns the job's task, unless it runs already.
    fn start_job(&mut self, id: &str) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.run.is_some() {
            return;
        }
        job.status.reset(&job.def);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run_job(
            cluster,
            job.table.clone(),
            job.def.clone(),
            job.dir.clone(),
            job.status.clone(),
            stopped,
        ));
        job.run = Some(RunningJob { stop, task });
        tracing::info!(changefeed = id, sink = %job.table.sink, "changefeed starting");
    }

    /// Stops the job's task and waits for it, at most [`JOB_STOP_GRACE`].
    async fn stop_job(&mut self, id: &str) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if let Some(run) = job.run.take() {
            let deadline = tokio::time::Instant::now() + JOB_STOP_GRACE;
            finish(id, job, run, deadline).await;
        }
    }

    /// Stops every job, with one deadline for all.
    async fn stop_all(&mut self) {
        let deadline = tokio::time::Instant::now() + JOB_STOP_GRACE;
        for run in self.jobs.values().filter_map(|j| j.run.as_ref()) {
            run.stop.send_replace(true);
        }
        for (id, job) in &mut self.jobs {
            if let Some(run) = job.run.take() {
                finish(id, job, run, deadline).await;
            }
        }
    }

    /// Notes the jobs that ended on their own (failed, or panicked).
    async fn reap(&mut self) {
        for (id, job) in &mut self.jobs {
            if job.run.as_ref().is_some_and(|r| r.task.is_finished())
                && let Some(run) = job.run.take()
            {
                let deadline = tokio::time::Instant::now() + JOB_STOP_GRACE;
                finish(id, job, run, deadline).await;
            }
        }
    }
}

/// Asks a job to stop, waits for it until `deadline` (aborting it then),
/// and records how it ended in its status.
async fn finish(id: &str, job: &Job, mut run: RunningJob, deadline: tokio::time::Instant) {
    run.stop.send_replace(true);
    let ended = tokio::time::timeout_at(deadline, &mut run.task).await;
    let failure = match ended {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(err))) => Some(err),
        Ok(Err(err)) if err.is_panic() => {
            let payload = err.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Some(format!("the changefeed task panicked: {text}"))
        }
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::warn!(
                changefeed = id,
                "changefeed did not stop within {JOB_STOP_GRACE:?}; aborted"
            );
            None
        }
    };
    drop(run);
    match failure {
        Some(err) => {
            tracing::error!(changefeed = id, error = %err, "changefeed failed");
            job.status.update(|s| {
                s.state = State::Failed;
                s.last_error = Some(err);
            });
        }
        None => job.settle(State::Stopped),
    }
}

/// One job: a fresh start ts if the table has none, the sink, the runner.
async fn run_job(
    cluster: Cluster,
    table: ChangefeedConfig,
    mut def: ChangefeedDef,
    dir: PathBuf,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    if table.start_ts.is_none() {
        let mut backoff = BACKOFF.0;
        loop {
            let tso = tokio::select! {
                tso = cluster.tso() => tso,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            match tso {
                Ok(ts) => {
                    def.start_ts = ts;
                    break;
                }
                Err(err) => {
                    let err = kvfeed_client::error::error_chain(&err);
                    tracing::warn!(changefeed = %def.id, error = %err, "no start ts yet");
                    status.update(|s| {
                        s.state = State::Retrying;
                        s.last_error = Some(format!("getting a start ts: {err}"));
                    });
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }
    status.update(|s| s.checkpoint_ts = def.start_ts.into_inner());
    let sink = sink_for(&table.sink, dir.clone()).map_err(|e| e.to_string())?;
    let changefeed = Changefeed::new(def, cluster, sink, dir, table.options());
    status.attach(changefeed.status());
    changefeed.run(stop).await.map_err(|e| e.chain())
}

/// Connects to PD at `addr`, retrying with a backoff until it answers.
async fn connect(addr: String, connected: oneshot::Sender<Cluster>) {
    let mut backoff = BACKOFF.0;
    loop {
        match Cluster::connect(&addr).await {
            Ok(cluster) => {
                let _ = connected.send(cluster);
                return;
            }
            Err(err) => {
                tracing::warn!(%addr, error = %kvfeed_client::error::error_chain(&err), ?backoff, "changefeeds cannot reach PD yet");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Adds the changefeed endpoints to `routes`:
/// `GET /changefeeds`, `GET /changefeeds/status?id=ID` and
/// `POST /changefeeds/{pause,resume,remove}?id=ID`. Each answers JSON (the
/// list, or the changefeed after the change), or a text reason: 400 for a
/// bad query, 404 for an unknown id, 409 for a command the admin state
/// refuses, 503 when PD or the manager cannot answer.
pub fn routes(routes: StatusRoutes, handle: &ChangefeedsHandle) -> StatusRoutes {
    let list = handle.clone();
    routes
        .get_async("/changefeeds", move |_| {
            let handle = list.clone();
            Box::pin(async move { answer(handle.list()).await })
        })
        .get_async(
            "/changefeeds/status",
            by_id(handle, |h, id| Box::pin(async move { h.status(id).await })),
        )
        .post_async(
            "/changefeeds/pause",
            by_id(handle, |h, id| Box::pin(async move { h.pause(id).await })),
        )
        .post_async(
            "/changefeeds/resume",
            by_id(handle, |h, id| Box::pin(async move { h.resume(id).await })),
        )
        .post_async(
            "/changefeeds/remove",
            by_id(handle, |h, id| Box::pin(async move { h.remove(id).await })),
        )
}

type ViewFuture = std::pin::Pin<Box<dyn Future<Output = Result<JobView, CommandError>> + Send>>;

/// A handler taking `?id=ID`.
fn by_id(
    handle: &ChangefeedsHandle,
    command: fn(ChangefeedsHandle, String) -> ViewFuture,
) -> impl Fn(&StatusRequest<'_>) -> ReplyFuture + Send + Sync + 'static {
    let handle = handle.clone();
    move |request| {
        let id = id_param(request.query);
        let handle = handle.clone();
        Box::pin(async move {
            match id {
                Ok(id) => answer(command(handle, id)).await,
                Err(reply) => reply,
            }
        })
    }
}

/// Waits (bounded) for the owner's answer and turns it into a reply.
async fn answer<T: Serialize>(asked: impl Future<Output = Result<T, CommandError>>) -> Reply {
    match tokio::time::timeout(ANSWER_TIMEOUT, asked).await {
        Ok(Ok(value)) => Reply::json(&value),
        Ok(Err(err)) => err.reply(),
        Err(_) => Reply::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the changefeed manager did not answer within {ANSWER_TIMEOUT:?}\n"),
        ),
    }
}

/// The one `id=ID` parameter of a query (ids need no percent-decoding:
/// their characters are all URL-safe).
fn id_param(query: Option<&str>) -> Result<String, Reply> {
    let bad = |message: String| Reply::text(StatusCode::BAD_REQUEST, format!("{message}\n"));
    let mut id = None;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("id", value)) if id.is_none() => id = Some(value.to_owned()),
            Some(("id", _)) => return Err(bad("id is given more than once".to_owned())),
            _ => return Err(bad(format!("unknown parameter {pair:?} (expected id=ID)"))),
        }
    }
    let id = id.ok_or_else(|| bad("missing id=ID".to_owned()))?;
    ChangefeedId::new(id.clone()).map_err(|e| bad(e.to_string()))?;
    Ok(id)
}

#[cfg(test)]
#[path = "changefeeds_tests.rs"]
mod tests;
