//! The wave planner: a pure function from the stored state of one rollout
//! (its manifest, its host records, its outstanding dispatches and the
//! channel's quarantine set) to what should change: the rollout's state and
//! wave cursor, which hosts to dispatch and which dispatches to withdraw.
//!
//! It never does I/O and never reads a clock, so the writer can run it after
//! every committed change and on a timer, and tests drive it with tables.
//! Fixes of the reference system (seed-system.md §11): halt really stops
//! dispatching (8), the quarantine set is consulted on every run (7), a
//! superseded rollout dispatches nothing (SPEC §3), and a dispatch is a
//! standing offer, not a queue entry that is consumed (21).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Closure, Hostname};
use crate::machine::{HostRecord, HostState};
use crate::wire::Manifest;

/// The rollout-level state shown by the status views (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutState {
    /// Hosts remain to be dispatched.
    Active,
    /// Every host was dispatched; waiting for the in-flight ones to settle.
    Converging,
    /// More than `max_failed_hosts` hosts failed: nothing new is dispatched.
    Halted,
    /// Every host settled (Converged, or Failed/Reverted within the budget).
    Completed,
    /// A newer manifest on the same channel took over.
    Superseded,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Converging => "converging",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Superseded => "superseded",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutState> {
        [
            RolloutState::Active,
            RolloutState::Converging,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Superseded,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Halted and Superseded are sticky: no later plan leaves them.
    pub fn is_sticky(self) -> bool {
        matches!(self, RolloutState::Halted | RolloutState::Superseded)
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the planner looks at for one rollout.
#[derive(Debug)]
pub struct PlanInput<'a> {
    pub manifest: &'a Manifest,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<&'a str>,
    /// One record per manifest host (the CP opens them all at publish).
    pub records: &'a BTreeMap<Hostname, HostRecord>,
    /// Hosts with a standing (not yet acked or rejected) dispatch.
    pub dispatched: &'a BTreeSet<Hostname>,
    /// Closures quarantined on this rollout's channel.
    pub quarantined: &'a HashSet<Closure>,
}

/// What should change. Applying a plan and planning again yields an empty
/// dispatch/withdraw list (the planner is idempotent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub dispatch: Vec<Hostname>,
    pub withdraw: Vec<Hostname>,
}

/// A host that left the race: it will not move again without an operator
/// or a new rollout. Failed/Reverted count against `max_failed_hosts`.
pub fn is_settled(state: HostState) -> bool {
    matches!(state, HostState::Converged | HostState::Failed | HostState::Reverted)
}

/// Holding a slot of the wave's `max_in_flight`: dispatched and not yet
/// settled. Deferred counts: the host is not health-verified until its
/// reboot completes (the reference system freed the slot, §11 item 25).
fn in_flight(record: &HostRecord, dispatched: bool) -> bool {
    (record.state == HostState::Pending && dispatched)
        || matches!(record.state, HostState::Activating | HostState::Deferred | HostState::Soaking)
}

/// Why a Pending host is not being dispatched, for the status views; `None`
/// when it is dispatched or would be on the next free slot.
pub fn blocked_reason(input: &PlanInput<'_>, host: &Hostname) -> Option<String> {
    let record = input.records.get(host)?;
    if record.state != HostState::Pending || input.dispatched.contains(host) {
        return None;
    }
    let entry = input.manifest.hosts.get(host)?;
    match input.state {
        RolloutState::Superseded => return Some("rollout superseded".to_owned()),
        RolloutState::Halted => return Some("rollout halted".to_owned()),
        _ => {}
    }
    if input.quarantined.contains(&entry.target_closure) {
        return Some(format!("target closure is quarantined on channel {}", input.manifest.rollout_id.channel()));
    }
    if entry.wave > input.current_wave {
        return Some(format!("waiting for wave {} to settle", input.current_wave));
    }
    Some("waiting for a free in-flight slot".to_owned())
}

/// Plans one rollout.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let manifest = input.manifest;
    let mut out = Plan {
        state: input.state,
        current_wave: input.current_wave,
        halt_reason: input.halt_reason.map(str::to_owned),
        dispatch: Vec::new(),
        withdraw: Vec::new(),
    };
    let pending_dispatched = |out: &mut Plan| {
        // A standing dispatch is withdrawn only while the host is still
        // Pending; once acked the writer has already removed it.
        out.withdraw = input.dispatched.iter().cloned().collect();
    };

    if input.state == RolloutState::Superseded {
        pending_dispatched(&mut out);
        return out;
    }

    let failed: Vec<&Hostname> = input
        .records
        .iter()
        .filter(|(_, r)| matches!(r.state, HostState::Failed | HostState::Reverted))
        .map(|(h, _)| h)
        .collect();
    if input.state == RolloutState::Halted || failed.len() > manifest.policy.max_failed_hosts as usize {
        if out.halt_reason.is_none() {
            let names: Vec<&str> = failed.iter().map(|h| h.as_str()).collect();
            out.halt_reason = Some(format!(
                "{} host(s) failed ({}), more than max_failed_hosts = {}",
                failed.len(),
                names.join(", "),
                manifest.policy.max_failed_hosts
            ));
        }
        out.state = RolloutState::Halted;
        pending_dispatched(&mut out);
        return out;
    }

    let state_of = |h: &Hostname| input.records.get(h).map(|r| r.state);
    let last_wave = manifest.waves.len().saturating_sub(1);
    let wave_settled = |wave: usize| manifest.hosts_in_wave(wave).all(|(h, _)| state_of(h).is_some_and(is_settled));
    while out.current_wave < last_wave && wave_settled(out.current_wave) {
        out.current_wave += 1;
    }

    let wave = out.current_wave;
    if let Some(wave_def) = manifest.waves.get(wave) {
        let mut n_in_flight = manifest
            .hosts_in_wave(wave)
            .filter(|(h, _)| input.records.get(*h).is_some_and(|r| in_flight(r, input.dispatched.contains(*h))))
            .count();
        for (host, entry) in manifest.hosts_in_wave(wave) {
            if n_in_flight >= wave_def.max_in_flight as usize {
                break;
            }
            let Some(record) = input.records.get(host) else { continue };
            if record.state != HostState::Pending || input.dispatched.contains(host) {
                continue;
            }
            if input.quarantined.contains(&entry.target_closure) {
                continue;
            }
            out.dispatch.push(host.clone());
            n_in_flight += 1;
        }
    }

    let all_settled = input.records.values().all(|r| is_settled(r.state));
    // Every host in `out.dispatch` is Pending and had no standing dispatch,
    // so comparing counts avoids a quadratic membership test.
    let n_waiting =
        input.records.iter().filter(|(h, r)| r.state == HostState::Pending && !input.dispatched.contains(*h)).count();
    let undispatched = n_waiting > out.dispatch.len();
    out.state = if all_settled {
        RolloutState::Completed
    } else if undispatched {
        RolloutState::Active
    } else {
        RolloutState::Converging
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RolloutId;

    fn closure(n: usize) -> String {
        format!("/nix/store/{:0>32}-nixos-system-h{n}", n)
    }

    /// Wave 0: h0, h1; wave 1: h2, h3, h4 (max_in_flight 2 each).
    fn manifest(max_failed: u32) -> Manifest {
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

    fn records(m: &Manifest, states: &[HostState]) -> BTreeMap<Hostname, HostRecord> {
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

    fn hosts(names: &[&str]) -> Vec<Hostname> {
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
            },
            Case {
                name: "a quarantined target is never dispatched",
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
            },
        ];
        for case in cases {
            let m = manifest(case.max_failed);
            let recs = records(&m, &case.states);
            let dispatched: BTreeSet<Hostname> = hosts(case.dispatched).into_iter().collect();
            let quarantined: HashSet<Closure> =
                case.quarantined.iter().map(|n| Closure::parse(&closure(*n)).expect("closure")).collect();
            let input = PlanInput {
                manifest: &m,
                state: case.state,
                current_wave: case.wave,
                halt_reason: None,
                records: &recs,
                dispatched: &dispatched,
                quarantined: &quarantined,
            };
            let got = plan(&input);
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
        let input = |dispatched| PlanInput {
            manifest: &m,
            state: RolloutState::Active,
            current_wave: 0,
            halt_reason: None,
            records: &recs,
            dispatched,
            quarantined: &quarantined,
        };
        let first = plan(&input(&none));
        let dispatched: BTreeSet<Hostname> = first.dispatch.iter().cloned().collect();
        let second = plan(&input(&dispatched));
        assert!(second.dispatch.is_empty() && second.withdraw.is_empty(), "{second:?}");
    }
}
