//! The activation worker: runs the activation the reducer orders and reports
//! what the host can prove afterwards. It exists apart from
//! `agent::activation` (which knows how to activate) because it owns the
//! runtime questions: which order is new, whether a switch already
//! happened before a restart, and how outcomes reach the reducer.
//!
//! Restart rule (a restarted agent reports the outcome it can prove): a
//! restarted reducer re-issues the order of an unfinished activation or
//! rollback. Before running any order the worker asks whether the host
//! already runs the order's closure: if BOTH `current-system` and the system
//! profile resolve to it, the switch already happened (typically a switch
//! that restarted the agent and then completed), so it reports `Completed`
//! without switching again. The profile is part of the proof because the
//! forward activation points it at the new closure before switching: after
//! a forward switch that failed early, `current-system` still names the
//! rollback target while the profile (the next boot's default) names the
//! failed closure, and skipping the rollback would boot the failed closure
//! at the next reboot.
//!
//! Shutdown: a request stops the wait for new orders, but an activation in
//! progress is awaited to its end and its outcome reported, because the
//! reducer can only record what it is told. If the runtime's grace period
//! runs out first and it drops this worker, the switch itself keeps running
//! (it is detached: `systemd-run` or `setsid`, and its child handle does not
//! kill on drop), while `nix-store`/`nix-env` are killed, which is safe:
//! both are idempotent and re-run after the restart, whose worker then
//! observes or repeats the switch by the rule above.

use tokio::sync::{mpsc, oneshot, watch};

use super::{Shutdown, WorkerExit};
use crate::agent::activation::{
    activate, resolve_current_system, restore_boot_default, sanitize_activation_id, ActivationConfig,
    ActivationOutcome, ActivationRequest, Direction, RestoreOutcome, MAX_ACTIVATION_ID_LEN,
};
use crate::agent::reducer::{ActivationOrder, Input};
use crate::clock::ClockHandle;
use crate::ids::{Closure, RolloutId};

/// Random bytes in each activation id: the rollout id and the order
/// number repeat after a restart (order numbers restart at 1), and a
/// re-run must never reuse the name of a systemd unit that may still be
/// running. 4 bytes (8 hex digits) make a collision between the few
/// activations of one rollout negligible while keeping unit names short.
pub const ACTIVATION_NONCE_BYTES: usize = 4;

/// Runs activation orders until shutdown or until the reducer is gone.
///
/// Each order is run once: orders are told apart by their `number`, and
/// an order whose number was already run (or is older) is ignored. An
/// order present when the worker starts (a restarted reducer's `resume`) is
/// run at once.
pub async fn run_activation_worker(
    cfg: ActivationConfig,
    mut orders: watch::Receiver<Option<ActivationOrder>>,
    inputs: mpsc::Sender<Input>,
    clock: ClockHandle,
    mut shutdown: Shutdown,
) -> WorkerExit {
    let mut last_order: Option<u64> = None;
    loop {
        if shutdown.is_requested() {
            return WorkerExit::Shutdown;
        }
        let order = orders.borrow_and_update().clone();
        if let Some(order) = order.filter(|o| last_order.is_none_or(|done| o.number > done)) {
            last_order = Some(order.number);
            if let Err(exit) = execute(&cfg, order, &inputs, &clock).await {
                return exit;
            }
            // Look again: an order may have replaced this one meanwhile.
            continue;
        }
        tokio::select! {
            biased;
            () = shutdown.requested() => return WorkerExit::Shutdown,
            changed = orders.changed() => {
                if changed.is_err() {
                    return WorkerExit::ReducerGone;
                }
            }
        }
    }
}

