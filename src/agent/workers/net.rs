//! The workers that talk to the control plane: the long-poll (dispatches
//! in), the drainer (outbound events out, in order) and the heartbeat
//! (liveness out, Replay-From in). None of them changes a record: a
//! dispatch becomes an `Input` for the reducer, and delivery only moves
//! queue files. With the CP unreachable they back off and keep trying while
//! the rest of the agent goes on working from its queue.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};

use super::{Shutdown, WorkerExit};
use crate::agent::activation::resolve_current_system;
use crate::agent::admission::admit;
use crate::agent::backoff::Backoff;
use crate::agent::journal::{ManifestCache, SharedQueue};
use crate::agent::net::CpApi;
use crate::agent::reducer::Input;
use crate::agent::rollouts::Rollouts;
use crate::clock::ClockHandle;
use crate::ids::RolloutId;
use crate::machine::{OnHealthFailure, Policy};
use crate::queue::QueuedEvent;
use crate::sign::PublicKey;
use crate::wire::{BatchItem, EventBatch, Heartbeat, ResultStatus, MAX_BATCH_EVENTS};

/// After a dispatch for a rollout this host already handles (the CP repeats
/// it until our DispatchAck is applied, normally a few milliseconds later)
/// the next poll waits this long, doubling while the repeats go on up to
/// [`KNOWN_DISPATCH_PAUSE_MAX`]: quick to see the next rollout, and bounded
/// load if the CP never applies the ack (e.g. it rejected it).
pub const KNOWN_DISPATCH_PAUSE_MIN: Duration = Duration::from_millis(20);
pub const KNOWN_DISPATCH_PAUSE_MAX: Duration = Duration::from_secs(5);
/// The drainer also looks at the queue this often without being woken
/// (SPEC default 15 s), so nothing waits for the next enqueue.
pub const DEFAULT_DRAIN_INTERVAL: Duration = Duration::from_secs(15);
/// SPEC default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// Randomness for jitter; seeded from the OS, falling back to the clock's
/// nanoseconds (jitter only spreads load; it guards no secret).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return u64::from(std::process::id()).rotate_left(17);
    }
    u64::from_le_bytes(bytes)
}

