//! The transition function. `step` is total: every (state, event) pair
//! yields either a new record with effects, a duplicate no-op, or a
//! [`TransitionError`] naming the state and the event; it never panics
//! (proven by a property test) and all arithmetic on instants is checked.

use time::Duration;

use super::effect::Effect;
use super::event::{Event, EventBody, Origin, ProbeDecl, ProbeMode, ProbeStatus, RejectCode};
use super::state::{Failure, HostRecord, HostState, OnHealthFailure, Policy, ProbeRecord, RollbackFailure};
use super::Timestamp;
use crate::ids::{Closure, Hostname, RolloutId};

/// The result of a legal or duplicate event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event moved the record; run the effects in order.
    Applied { record: Box<HostRecord>, effects: Vec<Effect> },
    /// `seq <= last_seq`: already applied; nothing to do (`docs/protocol.md` §3 rule 1).
    Duplicate { last_seq: u64 },
    /// `seq > last_seq + 1`: an earlier event is missing. Nothing is applied;
    /// the sender re-sends from `expected` (gaps are not errors).
    Gap { expected: u64 },
}

/// Why an event cannot be applied to a record. Both variants name the state
/// and the event, so a log line or an HTTP `rejected` reason is actionable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The event is never legal in this state.
    #[error("{event} (seq {seq}) is illegal in state {state} (host {hostname}, rollout {rollout_id})")]
    Illegal { state: HostState, event: &'static str, seq: u64, hostname: Hostname, rollout_id: RolloutId },
    /// The event is legal in this state in general, but its fields break an
    /// invariant (e.g. Converged before the soak ends).
    #[error("{event} (seq {seq}) refused in state {state} (host {hostname}, rollout {rollout_id}): {reason}")]
    Refused {
        state: HostState,
        event: &'static str,
        seq: u64,
        hostname: Hostname,
        rollout_id: RolloutId,
        reason: String,
    },
}

impl TransitionError {
    pub fn state(&self) -> HostState {
        match self {
            TransitionError::Illegal { state, .. } | TransitionError::Refused { state, .. } => *state,
        }
    }

    pub fn event(&self) -> &'static str {
        match self {
            TransitionError::Illegal { event, .. } | TransitionError::Refused { event, .. } => event,
        }
    }
}

/// Applies one event to one record under the rollout's policy.
pub fn step(record: &HostRecord, event: &Event, policy: &Policy) -> Result<Outcome, TransitionError> {
    if event.seq <= record.last_seq {
        return Ok(Outcome::Duplicate { last_seq: record.last_seq });
    }
    // `last_seq < seq` here, so `last_seq + 1` cannot overflow.
    let expected = record.last_seq + 1;
    if event.seq > expected {
        return Ok(Outcome::Gap { expected });
    }
    let mut tx = Tx { before: record, event, next: record.clone(), effects: Vec::new() };
    tx.next.last_seq = event.seq;
    tx.apply(policy)?;
    Ok(tx.finish())
}

/// Folds events into a record, skipping duplicates and ignoring effects:
/// how the agent rebuilds its state from its journal at start and how the
/// control plane rebuilds host records from its event log. Stops at the
/// first illegal event, or the first seq gap, and reports its index.
pub fn replay<'a>(
    mut record: HostRecord,
    events: impl IntoIterator<Item = &'a Event>,
    policy: &Policy,
) -> Result<HostRecord, (usize, TransitionError)> {
    for (idx, event) in events.into_iter().enumerate() {
        match step(&record, event, policy) {
            Ok(Outcome::Applied { record: next, .. }) => record = *next,
            Ok(Outcome::Duplicate { .. }) => {}
            Ok(Outcome::Gap { expected }) => {
                let gap = TransitionError::Refused {
                    state: record.state,
                    event: event.name(),
                    seq: event.seq,
                    hostname: record.hostname.clone(),
                    rollout_id: record.rollout_id.clone(),
                    reason: format!("seq gap: the next seq is {expected}"),
                };
                return Err((idx, gap));
            }
            Err(e) => return Err((idx, e)),
        }
    }
    Ok(record)
}

/// One transition in progress: the record before, the record being built,
/// and the side effects other than the journal entry (added in `finish`).
struct Tx<'a> {
    before: &'a HostRecord,
    event: &'a Event,
    next: HostRecord,
    effects: Vec<Effect>,
}

