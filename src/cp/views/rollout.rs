//! One rollout's view (`GET /v1/rollouts/{id}`, the web page's rollout
//! sections): its summary, waves and one page of hosts, each host with why
//! it is where it is.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{age_secs, head_of_row, quarantined, summary, RolloutSummary};
use crate::cp::planner::{self, PlanInput};
use crate::cp::store::{self, RolloutHead, StoreError};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{Failure, HostRecord, HostState, ProbeStatus};

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
    let summary = summary(conn, path, &head_of_row(&row))?;
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

/// A rollout's summary and waves without any host, for a rollout too large
/// to list inline: built from SQL, no manifest is parsed.
pub fn outline(conn: &Connection, path: &Path, head: &RolloutHead) -> Result<RolloutDetail, StoreError> {
    let waves = head
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| WaveView {
            index,
            name: wave.name.clone(),
            soak_secs: wave.soak_secs,
            max_in_flight: wave.max_in_flight,
            hosts: Vec::new(),
        })
        .collect();
    Ok(RolloutDetail {
        summary: summary(conn, path, head)?,
        max_failed_hosts: head.max_failed_hosts,
        on_health_failure: head.on_health_failure.clone(),
        waves,
        operator_actions: store::action_rows(conn, path, Some(&head.rollout_id))?,
        next_after: None,
    })
}
