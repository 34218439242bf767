//! The agent's one mutator: a task that owns [`Rollouts`], is the only
//! caller of `step`, and turns worker inputs into durable events and then
//! into commands.
//!
//! Why it is shaped this way:
//! - Inputs arrive on ONE bounded channel ([`INPUT_CAPACITY`]); workers wait
//!   when the reducer is behind, so memory is bounded and order is kept.
//! - Outgoing commands never block the reducer: the activation order and
//!   the probe plan are `watch` channels (latest value wins; there is only ever
//!   one activation and one probe plan that matter) and the drainer is woken
//!   with a `Notify`. A bounded command channel would deadlock: full while its
//!   worker waits on the reducer, with the reducer waiting on it.
//! - Write-ahead: an event is appended to the journal (the on-disk queue)
//!   before the record changes and before any command is sent. When the
//!   append fails (disk full, I/O error) the reducer keeps the input and
//!   retries with backoff, reporting each failure; state never advances
//!   past the journal and no event is dropped with a log line.
//!
//! Parts: this file, the reducer; `journal`, the [`Journal`] it writes
//! ahead to; `messages`, its inputs and commands; `dispatch`, the decision
//! on a dispatch (accept, or refuse `busy` / `stale` / future-dated).

use std::time::Duration as StdDuration;

use tokio::sync::{mpsc, watch};

use super::activation::ActivationOutcome;
use super::channels::ChannelHistory;
use super::rollouts::{forward_body, rollback_body, Prepared, Rollouts, RolloutsError};
use crate::ids::{Closure, RolloutId};
use crate::machine::{Effect, EventBody, HostState, ProbeDecl, ProbeMode, ProbeStatus, Timestamp};
use crate::sdnotify::Watchdog;
use crate::wire::OutboundEvent;

mod dispatch;
mod journal;
mod messages;
#[cfg(test)]
mod tests;

pub(crate) use journal::deferrable;
pub use journal::{Journal, JournalError};
pub use messages::{commands, ActivationOrder, CommandReceivers, Commands, Input, ProbePlan};

/// Reducer input queue. Inputs are small and produced by a handful of
/// workers (probes at ≥ 1 s intervals, one activation, ticks every 5 s): 64
/// absorbs a burst of every probe reporting at once while keeping a stuck
/// reducer visible quickly (workers then wait in `send`).
pub const INPUT_CAPACITY: usize = 64;
/// First retry delay after a failed journal append.
pub const MIN_JOURNAL_RETRY_DELAY: StdDuration = StdDuration::from_millis(100);
/// Cap of the exponential journal retry: a full disk is not fixed in
/// milliseconds, and a 10 s cap keeps the log readable while recovering
/// within seconds once space returns.
pub const MAX_JOURNAL_RETRY_DELAY: StdDuration = StdDuration::from_secs(10);

/// The reducer state: records, journal, command senders.
#[derive(Debug)]
pub struct Reducer<J> {
    rollouts: Rollouts,
    journal: J,
    commands: Commands,
    /// The number of the last activation order or probe plan issued.
    orders_issued: u64,
    snapshot: watch::Sender<Rollouts>,
    /// A topology that could not be journaled (queue full): the probe
    /// worker declares once per plan, so the reducer owes it and retries it
    /// on every tick; without it the host could neither converge nor fail.
    owed_topology: Option<(RolloutId, Vec<ProbeDecl>, Timestamp)>,
}

impl<J: Journal> Reducer<J> {
    /// `rollouts` is the state rebuilt from the journal at start. Returns the
    /// reducer and a read-only snapshot channel (heartbeat `last_seq`,
    /// status) that is updated after every commit.
    pub fn new(rollouts: Rollouts, journal: J, commands: Commands) -> (Reducer<J>, watch::Receiver<Rollouts>) {
        let (snapshot, snapshot_rx) = watch::channel(rollouts.clone());
        (Reducer { rollouts, journal, commands, orders_issued: 0, snapshot, owed_topology: None }, snapshot_rx)
    }

    pub fn rollouts(&self) -> &Rollouts {
        &self.rollouts
    }

