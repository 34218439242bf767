//! Fleet-wide figures counted in SQL, for `/metrics`, the status summary
//! and the web page: what Rust reads here grows with the number of rollouts
//! and host states, never with the number of hosts. A manifest's hosts are
//! counted by SQLite's JSON functions over the stored payload, so no
//! manifest is parsed into memory (a 100,000-host one is ≈ 30 MB parsed).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection};
use time::OffsetDateTime;

use super::db::two_texts;
use super::status::{host_rows_where, HostRow};
use super::{Db, StoreError};
use crate::cp::planner::RolloutState;
use crate::ids::{Hostname, RolloutId};
use crate::machine::HostState;
use crate::wire::Wave;

/// The payload as JSON text (the column is a BLOB, which SQLite's JSON
/// functions would read as its binary JSONB form).
const PAYLOAD: &str = "CAST(payload AS TEXT)";

/// Hosts seen in a heartbeat or named by any manifest, by liveness (the
/// same rule as `views::Liveness`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LivenessCounts {
    pub reachable: usize,
    pub unreachable: usize,
    /// Named by a manifest, never sent a heartbeat.
    pub never_seen: usize,
}

impl LivenessCounts {
    pub fn total(&self) -> usize {
        self.reachable + self.unreachable + self.never_seen
    }
}

/// Unix time (seconds, with fractions) at or before which a heartbeat is
/// stale: a host is unreachable when the whole seconds since its last
/// heartbeat exceed `stale_after_secs`.
fn stale_cutoff(now: OffsetDateTime, stale_after_secs: u64) -> f64 {
    let now = now.unix_timestamp() as f64 + f64::from(now.nanosecond()) / 1e9;
    now - (stale_after_secs as f64 + 1.0)
}

fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Counts hosts by liveness at `now` in three aggregate queries.
pub fn liveness_counts(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
) -> Result<LivenessCounts, StoreError> {
    let db = Db::new(conn, path);
    // A heartbeat time SQLite cannot read counts as stale, as in the views.
    let (seen, reachable): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(unixepoch(last_heartbeat_at, 'subsec') > ?1), 0) FROM hosts",
            params![stale_cutoff(now, stale_after_secs)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db.sql("count hosts by liveness"))?;
    let never_seen: i64 = conn
        .query_row(
            &format!(
                "SELECT COUNT(*) FROM (SELECT DISTINCT j.key AS hostname FROM rollouts, json_each({PAYLOAD}, '$.hosts') j)
                 WHERE hostname NOT IN (SELECT hostname FROM hosts)"
            ),
            [],
            |r| r.get(0),
        )
        .map_err(db.sql("count hosts never seen"))?;
    Ok(LivenessCounts {
        reachable: count(reachable),
        unreachable: count(seen - reachable),
        never_seen: count(never_seen),
    })
}

/// Up to `limit` unreachable hosts at `now`, longest silent first.
pub fn unreachable_host_rows(
    conn: &Connection,
    path: &Path,
    now: OffsetDateTime,
    stale_after_secs: u64,
    limit: usize,
) -> Result<Vec<HostRow>, StoreError> {
    let filter = "WHERE COALESCE(unixepoch(last_heartbeat_at, 'subsec') > ?1, 0) = 0
                  ORDER BY unixepoch(last_heartbeat_at, 'subsec'), hostname LIMIT ?2";
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    host_rows_where(conn, path, filter, params![stale_cutoff(now, stale_after_secs), limit])
}

/// A rollout as the summaries show it, without its hosts: the manifest's
/// waves and policy and its host count come from SQL.
#[derive(Debug, Clone)]
pub struct RolloutHead {
    pub rollout_id: RolloutId,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub superseded_by: Option<RolloutId>,
    pub issued_at: String,
    pub published_at: String,
    pub updated_at: String,
    pub n_hosts: usize,
    pub waves: Vec<Wave>,
    pub on_health_failure: String,
    pub max_failed_hosts: u32,
}

/// The columns as read, before any check.
type RawHead = (String, String, i64, Option<String>, Option<String>, String, String, String, String, String, i64, i64);

