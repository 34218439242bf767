//! The numbered rules of `docs/protocol.md` §3, one scenario each: busy
//! refusals and the halt policy, the rollback target (7), the
//! sustained-failure clock (5), the convergence gates and the soak's start
//! (4), one live rollout per host and what a host runs (8, 10).

use super::*;

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