    /// Re-issues the commands a restarted agent owes: the probe plan of a
    /// Soaking rollout and the activation order of an unfinished activation or
    /// rollback (the activation worker checks `current-system` first, so a
    /// switch that already happened is only observed, not repeated).
    pub fn resume(&mut self) {
        for (id, _) in self.rollouts.iter().filter(|(_, s)| s.is_live()) {
            if let Some(later) = self.rollouts.accepted_after(id) {
                tracing::error!(
                    rollout_id = %id, accepted_later = %later,
                    "rollout is still live in the journal but a later rollout was accepted (a journal from before the one-live-rollout rule); it will not act again"
                );
            }
        }
        let soaking: Vec<RolloutId> = self
            .rollouts
            .iter()
            .filter(|(id, s)| s.record.state == HostState::Soaking && self.rollouts.accepted_after(id).is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in soaking {
            self.plan_probes(Some(id));
        }
        for (id, state) in self.rollouts.unfinished_activations() {
            let Some(slot) = self.rollouts.get(&id) else { continue };
            let (closure, rollback) = match state {
                HostState::Activating | HostState::Deferred => (slot.record.target_closure.clone(), false),
                _ => (slot.record.current_closure_at_dispatch.clone(), true),
            };
            if let Some(closure) = closure {
                self.order_activation(id, closure, rollback);
            }
        }
        // A halted failure whose boot default may not be restored yet (the
        // agent died in between): only the rollout accepted last, so a
        // later rollout's profile is never touched; the worker checks that
        // the profile still names the failed closure.
        let last = self
            .rollouts
            .iter()
            .filter(|(_, s)| s.record.dispatch_acked_at.is_some())
            .max_by_key(|(id, s)| (s.record.dispatch_acked_at, *id))
            .map(|(id, _)| id.clone());
        if let Some(id) = last {
            self.restore_boot_if_halted(&id);
        }
    }

    /// Runs until every input sender is dropped.
    pub async fn run(self, inputs: mpsc::Receiver<Input>) {
        self.run_pinging(inputs, Watchdog::disabled()).await;
    }

    /// [`Reducer::run`], pinging `watchdog` after every input (throttled):
    /// a wedged reducer stops the pings. The tick worker is the idle wake-up.
    pub async fn run_pinging(mut self, mut inputs: mpsc::Receiver<Input>, mut watchdog: Watchdog) {
        while let Some(input) = inputs.recv().await {
            self.handle(input).await;
            watchdog.ping();
        }
        tracing::info!("reducer stopped: all inputs closed");
    }

    /// Handles one input completely: every event it implies is journaled,
    /// committed and acted upon before the next input is read.
    pub async fn handle(&mut self, input: Input) {
        match input {
            dispatch @ Input::Dispatch { .. } => self.dispatch(dispatch).await,
            Input::RefuseDispatch { rollout_id, policy, target_closure, reason, at } => {
                self.refuse_dispatch(rollout_id, policy, target_closure, reason, at).await;
            }
            Input::ActivationStarted { rollout_id, switch_method, at } => {
                if self.state(&rollout_id) == Some(HostState::Activating) {
                    self.feed(&rollout_id, EventBody::ActivationStarted { started_at: at, switch_method }).await;
                }
            }
            Input::ActivationFinished { rollout_id, order, outcome, at } => {
                self.activation_finished(rollout_id, order, outcome, at).await;
            }
            Input::ProbeTopology { rollout_id, probes, at } => self.declare_topology(rollout_id, probes, at).await,
            Input::ProbeRun { rollout_id, probe_name, mode, status, reason, at } => {
                self.probe_run(&rollout_id, &probe_name, mode, (status, reason), at).await;
            }
            Input::Tick { now } => self.tick(now).await,
        }
    }

    async fn activation_finished(
        &mut self,
        rollout_id: RolloutId,
        order: ActivationOrder,
        outcome: ActivationOutcome,
        at: Timestamp,
    ) {
        let still_deferred = matches!(outcome, ActivationOutcome::Deferred { .. })
            && self.state(&rollout_id) == Some(HostState::Deferred);
        if still_deferred && !order.rollback {
            // A restart before the reboot re-ran the boot setup (it is
            // idempotent); the host already reported Deferred.
            tracing::info!(%rollout_id, closure = %order.closure, "still waiting for a reboot into the deferred closure");
            return;
        }
        let body = if order.rollback { rollback_body(&order.closure, outcome, at) } else { forward_body(outcome, at) };
        self.feed(&rollout_id, body).await;
    }

    async fn probe_run(
        &mut self,
        rollout_id: &RolloutId,
        probe_name: &str,
        mode: ProbeMode,
        (status, reason): (ProbeStatus, Option<String>),
        at: Timestamp,
    ) {
        if self.state(rollout_id) != Some(HostState::Soaking) || self.rollouts.accepted_after(rollout_id).is_some() {
            return; // a result that raced the end of the soak
        }
        for body in self.rollouts.observe_probe(rollout_id, probe_name, mode, status, reason, at) {
            if !self.feed(rollout_id, body).await {
                break; // queue full: the next run of the probe tries again
            }
        }
        if let Some(start) = self.rollouts.failure_clock_start(rollout_id) {
            self.feed(rollout_id, start).await;
        }
        let failing = (mode == ProbeMode::Enforce && status == ProbeStatus::Fail).then_some(at);
        self.rollouts.note_failure_clock(rollout_id, failing);
    }

    async fn tick(&mut self, now: Timestamp) {
        if let Some((rollout_id, probes, at)) = self.owed_topology.take() {
            self.declare_topology(rollout_id, probes, at).await;
        }
        for (rollout_id, body) in self.rollouts.due(now) {
            self.feed(&rollout_id, body).await;
        }
    }

    async fn declare_topology(&mut self, rollout_id: RolloutId, probes: Vec<ProbeDecl>, at: Timestamp) {
        if self.state(&rollout_id) != Some(HostState::Soaking) {
            return;
        }
        let body = EventBody::ProbeTopologyDeclared { probes: probes.clone(), declared_at: at };
        if self.feed(&rollout_id, body).await {
            self.rollouts.note_failure_clock(&rollout_id, None);
        } else {
            self.owed_topology = Some((rollout_id, probes, at));
        }
    }

    pub(super) async fn save_channels_until_durable(&mut self, channels: &ChannelHistory) {
        let mut delay = MIN_JOURNAL_RETRY_DELAY;
        loop {
            let saved = self.journal.save_channels(channels).await;
            match saved {
                Ok(Ok(())) => return,
                Ok(Err(error)) => {
                    tracing::error!(
                        %error, retry_in_ms = delay.as_millis() as u64,
                        "cannot make the accepted-channels file durable; the dispatch waits until it is"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_JOURNAL_RETRY_DELAY);
                }
                Err(error) => {
                    tracing::error!(
                        %error, retry_in_ms = delay.as_millis() as u64,
                        "the task saving the accepted-channels file failed; the dispatch waits until it is saved"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_JOURNAL_RETRY_DELAY);
                }
            }
        }
    }

    pub(super) fn state(&self, rollout_id: &RolloutId) -> Option<HostState> {
        self.rollouts.get(rollout_id).map(|s| s.record.state)
    }

    /// prepare → journal (retried until durable) → commit → act. Returns
    /// whether the event was committed: false when the state machine
    /// refused it, or when a deferrable (visibility) event met a full queue.
    pub(super) async fn feed(&mut self, rollout_id: &RolloutId, body: EventBody) -> bool {
        let prepared = match self.rollouts.prepare(rollout_id, body) {
            Ok(p) => p,
            Err(RolloutsError::Transition(e)) => {
                // The agent's own input was illegal for its record: nothing
                // was emitted, so there is nothing to lose; say why.
                tracing::warn!(%rollout_id, error = %e, "input refused by the state machine");
                return false;
            }
            Err(e) => {
                tracing::warn!(%rollout_id, error = %e, "input for an unknown rollout ignored");
                return false;
            }
        };
        let outbound = OutboundEvent::from_machine(prepared.event.seq, &prepared.event.body);
        if !self.append_until_durable(rollout_id, &outbound, deferrable(&prepared.event.body)).await {
            return false;
        }
        self.commands.drain.notify_one();
        self.apply(prepared);
        true
    }

    /// Appends until durable; false only for a deferrable event that met a
    /// full queue (nothing written, nothing to commit).
    async fn append_until_durable(
        &mut self,
        rollout_id: &RolloutId,
        outbound: &OutboundEvent,
        deferrable: bool,
    ) -> bool {
        let mut delay = MIN_JOURNAL_RETRY_DELAY;
        loop {
            match self.journal.append(rollout_id, outbound).await {
                Ok(()) => return true,
                Err(JournalError::Full(error)) if deferrable => {
                    tracing::warn!(
                        %rollout_id, seq = outbound.seq, kind = outbound.kind(), %error,
                        "queue full: this visibility event waits for the next observation; decisions still go through"
                    );
                    return false;
                }
                Err(error) => {
                    tracing::error!(
                        %rollout_id, seq = outbound.seq, kind = outbound.kind(), %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot make the event durable; the host's state will not advance until it is"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_JOURNAL_RETRY_DELAY);
                }
            }
        }
    }

    fn apply(&mut self, prepared: Prepared) {
        let rollout_id = prepared.rollout_id.clone();
        let actions: Vec<Effect> = prepared.actions().cloned().collect();
        let activation_ended =
            matches!(prepared.event.body, EventBody::ActivationFailed { .. } | EventBody::ActivationCompleted { .. });
        if let Err(e) = self.rollouts.commit(prepared) {
            // Unreachable with one mutator; keep the journal authoritative.
            tracing::error!(%rollout_id, error = %e, "commit refused after a durable append");
            return;
        }
        for effect in actions {
            match effect {
                Effect::RecordTransition { from, to, at } => {
                    tracing::info!(%rollout_id, %from, %to, %at, "host state changed");
                }
                Effect::FireActivation { target } => self.order_activation(rollout_id.clone(), target, false),
                Effect::FireRollback { to } => self.order_activation(rollout_id.clone(), to, true),
                Effect::ResetProbes => self.plan_probes(Some(rollout_id.clone())),
                Effect::EmitOutbound { .. } | Effect::AppendEventLog { .. } | Effect::InsertQuarantine { .. } => {}
            }
        }
        if activation_ended {
            self.restore_boot_if_halted(&rollout_id);
        }
        if let Some(state) = self.state(&rollout_id) {
            if matches!(state, HostState::Converged | HostState::Failed | HostState::Reverted) {
                let current = self.commands.probes.borrow().rollout_id.clone();
                if current.as_ref() == Some(&rollout_id) {
                    self.plan_probes(None);
                }
            }
        }
        // Publish only the slot that changed: cloning every record of every
        // rollout on each probe result would grow with the agent's history.
        if let Some(slot) = self.rollouts.get(&rollout_id).cloned() {
            self.snapshot.send_modify(|snap| snap.set(rollout_id.clone(), slot));
        }
    }

    fn next_order_number(&mut self) -> u64 {
        self.orders_issued += 1;
        self.orders_issued
    }

    fn order_activation(&mut self, rollout_id: RolloutId, closure: Closure, rollback: bool) {
        let number = self.next_order_number();
        let order = ActivationOrder { rollout_id, closure, rollback, number, restore_boot_from: None };
        self.commands.activation.send_replace(Some(order));
    }

    /// Under `halt` a failed forward activation leaves the profile (and the
    /// boot loader) on the failed closure; the next reboot would boot it.
    /// Orders the pre-dispatch closure back as the boot default (no switch).
    fn restore_boot_if_halted(&mut self, rollout_id: &RolloutId) {
        let Some(slot) = self.rollouts.get(rollout_id) else { return };
        let r = &slot.record;
        let failed_activation = matches!(
            r.failure,
            Some(crate::machine::Failure::ActivationFailed { .. } | crate::machine::Failure::WrongClosure { .. })
        );
        if r.state != HostState::Failed || r.rollback_fired || !failed_activation {
            return;
        }
        let (Some(previous), Some(failed)) = (r.current_closure_at_dispatch.clone(), r.target_closure.clone()) else {
            return;
        };
        tracing::info!(%rollout_id, %previous, %failed, "halt: making the pre-dispatch closure the boot default again");
        let number = self.next_order_number();
        let order = ActivationOrder {
            rollout_id: rollout_id.clone(),
            closure: previous,
            rollback: false,
            number,
            restore_boot_from: Some(failed),
        };
        self.commands.activation.send_replace(Some(order));
    }

    fn plan_probes(&mut self, rollout_id: Option<RolloutId>) {
        let number = self.next_order_number();
        self.commands.probes.send_replace(ProbePlan { rollout_id, number });
    }
}
