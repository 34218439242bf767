//! The probe worker: runs the health checks of the newly active system
//! while the reducer says a rollout is soaking, and reports every result.
//! It exists so probe scheduling (which file, which probes, how often,
//! when to stop) lives in one place, apart from the runners that answer a
//! single probe (`agent::probes`) and from the reducer that judges results.
//!
//! What it does for each new [`ProbePlan`] (told apart by their order number):
//! 1. Stops every probe loop of the previous plan and waits until they are
//!    gone (`JoinSet::shutdown`), so no result of an old plan can arrive
//!    after the new plan's topology.
//! 2. If the plan names a rollout, reads the health-checks file. On a host
//!    the path is under `/etc`, which follows `/run/current-system`, so it
//!    is the file of the system that was just activated.
//! 3. Declares the topology, always, even when empty: the converge gate
//!    needs a declared topology, and a closure without a health-checks file
//!    converges on its soak time alone.
//! 4. Runs each probe that is not disabled in its own loop: first run at
//!    once, then every `interval` (≥ 1 s), concurrently, each result sent as
//!    `ProbeRun`. A probe that takes longer than its interval runs again
//!    right after (`MissedTickBehavior::Delay`), never in parallel with
//!    itself. At most `MAX_PROBES` loops exist, the file's own limit.
//! 5. A runner that panics (a bug: runners never panic by contract) does not
//!    silence its probe: that run is reported as a failure naming the panic,
//!    and the loop goes on. A silent probe would hold the host Soaking
//!    forever; a failing one lets the soak decide (and roll back).
//!
//! Decision: an INVALID health-checks file (unreadable, malformed, a bad
//! field) is not an empty topology, because that would let a system with a
//! broken health-check file converge unchecked. It is declared as one
//! enforce probe named [`HEALTH_CHECKS_FILE_PROBE`] (kind exec) that fails
//! every [`INVALID_FILE_REPORT_INTERVAL`] with the parse error as the
//! reason: the host never converges on it, and with rollback-and-halt the
//! sustained failure rolls it back. The file lives in the immutable closure,
//! so it is not re-read; a new plan (a new activation) reads it again.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::{Shutdown, WorkerExit};
use crate::agent::probes::{
    HealthChecks, Probe, ProbeConfigError, ProbeRun, ProbeRunner, DEFAULT_INTERVAL_SECS, MIN_INTERVAL_SECS,
};
use crate::agent::reducer::{Input, ProbePlan};
use crate::clock::ClockHandle;
use crate::ids::RolloutId;
use crate::machine::{ProbeDecl, ProbeKind, ProbeMode};

/// Name of the stand-in probe declared for an invalid health-checks file.
pub const HEALTH_CHECKS_FILE_PROBE: &str = "health-checks-file";

/// How often an invalid health-checks file is reported as failing: the
/// default probe interval, so the failure stays visible in the event log
/// at the pace of an ordinary probe without flooding the journal.
pub const INVALID_FILE_REPORT_INTERVAL: Duration = Duration::from_secs(DEFAULT_INTERVAL_SECS);

/// The shortest interval a loop runs at, whatever it is given: the parser
/// already refuses faster probes; this keeps a runner bug from spinning.
const MIN_INTERVAL: Duration = Duration::from_secs(MIN_INTERVAL_SECS);

/// Runs the probes of the current plan until shutdown or until the
/// reducer is gone. `health_checks_path` is read afresh for every plan.
pub async fn run_probe_worker<R>(
    health_checks_path: PathBuf,
    runner: R,
    mut plan: watch::Receiver<ProbePlan>,
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
    mut shutdown: Shutdown,
) -> WorkerExit
where
    R: ProbeRunner + Send + Sync + 'static,
{
    let runner = Arc::new(runner);
    // Every probe loop of the current plan; dropping or shutting it down
    // aborts them, so no loop outlives its plan or this worker.
    let mut loops: JoinSet<()> = JoinSet::new();
    let mut running_plan: Option<u64> = None;
    let exit = loop {
        if shutdown.is_requested() {
            break WorkerExit::Shutdown;
        }
        let wanted = plan.borrow_and_update().clone();
        if running_plan != Some(wanted.number) {
            running_plan = Some(wanted.number);
            loops.shutdown().await;
            if let Some(rollout_id) = wanted.rollout_id {
                let start = start_plan(&health_checks_path, rollout_id, &runner, &inputs, &clock, &mut loops);
                let started = tokio::select! {
                    biased;
                    () = shutdown.requested() => Err(WorkerExit::Shutdown),
                    started = start => started,
                };
                if let Err(exit) = started {
                    break exit;
                }
            }
        }
        tokio::select! {
            biased;
            () = shutdown.requested() => break WorkerExit::Shutdown,
            changed = plan.changed() => {
                if changed.is_err() {
                    break WorkerExit::ReducerGone;
                }
            }
            Some(ended) = loops.join_next() => match ended {
                // A loop only returns when its send failed.
                Ok(()) => break WorkerExit::ReducerGone,
                Err(e) if e.is_panic() => {
                    // The loops catch their runner's panics; a panic here is a
                    // bug in the loop itself, and its probe stops reporting.
                    tracing::error!(error = %e, "a probe loop panicked; that probe no longer reports");
                }
                Err(_cancelled) => {}
            },
        }
    };
    loops.shutdown().await;
    tracing::info!(?exit, "probe worker stopped");
    exit
}

