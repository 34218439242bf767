//! The agent's per-rollout records and the decisions made on them, without
//! I/O: the part of the agent's reducer that can be tested with plain
//! values. The runtime owns one [`Rollouts`] and is its only caller.
//!
//! Write-ahead protocol (SPEC §6): for every event the runtime calls
//! [`Rollouts::prepare`], which runs `step` on a copy and assigns the next
//! seq; the runtime makes the outbound event durable in the queue; only then
//! does it call [`Rollouts::commit`] and execute the remaining effects. If
//! the enqueue fails nothing is committed, so the record never runs ahead of
//! the journal and the same event can be prepared again.

use std::collections::BTreeMap;

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

/// What a finished switch (forward or rollback) reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchOutcome {
    /// `current-system` now resolves to `observed`.
    Completed {
        observed: Closure,
        exit_code: i32,
    },
    /// Profile set for the next boot; a reboot will finish it.
    Deferred {
        component: String,
    },
    Failed {
        exit_code: i32,
        stderr_tail: String,
    },
}

/// Every rollout this host has seen, by id.
#[derive(Debug, Clone)]
pub struct Rollouts {
    hostname: Hostname,
    slots: BTreeMap<RolloutId, Slot>,
}

impl Rollouts {
    pub fn new(hostname: Hostname) -> Rollouts {
        Rollouts { hostname, slots: BTreeMap::new() }
    }

    pub fn hostname(&self) -> &Hostname {
        &self.hostname
    }

    /// Rebuilds one rollout from its journal (pending + acked events, in seq
    /// order) at start, before any worker runs.
    pub fn restore(&mut self, rollout_id: RolloutId, policy: Policy, journal: &[Event]) -> Result<(), RolloutsError> {
        let fresh = HostRecord::pending(rollout_id.clone(), self.hostname.clone(), None);
        let record = replay(fresh, journal, &policy).map_err(|(index, source)| RolloutsError::Replay {
            rollout_id: rollout_id.clone(),
            index,
            source: Box::new(source),
        })?;
        self.slots.insert(rollout_id, Slot { record, policy });
        Ok(())
    }

    /// Opens a Pending record for a new dispatch. Returns false (and changes
    /// nothing) when the rollout is already known: a repeated long-poll
    /// answer for a rollout in progress is ignored.
    pub fn open(&mut self, rollout_id: &RolloutId, policy: Policy) -> bool {
        if self.slots.contains_key(rollout_id) {
            return false;
        }
        let record = HostRecord::pending(rollout_id.clone(), self.hostname.clone(), None);
        self.slots.insert(rollout_id.clone(), Slot { record, policy });
        true
    }

    /// Installs a slot as is: for a read-only copy (the reducer's snapshot)
    /// that mirrors the reducer's own slots.
    pub fn set(&mut self, rollout_id: RolloutId, slot: Slot) {
        self.slots.insert(rollout_id, slot);
    }

