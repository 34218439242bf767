//! Table-driven tests of `step`: every (state, event kind, side) pair, the
//! numbered rules of `docs/protocol.md` §3, and scenarios for the mistakes
//! a rollout machine easily makes (the wrong rollback target, a failure
//! clock that does not reset, early convergence, the soak's start, lost
//! rollback failures, completion on another closure).

use time::macros::datetime;
use time::Duration;

use super::*;
use crate::ids::{Closure, Hostname, RolloutId};

pub(crate) const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);
pub(crate) const SOAK_SECS: u64 = 300;

pub(crate) fn old() -> Closure {
    Closure::parse("/nix/store/00000000000000000000000000000000-nixos-system-web-1-old").expect("valid")
}
pub(crate) fn new() -> Closure {
    Closure::parse("/nix/store/11111111111111111111111111111111-nixos-system-web-1-new").expect("valid")
}
pub(crate) fn other() -> Closure {
    Closure::parse("/nix/store/22222222222222222222222222222222-nixos-system-web-1-other").expect("valid")
}
pub(crate) fn rollback_policy() -> Policy {
    Policy { on_health_failure: OnHealthFailure::RollbackAndHalt, sustained_failure_secs: 60 }
}
pub(crate) fn halt_policy() -> Policy {
    Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 }
}
pub(crate) fn fresh(target: Option<Closure>) -> HostRecord {
    HostRecord::pending(
        RolloutId::parse("stable@2026-11-25.1").expect("valid"),
        Hostname::parse("web-1").expect("valid"),
        target,
    )
}
fn at(secs: i64) -> Timestamp {
    T0 + Duration::seconds(secs)
}

/// A small driver that assigns seqs like the agent does and fails loudly.
pub(crate) struct Host {
    pub record: HostRecord,
    pub policy: Policy,
    pub origin: Origin,
    pub effects: Vec<Effect>,
}

impl Host {
    pub fn new(policy: Policy) -> Host {
        Host { record: fresh(Some(new())), policy, origin: Origin::Local, effects: Vec::new() }
    }
    pub fn event(&self, body: EventBody) -> Event {
        Event { origin: self.origin, seq: self.record.last_seq + 1, body }
    }
    pub fn try_feed(&mut self, body: EventBody) -> Result<(), TransitionError> {
        let event = self.event(body);
        match step(&self.record, &event, &self.policy)? {
            Outcome::Applied { record, effects } => {
                self.record = *record;
                self.effects = effects;
                Ok(())
            }
            Outcome::Duplicate { .. } => panic!("unexpected duplicate"),
            Outcome::Gap { expected } => panic!("unexpected gap (expected seq {expected})"),
        }
    }
    #[track_caller]
    pub fn feed(&mut self, body: EventBody) -> &mut Host {
        if let Err(e) = self.try_feed(body) {
            panic!("step refused: {e}");
        }
        self
    }
    pub fn activate(&mut self) -> &mut Host {
        self.feed(EventBody::Activate {
            current_closure_at_dispatch: old(),
            target_closure: new(),
            soak_secs: SOAK_SECS,
            received_at: at(0),
        })
    }
    pub fn complete(&mut self, secs: i64) -> &mut Host {
        self.feed(EventBody::ActivationCompleted {
            observed_current_closure: new(),
            exit_code: 0,
            completed_at: at(secs),
        })
    }
    pub fn declare(&mut self, probes: &[(&str, ProbeMode)]) -> &mut Host {
        let probes = probes
            .iter()
            .map(|(name, mode)| ProbeDecl { name: (*name).to_owned(), kind: ProbeKind::Http, mode: *mode })
            .collect();
        self.feed(EventBody::ProbeTopologyDeclared { probes, declared_at: at(11) })
    }
    pub fn probe(&mut self, name: &str, mode: ProbeMode, status: ProbeStatus, secs: i64) -> &mut Host {
        let failure_reason = (status == ProbeStatus::Fail).then(|| "HTTP 503".to_owned());
        self.feed(EventBody::ProbeResult {
            probe_name: name.to_owned(),
            mode,
            status,
            observed_at: at(secs),
            failure_reason,
        })
    }
}

