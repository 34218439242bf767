//! The planner's per-rollout index and [`plan_indexed`], which gives the
//! SAME plan as [`super::plan`] in time proportional to what it decides
//! (dispatches, withdrawals, skips, held hosts) instead of to the fleet.
//!
//! `plan` walks every host of the rollout several times; the writer plans
//! after every group that moved a host, so at 10,000 hosts planning was
//! most of the CP's work. The index keeps, per host class (state, standing
//! dispatch, skipped), the counts and sets the rules read: the failed
//! hosts, per wave the unsettled and in-flight counts and the hosts waiting
//! for a dispatch, and the Pending hosts per target closure (for quarantine
//! skips). The writer updates it with every change of a record, a standing
//! dispatch or a skip (`LiveRollout`'s setters); in debug builds it checks
//! every indexed plan against `plan` on the same input.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{halt_text, in_flight_class, is_settled, Plan, RolloutState};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{HostRecord, HostState};
use crate::wire::{HostEntry, Manifest};

/// What the planner's rules read of one host: its record's state, whether
/// it has a standing dispatch, whether the rollout skipped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostClass {
    pub state: HostState,
    pub dispatched: bool,
    pub skipped: bool,
}

impl HostClass {
    /// Settled as `plan` counts it: Converged/Failed/Reverted, or Pending
    /// and skipped.
    fn settled(self) -> bool {
        is_settled(self.state) || (self.state == HostState::Pending && self.skipped)
    }

    /// Pending and not yet skipped, or skipped but still dispatched: a
    /// quarantine of its target skips it or withdraws its dispatch.
    fn quarantine_acts_on(self) -> bool {
        self.state == HostState::Pending && (self.dispatched || !self.skipped)
    }

    /// Pending, not dispatched, not skipped: the wave's dispatch candidates.
    fn waiting(self) -> bool {
        self.state == HostState::Pending && !self.dispatched && !self.skipped
    }
}

/// One wave's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct WaveIndex {
    unsettled: usize,
    in_flight: usize,
    /// Candidates for a dispatch, in hostname order (the dispatch order).
    waiting: BTreeSet<Hostname>,
}

/// The index of one rollout (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanIndex {
    /// Hosts Failed or Reverted (the halt budget), in hostname order.
    failed: BTreeSet<Hostname>,
    waves: Vec<WaveIndex>,
    /// Pending hosts by target closure, the ones a quarantine of the
    /// target acts on: not yet skipped, or still holding a dispatch. (A
    /// skipped host without one needs nothing more; leaving those out keeps
    /// every plan from walking all the hosts a quarantine ever skipped.)
    pending_by_target: HashMap<Closure, BTreeSet<Hostname>>,
    /// Manifest hosts without a record plus records of hosts not in the
    /// manifest. The CP keeps one record per manifest host, so this is 0;
    /// otherwise [`plan_indexed`] declines and `plan` decides.
    irregular: usize,
}

impl PlanIndex {
    /// Builds the index of a rollout from scratch.
    pub fn build(
        manifest: &Manifest,
        records: &BTreeMap<Hostname, HostRecord>,
        dispatched: &dyn Fn(&Hostname) -> bool,
        skipped: &BTreeSet<Hostname>,
    ) -> PlanIndex {
        let mut index = PlanIndex {
            irregular: records.keys().filter(|h| !manifest.hosts.contains_key(*h)).count(),
            ..PlanIndex::default()
        };
        for (host, entry) in &manifest.hosts {
            match records.get(host) {
                Some(r) => {
                    let class =
                        HostClass { state: r.state, dispatched: dispatched(host), skipped: skipped.contains(host) };
                    index.add(host, entry, class);
                }
                None => index.irregular += 1,
            }
        }
        index
    }

    /// One host's class changed (`None`: no record).
    pub fn update(
        &mut self,
        host: &Hostname,
        entry: Option<&HostEntry>,
        before: Option<HostClass>,
        after: Option<HostClass>,
    ) {
        if before == after {
            return;
        }
        let Some(entry) = entry else {
            // A record of a host the manifest does not name.
            if before.is_none() {
                self.irregular += 1;
            }
            return;
        };
        match before {
            Some(class) => self.remove(host, entry, class),
            None => self.irregular = self.irregular.saturating_sub(1),
        }
        match after {
            Some(class) => self.add(host, entry, class),
            None => self.irregular += 1,
        }
    }

