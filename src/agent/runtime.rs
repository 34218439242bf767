//! `nixfleet agent`: assembles the agent from its parts and runs it until
//! SIGTERM/SIGINT. Start-up order is the point of this module: take the
//! queue's lock, rebuild every rollout from the queue BEFORE any worker
//! runs, re-issue what a restart owes (`resume`), then start the workers.
//! Shutdown: stop the workers, let an activation in progress report, drain
//! the reducer's inputs, exit within a bounded grace period.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::activation::{ActivationConfig, SwitchRunner};
use super::journal::{restore_and_write_back, SharedQueue};
use super::net::CpApi;
use super::probes::HostRunner;
use super::reducer::{commands, CommandReceivers, Input, Reducer, INPUT_CAPACITY};
use super::rollouts::Rollouts;
use super::workers::net::{
    run_drain_worker, run_heartbeat_worker, run_longpoll_worker, HeartbeatConfig, LongPollConfig,
};
use super::workers::{
    run_activation_worker, run_probe_worker, run_tick_worker, shutdown_channel, Shutdown, WorkerExit,
};
use crate::client::CpUrl;
use crate::clock::ClockHandle;
use crate::ids::Hostname;
use crate::queue::{Queue, QueueConfig};
use crate::sdnotify::Notifier;
use crate::sign::PublicKey;

/// After SIGTERM, workers get this long to stop (an activation in progress
/// is reported if it ends in time; the switch itself runs detached and a
/// restarted agent observes its result). systemd's default stop timeout is
/// 90 s; 25 s leaves it ample margin.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Everything `nixfleet agent` is told, resolved and validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub cp: CpUrl,
    pub hostname: Hostname,
    pub trust_keys: Vec<PublicKey>,
    pub health_checks: PathBuf,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
    pub activation: ActivationConfig,
    pub tick: Duration,
    pub heartbeat: Duration,
    pub drain: Duration,
    pub longpoll_wait_secs: u64,
}

