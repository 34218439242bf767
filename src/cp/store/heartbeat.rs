//! `POST /v1/agent/heartbeat` inside the writer's transaction: compare the
//! agent's last seqs with the records (Replay-From where the CP is behind)
//! and judge drift (`docs/protocol.md` §3 rule 10). A heartbeat never
//! changes host state: the agent owns every transition (§1), so the CP
//! neither synthesises transitions nor overwrites an agent's record.

use std::collections::BTreeMap;

use rusqlite::params;
use time::OffsetDateTime;

use super::state::CpState;
use super::{ts, Db, StoreError};
use crate::ids::{Closure, RolloutId};
use crate::machine::HostRecord;
use crate::wire::Heartbeat;

/// The verdict of the last heartbeat on what a host runs (`docs/protocol.md` §3 rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Drift {
    /// The heartbeat's current closure is the one the records say it runs.
    InSync,
    /// It is another closure: someone or something changed the host.
    Drifting,
    /// Not judged: the records do not know what the host runs (never
    /// accepted a rollout here, switching, rebooting, rolling back), or the
    /// CP has not yet received every event the agent has emitted.
    Unknown,
}

impl Drift {
    pub fn as_str(self) -> &'static str {
        match self {
            Drift::InSync => "in_sync",
            Drift::Drifting => "drifting",
            Drift::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Drift> {
        [Drift::InSync, Drift::Drifting, Drift::Unknown].into_iter().find(|d| d.as_str() == text)
    }
}

/// Records a heartbeat; `None` (and nothing written) when no published
/// manifest names the host: only hosts of a rollout get a `hosts` row, so
/// heartbeats for invented hostnames cannot fill the table.
pub(super) fn heartbeat(
    db: Db<'_>,
    state: &mut CpState,
    hb: &Heartbeat,
    now: OffsetDateTime,
) -> Result<Option<BTreeMap<RolloutId, u64>>, StoreError> {
    let Some(Compared { replay_from, expected }) = compare(state, hb) else { return Ok(None) };
    // Drift is judged only on complete knowledge: when the CP is behind the
    // agent, its records describe the past and would cry wolf.
    let expected = if replay_from.is_empty() { expected } else { None };
    let drift = match expected {
        None => Drift::Unknown,
        Some((closure, _)) if *closure == hb.current_closure => Drift::InSync,
        Some(_) => Drift::Drifting,
    };
    log_drift_change(hb, drift, state.drift.get(&hb.hostname).copied(), expected);
    write_host_row(db, hb, now, expected, drift)?;
    // Keyed by an owned hostname only the first time.
    match state.drift.get_mut(&hb.hostname) {
        Some(d) => *d = drift,
        None => drop(state.drift.insert(hb.hostname.clone(), drift)),
    }
    Ok(Some(replay_from))
}

/// The host's `hosts` row as the heartbeat leaves it. The common case, a
/// row already holding this verdict, is one UPDATE that leaves `drift`
/// out: SQLite evaluates the column's CHECK (`drift IN (...)`, which it
/// codes as a fresh ephemeral table per evaluation, twice per upsert) only
/// when a statement sets the column, and that was most of a heartbeat's
/// cost. Otherwise (no row yet, or the verdict changed) the upsert. Both
/// leave the same row.
fn write_host_row(
    db: Db<'_>,
    hb: &Heartbeat,
    now: OffsetDateTime,
    expected: Option<(&Closure, &RolloutId)>,
    drift: Drift,
) -> Result<(), StoreError> {
    let params = params![
        hb.hostname.as_str(),
        ts(now),
        hb.current_closure.as_str(),
        hb.booted_closure.as_ref().map(Closure::as_str),
        hb.agent_version,
        // Clamped, not wrapped: shown only, and 2^63 s is not an uptime.
        i64::try_from(hb.uptime_secs).unwrap_or(i64::MAX),
        expected.map(|(c, _)| c.as_str()),
        expected.map(|(_, id)| id.as_str()),
        drift.as_str()
    ];
    let updated = db
        .conn()
        .prepare_cached(
            "UPDATE hosts SET last_heartbeat_at = ?2, current_closure = ?3, booted_closure = ?4, agent_version = ?5,
                 uptime_secs = ?6, expected_closure = ?7, expected_from = ?8
             WHERE hostname = ?1 AND drift = ?9",
        )
        .and_then(|mut s| s.execute(params))
        .map_err(db.sql("record heartbeat"))?;
    if updated == 0 {
        db.conn()
            .prepare_cached(
                "INSERT INTO hosts (hostname, last_heartbeat_at, current_closure, booted_closure, agent_version,
                                uptime_secs, expected_closure, expected_from, drift)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (hostname) DO UPDATE SET last_heartbeat_at = ?2, current_closure = ?3,
                     booted_closure = ?4, agent_version = ?5, uptime_secs = ?6, expected_closure = ?7,
                     expected_from = ?8, drift = ?9",
            )
            .and_then(|mut s| s.execute(params))
            .map_err(db.sql("record heartbeat"))?;
    }
    Ok(())
}

/// What a heartbeat is compared with.
struct Compared<'a> {
    /// Per rollout, the CP's last seq where the agent has emitted more:
    /// the agent re-sends from there.
    replay_from: BTreeMap<RolloutId, u64>,
    /// What the records say the host runs (`docs/protocol.md` §3 rule 10):
    /// the record of the rollout the host accepted last (latest
    /// `dispatch_acked_at`, the agent's time; ties by rollout id), if that
    /// record knows its closure (`HostRecord::known_running_closure`).
    /// `None`: not known, not judged.
    expected: Option<(&'a Closure, &'a RolloutId)>,
}

/// The heartbeat against the records, one record lookup per rollout (a
/// heartbeat is the CP's most frequent request); `None` when no published
/// manifest names the host. Compares only.
fn compare<'a>(state: &'a CpState, hb: &Heartbeat) -> Option<Compared<'a>> {
    let host = &hb.hostname;
    let mut named = false;
    let mut replay_from = BTreeMap::new();
    let mut accepted_last: Option<(&RolloutId, &HostRecord)> = None;
    for (id, r) in &state.rollouts {
        named = named || r.manifest.hosts.contains_key(host);
        let Some(record) = r.records.get(host) else { continue };
        if let Some(agent_last) = hb.last_seq.get(id) {
            if *agent_last > record.last_seq {
                replay_from.insert(id.clone(), record.last_seq);
            }
        }
        if record.dispatch_acked_at.is_some()
            && accepted_last.is_none_or(|(l_id, l)| (record.dispatch_acked_at, id) > (l.dispatch_acked_at, l_id))
        {
            accepted_last = Some((id, record));
        }
    }
    if !named {
        return None;
    }
    let expected = accepted_last.and_then(|(id, record)| record.known_running_closure().map(|c| (c, id)));
    Some(Compared { replay_from, expected })
}

/// Logs a host turning drifting, or back in sync, once per change
/// (`previous`: the verdict of the host's last heartbeat, if any).
fn log_drift_change(hb: &Heartbeat, drift: Drift, previous: Option<Drift>, expected: Option<(&Closure, &RolloutId)>) {
    if drift == Drift::Drifting && previous != Some(Drift::Drifting) {
        if let Some((closure, from)) = expected {
            tracing::warn!(host = %hb.hostname, current = %hb.current_closure, expected = %closure, rollout = %from, "drift: the host runs another closure than its records say");
        }
    } else if drift == Drift::InSync && previous == Some(Drift::Drifting) {
        tracing::info!(host = %hb.hostname, current = %hb.current_closure, "drift resolved");
    }
}
