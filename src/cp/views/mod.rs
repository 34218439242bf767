//! Read-only status views (`docs/protocol.md` §4), built from the database on a reader
//! connection so they never queue behind the writer. Shapes are serde
//! structs so `cp status --json` and the HTTP API print the same thing.
//! This file: the fleet summary (`/v1/status`, `/v1/rollouts`) and the
//! event log; [`rollout`]: one rollout's page of hosts; [`hosts`]: the
//! hosts view. No view reads every host: counts come from SQL, hosts by
//! the page.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::planner::RolloutState;
use super::store::{self, LivenessCounts, RolloutHead, RolloutRow, StoreError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::HostState;

mod hosts;
mod rollout;

pub use hosts::{host, hosts, HostRolloutRef, HostView, Liveness};
pub use rollout::{outline, rollout, HostInRollout, ProbeFailureView, RolloutDetail, SkippedView, WaveView};

/// A host silent for this many heartbeat intervals shows as unreachable.
pub const UNREACHABLE_AFTER_INTERVALS: u64 = 3;
/// Hosts per page of `GET /v1/rollouts/{id}` and `GET /v1/hosts` (also the
/// default): one page of 1,000 hosts is about 1 MB of JSON, so a view's
/// memory follows the page, not the fleet (a whole 100,000-host rollout
/// view used to cost about 250 MB per request).
pub const MAX_VIEW_PAGE_HOSTS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSummary {
    pub rollout_id: RolloutId,
    pub channel: String,
    pub state: RolloutState,
    pub current_wave: usize,
    pub n_waves: usize,
    pub n_hosts: usize,
    /// Host count per host state, e.g. {"Converged": 3, "Pending": 2}; a
    /// Pending host the CP skipped counts as "Skipped".
    pub hosts_by_state: BTreeMap<String, usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<RolloutId>,
    pub issued_at: String,
    pub published_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftView {
    pub hostname: Hostname,
    pub current_closure: String,
    pub expected_closure: String,
    pub expected_from: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeferredView {
    pub hostname: Hostname,
    pub rollout_id: RolloutId,
    pub deferred_at: String,
    pub deferred_for_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineView {
    pub channel: String,
    pub closure: String,
    pub rollout_id: String,
    pub hostname: String,
    pub quarantined_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub server_time: String,
    pub rollouts: Vec<RolloutSummary>,
    pub n_hosts: usize,
    pub n_unreachable: usize,
    pub quarantined: Vec<QuarantineView>,
    #[serde(default)]
    pub n_drifting: usize,
    /// Hosts whose last heartbeat showed another closure than their records.
    #[serde(default)]
    pub drifting: Vec<DriftView>,
    /// Hosts waiting for a reboot to finish an activation, oldest first.
    #[serde(default)]
    pub deferred: Vec<DeferredView>,
}

/// One logged event as the events view answers it: the store's row,
/// serialised as it is (one type, so the view cannot drift from the log).
pub use super::store::LoggedRow as LoggedEvent;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsView {
    pub rollout_id: RolloutId,
    pub events: Vec<LoggedEvent>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

/// A rollout's summary with its host counts computed in SQL (no record is
/// loaded, no manifest parsed): a Pending host the CP skipped counts as
/// "Skipped".
fn summary(conn: &Connection, path: &Path, head: &RolloutHead) -> Result<RolloutSummary, StoreError> {
    let id = &head.rollout_id;
    let mut hosts_by_state = store::state_counts(conn, path, id)?;
    let n_recorded: usize = hosts_by_state.values().sum();
    let pending = head.n_hosts.saturating_sub(n_recorded) + hosts_by_state.remove("Pending").unwrap_or(0);
    let skipped = store::n_skipped_pending(conn, path, id)?.min(pending);
    for (state, n) in [("Pending", pending - skipped), ("Skipped", skipped)] {
        if n > 0 {
            hosts_by_state.insert(state.to_owned(), n);
        }
    }
    Ok(RolloutSummary {
        rollout_id: id.clone(),
        channel: id.channel().to_owned(),
        state: head.state,
        current_wave: head.current_wave,
        n_waves: head.waves.len(),
        n_hosts: head.n_hosts,
        hosts_by_state,
        halt_reason: head.halt_reason.clone(),
        superseded_by: head.superseded_by.clone(),
        issued_at: head.issued_at.clone(),
        published_at: head.published_at.clone(),
        updated_at: head.updated_at.clone(),
    })
}

/// The head of a rollout whose manifest is parsed already.
fn head_of_row(row: &RolloutRow) -> RolloutHead {
    let manifest = &row.manifest;
    RolloutHead {
        rollout_id: manifest.rollout_id.clone(),
        state: row.state,
        current_wave: row.current_wave,
        halt_reason: row.halt_reason.clone(),
        superseded_by: row.superseded_by.clone(),
        issued_at: row.issued_at.clone(),
        published_at: row.published_at.clone(),
        updated_at: row.updated_at.clone(),
        n_hosts: manifest.hosts.len(),
        waves: manifest.waves.clone(),
        on_health_failure: manifest.policy.on_health_failure.as_str().to_owned(),
        max_failed_hosts: manifest.policy.max_failed_hosts,
    }
}

/// `GET /v1/rollouts`.
pub fn rollouts(conn: &Connection, path: &Path) -> Result<Vec<RolloutSummary>, StoreError> {
    summaries(conn, path, None)
}

/// Every rollout's summary; with `deferred`, also collects the Deferred
/// hosts and their age at `now`.
fn summaries(
    conn: &Connection,
    path: &Path,
    mut deferred: Option<(&mut Vec<DeferredView>, OffsetDateTime)>,
) -> Result<Vec<RolloutSummary>, StoreError> {
    let mut out = Vec::new();
    for head in store::rollout_heads(conn, path)? {
        if let Some((list, now)) = deferred.as_mut() {
            for r in store::records_in_state(conn, path, &head.rollout_id, HostState::Deferred)? {
                let Some(at) = r.deferred_at else { continue };
                list.push(DeferredView {
                    hostname: r.hostname.clone(),
                    rollout_id: r.rollout_id.clone(),
                    deferred_at: store::ts(at),
                    deferred_for_secs: age_secs(*now, at),
                });
            }
        }
        out.push(summary(conn, path, &head)?);
    }
    Ok(out)
}

/// Whole seconds from an agent's instant to the CP's now; 0 if the
/// agent's clock is ahead.
pub(super) fn age_secs(now: OffsetDateTime, since: OffsetDateTime) -> u64 {
    u64::try_from((now - since).whole_seconds()).unwrap_or(0)
}

pub(super) fn quarantined(conn: &Connection, path: &Path) -> Result<Vec<QuarantineView>, StoreError> {
    Ok(store::quarantine_rows(conn, path)?
        .into_iter()
        .map(|q| QuarantineView {
            channel: q.channel,
            closure: q.closure,
            rollout_id: q.rollout_id,
            hostname: q.hostname,
            quarantined_at: q.quarantined_at,
        })
        .collect())
}

/// `GET /v1/rollouts/{id}/events`, a page after log id `after`.
pub fn events(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    after: i64,
    limit: usize,
) -> Result<Option<EventsView>, StoreError> {
    if !store::rollout_exists(conn, path, id)? {
        return Ok(None);
    }
    let page = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
    let mut events: Vec<LoggedEvent> = store::event_rows(conn, path, id, after, page)?;
    let next_after = if events.len() > limit {
        events.truncate(limit);
        events.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Some(EventsView { rollout_id: id.clone(), events, next_after }))
}

/// `GET /v1/status`: the fleet at a glance. Host counts come from SQL;
/// only the drifting and Deferred hosts are read row by row.
pub fn status(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<StatusView, StoreError> {
    Ok(status_and_liveness(conn, path, now, stale_after_secs)?.0)
}

/// [`status`], and the host counts by liveness it was built from.
pub fn status_and_liveness(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<(StatusView, LivenessCounts), StoreError> {
    let live = store::liveness_counts(conn, path, now, stale_after_secs)?;
    let mut deferred = Vec::new();
    let rollouts = summaries(conn, path, Some((&mut deferred, now)))?;
    deferred.sort_by(|a, b| (&a.deferred_at, &a.hostname).cmp(&(&b.deferred_at, &b.hostname)));
    let drifting: Vec<DriftView> = store::drifting_host_rows(conn, path)?
        .into_iter()
        .filter_map(|h| {
            Some(DriftView {
                hostname: Hostname::parse(&h.hostname).ok()?,
                current_closure: h.current_closure,
                expected_closure: h.expected_closure.unwrap_or_default(),
                expected_from: h.expected_from.unwrap_or_default(),
            })
        })
        .collect();
    let view = StatusView {
        server_time: store::ts(now),
        rollouts,
        n_hosts: live.total(),
        n_unreachable: live.unreachable,
        quarantined: quarantined(conn, path)?,
        n_drifting: drifting.len(),
        drifting,
        deferred,
    };
    Ok((view, live))
}