    pub fn get(&self, rollout_id: &RolloutId) -> Option<&Slot> {
        self.slots.get(rollout_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RolloutId, &Slot)> {
        self.slots.iter()
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
        slot.record = prepared.record;
        Ok(())
    }

    /// The time-driven events due at `now`, one per rollout (failure before
    /// convergence), for the tick.
    pub fn due(&self, now: Timestamp) -> Vec<(RolloutId, EventBody)> {
        self.slots
            .iter()
            .filter(|(_, s)| s.record.state == HostState::Soaking)
            .filter_map(|(id, s)| due_event(&s.record, &s.policy, now).map(|body| (id.clone(), body)))
            .collect()
    }

    /// `ProbeFailureFirst` right after a failing result, so the failure
    /// clock starts at the failure rather than at the next tick.
    pub fn failure_clock_start(&self, rollout_id: &RolloutId) -> Option<EventBody> {
        self.slots.get(rollout_id).and_then(|s| failure_clock_start_due(&s.record))
    }

    /// The rollouts whose switch the agent must (re)fire after a restart:
    /// Activating (outcome unknown), Deferred (a reboot may have finished
    /// it: the activation worker reports Completed when the host provably
    /// runs the target, and otherwise re-runs the idempotent boot setup), or
    /// Failed with a rollback whose outcome was never recorded.
    pub fn unfinished_switches(&self) -> Vec<(RolloutId, HostState)> {
        self.slots
            .iter()
            .filter(|(_, s)| {
                let r = &s.record;
                matches!(r.state, HostState::Activating | HostState::Deferred)
                    || (r.state == HostState::Failed && r.rollback_fired && r.rollback_failure.is_none())
            })
            .map(|(id, s)| (id.clone(), s.record.state))
            .collect()
    }
}

/// The event for a finished forward switch.
pub fn switch_body(outcome: SwitchOutcome, at: Timestamp) -> EventBody {
    match outcome {
        SwitchOutcome::Completed { observed, exit_code } => {
            EventBody::ActivationCompleted { observed_current_closure: observed, exit_code, completed_at: at }
        }
        SwitchOutcome::Deferred { component } => EventBody::ActivationDeferred { component, deferred_at: at },
        SwitchOutcome::Failed { exit_code, stderr_tail } => {
            EventBody::ActivationFailed { exit_code, stderr_tail, failed_at: at }
        }
    }
}

/// The event for a finished rollback. A rollback that "completed" on
/// another closure than its target, or was deferred to a reboot, did not
/// restore the host and is reported as failed with the reason.
pub fn rollback_body(target: &Closure, outcome: SwitchOutcome, at: Timestamp) -> EventBody {
    match outcome {
        SwitchOutcome::Completed { observed, exit_code } if &observed == target => {
            EventBody::RollbackCompleted { reverted_to_closure: observed, exit_code, completed_at: at }
        }
        SwitchOutcome::Completed { observed, exit_code } => EventBody::RollbackFailed {
            exit_code,
            stderr_tail: format!("rollback finished but the host runs {observed}, not {target}"),
            failed_at: at,
        },
        SwitchOutcome::Deferred { component } => EventBody::RollbackFailed {
            exit_code: 0,
            stderr_tail: format!("rollback needs a reboot ({component}); the host still runs the failed closure"),
            failed_at: at,
        },
        SwitchOutcome::Failed { exit_code, stderr_tail } => {
            EventBody::RollbackFailed { exit_code, stderr_tail, failed_at: at }
        }
    }
}

/// The events one probe run produces: `ProbeObservedFirst` the first time
/// the probe is seen since the activation, then the result.
pub fn probe_bodies(
    record: &HostRecord,
    probe_name: &str,
    mode: ProbeMode,
    status: ProbeStatus,
    failure_reason: Option<String>,
    at: Timestamp,
) -> Vec<EventBody> {
    let mut bodies = Vec::with_capacity(2);
    let seen = record.probes.get(probe_name).is_some_and(|p| p.first_observed_at.is_some());
    if !seen {
        bodies.push(EventBody::ProbeObservedFirst { probe_name: probe_name.to_owned(), mode, observed_at: at });
    }
    bodies.push(EventBody::ProbeResult {
        probe_name: probe_name.to_owned(),
        mode,
        status,
        observed_at: at,
        failure_reason: if status == ProbeStatus::Fail { failure_reason } else { None },
    });
    bodies
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
        assert!(!r.open(&rid(), policy()), "a repeated dispatch is ignored");
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
        assert_eq!(fx, vec![Effect::FireSwitch { target: closure('1') }]);
        assert_eq!(r.unfinished_switches(), vec![(rid(), HostState::Activating)]);
        let done = SwitchOutcome::Completed { observed: closure('1'), exit_code: 0 };
        apply(&mut r, &mut journal, switch_body(done, T0 + Duration::seconds(5)));
        let decl = vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }];
        apply(&mut r, &mut journal, EventBody::ProbeTopologyDeclared { probes: decl, declared_at: T0 });
        let t = T0 + Duration::seconds(10);
        let record = r.get(&rid()).expect("slot").record.clone();
        for body in probe_bodies(&record, "web", ProbeMode::Enforce, ProbeStatus::Fail, Some("503".into()), t) {
            apply(&mut r, &mut journal, body);
        }
        let start = r.failure_clock_start(&rid()).expect("clock starts at once");
        apply(&mut r, &mut journal, start);
        assert_eq!(r.due(t + Duration::seconds(59)), vec![]);
        let due = r.due(t + Duration::seconds(60));
        assert_eq!(due.len(), 1);
        let fx = apply(&mut r, &mut journal, due[0].1.clone());
        assert!(fx.contains(&Effect::FireRollback { to: closure('0') }), "{fx:?}");
        assert_eq!(r.unfinished_switches(), vec![(rid(), HostState::Failed)]);

        let mut restarted = Rollouts::new(host);
        restarted.restore(rid(), policy(), &journal).expect("replays");
        assert_eq!(restarted.get(&rid()), r.get(&rid()));
        assert_eq!(restarted.last_seqs(), r.last_seqs());
        assert_eq!(restarted.unfinished_switches(), vec![(rid(), HostState::Failed)]);

        let back = SwitchOutcome::Completed { observed: closure('0'), exit_code: 0 };
        apply(&mut r, &mut journal, rollback_body(&closure('0'), back, t + Duration::seconds(70)));
        assert_eq!(r.get(&rid()).expect("slot").record.state, HostState::Reverted);
        assert!(r.unfinished_switches().is_empty());
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
        let wrong = SwitchOutcome::Completed { observed: closure('2'), exit_code: 0 };
        assert!(matches!(rollback_body(&target, wrong, T0), EventBody::RollbackFailed { .. }));
        let deferred = SwitchOutcome::Deferred { component: "kernel".into() };
        assert!(matches!(rollback_body(&target, deferred, T0), EventBody::RollbackFailed { .. }));
        let ok = SwitchOutcome::Completed { observed: target.clone(), exit_code: 0 };
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
