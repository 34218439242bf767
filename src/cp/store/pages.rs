//! Reads for the paged status views: counts by state computed in SQL, and
//! the records of one page of hosts, so a view of a 100,000-host rollout
//! never holds every record at once (`cp::views`).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use rusqlite::{params, Connection};

use super::{Db, StoreError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::{HostRecord, HostState};
use crate::wire::Manifest;

/// Host count per state of a rollout's stored records (hosts without a
/// record are Pending and not counted here).
pub fn state_counts(conn: &Connection, path: &Path, id: &RolloutId) -> Result<BTreeMap<String, usize>, StoreError> {
    let db = Db::new(conn, path);
    let rows = db.rows(
        "count host states",
        "SELECT state, COUNT(*) FROM host_records WHERE rollout_id = ?1 GROUP BY state",
        params![id.as_str()],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
    )?;
    Ok(rows.into_iter().map(|(state, n)| (state, usize::try_from(n).unwrap_or(0))).collect())
}

/// Skipped hosts of a rollout that are still Pending (no record, or a
/// Pending one): the view counts them as "Skipped".
pub fn n_skipped_pending(conn: &Connection, path: &Path, id: &RolloutId) -> Result<usize, StoreError> {
    let db = Db::new(conn, path);
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM skipped_hosts s LEFT JOIN host_records h
                 ON h.rollout_id = s.rollout_id AND h.hostname = s.hostname
             WHERE s.rollout_id = ?1 AND (h.state IS NULL OR h.state = 'Pending')",
            params![id.as_str()],
            |r| r.get(0),
        )
        .map_err(db.sql("count skipped hosts"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The records of a rollout in one state (e.g. the Deferred hosts).
pub fn records_in_state(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    state: HostState,
) -> Result<Vec<HostRecord>, StoreError> {
    let db = Db::new(conn, path);
    let rows = db.rows(
        "read host records",
        "SELECT record FROM host_records WHERE rollout_id = ?1 AND state = ?2",
        params![id.as_str(), state.as_str()],
        |r| r.get::<_, String>(0),
    )?;
    rows.iter().map(|text| serde_json::from_str(text).map_err(|e| db.corrupt(format!("host record: {e}")))).collect()
}

/// One page of a rollout's hosts in hostname order: up to `limit` hosts
/// after `after`, each with its record (Pending as the manifest says when
/// none is stored), and the hostname to pass as `after` for the next page.
pub fn host_records_page(
    conn: &Connection,
    path: &Path,
    manifest: &Manifest,
    after: Option<&Hostname>,
    limit: usize,
) -> Result<(BTreeMap<Hostname, HostRecord>, Option<Hostname>), StoreError> {
    let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut names: Vec<Hostname> = manifest
        .hosts
        .range::<Hostname, _>((lower, Bound::Unbounded))
        .take(limit + 1)
        .map(|(h, _)| h.clone())
        .collect();
    let next = if names.len() > limit {
        names.truncate(limit);
        names.last().cloned()
    } else {
        None
    };
    Ok((host_records_named(conn, path, manifest, &names)?, next))
}

/// The records of `manifest`'s hosts named in `names` (sorted), Pending as
/// the manifest says where none is stored; hosts the manifest does not
/// name are left out.
pub fn host_records_named(
    conn: &Connection,
    path: &Path,
    manifest: &Manifest,
    names: &[Hostname],
) -> Result<BTreeMap<Hostname, HostRecord>, StoreError> {
    let db = Db::new(conn, path);
    let id = &manifest.rollout_id;
    let mut out: BTreeMap<Hostname, HostRecord> = names
        .iter()
        .filter_map(|h| manifest.hosts.get(h).map(|e| (h, e)))
        .map(|(h, e)| (h.clone(), HostRecord::pending(id.clone(), h.clone(), Some(e.target_closure.clone()))))
        .collect();
    let (Some(first), Some(last)) = (out.keys().next(), out.keys().next_back()) else { return Ok(out) };
    let rows = db.rows(
        "read host records",
        "SELECT record FROM host_records WHERE rollout_id = ?1 AND hostname >= ?2 AND hostname <= ?3",
        params![id.as_str(), first.as_str(), last.as_str()],
        |r| r.get::<_, String>(0),
    )?;
    for text in rows {
        let record: HostRecord = serde_json::from_str(&text).map_err(|e| db.corrupt(format!("host record: {e}")))?;
        if out.contains_key(&record.hostname) {
            out.insert(record.hostname.clone(), record);
        }
    }
    Ok(out)
}