/// Sleeps `delay` unless shutdown comes first (then returns false).
async fn pause(delay: Duration, shutdown: &mut Shutdown) -> bool {
    tokio::select! {
        biased;
        () = shutdown.requested() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// What the long-poll worker needs to judge a dispatch.
#[derive(Debug, Clone)]
pub struct LongPollConfig {
    pub wait_secs: u64,
    pub trust_keys: Vec<PublicKey>,
    pub current_system: PathBuf,
    pub state_dir: PathBuf,
}

/// Long-polls for dispatches; verifies each one with this host's trust keys
/// and hands the reducer either a Dispatch or a refusal.
pub async fn run_longpoll_worker(
    api: CpApi,
    cfg: LongPollConfig,
    snapshot: watch::Receiver<Rollouts>,
    queue: SharedQueue,
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let cache = ManifestCache::new(&cfg.state_dir);
    let mut backoff = Backoff::new();
    let mut known_pause = KNOWN_DISPATCH_PAUSE_MIN;
    loop {
        let polled = tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            r = api.dispatch(cfg.wait_secs) => r,
        };
        let dispatch = match polled {
            Ok(Some(d)) => {
                backoff.succeed();
                d
            }
            Ok(None) => {
                backoff.succeed();
                continue;
            }
            Err(e) => {
                let delay = backoff.fail(random_u64());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "long-poll failed");
                if !pause(delay, &mut shutdown).await {
                    return WorkerExit::Shutdown;
                }
                continue;
            }
        };
        let rollout_id = dispatch.rollout_id.clone();
        // Known to the records or to the queue (a pruned, finished rollout):
        // a repeat of a dispatch already answered.
        // A rollout Pending after a `busy` refusal is answered again once
        // nothing is live on the host (`Rollouts::answered`).
        let in_records = {
            let rollouts = snapshot.borrow();
            rollouts.get(&rollout_id).map(|_| rollouts.answered(&rollout_id))
        };
        let known = in_records.unwrap_or_else(|| queue.lock().last_seq(&rollout_id) > 0);
        if known {
            if !pause(known_pause, &mut shutdown).await {
                return WorkerExit::Shutdown;
            }
            known_pause = (known_pause * 2).min(KNOWN_DISPATCH_PAUSE_MAX);
            continue;
        }
        known_pause = KNOWN_DISPATCH_PAUSE_MIN;
        let envelope = match api.manifest(&rollout_id).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let delay = backoff.fail(random_u64());
                tracing::warn!(%rollout_id, error = %e, "cannot fetch the rollout's manifest; will retry");
                if !pause(delay, &mut shutdown).await {
                    return WorkerExit::Shutdown;
                }
                continue;
            }
        };
        let at = clock.now();
        let admitted = {
            let rollouts = snapshot.borrow();
            admit(api.hostname(), &cfg.trust_keys, &envelope, &dispatch, &rollouts)
        };
        let input = match admitted {
            Ok(a) => {
                // Kept durably BEFORE the DispatchAck exists, so a restart can
                // always re-verify the policy of a rollout in its queue.
                if let Err(e) = cache.store(&rollout_id, &envelope, &a.verified_by) {
                    tracing::error!(%rollout_id, error = %e, "cannot cache the manifest; not acting on the dispatch");
                    if !pause(backoff.fail(random_u64()), &mut shutdown).await {
                        return WorkerExit::Shutdown;
                    }
                    continue;
                }
                match resolve_current_system(&cfg.current_system) {
                    Ok(current_closure) => Input::Dispatch {
                        rollout_id,
                        policy: a.policy,
                        target_closure: a.target_closure,
                        soak_secs: a.soak_secs,
                        current_closure,
                        issued_at: a.manifest.issued_at,
                        at,
                    },
                    Err(why) => Input::RefuseDispatch {
                        rollout_id,
                        policy: a.policy,
                        target_closure: dispatch.target_closure,
                        reason: format!("cannot tell which closure this host runs (the rollback target): {why}"),
                        at,
                    },
                }
            }
            Err(refusal) => {
                // Nothing verified, so nothing is cached: the refusal is
                // recorded under a conservative policy (it only matters for
                // hosts that activate), which a restart also falls back to.
                Input::RefuseDispatch {
                    rollout_id,
                    policy: Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 },
                    target_closure: dispatch.target_closure,
                    reason: refusal.to_string(),
                    at,
                }
            }
        };
        if inputs.send(input).await.is_err() {
            return WorkerExit::ReducerGone;
        }
    }
}

/// How often the drainer applies the queue's retention (`Queue::prune_acked`):
/// after its first successful drain, then at most this often. Pruning
/// scans the acked index (≤ 10,000 events), so not after every batch.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Delivers pending events in enqueue order, in batches, and moves each to
/// `acked/` or `dead/` by the CP's answer. `retry`, 5xx and network errors
/// keep the event where it is and back off (jitter, cap 60 s). It also
/// applies the queue's retention of `acked/`, every [`PRUNE_EVERY`] after a
/// successful drain.
pub async fn run_drain_worker(
    api: CpApi,
    queue: SharedQueue,
    wake: std::sync::Arc<Notify>,
    interval: Duration,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut backoff = Backoff::new();
    let mut next_prune = tokio::time::Instant::now();
    loop {
        match drain_once(&api, &queue).await {
            Ok(()) => {
                backoff.succeed();
                if tokio::time::Instant::now() >= next_prune {
                    prune(&queue).await;
                    next_prune = tokio::time::Instant::now() + PRUNE_EVERY;
                }
            }
            Err(why) => {
                let delay = backoff.fail(random_u64());
                tracing::warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "delivery paused");
                if !pause(delay, &mut shutdown).await {
                    return WorkerExit::Shutdown;
                }
                continue;
            }
        }
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            () = wake.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Applies the queue's retention of `acked/`; a failure is logged and
/// retried at the next turn (nothing is lost by pruning late).
async fn prune(queue: &SharedQueue) {
    match queue.with(|q| q.prune_acked()).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(acked = n, "queue retention removed old acked rollouts"),
        Ok(Err(e)) => tracing::warn!(error = %e, "queue retention failed; retrying later"),
        Err(e) => tracing::warn!(error = %e, "queue retention failed; retrying later"),
    }
}