/// A record in `state`, reached through legal events under `policy`:
/// Soaking has one enforce probe "web" declared and not yet observed.
fn host_in(state: HostState, policy: Policy) -> Host {
    let mut h = Host::new(policy);
    match state {
        HostState::Pending => {}
        HostState::Activating => {
            h.activate();
        }
        HostState::Deferred => {
            h.activate().feed(EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: at(5) });
        }
        HostState::Soaking => {
            h.activate().complete(10).declare(&[("web", ProbeMode::Enforce)]);
        }
        HostState::Converged => {
            h.activate().complete(10).declare(&[("web", ProbeMode::Enforce)]);
            h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
            h.feed(EventBody::ConvergedReached { converged_at: at(10 + SOAK_SECS as i64), current_closure: new() });
        }
        HostState::Failed => {
            h.activate().feed(EventBody::ActivationFailed {
                exit_code: 1,
                stderr_tail: "boom".into(),
                failed_at: at(5),
            });
        }
        HostState::Reverted => {
            h.activate().feed(EventBody::ActivationFailed {
                exit_code: 1,
                stderr_tail: "boom".into(),
                failed_at: at(5),
            });
            h.feed(EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(8) });
        }
    }
    assert_eq!(h.record.state, state, "fixture for {state}");
    h
}

/// An event of `kind` whose fields make it acceptable wherever the pair is
/// legal. For Soaking kinds the fixture is first prepared (e.g. the probe is
/// failing before ProbeFailureFirst).
fn sample(kind: EventKind, h: &mut Host) -> EventBody {
    let soaking = h.record.state == HostState::Soaking;
    match kind {
        EventKind::Activate => EventBody::Activate {
            current_closure_at_dispatch: old(),
            target_closure: new(),
            soak_secs: SOAK_SECS,
            received_at: at(0),
        },
        EventKind::ActivationStarted => {
            EventBody::ActivationStarted { started_at: at(1), switch_method: "systemd-run".into() }
        }
        EventKind::ActivationCompleted => {
            EventBody::ActivationCompleted { observed_current_closure: new(), exit_code: 0, completed_at: at(10) }
        }
        EventKind::ActivationDeferred => {
            EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: at(5) }
        }
        EventKind::ActivationFailed => {
            EventBody::ActivationFailed { exit_code: 1, stderr_tail: "boom".into(), failed_at: at(5) }
        }
        EventKind::ProbeTopologyDeclared => EventBody::ProbeTopologyDeclared {
            probes: vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce }],
            declared_at: at(12),
        },
        EventKind::ProbeObservedFirst => {
            EventBody::ProbeObservedFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, observed_at: at(20) }
        }
        EventKind::ProbeResult => EventBody::ProbeResult {
            probe_name: "web".into(),
            mode: ProbeMode::Enforce,
            status: ProbeStatus::Pass,
            observed_at: at(20),
            failure_reason: None,
        },
        EventKind::ProbeFailureFirst => {
            if soaking {
                h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 20);
            }
            EventBody::ProbeFailureFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, first_failed_at: at(20) }
        }
        EventKind::SustainedFailureCrossed => {
            if soaking {
                h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 20);
                h.feed(EventBody::ProbeFailureFirst {
                    probe_name: "web".into(),
                    mode: ProbeMode::Enforce,
                    first_failed_at: at(20),
                });
            }
            EventBody::SustainedFailureCrossed {
                failed_at: at(80),
                sustained_duration_secs: 60,
                failing_probes: vec!["web".into()],
                policy_applied: h.policy.on_health_failure,
            }
        }
        EventKind::RollbackCompleted => {
            EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(9) }
        }
        EventKind::RollbackFailed => {
            EventBody::RollbackFailed { exit_code: 2, stderr_tail: "rollback boom".into(), failed_at: at(9) }
        }
        EventKind::DispatchRejected => EventBody::DispatchRejected {
            target_closure: new(),
            code: RejectCode::Refused,
            reason: "bad signature".into(),
            rejected_at: at(0),
        },
        EventKind::ConvergedReached => {
            if soaking {
                h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
            }
            EventBody::ConvergedReached { converged_at: at(10 + SOAK_SECS as i64), current_closure: new() }
        }
    }
}