fn raw_head(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawHead> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

fn check_head(db: Db<'_>, raw: RawHead) -> Result<RolloutHead, StoreError> {
    let (id, state, wave, halt_reason, superseded_by, issued_at, published_at, updated_at, waves, on_fail, max, n) =
        raw;
    let corrupt = |what: String| db.corrupt(format!("rollout {id}: {what}"));
    Ok(RolloutHead {
        rollout_id: RolloutId::parse(&id).map_err(|e| corrupt(e.to_string()))?,
        state: RolloutState::parse(&state).ok_or_else(|| corrupt(format!("state {state}")))?,
        current_wave: usize::try_from(wave).map_err(|_| corrupt(format!("current_wave {wave}")))?,
        halt_reason,
        superseded_by: superseded_by.as_deref().and_then(|s| RolloutId::parse(s).ok()),
        issued_at,
        published_at,
        updated_at,
        n_hosts: count(n),
        waves: serde_json::from_str(&waves).map_err(|e| corrupt(format!("waves: {e}")))?,
        on_health_failure: on_fail,
        max_failed_hosts: u32::try_from(max).map_err(|_| corrupt(format!("max_failed_hosts {max}")))?,
    })
}

/// The heads of every rollout (or of one), in publish order.
fn heads(conn: &Connection, path: &Path, one: Option<&RolloutId>) -> Result<Vec<RolloutHead>, StoreError> {
    let db = Db::new(conn, path);
    let sql = format!(
        "SELECT rollout_id, state, current_wave, halt_reason, superseded_by, issued_at, published_at, updated_at,
                json_extract({PAYLOAD}, '$.waves'), json_extract({PAYLOAD}, '$.policy.on_health_failure'),
                COALESCE(json_extract({PAYLOAD}, '$.policy.max_failed_hosts'), 0),
                (SELECT COUNT(DISTINCT key) FROM json_each({PAYLOAD}, '$.hosts'))
         FROM rollouts WHERE ?1 IS NULL OR rollout_id = ?1 ORDER BY published_at, rollout_id"
    );
    let raw = db.rows("read rollout heads", &sql, params![one.map(RolloutId::as_str)], raw_head)?;
    raw.into_iter().map(|r| check_head(db, r)).collect()
}

/// Every rollout's head, in publish order.
pub fn rollout_heads(conn: &Connection, path: &Path) -> Result<Vec<RolloutHead>, StoreError> {
    heads(conn, path, None)
}

/// One rollout's head; `None` if unknown.
pub fn rollout_head(conn: &Connection, path: &Path, id: &RolloutId) -> Result<Option<RolloutHead>, StoreError> {
    Ok(heads(conn, path, Some(id))?.pop())
}

/// Host count per state of every rollout's stored records:
/// `rollout_id → state → n` (hosts without a record are Pending and not
/// counted here).
pub fn record_counts(conn: &Connection, path: &Path) -> Result<BTreeMap<String, BTreeMap<String, usize>>, StoreError> {
    let rows = Db::new(conn, path).rows(
        "count host states",
        "SELECT rollout_id, state, COUNT(*) FROM host_records GROUP BY rollout_id, state",
        [],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)),
    )?;
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (id, state, n) in rows {
        out.entry(id).or_default().insert(state, count(n));
    }
    Ok(out)
}

/// Host count per record state of each wave of one rollout, Pending
/// included (hosts without a record): index = wave.
pub fn wave_counts(conn: &Connection, path: &Path, id: &RolloutId) -> Result<Vec<BTreeMap<String, usize>>, StoreError> {
    let db = Db::new(conn, path);
    let sizes = db.rows(
        "count wave hosts",
        &format!(
            "SELECT json_extract(j.value, '$.wave'), COUNT(DISTINCT j.key)
             FROM rollouts, json_each({PAYLOAD}, '$.hosts') j WHERE rollout_id = ?1 GROUP BY 1"
        ),
        params![id.as_str()],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )?;
    let recorded = db.rows(
        "count wave states",
        "SELECT wave, state, COUNT(*) FROM host_records WHERE rollout_id = ?1 GROUP BY wave, state",
        params![id.as_str()],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)),
    )?;
    let slot = |wave: i64| usize::try_from(wave).map_err(|_| db.corrupt(format!("rollout {id}: wave {wave}")));
    let mut out: Vec<BTreeMap<String, usize>> = Vec::new();
    for (wave, n) in sizes {
        *wave_slot(&mut out, slot(wave)?).entry("Pending".to_owned()).or_insert(0) += count(n);
    }
    for (wave, state, n) in recorded {
        let counts = wave_slot(&mut out, slot(wave)?);
        let pending = counts.entry("Pending".to_owned()).or_insert(0);
        *pending = pending.saturating_sub(count(n));
        *counts.entry(state).or_insert(0) += count(n);
    }
    for counts in &mut out {
        counts.retain(|_, n| *n > 0);
    }
    Ok(out)
}

fn wave_slot(out: &mut Vec<BTreeMap<String, usize>>, wave: usize) -> &mut BTreeMap<String, usize> {
    if out.len() <= wave {
        out.resize_with(wave + 1, BTreeMap::new);
    }
    &mut out[wave]
}

/// The rollouts whose manifest names `host`, in publish order, with the
/// host's state in each (Pending where no record is stored).
pub fn host_rollout_states(
    conn: &Connection,
    path: &Path,
    host: &Hostname,
) -> Result<Vec<(RolloutId, HostState)>, StoreError> {
    let db = Db::new(conn, path);
    let rows = db.rows(
        "read a host's rollouts",
        "SELECT r.rollout_id, COALESCE(h.state, 'Pending')
         FROM rollouts r JOIN json_each(CAST(r.payload AS TEXT), '$.hosts') j ON j.key = ?1
         LEFT JOIN host_records h ON h.rollout_id = r.rollout_id AND h.hostname = ?1
         GROUP BY r.rollout_id ORDER BY r.published_at, r.rollout_id",
        params![host.as_str()],
        two_texts,
    )?;
    rows.into_iter()
        .map(|(id, state)| {
            let rollout_id = RolloutId::parse(&id).map_err(|e| db.corrupt(format!("rollout {id}: {e}")))?;
            let state = HostState::ALL
                .into_iter()
                .find(|s| s.as_str() == state)
                .ok_or_else(|| db.corrupt(format!("host {host} in {id}: state {state}")))?;
            Ok((rollout_id, state))
        })
        .collect()
}
