//! The rows behind the status views (`cp::views`) and `/metrics`, read on a
//! reader connection. They come back typed and checked (a value this
//! version cannot read is [`StoreError::Corrupt`]); the views shape them.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::db::two_texts;
use super::heartbeat::Drift;
use super::{Db, StoreError};
use crate::cp::planner::RolloutState;
use crate::ids::{Hostname, RolloutId};
use crate::wire::{Manifest, OutboundEvent};

/// One `rollouts` row, its manifest parsed.
#[derive(Debug, Clone)]
pub struct RolloutRow {
    pub manifest: Manifest,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub superseded_by: Option<RolloutId>,
    pub issued_at: String,
    pub published_at: String,
    pub updated_at: String,
}

const ROLLOUT_COLUMNS: &str =
    "rollout_id, payload, state, current_wave, halt_reason, superseded_by, issued_at, published_at, updated_at";

/// The columns as stored, before any check.
struct RawRollout {
    id: String,
    payload: Vec<u8>,
    state: String,
    current_wave: i64,
    halt_reason: Option<String>,
    superseded_by: Option<String>,
    issued_at: String,
    published_at: String,
    updated_at: String,
}

fn raw_rollout(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRollout> {
    Ok(RawRollout {
        id: r.get(0)?,
        payload: r.get(1)?,
        state: r.get(2)?,
        current_wave: r.get(3)?,
        halt_reason: r.get(4)?,
        superseded_by: r.get(5)?,
        issued_at: r.get(6)?,
        published_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

impl RawRollout {
    fn check(self, db: Db<'_>) -> Result<RolloutRow, StoreError> {
        let id = &self.id;
        let manifest = Manifest::parse(&self.payload).map_err(|e| db.corrupt(format!("rollout {id}: {e}")))?;
        Ok(RolloutRow {
            state: RolloutState::parse(&self.state)
                .ok_or_else(|| db.corrupt(format!("rollout state {}", self.state)))?,
            current_wave: usize::try_from(self.current_wave)
                .map_err(|_| db.corrupt(format!("rollout {id}: current_wave {}", self.current_wave)))?,
            superseded_by: self.superseded_by.as_deref().and_then(|s| RolloutId::parse(s).ok()),
            manifest,
            halt_reason: self.halt_reason,
            issued_at: self.issued_at,
            published_at: self.published_at,
            updated_at: self.updated_at,
        })
    }
}

/// Every rollout, in publish order.
pub fn rollout_rows(conn: &Connection, path: &Path) -> Result<Vec<RolloutRow>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY published_at, rollout_id"))
        .map_err(db.sql("list rollouts"))?;
    let rows = stmt.query_map([], raw_rollout).map_err(db.sql("list rollouts"))?;
    let raw = rows.collect::<Result<Vec<_>, _>>().map_err(db.sql("list rollouts"))?;
    raw.into_iter().map(|r| r.check(db)).collect()
}

/// One rollout; `None` if unknown.
pub fn rollout_row(conn: &Connection, path: &Path, id: &RolloutId) -> Result<Option<RolloutRow>, StoreError> {
    let db = Db::new(conn, path);
    let raw = conn
        .query_row(
            &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?1"),
            params![id.as_str()],
            raw_rollout,
        )
        .optional()
        .map_err(db.sql("read rollout"))?;
    raw.map(|r| r.check(db)).transpose()
}

/// Whether the rollout is known.
pub fn rollout_exists(conn: &Connection, path: &Path, id: &RolloutId) -> Result<bool, StoreError> {
    let known: Option<i64> = conn
        .query_row("SELECT 1 FROM rollouts WHERE rollout_id = ?1", params![id.as_str()], |r| r.get(0))
        .optional()
        .map_err(Db::new(conn, path).sql("read rollout"))?;
    Ok(known.is_some())
}

/// When each standing dispatch of the rollout was issued (CP time).
pub fn dispatch_times(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
) -> Result<BTreeMap<Hostname, String>, StoreError> {
    let db = Db::new(conn, path);
    let mut out = BTreeMap::new();
    let sql = "SELECT hostname, issued_at FROM dispatches WHERE rollout_id = ?1";
    for (host, at) in db.rows("read dispatches", sql, params![id.as_str()], two_texts)? {
        if let Ok(h) = Hostname::parse(&host) {
            out.insert(h, at);
        }
    }
    Ok(out)
}

/// One `quarantined_closures` row.
#[derive(Debug, Clone)]
pub struct QuarantineRow {
    pub channel: String,
    pub closure: String,
    pub rollout_id: String,
    pub hostname: String,
    pub quarantined_at: String,
}

/// Every quarantined closure, by channel and closure.
pub fn quarantine_rows(conn: &Connection, path: &Path) -> Result<Vec<QuarantineRow>, StoreError> {
    let db = Db::new(conn, path);
    let sql = "SELECT channel, closure, rollout_id, hostname, quarantined_at FROM quarantined_closures
               ORDER BY channel, closure";
    db.rows("read quarantine", sql, [], |r| {
        Ok(QuarantineRow {
            channel: r.get(0)?,
            closure: r.get(1)?,
            rollout_id: r.get(2)?,
            hostname: r.get(3)?,
            quarantined_at: r.get(4)?,
        })
    })
}

/// One `event_log` row, the event parsed (also the events view's item).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoggedRow {
    pub id: i64,
    pub hostname: String,
    pub seq: u64,
    pub kind: String,
    pub agent_at: String,
    pub received_at: String,
    pub event: OutboundEvent,
}

/// At most `limit` rows of the rollout's log after log id `after`, in order.
pub fn event_rows(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    after: i64,
    limit: i64,
) -> Result<Vec<LoggedRow>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare(
            "SELECT id, hostname, seq, kind, agent_at, received_at, event FROM event_log
             WHERE rollout_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )
        .map_err(db.sql("read events"))?;
    let rows = stmt.query_map(params![id.as_str(), after, limit], raw_logged).map_err(db.sql("read events"))?;
    let mut events = Vec::new();
    for row in rows {
        events.push(logged_row(db, row.map_err(db.sql("read events"))?)?);
    }
    Ok(events)
}

/// The columns of an `event_log` row as read: id, hostname, seq, kind,
/// agent_at, received_at, event JSON.
type RawLogged = (i64, String, i64, String, String, String, String);

/// Reads the first seven columns of a row in [`RawLogged`] order.
fn raw_logged(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawLogged> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn logged_row(db: Db<'_>, raw: RawLogged) -> Result<LoggedRow, StoreError> {
    let (log_id, hostname, seq, kind, agent_at, received_at, json) = raw;
    let event: OutboundEvent =
        serde_json::from_str(&json).map_err(|e| db.corrupt(format!("event log row {log_id}: {e}")))?;
    Ok(LoggedRow {
        id: log_id,
        hostname,
        seq: u64::try_from(seq).map_err(|_| db.corrupt(format!("event log row {log_id}: seq {seq}")))?,
        kind,
        agent_at,
        received_at,
        event,
    })
}

/// The newest `limit` rows of one host's log, across its rollouts, newest
/// first, with the rollout of each (the web page's timeline).
pub fn host_event_rows(
    conn: &Connection,
    path: &Path,
    host: &Hostname,
    limit: i64,
) -> Result<Vec<(String, LoggedRow)>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare(
            "SELECT id, hostname, seq, kind, agent_at, received_at, event, rollout_id FROM event_log
             WHERE hostname = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .map_err(db.sql("read host events"))?;
    let rows = stmt
        .query_map(params![host.as_str(), limit], |r| Ok((raw_logged(r)?, r.get::<_, String>(7)?)))
        .map_err(db.sql("read host events"))?;
    let mut out = Vec::new();
    for row in rows {
        let (raw, rollout) = row.map_err(db.sql("read host events"))?;
        out.push((rollout, logged_row(db, raw)?));
    }
    Ok(out)
}

/// One `hosts` row: the last heartbeat and its drift verdict.
#[derive(Debug, Clone)]
pub struct HostRow {
    pub hostname: String,
    pub last_heartbeat_at: String,
    pub current_closure: String,
    pub booted_closure: Option<String>,
    pub agent_version: String,
    pub uptime_secs: i64,
    pub drift: Drift,
    pub expected_closure: Option<String>,
    pub expected_from: Option<String>,
}

/// Every host that sent a heartbeat.
pub fn host_rows(conn: &Connection, path: &Path) -> Result<Vec<HostRow>, StoreError> {
    host_rows_where(conn, path, "", [])
}

/// The hosts that sent a heartbeat with a name in `first..=last` (one page).
pub fn host_rows_between(conn: &Connection, path: &Path, first: &str, last: &str) -> Result<Vec<HostRow>, StoreError> {
    host_rows_where(conn, path, "WHERE hostname >= ?1 AND hostname <= ?2", params![first, last])
}

/// Up to `limit` names from `hosts` after `after`, in order.
pub fn host_names_after(
    conn: &Connection,
    path: &Path,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Db::new(conn, path).rows(
        "list hosts",
        "SELECT hostname FROM hosts WHERE ?1 IS NULL OR hostname > ?1 ORDER BY hostname LIMIT ?2",
        params![after, limit],
        |r| r.get(0),
    )
}

/// The hosts whose last heartbeat was judged drifting.
pub fn drifting_host_rows(conn: &Connection, path: &Path) -> Result<Vec<HostRow>, StoreError> {
    host_rows_where(conn, path, "WHERE drift = 'drifting' ORDER BY hostname", [])
}

pub(super) fn host_rows_where<P: rusqlite::Params>(
    conn: &Connection,
    path: &Path,
    filter: &str,
    params: P,
) -> Result<Vec<HostRow>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT hostname, last_heartbeat_at, current_closure, booted_closure, agent_version, uptime_secs,
                    drift, expected_closure, expected_from FROM hosts {filter}"
        ))
        .map_err(db.sql("read hosts"))?;
    let rows = stmt
        .query_map(params, |r| {
            Ok((
                HostRow {
                    hostname: r.get(0)?,
                    last_heartbeat_at: r.get(1)?,
                    current_closure: r.get(2)?,
                    booted_closure: r.get(3)?,
                    agent_version: r.get(4)?,
                    uptime_secs: r.get(5)?,
                    drift: Drift::Unknown,
                    expected_closure: r.get(7)?,
                    expected_from: r.get(8)?,
                },
                r.get::<_, String>(6)?,
            ))
        })
        .map_err(db.sql("read hosts"))?;
    let mut out = Vec::new();
    for row in rows {
        let (mut host, drift) = row.map_err(db.sql("read hosts"))?;
        host.drift =
            Drift::parse(&drift).ok_or_else(|| db.corrupt(format!("host {}: drift {drift}", host.hostname)))?;
        out.push(host);
    }
    Ok(out)
}

/// The figures `/metrics` reads from the database.
#[derive(Debug, Clone, Default)]
pub struct MetricCounts {
    /// `(state, count)`, by state.
    pub rollouts_by_state: Vec<(String, i64)>,
    pub n_drifting: i64,
    pub n_skipped: i64,
}

/// Reads the figures of `/metrics`.
pub fn metric_counts(conn: &Connection, path: &Path) -> Result<MetricCounts, StoreError> {
    let sql = || Db::new(conn, path).sql("read metrics");
    let grouped = |query: &str| -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = conn.prepare(query).map_err(sql())?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql())
    };
    let count = |query: &str| -> Result<i64, StoreError> { conn.query_row(query, [], |r| r.get(0)).map_err(sql()) };
    Ok(MetricCounts {
        rollouts_by_state: grouped("SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY state")?,
        n_drifting: count("SELECT COUNT(*) FROM hosts WHERE drift = 'drifting'")?,
        n_skipped: count("SELECT COUNT(*) FROM skipped_hosts")?,
    })
}
