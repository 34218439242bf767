//! The invariants, written as `docs/protocol.md` (§3 rules 1–11, §4 and §5) says the
//! product must behave, so today's divergences show as violations and the
//! fixes make them pass. Cheap ones run after every step (agent input, CP
//! group, restart); the agreement ones at quiescence.
//!
//! | name | what |
//! |---|---|
//! | `agreement` | the CP never rejects an event the agent applied (same `step`, both sides); at the end agent and CP records are equal per (host, rollout) |
//! | `no-seq-gap` | the CP applies seq N only after N-1 (rule 2) |
//! | `acked-not-lost` | an event answered `duplicate` is in the CP log; nothing answered `applied` disappears across a CP restart |
//! | `replay` | folding the CP log (`rebuild_host_records`) gives the stored records |
//! | `one-live-rollout` | at most one live rollout per host (rule 8) |
//! | `fresh-evidence` | after a restart the failure gate fires only on results of this run (rule 6) |
//! | `max-in-flight`, `wave-order`, `halt` | the planner's promises |
//! | `quarantine` | a quarantined closure is never activated again on its channel |
//! | `no-downgrade` | a host never accepts an older rollout of a channel (rule 9) |
//! | `restore-complete` | an agent restart rebuilds every rollout that was live |
//! | `closure` | each host runs what the CP says it runs |
//! | `terminal` | with hosts reachable, every rollout ends (completed, halted, superseded) |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::agent::SimAgent;
use super::Sim;
use crate::agent::reducer::ActivationOrder;
use crate::cp::planner::{is_settled, RolloutState};
use crate::cp::store;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{Failure, HostRecord, HostState, Timestamp};
use crate::wire::{EventBatch, EventResult, ResultStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub message: String,
}

impl Violation {
    pub fn new(invariant: &'static str, message: impl Into<String>) -> Violation {
        Violation { invariant, message: message.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.invariant, self.message)
    }
}

/// Live = holds the host: Activating, Deferred, Soaking, or Failed with a
/// rollback fired whose outcome is not in yet (protocol rule 8).
pub fn is_live(r: &HostRecord) -> bool {
    matches!(r.state, HostState::Activating | HostState::Deferred | HostState::Soaking)
        || (r.state == HostState::Failed && r.rollback_fired && r.rollback_failure.is_none())
}

pub type Snap = BTreeMap<RolloutId, (HostState, u64)>;

/// What the checker remembers between steps (never the system's state:
/// only what it has seen, to compare with what comes next).
#[derive(Debug, Default)]
pub struct Checker {
    pub n_checks: u64,
    cp_last: BTreeMap<(Hostname, RolloutId), u64>,
    logged: BTreeSet<(Hostname, RolloutId, u64)>,
    last_known: BTreeMap<usize, Snap>,
    accepted: BTreeMap<(usize, String), (Timestamp, RolloutId)>,
    tick_armed: BTreeSet<usize>,
    pub switch_orders: BTreeMap<u64, ActivationOrder>,
    /// When the CP first had each (channel, closure) quarantined.
    pub quarantined_at: BTreeMap<(String, Closure), Timestamp>,
    /// `issued_at` of the dispatch each (host, rollout) was admitted on.
    pub dispatch_issued: BTreeMap<(usize, RolloutId), Timestamp>,
    db_lost: bool,
    /// The last successful publish after a database loss (0 before any
    /// loss): the run may end only once every agent's heartbeat was
    /// committed after it, so the rebuilt CP has asked each agent for the
    /// history it lacks (`Sim::is_quiescent`).
    republished_ms: u64,
    /// (rollout, host) whose ack the CP applied after skipping the host,
    /// already noted in the trace.
    raced: BTreeSet<(RolloutId, Hostname)>,
    /// Per rollout, what `check_cp` last found clean: the rollout's change
    /// stamp, its state, and whether a database was lost. The checks read
    /// nothing else, so an equal key gives the same (clean) answer.
    cp_clean: BTreeMap<RolloutId, (u64, RolloutState, bool)>,
}

