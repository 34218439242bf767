//! The wave planner: a pure function from the stored state of one rollout
//! (its manifest, its host records, its outstanding dispatches and the
//! channel's quarantine set) to what should change: the rollout's state and
//! wave cursor, which hosts to dispatch and which dispatches to withdraw.
//!
//! It never does I/O and never reads a clock, so the writer can run it after
//! every committed change and on a timer, and tests drive it with tables.
//! Halt really stops dispatching, the quarantine set is consulted on every
//! run, a superseded rollout dispatches nothing (`docs/protocol.md` §2,
//! order on a channel), and a dispatch is a standing offer, not a queue
//! entry that is consumed, so an answer lost on the way is offered again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{HostRecord, HostState};
use crate::wire::Manifest;

/// The rollout-level state shown by the status views (`docs/protocol.md` §4).
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
    /// An operator cancelled it (`cp cancel`): nothing new is dispatched;
    /// hosts already in flight finish and their events are still applied.
    Cancelled,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Converging => "converging",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Superseded => "superseded",
            RolloutState::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutState> {
        [
            RolloutState::Active,
            RolloutState::Converging,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Superseded,
            RolloutState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Halted, Superseded and Cancelled are sticky: no later plan leaves
    /// them (only an operator's `cp resume` leaves Halted).
    pub fn is_sticky(self) -> bool {
        matches!(self, RolloutState::Halted | RolloutState::Superseded | RolloutState::Cancelled)
    }

    /// Nothing will be dispatched again, whatever happens: completed,
    /// superseded or cancelled (a halted rollout may still be resumed).
    pub fn is_terminal(self) -> bool {
        matches!(self, RolloutState::Completed | RolloutState::Superseded | RolloutState::Cancelled)
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
    /// Hosts live in ANOTHER rollout (`docs/protocol.md` §3 rule 8), with that rollout:
    /// held here, neither dispatched nor settled, until it ends there.
    pub busy_elsewhere: &'a BTreeMap<Hostname, RolloutId>,
    /// Hosts this rollout already skipped: their target was quarantined on
    /// the channel before they acked (a CP outcome, not a host record).
    pub skipped: &'a BTreeSet<Hostname>,
    /// Failed/Reverted hosts an operator accepted with `cp resume` (the
    /// failures at the last resume): they no longer count against
    /// `max_failed_hosts`; failures after the resume count afresh.
    pub accepted_failures: usize,
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
/// reboot completes, and freeing its slot would let a wave start more
/// unverified hosts than `max_in_flight`.
fn in_flight(record: &HostRecord, dispatched: bool) -> bool {
    in_flight_class(record.state, dispatched)
}

fn in_flight_class(state: HostState, dispatched: bool) -> bool {
    (state == HostState::Pending && dispatched)
        || matches!(state, HostState::Activating | HostState::Deferred | HostState::Soaking)
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
        RolloutState::Cancelled => return Some("rollout cancelled".to_owned()),
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

impl Plan {
    /// A plan that changes nothing yet: the rollout's state, wave and halt
    /// reason as stored, no dispatches, withdrawals or skips.
    fn unchanged(state: RolloutState, current_wave: usize, halt_reason: Option<&str>) -> Plan {
        Plan {
            state,
            current_wave,
            halt_reason: halt_reason.map(str::to_owned),
            dispatch: Vec::new(),
            withdraw: Vec::new(),
            skip: Vec::new(),
        }
    }
}

/// Plans one rollout.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let mut out = Plan::unchanged(input.state, input.current_wave, input.halt_reason);
    // A standing dispatch is withdrawn only while the host is still
    // Pending; once acked the writer has already removed it.
    if matches!(input.state, RolloutState::Superseded | RolloutState::Cancelled) {
        out.withdraw = input.dispatched.iter().cloned().collect();
        return out;
    }
    if let Some(reason) = halt_reason(input) {
        out.halt_reason.get_or_insert(reason);
        out.state = RolloutState::Halted;
        out.withdraw = input.dispatched.iter().cloned().collect();
        return out;
    }
    let (skipped, withdraw) = skips_and_holds(input, &mut out.skip);
    let standing = |h: &Hostname| input.dispatched.contains(h) && !withdraw.contains(h);
    let settled = |h: &Hostname, r: &HostRecord| is_settled(r.state) || is_skipped(&skipped, h, r);
    out.current_wave = promote(input, out.current_wave, &settled);
    out.dispatch = dispatch_in_wave(input, out.current_wave, &skipped, &standing);
    out.state = rollout_state(input, out.dispatch.len(), &skipped, &standing, &settled);
    out.withdraw = withdraw.into_iter().collect();
    out
}

/// Why the rollout is (or now becomes) halted: already halted, or more
/// than `max_failed_hosts` hosts Failed/Reverted. `None`: it goes on.
fn halt_reason(input: &PlanInput<'_>) -> Option<String> {
    let policy = &input.manifest.policy;
    // Skipped hosts are not failures: the closure's one failure is already
    // counted where it happened (the Reverted host that quarantined it).
    let failed: Vec<&Hostname> = input
        .records
        .iter()
        .filter(|(_, r)| matches!(r.state, HostState::Failed | HostState::Reverted))
        .map(|(h, _)| h)
        .collect();
    // Failures only grow (Failed and Reverted never leave), so the hosts
    // failed at the last `cp resume` are a prefix of today's: a count is
    // enough to take them out of the budget.
    let budget = (policy.max_failed_hosts as usize).saturating_add(input.accepted_failures);
    if input.state != RolloutState::Halted && failed.len() <= budget {
        return None;
    }
    Some(halt_text(&failed, policy.max_failed_hosts, input.accepted_failures))
}

/// The halt reason naming the failed hosts (in hostname order).
fn halt_text(failed: &[&Hostname], max_failed_hosts: u32, accepted_failures: usize) -> String {
    let names: Vec<&str> = failed.iter().map(|h| h.as_str()).collect();
    let accepted = match accepted_failures {
        0 => String::new(),
        n => format!(" ({n} accepted by an operator's resume)"),
    };
    format!(
        "{} host(s) failed ({}), more than max_failed_hosts = {max_failed_hosts}{accepted}",
        failed.len(),
        names.join(", ")
    )
}

/// The skipped hosts after this plan (new skips are pushed on `skip`), and
/// the standing dispatches to withdraw because of a skip or a hold.
fn skips_and_holds(input: &PlanInput<'_>, skip: &mut Vec<Hostname>) -> (BTreeSet<Hostname>, BTreeSet<Hostname>) {
    // A never-acked host whose target is quarantined will never be
    // dispatched: it settles as skipped now, in every wave (the quarantine
    // is permanent), and a standing dispatch for it is withdrawn.
    let mut skipped = input.skipped.clone();
    let mut withdraw = BTreeSet::new();
    if !input.quarantined.is_empty() {
        for (host, entry) in &input.manifest.hosts {
            let Some(record) = input.records.get(host) else { continue };
            if record.state == HostState::Pending && input.quarantined.contains(&entry.target_closure) {
                if input.dispatched.contains(host) {
                    withdraw.insert(host.clone());
                }
                if skipped.insert(host.clone()) {
                    skip.push(host.clone());
                }
            }
        }
    }
    // A host live elsewhere keeps no standing dispatch here: the offer
    // comes again once the other rollout is over on it (`docs/protocol.md` §3 rule 8).
    for host in input.busy_elsewhere.keys() {
        if input.dispatched.contains(host) && input.records.get(host).is_some_and(|r| r.state == HostState::Pending) {
            withdraw.insert(host.clone());
        }
    }
    (skipped, withdraw)
}

/// The wave cursor: advanced while every host of the current wave is
/// settled and a later wave exists.
fn promote(input: &PlanInput<'_>, mut wave: usize, settled: &dyn Fn(&Hostname, &HostRecord) -> bool) -> usize {
    let manifest = input.manifest;
    let last_wave = manifest.waves.len().saturating_sub(1);
    let wave_settled =
        |wave: usize| manifest.hosts_in_wave(wave).all(|(h, _)| input.records.get(h).is_some_and(|r| settled(h, r)));
    while wave < last_wave && wave_settled(wave) {
        wave += 1;
    }
    wave
}

/// In hostname order, the Pending hosts of `wave` to dispatch now: not
/// standing, skipped, quarantined or held, while in flight < `max_in_flight`.
fn dispatch_in_wave(
    input: &PlanInput<'_>,
    wave: usize,
    skipped: &BTreeSet<Hostname>,
    standing: &dyn Fn(&Hostname) -> bool,
) -> Vec<Hostname> {
    let manifest = input.manifest;
    let mut dispatch = Vec::new();
    let Some(wave_def) = manifest.waves.get(wave) else { return dispatch };
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
        dispatch.push(host.clone());
        n_in_flight += 1;
    }
    dispatch
}

/// completed if every host settled; else active if some Pending host is
/// not yet dispatched; else converging.
fn rollout_state(
    input: &PlanInput<'_>,
    n_dispatch: usize,
    skipped: &BTreeSet<Hostname>,
    standing: &dyn Fn(&Hostname) -> bool,
    settled: &dyn Fn(&Hostname, &HostRecord) -> bool,
) -> RolloutState {
    let all_settled = input.records.iter().all(|(h, r)| settled(h, r));
    // Every host dispatched now is Pending, not skipped and had no
    // standing dispatch, so comparing counts avoids a quadratic membership
    // test. Held (busy) hosts count as waiting: the rollout is still active.
    let n_waiting = input
        .records
        .iter()
        .filter(|(h, r)| r.state == HostState::Pending && !standing(h) && !skipped.contains(*h))
        .count();
    if all_settled {
        RolloutState::Completed
    } else if n_waiting > n_dispatch {
        RolloutState::Active
    } else {
        RolloutState::Converging
    }
}

mod index;
pub use index::{plan_indexed, HostClass, IndexedInput, PlanIndex};

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod operator_tests;
