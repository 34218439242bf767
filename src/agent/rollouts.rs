//! The agent's per-rollout records and the decisions made on them, without
//! I/O: the part of the agent's reducer that can be tested with plain
//! values. The runtime owns one [`Rollouts`] and is its only caller.
//!
//! Write-ahead protocol (`docs/protocol.md` §5): for every event the runtime calls
//! [`Rollouts::prepare`], which runs `step` on a copy and assigns the next
//! seq; the runtime makes the outbound event durable in the queue; only then
//! does it call [`Rollouts::commit`] and execute the remaining effects. If
//! the enqueue fails nothing is committed, so the record never runs ahead of
//! the journal and the same event can be prepared again.

use std::collections::BTreeMap;

use super::activation::{ActivationOutcome, EXIT_CODE_COMPLETED};
use super::channels::ChannelHistory;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{
    due_event, failure_clock_start_due, replay, step, Effect, Event, EventBody, HostRecord, HostState, Outcome, Policy,
    ProbeMode, ProbeStatus, Timestamp, TransitionError,
};

/// One rollout as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub record: HostRecord,
    pub policy: Policy,
}

impl Slot {
    /// `docs/protocol.md` §3 rule 8: the rollout still acts on the host (Activating,
    /// Deferred, Soaking, or Failed with a rollback fired whose outcome is
    /// not recorded). While one is live no other rollout is accepted. A
    /// failed rollback ends it: the operator decides, and the next rollout
    /// may be the fix.
    pub fn is_live(&self) -> bool {
        let r = &self.record;
        matches!(r.state, HostState::Activating | HostState::Deferred | HostState::Soaking)
            || (r.state == HostState::Failed && r.rollback_fired && r.rollback_failure.is_none())
    }
}

/// What THIS run of the agent has seen of a soaking rollout's probes. Never
/// journaled: a restart starts empty, which is the point (`docs/protocol.md`
/// §3 rule 6: decisions need fresh evidence). The gates' other inputs are the record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunEvidence {
    /// The latest result of each probe in this run.
    pub latest: BTreeMap<String, (ProbeStatus, Timestamp)>,
    /// When this run first saw an enforce probe fail while the
    /// sustained-failure clock ran (cleared when the clock resets). Equal to
    /// the record's clock start in a run that saw the failure begin; later
    /// after a restart, so the failure clock never spans the agent's downtime.
    pub failing_since: Option<Timestamp>,
}

/// An event ready to be journaled, with the record it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub rollout_id: RolloutId,
    pub event: Event,
    pub record: HostRecord,
    /// `effects[0]` is the `EmitOutbound` to journal; the rest run after.
    pub effects: Vec<Effect>,
}