/// The legal pairs of `docs/protocol.md` §3 and the state each leads to (rollback policy).
fn legal_target(from: HostState, kind: EventKind) -> Option<HostState> {
    use EventKind as K;
    use HostState as S;
    Some(match (from, kind) {
        (S::Pending, K::Activate) => S::Activating,
        (S::Pending, K::DispatchRejected) => S::Failed,
        (S::Activating, K::ActivationStarted) => S::Activating,
        (S::Activating, K::ActivationDeferred) => S::Deferred,
        (S::Activating | S::Deferred, K::ActivationCompleted) => S::Soaking,
        (S::Activating | S::Deferred, K::ActivationFailed) => S::Failed,
        (S::Soaking, K::ProbeTopologyDeclared | K::ProbeObservedFirst | K::ProbeResult | K::ProbeFailureFirst) => {
            S::Soaking
        }
        (S::Soaking, K::SustainedFailureCrossed) => S::Failed,
        (S::Soaking, K::ConvergedReached) => S::Converged,
        (S::Failed, K::RollbackCompleted) => S::Reverted,
        (S::Failed, K::RollbackFailed) => S::Failed,
        _ => return None,
    })
}

/// The exact effects of a legal pair on one side (rollback policy).
fn expected_effects(from: HostState, to: HostState, event: &Event) -> Vec<Effect> {
    let local = event.origin == Origin::Local;
    let mut fx = vec![if local {
        Effect::EmitOutbound { seq: event.seq, body: event.body.clone() }
    } else {
        Effect::AppendEventLog { seq: event.seq, body: event.body.clone() }
    }];
    if from != to {
        fx.push(Effect::RecordTransition { from, to, at: event.body.occurred_at() });
    }
    match (event.body.kind(), local) {
        (EventKind::Activate, true) => fx.push(Effect::FireActivation { target: new() }),
        (EventKind::ActivationCompleted, true) => fx.push(Effect::ResetProbes),
        (EventKind::ActivationFailed | EventKind::SustainedFailureCrossed, true) => {
            fx.push(Effect::FireRollback { to: old() })
        }
        (EventKind::RollbackCompleted, false) => {
            fx.push(Effect::InsertQuarantine { channel: "stable".into(), closure: new() })
        }
        _ => {}
    }
    fx
}

#[test]
fn every_state_event_and_side_pair_is_legal_exactly_as_specified() {
    // Proves the transition table: 7 states x 14 kinds x 2 sides; legal pairs
    // give the exact new state and effects, all others an Illegal error that
    // names both the state and the event.
    let mut n_legal = 0;
    for origin in [Origin::Local, Origin::Remote] {
        for from in HostState::ALL {
            for kind in EventKind::ALL {
                let mut h = host_in(from, rollback_policy());
                h.origin = origin;
                let body = sample(kind, &mut h);
                let before = h.record.clone();
                let event = h.event(body);
                let result = step(&before, &event, &h.policy);
                match legal_target(from, kind) {
                    Some(to) => {
                        n_legal += 1;
                        let Ok(Outcome::Applied { record, effects }) = result else {
                            panic!("{from} + {}: expected Applied, got {result:?}", event.name());
                        };
                        assert_eq!(record.state, to, "{from} + {}", event.name());
                        assert_eq!(record.last_seq, event.seq);
                        assert_eq!(effects, expected_effects(from, to, &event), "{from} + {}", event.name());
                    }
                    None => {
                        let Err(err @ TransitionError::Illegal { .. }) = result else {
                            panic!("{from} + {}: expected Illegal, got {result:?}", event.name());
                        };
                        assert_eq!(err.state(), from);
                        assert_eq!(err.event(), event.name());
                        let text = err.to_string();
                        assert!(text.contains(from.as_str()) && text.contains(event.name()), "{text}");
                    }
                }
            }
        }
    }
    assert_eq!(n_legal, 2 * 16, "16 legal pairs per side");
}

#[test]
fn a_seq_at_or_below_the_last_is_a_duplicate_no_op_in_every_state() {
    // Proves rule 1: duplicates never error and never change anything, even
    // in terminal states.
    for from in HostState::ALL {
        let mut h = host_in(from, rollback_policy());
        let body = sample(EventKind::ActivationStarted, &mut h);
        for seq in [0, h.record.last_seq] {
            let event = Event::remote(seq, body.clone());
            let result = step(&h.record, &event, &h.policy);
            assert_eq!(result, Ok(Outcome::Duplicate { last_seq: h.record.last_seq }), "{from} seq {seq}");
        }
    }
}

