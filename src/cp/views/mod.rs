//! Read-only status views (`docs/protocol.md` §4), built from the database on a reader
//! connection so they never queue behind the writer. Shapes are serde
//! structs so `cp status --json` and the HTTP API print the same thing.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::planner::{self, PlanInput, RolloutState};
use super::store::{self, parse_ts, Drift, HostRow, RolloutRow, StoreError};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{Failure, HostRecord, HostState, ProbeStatus};
use crate::wire::OutboundEvent;

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
pub struct HostInRollout {
    pub hostname: Hostname,
    pub wave: usize,
    pub state: HostState,
    pub target_closure: Option<Closure>,
    pub last_seq: u64,
    /// When the standing dispatch was issued (CP time), while it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_issued_at: Option<String>,
    /// Host timestamps, all from the agent's events.
    pub dispatch_acked_at: Option<String>,
    pub activation_completed_at: Option<String>,
    pub soak_due_at: Option<String>,
    pub converged_at: Option<String>,
    pub failed_at: Option<String>,
    pub reverted_at: Option<String>,
    pub failing_probes: Vec<String>,
    /// Every probe whose last result was a failure: its name, since when
    /// it fails (agent time) and the agent's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_failures: Vec<ProbeFailureView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Why the host is where it is, when that is not obvious (waiting for
    /// a reboot, blocked by quarantine, rollback failed …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Deferred: since when (agent time) and for how long (CP time) the
    /// host waits for its reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred_for_secs: Option<u64>,
    /// Pending and held: the other rollout the host is live in (`docs/protocol.md` §3 rule 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<RolloutId>,
    /// The CP skipped the host: its target was quarantined before it acked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<SkippedView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeFailureView {
    pub probe_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedView {
    pub reason: String,
    /// CP time: the skip is the CP's decision, not a host fact.
    pub skipped_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveView {
    pub index: usize,
    pub name: String,
    pub soak_secs: u64,
    pub max_in_flight: u32,
    pub hosts: Vec<HostInRollout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutDetail {
    #[serde(flatten)]
    pub summary: RolloutSummary,
    pub max_failed_hosts: u32,
    pub on_health_failure: String,
    /// The page's hosts by wave (hostname order across the rollout).
    pub waves: Vec<WaveView>,
    /// `cp resume` / `cp cancel` on this rollout, oldest first.
    #[serde(default)]
    pub operator_actions: Vec<store::ActionRecord>,
    /// Pass as `after` to get the next page of hosts; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<Hostname>,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub id: i64,
    pub hostname: String,
    pub seq: u64,
    pub kind: String,
    pub agent_at: String,
    pub received_at: String,
    pub event: OutboundEvent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsView {
    pub rollout_id: RolloutId,
    pub events: Vec<LoggedEvent>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<i64>,
}

/// A rollout's summary with its host counts computed in SQL (no record is
/// loaded): a Pending host the CP skipped counts as "Skipped".
fn summary(conn: &Connection, path: &Path, row: &RolloutRow) -> Result<RolloutSummary, StoreError> {
    let manifest = &row.manifest;
    let id = &manifest.rollout_id;
    let mut hosts_by_state = store::state_counts(conn, path, id)?;
    let n_recorded: usize = hosts_by_state.values().sum();
    let pending = manifest.hosts.len().saturating_sub(n_recorded) + hosts_by_state.remove("Pending").unwrap_or(0);
    let skipped = store::n_skipped_pending(conn, path, id)?.min(pending);
    for (state, n) in [("Pending", pending - skipped), ("Skipped", skipped)] {
        if n > 0 {
            hosts_by_state.insert(state.to_owned(), n);
        }
    }
    Ok(RolloutSummary {
        rollout_id: id.clone(),
        channel: id.channel().to_owned(),
        state: row.state,
        current_wave: row.current_wave,
        n_waves: manifest.waves.len(),
        n_hosts: manifest.hosts.len(),
        hosts_by_state,
        halt_reason: row.halt_reason.clone(),
        superseded_by: row.superseded_by.clone(),
        issued_at: row.issued_at.clone(),
        published_at: row.published_at.clone(),
        updated_at: row.updated_at.clone(),
    })
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
    for row in store::rollout_rows(conn, path)? {
        if let Some((list, now)) = deferred.as_mut() {
            for r in store::records_in_state(conn, path, &row.manifest.rollout_id, HostState::Deferred)? {
                let Some(at) = r.deferred_at else { continue };
                list.push(DeferredView {
                    hostname: r.hostname.clone(),
                    rollout_id: r.rollout_id.clone(),
                    deferred_at: store::ts(at),
                    deferred_for_secs: age_secs(*now, at),
                });
            }
        }
        out.push(summary(conn, path, &row)?);
    }
    Ok(out)
}

/// Whole seconds from an agent's instant to the CP's now; 0 if the
/// agent's clock is ahead.
fn age_secs(now: OffsetDateTime, since: OffsetDateTime) -> u64 {
    u64::try_from((now - since).whole_seconds()).unwrap_or(0)
}

fn quarantined(conn: &Connection, path: &Path) -> Result<Vec<QuarantineView>, StoreError> {
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

/// `GET /v1/rollouts/{id}`, one page of hosts (hostname order, after
/// `after`, at most `limit`); `None` if unknown. `now` (CP time) gives the
/// age of Deferred hosts. Only the page's records are loaded: the view of a
/// 100,000-host rollout costs the parsed manifest and one page.
pub fn rollout(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    now: OffsetDateTime,
    after: Option<&Hostname>,
    limit: usize,
) -> Result<Option<RolloutDetail>, StoreError> {
    let Some(row) = store::rollout_row(conn, path, id)? else { return Ok(None) };
    let manifest = &row.manifest;
    let (records, next_after) = store::host_records_page(conn, path, manifest, after, limit)?;
    let skipped_rows = store::skipped_of(conn, path, id)?;
    let summary = summary(conn, path, &row)?;
    let busy: BTreeMap<Hostname, RolloutId> = store::live_rollouts(conn, path)?
        .into_iter()
        .filter(|(host, _)| records.contains_key(host))
        .filter_map(|(host, ids)| ids.into_iter().find(|other| other != id).map(|other| (host, other)))
        .collect();
    let skipped: BTreeSet<Hostname> = skipped_rows.keys().cloned().collect();
    let dispatched_at = store::dispatch_times(conn, path, id)?;
    let quarantine: HashSet<Closure> = quarantined(conn, path)?
        .into_iter()
        .filter(|q| q.channel == id.channel())
        .filter_map(|q| Closure::parse(&q.closure).ok())
        .collect();
    let dispatched: BTreeSet<Hostname> = dispatched_at.keys().cloned().collect();
    let operator_actions = store::action_rows(conn, path, Some(id))?;
    let accepted_failures = operator_actions
        .iter()
        .rev()
        .find(|a| a.action == "resume")
        .and_then(|a| a.detail.get("accepted_failures").and_then(|v| v.as_array()).map(Vec::len))
        .unwrap_or(0);
    let input = PlanInput {
        manifest,
        state: summary.state,
        current_wave: summary.current_wave,
        halt_reason: summary.halt_reason.as_deref(),
        records: &records,
        dispatched: &dispatched,
        quarantined: &quarantine,
        busy_elsewhere: &busy,
        skipped: &skipped,
        accepted_failures,
    };
    let skipped = |host: &Hostname| skipped_rows.get(host);
    let waves = manifest
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| WaveView {
            index,
            name: wave.name.clone(),
            soak_secs: wave.soak_secs,
            max_in_flight: wave.max_in_flight,
            hosts: records
                .values()
                .filter(|r| manifest.hosts.get(&r.hostname).is_some_and(|e| e.wave == index))
                .map(|r| host_in_rollout(&input, r, index, dispatched_at.get(&r.hostname), &skipped, now))
                .collect(),
        })
        .collect();
    Ok(Some(RolloutDetail {
        summary,
        max_failed_hosts: manifest.policy.max_failed_hosts,
        on_health_failure: manifest.policy.on_health_failure.as_str().to_owned(),
        waves,
        operator_actions,
        next_after,
    }))
}

/// One host's line of the rollout view; `now` (CP time) gives a Deferred
/// host's age.
fn host_in_rollout<'a>(
    input: &PlanInput<'_>,
    r: &HostRecord,
    wave: usize,
    dispatch_issued_at: Option<&String>,
    skipped: &dyn Fn(&Hostname) -> Option<&'a store::SkippedHost>,
    now: OffsetDateTime,
) -> HostInRollout {
    let fmt = |t: Option<OffsetDateTime>| t.map(store::ts);
    let pending = r.state == HostState::Pending;
    let deferred_at = r.deferred_at.filter(|_| r.state == HostState::Deferred);
    HostInRollout {
        hostname: r.hostname.clone(),
        wave,
        state: r.state,
        target_closure: r.target_closure.clone(),
        last_seq: r.last_seq,
        dispatch_issued_at: dispatch_issued_at.cloned(),
        dispatch_acked_at: fmt(r.dispatch_acked_at),
        activation_completed_at: fmt(r.activation_completed_at),
        soak_due_at: fmt(r.soak_due_at),
        converged_at: fmt(r.converged_at),
        failed_at: fmt(r.failed_at),
        reverted_at: fmt(r.reverted_at),
        failing_probes: r.failing_enforce_probes(),
        probe_failures: r
            .probes
            .iter()
            .filter(|(_, p)| p.last_status == Some(ProbeStatus::Fail))
            .map(|(name, p)| ProbeFailureView {
                probe_name: name.clone(),
                failing_since: fmt(p.failing_since),
                reason: p.failure_reason.clone(),
            })
            .collect(),
        failure: r.failure.clone(),
        note: host_note(input, r),
        deferred_at: fmt(deferred_at),
        deferred_for_secs: deferred_at.map(|at| age_secs(now, at)),
        held_by: input.busy_elsewhere.get(&r.hostname).filter(|_| pending).cloned(),
        skipped: skipped(&r.hostname)
            .filter(|_| pending)
            .map(|s| SkippedView { reason: s.reason.clone(), skipped_at: s.skipped_at.clone() }),
    }
}

fn host_note(input: &PlanInput<'_>, r: &HostRecord) -> Option<String> {
    match r.state {
        HostState::Pending => planner::blocked_reason(input, &r.hostname).or_else(|| {
            input.dispatched.contains(&r.hostname).then(|| "dispatched, waiting for the agent to accept".to_owned())
        }),
        HostState::Deferred => Some(format!(
            "waiting for a reboot to finish the activation ({})",
            r.deferred_component.as_deref().unwrap_or("unknown component")
        )),
        HostState::Failed if r.rollback_failure.is_some() => Some("rollback failed: the operator must act".to_owned()),
        HostState::Failed if r.rollback_fired => Some("rolling back".to_owned()),
        _ => None,
    }
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
    let mut events: Vec<LoggedEvent> = store::event_rows(conn, path, id, after, page)?
        .into_iter()
        .map(|r| LoggedEvent {
            id: r.id,
            hostname: r.hostname,
            seq: r.seq,
            kind: r.kind,
            agent_at: r.agent_at,
            received_at: r.received_at,
            event: r.event,
        })
        .collect();
    let next_after = if events.len() > limit {
        events.truncate(limit);
        events.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Some(EventsView { rollout_id: id.clone(), events, next_after }))
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

/// A page size that takes every host, for the callers that summarise the
/// whole fleet (`/metrics`, the web page's overview) rather than page it.
pub const ALL_HOSTS: usize = 1 << 40;

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

/// `GET /v1/status`: the fleet at a glance. Reads the `hosts` rows and the
/// manifests' host names, never every record.
pub fn status(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<StatusView, StoreError> {
    let seen: Vec<HostView> =
        store::host_rows(conn, path)?.into_iter().filter_map(|row| host_view(row, now, stale_after_secs)).collect();
    let mut all: HashSet<Hostname> = seen.iter().map(|h| h.hostname.clone()).collect();
    for manifest in store::manifests(conn, path)? {
        all.extend(manifest.hosts.into_keys());
    }
    let mut deferred = Vec::new();
    let rollouts = summaries(conn, path, Some((&mut deferred, now)))?;
    deferred.sort_by(|a, b| (&a.deferred_at, &a.hostname).cmp(&(&b.deferred_at, &b.hostname)));
    let drifting: Vec<DriftView> = seen
        .iter()
        .filter(|h| h.drift == Drift::Drifting)
        .map(|h| DriftView {
            hostname: h.hostname.clone(),
            current_closure: h.current_closure.clone().unwrap_or_default(),
            expected_closure: h.expected_closure.clone().unwrap_or_default(),
            expected_from: h.expected_from.clone().unwrap_or_default(),
        })
        .collect();
    Ok(StatusView {
        server_time: store::ts(now),
        rollouts,
        n_hosts: all.len(),
        n_unreachable: seen.iter().filter(|h| h.liveness == Liveness::Unreachable).count(),
        quarantined: quarantined(conn, path)?,
        n_drifting: drifting.len(),
        drifting,
        deferred,
    })
}