    fn wave_mut(&mut self, wave: usize) -> &mut WaveIndex {
        if self.waves.len() <= wave {
            self.waves.resize_with(wave + 1, WaveIndex::default);
        }
        &mut self.waves[wave]
    }

    fn add(&mut self, host: &Hostname, entry: &HostEntry, class: HostClass) {
        if matches!(class.state, HostState::Failed | HostState::Reverted) {
            self.failed.insert(host.clone());
        }
        if class.quarantine_acts_on() {
            self.pending_by_target.entry(entry.target_closure.clone()).or_default().insert(host.clone());
        }
        let wave = self.wave_mut(entry.wave);
        wave.unsettled += usize::from(!class.settled());
        wave.in_flight += usize::from(in_flight_class(class.state, class.dispatched));
        if class.waiting() {
            wave.waiting.insert(host.clone());
        }
    }

    fn remove(&mut self, host: &Hostname, entry: &HostEntry, class: HostClass) {
        if matches!(class.state, HostState::Failed | HostState::Reverted) {
            self.failed.remove(host);
        }
        if class.quarantine_acts_on() {
            if let Some(set) = self.pending_by_target.get_mut(&entry.target_closure) {
                set.remove(host);
                if set.is_empty() {
                    self.pending_by_target.remove(&entry.target_closure);
                }
            }
        }
        let wave = self.wave_mut(entry.wave);
        wave.unsettled -= usize::from(!class.settled());
        wave.in_flight -= usize::from(in_flight_class(class.state, class.dispatched));
        if class.waiting() {
            wave.waiting.remove(host);
        }
    }

    fn unsettled(&self, wave: usize) -> usize {
        self.waves.get(wave).map_or(0, |w| w.unsettled)
    }
}

/// What [`plan_indexed`] reads: the fields of [`super::PlanInput`], with
/// the standing dispatches as the writer keeps them and the index.
#[derive(Debug)]
pub struct IndexedInput<'a, D> {
    pub manifest: &'a Manifest,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<&'a str>,
    pub records: &'a BTreeMap<Hostname, HostRecord>,
    pub dispatched: &'a BTreeMap<Hostname, D>,
    pub quarantined: &'a HashSet<Closure>,
    pub busy_elsewhere: &'a BTreeMap<Hostname, RolloutId>,
    pub skipped: &'a BTreeSet<Hostname>,
    /// Failed/Reverted hosts a `cp resume` accepted (out of the budget).
    pub accepted_failures: usize,
    pub index: &'a PlanIndex,
}

