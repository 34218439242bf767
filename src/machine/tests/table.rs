//! The transition table of `docs/protocol.md` §3: every (state, event
//! kind, side) pair is legal exactly as specified, with its exact effects;
//! duplicates and gaps in every state.

use super::*;

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
