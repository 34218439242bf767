//! The agent's one mutator: a task that owns [`Rollouts`], is the only
//! caller of `step`, and turns worker inputs into durable events and then
//! into commands (STYLE.md §3).
//!
//! Why it is shaped this way:
//! - Inputs arrive on ONE bounded channel ([`INPUT_CAPACITY`]); workers wait
//!   when the reducer is behind, so memory is bounded and order is kept.
//! - Outgoing commands never block the reducer: the switch order and the
//!   probe plan are `watch` channels (latest value wins; there is only ever
//!   one switch and one probe plan that matter) and the drainer is woken
//!   with a `Notify`. The reference agent deadlocked when a bounded command
//!   channel was full while its worker waited on the reducer (defect 27).
//! - Write-ahead: an event is appended to the journal (the on-disk queue)
//!   before the record changes and before any command is sent. When the
//!   append fails (disk full, I/O error) the reducer keeps the input and
//!   retries with backoff, reporting each failure; state never advances
//!   past the journal and no event is dropped with a log line.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use tokio::sync::{mpsc, watch, Notify};

use super::rollouts::{probe_bodies, rollback_body, switch_body, Prepared, Rollouts, RolloutsError, SwitchOutcome};
use crate::ids::{Closure, RolloutId};
use crate::machine::{Effect, EventBody, HostState, Policy, ProbeDecl, ProbeMode, ProbeStatus, RejectCode, Timestamp};
use crate::wire::OutboundEvent;

/// Reducer input queue. Inputs are small and produced by a handful of
/// workers (probes at ≥ 1 s intervals, one switch, ticks every 5 s): 64
/// absorbs a burst of every probe reporting at once while keeping a stuck
/// reducer visible quickly (workers then wait in `send`).
pub const INPUT_CAPACITY: usize = 64;
/// First retry delay after a failed journal append.
pub const JOURNAL_RETRY_MIN: StdDuration = StdDuration::from_millis(100);
/// Cap of the exponential journal retry: a full disk is not fixed in
/// milliseconds, and a 10 s cap keeps the log readable while recovering
/// within seconds once space returns.
pub const JOURNAL_RETRY_MAX: StdDuration = StdDuration::from_secs(10);