#[test]
fn a_seq_beyond_the_next_is_a_gap_that_changes_nothing_in_every_state() {
    // Proves rule 2: only last + 1 is applied; a later seq is answered with
    // the seq expected, and a late earlier seq is then still applied.
    for from in HostState::ALL {
        let mut h = host_in(from, rollback_policy());
        let body = sample(EventKind::ActivationStarted, &mut h);
        let last = h.record.last_seq;
        for seq in [last + 2, last + 40, u64::MAX] {
            let result = step(&h.record, &Event::remote(seq, body.clone()), &h.policy);
            assert_eq!(result, Ok(Outcome::Gap { expected: last + 1 }), "{from} seq {seq}");
        }
    }
    let mut h = Host::new(rollback_policy());
    h.activate();
    let started = EventBody::ActivationStarted { started_at: at(1), switch_method: "direct".into() };
    let completed =
        EventBody::ActivationCompleted { observed_current_closure: new(), exit_code: 0, completed_at: at(2) };
    let early = Event::remote(3, completed.clone());
    assert_eq!(step(&h.record, &early, &h.policy), Ok(Outcome::Gap { expected: 2 }));
    h.feed(started).feed(completed);
    assert_eq!((h.record.state, h.record.last_seq), (HostState::Soaking, 3));
    let replayed = replay(fresh(Some(new())), &[Event::remote(1, sample_activate()), early], &h.policy);
    let (idx, err) = replayed.expect_err("a log with a hole does not replay");
    assert_eq!(idx, 1);
    assert!(err.to_string().contains("seq gap: the next seq is 2"), "{err}");
}

fn sample_activate() -> EventBody {
    EventBody::Activate {
        current_closure_at_dispatch: old(),
        target_closure: new(),
        soak_secs: SOAK_SECS,
        received_at: at(0),
    }
}

#[test]
fn a_busy_refusal_leaves_the_host_pending_and_a_later_ack_activates_it() {
    // Proves rule 8 on the machine: `busy` is "ask again later", never a
    // failure; `stale` and `refused` fail the host.
    let busy = |code| EventBody::DispatchRejected {
        target_closure: new(),
        code,
        reason: "live in stable@a".into(),
        rejected_at: at(0),
    };
    for origin in [Origin::Local, Origin::Remote] {
        let mut h = Host::new(rollback_policy());
        h.origin = origin;
        h.feed(busy(RejectCode::Busy));
        assert_eq!((h.record.state, h.record.last_seq, h.record.failure.clone()), (HostState::Pending, 1, None));
        h.feed(busy(RejectCode::Busy)).activate();
        assert_eq!((h.record.state, h.record.last_seq), (HostState::Activating, 3));
        for code in [RejectCode::Stale, RejectCode::Refused] {
            let mut h = Host::new(rollback_policy());
            h.origin = origin;
            h.feed(busy(code));
            assert_eq!(h.record.state, HostState::Failed, "{code:?}");
        }
    }
}

#[test]
fn halt_policy_fails_without_a_rollback_and_refuses_rollback_events() {
    // Proves the `halt` policy (`docs/protocol.md` §2): no FireRollback, the host stays Failed, and a
    // rollback outcome cannot be claimed for a rollback that never fired.
    let mut h = host_in(HostState::Activating, halt_policy());
    h.feed(EventBody::ActivationFailed { exit_code: 1, stderr_tail: "x".into(), failed_at: at(5) });
    assert!(!h.effects.iter().any(|e| matches!(e, Effect::FireRollback { .. })));
    assert_eq!(h.record.policy_applied, Some(OnHealthFailure::Halt));
    assert!(!h.record.rollback_fired);
    let err = h
        .try_feed(EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(9) })
        .expect_err("no rollback fired");
    assert!(matches!(err, TransitionError::Refused { .. }), "{err}");
}

// ---- Rule 7 (`docs/protocol.md` §3): the rollback target ----

#[test]
fn rollback_goes_to_the_closure_running_at_dispatch_not_the_target() {
    // Proves rule 7: FireRollback names current_closure_at_dispatch and a
    // RollbackCompleted to any other closure is refused.
    let mut h = host_in(HostState::Activating, rollback_policy());
    h.feed(EventBody::ActivationFailed { exit_code: 1, stderr_tail: "x".into(), failed_at: at(5) });
    assert!(h.effects.contains(&Effect::FireRollback { to: old() }), "{:?}", h.effects);
    for wrong in [new(), other()] {
        let err = h
            .try_feed(EventBody::RollbackCompleted { reverted_to_closure: wrong, exit_code: 0, completed_at: at(9) })
            .expect_err("wrong rollback closure");
        assert!(err.to_string().contains("rollback target"), "{err}");
    }
    h.feed(EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(9) });
    assert_eq!(h.record.state, HostState::Reverted);
    assert_eq!(h.record.current_closure, Some(old()));
}