impl AgentConfig {
    /// The NixOS defaults (`docs/protocol.md` §6) for the paths and programs.
    pub fn activation_defaults(state_dir: &std::path::Path) -> ActivationConfig {
        ActivationConfig {
            switch_runner: SwitchRunner::detect(),
            ..ActivationConfig::host_defaults(state_dir.join("log"))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot open the agent's queue in {path}: {source}")]
    Queue { path: PathBuf, source: crate::queue::QueueError },
    #[error("cannot create the agent's state dir {}: {source}", path.display())]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot rebuild the agent's state from its queue: {0}")]
    Restore(#[from] super::journal::RestoreError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}; the agent stopped (its service manager restarts it, and it resumes from its queue)")]
    WorkerStopped(String),
    #[error("the agent's queue {} stopped: {reason}; the agent exits so its service manager restarts it, and reopening the queue recovers what is on disk", path.display())]
    QueueStopped { path: PathBuf, reason: String },
}

/// Runs the agent until `shutdown` resolves.
pub async fn serve(
    cfg: AgentConfig,
    clock: ClockHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    serve_notifying(cfg, clock, &Notifier::disabled(), shutdown).await
}

/// [`serve`], telling the service manager `READY=1` once every rollout is
/// restored and the workers run, `STOPPING=1` when the shutdown begins, and
/// `WATCHDOG=1` from the reducer's loop, which the tick worker wakes at least
/// every [`Watchdog::wake_interval`](crate::sdnotify::Watchdog::wake_interval).
pub async fn serve_notifying(
    cfg: AgentConfig,
    clock: ClockHandle,
    notifier: &Notifier,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let queue = Queue::open(&cfg.state_dir, cfg.hostname.clone(), QueueConfig::default(), clock.clone())
        .map_err(|source| AgentError::Queue { path: cfg.state_dir.clone(), source })?;
    run_agent(cfg, clock, queue, notifier, shutdown).await
}

/// [`serve`] on a queue the caller opened (tests open it on a storage that
/// fails on command). The queue must be `cfg.state_dir`'s.
pub async fn serve_with_queue(
    cfg: AgentConfig,
    clock: ClockHandle,
    queue: Queue,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    run_agent(cfg, clock, queue, &Notifier::disabled(), shutdown).await
}

async fn run_agent(
    cfg: AgentConfig,
    clock: ClockHandle,
    queue: Queue,
    notifier: &Notifier,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    let (rollouts, queue) = restore_from_queue(&cfg, queue)?;

    let (cmds, rx) = commands();
    let (mut reducer, snapshot) = Reducer::new(rollouts, queue.clone(), cmds);
    reducer.resume();
    let (input_tx, input_rx) = mpsc::channel(INPUT_CAPACITY);
    let watchdog = notifier.watchdog();
    let tick_every = watchdog.wake_interval().map_or(cfg.tick, |wake| wake.min(cfg.tick));
    let mut reducer_task = tokio::spawn(reducer.run_pinging(input_rx, watchdog));

    let (trigger, stop) = shutdown_channel();
    let wiring = Wiring { inputs: input_tx, clock, stop };
    let mut workers = JoinSet::new();
    spawn_host_workers(&mut workers, &cfg, &rx, tick_every, &wiring);
    spawn_cp_workers(&mut workers, &cfg, &rx, &snapshot, &queue, started, &wiring);
    drop(wiring);
    tracing::info!(hostname = %cfg.hostname, cp = cfg.cp.authority(), "agent running");
    notifier.ready(&format!("running as {} against {}", cfg.hostname, cfg.cp.authority()));

    let failure = first_stop(shutdown, &mut workers, &queue, &reducer_task).await;
    notifier.stopping("stopping the workers");
    trigger.trigger();
    stop_within_grace(workers, &mut reducer_task).await;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Start-up: rebuilds every rollout from the queue before any worker runs.
fn restore_from_queue(cfg: &AgentConfig, mut queue: Queue) -> Result<(Rollouts, SharedQueue), AgentError> {
    let report = queue.recovery_report().clone();
    tracing::info!(?report, "queue opened");
    let (rollouts, restored) =
        restore_and_write_back(&mut queue, &cfg.state_dir, &cfg.health_checks, &cfg.hostname, &cfg.trust_keys)
            .map_err(AgentError::Restore)?;
    tracing::info!(restored = ?restored.restored, pruned = ?restored.pruned, skipped = ?restored.skipped, written_back = ?restored.written_back, "state rebuilt from the queue");
    Ok((rollouts, SharedQueue::new(queue)))
}

/// What every worker gets a clone of: the reducer's input channel, the
/// clock and the shutdown signal.
struct Wiring {
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
    stop: Shutdown,
}

/// Each worker task returns its name with its exit, for the log.
type Workers = JoinSet<(&'static str, WorkerExit)>;

/// The workers that act on the host: activation, probes, tick.
fn spawn_host_workers(
    workers: &mut Workers,
    cfg: &AgentConfig,
    rx: &CommandReceivers,
    tick_every: Duration,
    w: &Wiring,
) {
    {
        let (cfg_a, inputs, clock, stop) = (cfg.activation.clone(), w.inputs.clone(), w.clock.clone(), w.stop.clone());
        let orders = rx.activation.clone();
        workers.spawn(async move { ("activation", run_activation_worker(cfg_a, orders, inputs, clock, stop).await) });
    }
    {
        let (path, inputs, clock, stop) =
            (cfg.health_checks.clone(), w.inputs.clone(), w.clock.clone(), w.stop.clone());
        let plan = rx.probes.clone();
        workers.spawn(async move {
            ("probes", run_probe_worker(path, HostRunner::default(), plan, inputs, clock, stop).await)
        });
    }
    {
        let (tick, inputs, clock, stop) = (tick_every, w.inputs.clone(), w.clock.clone(), w.stop.clone());
        workers.spawn(async move { ("tick", run_tick_worker(tick, inputs, clock, stop).await) });
    }
}

/// The workers that talk to the control plane: long-poll, drain, heartbeat.
fn spawn_cp_workers(
    workers: &mut Workers,
    cfg: &AgentConfig,
    rx: &CommandReceivers,
    snapshot: &watch::Receiver<Rollouts>,
    queue: &SharedQueue,
    started: Instant,
    w: &Wiring,
) {
    let api = CpApi::new(cfg.cp.clone(), cfg.hostname.clone());
    {
        let lp = LongPollConfig {
            wait_secs: cfg.longpoll_wait_secs,
            trust_keys: cfg.trust_keys.clone(),
            current_system: cfg.current_system.clone(),
            state_dir: cfg.state_dir.clone(),
        };
        let (api, snap, q, inputs, clock, stop) =
            (api.clone(), snapshot.clone(), queue.clone(), w.inputs.clone(), w.clock.clone(), w.stop.clone());
        workers.spawn(async move { ("longpoll", run_longpoll_worker(api, lp, snap, q, inputs, clock, stop).await) });
    }
    {
        let (api, q, wake, interval, stop) = (api.clone(), queue.clone(), rx.drain.clone(), cfg.drain, w.stop.clone());
        workers.spawn(async move { ("drain", run_drain_worker(api, q, wake, interval, stop).await) });
    }
    {
        let hb = HeartbeatConfig {
            interval: cfg.heartbeat,
            current_system: cfg.current_system.clone(),
            booted_system: cfg.booted_system.clone(),
        };
        let (api, q, stop) = (api.clone(), queue.clone(), w.stop.clone());
        workers.spawn(async move { ("heartbeat", run_heartbeat_worker(api, hb, q, started, stop).await) });
    }
}

/// Waits for what ends the run: the requested shutdown (None), or a
/// failure. A worker ends on its own only when something it needs is gone
/// (the reducer) or it panicked: the agent then stops with an error, so the
/// service manager restarts it and the restart rebuilds from the queue.
/// Likewise when the queue stops (poisoned): nothing can be journaled in
/// this process any more, so probes, failure detection and rollback
/// would stall; a restart reopens the queue and recovers from disk.
async fn first_stop(
    shutdown: impl std::future::Future<Output = ()>,
    workers: &mut Workers,
    queue: &SharedQueue,
    reducer_task: &JoinHandle<()>,
) -> Option<AgentError> {
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested");
            None
        }
        Some(done) = workers.join_next() => {
            let why = match done {
                Ok((name, exit)) => format!("the {name} worker stopped on its own ({exit:?})"),
                Err(e) => format!("a worker task ended abnormally: {e}"),
            };
            tracing::error!("{why}; shutting down");
            Some(AgentError::WorkerStopped(why))
        }
        reason = queue.stopped() => {
            tracing::error!(queue = %queue.dir().display(), %reason, "the queue stopped; shutting down");
            // The reducer may be retrying an append that cannot succeed in
            // this process: stop it now (nothing unjournaled was applied).
            reducer_task.abort();
            Some(AgentError::QueueStopped { path: queue.dir().to_owned(), reason })
        }
    }
}

/// Shutdown, once the workers were told to stop: they get
/// [`SHUTDOWN_GRACE`] to finish (then they are aborted), and the reducer as
/// long again to finish the inputs it holds.
async fn stop_within_grace(mut workers: Workers, reducer_task: &mut JoinHandle<()>) {
    let graceful = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(done) = workers.join_next().await {
            if let Ok((name, exit)) = done {
                tracing::debug!(worker = name, ?exit, "worker stopped");
            }
        }
    })
    .await
    .is_ok();
    workers.abort_all();
    // Every input sender is gone with the workers: the reducer finishes
    // the inputs it holds and ends.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, reducer_task).await;
    if graceful {
        tracing::info!("agent stopped gracefully");
    } else {
        tracing::warn!(grace_secs = SHUTDOWN_GRACE.as_secs(), "agent stopped after the grace period; workers aborted");
    }
}
