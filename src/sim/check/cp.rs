//! The checks of what the CP answers and plans: per ingest answer
//! (`no-seq-gap`, `acked-not-lost`, `agreement`), per rollout after a
//! group (`halt`, `max-in-flight`, `wave-order`), and `refused-whole` for
//! the batches the body-limit proxy refuses.

use super::{waves, Violation};
use std::collections::BTreeSet;

use crate::cp::planner::RolloutState;
use crate::ids::RolloutId;
use crate::sim::Sim;
use crate::wire::{EventBatch, EventResult, ResultStatus};

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
        let mut touched = self.cp.take_touched();
        let Some(state) = self.cp.state() else { return Ok(()) };
        let now = crate::sim::world::at(self.now_ms);
        // Mirrors of rollouts the CP no longer has (a lost database).
        self.checker.mirrors.retain(|id, _| state.rollouts.contains_key(id));
        // Every mirror is brought up to date before any check may stop
        // this one: the hosts changed by this group are taken only once.
        let mut refreshed = Ok(());
        // Rollouts whose hosts changed since the last check, or that are
        // new to it (published, or reloaded by a CP restart).
        let mut changed = BTreeSet::new();
        for (id, r) in &state.rollouts {
            let touched = touched.remove(id).flatten();
            if touched.as_ref().is_none_or(|t| !t.is_empty()) {
                changed.insert(id);
            }
            if let Err(v) = self.checker.wave_summary(id, r, touched, now) {
                self.checker.mirrors.remove(id);
                refreshed = refreshed.and(Err(v));
            }
        }
        refreshed?;
        let mut races = Vec::new();
        for (id, r) in &state.rollouts {
            // The checks read the hosts, the state and the loss flag only:
            // unchanged since a clean check, the answer is the same.
            let clean_key = (r.state, self.checker.db_lost);
            if !changed.contains(id) && self.checker.cp_clean.get(id) == Some(&clean_key) {
                continue;
            }
            // Clean again only once every check below has passed.
            self.checker.cp_clean.remove(id);
            let Some(mirror) = self.checker.mirrors.get(id) else { continue };
            let n_failed = mirror.summary().n_failed;
            // Failures an operator accepted with `cp resume` leave the budget.
            let max_failed = r.manifest.policy.max_failed_hosts as usize + r.accepted_failures;
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
            if let Some(broken) = waves::judge(&r.manifest, mirror.summary(), self.checker.db_lost) {
                // Confirmed and worded by the full walk.
                let walk = waves::walk(r, now)?;
                if waves::judge(&r.manifest, &walk.summary, self.checker.db_lost) != Some(broken) {
                    return Err(Violation::new(
                        "checker",
                        format!("{id}: the kept summary breaks {broken:?}, the full walk does not"),
                    ));
                }
                return Err(waves::explain(id, r, &walk, broken, now));
            }
            races.extend(
                mirror
                    .late()
                    .filter(|h| !self.checker.raced.contains(&(id.clone(), (*h).clone())))
                    .map(|h| (id.clone(), h.clone())),
            );
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
