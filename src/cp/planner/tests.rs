//! The planner's table tests: one rollout's state in, the plan out.
use super::*;
use crate::ids::RolloutId;

pub(super) fn closure(n: usize) -> String {
    format!("/nix/store/{:0>32}-nixos-system-h{n}", n)
}

/// Wave 0: h0, h1; wave 1: h2, h3, h4 (max_in_flight 2 each).
pub(super) fn manifest(max_failed: u32) -> Manifest {
    let mut hosts = serde_json::Map::new();
    for n in 0..5 {
        let wave = if n < 2 { 0 } else { 1 };
        hosts.insert(format!("h{n}"), serde_json::json!({"wave": wave, "target_closure": closure(n)}));
    }
    let json = serde_json::json!({
        "schema": 1, "channel": "stable", "ref": "r1", "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": max_failed},
        "waves": [{"name": "canary", "soak_secs": 0, "max_in_flight": 2},
                  {"name": "rest", "soak_secs": 0, "max_in_flight": 2}],
        "hosts": hosts,
    });
    Manifest::parse(json.to_string().as_bytes()).expect("valid test manifest")
}

pub(super) fn records(m: &Manifest, states: &[HostState]) -> BTreeMap<Hostname, HostRecord> {
    let id = RolloutId::parse("stable@r1").expect("id");
    m.hosts
        .iter()
        .zip(states)
        .map(|((h, e), s)| {
            let mut r = HostRecord::pending(id.clone(), h.clone(), Some(e.target_closure.clone()));
            r.state = *s;
            (h.clone(), r)
        })
        .collect()
}

pub(super) fn hosts(names: &[&str]) -> Vec<Hostname> {
    names.iter().map(|n| Hostname::parse(n).expect("host")).collect()
}

use HostState::*;

struct Case {
    name: &'static str,
    max_failed: u32,
    state: RolloutState,
    wave: usize,
    states: [HostState; 5],
    dispatched: &'static [&'static str],
    quarantined: &'static [usize],
    want_state: RolloutState,
    want_wave: usize,
    want_dispatch: &'static [&'static str],
    want_withdraw: &'static [&'static str],
    /// (host, the other rollout it is live in)
    busy: &'static [(&'static str, &'static str)],
    skipped: &'static [&'static str],
    want_skip: &'static [&'static str],
}