/// The plan `super::plan` returns for the same input; `None` when the
/// index cannot answer (records and manifest hosts differ).
pub fn plan_indexed<D>(input: &IndexedInput<'_, D>) -> Option<Plan> {
    let index = input.index;
    if index.irregular != 0 {
        return None;
    }
    let mut out = Plan::unchanged(input.state, input.current_wave, input.halt_reason);
    if matches!(input.state, RolloutState::Superseded | RolloutState::Cancelled) {
        out.withdraw = input.dispatched.keys().cloned().collect();
        return Some(out);
    }
    let max_failed = input.manifest.policy.max_failed_hosts;
    let budget = (max_failed as usize).saturating_add(input.accepted_failures);
    if input.state == RolloutState::Halted || index.failed.len() > budget {
        if out.halt_reason.is_none() {
            out.halt_reason =
                Some(halt_text(&index.failed.iter().collect::<Vec<_>>(), max_failed, input.accepted_failures));
        }
        out.state = RolloutState::Halted;
        out.withdraw = input.dispatched.keys().cloned().collect();
        return Some(out);
    }
    let (new_skips, withdraw) = skips_and_holds(input);
    let skipped_now = |h: &Hostname| input.skipped.contains(h) || new_skips.contains(h);
    let wave_of = |h: &Hostname| input.manifest.hosts.get(h).map_or(0, |e| e.wave);
    // A new skip was Pending and not skipped: unsettled until now.
    let mut newly_settled: BTreeMap<usize, usize> = BTreeMap::new();
    for h in &new_skips {
        *newly_settled.entry(wave_of(h)).or_default() += 1;
    }
    let unsettled = |w: usize| index.unsettled(w) - newly_settled.get(&w).copied().unwrap_or(0);
    let last_wave = input.manifest.waves.len().saturating_sub(1);
    while out.current_wave < last_wave && unsettled(out.current_wave) == 0 {
        out.current_wave += 1;
    }
    out.dispatch = dispatch_in_wave(input, out.current_wave, &withdraw, &skipped_now);
    let n_unsettled: usize = (0..index.waves.len()).map(unsettled).sum();
    // Pending, not standing, not skipped: the waiting candidates that were
    // not just skipped, plus the hosts whose dispatch is withdrawn now for
    // a hold (a withdrawn host is Pending with a dispatch).
    let n_waiting = index.waves.iter().map(|w| w.waiting.len()).sum::<usize>()
        - new_skips.iter().filter(|h| !input.dispatched.contains_key(*h)).count()
        + withdraw.iter().filter(|h| !skipped_now(h)).count();
    out.state = if n_unsettled == 0 {
        RolloutState::Completed
    } else if n_waiting > out.dispatch.len() {
        RolloutState::Active
    } else {
        RolloutState::Converging
    };
    out.skip = new_skips.into_iter().collect();
    out.withdraw = withdraw.into_iter().collect();
    Some(out)
}

/// `super::skips_and_holds` from the index: the new skips (Pending hosts
/// whose target is quarantined, not yet skipped) and the dispatches to
/// withdraw for a skip or a hold.
fn skips_and_holds<D>(input: &IndexedInput<'_, D>) -> (BTreeSet<Hostname>, BTreeSet<Hostname>) {
    let mut new_skips = BTreeSet::new();
    let mut withdraw = BTreeSet::new();
    let mut quarantined_pending = |hosts: &BTreeSet<Hostname>| {
        for host in hosts {
            if input.dispatched.contains_key(host) {
                withdraw.insert(host.clone());
            }
            if !input.skipped.contains(host) {
                new_skips.insert(host.clone());
            }
        }
    };
    let by_target = &input.index.pending_by_target;
    if input.quarantined.len() <= by_target.len() {
        for closure in input.quarantined {
            if let Some(hosts) = by_target.get(closure) {
                quarantined_pending(hosts);
            }
        }
    } else {
        for (closure, hosts) in by_target {
            if input.quarantined.contains(closure) {
                quarantined_pending(hosts);
            }
        }
    }
    for host in input.busy_elsewhere.keys() {
        if input.dispatched.contains_key(host) && input.records.get(host).is_some_and(|r| r.state == HostState::Pending)
        {
            withdraw.insert(host.clone());
        }
    }
    (new_skips, withdraw)
}

/// `super::dispatch_in_wave` from the index: walks only the wave's waiting
/// hosts, in hostname order, until the wave is full.
fn dispatch_in_wave<D>(
    input: &IndexedInput<'_, D>,
    wave: usize,
    withdraw: &BTreeSet<Hostname>,
    skipped_now: &dyn Fn(&Hostname) -> bool,
) -> Vec<Hostname> {
    let mut dispatch = Vec::new();
    let (Some(wave_def), Some(counts)) = (input.manifest.waves.get(wave), input.index.waves.get(wave)) else {
        return dispatch;
    };
    let max = wave_def.max_in_flight as usize;
    // A withdrawn host was Pending with a dispatch: in flight until now.
    let n_withdrawn = withdraw.iter().filter(|h| input.manifest.hosts.get(*h).is_some_and(|e| e.wave == wave)).count();
    let mut n_in_flight = counts.in_flight - n_withdrawn;
    for host in &counts.waiting {
        if n_in_flight >= max {
            break;
        }
        if skipped_now(host) || input.busy_elsewhere.contains_key(host) {
            continue;
        }
        if input.manifest.hosts.get(host).is_some_and(|e| input.quarantined.contains(&e.target_closure)) {
            continue;
        }
        dispatch.push(host.clone());
        n_in_flight += 1;
    }
    dispatch
}
