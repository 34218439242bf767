//! The long-poll worker: dispatches in. Each dispatch is verified with
//! this host's trust keys and handed to the reducer as a Dispatch or a
//! refusal.

use std::path::PathBuf;
use std::time::Duration;

use hyper::StatusCode;
use tokio::sync::{mpsc, watch};

use super::super::{Shutdown, WorkerExit};
use super::{pause, random_u64};
use crate::agent::activation::resolve_current_system;
use crate::agent::admission::{admit, Admitted, Refusal};
use crate::agent::backoff::Backoff;
use crate::agent::journal::{ManifestCache, SharedQueue};
use crate::agent::net::CpApi;
use crate::agent::reducer::Input;
use crate::agent::rollouts::Rollouts;
use crate::client::ClientError;
use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{OnHealthFailure, Policy};
use crate::sign::PublicKey;
use crate::wire::Dispatch;
use time::OffsetDateTime;

/// After a dispatch for a rollout this host already handles (the CP repeats
/// it until our DispatchAck is applied, normally a few milliseconds later)
/// the next poll waits this long, doubling while the repeats go on up to
/// [`MAX_KNOWN_DISPATCH_PAUSE`]: quick to see the next rollout, and bounded
/// load if the CP never applies the ack (e.g. it rejected it).
pub const MIN_KNOWN_DISPATCH_PAUSE: Duration = Duration::from_millis(20);
pub const MAX_KNOWN_DISPATCH_PAUSE: Duration = Duration::from_secs(5);
/// After the CP answered a long-poll 409 `longpoll_replaced` (a newer
/// long-poll for this host took its place), the next poll waits this long:
/// no error backoff, and two agents sharing one identity cost each other
/// at most a poll a second instead of a tight replace loop.
pub const REPLACED_PAUSE: Duration = Duration::from_secs(1);

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
    let mut known_pause = MIN_KNOWN_DISPATCH_PAUSE;
    let mut replaced = Replaced::default();
    loop {
        let polled = tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            r = api.dispatch(cfg.wait_secs) => r,
        };
        if polled.is_ok() {
            replaced.answered(api.hostname());
        }
        // Each case either goes on to the next step or says how long to
        // wait before polling again.
        let wait = match polled {
            Ok(None) => {
                backoff.succeed();
                continue;
            }
            Err(e) if is_replaced(&e) => {
                replaced.replaced(api.hostname());
                Some(REPLACED_PAUSE)
            }
            Err(e) => {
                let delay = backoff.fail(random_u64());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "long-poll failed");
                Some(delay)
            }
            Ok(Some(dispatch)) => {
                backoff.succeed();
                if already_answered(&snapshot, &queue, &dispatch.rollout_id) {
                    let wait = known_pause;
                    known_pause = (known_pause * 2).min(MAX_KNOWN_DISPATCH_PAUSE);
                    Some(wait)
                } else {
                    known_pause = MIN_KNOWN_DISPATCH_PAUSE;
                    match judge_dispatch(&api, &cfg, &cache, &snapshot, &clock, dispatch).await {
                        Ok(input) => {
                            if inputs.send(input).await.is_err() {
                                return WorkerExit::ReducerGone;
                            }
                            None
                        }
                        Err(NotJudged) => Some(backoff.fail(random_u64())),
                    }
                }
            }
        };
        if let Some(wait) = wait {
            if !pause(wait, &mut shutdown).await {
                return WorkerExit::Shutdown;
            }
        }
    }
}

/// Whether the CP answered 409 `longpoll_replaced`: another long-poll for
/// this host took this one's place. Not an error of this agent or of the
/// network, so it is not backed off like one.
fn is_replaced(e: &ClientError) -> bool {
    matches!(e, ClientError::Status { status, code, .. } if *status == StatusCode::CONFLICT && code == "longpoll_replaced")
}

/// A run of long-polls answered `longpoll_replaced`, logged once when it
/// starts and once when a poll is answered again.
#[derive(Debug, Default)]
struct Replaced {
    /// Polls replaced since the last one answered.
    count: u64,
}