#[test]
fn dispatch_ack_for_another_target_than_the_manifest_is_refused() {
    // Proves the CP can check the agent acknowledged the manifest's closure.
    let mut h = Host::new(rollback_policy());
    let err = h
        .try_feed(EventBody::Activate {
            current_closure_at_dispatch: old(),
            target_closure: other(),
            soak_secs: SOAK_SECS,
            received_at: at(0),
        })
        .expect_err("mismatch");
    assert!(err.to_string().contains("differs from the manifest"), "{err}");
}

// ---- Rule 5: the sustained-failure clock ----

#[test]
fn a_probe_that_failed_recovered_and_fails_again_later_does_not_fail_the_host_early() {
    // Proves rule 5: recovery resets the clock, so the second failure run is
    // measured from its own start.
    let mut h = host_in(HostState::Soaking, rollback_policy());
    let p = h.policy;
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 20);
    let start = failure_clock_start_due(&h.record).expect("clock should start");
    h.feed(start);
    assert_eq!(h.record.failure_clock_since, Some(at(20)));
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 30);
    assert_eq!(h.record.failure_clock_since, None, "a pass of every enforce probe resets the clock");
    // Fails again 200 s later: long after the first failure, but only 0 s
    // into the new run.
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 220);
    assert_eq!(sustained_failure_due(&h.record, &p, at(221)), None);
    let start = failure_clock_start_due(&h.record).expect("clock restarts");
    h.feed(start);
    assert_eq!(h.record.failure_clock_since, Some(at(220)));
    assert_eq!(sustained_failure_due(&h.record, &p, at(279)), None, "59 s is not sustained");
    let crossed = sustained_failure_due(&h.record, &p, at(280)).expect("60 s is sustained");
    let EventBody::SustainedFailureCrossed { sustained_duration_secs, ref failing_probes, .. } = crossed else {
        panic!("wrong event {crossed:?}");
    };
    assert_eq!(sustained_duration_secs, 60);
    assert_eq!(failing_probes, &vec!["web".to_owned()]);
    // A claim made before the threshold is refused by step itself.
    let early = EventBody::SustainedFailureCrossed {
        failed_at: at(250),
        sustained_duration_secs: 30,
        failing_probes: vec!["web".into()],
        policy_applied: OnHealthFailure::RollbackAndHalt,
    };
    assert!(h.try_feed(early).is_err());
    h.feed(crossed);
    assert_eq!(h.record.state, HostState::Failed);
    assert!(h.effects.contains(&Effect::FireRollback { to: old() }));
}

#[test]
fn observe_mode_failures_never_start_the_clock_or_fail_the_host() {
    // Proves rule 5: only enforce failures count, on both the gate and the
    // step side.
    let mut h = Host::new(rollback_policy());
    h.activate().complete(10).declare(&[("web", ProbeMode::Enforce), ("log", ProbeMode::Observe)]);
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
    for secs in (30..1000).step_by(30) {
        h.probe("log", ProbeMode::Observe, ProbeStatus::Fail, secs);
        assert_eq!(failure_clock_start_due(&h.record), None);
        assert_eq!(sustained_failure_due(&h.record, &h.policy, at(secs)), None);
    }
    let err = h
        .try_feed(EventBody::ProbeFailureFirst {
            probe_name: "log".into(),
            mode: ProbeMode::Observe,
            first_failed_at: at(30),
        })
        .expect_err("observe failure must not start the clock");
    assert!(err.to_string().contains("not in enforce mode"), "{err}");
    // ...and an observe failure does not block convergence either.
    let converged = converge_due(&h.record, at(10 + SOAK_SECS as i64)).expect("observe never gates");
    h.feed(converged);
    assert_eq!(h.record.state, HostState::Converged);
}

#[test]
fn the_failure_clock_starts_at_the_first_failure_not_when_the_tick_notices() {
    // Proves a late tick cannot stretch the grace period: the clock starts
    // at the failing result's own time.
    let mut h = host_in(HostState::Soaking, rollback_policy());
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 20);
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 50);
    let Some(EventBody::ProbeFailureFirst { first_failed_at, .. }) = failure_clock_start_due(&h.record) else {
        panic!("clock should start");
    };
    assert_eq!(first_failed_at, at(20));
    let wrong =
        EventBody::ProbeFailureFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, first_failed_at: at(50) };
    assert!(h.try_feed(wrong).is_err(), "a start time other than the failure run's is refused");
}

// ---- Rule 4: convergence gates ----

