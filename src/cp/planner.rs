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

use crate::ids::{Closure, Hostname, RolloutId};
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
    /// Hosts live in ANOTHER rollout (SPEC §4 rule 7), with that rollout:
    /// held here, neither dispatched nor settled, until it ends there.
    pub busy_elsewhere: &'a BTreeMap<Hostname, RolloutId>,
    /// Hosts this rollout already skipped: their target was quarantined on
    /// the channel before they acked (a CP outcome, not a host record).
    pub skipped: &'a BTreeSet<Hostname>,
}

/// What should change. Applying a plan and planning again yields an empty
/// dispatch/withdraw/skip list (the planner is idempotent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub dispatch: Vec<Hostname>,
    pub withdraw: Vec<Hostname>,
    /// Pending hosts to mark skipped now (their standing dispatch, if any,
    /// is in `withdraw`).
    pub skip: Vec<Hostname>,
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

/// A skip holds only while the host never acked: if an ack raced the skip
/// (the agent had the dispatch already), the host's own events win.
fn is_skipped(skipped: &BTreeSet<Hostname>, host: &Hostname, record: &HostRecord) -> bool {
    record.state == HostState::Pending && skipped.contains(host)
}

/// Why a Pending host is not being dispatched, for the status views; `None`
/// when it is dispatched or would be on the next free slot.
pub fn blocked_reason(input: &PlanInput<'_>, host: &Hostname) -> Option<String> {
    let record = input.records.get(host)?;
    if record.state != HostState::Pending || input.dispatched.contains(host) {
        return None;
    }
    let entry = input.manifest.hosts.get(host)?;
    let channel = input.manifest.rollout_id.channel();
    if is_skipped(input.skipped, host, record) {
        return Some(format!("skipped: target closure {} is quarantined on channel {channel}", entry.target_closure));
    }
    match input.state {
        RolloutState::Superseded => return Some("rollout superseded".to_owned()),
        RolloutState::Halted => return Some("rollout halted".to_owned()),
        _ => {}
    }
    if input.quarantined.contains(&entry.target_closure) {
        return Some(format!("target closure is quarantined on channel {channel}"));
    }
    if let Some(other) = input.busy_elsewhere.get(host) {
        return Some(format!("held: live in rollout {other}; offered once it ends there"));
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
        skip: Vec::new(),
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

    // Skipped hosts are not failures: the closure's one failure is already
    // counted where it happened (the Reverted host that quarantined it).
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

    // A never-acked host whose target is quarantined will never be
    // dispatched: it settles as skipped now, in every wave (the quarantine
    // is permanent), and a standing dispatch for it is withdrawn.
    let mut skipped = input.skipped.clone();
    let mut withdraw = BTreeSet::new();
    if !input.quarantined.is_empty() {
        for (host, entry) in &manifest.hosts {
            let Some(record) = input.records.get(host) else { continue };
            if record.state == HostState::Pending && input.quarantined.contains(&entry.target_closure) {
                if input.dispatched.contains(host) {
                    withdraw.insert(host.clone());
                }
                if skipped.insert(host.clone()) {
                    out.skip.push(host.clone());
                }
            }
        }
    }
    // A host live elsewhere keeps no standing dispatch here: the offer
    // comes again once the other rollout is over on it (rule 7).
    for host in input.busy_elsewhere.keys() {
        if input.dispatched.contains(host) && input.records.get(host).is_some_and(|r| r.state == HostState::Pending) {
            withdraw.insert(host.clone());
        }
    }
    let standing = |h: &Hostname| input.dispatched.contains(h) && !withdraw.contains(h);
    let settled = |h: &Hostname, r: &HostRecord| is_settled(r.state) || is_skipped(&skipped, h, r);

    let last_wave = manifest.waves.len().saturating_sub(1);
    let wave_settled =
        |wave: usize| manifest.hosts_in_wave(wave).all(|(h, _)| input.records.get(h).is_some_and(|r| settled(h, r)));
    while out.current_wave < last_wave && wave_settled(out.current_wave) {
        out.current_wave += 1;
    }

    let wave = out.current_wave;
    if let Some(wave_def) = manifest.waves.get(wave) {
        let mut n_in_flight = manifest
            .hosts_in_wave(wave)
            .filter(|(h, _)| input.records.get(*h).is_some_and(|r| in_flight(r, standing(h))))
            .count();
        for (host, entry) in manifest.hosts_in_wave(wave) {
            if n_in_flight >= wave_def.max_in_flight as usize {
                break;
            }
            let Some(record) = input.records.get(host) else { continue };
            if record.state != HostState::Pending || standing(host) || skipped.contains(host) {
                continue;
            }
            if input.quarantined.contains(&entry.target_closure) || input.busy_elsewhere.contains_key(host) {
                continue;
            }
            out.dispatch.push(host.clone());
            n_in_flight += 1;
        }
    }

    let all_settled = input.records.iter().all(|(h, r)| settled(h, r));
    // Every host in `out.dispatch` is Pending, not skipped and had no
    // standing dispatch, so comparing counts avoids a quadratic membership
    // test. Held (busy) hosts count as waiting: the rollout is still active.
    let n_waiting = input
        .records
        .iter()
        .filter(|(h, r)| r.state == HostState::Pending && !standing(h) && !skipped.contains(*h))
        .count();
    let undispatched = n_waiting > out.dispatch.len();
    out.state = if all_settled {
        RolloutState::Completed
    } else if undispatched {
        RolloutState::Active
    } else {
        RolloutState::Converging
    };
    out.withdraw = withdraw.into_iter().collect();
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
        };
        let first = plan(&input(&none));
        let dispatched: BTreeSet<Hostname> = first.dispatch.iter().cloned().collect();
        let second = plan(&input(&dispatched));
        assert!(second.dispatch.is_empty() && second.withdraw.is_empty() && second.skip.is_empty(), "{second:?}");
    }
}