impl Replaced {
    fn replaced(&mut self, host: &Hostname) {
        if self.count == 0 {
            tracing::warn!(
                hostname = %host,
                "the control plane answered this long-poll 409 longpoll_replaced: a newer long-poll for this host \
                 took its place. Most likely a second agent runs with this host's identity (the same hostname \
                 and certificate on two machines, or two agents on one); else a reconnect raced with the previous \
                 poll. Polling again every second; this is logged once until a poll is answered"
            );
        } else {
            tracing::debug!(hostname = %host, replaced = self.count + 1, "long-poll replaced again");
        }
        self.count += 1;
    }

    fn answered(&mut self, host: &Hostname) {
        if self.count > 0 {
            tracing::info!(hostname = %host, replaced = self.count, "long-poll answered again after being replaced");
            self.count = 0;
        }
    }
}

/// Whether a dispatch repeats one already answered: its rollout is known to
/// the records or to the queue (a pruned, finished rollout). A rollout
/// Pending after a `busy` refusal is answered again once nothing is live on
/// the host (`Rollouts::answered`).
fn already_answered(snapshot: &watch::Receiver<Rollouts>, queue: &SharedQueue, rollout_id: &RolloutId) -> bool {
    let in_records = {
        let rollouts = snapshot.borrow();
        rollouts.get(rollout_id).map(|_| rollouts.answered(rollout_id))
    };
    in_records.unwrap_or_else(|| queue.last_seq(rollout_id) > 0)
}

/// A new dispatch could not be judged this time (the manifest could not be
/// fetched or cached; the cause is logged): back off and poll again.
struct NotJudged;

/// Fetches the rollout's manifest and judges the dispatch: the reducer's
/// Dispatch when it is admitted (and the manifest is cached), its refusal
/// otherwise.
async fn judge_dispatch(
    api: &CpApi,
    cfg: &LongPollConfig,
    cache: &ManifestCache,
    snapshot: &watch::Receiver<Rollouts>,
    clock: &ClockHandle,
    dispatch: Dispatch,
) -> Result<Input, NotJudged> {
    let rollout_id = dispatch.rollout_id.clone();
    let envelope = match api.manifest(&rollout_id).await {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(%rollout_id, error = %e, "cannot fetch the rollout's manifest; will retry");
            return Err(NotJudged);
        }
    };
    let at = clock.now();
    let admitted = {
        let rollouts = snapshot.borrow();
        admit(api.hostname(), &cfg.trust_keys, &envelope, &dispatch, &rollouts)
    };
    match admitted {
        Ok(a) => {
            // Kept durably BEFORE the DispatchAck exists, so a restart can
            // always re-verify the policy of a rollout in its queue.
            if let Err(e) = cache.store(&rollout_id, &envelope, &a.verified_by) {
                tracing::error!(%rollout_id, error = %e, "cannot cache the manifest; not acting on the dispatch");
                return Err(NotJudged);
            }
            Ok(admitted_input(&cfg.current_system, rollout_id, a, dispatch, at))
        }
        Err(refusal) => Ok(refused_input(rollout_id, dispatch, &refusal, at)),
    }
}

/// The Dispatch for an admitted rollout, or its refusal when this host
/// cannot tell which closure it runs (the rollback target).
fn admitted_input(
    current_system: &std::path::Path,
    rollout_id: RolloutId,
    a: Admitted,
    dispatch: Dispatch,
    at: OffsetDateTime,
) -> Input {
    match resolve_current_system(current_system) {
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

/// The refusal of a dispatch that was not admitted. Nothing verified, so
/// nothing is cached: the refusal is recorded under a conservative policy
/// (it only matters for hosts that activate), which a restart also falls
/// back to.
fn refused_input(rollout_id: RolloutId, dispatch: Dispatch, refusal: &Refusal, at: OffsetDateTime) -> Input {
    Input::RefuseDispatch {
        rollout_id,
        policy: Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 },
        target_closure: dispatch.target_closure,
        reason: refusal.to_string(),
        at,
    }
}