/// Sends batches until the queue is empty; Err when delivery must pause.
async fn drain_once(api: &CpApi, queue: &SharedQueue) -> Result<(), String> {
    loop {
        let batch: Vec<QueuedEvent> = queue.lock().pending_head(MAX_BATCH_EVENTS);
        if batch.is_empty() {
            return Ok(());
        }
        let request = EventBatch {
            hostname: api.hostname().clone(),
            events: batch
                .iter()
                .map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event.clone() })
                .collect(),
        };
        let answer = api.post_events(&request).await.map_err(|e| e.to_string())?;
        if answer.results.len() != batch.len() {
            return Err(format!("the CP answered {} results for {} events", answer.results.len(), batch.len()));
        }
        let mut retry = None;
        let mut moves = Vec::new();
        for (queued, result) in batch.iter().zip(answer.results) {
            match result.status {
                ResultStatus::Applied | ResultStatus::Duplicate => moves.push((queued.qseq, None)),
                ResultStatus::Rejected => {
                    let reason = result.reason.unwrap_or_else(|| "rejected without a reason".to_owned());
                    tracing::warn!(qseq = queued.qseq, kind = queued.event.kind(), %reason, "event rejected; dead-lettered");
                    moves.push((queued.qseq, Some(reason)));
                }
                // Interim: a gap keeps the event like a retry; re-sending
                // from `expected_seq` is the drain worker's next change.
                ResultStatus::Retry | ResultStatus::Gap => {
                    // Order is kept: nothing after the first retry moves.
                    retry = Some(result.reason.unwrap_or_else(|| "retry".to_owned()));
                    break;
                }
            }
        }
        queue
            .with(move |q| {
                for (qseq, rejected) in moves {
                    match rejected {
                        None => q.ack(qseq)?,
                        Some(reason) => q.reject(qseq, &reason)?,
                    }
                }
                Ok::<(), crate::queue::QueueError>(())
            })
            .await?
            .map_err(|e| e.to_string())?;
        if let Some(why) = retry {
            return Err(format!("the CP asked to retry: {why}"));
        }
    }
}

/// What the heartbeat reports about the host.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub interval: Duration,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
}

/// Sends liveness and `last_seq` per rollout; re-sends what the CP asks
/// for (Replay-From) from the queue's pending and acked events. It never
/// takes state from the CP.
pub async fn run_heartbeat_worker(
    api: CpApi,
    cfg: HeartbeatConfig,
    queue: SharedQueue,
    started: Instant,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            _ = ticker.tick() => {}
        }
        let Ok(current_closure) = resolve_current_system(&cfg.current_system) else {
            tracing::warn!(path = %cfg.current_system.display(), "cannot resolve current-system; heartbeat skipped");
            continue;
        };
        let hb = Heartbeat {
            hostname: api.hostname().clone(),
            current_closure,
            booted_closure: resolve_current_system(&cfg.booted_system).ok(),
            uptime_secs: started.elapsed().as_secs(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_seq: queue.lock().rollouts().into_iter().collect(),
        };
        match api.heartbeat(&hb).await {
            Ok(answer) => {
                for (rollout_id, after) in answer.replay_from {
                    replay(&api, &queue, &rollout_id, after).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// Re-sends one rollout's events with seq > `after`, in batches.
async fn replay(api: &CpApi, queue: &SharedQueue, rollout_id: &RolloutId, after: u64) {
    let events = queue.lock().events_after(rollout_id, after);
    tracing::info!(%rollout_id, after, n_events = events.len(), "replaying events the control plane lacks");
    for chunk in events.chunks(MAX_BATCH_EVENTS) {
        let batch = EventBatch {
            hostname: api.hostname().clone(),
            events: chunk
                .iter()
                .map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event.clone() })
                .collect(),
        };
        if let Err(e) = api.post_events(&batch).await {
            tracing::warn!(%rollout_id, error = %e, "replay failed; the next heartbeat asks again");
            return;
        }
    }
}