#[test]
fn planner_table() {
    let cases = [
        Case {
            name: "fresh rollout dispatches the canary wave up to max_in_flight",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Pending; 5],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &["h0", "h1"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "standing dispatches are not repeated and wave 1 waits",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Soaking, Pending, Pending, Pending, Pending],
            dispatched: &["h1"],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a Deferred canary holds promotion and its slot",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Converged, Deferred, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "promotion after every canary converged, limited to max_in_flight",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Converged, Converged, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 1,
            want_dispatch: &["h2", "h3"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a freed slot dispatches the last host; then converging",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 1,
            states: [Converged, Converged, Converged, Activating, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Converging,
            want_wave: 1,
            want_dispatch: &["h4"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "one failure over max_failed_hosts 0 halts and withdraws standing dispatches",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Reverted, Pending, Pending, Pending, Pending],
            dispatched: &["h1"],
            quarantined: &[],
            want_state: RolloutState::Halted,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &["h1"],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a failure within the budget settles the host and the wave promotes",
            max_failed: 1,
            state: RolloutState::Active,
            wave: 0,
            states: [Failed, Converged, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 1,
            want_dispatch: &["h2", "h3"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "halted is sticky even if nothing failed any more",
            max_failed: 0,
            state: RolloutState::Halted,
            wave: 0,
            states: [Converged, Pending, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Halted,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a quarantined target is never dispatched: it is skipped",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Pending; 5],
            dispatched: &[],
            quarantined: &[0],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &["h1"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &["h0"],
        },
        Case {
            name: "superseded withdraws and dispatches nothing",
            max_failed: 0,
            state: RolloutState::Superseded,
            wave: 0,
            states: [Soaking, Pending, Pending, Pending, Pending],
            dispatched: &["h1"],
            quarantined: &[],
            want_state: RolloutState::Superseded,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &["h1"],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "all converged completes",
            max_failed: 0,
            state: RolloutState::Converging,
            wave: 1,
            states: [Converged; 5],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Completed,
            want_wave: 1,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a host live elsewhere is held: not dispatched, its standing dispatch withdrawn, no promotion",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Pending, Converged, Pending, Pending, Pending],
            dispatched: &["h0"],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &["h0"],
            busy: &[("h0", "stable@r0")],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a held host does not take a slot: the next host of the wave is dispatched",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 1,
            states: [Converged, Converged, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 1,
            want_dispatch: &["h3", "h4"],
            want_withdraw: &[],
            busy: &[("h2", "other@r9")],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "once the other rollout is over on the host it is offered",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Pending, Converged, Pending, Pending, Pending],
            dispatched: &[],
            quarantined: &[],
            want_state: RolloutState::Active,
            want_wave: 0,
            want_dispatch: &["h0"],
            want_withdraw: &[],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
        Case {
            name: "a quarantined target withdraws the standing dispatch and skips never-acked hosts in any wave",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Pending, Converged, Pending, Pending, Pending],
            dispatched: &["h0"],
            quarantined: &[0, 3],
            want_state: RolloutState::Converging,
            want_wave: 1,
            want_dispatch: &["h2", "h4"],
            want_withdraw: &["h0"],
            busy: &[],
            skipped: &[],
            want_skip: &["h0", "h3"],
        },
        Case {
            name: "skipped hosts settle the rollout and are not failures",
            max_failed: 0,
            state: RolloutState::Converging,
            wave: 1,
            states: [Pending, Converged, Pending, Converged, Converged],
            dispatched: &[],
            quarantined: &[0, 2],
            want_state: RolloutState::Completed,
            want_wave: 1,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &["h0", "h2"],
            want_skip: &[],
        },
        Case {
            name: "an ack that raced the skip wins: the host is in flight again",
            max_failed: 0,
            state: RolloutState::Converging,
            wave: 1,
            states: [Activating, Converged, Converged, Converged, Converged],
            dispatched: &[],
            quarantined: &[0],
            want_state: RolloutState::Converging,
            want_wave: 1,
            want_dispatch: &[],
            want_withdraw: &[],
            busy: &[],
            skipped: &["h0"],
            want_skip: &[],
        },
        Case {
            name: "a halted rollout skips nothing",
            max_failed: 0,
            state: RolloutState::Active,
            wave: 0,
            states: [Reverted, Pending, Pending, Pending, Pending],
            dispatched: &["h1"],
            quarantined: &[0, 1],
            want_state: RolloutState::Halted,
            want_wave: 0,
            want_dispatch: &[],
            want_withdraw: &["h1"],
            busy: &[],
            skipped: &[],
            want_skip: &[],
        },
    ];
    for case in cases {
        let m = manifest(case.max_failed);
        let recs = records(&m, &case.states);
        let dispatched: BTreeSet<Hostname> = hosts(case.dispatched).into_iter().collect();
        let quarantined: HashSet<Closure> =
            case.quarantined.iter().map(|n| Closure::parse(&closure(*n)).expect("closure")).collect();
        let busy: BTreeMap<Hostname, RolloutId> = case
            .busy
            .iter()
            .map(|(h, r)| (Hostname::parse(h).expect("host"), RolloutId::parse(r).expect("id")))
            .collect();
        let skipped: BTreeSet<Hostname> = hosts(case.skipped).into_iter().collect();
        let input = PlanInput {
            manifest: &m,
            state: case.state,
            current_wave: case.wave,
            halt_reason: None,
            records: &recs,
            dispatched: &dispatched,
            quarantined: &quarantined,
            busy_elsewhere: &busy,
            skipped: &skipped,
            accepted_failures: 0,
        };
        let got = plan(&input);
        assert_eq!(got.skip, hosts(case.want_skip), "{}", case.name);
        assert_eq!(got.state, case.want_state, "{}", case.name);
        assert_eq!(got.current_wave, case.want_wave, "{}", case.name);
        assert_eq!(got.dispatch, hosts(case.want_dispatch), "{}", case.name);
        assert_eq!(got.withdraw, hosts(case.want_withdraw), "{}", case.name);
        assert_eq!(got.halt_reason.is_some(), got.state == RolloutState::Halted, "{}", case.name);
    }
}

#[test]
fn planning_an_applied_plan_again_dispatches_nothing_new() {
    let m = manifest(0);
    let recs = records(&m, &[Pending; 5]);
    let quarantined = HashSet::new();
    let none = BTreeSet::new();
    let busy = BTreeMap::new();
    let skipped = BTreeSet::new();
    let input = |dispatched| PlanInput {
        manifest: &m,
        state: RolloutState::Active,
        current_wave: 0,
        halt_reason: None,
        records: &recs,
        dispatched,
        quarantined: &quarantined,
        busy_elsewhere: &busy,
        skipped: &skipped,
        accepted_failures: 0,
    };
    let first = plan(&input(&none));
    let dispatched: BTreeSet<Hostname> = first.dispatch.iter().cloned().collect();
    let second = plan(&input(&dispatched));
    assert!(second.dispatch.is_empty() && second.withdraw.is_empty() && second.skip.is_empty(), "{second:?}");
}