#[test]
fn no_convergence_before_every_enforce_probe_was_observed() {
    // Proves rule 4: past the soak, with one enforce probe never observed,
    // neither the gate nor step allows Converged.
    let mut h = Host::new(rollback_policy());
    h.activate().complete(10).declare(&[("web", ProbeMode::Enforce), ("db", ProbeMode::Enforce)]);
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
    let late = at(10_000);
    assert_eq!(converge_due(&h.record, late), None);
    let err = h
        .try_feed(EventBody::ConvergedReached { converged_at: late, current_closure: new() })
        .expect_err("db never observed");
    assert!(err.to_string().contains("\"db\" has not been observed"), "{err}");
    h.probe("db", ProbeMode::Enforce, ProbeStatus::Pass, 30);
    assert!(converge_due(&h.record, late).is_some());
}

#[test]
fn no_convergence_before_a_topology_is_declared_even_with_no_probes() {
    // Proves rule 4: an empty probe map is not "all probes pass" until the
    // agent has declared (possibly empty) topology since the activation.
    let mut h = host_in(HostState::Activating, rollback_policy());
    h.complete(10);
    assert_eq!(converge_due(&h.record, at(10_000)), None);
    h.declare(&[]);
    assert!(converge_due(&h.record, at(10_000)).is_some());
}

#[test]
fn no_convergence_while_an_enforce_probe_fails_or_before_the_soak_ends() {
    // Proves rule 4: latest result must be Pass and now >= soak_due_at.
    let mut h = host_in(HostState::Soaking, rollback_policy());
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
    let due = at(10 + SOAK_SECS as i64);
    assert_eq!(converge_due(&h.record, due - Duration::seconds(1)), None);
    assert!(converge_due(&h.record, due).is_some());
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 40);
    assert_eq!(converge_due(&h.record, due), None);
    let err = h
        .try_feed(EventBody::ConvergedReached { converged_at: due, current_closure: new() })
        .expect_err("failing probe");
    assert!(err.to_string().contains("failing"), "{err}");
}

#[test]
fn failure_is_checked_before_convergence_at_the_tick() {
    // Proves due_event prefers starting/crossing the failure clock over
    // converging when both could apply.
    let mut h = host_in(HostState::Soaking, rollback_policy());
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Fail, 20);
    let ev = due_event(&h.record, &h.policy, at(10_000)).expect("something is due");
    assert_eq!(ev.kind(), EventKind::ProbeFailureFirst);
    h.feed(ev);
    let ev = due_event(&h.record, &h.policy, at(10_000)).expect("something is due");
    assert_eq!(ev.kind(), EventKind::SustainedFailureCrossed);
}

// ---- Rule 4: the soak starts at activation completion ----

#[test]
fn the_soak_window_starts_when_the_activation_completes_on_the_host() {
    // Proves rule 4: a host acknowledged at t=0 that completes at t=1000
    // soaks until t=1000+soak, not t=0+soak.
    let mut h = host_in(HostState::Activating, rollback_policy());
    h.complete(1000).declare(&[]);
    assert_eq!(h.record.soak_due_at, Some(at(1000 + SOAK_SECS as i64)));
    assert_eq!(converge_due(&h.record, at(SOAK_SECS as i64 + 1)), None);
    assert!(converge_due(&h.record, at(1000 + SOAK_SECS as i64)).is_some());
}

// ---- Rollback failures and Deferred failures (`docs/decisions.md` 9, 10) ----

#[test]
fn a_failed_rollback_is_recorded_not_dropped_and_the_host_stays_failed() {
    // Proves RollbackFailed is legal from Failed and keeps the details.
    let mut h = host_in(HostState::Failed, rollback_policy());
    h.feed(EventBody::RollbackFailed { exit_code: 2, stderr_tail: "no space".into(), failed_at: at(9) });
    assert_eq!(h.record.state, HostState::Failed);
    let failure = h.record.rollback_failure.clone().expect("recorded");
    assert_eq!((failure.exit_code, failure.stderr_tail.as_str()), (2, "no space"));
    // A later successful retry of the rollback is still accepted.
    h.feed(EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(60) });
    assert_eq!(h.record.state, HostState::Reverted);
}

#[test]
fn a_deferred_host_that_fails_rolls_back_under_rollback_and_halt() {
    // Proves Deferred -> Failed applies the policy like Activating -> Failed.
    let mut h = host_in(HostState::Deferred, rollback_policy());
    h.feed(EventBody::ActivationFailed { exit_code: 1, stderr_tail: "boot failed".into(), failed_at: at(500) });
    assert_eq!(h.record.policy_applied, Some(OnHealthFailure::RollbackAndHalt));
    assert!(h.effects.contains(&Effect::FireRollback { to: old() }));
}

