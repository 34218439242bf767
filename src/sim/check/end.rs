//! The checks at a CP restart and at the end of a run: `replay`,
//! `acked-not-lost`, `terminal`, `agreement`, `closure`, `drift`.

use super::Violation;
use crate::cp::planner::{is_settled, RolloutState};
use crate::cp::store;
use crate::cp::store::CpState;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{Failure, HostRecord, HostState};
use crate::sim::agent::SimAgent;
use crate::sim::{Machine, Sim};

/// The records the CP's event log folds into, or why it does not.
type Rebuilt = Result<std::collections::BTreeMap<(RolloutId, Hostname), HostRecord>, store::StoreError>;

impl Sim {
    pub(in crate::sim) fn check_replay(&mut self, when: &str) -> Result<(), Violation> {
        self.cp.settle();
        let Some(conn) = self.cp.reader() else { return Ok(()) };
        let rebuilt = store::rebuild_host_records(conn, &self.cp.db);
        self.check_replayed(when, rebuilt)
    }

    /// `check_replay` with the log already folded (`rebuilt`).
    fn check_replayed(&mut self, when: &str, rebuilt: Rebuilt) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        self.cp.settle();
        let Some(conn) = self.cp.reader() else { return Ok(()) };
        let rebuilt =
            rebuilt.map_err(|e| Violation::new("replay", format!("{when}: the event log does not replay: {e}")))?;
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

    pub(in crate::sim) fn final_checks(&mut self, quiescent: bool) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        if self.cp.state().is_none() {
            return Err(Violation::new("terminal", "the CP is down at the end of the run"));
        }
        // The whole log is folded on the machine's other core, through a
        // reader of its own, while the other end checks run: nothing they
        // write (drift's heartbeats) is in the log or the records.
        self.cp.settle();
        let (db, path) = (self.cp.db.clone(), self.cp.db.clone());
        std::thread::scope(|scope| {
            let rebuilt = scope.spawn(move || {
                let conn = store::open_reader(&db)?;
                store::rebuild_host_records(&conn, &db)
            });
            let checked = self.end_checks(quiescent);
            let rebuilt = rebuilt.join().unwrap_or(Err(store::StoreError::ReaderPanicked { path }));
            checked?;
            self.check_replayed("at the end", rebuilt)
        })?;
        self.cp.check_committed()?;
        if !quiescent {
            return Err(Violation::new(
                "terminal",
                format!("the fleet did not settle by +{} s (events pending or a rollout live)", self.now_ms / 1000),
            ));
        }
        Ok(())
    }

    fn end_checks(&mut self, quiescent: bool) -> Result<(), Violation> {
        let Some(state) = self.cp.state() else { return Ok(()) };
        check_terminal(state, self.now_ms)?;
        check_agreement(state, &self.agents, self.checker.db_lost)?;
        check_closures(state, &self.agents, &self.machines)?;
        if quiescent {
            self.check_drift()?;
        }
        Ok(())
    }

    /// Rule 10 at quiescence, where agent and CP agree (checked just
    /// before): every host heartbeats once more through the real writer
    /// (what it runs, its queue's last seqs), and the CP's drift verdict
    /// (`hosts.drift`) must not be `drifting` for any of them.
    fn check_drift(&mut self) -> Result<(), Violation> {
        self.checker.n_checks += 1;
        let heartbeats: Vec<crate::sim::cp::Work> = self
            .agents
            .iter()
            .zip(&self.machines)
            .filter_map(|(agent, m)| {
                let proc = agent.proc.as_ref()?;
                let last_seq = proc.journal.lock().last_seqs().clone();
                Some(crate::sim::cp::Work::Heartbeat(Box::new(crate::wire::Heartbeat {
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
        self.cp.settle();
        let Some(reader) = self.cp.reader() else { return Ok(()) };
        let rows = crate::cp::store::drifting_host_rows(reader, &self.cp.db)
            .map_err(|e| Violation::new("drift", format!("cannot read the hosts' drift: {e}")))?;
        if let Some(crate::cp::store::HostRow { hostname: host, expected_closure: expected, .. }) = rows.first() {
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

/// `terminal`: no rollout is still active or converging (skipped hosts
/// are settled, the planner's rule).
fn check_terminal(state: &CpState, now_ms: u64) -> Result<(), Violation> {
    for (id, r) in &state.rollouts {
        if matches!(r.state, RolloutState::Active | RolloutState::Converging) {
            // Skipped hosts are settled (the planner's rule), not stuck.
            let stuck: Vec<String> = r
                .records
                .iter()
                .filter(|(h, x)| !(is_settled(x.state) || (x.state == HostState::Pending && r.skipped.contains(*h))))
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
                    now_ms / 1000,
                    stuck.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// `agreement`: agent and CP have the same state and last seq per
/// (host, rollout), and neither has a rollout the other lacks.
fn check_agreement(state: &CpState, agents: &[SimAgent], db_lost: bool) -> Result<(), Violation> {
    for agent in agents {
        let Some(rollouts) = agent.rollouts() else { continue };
        for (id, slot) in rollouts.iter() {
            if db_lost && !state.rollouts.contains_key(id) {
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
    Ok(())
}

/// `closure`: each host runs what the CP's newest record for it says.
fn check_closures(state: &CpState, agents: &[SimAgent], machines: &[Machine]) -> Result<(), Violation> {
    for (idx, agent) in agents.iter().enumerate() {
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
        let runs = &machines[idx].current;
        if let Some(says) = says {
            if &says != runs {
                return Err(Violation::new(
                    "closure",
                    format!("{} runs {runs}, but the CP says it runs {says} ({id} is {} on it)", agent.host, rec.state),
                ));
            }
        }
    }
    Ok(())
}
