//! Operator actions through the writer's real `Command::Operator` (what
//! `POST /v1/rollouts/{id}/resume|cancel` hands it): `cp resume` clears a
//! halt (the failures then are accepted and leave the budget), `cp cancel`
//! withdraws the standing dispatches and dispatches nothing more. Heavy
//! faults only, drawn per seed from a stream of their own
//! (`Faults::draw_operators`): no other choice of a seed moves.
//!
//! Checked around them: `halt` and `wave-order` as for every group (with
//! `accepted_failures` in the budget), and `cancelled` (a rollout the CP
//! cancelled stays cancelled and offers nothing, until a database loss
//! forgets the action).

use super::*;
use crate::cp::store::{ActionKind, OperatorRequest};

/// An operator action the sim schedules.
#[derive(Debug, Clone)]
pub(super) enum Action {
    Resume(RolloutId),
    /// One of the rollouts published by then (chosen when it runs),
    /// whichever state it is in.
    Cancel,
}

impl Sim {
    /// After a group: a rollout seen halted for the first time gets a
    /// `cp resume` 1–15 minutes later (once per rollout).
    pub(super) fn notice_halts(&mut self) {
        if !self.faults.operator_resume {
            return;
        }
        let Some(state) = self.cp.state() else { return };
        let halted: Vec<RolloutId> = state
            .rollouts
            .iter()
            .filter(|(id, r)| r.state == RolloutState::Halted && !self.halts_seen.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in halted {
            self.halts_seen.insert(id.clone());
            let delay = self.op_rng.range(60_000, 900_000);
            self.after(delay, Ev::Operator(Action::Resume(id)));
        }
    }

    /// Schedules the run's `cp cancel` (if drawn) in its first 15 minutes,
    /// while rollouts are still under way.
    pub(super) fn schedule_operators(&mut self) {
        if !self.faults.operator_cancel || self.plan.is_empty() {
            return;
        }
        let at = self.op_rng.range(60_000, 900_000);
        self.at(at, Ev::Operator(Action::Cancel));
    }

    /// Runs one action through the writer; a refusal (not halted, already
    /// finished, unknown after a database loss) is what the CLI would
    /// print, and nothing changes.
    pub(super) fn operator(&mut self, action: Action) -> Result<(), Violation> {
        if !self.cp.is_up() {
            self.after(30_000, Ev::Operator(action));
            return Ok(());
        }
        let kind = match &action {
            Action::Resume(id) => ActionKind::Resume(id.clone()),
            Action::Cancel => {
                if self.published.is_empty() {
                    self.after(60_000, Ev::Operator(action));
                    return Ok(());
                }
                let i = self.published[self.op_rng.below(self.published.len() as u64) as usize];
                let p = &self.plan[i];
                match RolloutId::parse(&format!("{}@{}", p.channel, p.git_ref)) {
                    Ok(id) => ActionKind::Cancel(id),
                    Err(_) => return Ok(()),
                }
            }
        };
        let name = kind.name();
        let id = match &kind {
            ActionKind::Resume(id) | ActionKind::Cancel(id) => id.clone(),
            ActionKind::Unquarantine { .. } => return Ok(()),
        };
        let request = OperatorRequest { kind, operator: "sim-operator".into(), reason: "simulated".into() };
        let answers = self.cp.run(vec![Work::Operator(request)]);
        self.stats.groups += 1;
        let outcome = match answers.into_iter().next() {
            Some(Answer::Action(Ok(_))) => {
                self.stats.operator_actions += 1;
                match name {
                    "cancel" => {
                        self.checker.cancelled.insert(id.clone());
                    }
                    _ => {
                        self.rollout_end.remove(&id);
                    }
                }
                "done".to_owned()
            }
            Some(Answer::Action(Err(refusal))) => format!("refused: {refusal}"),
            _ => {
                self.after(30_000, Ev::Operator(action));
                "unavailable; again in 30 s".to_owned()
            }
        };
        self.note(format!("operator: cp {name} {id}: {outcome}"));
        self.after_cp_group();
        self.check_cp()
    }
}

impl Sim {
    pub(super) fn envelope_of(&mut self, i: usize) -> Vec<u8> {
        if let Some(e) = self.envelopes.get(&i) {
            return e.clone();
        }
        let key = &self.keys[self.signing_key.min(self.keys.len() - 1)];
        let env = sign::sign_envelope(key, &self.plan[i].json);
        let bytes = serde_json::to_vec(&env).unwrap_or_default();
        self.envelopes.insert(i, bytes.clone());
        bytes
    }

    pub(super) fn publish(&mut self, i: usize) {
        if !self.cp.is_up() {
            self.after(30_000, Ev::Publish(i));
            return;
        }
        let envelope = self.envelope_of(i);
        let answers = self.cp.run(vec![Work::Publish(envelope)]);
        self.stats.publishes += 1;
        let ok = matches!(answers.first(), Some(Answer::Published(_)));
        let p = &self.plan[i];
        self.note(format!("operator publishes {}@{} ({})", p.channel, p.git_ref, if ok { "ok" } else { "failed" }));
        if ok {
            self.checker.published(self.now_ms);
            if !self.published.contains(&i) {
                self.published.push(i);
            }
            self.after_cp_group();
        } else {
            self.after(30_000, Ev::Publish(i));
        }
    }

    /// After a database loss the operator re-publishes what it published,
    /// in a random order, minutes apart (or, in the downgrade scenario,
    /// only the oldest manifest of the channel).
    pub(super) fn republish(&mut self) {
        let mut list = self.published.clone();
        self.published.clear();
        if self.cfg.scenario == Some(Scenario::Downgrade) {
            list.sort_unstable();
            // The newer manifests are never published again.
            self.abandoned.extend(list.drain(1..));
        }
        let mut at = self.now_ms;
        while !list.is_empty() {
            let k = self.rng.below(list.len() as u64) as usize;
            let i = list.remove(k);
            at += self.rng.range(1_000, 120_000);
            self.at(at, Ev::Publish(i));
        }
    }

    pub(super) fn rotate_keys(&mut self) {
        self.stats.key_rotations += 1;
        self.signing_key = 1;
        // Manifests not yet published are signed with the new key.
        let unpublished: Vec<usize> = (0..self.plan.len()).filter(|i| !self.published.contains(i)).collect();
        for i in unpublished {
            self.envelopes.remove(&i);
        }
        let new_key = vec![self.keys[1].public_key()];
        self.note("operator rotates the release key; agents restart trusting only the new key".into());
        for h in 0..self.agents.len() {
            self.agents[h].trust_keys = new_key.clone();
            let delay = self.rng.range(100, 30_000);
            self.at(self.now_ms + delay, Ev::AgentCrash { host: h, down_ms: 0 });
        }
    }
}

/// `cancelled`: every rollout the CP answered `cp cancel` for is still
/// Cancelled and offers no dispatch.
pub(super) fn check_cancelled(
    cancelled: &std::collections::BTreeSet<RolloutId>,
    state: &crate::cp::store::CpState,
) -> Result<(), Violation> {
    for id in cancelled {
        let Some(r) = state.rollouts.get(id) else { continue };
        if r.state != RolloutState::Cancelled {
            return Err(Violation::new(
                "cancelled",
                format!("{id} was cancelled by the operator but is now {}", r.state.as_str()),
            ));
        }
        if !r.dispatched.is_empty() {
            return Err(Violation::new(
                "cancelled",
                format!("{id} is cancelled but still offers {} dispatch(es)", r.dispatched.len()),
            ));
        }
    }
    Ok(())
}