impl Tx<'_> {
    fn illegal(&self) -> TransitionError {
        TransitionError::Illegal {
            state: self.before.state,
            event: self.event.name(),
            seq: self.event.seq,
            hostname: self.before.hostname.clone(),
            rollout_id: self.before.rollout_id.clone(),
        }
    }

    fn refuse(&self, reason: impl Into<String>) -> TransitionError {
        TransitionError::Refused {
            state: self.before.state,
            event: self.event.name(),
            seq: self.event.seq,
            hostname: self.before.hostname.clone(),
            rollout_id: self.before.rollout_id.clone(),
            reason: reason.into(),
        }
    }

    fn local(&self) -> bool {
        self.event.origin == Origin::Local
    }

    fn transition(&mut self, to: HostState, at: Timestamp) {
        self.effects.push(Effect::RecordTransition { from: self.before.state, to, at });
        self.next.state = to;
    }

    /// Moves to Failed and, under rollback-and-halt, asks the agent to switch
    /// back to the closure it ran at dispatch.
    fn fail(&mut self, failure: Failure, at: Timestamp, policy_applied: OnHealthFailure) {
        self.transition(HostState::Failed, at);
        self.next.failed_at = Some(at);
        self.next.failure = Some(failure);
        self.next.policy_applied = Some(policy_applied);
        if policy_applied == OnHealthFailure::RollbackAndHalt {
            if let Some(to) = self.before.current_closure_at_dispatch.clone() {
                self.next.rollback_fired = true;
                if self.local() {
                    self.effects.push(Effect::FireRollback { to });
                }
            }
        }
    }

    /// The transition table (`docs/protocol.md` §3): one arm per legal
    /// (event, state) pair; the longer cases are the methods below.
    fn apply(&mut self, policy: &Policy) -> Result<(), TransitionError> {
        use HostState as S;
        let state = self.before.state;
        match (&self.event.body, state) {
            (
                EventBody::Activate { current_closure_at_dispatch, target_closure, soak_secs, received_at },
                S::Pending,
            ) => self.activate(current_closure_at_dispatch, target_closure, *soak_secs, *received_at)?,
            (EventBody::DispatchRejected { target_closure, code, reason, rejected_at }, S::Pending) => {
                self.dispatch_rejected(target_closure, *code, reason, *rejected_at);
            }
            (EventBody::ActivationStarted { started_at, switch_method }, S::Activating) => {
                self.next.activation_started_at = Some(*started_at);
                self.next.switch_method = Some(switch_method.clone());
            }
            (EventBody::ActivationDeferred { component, deferred_at }, S::Activating) => {
                self.next.deferred_at = Some(*deferred_at);
                self.next.deferred_component = Some(component.clone());
                self.transition(S::Deferred, *deferred_at);
            }
            (
                EventBody::ActivationCompleted { observed_current_closure, completed_at, .. },
                S::Activating | S::Deferred,
            ) => self.activation_completed(observed_current_closure, *completed_at, policy)?,
            (EventBody::ActivationFailed { exit_code, stderr_tail, failed_at }, S::Activating | S::Deferred) => {
                let failure = Failure::ActivationFailed { exit_code: *exit_code, stderr_tail: stderr_tail.clone() };
                self.fail(failure, *failed_at, policy.on_health_failure);
            }
            (EventBody::ProbeTopologyDeclared { probes, .. }, S::Soaking) => self.topology_declared(probes)?,
            (EventBody::ProbeObservedFirst { probe_name, mode, observed_at }, S::Soaking) => {
                self.require_declared(probe_name, *mode)?;
                let rec = self.probe_mut(probe_name, *mode);
                if rec.first_observed_at.is_none() {
                    rec.first_observed_at = Some(*observed_at);
                }
            }
            (EventBody::ProbeResult { probe_name, mode, status, observed_at, failure_reason }, S::Soaking) => {
                self.probe_result(probe_name, *mode, *status, *observed_at, failure_reason.as_deref())?;
            }
            (EventBody::ProbeFailureFirst { probe_name, mode, first_failed_at }, S::Soaking) => {
                self.failure_clock_started(probe_name, *mode, *first_failed_at)?;
            }
            (
                EventBody::SustainedFailureCrossed {
                    failed_at,
                    sustained_duration_secs,
                    failing_probes,
                    policy_applied,
                },
                S::Soaking,
            ) => self.sustained_failure_crossed(
                *failed_at,
                *sustained_duration_secs,
                failing_probes,
                *policy_applied,
                policy,
            )?,
            (EventBody::RollbackCompleted { reverted_to_closure, completed_at, .. }, S::Failed) => {
                self.rollback_completed(reverted_to_closure, *completed_at)?;
            }
            (EventBody::RollbackFailed { exit_code, stderr_tail, failed_at }, S::Failed) => {
                self.require_rollback_fired()?;
                self.next.rollback_failure = Some(RollbackFailure {
                    exit_code: *exit_code,
                    stderr_tail: stderr_tail.clone(),
                    failed_at: *failed_at,
                });
            }
            (EventBody::ConvergedReached { converged_at, current_closure }, S::Soaking) => {
                self.converged(*converged_at, current_closure)?;
            }
            _ => return Err(self.illegal()),
        }
        Ok(())
    }

    /// Pending + Activate: the dispatch was acked; the switch fires.
    fn activate(
        &mut self,
        current_closure_at_dispatch: &Closure,
        target_closure: &Closure,
        soak_secs: u64,
        received_at: Timestamp,
    ) -> Result<(), TransitionError> {
        if let Some(expected) = &self.before.target_closure {
            if expected != target_closure {
                return Err(
                    self.refuse(format!("target closure {target_closure} differs from the manifest's {expected}"))
                );
            }
        }
        // The soak deadline is computed later from this; reject a
        // length that cannot be added to an instant.
        duration_secs(soak_secs).ok_or_else(|| self.refuse("soak_secs is out of range"))?;
        self.next.target_closure = Some(target_closure.clone());
        self.next.current_closure_at_dispatch = Some(current_closure_at_dispatch.clone());
        self.next.soak_secs = Some(soak_secs);
        self.next.dispatch_acked_at = Some(received_at);
        self.transition(HostState::Activating, received_at);
        if self.local() {
            self.effects.push(Effect::FireActivation { target: target_closure.clone() });
        }
        Ok(())
    }

    /// Pending + DispatchRejected. Busy in another rollout (one live
    /// rollout per host): the host stays Pending and is offered the
    /// dispatch again later. Any other refusal fails the host. Either way
    /// the record names the closure it was offered, so an agent's journal
    /// alone rebuilds the CP's record: when the dispatch disagrees with the
    /// manifest that is the very reason for the refusal, and both sides
    /// then agree.
    fn dispatch_rejected(&mut self, target_closure: &Closure, code: RejectCode, reason: &str, rejected_at: Timestamp) {
        self.next.target_closure = Some(target_closure.clone());
        if code == RejectCode::Busy {
            return;
        }
        self.transition(HostState::Failed, rejected_at);
        self.next.failed_at = Some(rejected_at);
        self.next.failure = Some(Failure::DispatchRejected { reason: reason.to_owned() });
    }

    /// Activating or Deferred + ActivationCompleted: the soak starts on the
    /// target closure; any other closure is a failure.
    fn activation_completed(
        &mut self,
        observed_current_closure: &Closure,
        completed_at: Timestamp,
        policy: &Policy,
    ) -> Result<(), TransitionError> {
        self.next.activation_completed_at = Some(completed_at);
        self.next.current_closure = Some(observed_current_closure.clone());
        if self.before.target_closure.as_ref() == Some(observed_current_closure) {
            let soak = self.before.soak_secs.and_then(duration_secs).unwrap_or(Duration::ZERO);
            let due =
                completed_at.checked_add(soak).ok_or_else(|| self.refuse("completed_at + soak_secs overflows"))?;
            self.next.soak_due_at = Some(due);
            self.next.topology = None;
            self.next.probes.clear();
            self.next.failure_clock_since = None;
            self.transition(HostState::Soaking, completed_at);
            if self.local() {
                self.effects.push(Effect::ResetProbes);
            }
        } else {
            // Observed ≠ target is a failure, not a Soaking host that
            // can never converge (`docs/decisions.md`, "State machine, wire and queue" 8).
            let failure = Failure::WrongClosure { observed: observed_current_closure.clone() };
            self.fail(failure, completed_at, policy.on_health_failure);
        }
        Ok(())
    }

    /// Soaking + ProbeTopologyDeclared: names must be unique.
    fn topology_declared(&mut self, probes: &[ProbeDecl]) -> Result<(), TransitionError> {
        for (idx, probe) in probes.iter().enumerate() {
            if probes[..idx].iter().any(|p| p.name == probe.name) {
                return Err(self.refuse(format!("probe {:?} is declared twice", probe.name)));
            }
        }
        // A re-declaration (agent restart while soaking) keeps the
        // observations of probes that are still declared as they were.
        self.next.probes.retain(|name, rec| probes.iter().any(|p| &p.name == name && p.mode == rec.mode));
        self.next.topology = Some(probes.to_vec());
        self.reset_clock_if_recovered();
        Ok(())
    }

    /// Soaking + ProbeResult of a declared probe: its run of passes or
    /// failures.
    fn probe_result(
        &mut self,
        probe_name: &str,
        mode: ProbeMode,
        status: ProbeStatus,
        observed_at: Timestamp,
        failure_reason: Option<&str>,
    ) -> Result<(), TransitionError> {
        self.require_declared(probe_name, mode)?;
        let rec = self.probe_mut(probe_name, mode);
        rec.first_observed_at.get_or_insert(observed_at);
        rec.last_status = Some(status);
        rec.last_observed_at = Some(observed_at);
        match status {
            ProbeStatus::Pass => {
                rec.last_pass_at = Some(observed_at);
                rec.failing_since = None;
                rec.failure_reason = None;
            }
            ProbeStatus::Fail => {
                rec.failing_since.get_or_insert(observed_at);
                rec.failure_reason = failure_reason.map(str::to_owned);
            }
        }
        self.reset_clock_if_recovered();
        Ok(())
    }

    /// Soaking + ProbeFailureFirst: the sustained-failure clock starts at
    /// the first failure of an enforce probe's current run (rule 5).
    fn failure_clock_started(
        &mut self,
        probe_name: &str,
        mode: ProbeMode,
        first_failed_at: Timestamp,
    ) -> Result<(), TransitionError> {
        self.require_declared(probe_name, mode)?;
        if mode != ProbeMode::Enforce {
            return Err(self.refuse(format!(
                "probe {probe_name:?} is not in enforce mode; only enforce failures start the sustained-failure clock"
            )));
        }
        if let Some(since) = self.before.failure_clock_since {
            return Err(self.refuse(format!("the sustained-failure clock is already running since {since}")));
        }
        let failing_since = self.before.probes.get(probe_name).and_then(|r| r.failing_since);
        if failing_since != Some(first_failed_at) {
            return Err(self.refuse(format!("probe {probe_name:?} has no failure run starting at {first_failed_at}")));
        }
        self.next.failure_clock_since = Some(first_failed_at);
        Ok(())
    }

    /// Soaking + SustainedFailureCrossed: the clock ran long enough (rule
    /// 5), under the rollout's policy, and the failing probes named are
    /// failing now.
    fn sustained_failure_crossed(
        &mut self,
        failed_at: Timestamp,
        sustained_duration_secs: u64,
        failing_probes: &[String],
        policy_applied: OnHealthFailure,
        policy: &Policy,
    ) -> Result<(), TransitionError> {
        sustained_failure_holds(self.before, policy, failed_at).map_err(|r| self.refuse(r))?;
        if policy_applied != policy.on_health_failure {
            return Err(self.refuse(format!(
                "policy_applied {} differs from the rollout's policy {}",
                policy_applied.as_str(),
                policy.on_health_failure.as_str()
            )));
        }
        let failing_now = self.before.failing_enforce_probes();
        if failing_probes.is_empty() || failing_probes.iter().any(|p| !failing_now.contains(p)) {
            return Err(self.refuse(format!(
                "failing_probes {failing_probes:?} must be a non-empty subset of the failing enforce probes {failing_now:?}"
            )));
        }
        let failure =
            Failure::SustainedProbeFailure { failing_probes: failing_probes.to_vec(), sustained_duration_secs };
        self.fail(failure, failed_at, policy_applied);
        Ok(())
    }

    /// Failed + RollbackCompleted: only to the closure run at dispatch (rule
    /// 7); the CP then quarantines the target on the channel.
    fn rollback_completed(
        &mut self,
        reverted_to_closure: &Closure,
        completed_at: Timestamp,
    ) -> Result<(), TransitionError> {
        self.require_rollback_fired()?;
        let expected = self.before.current_closure_at_dispatch.as_ref();
        if expected != Some(reverted_to_closure) {
            return Err(self.refuse(format!(
                "reverted to {reverted_to_closure}, but the rollback target is {}",
                expected.map_or("unknown", Closure::as_str)
            )));
        }
        self.next.reverted_to = Some(reverted_to_closure.clone());
        self.next.reverted_at = Some(completed_at);
        self.next.current_closure = Some(reverted_to_closure.clone());
        self.transition(HostState::Reverted, completed_at);
        if let (Origin::Remote, Some(target)) = (self.event.origin, &self.before.target_closure) {
            self.effects.push(Effect::InsertQuarantine {
                channel: self.before.rollout_id.channel().to_owned(),
                closure: target.clone(),
            });
        }
        Ok(())
    }

    /// Soaking + ConvergedReached: on the target, and every gate of rule 4
    /// holds.
    fn converged(&mut self, converged_at: Timestamp, current_closure: &Closure) -> Result<(), TransitionError> {
        if self.before.target_closure.as_ref() != Some(current_closure) {
            return Err(self.refuse(format!("current closure {current_closure} is not the target")));
        }
        converge_holds(self.before, converged_at).map_err(|r| self.refuse(r))?;
        self.next.converged_at = Some(converged_at);
        self.next.current_closure = Some(current_closure.clone());
        self.transition(HostState::Converged, converged_at);
        Ok(())
    }

    fn require_declared(&self, probe_name: &str, mode: ProbeMode) -> Result<(), TransitionError> {
        match self.before.declared_mode(probe_name) {
            None => Err(self.refuse(format!("probe {probe_name:?} is not in the declared topology"))),
            Some(declared) if declared != mode => {
                Err(self.refuse(format!("probe {probe_name:?} is declared {declared:?} but the event says {mode:?}")))
            }
            Some(_) => Ok(()),
        }
    }

    fn require_rollback_fired(&self) -> Result<(), TransitionError> {
        if self.before.rollback_fired {
            Ok(())
        } else {
            Err(self.refuse("no rollback was fired for this host (policy halt, or the dispatch was rejected)"))
        }
    }

    fn probe_mut(&mut self, probe_name: &str, mode: ProbeMode) -> &mut ProbeRecord {
        self.next.probes.entry(probe_name.to_owned()).or_insert_with(|| ProbeRecord::new(mode))
    }

    /// `docs/protocol.md` §3 rule 5: the clock resets once no enforce probe is failing.
    fn reset_clock_if_recovered(&mut self) {
        if self.next.failing_enforce_probes().is_empty() {
            self.next.failure_clock_since = None;
        }
    }

    fn finish(self) -> Outcome {
        let journal = match self.event.origin {
            Origin::Local => Effect::EmitOutbound { seq: self.event.seq, body: self.event.body.clone() },
            Origin::Remote => Effect::AppendEventLog { seq: self.event.seq, body: self.event.body.clone() },
        };
        let mut effects = Vec::with_capacity(self.effects.len() + 1);
        effects.push(journal);
        effects.extend(self.effects);
        Outcome::Applied { record: Box::new(self.next), effects }
    }
}

