//! `POST /v1/plan` (`nixfleet cp plan SIGNED.json`): a dry run of a signed
//! manifest against the fleet as the CP knows it, on a reader connection,
//! changing nothing. Per wave it says which hosts would be dispatched,
//! which already run the target, which would be skipped (target
//! quarantined on the channel) or held (live in another rollout), and which
//! of them are unreachable or drifting. The rules are the planner's
//! (`docs/protocol.md` §3 rules 8 and 10; quarantine skips).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::planner::RolloutState;
use super::store::{self, parse_ts, Drift, StoreError};
use crate::ids::{Hostname, RolloutId};
use crate::wire::Manifest;

/// What would become of one host when its wave runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPlan {
    /// Offered a dispatch when its wave runs.
    Dispatch,
    /// Offered a dispatch, but its last heartbeat already names the
    /// target: the agent proves the switch and only soaks.
    AlreadyRunning,
    /// Skipped: the target is quarantined on the channel.
    Quarantined,
    /// Held: live in another rollout; offered once it ends there.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewHost {
    pub hostname: Hostname,
    pub plan: HostPlan,
    /// `Busy`: the rollout it is live in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_in: Option<RolloutId>,
    /// No heartbeat for 3 intervals, or never one.
    pub unreachable: bool,
    /// Its last heartbeat named another closure than its records.
    pub drifting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewWave {
    pub index: usize,
    pub name: String,
    pub max_in_flight: u32,
    pub hosts: Vec<PreviewHost>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPreview {
    pub rollout_id: RolloutId,
    /// `active`, or `superseded` when a newer manifest of the channel is
    /// already published (nothing of it would be dispatched).
    pub would_open: RolloutState,
    /// The newer rollout that would supersede this one at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<RolloutId>,
    /// Unfinished older rollouts of the channel this one would supersede.
    pub would_supersede: Vec<RolloutId>,
    /// The id is already published (with these or other bytes).
    pub already_published: bool,
    pub waves: Vec<PreviewWave>,
}

/// What the CP knows, as the dry run needs it.
#[derive(Debug)]
pub struct Fleet {
    pub rollouts: Vec<(RolloutId, RolloutState, (OffsetDateTime, String))>,
    pub quarantined: HashSet<String>,
    pub live: BTreeMap<Hostname, RolloutId>,
    /// Per host with a heartbeat: current closure, reachable, drifting.
    pub hosts: BTreeMap<Hostname, (String, bool, bool)>,
}

/// Reads the fleet (no SQL here: the store's typed rows) and plans.
pub fn preview(
    conn: &Connection,
    path: &Path,
    manifest: &Manifest,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<PlanPreview, StoreError> {
    let channel = manifest.rollout_id.channel();
    let rollouts = store::rollout_rows(conn, path)?
        .into_iter()
        .filter(|r| r.manifest.rollout_id.channel() == channel)
        .map(|r| {
            let newness = (r.manifest.issued_at, r.manifest.rollout_id.git_ref().to_owned());
            (r.manifest.rollout_id.clone(), r.state, newness)
        })
        .collect();
    let quarantined =
        store::quarantine_rows(conn, path)?.into_iter().filter(|q| q.channel == channel).map(|q| q.closure).collect();
    let live = store::live_rollouts(conn, path)?
        .into_iter()
        .filter_map(|(host, ids)| ids.into_iter().find(|id| *id != manifest.rollout_id).map(|id| (host, id)))
        .collect();
    let stale = i64::try_from(stale_after_secs).unwrap_or(i64::MAX);
    let mut hosts = BTreeMap::new();
    for row in store::host_rows(conn, path)? {
        let Ok(host) = Hostname::parse(&row.hostname) else { continue };
        let reachable = parse_ts(&row.last_heartbeat_at).is_some_and(|t| (now - t).whole_seconds() <= stale);
        hosts.insert(host, (row.current_closure, reachable, row.drift == Drift::Drifting));
    }
    Ok(plan_against(manifest, &Fleet { rollouts, quarantined, live, hosts }))
}

/// The pure part: the manifest against the fleet.
pub fn plan_against(manifest: &Manifest, fleet: &Fleet) -> PlanPreview {
    let id = &manifest.rollout_id;
    let newness = (manifest.issued_at, id.git_ref().to_owned());
    let superseded_by = fleet
        .rollouts
        .iter()
        .filter(|(other, _, n)| other != id && *n > newness)
        .max_by(|a, b| a.2.cmp(&b.2))
        .map(|(other, _, _)| other.clone());
    let would_supersede = match superseded_by {
        Some(_) => Vec::new(),
        None => fleet
            .rollouts
            .iter()
            .filter(|(other, state, _)| other != id && !state.is_terminal())
            .map(|(other, _, _)| other.clone())
            .collect(),
    };
    let waves = manifest
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| PreviewWave {
            index,
            name: wave.name.clone(),
            max_in_flight: wave.max_in_flight,
            hosts: manifest
                .hosts_in_wave(index)
                .map(|(host, entry)| {
                    let known = fleet.hosts.get(host);
                    let busy_in = fleet.live.get(host).cloned();
                    let plan = if fleet.quarantined.contains(entry.target_closure.as_str()) {
                        HostPlan::Quarantined
                    } else if busy_in.is_some() {
                        HostPlan::Busy
                    } else if known.is_some_and(|(current, _, _)| current == entry.target_closure.as_str()) {
                        HostPlan::AlreadyRunning
                    } else {
                        HostPlan::Dispatch
                    };
                    PreviewHost {
                        hostname: host.clone(),
                        plan,
                        busy_in: busy_in.filter(|_| plan == HostPlan::Busy),
                        unreachable: !known.is_some_and(|(_, reachable, _)| *reachable),
                        drifting: known.is_some_and(|(_, _, drifting)| *drifting),
                    }
                })
                .collect(),
        })
        .collect();
    let already_published: BTreeSet<&RolloutId> = fleet.rollouts.iter().map(|(r, _, _)| r).collect();
    PlanPreview {
        rollout_id: id.clone(),
        would_open: if superseded_by.is_some() { RolloutState::Superseded } else { RolloutState::Active },
        superseded_by,
        would_supersede,
        already_published: already_published.contains(id),
        waves,
    }
}
