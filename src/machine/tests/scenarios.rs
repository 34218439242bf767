//! Scenarios for the mistakes a rollout machine easily makes: lost
//! rollback failures, Deferred hosts that fail or complete, completion on
//! another closure, probes outside the topology, probe knowledge carried
//! over, and a record rebuilt from its own emitted events.

use super::*;

// ---- Rollback failures and Deferred failures (`docs/decisions.md`, "State machine, wire and queue" 9, 10) ----

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

// ---- Completed with the wrong closure (`docs/decisions.md`, "State machine, wire and queue" 8) ----

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
