//! The writer's in-memory projection of the database: every rollout with
//! its records, standing dispatches and skips, the quarantine, and the
//! live index (which rollouts each host is live in).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::cp::planner::RolloutState;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::HostRecord;
use crate::wire::{Dispatch, Manifest};

/// One rollout as the writer holds it.
#[derive(Debug, Clone)]
pub struct LiveRollout {
    pub manifest: Manifest,
    pub payload_sha256: String,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub records: BTreeMap<Hostname, HostRecord>,
    /// Standing dispatches, until the host's DispatchAck/DispatchRejected.
    pub dispatched: BTreeMap<Hostname, Dispatch>,
    /// Hosts the planner skipped (`skipped_hosts`).
    pub skipped: BTreeSet<Hostname>,
    /// Failed/Reverted hosts the last `cp resume` accepted
    /// (`operator_actions`); the planner leaves them out of the budget.
    pub accepted_failures: usize,
}

/// Everything the writer needs in memory; a projection of the database.
#[derive(Debug, Default, Clone)]
pub struct CpState {
    pub rollouts: BTreeMap<RolloutId, LiveRollout>,
    pub quarantine: HashMap<String, HashSet<Closure>>,
    /// Per host, the rollouts it is live in (`docs/protocol.md` §3 rule 8; at most one
    /// unless agents broke the rule): derived from the records, so the
    /// planner finds the held hosts without scanning every record.
    pub live: HashMap<Hostname, BTreeSet<RolloutId>>,
}

impl CpState {
    /// The hosts of rollout `id` that are live in another rollout.
    pub fn busy_elsewhere(&self, id: &RolloutId, manifest: &Manifest) -> BTreeMap<Hostname, RolloutId> {
        self.live
            .iter()
            .filter(|(host, _)| manifest.hosts.contains_key(*host))
            .filter_map(|(host, ids)| ids.iter().find(|other| *other != id).map(|other| (host.clone(), other.clone())))
            .collect()
    }

    pub(super) fn set_live(&mut self, host: &Hostname, id: &RolloutId, live: bool) {
        if live {
            self.live.entry(host.clone()).or_default().insert(id.clone());
        } else if let Some(ids) = self.live.get_mut(host) {
            ids.remove(id);
            if ids.is_empty() {
                self.live.remove(host);
            }
        }
    }

    /// What the records say `host` runs (`docs/protocol.md` §3 rule 10): the record of
    /// the rollout the host accepted last (latest `dispatch_acked_at`, the
    /// agent's time; ties by rollout id), if that record knows its closure
    /// (`HostRecord::known_running_closure`). `None`: not known, not judged.
    pub fn expected_closure(&self, host: &Hostname) -> Option<(Closure, RolloutId)> {
        let (id, record) = self
            .rollouts
            .iter()
            .filter_map(|(id, r)| r.records.get(host).map(|record| (id, record)))
            .filter(|(_, record)| record.dispatch_acked_at.is_some())
            .max_by(|a, b| (a.1.dispatch_acked_at, a.0).cmp(&(b.1.dispatch_acked_at, b.0)))?;
        record.known_running_closure().map(|c| (c.clone(), id.clone()))
    }
}

/// The record of every manifest host before its first event: Pending with
/// the manifest's target. Stored rows override these.
pub fn pending_records(manifest: &Manifest) -> BTreeMap<Hostname, HostRecord> {
    let id = &manifest.rollout_id;
    manifest
        .hosts
        .iter()
        .map(|(h, e)| (h.clone(), HostRecord::pending(id.clone(), h.clone(), Some(e.target_closure.clone()))))
        .collect()
}
