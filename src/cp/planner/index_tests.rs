//! `plan_indexed` gives exactly `plan`'s answer, and the index the writer
//! keeps up to date host by host equals the index built from scratch.
use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;

use super::*;
use crate::ids::RolloutId;

fn closure(n: usize) -> Closure {
    Closure::parse(&format!("/nix/store/{:0>32}-nixos-system-t{n}", n)).expect("closure")
}

/// One rollout's planner input, generated: hosts h00..h{n}, 1–3 waves,
/// targets from a pool of 4 closures, every host state, standing
/// dispatches, skips, quarantined targets and holds drawn at random.
#[derive(Debug, Clone)]
struct World {
    manifest: Manifest,
    state: RolloutState,
    current_wave: usize,
    halt_reason: Option<String>,
    records: BTreeMap<Hostname, HostRecord>,
    dispatched: BTreeMap<Hostname, ()>,
    quarantined: HashSet<Closure>,
    busy: BTreeMap<Hostname, RolloutId>,
    skipped: BTreeSet<Hostname>,
}

type HostDraw = (usize, usize, usize, bool, bool, bool);

fn world(hosts: Vec<HostDraw>, waves: Vec<u64>, rollout: (usize, usize, bool, u32), quarantined: Vec<bool>) -> World {
    let n_waves = waves.len();
    let mut host_map = serde_json::Map::new();
    for (i, (wave, target, ..)) in hosts.iter().enumerate() {
        host_map.insert(
            format!("h{i:02}"),
            serde_json::json!({"wave": wave % n_waves, "target_closure": closure(*target).as_str()}),
        );
    }
    let waves: Vec<_> = waves
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::json!({"name": format!("w{i}"), "soak_secs": 0, "max_in_flight": m}))
        .collect();
    let (state, current_wave, halted_before, max_failed) = rollout;
    let json = serde_json::json!({
        "schema": 1, "channel": "stable", "ref": "r2", "issued_at": "2026-11-25T12:00:00Z",
        "policy": {"on_health_failure": "rollback-and-halt", "max_failed_hosts": max_failed},
        "waves": waves, "hosts": host_map,
    });
    let manifest = Manifest::parse(json.to_string().as_bytes()).expect("valid manifest");
    let other = RolloutId::parse("stable@r1").expect("id");
    let mut w = World {
        state: [
            RolloutState::Active,
            RolloutState::Converging,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Superseded,
        ][state % 5],
        current_wave: current_wave % n_waves,
        halt_reason: halted_before.then(|| "halted before".to_owned()),
        records: BTreeMap::new(),
        dispatched: BTreeMap::new(),
        quarantined: quarantined.iter().enumerate().filter(|(_, q)| **q).map(|(i, _)| closure(i)).collect(),
        busy: BTreeMap::new(),
        skipped: BTreeSet::new(),
        manifest,
    };
    for ((host, entry), (_, _, st, dispatched, skipped, busy)) in w.manifest.hosts.iter().zip(&hosts) {
        let mut r =
            HostRecord::pending(w.manifest.rollout_id.clone(), host.clone(), Some(entry.target_closure.clone()));
        r.state = HostState::ALL[st % HostState::ALL.len()];
        w.records.insert(host.clone(), r);
        if *dispatched {
            w.dispatched.insert(host.clone(), ());
        }
        if *skipped {
            w.skipped.insert(host.clone());
        }
        if *busy {
            w.busy.insert(host.clone(), other.clone());
        }
    }
    w
}

fn any_world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(
            (0usize..3, 0usize..4, 0usize..7, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2)),
            1..14,
        ),
        prop::collection::vec(1u64..5, 1..4),
        (0usize..5, 0usize..3, any::<bool>(), 0u32..4),
        prop::collection::vec(prop::bool::weighted(0.3), 4),
    )
        .prop_map(|(hosts, waves, rollout, quarantined)| world(hosts, waves, rollout, quarantined))
}

fn class(w: &World, host: &Hostname) -> Option<HostClass> {
    w.records.get(host).map(|r| HostClass {
        state: r.state,
        dispatched: w.dispatched.contains_key(host),
        skipped: w.skipped.contains(host),
    })
}

fn build(w: &World) -> PlanIndex {
    PlanIndex::build(&w.manifest, &w.records, &|h| w.dispatched.contains_key(h), &w.skipped)
}

fn both_plans(w: &World, index: &PlanIndex) -> (Option<Plan>, Plan) {
    let indexed = plan_indexed(&IndexedInput {
        manifest: &w.manifest,
        state: w.state,
        current_wave: w.current_wave,
        halt_reason: w.halt_reason.as_deref(),
        records: &w.records,
        dispatched: &w.dispatched,
        quarantined: &w.quarantined,
        busy_elsewhere: &w.busy,
        skipped: &w.skipped,
        accepted_failures: 0,
        index,
    });
    let dispatched: BTreeSet<Hostname> = w.dispatched.keys().cloned().collect();
    let full = plan(&PlanInput {
        manifest: &w.manifest,
        state: w.state,
        current_wave: w.current_wave,
        halt_reason: w.halt_reason.as_deref(),
        records: &w.records,
        dispatched: &dispatched,
        quarantined: &w.quarantined,
        busy_elsewhere: &w.busy,
        skipped: &w.skipped,
        accepted_failures: 0,
    });
    (indexed, full)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn the_indexed_plan_is_the_plan(w in any_world()) {
        let (indexed, full) = both_plans(&w, &build(&w));
        prop_assert_eq!(indexed, Some(full));
    }

    /// Changes applied one host at a time (`PlanIndex::update`, as the
    /// writer's setters do) leave the index a fresh build would give, and
    /// the plans still agree after each change.
    #[test]
    fn an_updated_index_equals_a_rebuilt_one(
        w in any_world(),
        changes in prop::collection::vec((0usize..14, 0usize..7, any::<bool>(), any::<bool>()), 1..20),
    ) {
        let mut w = w;
        let mut index = build(&w);
        for (i, st, dispatched, skipped) in changes {
            let Some(host) = w.records.keys().nth(i % w.records.len()).cloned() else { continue };
            let before = class(&w, &host);
            if let Some(r) = w.records.get_mut(&host) {
                r.state = HostState::ALL[st % HostState::ALL.len()];
            }
            if dispatched { w.dispatched.insert(host.clone(), ()); } else { w.dispatched.remove(&host); }
            if skipped { w.skipped.insert(host.clone()); } else { w.skipped.remove(&host); }
            index.update(&host, w.manifest.hosts.get(&host), before, class(&w, &host));
            prop_assert_eq!(&index, &build(&w));
            let (indexed, full) = both_plans(&w, &index);
            prop_assert_eq!(indexed, Some(full));
        }
    }
}

#[test]
fn a_record_outside_the_manifest_makes_the_index_decline() {
    let mut w = world(vec![(0, 0, 0, false, false, false); 3], vec![2], (0, 0, false, 0), vec![false; 4]);
    let stray = Hostname::parse("zz-not-in-manifest").expect("host");
    let r = HostRecord::pending(w.manifest.rollout_id.clone(), stray.clone(), None);
    w.records.insert(stray, r);
    let (indexed, _) = both_plans(&w, &build(&w));
    assert_eq!(indexed, None);
}