/// Runs (or observes) one order and reports it.
async fn execute(
    cfg: &ActivationConfig,
    order: ActivationOrder,
    inputs: &mpsc::Sender<Input>,
    clock: &ClockHandle,
) -> Result<(), WorkerExit> {
    let rollout_id = order.rollout_id.clone();
    if let Some(failed) = &order.restore_boot_from {
        let id = activation_id(&rollout_id, order.number, &nonce(clock));
        match restore_boot_default(cfg, &order.closure, failed, &id).await {
            RestoreOutcome::Restored => {
                tracing::info!(%rollout_id, closure = %order.closure, "the pre-dispatch closure is the boot default again");
            }
            RestoreOutcome::Skipped { why } => tracing::info!(%rollout_id, %why, "boot default left as it is"),
            RestoreOutcome::Failed { exit_code, stderr_tail } => tracing::error!(
                %rollout_id, closure = %order.closure, exit_code, %stderr_tail,
                "cannot make the pre-dispatch closure the boot default; the next reboot may boot the failed closure"
            ),
        }
        return Ok(());
    }
    let direction = if order.rollback { Direction::Rollback } else { Direction::Forward };
    let outcome = if let Some(observed) = already_running(cfg, &order.closure) {
        tracing::info!(
            %rollout_id, closure = %order.closure, rollback = order.rollback,
            "the host already runs the ordered closure (current-system and profile); reporting it without switching"
        );
        ActivationOutcome::Completed { observed }
    } else {
        let activation_id = activation_id(&rollout_id, order.number, &nonce(clock));
        tracing::info!(%rollout_id, closure = %order.closure, rollback = order.rollback, %activation_id, "activating");
        let request = ActivationRequest { closure: order.closure.clone(), direction, activation_id };
        // `on_started` is a plain callback called before any program runs;
        // the send to the reducer is awaited next to the activation, so a
        // full input channel delays the report, never the switch.
        let (started_tx, started_rx) = oneshot::channel();
        let started_clock = clock.clone();
        let activation = activate(cfg, &request, move |started| {
            let _ = started_tx.send((started, started_clock.now()));
        });
        let report_started = async {
            match started_rx.await {
                // ActivationStarted is illegal from Failed: forward only.
                Ok((started, at)) if direction == Direction::Forward => {
                    let input = Input::ActivationStarted {
                        rollout_id: rollout_id.clone(),
                        switch_method: started.switch_method,
                        at,
                    };
                    inputs.send(input).await.map_err(|_| WorkerExit::ReducerGone)
                }
                _ => Ok(()),
            }
        };
        let (outcome, reported) = tokio::join!(activation, report_started);
        reported?;
        outcome
    };
    match &outcome {
        ActivationOutcome::Failed { exit_code, .. } => tracing::warn!(%rollout_id, exit_code, "activation failed"),
        other => tracing::info!(%rollout_id, outcome = ?other, "activation finished"),
    }
    let finished = Input::ActivationFinished { rollout_id, order, outcome, at: clock.now() };
    inputs.send(finished).await.map_err(|_| WorkerExit::ReducerGone)
}

/// `Some(closure)` when both `current-system` and the system profile
/// resolve to `closure`: the switch to it already happened.
fn already_running(cfg: &ActivationConfig, closure: &Closure) -> Option<Closure> {
    let current = resolve_current_system(&cfg.current_system).ok()?;
    let profile = resolve_current_system(&cfg.profile).ok()?;
    (&current == closure && &profile == closure).then_some(current)
}

/// Hex digits that make this activation's id unique across restarts.
fn nonce(clock: &ClockHandle) -> String {
    let mut bytes = [0u8; ACTIVATION_NONCE_BYTES];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness (not expected on Linux): the time still differs
        // between a run and its re-run after a restart.
        let nanos = clock.now().unix_timestamp_nanos().to_le_bytes();
        bytes.copy_from_slice(&nanos[..ACTIVATION_NONCE_BYTES]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<rollout>-g<order number>-<nonce>` (`g` kept from older unit names), cut to [`MAX_ACTIVATION_ID_LEN`] by
/// shortening the rollout part, so the unique tail always survives.
pub fn activation_id(rollout_id: &RolloutId, order_number: u64, nonce: &str) -> String {
    let tail = sanitize_activation_id(&format!("-g{order_number}-{nonce}"));
    let room = MAX_ACTIVATION_ID_LEN.saturating_sub(tail.len());
    let head: String = sanitize_activation_id(rollout_id.as_str()).chars().take(room).collect();
    format!("{head}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_ids_keep_their_unique_tail_when_the_rollout_id_is_long() {
        // Proves a long rollout id cannot push the order number and nonce out of the unit name.
        let short = RolloutId::parse("stable@r1").expect("valid");
        assert_eq!(activation_id(&short, 3, "0a1b2c3d"), "stable_r1-g3-0a1b2c3d");
        let long = RolloutId::parse(&format!("stable@{}", "x".repeat(100))).expect("valid");
        let id = activation_id(&long, 12, "0a1b2c3d");
        assert_eq!(id.len(), MAX_ACTIVATION_ID_LEN);
        assert!(id.ends_with("-g12-0a1b2c3d"), "{id}");
        assert_eq!(sanitize_activation_id(&id), id, "already a safe unit name");
        let clock = ClockHandle::system();
        assert_ne!(nonce(&clock), nonce(&clock), "a re-run gets a fresh id");
        assert_eq!(nonce(&clock).len(), 2 * ACTIVATION_NONCE_BYTES);
    }
}
