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
//! | `refused-whole` | a batch refused whole is sent again halved; an event refused on its own is dead-lettered with the CP's answer |

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::agent::SimAgent;
use super::Sim;
use crate::agent::reducer::ActivationOrder;
use crate::cp::planner::RolloutState;
use crate::cp::store;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{Failure, HostRecord, HostState, Timestamp};

mod cp;
mod end;
mod waves;

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

/// The invariants the checker runs (docs/simulator.md, "Invariants"), in
/// the order the summary lists them.
pub const INVARIANTS: &[&str] = &[
    "one-live-rollout",
    "fresh-evidence",
    "no-downgrade",
    "quarantine",
    "no-seq-gap",
    "acked-not-lost",
    "agreement",
    "halt",
    "max-in-flight",
    "wave-order",
    "cancelled",
    "restore-complete",
    "replay",
    "refused-whole",
    "terminal",
    "closure",
    "drift",
];

/// What the checker remembers between steps (never the system's state:
/// only what it has seen, to compare with what comes next).
#[derive(Debug, Default)]
pub struct Checker {
    pub n_checks: u64,
    /// Rollouts the CP answered `cp cancel` for (forgotten with the database).
    pub cancelled: BTreeSet<RolloutId>,
    cp_last: BTreeMap<(Hostname, RolloutId), u64>,
    logged: BTreeSet<(Hostname, RolloutId, u64)>,
    last_known: BTreeMap<usize, Snap>,
    accepted: BTreeMap<(usize, String), (Timestamp, RolloutId)>,
    tick_armed: BTreeSet<usize>,
    pub switch_orders: BTreeMap<u64, ActivationOrder>,
    /// When the CP first had each closure of a channel quarantined (by
    /// channel, so a lookup borrows instead of building a key).
    pub quarantined_at: BTreeMap<String, BTreeMap<Closure, Timestamp>>,
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
    /// Per rollout found clean by `check_cp`, and unchanged since: its
    /// state and whether a database was lost when it was checked.
    cp_clean: BTreeMap<RolloutId, (RolloutState, bool)>,
    /// Per rollout, the summary `halt`, `max-in-flight` and `wave-order`
    /// read, kept up to date (`check::waves`).
    mirrors: BTreeMap<RolloutId, waves::Mirror>,
    /// Events requests refused whole, by request: how many events, and
    /// the first one's (rollout, seq).
    pub refused: BTreeMap<u64, (usize, Option<(RolloutId, u64)>)>,
}

impl Checker {
    /// The database is gone, and with it everything the CP knew: the
    /// applied seqs and the quarantine. A closure counts as quarantined
    /// again once the rebuilt CP has it (an agent replayed the Reverted
    /// event): the `quarantine` check judges the CP's dispatches against
    /// what the CP knew when it issued them, as before the loss.
    pub fn database_lost(&mut self) {
        self.cancelled.clear();
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
        let since = self.checker.quarantined_at.get(id.channel()).and_then(|c| c.get(target));
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
}
