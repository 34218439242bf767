//! The checks of what the CP answers and plans: per ingest answer
//! (`no-seq-gap`, `acked-not-lost`, `agreement`), per rollout after a
//! group (`halt`, `max-in-flight`, `wave-order`), and `refused-whole` for
//! the batches the body-limit proxy refuses.

use std::collections::{BTreeMap, BTreeSet};

use super::{Checker, Violation};
use crate::cp::planner::{is_settled, RolloutState};
use crate::cp::store;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{HostState, Timestamp};
use crate::sim::Sim;
use crate::wire::{EventBatch, EventResult, Manifest, ResultStatus};

impl Sim {
    pub(in crate::sim) fn check_ingest(
        &mut self,
        host: usize,
        batch: &EventBatch,
        results: &[EventResult],
    ) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let hostname = &self.agents[host].host;
        for (item, result) in batch.events.iter().zip(results) {
            let key = (hostname.clone(), item.rollout_id.clone());
            let seq = item.event.seq;
            match result.status {
                ResultStatus::Applied => {
                    let last = self.checker.cp_last.get(&key).copied().unwrap_or(0);
                    if seq != last + 1 {
                        return Err(Violation::new(
                            "no-seq-gap",
                            format!(
                                "the CP applied {} (seq {seq}) of {hostname} in {} right after seq {last} (rule 2: \
                                 only seq {} may be applied; a higher one is a gap)",
                                item.event.kind(),
                                item.rollout_id,
                                last + 1
                            ),
                        ));
                    }
                    self.checker.cp_last.insert(key.clone(), seq);
                    self.checker.logged.insert((key.0, key.1, seq));
                }
                ResultStatus::Duplicate => {
                    if !self.checker.logged.contains(&(key.0.clone(), key.1.clone(), seq)) {
                        return Err(Violation::new(
                            "acked-not-lost",
                            format!(
                                "the CP answered duplicate for {} (seq {seq}) of {hostname} in {}, which is not in \
                                 its event log: the agent retires it and it is lost",
                                item.event.kind(),
                                item.rollout_id
                            ),
                        ));
                    }
                }
                ResultStatus::Rejected => {
                    return Err(Violation::new(
                        "agreement",
                        format!(
                            "the CP rejected {} (seq {seq}) of {hostname} in {}, an event the agent applied: {}",
                            item.event.kind(),
                            item.rollout_id,
                            result.reason.as_deref().unwrap_or("no reason")
                        ),
                    ));
                }
                ResultStatus::Gap => {
                    // Rule 8: nothing stored, and the CP names the seq it
                    // needs, which is exactly its last applied + 1.
                    let last = self.checker.cp_last.get(&key).copied().unwrap_or(0);
                    if result.expected_seq != Some(last + 1) || seq <= last + 1 {
                        return Err(Violation::new(
                            "no-seq-gap",
                            format!(
                                "the CP answered gap (expected seq {:?}) for {} (seq {seq}) of {hostname} in {}, \
                                 but its last applied seq is {last}",
                                result.expected_seq,
                                item.event.kind(),
                                item.rollout_id
                            ),
                        ));
                    }
                }
                ResultStatus::Retry => {}
            }
        }
        Ok(())
    }

    pub(in crate::sim) fn check_cp(&mut self) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let Some(state) = self.cp.state() else { return Ok(()) };
        let now = crate::sim::world::at(self.now_ms);
        let mut races = Vec::new();
        for (id, r) in &state.rollouts {
            let clean_key = (r.changed, r.state, self.checker.db_lost);
            if self.checker.cp_clean.get(id) == Some(&clean_key) {
                continue;
            }
            let m = &r.manifest;
            let n_failed =
                r.records.values().filter(|x| matches!(x.state, HostState::Failed | HostState::Reverted)).count();
            // Failures an operator accepted with `cp resume` leave the budget.
            let max_failed = m.policy.max_failed_hosts as usize + r.accepted_failures;
            if n_failed > max_failed
                && !matches!(r.state, RolloutState::Halted | RolloutState::Superseded | RolloutState::Cancelled)
            {
                return Err(Violation::new(
                    "halt",
                    format!(
                        "{id} has {n_failed} failed hosts (max_failed_hosts {max_failed}) but is {}",
                        r.state.as_str()
                    ),
                ));
            }
            if r.state == RolloutState::Halted && !r.dispatched.is_empty() {
                return Err(Violation::new(
                    "halt",
                    format!("{id} is halted but still offers {} dispatch(es)", r.dispatched.len()),
                ));
            }
            check_waves(&self.checker, now, id, r, &mut races)?;
            self.checker.cp_clean.insert(id.clone(), clean_key);
        }
        crate::sim::operators::check_cancelled(&self.checker.cancelled, state)?;
        for (id, h) in races {
            self.note(format!("CP: {h} acked {id} after the CP skipped it (its ack raced the quarantine)"));
            self.checker.raced.insert((id, h));
        }
        Ok(())
    }
}