/// Where the reducer makes an event durable. The agent's queue implements
/// it (its fsyncs run on the blocking pool, off the reactor); tests use an
/// in-memory journal that can be told to fail.
pub trait Journal: Send + std::fmt::Debug + 'static {
    /// Resolves only once the event is durable.
    fn append(
        &mut self,
        rollout_id: &RolloutId,
        event: &OutboundEvent,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// What the workers tell the reducer.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A dispatch whose manifest verified against the agent's trust keys
    /// and whose target matches the manifest. `current_closure` is what
    /// `current-system` resolved to when it was accepted.
    Dispatch {
        rollout_id: RolloutId,
        policy: Policy,
        target_closure: Closure,
        soak_secs: u64,
        current_closure: Closure,
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
    SwitchStarted {
        rollout_id: RolloutId,
        switch_method: String,
        at: Timestamp,
    },
    SwitchFinished {
        rollout_id: RolloutId,
        order: SwitchOrder,
        outcome: SwitchOutcome,
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

/// The one switch the activation worker should run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchOrder {
    pub rollout_id: RolloutId,
    pub closure: Closure,
    pub rollback: bool,
    /// Increases with every order, so a worker can tell a new order from a
    /// repeated one.
    pub generation: u64,
}

/// Which rollout's probes should run (the newly active system's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbePlan {
    pub rollout_id: Option<RolloutId>,
    pub generation: u64,
}

/// The command side of the reducer; none of these can block it.
#[derive(Debug, Clone)]
pub struct Commands {
    pub switch: watch::Sender<Option<SwitchOrder>>,
    pub probes: watch::Sender<ProbePlan>,
    pub drain: Arc<Notify>,
}

/// The receiving ends, handed to the workers.
#[derive(Debug)]
pub struct CommandReceivers {
    pub switch: watch::Receiver<Option<SwitchOrder>>,
    pub probes: watch::Receiver<ProbePlan>,
    pub drain: Arc<Notify>,
}

pub fn commands() -> (Commands, CommandReceivers) {
    let (switch_tx, switch_rx) = watch::channel(None);
    let (probes_tx, probes_rx) = watch::channel(ProbePlan::default());
    let drain = Arc::new(Notify::new());
    (
        Commands { switch: switch_tx, probes: probes_tx, drain: drain.clone() },
        CommandReceivers { switch: switch_rx, probes: probes_rx, drain },
    )
}

/// The reducer state: records, journal, command senders.
#[derive(Debug)]
pub struct Reducer<J> {
    rollouts: Rollouts,
    journal: J,
    commands: Commands,
    generation: u64,
    snapshot: watch::Sender<Rollouts>,
}

impl<J: Journal> Reducer<J> {
    /// `rollouts` is the state rebuilt from the journal at start. Returns the
    /// reducer and a read-only snapshot channel (heartbeat `last_seq`,
    /// status) that is updated after every commit.
    pub fn new(rollouts: Rollouts, journal: J, commands: Commands) -> (Reducer<J>, watch::Receiver<Rollouts>) {
        let (snapshot, snapshot_rx) = watch::channel(rollouts.clone());
        (Reducer { rollouts, journal, commands, generation: 0, snapshot }, snapshot_rx)
    }

    pub fn rollouts(&self) -> &Rollouts {
        &self.rollouts
    }

    /// Re-issues the commands a restarted agent owes: the probe plan of a
    /// Soaking rollout and the switch of an unfinished activation or
    /// rollback (the activation worker checks `current-system` first, so a
    /// switch that already happened is only observed, not repeated).
    pub fn resume(&mut self) {
        let soaking: Vec<RolloutId> = self
            .rollouts
            .iter()
            .filter(|(_, s)| s.record.state == HostState::Soaking)
            .map(|(id, _)| id.clone())
            .collect();
        for id in soaking {
            self.plan_probes(Some(id));
        }
        for (id, state) in self.rollouts.unfinished_switches() {
            let Some(slot) = self.rollouts.get(&id) else { continue };
            let (closure, rollback) = match state {
                HostState::Activating | HostState::Deferred => (slot.record.target_closure.clone(), false),
                _ => (slot.record.current_closure_at_dispatch.clone(), true),
            };
            if let Some(closure) = closure {
                self.order_switch(id, closure, rollback);
            }
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
            Input::Dispatch { rollout_id, policy, target_closure, soak_secs, current_closure, at } => {
                if !self.rollouts.open(&rollout_id, policy) {
                    tracing::debug!(%rollout_id, "dispatch for a rollout already known; ignored");
                    return;
                }
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
            Input::SwitchStarted { rollout_id, switch_method, at } => {
                let activating = self.state(&rollout_id) == Some(HostState::Activating);
                if activating {
                    self.feed(&rollout_id, EventBody::ActivationStarted { started_at: at, switch_method }).await;
                }
            }
            Input::SwitchFinished { rollout_id, order, outcome, at } => {
                let still_deferred = matches!(outcome, SwitchOutcome::Deferred { .. })
                    && self.state(&rollout_id) == Some(HostState::Deferred);
                if still_deferred && !order.rollback {
                    // A restart before the reboot re-ran the boot setup (it is
                    // idempotent); the host already reported Deferred.
                    tracing::info!(%rollout_id, closure = %order.closure, "still waiting for a reboot into the deferred closure");
                    return;
                }
                let body =
                    if order.rollback { rollback_body(&order.closure, outcome, at) } else { switch_body(outcome, at) };
                self.feed(&rollout_id, body).await;
            }
            Input::ProbeTopology { rollout_id, probes, at } => {
                if self.state(&rollout_id) == Some(HostState::Soaking) {
                    self.feed(&rollout_id, EventBody::ProbeTopologyDeclared { probes, declared_at: at }).await;
                }
            }
            Input::ProbeRun { rollout_id, probe_name, mode, status, reason, at } => {
                let Some(slot) = self.rollouts.get(&rollout_id) else { return };
                if slot.record.state != HostState::Soaking {
                    return; // a result that raced the end of the soak
                }
                for body in probe_bodies(&slot.record, &probe_name, mode, status, reason, at) {
                    self.feed(&rollout_id, body).await;
                }
                if let Some(start) = self.rollouts.failure_clock_start(&rollout_id) {
                    self.feed(&rollout_id, start).await;
                }
            }
            Input::Tick { now } => {
                for (rollout_id, body) in self.rollouts.due(now) {
                    self.feed(&rollout_id, body).await;
                }
            }
        }
    }

    fn state(&self, rollout_id: &RolloutId) -> Option<HostState> {
        self.rollouts.get(rollout_id).map(|s| s.record.state)
    }

    /// prepare → journal (retried until durable) → commit → act.
    async fn feed(&mut self, rollout_id: &RolloutId, body: EventBody) {
        let prepared = match self.rollouts.prepare(rollout_id, body) {
            Ok(p) => p,
            Err(RolloutsError::Transition(e)) => {
                // The agent's own input was illegal for its record: nothing
                // was emitted, so there is nothing to lose; say why.
                tracing::warn!(%rollout_id, error = %e, "input refused by the state machine");
                return;
            }
            Err(e) => {
                tracing::warn!(%rollout_id, error = %e, "input for an unknown rollout ignored");
                return;
            }
        };
        let outbound = OutboundEvent::from_machine(prepared.event.seq, &prepared.event.body);
        self.append_until_durable(rollout_id, &outbound).await;
        self.commands.drain.notify_one();
        self.apply(prepared);
    }

    async fn append_until_durable(&mut self, rollout_id: &RolloutId, outbound: &OutboundEvent) {
        let mut delay = JOURNAL_RETRY_MIN;
        loop {
            match self.journal.append(rollout_id, outbound).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::error!(
                        %rollout_id, seq = outbound.seq, kind = outbound.kind(), %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot make the event durable; the host's state will not advance until it is"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(JOURNAL_RETRY_MAX);
                }
            }
        }
    }

    fn apply(&mut self, prepared: Prepared) {
        let rollout_id = prepared.rollout_id.clone();
        let actions: Vec<Effect> = prepared.actions().cloned().collect();
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
                Effect::FireSwitch { target } => self.order_switch(rollout_id.clone(), target, false),
                Effect::FireRollback { to } => self.order_switch(rollout_id.clone(), to, true),
                Effect::ResetProbes => self.plan_probes(Some(rollout_id.clone())),
                Effect::EmitOutbound { .. } | Effect::AppendEventLog { .. } | Effect::InsertQuarantine { .. } => {}
            }
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

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    fn order_switch(&mut self, rollout_id: RolloutId, closure: Closure, rollback: bool) {
        let generation = self.next_generation();
        self.commands.switch.send_replace(Some(SwitchOrder { rollout_id, closure, rollback, generation }));
    }

    fn plan_probes(&mut self, rollout_id: Option<RolloutId>) {
        let generation = self.next_generation();
        self.commands.probes.send_replace(ProbePlan { rollout_id, generation });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use time::Duration;

    use super::*;
    use crate::agent::testkit::{closure, host, policy, rid, T0};
    use crate::machine::{Event, ProbeKind};

    #[derive(Debug, Clone, Default)]
    struct MemJournal {
        events: Arc<Mutex<Vec<(RolloutId, OutboundEvent)>>>,
        /// Appends fail while this is > 0 (decremented on each failure).
        failures_left: Arc<Mutex<u32>>,
    }

    impl Journal for MemJournal {
        async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), String> {
            let mut left = self.failures_left.lock().expect("lock");
            if *left > 0 {
                *left -= 1;
                return Err("No space left on device (os error 28)".into());
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
        let order = rx.switch.borrow().clone().expect("switch ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
        r.handle(dispatch()).await; // repeated long-poll answer
        assert_eq!(journal.kinds(), vec!["DispatchAck"], "a repeated dispatch is ignored");

        let done = SwitchOutcome::Completed { observed: closure('1'), exit_code: 0 };
        let at = T0 + Duration::seconds(5);
        r.handle(Input::SwitchFinished { rollout_id: rid(), order, outcome: done, at }).await;
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
        let order = rx.switch.borrow().clone().expect("rollback ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('0'), true));
        assert_eq!(rx.probes.borrow().rollout_id, None, "probes stop on a failed host");
        let back = SwitchOutcome::Completed { observed: closure('0'), exit_code: 0 };
        r.handle(Input::SwitchFinished { rollout_id: rid(), order, outcome: back, at: T0 + Duration::seconds(80) })
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
                "ProbeResult",
                "Failed",
                "RollbackComplete"
            ]
        );
        let seqs: Vec<u64> = journal.local_events().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=9).collect::<Vec<u64>>(), "seq starts at 1, +1 per event, no gaps");
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
        assert!(rx.switch.borrow().is_none(), "no switch before the event is durable");
        assert!(journal.kinds().is_empty());
        drop(tx);
        task.await.expect("reducer ends");
        assert_eq!(journal.kinds(), vec!["DispatchAck"]);
        assert_eq!(*journal.failures_left.lock().expect("lock"), 0);
        assert!(rx.switch.borrow().is_some(), "switch ordered after the append succeeded");
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
        let order = rx.switch.borrow().clone().expect("switch re-ordered");
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
        let order = rx.switch.borrow().clone().expect("switch ordered");
        let deferred = || SwitchOutcome::Deferred { component: "kernel".into() };
        r.handle(Input::SwitchFinished { rollout_id: rid(), order, outcome: deferred(), at: T0 }).await;
        let (mut again, rx) = restarted(&journal);
        let order = rx.switch.borrow().clone().expect("boot setup re-ordered");
        assert_eq!((order.closure.clone(), order.rollback), (closure('1'), false));
        let at = T0 + Duration::seconds(5);
        again.handle(Input::SwitchFinished { rollout_id: rid(), order: order.clone(), outcome: deferred(), at }).await;
        assert_eq!(journal.kinds(), vec!["DispatchAck", "ActivationDeferred"], "nothing new before the reboot");
        assert_eq!(again.rollouts().get(&rid()).expect("slot").record.state, HostState::Deferred);
        let booted = SwitchOutcome::Completed { observed: closure('1'), exit_code: 0 };
        let at = T0 + Duration::seconds(60);
        again.handle(Input::SwitchFinished { rollout_id: rid(), order, outcome: booted, at }).await;
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
        assert!(rx.switch.borrow().is_none());
        assert_eq!(r.rollouts().get(&rid()).expect("slot").record.state, HostState::Failed);
    }
}