impl Checker {
    /// The database is gone, and with it everything the CP knew: the
    /// applied seqs and the quarantine. A closure counts as quarantined
    /// again once the rebuilt CP has it (an agent replayed the Reverted
    /// event): the `quarantine` check judges the CP's dispatches against
    /// what the CP knew when it issued them, as before the loss.
    pub fn database_lost(&mut self) {
        self.cp_last.clear();
        self.logged.clear();
        self.quarantined_at.clear();
        self.db_lost = true;
    }

    pub fn published(&mut self, now_ms: u64) {
        if self.db_lost {
            self.republished_ms = now_ms;
        }
    }

    pub fn republished_ms(&self) -> u64 {
        self.republished_ms
    }

    pub fn tick_armed(&self, host: usize) -> bool {
        self.tick_armed.contains(&host)
    }

    pub fn set_tick_armed(&mut self, host: usize, on: bool) {
        if on {
            self.tick_armed.insert(host);
        } else {
            self.tick_armed.remove(&host);
        }
    }

    pub fn live_before_crash(&mut self, host: usize) -> Snap {
        self.tick_armed.remove(&host);
        self.last_known.get(&host).cloned().unwrap_or_default()
    }

    pub fn snapshot(&self, agent: &SimAgent) -> Snap {
        agent
            .rollouts()
            .map(|r| r.iter().map(|(id, s)| (id.clone(), (s.record.state, s.record.last_seq))).collect())
            .unwrap_or_default()
    }

    /// What changed since `before`, as trace lines; remembers the new state.
    pub fn diff(&mut self, agent: &SimAgent, before: &Snap) -> Vec<String> {
        let now = self.snapshot(agent);
        let mut out = Vec::new();
        for (id, (state, seq)) in &now {
            match before.get(id) {
                Some((s0, q0)) if s0 == state && q0 == seq => {}
                Some((s0, _)) if s0 == state => {}
                Some((s0, _)) => out.push(format!("{id} {s0} -> {state} (seq {seq})")),
                None => out.push(format!("{id} opened: {state} (seq {seq})")),
            }
        }
        self.last_known.insert(agent.idx, now);
        out
    }
}

fn live_rollouts(agent: &SimAgent) -> Vec<(RolloutId, HostState)> {
    agent
        .rollouts()
        .map(|r| r.iter().filter(|(_, s)| is_live(&s.record)).map(|(id, s)| (id.clone(), s.record.state)).collect())
        .unwrap_or_default()
}

