//! The planner's side of the operator actions (`cp resume`, `cp cancel`):
//! a resume's accepted failures leave the budget, a cancelled rollout
//! dispatches nothing and withdraws its standing offers.
use super::tests::{hosts, manifest, records};
use super::*;
use HostState::*;

struct Given {
    state: RolloutState,
    wave: usize,
    states: [HostState; 5],
    dispatched: &'static [&'static str],
    accepted_failures: usize,
    max_failed: u32,
}

fn plan_of(g: &Given) -> Plan {
    let m = manifest(g.max_failed);
    let recs = records(&m, &g.states);
    let dispatched: BTreeSet<Hostname> = hosts(g.dispatched).into_iter().collect();
    let (quarantined, busy, skipped) = (HashSet::new(), BTreeMap::new(), BTreeSet::new());
    plan(&PlanInput {
        manifest: &m,
        state: g.state,
        current_wave: g.wave,
        halt_reason: None,
        records: &recs,
        dispatched: &dispatched,
        quarantined: &quarantined,
        busy_elsewhere: &busy,
        skipped: &skipped,
        accepted_failures: g.accepted_failures,
    })
}

/// A resumed rollout (the writer sets it Active) whose one failure was
/// accepted promotes past the failed canary wave and dispatches; without
/// the acceptance the same records halt it again at once.
#[test]
fn an_accepted_failure_no_longer_halts_and_the_next_wave_is_dispatched() {
    let mut given = Given {
        state: RolloutState::Active,
        wave: 0,
        states: [Reverted, Converged, Pending, Pending, Pending],
        dispatched: &[],
        accepted_failures: 1,
        max_failed: 0,
    };
    let resumed = plan_of(&given);
    assert_eq!(resumed.state, RolloutState::Active);
    assert_eq!(resumed.current_wave, 1);
    assert_eq!(resumed.dispatch, hosts(&["h2", "h3"]));
    assert_eq!(resumed.halt_reason, None);

    given.accepted_failures = 0;
    let not_accepted = plan_of(&given);
    assert_eq!(not_accepted.state, RolloutState::Halted);
    assert!(not_accepted.dispatch.is_empty());
}

/// Failures after a resume count afresh: one more than the budget halts
/// again, and the reason says how many an operator accepted.
#[test]
fn a_new_failure_after_a_resume_halts_again() {
    let given = Given {
        state: RolloutState::Active,
        wave: 1,
        states: [Reverted, Converged, Failed, Soaking, Pending],
        dispatched: &[],
        accepted_failures: 1,
        max_failed: 0,
    };
    let got = plan_of(&given);
    assert_eq!(got.state, RolloutState::Halted);
    let reason = got.halt_reason.expect("reason");
    assert!(reason.contains("2 host(s) failed (h0, h2)") && reason.contains("1 accepted"), "{reason}");
    // Within the budget after the acceptance: it goes on.
    let within = plan_of(&Given { max_failed: 1, ..given });
    assert_eq!((within.state, within.dispatch), (RolloutState::Converging, hosts(&["h4"])));
}

/// A cancelled rollout withdraws its standing dispatches, dispatches
/// nothing, stays cancelled when every host settles, and never halts.
#[test]
fn a_cancelled_rollout_dispatches_nothing_and_stays_cancelled() {
    let mid = Given {
        state: RolloutState::Cancelled,
        wave: 1,
        states: [Converged, Converged, Soaking, Pending, Pending],
        dispatched: &["h3"],
        accepted_failures: 0,
        max_failed: 0,
    };
    let got = plan_of(&mid);
    assert_eq!((got.state, got.current_wave), (RolloutState::Cancelled, 1));
    assert!(got.dispatch.is_empty());
    assert_eq!(got.withdraw, hosts(&["h3"]));
    let failed_after = Given { states: [Converged, Converged, Reverted, Pending, Pending], dispatched: &[], ..mid };
    let got = plan_of(&failed_after);
    assert_eq!(got.state, RolloutState::Cancelled, "a failure of an in-flight host does not turn it into a halt");
    assert!(got.dispatch.is_empty() && got.withdraw.is_empty());
}

/// The status note of a waiting host in a cancelled rollout says so.
#[test]
fn a_waiting_host_of_a_cancelled_rollout_is_blocked_by_the_cancel() {
    let m = manifest(0);
    let recs = records(&m, &[Converged, Converged, Pending, Pending, Pending]);
    let (dispatched, quarantined, busy, skipped) = (BTreeSet::new(), HashSet::new(), BTreeMap::new(), BTreeSet::new());
    let input = PlanInput {
        manifest: &m,
        state: RolloutState::Cancelled,
        current_wave: 1,
        halt_reason: None,
        records: &recs,
        dispatched: &dispatched,
        quarantined: &quarantined,
        busy_elsewhere: &busy,
        skipped: &skipped,
        accepted_failures: 0,
    };
    let host = hosts(&["h2"]).remove(0);
    assert_eq!(blocked_reason(&input, &host).as_deref(), Some("rollout cancelled"));
}

#[test]
fn cancelled_is_terminal_and_halted_is_not() {
    assert_eq!(RolloutState::parse("cancelled"), Some(RolloutState::Cancelled));
    assert!(RolloutState::Cancelled.is_terminal() && RolloutState::Cancelled.is_sticky());
    assert!(!RolloutState::Halted.is_terminal() && RolloutState::Completed.is_terminal());
}