#[test]
fn a_deferred_host_completes_after_reboot_and_soaks_from_then() {
    // Proves Deferred -> Soaking with the soak measured from completion.
    let mut h = host_in(HostState::Deferred, rollback_policy());
    h.complete(900);
    assert_eq!(h.record.state, HostState::Soaking);
    assert_eq!(h.record.deferred_component.as_deref(), Some("kernel"));
    assert_eq!(h.record.soak_due_at, Some(at(900 + SOAK_SECS as i64)));
}

// ---- Completed with the wrong closure (`docs/decisions.md` 8) ----

#[test]
fn activation_completed_with_another_closure_fails_the_host() {
    // Proves observed != target is Failed (and rolls back), not a Soaking
    // host stuck forever.
    let mut h = host_in(HostState::Activating, rollback_policy());
    h.feed(EventBody::ActivationCompleted { observed_current_closure: other(), exit_code: 0, completed_at: at(10) });
    assert_eq!(h.record.state, HostState::Failed);
    assert_eq!(h.record.failure, Some(Failure::WrongClosure { observed: other() }));
    assert!(h.effects.contains(&Effect::FireRollback { to: old() }));
}

// ---- Rule 8 (one live rollout per host) and rule 10 (what a host runs) ----

#[test]
fn a_host_is_live_while_switching_soaking_or_rolling_back() {
    // Proves rule 8's "live": Activating, Deferred, Soaking, and Failed with
    // a rollback fired and no outcome yet; not Pending, Converged, Reverted,
    // a halt-policy failure, or a failed rollback (the operator's turn).
    for (state, live) in [
        (HostState::Pending, false),
        (HostState::Activating, true),
        (HostState::Deferred, true),
        (HostState::Soaking, true),
        (HostState::Converged, false),
        (HostState::Failed, true),
        (HostState::Reverted, false),
    ] {
        assert_eq!(host_in(state, rollback_policy()).record.is_live(), live, "{state} under rollback-and-halt");
    }
    assert!(!host_in(HostState::Failed, halt_policy()).record.is_live(), "halt: no rollback to wait for");
    let mut h = host_in(HostState::Failed, rollback_policy());
    h.feed(EventBody::RollbackFailed { exit_code: 2, stderr_tail: "no space".into(), failed_at: at(9) });
    assert!(!h.record.is_live(), "a failed rollback ends the hold");
    let mut busy = Host::new(rollback_policy());
    busy.feed(EventBody::DispatchRejected {
        target_closure: new(),
        code: RejectCode::Busy,
        reason: "busy".into(),
        rejected_at: at(0),
    });
    assert!(!busy.record.is_live(), "a busy refusal leaves the host Pending, not live");
}

#[test]
fn the_known_running_closure_follows_only_proven_facts() {
    // Proves rule 10's definition: known after an observed activation, a
    // convergence or a completed rollback; unknown while in transition.
    let known = |h: &Host| h.record.known_running_closure().cloned();
    for state in [HostState::Pending, HostState::Activating, HostState::Deferred] {
        assert_eq!(known(&host_in(state, rollback_policy())), None, "{state}");
    }
    for state in [HostState::Soaking, HostState::Converged] {
        assert_eq!(known(&host_in(state, rollback_policy())), Some(new()), "{state}");
    }
    assert_eq!(known(&host_in(HostState::Reverted, rollback_policy())), Some(old()));
    assert_eq!(known(&host_in(HostState::Failed, rollback_policy())), None, "rolling back");
    assert_eq!(known(&host_in(HostState::Failed, halt_policy())), None, "the switch failed: nothing observed");
    let mut wrong = host_in(HostState::Activating, halt_policy());
    wrong.feed(EventBody::ActivationCompleted {
        observed_current_closure: other(),
        exit_code: 0,
        completed_at: at(10),
    });
    assert_eq!(known(&wrong), Some(other()), "halt policy: the host stays on what was observed");
}

// ---- Other invariants ----

