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

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tokio::sync::{mpsc, watch, Notify};

use super::activation::ActivationOutcome;
use super::channels::{Accepted, AcceptedDispatch, ChannelHistory};
use super::rollouts::{forward_body, rollback_body, Prepared, Rollouts, RolloutsError};
use crate::ids::{Closure, RolloutId};
use crate::machine::{Effect, EventBody, HostState, Policy, ProbeDecl, ProbeMode, ProbeStatus, RejectCode, Timestamp};
use crate::wire::{OutboundEvent, MAX_CLOCK_SKEW};

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

/// Why an append did not make the event durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The queue holds as many pending events as it takes for this kind
    /// (`queue::QueueError::Full`): nothing was written. For a visibility
    /// event the reducer drops the attempt and tries again with the next
    /// observation; a decisive event is retried until it fits (the queue
    /// keeps a reserve for decisive events past its soft cap).
    #[error("{0}")]
    Full(String),
    /// Anything else (disk full, I/O error): retried with backoff.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for JournalError {
    fn from(message: String) -> JournalError {
        JournalError::Failed(message)
    }
}

/// Where the reducer makes an event durable. The agent's queue implements
/// it (its fsyncs run on the blocking pool, off the reactor); tests use an
/// in-memory journal that can be told to fail.
pub trait Journal: Send + std::fmt::Debug + 'static {
    /// Resolves only once the event is durable.
    fn append(
        &mut self,
        rollout_id: &RolloutId,
        event: &OutboundEvent,
    ) -> impl std::future::Future<Output = Result<(), JournalError>> + Send;

    /// Makes the no-downgrade history durable (before the DispatchAck that
    /// accepts a rollout). Default: [`ChannelHistory::save`] on the
    /// blocking pool, the daemon's file. Seam for `nixfleet sim`, whose
    /// agents keep the history in memory and have no blocking pool.
    fn save_channels(
        &mut self,
        channels: &ChannelHistory,
    ) -> impl std::future::Future<Output = Result<std::io::Result<()>, tokio::task::JoinError>> + Send {
        let copy = channels.clone();
        tokio::task::spawn_blocking(move || copy.save())
    }
}

/// Events that only make the host visible, never decide anything: under a
/// full queue they are not retried in a loop (that would block every
/// decision behind them) but attempted again later. The same list is the
/// queue's "not decisive" set for its reserve.
fn deferrable(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::ProbeResult { .. }
            | EventBody::ProbeObservedFirst { .. }
            | EventBody::ActivationStarted { .. }
            | EventBody::ProbeTopologyDeclared { .. }
    )
}

/// What the workers tell the reducer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A dispatch whose manifest verified against the agent's trust keys
    /// and whose target matches the manifest. `current_closure` is what
    /// `current-system` resolved to when it was accepted; `issued_at` is the
    /// verified manifest's (no downgrade, clock-skew bound). The reducer
    /// still decides: accept, or refuse `busy` / `stale` / future-dated.
    Dispatch {
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        soak_secs: u64,
        current_closure: Closure,
        issued_at: Timestamp,
        at: Timestamp,
    },
    /// A dispatch the agent refuses (signature, mismatch, quarantine).
    RefuseDispatch {
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        reason: String,
        at: Timestamp,
    },
    ActivationStarted {
        rollout_id: RolloutId,
        switch_method: String,
        at: Timestamp,
    },
    ActivationFinished {
        rollout_id: RolloutId,
        order: ActivationOrder,
        outcome: ActivationOutcome,
        at: Timestamp,
    },
    ProbeTopology {
        rollout_id: RolloutId,
        probes: Vec<ProbeDecl>,
        at: Timestamp,
    },
    ProbeRun {
        rollout_id: RolloutId,
        probe_name: String,
        mode: ProbeMode,
        status: ProbeStatus,
        reason: Option<String>,
        at: Timestamp,
    },
    Tick {
        now: Timestamp,
    },
}

/// The one activation (forward or rollback) the activation worker should
/// run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationOrder {
    pub rollout_id: RolloutId,
    pub closure: Closure,
    pub rollback: bool,
    /// Increases with every order (and probe plan), so a worker can tell a
    /// new order from a repeated one. Not a NixOS profile generation.
    pub number: u64,
    /// `Some(failed)`: not an activation. After a forward activation failed
    /// under `halt`, make `closure` (the pre-dispatch closure) the boot
    /// default again, while the profile still names `failed`; no live
    /// switch and no event (`activation::restore_boot_default`).
    pub restore_boot_from: Option<Closure>,
}