pub(super) fn duration_secs(secs: u64) -> Option<Duration> {
    // Bound to ~292 billion years by i64; anything near that overflows an
    // instant anyway, so refuse instead of wrapping.
    i64::try_from(secs).ok().map(Duration::seconds)
}

/// `docs/protocol.md` §3 rule 4, shared by `step` (checking a claim) and the converge gate
/// (deciding to make one): `Err` says what still blocks convergence.
pub(super) fn converge_holds(record: &HostRecord, at: Timestamp) -> Result<(), String> {
    if record.state != HostState::Soaking {
        return Err(format!("host is {}, not Soaking", record.state));
    }
    if record.current_closure.is_none() || record.current_closure != record.target_closure {
        return Err("the host does not run the target closure".to_owned());
    }
    match record.soak_due_at {
        Some(due) if at >= due => {}
        Some(due) => return Err(format!("the soak window runs until {due}")),
        None => return Err("the soak window has not started".to_owned()),
    }
    if record.topology.is_none() {
        return Err("no probe topology was declared since the activation".to_owned());
    }
    for probe in record.enforce_probes() {
        match record.probes.get(&probe.name).and_then(|r| r.last_status) {
            Some(ProbeStatus::Pass) => {}
            Some(ProbeStatus::Fail) => return Err(format!("enforce probe {:?} is failing", probe.name)),
            None => return Err(format!("enforce probe {:?} has not been observed since the activation", probe.name)),
        }
    }
    Ok(())
}

/// `docs/protocol.md` §3 rule 5, shared by `step` and the failure gate.
pub(super) fn sustained_failure_holds(record: &HostRecord, policy: &Policy, at: Timestamp) -> Result<(), String> {
    if record.state != HostState::Soaking {
        return Err(format!("host is {}, not Soaking", record.state));
    }
    let Some(since) = record.failure_clock_since else {
        return Err("the sustained-failure clock is not running".to_owned());
    };
    let threshold = duration_secs(policy.sustained_failure_secs).unwrap_or(Duration::MAX);
    if at - since < threshold {
        return Err(format!(
            "enforce probes have failed only since {since}, less than {}s",
            policy.sustained_failure_secs
        ));
    }
    if record.failing_enforce_probes().is_empty() {
        return Err("no enforce probe is failing".to_owned());
    }
    Ok(())
}