impl Sim {
    pub(super) fn check_agent_step(&mut self, host: usize, before: &Snap) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let agent = &self.agents[host];
        let live = live_rollouts(agent);
        if live.len() > 1 {
            let list: Vec<String> = live.iter().map(|(id, s)| format!("{id} ({s})")).collect();
            return Err(Violation::new(
                "one-live-rollout",
                format!("{} has {} live rollouts at once: {}", agent.host, live.len(), list.join(", ")),
            ));
        }
        let Some(proc) = agent.proc.as_ref() else { return Ok(()) };
        for (id, slot) in proc.reducer.rollouts().iter() {
            let was = before.get(id).map(|(s, _)| *s);
            let r = &slot.record;
            if was == Some(HostState::Soaking) && r.state == HostState::Failed {
                if let Some(Failure::SustainedProbeFailure { failing_probes, .. }) = &r.failure {
                    let stale: Vec<&str> = r
                        .enforce_probes()
                        .filter(|p| !proc.fresh.contains(&(id.clone(), p.name.clone())))
                        .map(|p| p.name.as_str())
                        .collect();
                    if !stale.is_empty() {
                        return Err(Violation::new(
                            "fresh-evidence",
                            format!(
                                "{} failed {id} on probes {failing_probes:?} at {} although enforce probe(s) {stale:?} \
                                 have produced no result since the agent restarted at +{} s (rule 6)",
                                agent.host,
                                super::fmt_ms(self.now_ms),
                                proc.started_ms / 1000
                            ),
                        ));
                    }
                }
            }
            if was.is_none_or(|s| s == HostState::Pending) && r.state == HostState::Activating {
                let channel = id.channel().to_owned();
                let issued = self.issued.get(id).copied();
                let key = (host, channel.clone());
                if let (Some(issued), Some((newest, newest_id))) = (issued, self.checker.accepted.get(&key)) {
                    if issued < *newest {
                        return Err(Violation::new(
                            "no-downgrade",
                            format!(
                                "{} accepted {id} (issued {}) after it had accepted {newest_id} (issued {}) on \
                                 channel {channel} (rule 9)",
                                agent.host,
                                store::ts(issued),
                                store::ts(*newest)
                            ),
                        ));
                    }
                }
                if let Some(issued) = issued {
                    self.checker.accepted.insert(key, (issued, id.clone()));
                }
                if let Some(target) = &r.target_closure {
                    self.check_not_quarantined(host, id, target)?;
                }
            }
        }
        Ok(())
    }

    /// The CP must not offer a quarantined closure: a violation when the
    /// dispatch the host acted on was issued after the quarantine. A
    /// dispatch already on its way when the closure was quarantined may
    /// still be acted on ("an ack that races a skip wins: the host's events
    /// are facts", docs/decisions.md); the agent cannot know.
    fn check_not_quarantined(&self, host: usize, id: &RolloutId, target: &Closure) -> Result<(), Violation> {
        let since = self.checker.quarantined_at.get(&(id.channel().to_owned(), target.clone()));
        let issued = self.checker.dispatch_issued.get(&(host, id.clone()));
        let quarantined = match (since, issued) {
            (Some(since), Some(issued)) => since <= issued,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if quarantined {
            return Err(Violation::new(
                "quarantine",
                format!(
                    "{} activates {target} for {id}, but that closure is quarantined on channel {}",
                    self.agents[host].host,
                    id.channel()
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn check_activation(&mut self, host: usize, order: &ActivationOrder) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let live: Vec<RolloutId> = live_rollouts(&self.agents[host])
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| id != &order.rollout_id)
            .collect();
        if !live.is_empty() {
            return Err(Violation::new(
                "one-live-rollout",
                format!(
                    "{} switches to {} for {} while {:?} is live on it (rule 8)",
                    self.agents[host].host, order.closure, order.rollout_id, live
                ),
            ));
        }
        self.check_not_quarantined(host, &order.rollout_id, &order.closure)
    }

    pub(super) fn check_restore(&mut self, host: usize, before: &Snap) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let agent = &self.agents[host];
        let Some(rollouts) = agent.rollouts() else { return Ok(()) };
        for (id, (state, seq)) in before {
            let record_live = matches!(state, HostState::Activating | HostState::Deferred | HostState::Soaking);
            if record_live && rollouts.get(id).is_none() {
                let why = agent
                    .proc
                    .as_ref()
                    .map(|p| {
                        if p.restore.pruned.contains(id) {
                            "treated as pruned history".to_owned()
                        } else {
                            format!("skipped: {:?}", p.restore.skipped)
                        }
                    })
                    .unwrap_or_default();
                return Err(Violation::new(
                    "restore-complete",
                    format!("{} restarted without rollout {id}, which was {state} at seq {seq} ({why})", agent.host),
                ));
            }
        }
        self.checker.last_known.insert(host, self.checker.snapshot(&self.agents[host]));
        Ok(())
    }

    pub(super) fn check_ingest(
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

    pub(super) fn check_cp(&mut self) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let Some(state) = self.cp.state() else { return Ok(()) };
        let now = super::world::at(self.now_ms);
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
        for (wave, hosts) in &in_flight {
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
                    format!(
                        "{id} wave {wave} has {n} hosts in flight{why}, max_in_flight is {max}: {}",
                        hosts.join(", ")
                    ),
                ));
            }
        }
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
    pub(super) fn check_replay(&mut self, when: &str) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let Some(conn) = self.cp.reader() else { return Ok(()) };
        let rebuilt = store::rebuild_host_records(conn, &self.cp.db)
            .map_err(|e| Violation::new("replay", format!("{when}: the event log does not replay: {e}")))?;
        let cached = store::cached_host_records(conn, &self.cp.db)
            .map_err(|e| Violation::new("replay", format!("{when}: cannot read host records: {e}")))?;
        for (key, rec) in &cached {
            if rebuilt.get(key) != Some(rec) {
                return Err(Violation::new(
                    "replay",
                    format!("{when}: replaying the log of {} in {} does not give the stored record", key.1, key.0),
                ));
            }
        }
        for ((host, id), last) in &self.checker.cp_last {
            let stored = cached.get(&(id.clone(), host.clone())).map_or(0, |r| r.last_seq);
            if stored < *last {
                return Err(Violation::new(
                    "acked-not-lost",
                    format!("{when}: the CP applied seq {last} of {host} in {id} but now has only seq {stored}"),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn final_checks(&mut self, quiescent: bool) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let Some(state) = self.cp.state() else {
            return Err(Violation::new("terminal", "the CP is down at the end of the run"));
        };
        for (id, r) in &state.rollouts {
            if matches!(r.state, RolloutState::Active | RolloutState::Converging) {
                let stuck: Vec<String> = r
                    .records
                    .iter()
                    .filter(|(_, x)| !is_settled(x.state))
                    .take(5)
                    .map(|(h, x)| {
                        let why = if state
                            .quarantine
                            .get(id.channel())
                            .is_some_and(|q| x.target_closure.as_ref().is_some_and(|t| q.contains(t)))
                        {
                            ", target quarantined"
                        } else {
                            ""
                        };
                        format!("{h} {}{why}", x.state)
                    })
                    .collect();
                return Err(Violation::new(
                    "terminal",
                    format!(
                        "{id} is still {} at +{} s with every host reachable; unsettled: {}",
                        r.state.as_str(),
                        self.now_ms / 1000,
                        stuck.join(", ")
                    ),
                ));
            }
        }
        // Agent and CP agree per (host, rollout).
        for agent in &self.agents {
            let Some(rollouts) = agent.rollouts() else { continue };
            for (id, slot) in rollouts.iter() {
                if self.checker.db_lost && !state.rollouts.contains_key(id) {
                    // Lost with the database and never published again (the
                    // operator's choice, e.g. the downgrade scenario): the
                    // CP has no manifest to hold records under.
                    continue;
                }
                let cp = state.rollouts.get(id).and_then(|r| r.records.get(&agent.host));
                let Some(cp) = cp else {
                    return Err(Violation::new(
                        "agreement",
                        format!(
                            "{} has {id} ({}, seq {}) but the CP does not know it",
                            agent.host, slot.record.state, slot.record.last_seq
                        ),
                    ));
                };
                if (cp.state, cp.last_seq) != (slot.record.state, slot.record.last_seq) {
                    return Err(Violation::new(
                        "agreement",
                        format!(
                            "{} in {id}: the agent says {} at seq {}, the CP says {} at seq {}",
                            agent.host, slot.record.state, slot.record.last_seq, cp.state, cp.last_seq
                        ),
                    ));
                }
            }
            for (id, r) in &state.rollouts {
                if let Some(cp) = r.records.get(&agent.host) {
                    if cp.last_seq > 0 && rollouts.get(id).is_none() {
                        return Err(Violation::new(
                            "agreement",
                            format!(
                                "the CP has {} in {id} at {} seq {}; the agent has no such rollout",
                                agent.host, cp.state, cp.last_seq
                            ),
                        ));
                    }
                }
            }
        }
        // Each host runs what the CP says it runs.
        for (idx, agent) in self.agents.iter().enumerate() {
            let mut newest: Option<(&RolloutId, &HostRecord)> = None;
            for (id, r) in &state.rollouts {
                let Some(rec) = r.records.get(&agent.host) else { continue };
                if rec.state == HostState::Pending || matches!(rec.failure, Some(Failure::DispatchRejected { .. })) {
                    continue;
                }
                if newest.is_none_or(|(_, n)| rec.dispatch_acked_at > n.dispatch_acked_at) {
                    newest = Some((id, rec));
                }
            }
            let Some((id, rec)) = newest else { continue };
            let says = match (&rec.state, &rec.failure) {
                (HostState::Converged | HostState::Soaking, _) => rec.target_closure.clone(),
                (HostState::Reverted, _) => rec.reverted_to.clone(),
                (HostState::Failed, _) if rec.rollback_fired => None,
                (HostState::Failed, Some(Failure::ActivationFailed { .. })) => rec.current_closure_at_dispatch.clone(),
                (HostState::Failed, Some(Failure::WrongClosure { observed })) => Some(observed.clone()),
                (HostState::Failed, _) => rec.target_closure.clone(),
                _ => None,
            };
            let runs = &self.machines[idx].current;
            if let Some(says) = says {
                if &says != runs {
                    return Err(Violation::new(
                        "closure",
                        format!(
                            "{} runs {runs}, but the CP says it runs {says} ({id} is {} on it)",
                            agent.host, rec.state
                        ),
                    ));
                }
            }
        }
        if quiescent {
            self.check_drift()?;
        }
        self.check_replay("at the end")?;
        if !quiescent {
            return Err(Violation::new(
                "terminal",
                format!("the fleet did not settle by +{} s (events pending or a rollout live)", self.now_ms / 1000),
            ));
        }
        Ok(())
    }

    /// Rule 10 at quiescence, where agent and CP agree (checked just
    /// before): every host heartbeats once more through the real writer
    /// (what it runs, its queue's last seqs), and the CP's drift verdict
    /// (`hosts.drift`) must not be `drifting` for any of them.
    fn check_drift(&mut self) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let heartbeats: Vec<super::cp::Work> = self
            .agents
            .iter()
            .zip(&self.machines)
            .filter_map(|(agent, m)| {
                let proc = agent.proc.as_ref()?;
                let last_seq = proc.journal.lock().last_seqs().clone();
                Some(super::cp::Work::Heartbeat(Box::new(crate::wire::Heartbeat {
                    hostname: agent.host.clone(),
                    current_closure: m.current.clone(),
                    booted_closure: Some(m.current.clone()),
                    uptime_secs: (self.now_ms - proc.started_ms) / 1000,
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    last_seq,
                })))
            })
            .collect();
        self.cp.run(heartbeats);
        let Some(reader) = self.cp.reader() else { return Ok(()) };
        let rows: Vec<(String, String, Option<String>)> = reader
            .prepare("SELECT hostname, drift, expected_closure FROM hosts WHERE drift = 'drifting' ORDER BY hostname")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| Violation::new("drift", format!("cannot read the hosts' drift: {e}")))?;
        if let Some((host, _, expected)) = rows.first() {
            let runs = Hostname::parse(host)
                .ok()
                .and_then(|h| self.host_idx.get(&h).map(|i| self.machines[*i].current.to_string()))
                .unwrap_or_default();
            return Err(Violation::new(
                "drift",
                format!(
                    "the CP reports {} host(s) drifting at quiescence while agents and CP agree, e.g. {host}: runs {runs}, expected {}",
                    rows.len(),
                    expected.as_deref().unwrap_or("?")
                ),
            ));
        }
        Ok(())
    }
}