/// Reads the file, declares the topology and starts the loops.
async fn start_plan<R>(
    path: &Path,
    rollout_id: RolloutId,
    runner: &Arc<R>,
    inputs: &mpsc::Sender<Input>,
    clock: &ClockHandle,
    loops: &mut JoinSet<()>,
) -> Result<(), WorkerExit>
where
    R: ProbeRunner + Send + Sync + 'static,
{
    let loaded = load(path.to_owned()).await;
    let topology = match &loaded {
        Ok(checks) => checks.topology(),
        Err(reason) => {
            tracing::error!(%rollout_id, %reason, "health-checks file is invalid; reporting it as a failing probe");
            invalid_file_topology()
        }
    };
    tracing::info!(%rollout_id, n_probes = topology.len(), path = %path.display(), "declaring probe topology");
    let declared = Input::ProbeTopology { rollout_id: rollout_id.clone(), probes: topology, at: clock.now() };
    inputs.send(declared).await.map_err(|_| WorkerExit::ReducerGone)?;
    match loaded {
        Ok(checks) => {
            for probe in checks.probes.into_iter().filter(|p| p.mode != ProbeMode::Disabled) {
                let (id, runner, inputs, clock) = (rollout_id.clone(), runner.clone(), inputs.clone(), clock.clone());
                loops.spawn(probe_loop(id, probe, runner, inputs, clock));
            }
        }
        Err(reason) => {
            loops.spawn(invalid_file_loop(rollout_id, reason.to_string(), inputs.clone(), clock.clone()));
        }
    }
    Ok(())
}

/// The one failing stand-in probe declared for an invalid file.
fn invalid_file_topology() -> Vec<ProbeDecl> {
    vec![ProbeDecl { name: HEALTH_CHECKS_FILE_PROBE.to_owned(), kind: ProbeKind::Exec, mode: ProbeMode::Enforce }]
}

/// The topology this worker declares for the health-checks file at `path`
/// (read on the calling thread): its probes, or the stand-in of an invalid
/// file. The restart rebuild uses it for a lost `ProbeTopologyDeclared`.
pub fn declared_topology(path: &Path) -> Vec<ProbeDecl> {
    match HealthChecks::load(path) {
        Ok(checks) => checks.topology(),
        Err(_) => invalid_file_topology(),
    }
}

/// The file off the reactor (it is at most `MAX_HEALTH_CHECKS_BYTES`).
async fn load(path: PathBuf) -> Result<HealthChecks, LoadError> {
    match tokio::task::spawn_blocking(move || HealthChecks::load(&path)).await {
        Ok(loaded) => loaded.map_err(LoadError::Invalid),
        Err(source) => Err(LoadError::Task(source)),
    }
}

/// Why the health-checks file gave no probes (reported as a failing probe).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Invalid(ProbeConfigError),
    #[error("reading the health-checks file failed: {0}")]
    Task(tokio::task::JoinError),
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(every.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Runs one probe forever (until aborted or the reducer is gone).
async fn probe_loop<R: ProbeRunner>(
    rollout_id: RolloutId,
    probe: Probe,
    runner: Arc<R>,
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
) {
    let mut ticker = ticker(probe.interval);
    loop {
        ticker.tick().await;
        let ProbeRun { status, reason } = match CatchPanic(Box::pin(runner.run(&probe))).await {
            Ok(run) => run,
            // Runners never panic by contract. If one does, the probe reports
            // a failure (and keeps running): a probe that cannot run must not
            // let the host converge, and a silent probe would hold it Soaking
            // forever instead of deciding.
            Err(message) => {
                tracing::error!(probe = %probe.name, %message, "the probe runner panicked; reporting a failure");
                ProbeRun::fail(format!("the probe runner panicked: {message}"))
            }
        };
        let input = Input::ProbeRun {
            rollout_id: rollout_id.clone(),
            probe_name: probe.name.clone(),
            mode: probe.mode,
            status,
            reason,
            at: clock.now(),
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// Polls a future and turns a panic inside it into `Err(message)`.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_owned(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

/// Reports an invalid health-checks file as a failing enforce probe.
async fn invalid_file_loop(rollout_id: RolloutId, reason: String, inputs: mpsc::Sender<Input>, clock: ClockHandle) {
    let failed = ProbeRun::fail(&reason);
    let mut ticker = ticker(INVALID_FILE_REPORT_INTERVAL);
    loop {
        ticker.tick().await;
        let input = Input::ProbeRun {
            rollout_id: rollout_id.clone(),
            probe_name: HEALTH_CHECKS_FILE_PROBE.to_owned(),
            mode: ProbeMode::Enforce,
            status: failed.status,
            reason: failed.reason.clone(),
            at: clock.now(),
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}