#[test]
fn probe_events_for_undeclared_probes_or_the_wrong_mode_are_refused() {
    // Proves probe results only count against the declared topology.
    let mut h = host_in(HostState::Soaking, rollback_policy());
    let undeclared = EventBody::ProbeResult {
        probe_name: "nope".into(),
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Pass,
        observed_at: at(20),
        failure_reason: None,
    };
    assert!(h.try_feed(undeclared).is_err());
    let wrong_mode = EventBody::ProbeResult {
        probe_name: "web".into(),
        mode: ProbeMode::Observe,
        status: ProbeStatus::Fail,
        observed_at: at(20),
        failure_reason: None,
    };
    assert!(h.try_feed(wrong_mode).is_err());
}

#[test]
fn a_new_activation_clears_probe_knowledge() {
    // Proves probe observations never carry over from before the activation
    // that started the soak (a Deferred host re-completing after reboot).
    let mut h = host_in(HostState::Soaking, rollback_policy());
    h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
    assert!(!h.record.probes.is_empty());
    let mut d = host_in(HostState::Deferred, rollback_policy());
    d.complete(50);
    assert!(d.record.probes.is_empty() && d.record.topology.is_none());
}

#[test]
fn replay_of_the_emitted_events_rebuilds_the_record() {
    // Proves the journal of outbound events alone rebuilds a record from a
    // fresh Pending record without a known target (agent restart).
    let mut h = Host::new(rollback_policy());
    let mut journal = Vec::new();
    let mut feed = |h: &mut Host, body: EventBody| {
        h.feed(body);
        for e in &h.effects {
            if let Effect::EmitOutbound { seq, body } = e {
                journal.push(Event::local(*seq, body.clone()));
            }
        }
    };
    feed(
        &mut h,
        EventBody::Activate {
            current_closure_at_dispatch: old(),
            target_closure: new(),
            soak_secs: SOAK_SECS,
            received_at: at(0),
        },
    );
    feed(&mut h, EventBody::ActivationCompleted { observed_current_closure: new(), exit_code: 0, completed_at: at(9) });
    feed(
        &mut h,
        EventBody::ProbeTopologyDeclared {
            probes: vec![ProbeDecl { name: "web".into(), kind: ProbeKind::Tcp, mode: ProbeMode::Enforce }],
            declared_at: at(10),
        },
    );
    let rebuilt = replay(fresh(None), &journal, &h.policy).expect("replay");
    assert_eq!(rebuilt, h.record);
    // Replaying twice (duplicates) changes nothing.
    let twice: Vec<Event> = journal.iter().chain(journal.iter()).cloned().collect();
    assert_eq!(replay(fresh(None), &twice, &h.policy).expect("replay"), h.record);
}

#[test]
fn the_machine_module_does_no_io_reads_no_clock_and_never_awaits() {
    // Proves the functional-core boundary (ARCHITECTURE.md's first
    // invariant) by reading the
    // module's own source: none of these may appear outside comments.
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("event.rs", include_str!("event.rs")),
        ("state.rs", include_str!("state.rs")),
        ("effect.rs", include_str!("effect.rs")),
        ("step.rs", include_str!("step.rs")),
        ("gates.rs", include_str!("gates.rs")),
    ];
    let forbidden = [
        "tokio",
        "hyper",
        "rusqlite",
        "std::fs",
        "fs_err",
        "std::net",
        "std::process",
        "std::io",
        "std::env",
        "std::thread",
        "SystemTime",
        "Instant",
        "now_utc",
        "now_local",
        "async ",
        ".await",
        "crate::clock",
        "crate::wire",
        "crate::queue",
        "crate::cp",
        "crate::agent",
    ];
    for (file, text) in sources {
        for (line_idx, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                assert!(!code.contains(word), "src/machine/{file}:{} uses {word:?}: {line}", line_idx + 1);
            }
        }
    }
}

/// Every `.rs` file at or under `path`.
fn rust_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).expect("read source dir") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_roles_do_not_import_each_other() {
    // Proves the module boundary between the two roles: the agent never
    // names the control plane, and neither the control plane nor the
    // command-line types name the agent (what both use lives in `client`,
    // `signal`, `output` and `cli`). It walks the directories, so a new file
    // is covered too; comments count, like `grep -rn` would.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules = [("agent", "crate::cp"), ("cp", "crate::agent"), ("cli.rs", "crate::agent"), ("cli", "crate::agent")];
    for (under, word) in rules {
        let files = rust_files(&src.join(under));
        assert!(!files.is_empty(), "no sources under src/{under}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read source");
            for (line_idx, line) in text.lines().enumerate() {
                assert!(!line.contains(word), "{}:{} uses {word:?}: {line}", file.display(), line_idx + 1);
            }
        }
    }
}