impl Prepared {
    /// The effects to run once the event is durable (everything but the
    /// journal entry itself).
    pub fn actions(&self) -> impl Iterator<Item = &Effect> {
        self.effects.iter().filter(|e| !matches!(e, Effect::EmitOutbound { .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutsError {
    #[error("no record for rollout {0} on this host")]
    UnknownRollout(RolloutId),
    #[error(transparent)]
    Transition(Box<TransitionError>),
    #[error("journal of rollout {rollout_id} does not replay at event {index}: {source}")]
    Replay { rollout_id: RolloutId, index: usize, source: Box<TransitionError> },
}

impl From<TransitionError> for RolloutsError {
    fn from(e: TransitionError) -> RolloutsError {
        RolloutsError::Transition(Box::new(e))
    }
}

/// Every rollout this host has seen, by id.
#[derive(Debug, Clone)]
pub struct Rollouts {
    hostname: Hostname,
    /// Boxed: a slot is about 520 bytes, and a B-tree leaf holds room for
    /// 11, so an agent's first rollout cost a 6 KB leaf here and another in
    /// the reducer's snapshot (72 MB of a 10,000-host simulation).
    slots: BTreeMap<RolloutId, Box<Slot>>,
    /// The newest manifest accepted per channel (no downgrade).
    channels: ChannelHistory,
    /// Run-local probe evidence per soaking rollout.
    evidence: BTreeMap<RolloutId, RunEvidence>,
}

impl Rollouts {
    /// No rollouts and an in-memory channel history; the agent's start-up
    /// rebuild installs the durable one ([`Rollouts::set_channels`]).
    pub fn new(hostname: Hostname) -> Rollouts {
        Rollouts { hostname, slots: BTreeMap::new(), channels: ChannelHistory::in_memory(), evidence: BTreeMap::new() }
    }

    pub fn channels(&self) -> &ChannelHistory {
        &self.channels
    }

    /// Installs the channel history (loaded at start, or just made durable
    /// by the reducer before it journals a DispatchAck).
    pub fn set_channels(&mut self, channels: ChannelHistory) {
        self.channels = channels;
    }

    pub fn hostname(&self) -> &Hostname {
        &self.hostname
    }

    /// Rebuilds one rollout from its journal (pending + acked events, in seq
    /// order) at start, before any worker runs.
    pub fn restore(&mut self, rollout_id: RolloutId, policy: Policy, journal: &[Event]) -> Result<(), RolloutsError> {
        self.restore_bridged(rollout_id, policy, journal, &[])
    }

    /// [`Rollouts::restore`] of a history with lost visibility events
    /// (`agent::rebuild`): each seq in `bridged` is spent without content,
    /// so the record's `last_seq` still matches the queue. The one change of
    /// a record that does not go through `step`: the lost event's content is
    /// unknown and is not guessed; every readable event is still replayed
    /// through `step`, which refuses a history the gap made illegal.
    pub fn restore_bridged(
        &mut self,
        rollout_id: RolloutId,
        policy: Policy,
        journal: &[Event],
        bridged: &[u64],
    ) -> Result<(), RolloutsError> {
        let mut record = HostRecord::pending(rollout_id.clone(), self.hostname.clone(), None);
        for (index, event) in journal.iter().enumerate() {
            while record.last_seq + 1 < event.seq && bridged.contains(&(record.last_seq + 1)) {
                record.last_seq += 1;
            }
            record = replay(record, std::slice::from_ref(event), &policy).map_err(|(_, source)| {
                RolloutsError::Replay { rollout_id: rollout_id.clone(), index, source: Box::new(source) }
            })?;
        }
        self.slots.insert(rollout_id, Box::new(Slot { record, policy }));
        Ok(())
    }

    /// Makes sure a Pending record exists for a dispatch and says whether
    /// the dispatch needs an answer: true for a new rollout and for one
    /// still Pending (refused `busy` earlier; its policy becomes the one
    /// just verified), false for a rollout past Pending (a repeated
    /// long-poll answer, ignored).
    pub fn open(&mut self, rollout_id: &RolloutId, policy: Policy) -> bool {
        if let Some(slot) = self.slots.get_mut(rollout_id) {
            if slot.record.state != HostState::Pending {
                return false;
            }
            slot.policy = policy;
            return true;
        }
        let record = HostRecord::pending(rollout_id.clone(), self.hostname.clone(), None);
        self.slots.insert(rollout_id.clone(), Box::new(Slot { record, policy }));
        true
    }

    /// The live rollout other than `except` (`docs/protocol.md` §3 rule 8). With several (only a
    /// journal written before that rule can hold that), the one accepted last.
    pub fn live(&self, except: Option<&RolloutId>) -> Option<(&RolloutId, &Slot)> {
        self.iter()
            .filter(|(id, s)| Some(*id) != except && s.is_live())
            .max_by_key(|(id, s)| (s.record.dispatch_acked_at, *id))
    }

    /// Whether a dispatch of `rollout_id` needs no new answer: the rollout
    /// is past Pending, or it is Pending after a `busy` refusal while a
    /// rollout is still live (the CP repeats its offer; one refusal per
    /// rollout is enough, and it is durable, so a restart does not repeat
    /// it either). The long-poll worker skips such offers with its backoff.
    pub fn answered(&self, rollout_id: &RolloutId) -> bool {
        match self.slots.get(rollout_id) {
            None => false,
            Some(s) if s.record.state != HostState::Pending => true,
            Some(s) => s.record.last_seq > 0 && self.live(Some(rollout_id)).is_some(),
        }
    }

    /// The rollout accepted after `rollout_id`'s own acceptance, if any.
    /// Rule 7 makes this impossible for a live rollout from now on; a
    /// journal written before it may hold one, and then the older rollout
    /// must never act again (no gate, probe or rollback of A after B).
    pub fn accepted_after(&self, rollout_id: &RolloutId) -> Option<&RolloutId> {
        let acked = self.slots.get(rollout_id)?.record.dispatch_acked_at?;
        self.slots
            .iter()
            .filter(|(id, s)| *id != rollout_id && s.record.dispatch_acked_at.is_some_and(|t| t > acked))
            .map(|(id, _)| id)
            .next()
    }

    /// Installs a slot as is: for a read-only copy (the reducer's snapshot)
    /// that mirrors the reducer's own slots.
    pub fn set(&mut self, rollout_id: RolloutId, slot: Slot) {
        self.slots.insert(rollout_id, Box::new(slot));
    }

    pub fn get(&self, rollout_id: &RolloutId) -> Option<&Slot> {
        self.slots.get(rollout_id).map(|s| &**s)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RolloutId, &Slot)> {
        self.slots.iter().map(|(id, s)| (id, &**s))
    }

    /// Highest seq per rollout, for the heartbeat's `last_seq`.
    pub fn last_seqs(&self) -> BTreeMap<RolloutId, u64> {
        self.slots.iter().map(|(id, s)| (id.clone(), s.record.last_seq)).collect()
    }

    /// Runs `step` on a copy with the next seq. `Ok(None)` means nothing to
    /// journal (cannot happen for a fresh seq, kept for totality).
    pub fn prepare(&self, rollout_id: &RolloutId, body: EventBody) -> Result<Prepared, RolloutsError> {
        let slot = self.slots.get(rollout_id).ok_or_else(|| RolloutsError::UnknownRollout(rollout_id.clone()))?;
        let event = Event::local(slot.record.last_seq + 1, body);
        match step(&slot.record, &event, &slot.policy)? {
            Outcome::Applied { record, effects } => {
                Ok(Prepared { rollout_id: rollout_id.clone(), event, record: *record, effects })
            }
            // A fresh seq is never a duplicate nor a gap; report it as the
            // illegal pair it would be rather than panic.
            Outcome::Duplicate { .. } | Outcome::Gap { .. } => Err(RolloutsError::from(TransitionError::Illegal {
                state: slot.record.state,
                event: event.name(),
                seq: event.seq,
                hostname: self.hostname.clone(),
                rollout_id: rollout_id.clone(),
            })),
        }
    }

    /// Installs the record of a prepared event whose outbound event is now
    /// durable. A stale preparation (another event was committed since) is
    /// refused, so the journal and the record cannot diverge.
    pub fn commit(&mut self, prepared: Prepared) -> Result<(), RolloutsError> {
        let slot = self
            .slots
            .get_mut(&prepared.rollout_id)
            .ok_or_else(|| RolloutsError::UnknownRollout(prepared.rollout_id.clone()))?;
        if slot.record.last_seq + 1 != prepared.event.seq {
            return Err(RolloutsError::from(TransitionError::Refused {
                state: slot.record.state,
                event: prepared.event.name(),
                seq: prepared.event.seq,
                hostname: self.hostname.clone(),
                rollout_id: prepared.rollout_id.clone(),
                reason: format!("stale preparation: last seq is now {}", slot.record.last_seq),
            }));
        }
        let entered_soak = slot.record.state != HostState::Soaking && prepared.record.state == HostState::Soaking;
        slot.record = prepared.record;
        if entered_soak {
            // A new activation: evidence of an earlier soak is not evidence.
            self.evidence.remove(&prepared.rollout_id);
        }
        Ok(())
    }

    /// The time-driven events due at `now`, one per rollout (failure before
    /// convergence), for the tick. Rule 9: a decision (sustained failure or
    /// convergence) needs a result of every enforce probe from this run, and
    /// the sustained-failure threshold counts from this run's own failure
    /// start ([`RunEvidence::failing_since`]), never across the downtime.
    pub fn due(&self, now: Timestamp) -> Vec<(RolloutId, EventBody)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.record.state == HostState::Soaking)
            .filter(|(id, _)| self.accepted_after(id).is_none())
            .filter_map(|(id, s)| self.due_one(id, s, now).map(|body| (id.clone(), body)))
            .collect()
    }

    fn due_one(&self, rollout_id: &RolloutId, slot: &Slot, now: Timestamp) -> Option<EventBody> {
        let body = due_event(&slot.record, &slot.policy, now)?;
        let decision = matches!(body, EventBody::SustainedFailureCrossed { .. } | EventBody::ConvergedReached { .. });
        if !decision {
            return Some(body);
        }
        let evidence = self.evidence.get(rollout_id);
        let fresh = slot.record.enforce_probes().all(|p| evidence.is_some_and(|e| e.latest.contains_key(&p.name)));
        if !fresh {
            return None;
        }
        match body {
            EventBody::SustainedFailureCrossed { failed_at, failing_probes, policy_applied, .. } => {
                let since = evidence.and_then(|e| e.failing_since)?;
                // Name only probes this run saw failing last.
                let failing_probes: Vec<String> = failing_probes
                    .into_iter()
                    .filter(|p| evidence.and_then(|e| e.latest.get(p)).is_some_and(|(s, _)| *s == ProbeStatus::Fail))
                    .collect();
                if failing_probes.is_empty() {
                    return None;
                }
                let threshold = i64::try_from(slot.policy.sustained_failure_secs).unwrap_or(i64::MAX);
                let ran_secs = (now - since).whole_seconds();
                if ran_secs < threshold {
                    return None;
                }
                Some(EventBody::SustainedFailureCrossed {
                    failed_at,
                    sustained_duration_secs: u64::try_from(ran_secs).unwrap_or(0),
                    failing_probes,
                    policy_applied,
                })
            }
            EventBody::ConvergedReached { .. } => {
                // Converge on what this run saw last, too.
                let all_pass = slot.record.enforce_probes().all(|p| {
                    evidence.and_then(|e| e.latest.get(&p.name)).is_some_and(|(s, _)| *s == ProbeStatus::Pass)
                });
                all_pass.then_some(body)
            }
            other => Some(other),
        }
    }

    /// Notes one probe result in this run's evidence and returns the events
    /// it implies: `ProbeObservedFirst` the first time the probe is seen
    /// since the activation, and `ProbeResult` only when the status differs
    /// from the record's (a change) or on the probe's first result in this
    /// run. The machine's gates depend only on those (the latest status, the
    /// start of a failure run), so a steady probe adds no events: at 1 Hz
    /// the queue no longer fills during a long CP outage.
    pub fn observe_probe(
        &mut self,
        rollout_id: &RolloutId,
        probe_name: &str,
        mode: ProbeMode,
        status: ProbeStatus,
        failure_reason: Option<String>,
        at: Timestamp,
    ) -> Vec<EventBody> {
        let Some(slot) = self.slots.get(rollout_id) else { return Vec::new() };
        let evidence = self.evidence.entry(rollout_id.clone()).or_default();
        let first_in_run = evidence.latest.insert(probe_name.to_owned(), (status, at)).is_none();
        let recorded = slot.record.probes.get(probe_name);
        let seen = recorded.is_some_and(|p| p.first_observed_at.is_some());
        let changed = recorded.and_then(|p| p.last_status) != Some(status);
        let mut bodies = Vec::with_capacity(2);
        if !seen {
            bodies.push(EventBody::ProbeObservedFirst { probe_name: probe_name.to_owned(), mode, observed_at: at });
        }
        if changed || first_in_run {
            bodies.push(EventBody::ProbeResult {
                probe_name: probe_name.to_owned(),
                mode,
                status,
                observed_at: at,
                failure_reason: if status == ProbeStatus::Fail { failure_reason } else { None },
            });
        }
        bodies
    }

    /// Keeps this run's failure start in step with the record after the
    /// events of a probe result (or a topology) were committed: cleared when
    /// the record's clock is not running, set at the first failing enforce
    /// result this run sees while it runs.
    pub fn note_failure_clock(&mut self, rollout_id: &RolloutId, failing_enforce_at: Option<Timestamp>) {
        let Some(slot) = self.slots.get(rollout_id) else { return };
        let running = slot.record.failure_clock_since.is_some();
        let evidence = self.evidence.entry(rollout_id.clone()).or_default();
        // Every enforce probe passed in this run even if a full queue kept
        // the record from hearing it: this run's failure run is over.
        let recovered = slot
            .record
            .enforce_probes()
            .all(|p| evidence.latest.get(&p.name).is_some_and(|(status, _)| *status == ProbeStatus::Pass));
        if !running || recovered {
            evidence.failing_since = None;
        } else if evidence.failing_since.is_none() {
            evidence.failing_since = failing_enforce_at;
        }
    }

    pub fn evidence(&self, rollout_id: &RolloutId) -> Option<&RunEvidence> {
        self.evidence.get(rollout_id)
    }

    /// `ProbeFailureFirst` right after a failing result, so the failure
    /// clock starts at the failure rather than at the next tick.
    pub fn failure_clock_start(&self, rollout_id: &RolloutId) -> Option<EventBody> {
        self.slots.get(rollout_id).and_then(|s| failure_clock_start_due(&s.record))
    }

    /// The rollouts whose activation the agent must (re)order after a restart:
    /// Activating (outcome unknown), Deferred (a reboot may have finished
    /// it: the activation worker reports Completed when the host provably
    /// runs the target, and otherwise re-runs the idempotent boot setup), or
    /// Failed with a rollback whose outcome was never recorded.
    /// A rollout accepted before another one never acts again (`docs/protocol.md` §3
    /// rule 8).
    pub fn unfinished_activations(&self) -> Vec<(RolloutId, HostState)> {
        self.slots
            .iter()
            .filter(|(id, _)| self.accepted_after(id).is_none())
            .filter(|(_, s)| {
                let r = &s.record;
                matches!(r.state, HostState::Activating | HostState::Deferred)
                    || (r.state == HostState::Failed && r.rollback_fired && r.rollback_failure.is_none())
            })
            .map(|(id, s)| (id.clone(), s.record.state))
            .collect()
    }
}

/// The event for a finished forward activation.
pub fn forward_body(outcome: ActivationOutcome, at: Timestamp) -> EventBody {
    match outcome {
        ActivationOutcome::Completed { observed } => EventBody::ActivationCompleted {
            observed_current_closure: observed,
            exit_code: EXIT_CODE_COMPLETED,
            completed_at: at,
        },
        ActivationOutcome::Deferred { component } => EventBody::ActivationDeferred { component, deferred_at: at },
        ActivationOutcome::Failed { exit_code, stderr_tail } => {
            EventBody::ActivationFailed { exit_code, stderr_tail, failed_at: at }
        }
    }
}

/// The event for a finished rollback activation. A rollback that "completed" on
/// another closure than its target, or was deferred to a reboot, did not
/// restore the host and is reported as failed with the reason.
pub fn rollback_body(target: &Closure, outcome: ActivationOutcome, at: Timestamp) -> EventBody {
    match outcome {
        ActivationOutcome::Completed { observed } if &observed == target => EventBody::RollbackCompleted {
            reverted_to_closure: observed,
            exit_code: EXIT_CODE_COMPLETED,
            completed_at: at,
        },
        ActivationOutcome::Completed { observed } => EventBody::RollbackFailed {
            exit_code: EXIT_CODE_COMPLETED,
            stderr_tail: format!("rollback finished but the host runs {observed}, not {target}"),
            failed_at: at,
        },
        ActivationOutcome::Deferred { component } => EventBody::RollbackFailed {
            exit_code: 0,
            stderr_tail: format!("rollback needs a reboot ({component}); the host still runs the failed closure"),
            failed_at: at,
        },
        ActivationOutcome::Failed { exit_code, stderr_tail } => {
            EventBody::RollbackFailed { exit_code, stderr_tail, failed_at: at }
        }
    }
}

#[cfg(test)]
mod tests {
    use time::Duration;

    use super::*;
    use crate::agent::testkit::{closure, policy, rid, T0};
    use crate::machine::{ProbeDecl, ProbeKind};

    /// Prepares, "journals" into `journal`, commits; returns the actions.
    fn apply(r: &mut Rollouts, journal: &mut Vec<Event>, body: EventBody) -> Vec<Effect> {
        let prepared = r.prepare(&rid(), body).expect("legal");
        let Some(Effect::EmitOutbound { seq, body }) = prepared.effects.first() else { panic!("journal first") };
        journal.push(Event::local(*seq, body.clone()));
        let actions = prepared.actions().filter(|e| !matches!(e, Effect::RecordTransition { .. })).cloned().collect();
        r.commit(prepared).expect("fresh");
        actions
    }

    #[test]
    fn a_whole_rollout_then_a_restart_from_the_journal_resumes_the_same_record() {
        // Proves the write-ahead protocol end to end on plain values and
        // that a restart rebuilds exactly the live record.
        let host = Hostname::parse("web-1").expect("valid");
        let mut r = Rollouts::new(host.clone());
        let mut journal = Vec::new();
        assert!(r.open(&rid(), policy()));
        assert!(r.open(&rid(), policy()), "still Pending: the dispatch still needs its answer");
        let fx = apply(
            &mut r,
            &mut journal,
            EventBody::Activate {
                current_closure_at_dispatch: closure('0'),
                target_closure: closure('1'),
                soak_secs: 30,
                received_at: T0,
            },
        );
        assert_eq!(fx, vec![Effect::FireActivation { target: closure('1') }]);
        assert!(!r.open(&rid(), policy()), "a repeated dispatch is ignored");
        assert_eq!(r.unfinished_activations(), vec![(rid(), HostState::Activating)]);
        let done = ActivationOutcome::Completed { observed: closure('1') };
        apply(&mut r, &mut journal, forward_body(done, T0 + Duration::seconds(5)));
        let decl = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        apply(&mut r, &mut journal, EventBody::ProbeTopologyDeclared { probes: decl, declared_at: T0 });
        let t = T0 + Duration::seconds(10);
        for body in r.observe_probe(&rid(), "web", ProbeMode::Enforce, ProbeStatus::Fail, Some("503".into()), t) {
            apply(&mut r, &mut journal, body);
        }
        let start = r.failure_clock_start(&rid()).expect("clock starts at once");
        apply(&mut r, &mut journal, start);
        r.note_failure_clock(&rid(), Some(t));
        assert_eq!(r.due(t + Duration::seconds(59)), vec![]);
        let due = r.due(t + Duration::seconds(60));
        assert_eq!(due.len(), 1);
        let fx = apply(&mut r, &mut journal, due[0].1.clone());
        assert!(fx.contains(&Effect::FireRollback { to: closure('0') }), "{fx:?}");
        assert_eq!(r.unfinished_activations(), vec![(rid(), HostState::Failed)]);

        let mut restarted = Rollouts::new(host);
        restarted.restore(rid(), policy(), &journal).expect("replays");
        assert_eq!(restarted.get(&rid()), r.get(&rid()));
        assert_eq!(restarted.last_seqs(), r.last_seqs());
        assert_eq!(restarted.unfinished_activations(), vec![(rid(), HostState::Failed)]);

        let back = ActivationOutcome::Completed { observed: closure('0') };
        apply(&mut r, &mut journal, rollback_body(&closure('0'), back, t + Duration::seconds(70)));
        assert_eq!(r.get(&rid()).expect("slot").record.state, HostState::Reverted);
        assert!(r.unfinished_activations().is_empty());
    }

    #[test]
    fn an_uncommitted_preparation_changes_nothing_and_a_stale_one_is_refused() {
        // Proves a failed enqueue (prepare without commit) leaves the record
        // as it was, and that committing out of order is impossible.
        let mut r = Rollouts::new(Hostname::parse("web-1").expect("valid"));
        r.open(&rid(), policy());
        let body = EventBody::DispatchRejected {
            target_closure: closure('1'),
            code: crate::machine::RejectCode::Refused,
            reason: "x".into(),
            rejected_at: T0,
        };
        let first = r.prepare(&rid(), body.clone()).expect("legal");
        assert_eq!(r.get(&rid()).expect("slot").record.state, HostState::Pending);
        let again = r.prepare(&rid(), body).expect("still legal");
        assert_eq!(first, again, "preparing twice gives the same seq and record");
        r.commit(first).expect("commit");
        let stale = r.commit(again).expect_err("stale");
        assert!(stale.to_string().contains("stale preparation"), "{stale}");
        assert!(matches!(
            r.prepare(
                &RolloutId::parse("other@r").expect("valid"),
                EventBody::ActivationStarted { started_at: T0, switch_method: "x".into() }
            ),
            Err(RolloutsError::UnknownRollout(_))
        ));
    }

    #[test]
    fn rollback_outcomes_that_did_not_restore_the_host_are_failures() {
        // Proves a rollback landing on the wrong closure or needing a reboot
        // is reported as RollbackFailed, never as a completed rollback.
        let target = closure('0');
        let wrong = ActivationOutcome::Completed { observed: closure('2') };
        assert!(matches!(rollback_body(&target, wrong, T0), EventBody::RollbackFailed { .. }));
        let deferred = ActivationOutcome::Deferred { component: "kernel".into() };
        assert!(matches!(rollback_body(&target, deferred, T0), EventBody::RollbackFailed { .. }));
        let ok = ActivationOutcome::Completed { observed: target.clone() };
        assert!(matches!(rollback_body(&target, ok, T0), EventBody::RollbackCompleted { .. }));
    }

    #[test]
    fn a_corrupt_journal_is_reported_with_its_position() {
        // Proves restore names the rollout and the index of the first event
        // that does not replay.
        let mut r = Rollouts::new(Hostname::parse("web-1").expect("valid"));
        let journal = vec![Event::local(1, EventBody::ActivationStarted { started_at: T0, switch_method: "x".into() })];
        let err = r.restore(rid(), policy(), &journal).expect_err("illegal from Pending");
        assert!(matches!(err, RolloutsError::Replay { index: 0, .. }), "{err}");
        assert!(err.to_string().contains("stable@r1"), "{err}");
    }
}