/// `max-in-flight` and `wave-order` for one rollout.
///
/// In flight = the planner's definition: Pending with a standing
/// dispatch, Activating, Deferred, Soaking. Settled = Converged,
/// Failed, Reverted, or Pending and skipped (a skipped host reaches its
/// terminal outcome, counted by its wave: issue item 6).
///
/// A host the CP skipped after offering it may already hold the offer
/// (the withdrawal cannot reach back into a long-poll answer on its
/// way); its ack then arrives after the slot was given to another
/// host, and the CP applies it ("an ack that races a skip wins",
/// docs/decisions.md). Such a host (skipped, no longer Pending) is in
/// flight and counted, but may push the wave over `max_in_flight` by
/// itself: the CP could not have known. Every offer is still checked
/// strictly: a wave that receives a new dispatch must be within
/// `max_in_flight` counting every in-flight host, raced ones included.
fn check_waves(
    checker: &Checker,
    now: Timestamp,
    id: &RolloutId,
    r: &store::LiveRollout,
    races: &mut Vec<(RolloutId, Hostname)>,
) -> Result<(), Violation> {
    let m = &r.manifest;
    let mut first_unsettled = usize::MAX;
    // Hosts, not text: the lists are formatted only for a violation (a
    // string per in-flight host per group was a large share of the sim).
    let mut in_flight: BTreeMap<usize, Vec<(&Hostname, &str, bool)>> = BTreeMap::new();
    let mut raced: BTreeMap<usize, usize> = BTreeMap::new();
    let mut offered: BTreeSet<usize> = BTreeSet::new();
    // The first unsettled hosts (at most 5) of wave `first_unsettled`,
    // the only list a violation names.
    let mut unsettled: Vec<(&Hostname, HostState)> = Vec::new();
    // The CP opens one record per manifest host: both maps have the
    // same keys in the same order, so they are walked side by side
    // (a lookup per host was most of the sim's time at 10,000 hosts);
    // the dispatches and skips, sorted by host too, alongside them.
    if m.hosts.len() != r.records.len() {
        return Err(Violation::new("cp-state", format!("{id}: records and manifest hosts differ")));
    }
    let mut dispatches = r.dispatched.iter().peekable();
    let mut skips = r.skipped.iter().peekable();
    for ((h, e), rec) in m.hosts.iter().zip(r.records.values()) {
        let dispatch = merge_next(&mut dispatches, h, |(d, _)| *d).map(|(_, d)| d);
        let skipped = merge_next(&mut skips, h, |s| *s).is_some();
        let settled = is_settled(rec.state) || (skipped && rec.state == HostState::Pending);
        if !settled {
            if e.wave < first_unsettled {
                // No host of this wave was unsettled before this one.
                first_unsettled = e.wave;
                unsettled.clear();
            }
            if e.wave == first_unsettled && unsettled.len() < 5 {
                unsettled.push((h, rec.state));
            }
        }
        if dispatch.is_some_and(|d| d.issued_at == now) {
            offered.insert(e.wave);
        }
        if (rec.state == HostState::Pending && dispatch.is_some())
            || matches!(rec.state, HostState::Activating | HostState::Deferred | HostState::Soaking)
        {
            let late = skipped && rec.state != HostState::Pending;
            let what = if dispatch.is_some() { "offered" } else { rec.state.as_str() };
            in_flight.entry(e.wave).or_default().push((h, what, late));
            if late {
                *raced.entry(e.wave).or_default() += 1;
                if !checker.raced.contains(&(id.clone(), h.clone())) {
                    races.push((id.clone(), h.clone()));
                }
            }
        }
    }
    if !checker.db_lost {
        check_in_flight(id, m, &in_flight, &raced, &offered)?;
    }
    // The order is a promise about dispatching: no offer made by this
    // group may be in a wave after one with an unsettled host.
    if let Some(wave) = offered.iter().find(|w| **w > first_unsettled) {
        let offers: Vec<&str> = r
            .dispatched
            .iter()
            .filter(|(h, d)| d.issued_at == now && m.hosts.get(*h).is_some_and(|e| e.wave == *wave))
            .map(|(h, _)| h.as_str())
            .collect();
        return Err(Violation::new(
            "wave-order",
            format!(
                "{id} dispatches {} of wave {wave} while wave {first_unsettled} has unsettled hosts: {}",
                offers.join(", "),
                unsettled.iter().map(|(h, state)| format!("{h} {state}")).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    Ok(())
}

/// `max-in-flight` for one rollout: per wave, the hosts in flight (see
/// `check_waves` for the raced ones) against its `max_in_flight`.
fn check_in_flight(
    id: &RolloutId,
    m: &Manifest,
    in_flight: &BTreeMap<usize, Vec<(&Hostname, &str, bool)>>,
    raced: &BTreeMap<usize, usize>,
    offered: &BTreeSet<usize>,
) -> Result<(), Violation> {
    for (wave, hosts) in in_flight {
        let max = m.waves.get(*wave).map_or(0, |w| w.max_in_flight as usize);
        let n = hosts.len();
        let n_raced = raced.get(wave).copied().unwrap_or(0);
        if n - n_raced > max || (n > max && offered.contains(wave)) {
            let why = if offered.contains(wave) { " after a new dispatch" } else { "" };
            let hosts: Vec<String> = hosts
                .iter()
                .map(|(h, what, late)| format!("{h} {what}{}", if *late { " (raced its skip)" } else { "" }))
                .collect();
            return Err(Violation::new(
                "max-in-flight",
                format!("{id} wave {wave} has {n} hosts in flight{why}, max_in_flight is {max}: {}", hosts.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The item of `sorted` (ascending by `key`) whose key is `host`, if
/// any, skipping the smaller ones: one comparison per host walked.
fn merge_next<T>(
    sorted: &mut std::iter::Peekable<impl Iterator<Item = T>>,
    host: &Hostname,
    key: impl Fn(&T) -> &Hostname,
) -> Option<T> {
    while let Some(item) = sorted.peek() {
        match key(item).cmp(host) {
            std::cmp::Ordering::Less => drop(sorted.next()),
            std::cmp::Ordering::Equal => return sorted.next(),
            std::cmp::Ordering::Greater => return None,
        }
    }
    None
}

impl Sim {
    /// `refused-whole`, when the drainer has decided about a request the
    /// CP refused whole (`n` events from `first`): several events are sent
    /// again from the same one, at most half as many (`post_in_batches`).
    pub(in crate::sim) fn check_refused_whole(
        &mut self,
        host: usize,
        req: u64,
        n: usize,
        first: Option<(RolloutId, u64)>,
        step: &crate::sim::agent::delivery::Step,
    ) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let Some((sent, sent_first)) = self.checker.refused.remove(&req) else { return Ok(()) };
        if sent != n || first.as_ref().is_some_and(|f| Some(f) != sent_first.as_ref()) {
            return Err(Violation::new(
                "refused-whole",
                format!("{}: the drainer holds {n} events for a request of {sent}", self.agents[host].host),
            ));
        }
        if n > 1 {
            let again = match step {
                crate::sim::agent::delivery::Step::Send(batch, _) => {
                    batch.events.first().map(|e| (batch.events.len(), (e.rollout_id.clone(), e.event.seq)))
                }
                _ => None,
            };
            if !again.as_ref().is_some_and(|(m, f)| *m <= n / 2 && Some(f) == sent_first.as_ref()) {
                return Err(Violation::new(
                    "refused-whole",
                    format!(
                        "{}: a batch of {n} events was refused whole, and the drainer did not send it again halved \
                         (next: {:?})",
                        self.agents[host].host,
                        again.map(|(m, _)| m)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `refused-whole` for events the CP refused on their own: each is in
    /// `dead/` with the CP's answer as its reason (the real queue's files).
    pub(in crate::sim) fn check_dead_lettered_alone(
        &mut self,
        host: usize,
        alone: &[(RolloutId, u64, String)],
    ) -> Result<(), Violation> {
        for (rollout_id, seq, why) in alone {
            self.checker.n_checks += 1;
            let reason = self.agents[host].dead_reason(rollout_id, *seq);
            if !why.contains("refused it on its own") || reason.as_deref() != Some(why.as_str()) {
                return Err(Violation::new(
                    "refused-whole",
                    format!(
                        "{}: seq {seq} of {rollout_id} was refused on its own ({why}) but its dead letter says {reason:?}",
                        self.agents[host].host
                    ),
                ));
            }
        }
        Ok(())
    }
}
