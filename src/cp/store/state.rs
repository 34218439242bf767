//! The writer's in-memory projection of the database: every rollout with
//! its records, standing dispatches and skips, the quarantine, and the
//! live index (which rollouts each host is live in).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::checkpoint::Checkpoints;
use super::heartbeat::Drift;
use crate::cp::planner::{HostClass, PlanIndex, RolloutState};
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
    /// The planner's index of `records`, `dispatched` and `skipped`
    /// (`planner::PlanIndex`), built at the first plan and kept up to date
    /// by the setters below: change those three maps only through them.
    pub index: Option<PlanIndex>,
    /// The hosts changed through the setters since the last
    /// [`LiveRollout::take_touched`], once someone asked for them: the
    /// simulator re-checks only those hosts of a 10,000-host rollout.
    /// `None` (the daemon): not kept.
    touched: Option<Vec<Hostname>>,
}

/// The source of [`CpState::quarantine_changed`] stamps.
static CHANGE_STAMPS: AtomicU64 = AtomicU64::new(1);

fn next_stamp() -> u64 {
    CHANGE_STAMPS.fetch_add(1, Relaxed)
}

impl LiveRollout {
    /// A rollout as published: every host Pending, nothing dispatched.
    pub fn published(manifest: Manifest, payload_sha256: String, state: RolloutState) -> LiveRollout {
        let records = pending_records(&manifest);
        LiveRollout {
            manifest,
            payload_sha256,
            state,
            current_wave: 0,
            halt_reason: None,
            records,
            dispatched: BTreeMap::new(),
            skipped: BTreeSet::new(),
            accepted_failures: 0,
            index: None,
            touched: None,
        }
    }

    fn class(&self, host: &Hostname) -> Option<HostClass> {
        self.records.get(host).map(|r| HostClass {
            state: r.state,
            dispatched: self.dispatched.contains_key(host),
            skipped: self.skipped.contains(host),
        })
    }

    fn reindex(&mut self, host: &Hostname, before: Option<HostClass>) {
        if let Some(touched) = self.touched.as_mut() {
            touched.push(host.clone());
        }
        let after = self.class(host);
        if let Some(index) = self.index.as_mut() {
            index.update(host, self.manifest.hosts.get(host), before, after);
        }
    }

    /// The hosts changed since the last call (repeats kept, in change
    /// order), and from now on keeps them; `None` when they were not kept
    /// until now (the first call for this rollout: the caller must look at
    /// every host).
    pub fn take_touched(&mut self) -> Option<Vec<Hostname>> {
        self.touched.replace(Vec::new())
    }

    /// The planner's index, built now if it was not.
    pub fn plan_index(&mut self) -> &PlanIndex {
        let LiveRollout { manifest, records, dispatched, skipped, index, .. } = self;
        index.get_or_insert_with(|| PlanIndex::build(manifest, records, &|h| dispatched.contains_key(h), skipped))
    }

    /// Replaces the record of its host.
    pub fn set_record(&mut self, record: HostRecord) {
        let host = record.hostname.clone();
        let before = self.class(&host);
        self.records.insert(host.clone(), record);
        self.reindex(&host, before);
    }

    pub fn insert_dispatch(&mut self, host: Hostname, dispatch: Dispatch) {
        let before = self.class(&host);
        self.dispatched.insert(host.clone(), dispatch);
        self.reindex(&host, before);
    }

    pub fn remove_dispatch(&mut self, host: &Hostname) -> Option<Dispatch> {
        let before = self.class(host);
        let removed = self.dispatched.remove(host);
        self.reindex(host, before);
        removed
    }

    /// Marks `host` skipped; false if it already was.
    pub fn insert_skip(&mut self, host: Hostname) -> bool {
        let before = self.class(&host);
        let new = self.skipped.insert(host.clone());
        self.reindex(&host, before);
        new
    }
}

/// Everything the writer needs in memory; a projection of the database.
#[derive(Debug, Default, Clone)]
pub struct CpState {
    pub rollouts: BTreeMap<RolloutId, LiveRollout>,
    pub quarantine: HashMap<String, HashSet<Closure>>,
    /// A stamp taken whenever `quarantine` changes (`quarantine_insert`,
    /// `quarantine_remove`, a load), unique in the process: equal stamps
    /// mean the same quarantine, so the simulator reads it only after a
    /// change.
    pub quarantine_changed: u64,
    /// Per host, the rollouts it is live in (`docs/protocol.md` §3 rule 8; at most one
    /// unless agents broke the rule): derived from the records, so the
    /// planner finds the held hosts without scanning every record.
    pub live: HashMap<Hostname, BTreeSet<RolloutId>>,
    /// The same index by rollout: the hosts live in each, so
    /// `busy_elsewhere` walks only the hosts live in the OTHER rollouts.
    pub live_in: BTreeMap<RolloutId, BTreeSet<Hostname>>,
    /// Per host, the drift verdict of its last heartbeat (`hosts.drift`),
    /// so a heartbeat learns whether the verdict changed without a read.
    pub drift: HashMap<Hostname, Drift>,
    /// The bound of the event log per (host, rollout) and the seq of each
    /// record checkpoint (`store::checkpoint`).
    pub checkpoints: Checkpoints,
}

impl CpState {
    /// Quarantines `closure` on `channel`; false if it already was.
    pub fn quarantine_insert(&mut self, channel: &str, closure: &Closure) -> bool {
        let set = self.quarantine.entry(channel.to_owned()).or_default();
        let new = set.insert(closure.clone());
        if new {
            self.quarantine_changed = next_stamp();
        }
        new
    }

    /// Takes `closure` off `channel`'s quarantine; false if it was not on it.
    pub fn quarantine_remove(&mut self, channel: &str, closure: &Closure) -> bool {
        let Some(set) = self.quarantine.get_mut(channel) else { return false };
        let removed = set.remove(closure);
        if set.is_empty() {
            self.quarantine.remove(channel);
        }
        if removed {
            self.quarantine_changed = next_stamp();
        }
        removed
    }

    /// The hosts of rollout `id` that are live in another rollout.
    /// Each is paired with the first (lowest id) such rollout.
    pub fn busy_elsewhere(&self, id: &RolloutId, manifest: &Manifest) -> BTreeMap<Hostname, RolloutId> {
        let mut busy = BTreeMap::new();
        // Rollouts in id order: the first one met for a host is its lowest.
        for (other, hosts) in self.live_in.iter().filter(|(other, _)| *other != id) {
            for host in hosts.iter().filter(|h| manifest.hosts.contains_key(*h)) {
                busy.entry(host.clone()).or_insert_with(|| other.clone());
            }
        }
        busy
    }

    pub(super) fn set_live(&mut self, host: &Hostname, id: &RolloutId, live: bool) {
        if live {
            self.live.entry(host.clone()).or_default().insert(id.clone());
            self.live_in.entry(id.clone()).or_default().insert(host.clone());
            return;
        }
        if let Some(ids) = self.live.get_mut(host) {
            ids.remove(id);
            if ids.is_empty() {
                self.live.remove(host);
            }
        }
        if let Some(hosts) = self.live_in.get_mut(id) {
            hosts.remove(host);
            if hosts.is_empty() {
                self.live_in.remove(id);
            }
        }
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
