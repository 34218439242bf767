//! The hosts view (`GET /v1/hosts`, one page at a time) and one host's view
//! (the web page's host page).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::cp::store::{self, parse_ts, Drift, HostRow, StoreError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::HostState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRolloutRef {
    pub rollout_id: RolloutId,
    pub state: HostState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Reachable,
    /// Silent for more than 3 heartbeat intervals.
    Unreachable,
    /// In a manifest but never sent a heartbeat.
    NeverSeen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub hostname: Hostname,
    pub liveness: Liveness,
    pub last_heartbeat_at: Option<String>,
    pub current_closure: Option<String>,
    pub booted_closure: Option<String>,
    pub agent_version: Option<String>,
    pub uptime_secs: Option<u64>,
    pub rollouts: Vec<HostRolloutRef>,
    /// The last heartbeat's verdict (`docs/protocol.md` §3 rule 10).
    #[serde(default = "unknown_drift")]
    pub drift: Drift,
    /// The closure the records say the host runs, and the rollout saying it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_closure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_from: Option<String>,
}

fn unknown_drift() -> Drift {
    Drift::Unknown
}

/// A host's view from its `hosts` row (no rollouts yet).
fn host_view(row: HostRow, now: OffsetDateTime, stale_after_secs: u64) -> Option<HostView> {
    let HostRow {
        hostname: host,
        last_heartbeat_at: last,
        current_closure: current,
        booted_closure: booted,
        agent_version: version,
        uptime_secs: uptime,
        drift,
        expected_closure,
        expected_from,
    } = row;
    let hostname = Hostname::parse(&host).ok()?;
    let silent_secs = parse_ts(&last).map_or(i64::MAX, |t| (now - t).whole_seconds());
    let liveness = if silent_secs > i64::try_from(stale_after_secs).unwrap_or(i64::MAX) {
        Liveness::Unreachable
    } else {
        Liveness::Reachable
    };
    Some(HostView {
        hostname,
        liveness,
        last_heartbeat_at: Some(last),
        current_closure: Some(current),
        booted_closure: booted,
        agent_version: Some(version),
        uptime_secs: u64::try_from(uptime).ok(),
        rollouts: Vec::new(),
        drift,
        expected_closure,
        expected_from,
    })
}

fn never_seen(hostname: Hostname) -> HostView {
    HostView {
        hostname,
        liveness: Liveness::NeverSeen,
        last_heartbeat_at: None,
        current_closure: None,
        booted_closure: None,
        agent_version: None,
        uptime_secs: None,
        rollouts: Vec::new(),
        drift: Drift::Unknown,
        expected_closure: None,
        expected_from: None,
    }
}

/// `GET /v1/hosts`: one page (hostname order, after `after`, at most
/// `limit`) of the hosts seen in a heartbeat or named by a manifest, and
/// the `after` of the next page. Only the page's rows and records are read.
pub fn hosts(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
    after: Option<&Hostname>,
    limit: usize,
) -> Result<(Vec<HostView>, Option<Hostname>), StoreError> {
    let manifests = store::manifests(conn, path)?;
    // The page's names: the first limit+1 of every source after `after`.
    let mut names: BTreeSet<Hostname> = store::host_names_after(conn, path, after.map(Hostname::as_str), limit + 1)?
        .iter()
        .filter_map(|h| Hostname::parse(h).ok())
        .collect();
    let lower = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
    for manifest in &manifests {
        names.extend(
            manifest
                .hosts
                .range::<Hostname, _>((lower, std::ops::Bound::Unbounded))
                .take(limit + 1)
                .map(|(h, _)| h.clone()),
        );
    }
    let mut names: Vec<Hostname> = names.into_iter().take(limit + 1).collect();
    let next_after = if names.len() > limit {
        names.truncate(limit);
        names.last().cloned()
    } else {
        None
    };
    let (Some(first), Some(last)) = (names.first(), names.last()) else { return Ok((Vec::new(), None)) };
    let mut views: BTreeMap<Hostname, HostView> = store::host_rows_between(conn, path, first.as_str(), last.as_str())?
        .into_iter()
        .filter_map(|row| host_view(row, now, stale_after_secs))
        .map(|v| (v.hostname.clone(), v))
        .collect();
    for manifest in &manifests {
        for (hostname, record) in store::host_records_named(conn, path, manifest, &names)? {
            let view = views.entry(hostname.clone()).or_insert_with(|| never_seen(hostname));
            view.rollouts.push(HostRolloutRef { rollout_id: manifest.rollout_id.clone(), state: record.state });
        }
    }
    Ok((views.into_values().collect(), next_after))
}

/// One host's view: its `hosts` row and the rollouts naming it, with its
/// state in each; `None` if it sent no heartbeat and no manifest names it.
/// Reads one row per rollout naming the host, never a whole manifest.
pub fn host(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
    hostname: &Hostname,
) -> Result<Option<HostView>, StoreError> {
    let row = store::host_rows_between(conn, path, hostname.as_str(), hostname.as_str())?.into_iter().next();
    let mut view = row.and_then(|r| host_view(r, now, stale_after_secs));
    for (rollout_id, state) in store::host_rollout_states(conn, path, hostname)? {
        let v = view.get_or_insert_with(|| never_seen(hostname.clone()));
        v.rollouts.push(HostRolloutRef { rollout_id, state });
    }
    Ok(view)
}