/// Which rollout's probes should run (the newly active system's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbePlan {
    pub rollout_id: Option<RolloutId>,
    /// From the same counter as [`ActivationOrder::number`].
    pub number: u64,
}

/// The command side of the reducer; none of these can block it.
#[derive(Debug, Clone)]
pub struct Commands {
    pub activation: watch::Sender<Option<ActivationOrder>>,
    pub probes: watch::Sender<ProbePlan>,
    pub drain: Arc<Notify>,
}

/// The receiving ends, handed to the workers.
#[derive(Debug)]
pub struct CommandReceivers {
    pub activation: watch::Receiver<Option<ActivationOrder>>,
    pub probes: watch::Receiver<ProbePlan>,
    pub drain: Arc<Notify>,
}

pub fn commands() -> (Commands, CommandReceivers) {
    let (activation_tx, activation_rx) = watch::channel(None);
    let (probes_tx, probes_rx) = watch::channel(ProbePlan::default());
    let drain = Arc::new(Notify::new());
    (
        Commands { activation: activation_tx, probes: probes_tx, drain: drain.clone() },
        CommandReceivers { activation: activation_rx, probes: probes_rx, drain },
    )
}

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
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        while let Some(input) = inputs.recv().await {
            self.handle(input).await;
        }
        tracing::info!("reducer stopped: all inputs closed");
    }

    /// Handles one input completely: every event it implies is journaled,
    /// committed and acted upon before the next input is read.
    pub async fn handle(&mut self, input: Input) {
        match input {
            Input::Dispatch { rollout_id, policy, target_closure, soak_secs, current_closure, issued_at, at } => {
                let refused_busy_before = match self.rollouts.get(&rollout_id) {
                    Some(slot) if slot.record.state != HostState::Pending => {
                        tracing::debug!(%rollout_id, "dispatch for a rollout already under way; ignored");
                        return;
                    }
                    Some(slot) => slot.record.last_seq > 0,
                    None => false,
                };
                let reject = |code, reason| (code, reason, policy, target_closure.clone());
                let dispatch = AcceptedDispatch {
                    current_closure_at_dispatch: current_closure.clone(),
                    target_closure: target_closure.clone(),
                    soak_secs,
                    received_at: at,
                };
                let offered =
                    Accepted { rollout_id: rollout_id.clone(), issued_at, dispatch: Some(Box::new(dispatch)) };
                let refusal = if issued_at > at + MAX_CLOCK_SKEW {
                    Some(reject(
                        RejectCode::Refused,
                        format!(
                            "manifest of {rollout_id} is issued at {issued_at}, more than {} s ahead of this host's clock ({at})",
                            MAX_CLOCK_SKEW.whole_seconds()
                        ),
                    ))
                } else if let Err(why) = self.rollouts.channels().check(&offered) {
                    Some(reject(RejectCode::Stale, why.to_string()))
                } else if let Some((live_id, live)) = self.rollouts.live(Some(&rollout_id)) {
                    if refused_busy_before {
                        tracing::debug!(%rollout_id, live = %live_id, "dispatch already refused busy; ignored");
                        return;
                    }
                    let reason = format!(
                        "busy: rollout {live_id} is {} on this host (one live rollout per host); offer {rollout_id} again when it is over",
                        live.record.state
                    );
                    Some(reject(RejectCode::Busy, reason))
                } else {
                    None
                };
                if let Some((code, reason, policy, target_closure)) = refusal {
                    tracing::warn!(%rollout_id, code = code.as_str(), %reason, "dispatch refused");
                    self.rollouts.open(&rollout_id, policy);
                    self.feed(
                        &rollout_id,
                        EventBody::DispatchRejected { target_closure, code, reason, rejected_at: at },
                    )
                    .await;
                    return;
                }
                // Accepted: the no-downgrade history, with the acceptance
                // itself, is durable BEFORE the DispatchAck exists, so no
                // restart, pruning or rotted record forgets it.
                let channels = self.rollouts.channels().with(offered);
                if &channels != self.rollouts.channels() {
                    self.save_channels_until_durable(&channels).await;
                    self.rollouts.set_channels(channels);
                }
                self.rollouts.open(&rollout_id, policy);
                let body = EventBody::Activate {
                    current_closure_at_dispatch: current_closure,
                    target_closure,
                    soak_secs,
                    received_at: at,
                };
                self.feed(&rollout_id, body).await;
            }
            Input::RefuseDispatch { rollout_id, policy, target_closure, reason, at } => {
                if !self.rollouts.open(&rollout_id, policy) {
                    return;
                }
                tracing::warn!(%rollout_id, %reason, "dispatch refused");
                self.feed(
                    &rollout_id,
                    EventBody::DispatchRejected { target_closure, code: RejectCode::Refused, reason, rejected_at: at },
                )
                .await;
            }
            Input::ActivationStarted { rollout_id, switch_method, at } => {
                let activating = self.state(&rollout_id) == Some(HostState::Activating);
                if activating {
                    self.feed(&rollout_id, EventBody::ActivationStarted { started_at: at, switch_method }).await;
                }
            }
            Input::ActivationFinished { rollout_id, order, outcome, at } => {
                let still_deferred = matches!(outcome, ActivationOutcome::Deferred { .. })
                    && self.state(&rollout_id) == Some(HostState::Deferred);
                if still_deferred && !order.rollback {
                    // A restart before the reboot re-ran the boot setup (it is
                    // idempotent); the host already reported Deferred.
                    tracing::info!(%rollout_id, closure = %order.closure, "still waiting for a reboot into the deferred closure");
                    return;
                }
                let body =
                    if order.rollback { rollback_body(&order.closure, outcome, at) } else { forward_body(outcome, at) };
                self.feed(&rollout_id, body).await;
            }
            Input::ProbeTopology { rollout_id, probes, at } => {
                self.declare_topology(rollout_id, probes, at).await;
            }
            Input::ProbeRun { rollout_id, probe_name, mode, status, reason, at } => {
                if self.state(&rollout_id) != Some(HostState::Soaking)
                    || self.rollouts.accepted_after(&rollout_id).is_some()
                {
                    return; // a result that raced the end of the soak
                }
                for body in self.rollouts.observe_probe(&rollout_id, &probe_name, mode, status, reason, at) {
                    if !self.feed(&rollout_id, body).await {
                        break; // queue full: the next run of the probe tries again
                    }
                }
                if let Some(start) = self.rollouts.failure_clock_start(&rollout_id) {
                    self.feed(&rollout_id, start).await;
                }
                let failing = (mode == ProbeMode::Enforce && status == ProbeStatus::Fail).then_some(at);
                self.rollouts.note_failure_clock(&rollout_id, failing);
            }
            Input::Tick { now } => {
                if let Some((rollout_id, probes, at)) = self.owed_topology.take() {
                    self.declare_topology(rollout_id, probes, at).await;
                }
                for (rollout_id, body) in self.rollouts.due(now) {
                    self.feed(&rollout_id, body).await;
                }
            }
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

    async fn save_channels_until_durable(&mut self, channels: &ChannelHistory) {
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

    fn state(&self, rollout_id: &RolloutId) -> Option<HostState> {
        self.rollouts.get(rollout_id).map(|s| s.record.state)
    }

    /// prepare → journal (retried until durable) → commit → act. Returns
    /// whether the event was committed: false when the state machine
    /// refused it, or when a deferrable (visibility) event met a full queue.
    async fn feed(&mut self, rollout_id: &RolloutId, body: EventBody) -> bool {
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use time::Duration;

    use super::*;
    use crate::agent::channels::ChannelHistory;
    use crate::agent::testkit::{closure, host, policy, rid, T0};
    use crate::machine::{Event, ProbeKind};

    #[derive(Debug, Clone, Default)]
    struct MemJournal {
        events: Arc<Mutex<Vec<(RolloutId, OutboundEvent)>>>,
        /// Appends fail while this is > 0 (decremented on each failure).
        failures_left: Arc<Mutex<u32>>,
        /// With Some(n): once n events are held, every append is `Full`
        /// (the queue's soft cap as the reducer sees it).
        full_at: Arc<Mutex<Option<usize>>>,
    }

    impl Journal for MemJournal {
        async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), JournalError> {
            if let Some(max) = *self.full_at.lock().expect("lock") {
                let decisive = !deferrable(&event.to_body().map_err(|e| JournalError::Failed(e.to_string()))?);
                if !decisive && self.events.lock().expect("lock").len() >= max {
                    return Err(JournalError::Full("queue full: 3 of 3 pending".into()));
                }
            }
            let mut left = self.failures_left.lock().expect("lock");
            if *left > 0 {
                *left -= 1;
                return Err(JournalError::Failed("No space left on device (os error 28)".into()));
            }
            self.events.lock().expect("lock").push((rollout_id.clone(), event.clone()));
            Ok(())
        }
    }

    impl MemJournal {
        fn kinds(&self) -> Vec<&'static str> {
            self.events.lock().expect("lock").iter().map(|(_, e)| e.kind()).collect()
        }
        fn local_events(&self) -> Vec<Event> {
            self.events.lock().expect("lock").iter().map(|(_, e)| e.to_local().expect("valid")).collect()
        }
    }

    fn dispatch() -> Input {
        Input::Dispatch {
            rollout_id: rid(),
            policy: policy(),
            target_closure: closure('1'),
            soak_secs: 30,
            current_closure: closure('0'),
            issued_at: T0,
            at: T0,
        }
    }

    fn reducer(journal: MemJournal) -> (Reducer<MemJournal>, CommandReceivers) {
        let (cmds, rx) = commands();
        let (r, _snapshot) = Reducer::new(Rollouts::new(host()), journal, cmds);
        (r, rx)
    }

    /// A reducer restarted from the journal, after its `resume`.
    fn restarted(journal: &MemJournal) -> (Reducer<MemJournal>, CommandReceivers) {
        let mut restored = Rollouts::new(host());
        restored.restore(rid(), policy(), &journal.local_events()).expect("restore");
        let (cmds, rx) = commands();
        let (mut again, _snapshot) = Reducer::new(restored, journal.clone(), cmds);
        again.resume();
        (again, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_rolls_back_and_every_step_is_journaled_before_acting() {
        // Proves the reducer's whole decision path: dispatch → switch order,
        // probes planned on completion, sustained failure → rollback order,
        // rollback outcome → Reverted, each event journaled in seq order.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        r.handle(dispatch()).await;
        let order = rx.activation.borrow().clone().expect("switch ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
        r.handle(dispatch()).await; // repeated long-poll answer
        assert_eq!(journal.kinds(), vec!["DispatchAck"], "a repeated dispatch is ignored");

        let done = ActivationOutcome::Completed { observed: closure('1') };
        let at = T0 + Duration::seconds(5);
        r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: done, at }).await;
        assert_eq!(rx.probes.borrow().rollout_id, Some(rid()), "probes planned for the new system");
        let probes = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        r.handle(Input::ProbeTopology { rollout_id: rid(), probes, at }).await;
        let fail = |secs| Input::ProbeRun {
            rollout_id: rid(),
            probe_name: "web".into(),
            mode: ProbeMode::Enforce,
            status: ProbeStatus::Fail,
            reason: Some("HTTP 503".into()),
            at: T0 + Duration::seconds(secs),
        };
        r.handle(fail(10)).await;
        r.handle(fail(40)).await;
        r.handle(Input::Tick { now: T0 + Duration::seconds(69) }).await;
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking);
        r.handle(Input::Tick { now: T0 + Duration::seconds(70) }).await;
        let order = rx.activation.borrow().clone().expect("rollback ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('0'), true));
        assert_eq!(rx.probes.borrow().rollout_id, None, "probes stop on a failed host");
        let back = ActivationOutcome::Completed { observed: closure('0') };
        r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: back, at: T0 + Duration::seconds(80) })
            .await;
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Reverted);
        assert_eq!(
            journal.kinds(),
            vec![
                "DispatchAck",
                "ActivationCompleted",
                "ProbeTopologyDeclared",
                "ProbeObservedFirst",
                "ProbeResult",
                "ProbeFailureFirst",
                "Failed",
                "RollbackComplete"
            ],
            "the second failing result is no change: no event"
        );
        let seqs: Vec<u64> = journal.local_events().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<u64>>(), "seq starts at 1, +1 per event, no gaps");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_disk_holds_the_state_back_until_the_event_is_durable() {
        // Proves write-ahead under ENOSPC: no switch is ordered and the record
        // stays Pending while appends fail; once space returns the event is
        // journaled exactly once and the switch is ordered.
        let journal = MemJournal::default();
        *journal.failures_left.lock().expect("lock") = 5;
        let (r, rx) = reducer(journal.clone());
        let (tx, inputs) = mpsc::channel(INPUT_CAPACITY);
        let snapshot = r.snapshot.subscribe();
        let task = tokio::spawn(async move {
            r.run(inputs).await;
        });
        tx.send(dispatch()).await.expect("send");
        // Let the reducer hit the failures (time is paused: sleeps advance
        // instantly once every task is idle).
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(rx.activation.borrow().is_none(), "no switch before the event is durable");
        assert!(journal.kinds().is_empty());
        drop(tx);
        task.await.expect("reducer ends");
        assert_eq!(journal.kinds(), vec!["DispatchAck"]);
        assert_eq!(*journal.failures_left.lock().expect("lock"), 0);
        assert!(rx.activation.borrow().is_some(), "switch ordered after the append succeeded");
        assert_eq!(snapshot.borrow().last_seqs().get(&rid()), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_reducer_reissues_the_unfinished_switch_and_probes() {
        // Proves restart recovery: records rebuilt from the journal, then
        // `resume` re-orders the switch of an Activating rollout.
        let journal = MemJournal::default();
        let (mut r, _rx) = reducer(journal.clone());
        r.handle(dispatch()).await;
        let (mut again, rx) = restarted(&journal);
        let order = rx.activation.borrow().clone().expect("switch re-ordered");
        assert_eq!((order.closure, order.rollback), (closure('1'), false));
        again.handle(dispatch()).await;
        assert_eq!(journal.kinds(), vec!["DispatchAck"], "the CP's repeated dispatch is still ignored");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_before_the_reboot_keeps_waiting_without_a_second_deferred_event() {
        // Proves a Deferred rollout survives a restart that comes before the
        // reboot: `resume` re-orders the (idempotent) boot setup, its Deferred
        // outcome adds no event, and the reboot still completes it.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        r.handle(dispatch()).await;
        let order = rx.activation.borrow().clone().expect("switch ordered");
        let deferred = || ActivationOutcome::Deferred { component: "kernel".into() };
        r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: deferred(), at: T0 }).await;
        let (mut again, rx) = restarted(&journal);
        let order = rx.activation.borrow().clone().expect("boot setup re-ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
        let at = T0 + Duration::seconds(5);
        again
            .handle(Input::ActivationFinished { rollout_id: rid(), order: order.clone(), outcome: deferred(), at })
            .await;
        assert_eq!(journal.kinds(), vec!["DispatchAck", "ActivationDeferred"], "nothing new before the reboot");
        assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Deferred);
        let booted = ActivationOutcome::Completed { observed: closure('1') };
        let at = T0 + Duration::seconds(60);
        again.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: booted, at }).await;
        assert_eq!(journal.kinds(), vec!["DispatchAck", "ActivationDeferred", "ActivationCompleted"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_dispatch_is_journaled_and_activates_nothing() {
        // Proves DispatchRejected: a Failed record, no switch ordered.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        let refuse = Input::RefuseDispatch {
            rollout_id: rid(),
            policy: policy(),
            target_closure: closure('1'),
            reason: "manifest signature does not verify".into(),
            at: T0,
        };
        r.handle(refuse).await;
        assert_eq!(journal.kinds(), vec!["DispatchRejected"]);
        assert!(rx.activation.borrow().is_none());
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Failed);
    }

    fn dispatch_of(id: &str, target: char, issued_at: Timestamp, at: Timestamp) -> Input {
        Input::Dispatch {
            rollout_id: RolloutId::parse(id).expect("valid"),
            policy: policy(),
            target_closure: closure(target),
            soak_secs: 30,
            current_closure: closure('0'),
            issued_at,
            at,
        }
    }

    fn secs(n: i64) -> Timestamp {
        T0 + Duration::seconds(n)
    }

    fn probe(status: ProbeStatus, at: Timestamp) -> Input {
        Input::ProbeRun {
            rollout_id: rid(),
            probe_name: "web".into(),
            mode: ProbeMode::Enforce,
            status,
            reason: (status == ProbeStatus::Fail).then(|| "HTTP 503".to_owned()),
            at,
        }
    }

    /// Events of one rollout as (seq, body).
    fn events_of(journal: &MemJournal, id: &str) -> Vec<(u64, EventBody)> {
        let id = RolloutId::parse(id).expect("valid");
        let events = journal.events.lock().expect("lock");
        events.iter().filter(|(r, _)| *r == id).map(|(_, e)| (e.seq, e.to_body().expect("valid"))).collect()
    }

    /// Every rollout of the journal rebuilt, as a restarted agent does, and
    /// `resume` run; `channels` is the durable history it would load.
    fn restarted_all(journal: &MemJournal, channels: ChannelHistory) -> (Reducer<MemJournal>, CommandReceivers) {
        let mut restored = Rollouts::new(host());
        let ids: std::collections::BTreeSet<RolloutId> =
            journal.events.lock().expect("lock").iter().map(|(r, _)| r.clone()).collect();
        for id in ids {
            let events: Vec<Event> = journal
                .events
                .lock()
                .expect("lock")
                .iter()
                .filter(|(r, _)| *r == id)
                .map(|(_, e)| e.to_local().expect("valid"))
                .collect();
            restored.restore(id, policy(), &events).expect("restore");
        }
        restored.set_channels(channels);
        let (cmds, rx) = commands();
        let (mut again, _snapshot) = Reducer::new(restored, journal.clone(), cmds);
        again.resume();
        (again, rx)
    }

    /// A (rid) soaking with its enforce probe failing since `secs(10)`.
    async fn soaking_and_failing(r: &mut Reducer<MemJournal>, rx: &CommandReceivers) {
        r.handle(dispatch()).await;
        let order = rx.activation.borrow().clone().expect("switch ordered");
        let done = ActivationOutcome::Completed { observed: closure('1') };
        r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: done, at: secs(5) }).await;
        let probes = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        r.handle(Input::ProbeTopology { rollout_id: rid(), probes, at: secs(5) }).await;
        r.handle(probe(ProbeStatus::Fail, secs(10))).await;
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.failure_clock_since, Some(secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatch_while_another_rollout_is_live_is_refused_busy_once_and_admitted_after_it_ends() {
        // Proves one live rollout per host on the agent (§3 rule 8): B offered while A soaks (probe failing)
        // is answered `busy` (durable, B stays Pending), repeats are ignored,
        // A's gate and rollback run while B waits, and B's next offer after A
        // is over activates it with the next seq. Before the fix B was
        // accepted while A soaked, and A's gate then rolled the host back.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        soaking_and_failing(&mut r, &rx).await;
        let b = RolloutId::parse("stable@r2").expect("valid");
        r.handle(dispatch_of("stable@r2", '2', T0, secs(20))).await;
        let b_events = events_of(&journal, "stable@r2");
        assert_eq!(b_events.len(), 1, "{b_events:?}");
        let EventBody::DispatchRejected { code, reason, .. } = &b_events[0].1 else { panic!("{b_events:?}") };
        assert_eq!(*code, RejectCode::Busy);
        assert!(reason.contains("stable@r1") && reason.contains("Soaking"), "{reason}");
        assert_eq!(r.rollouts().get(&b).expect("slot").record.state, HostState::Pending);
        assert!(r.rollouts().answered(&b), "the long-poll skips B's repeats while A is live");
        r.handle(dispatch_of("stable@r2", '2', T0, secs(21))).await;
        assert_eq!(events_of(&journal, "stable@r2").len(), 1, "a repeated offer is ignored");
        assert_eq!(rx.activation.borrow().as_ref().map(|o| o.rollout_id.clone()), Some(rid()), "B never switched");

        r.handle(probe(ProbeStatus::Fail, secs(11))).await;
        r.handle(Input::Tick { now: secs(70) }).await;
        let order = rx.activation.borrow().clone().expect("A's rollback");
        assert_eq!((order.rollout_id.clone(), order.closure.clone(), order.rollback), (rid(), closure('0'), true));
        r.handle(dispatch_of("stable@r2", '2', T0, secs(71))).await;
        assert_eq!(events_of(&journal, "stable@r2").len(), 1, "still busy while A rolls back");
        let back = ActivationOutcome::Completed { observed: closure('0') };
        r.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: back, at: secs(80) }).await;
        assert!(!r.rollouts().answered(&b), "A is over: B's next offer gets an answer");
        r.handle(dispatch_of("stable@r2", '2', T0, secs(90))).await;
        let b_events = events_of(&journal, "stable@r2");
        assert_eq!(b_events.len(), 2);
        assert!(matches!(b_events[1], (2, EventBody::Activate { .. })), "{b_events:?}");
        let order = rx.activation.borrow().clone().expect("B's switch");
        assert_eq!((order.rollout_id, order.closure), (b, closure('2')));
        let a_before = events_of(&journal, "stable@r1").len();
        r.handle(Input::Tick { now: secs(500) }).await;
        assert_eq!(events_of(&journal, "stable@r1").len(), a_before, "nothing of A after B was accepted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_agent_that_refused_b_busy_admits_b_once_a_has_ended() {
        // Proves the restart path of one live rollout per host: the busy refusal is durable (no
        // second refusal after the restart while A is live), and once A has
        // ended the restarted agent activates B with the next seq.
        let journal = MemJournal::default();
        let (mut r, _rx) = reducer(journal.clone());
        r.handle(dispatch()).await;
        r.handle(dispatch_of("stable@r2", '2', T0, secs(1))).await;
        let (mut again, rx) = restarted_all(&journal, r.rollouts().channels().clone());
        again.handle(dispatch_of("stable@r2", '2', T0, secs(2))).await;
        assert_eq!(events_of(&journal, "stable@r2").len(), 1, "no second busy after the restart");
        let order = rx.activation.borrow().clone().expect("A's switch re-ordered");
        assert_eq!(order.rollout_id, rid());
        let failed = ActivationOutcome::Failed { exit_code: 1, stderr_tail: "boom".into() };
        again.handle(Input::ActivationFinished { rollout_id: rid(), order, outcome: failed, at: secs(3) }).await;
        let rollback = rx.activation.borrow().clone().expect("A's rollback");
        assert!(rollback.rollback);
        let back = ActivationOutcome::Completed { observed: closure('0') };
        again
            .handle(Input::ActivationFinished { rollout_id: rid(), order: rollback, outcome: back, at: secs(4) })
            .await;
        assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Reverted);
        again.handle(dispatch_of("stable@r2", '2', T0, secs(5))).await;
        let b_events = events_of(&journal, "stable@r2");
        assert!(
            matches!(b_events.as_slice(), [(1, EventBody::DispatchRejected { .. }), (2, EventBody::Activate { .. })]),
            "{b_events:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_manifest_on_a_channel_is_refused_stale_even_after_a_restart() {
        // Proves no downgrade (§3 rule 9): after accepting stable@v2 (durably, before its
        // DispatchAck), stable@v1 is refused `stale` naming both, also by a
        // restarted agent that reloads the file; a manifest dated beyond the
        // clock-skew bound is refused. Before the fix v1 was activated.
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = MemJournal::default();
        let (mut r, _rx) = reducer(journal.clone());
        r.rollouts.set_channels(ChannelHistory::load(dir.path()).expect("load"));
        let hour = Duration::hours(1);
        r.handle(dispatch_of("stable@v2", '2', T0 + hour, T0 + hour)).await;
        assert!(matches!(events_of(&journal, "stable@v2").as_slice(), [(1, EventBody::Activate { .. })]));
        let order = r.commands.activation.borrow().clone().expect("v2 switch");
        let done = ActivationOutcome::Completed { observed: closure('2') };
        r.handle(Input::ActivationFinished {
            rollout_id: order.rollout_id.clone(),
            order,
            outcome: done,
            at: T0 + hour,
        })
        .await;
        let probes = vec![];
        let v2 = RolloutId::parse("stable@v2").expect("valid");
        r.handle(Input::ProbeTopology { rollout_id: v2.clone(), probes, at: T0 + hour }).await;
        r.handle(Input::Tick { now: T0 + hour + Duration::seconds(30) }).await;
        assert_eq!(r.rollouts().get(&v2).expect("slot").record.state, HostState::Converged);

        let reloaded = ChannelHistory::load(dir.path()).expect("reload");
        let (mut again, rx) = restarted_all(&journal, reloaded);
        again.handle(dispatch_of("stable@v1", '1', T0, T0 + 2 * hour)).await;
        let v1 = events_of(&journal, "stable@v1");
        let [(1, EventBody::DispatchRejected { code: RejectCode::Stale, reason, .. })] = v1.as_slice() else {
            panic!("{v1:?}")
        };
        assert!(reason.contains("stable@v1") && reason.contains("stable@v2"), "{reason}");
        assert_eq!(rx.activation.borrow().as_ref().map(|o| o.rollout_id.clone()), None, "no switch back");

        let now = T0 + 2 * hour;
        again.handle(dispatch_of("canary@f1", '3', now + Duration::minutes(6), now)).await;
        let future = events_of(&journal, "canary@f1");
        let [(1, EventBody::DispatchRejected { code: RejectCode::Refused, reason, .. })] = future.as_slice() else {
            panic!("{future:?}")
        };
        assert!(reason.contains("ahead of this host's clock"), "{reason}");
        again.handle(dispatch_of("canary@f2", '3', now + Duration::minutes(4), now)).await;
        assert!(matches!(events_of(&journal, "canary@f2").as_slice(), [(1, EventBody::Activate { .. })]));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_the_failure_gate_waits_for_fresh_results_and_counts_from_this_run() {
        // Proves fresh evidence (§3 rule 6): a probe failing since 10 s before the restart does
        // not fail the host on pre-restart observations (before the fix the
        // first tick after the restart rolled back); the threshold counts
        // from the first failure this run saw, and the machine accepts it.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        soaking_and_failing(&mut r, &rx).await;
        let (mut again, rx) = restarted_all(&journal, ChannelHistory::in_memory());
        again.handle(Input::Tick { now: secs(75) }).await;
        assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking, "no fresh evidence");
        again.handle(probe(ProbeStatus::Fail, secs(80))).await;
        again.handle(Input::Tick { now: secs(139) }).await;
        assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Soaking);
        again.handle(Input::Tick { now: secs(140) }).await;
        let record = &again.rollouts().get(&rid()).expect("slot").record;
        assert_eq!(record.state, HostState::Failed);
        let last = events_of(&journal, "stable@r1").pop().expect("event");
        assert!(matches!(last.1, EventBody::SustainedFailureCrossed { sustained_duration_secs: 60, .. }), "{last:?}");
        assert!(rx.activation.borrow().as_ref().is_some_and(|o| o.rollback));

        // A service that recovered while the agent was down: the first fresh
        // result passes, the clock resets, nothing fails.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        soaking_and_failing(&mut r, &rx).await;
        let (mut again, _rx) = restarted_all(&journal, ChannelHistory::in_memory());
        again.handle(Input::Tick { now: secs(24) }).await;
        again.handle(probe(ProbeStatus::Pass, secs(24))).await;
        again.handle(Input::Tick { now: secs(300) }).await;
        let record = &again.rollouts().get(&rid()).expect("slot").record;
        assert_eq!((record.state, record.failure_clock_since), (HostState::Converged, None));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_probe_results_add_no_events_and_a_full_queue_never_blocks_a_decision() {
        // Proves that steady results are no events: a probe failing at 1 Hz for 100 s journals one
        // result (before the fix: 100); under a full queue a visibility
        // event is dropped without blocking the reducer and the sustained
        // failure (decisive, through the queue's reserve) still goes out,
        // counted from the failure this run saw after the unrecorded pass.
        let journal = MemJournal::default();
        let (mut r, rx) = reducer(journal.clone());
        soaking_and_failing(&mut r, &rx).await;
        for t in 11..40 {
            r.handle(probe(ProbeStatus::Fail, secs(t))).await;
        }
        let results = |j: &MemJournal| j.kinds().iter().filter(|k| **k == "ProbeResult").count();
        assert_eq!(results(&journal), 1);
        r.handle(probe(ProbeStatus::Pass, secs(40))).await;
        r.handle(probe(ProbeStatus::Fail, secs(41))).await;
        assert_eq!(results(&journal), 3, "each change is an event");
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.failure_clock_since, Some(secs(41)));

        let held = journal.events.lock().expect("lock").len();
        *journal.full_at.lock().expect("lock") = Some(held);
        r.handle(probe(ProbeStatus::Pass, secs(50))).await; // dropped: queue full
        r.handle(probe(ProbeStatus::Fail, secs(51))).await;
        assert_eq!(journal.events.lock().expect("lock").len(), held);
        r.handle(Input::Tick { now: secs(101) }).await;
        assert_eq!(
            r.rollouts().get(&rid()).expect("slot").record.state,
            HostState::Soaking,
            "60 s since 51 s, not 41 s"
        );
        r.handle(Input::Tick { now: secs(111) }).await;
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Failed);
        assert_eq!(journal.kinds().last(), Some(&"Failed"));
    }
}
