//! Reads that rebuild or compare state: [`load_state`] (the writer's start
//! and its recovery after a failed commit), the current records of a
//! rollout, [`rebuild_host_records`] (the event log folded through
//! `machine::replay`: a record is a fold of its events), and the small reads the routes and tools
//! need. Every function takes a connection and the database's path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::db::two_texts;
use super::heartbeat::Drift;
use super::state::{pending_records, CpState, LiveRollout};
use super::{parse_ts, Db, StoreError};
use crate::cp::planner::RolloutState;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{self, HostRecord};
use crate::wire::{Dispatch, Manifest, OutboundEvent};

/// Loads the writer's state from the database (at start, and after a
/// failed commit).
pub fn load_state(conn: &Connection, path: &Path) -> Result<CpState, StoreError> {
    let db = Db::new(conn, path);
    let mut state = CpState::default();
    load_rollouts(db, &mut state)?;
    load_records(db, &mut state)?;
    load_skipped(db, &mut state)?;
    load_dispatches(db, &mut state)?;
    load_quarantine(db, &mut state)?;
    super::operator::load_accepted_failures(db, &mut state)?;
    load_drift(db, &mut state)?;
    super::checkpoint::load(db, &mut state)?;
    Ok(state)
}

/// The drift verdict of every host's last heartbeat.
fn load_drift(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    for (host, drift) in db.rows("load drift", "SELECT hostname, drift FROM hosts", [], two_texts)? {
        let hostname = Hostname::parse(&host).map_err(|e| db.corrupt(format!("host {host}: {e}")))?;
        let verdict = Drift::parse(&drift).ok_or_else(|| db.corrupt(format!("host {host}: drift {drift}")))?;
        state.drift.insert(hostname, verdict);
    }
    Ok(())
}

fn load_rollouts(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    let mut stmt = db
        .conn()
        .prepare("SELECT rollout_id, payload, payload_sha256, state, current_wave, halt_reason FROM rollouts")
        .map_err(db.sql("load rollouts"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })
        .map_err(db.sql("load rollouts"))?;
    for row in rows {
        let (id, payload, sha, st, wave, halt_reason) = row.map_err(db.sql("load rollouts"))?;
        let manifest = Manifest::parse(&payload).map_err(|e| db.corrupt(format!("rollout {id}: {e}")))?;
        let state_ = RolloutState::parse(&st).ok_or_else(|| db.corrupt(format!("rollout {id}: state {st}")))?;
        let mut rollout = LiveRollout::published(manifest, sha, state_);
        rollout.current_wave =
            usize::try_from(wave).map_err(|_| db.corrupt(format!("rollout {id}: current_wave {wave}")))?;
        rollout.halt_reason = halt_reason;
        state.rollouts.insert(rollout.manifest.rollout_id.clone(), rollout);
    }
    Ok(())
}

fn load_records(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    let mut stmt = db.conn().prepare("SELECT record FROM host_records").map_err(db.sql("load host records"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db.sql("load host records"))?;
    for row in rows {
        let json = row.map_err(db.sql("load host records"))?;
        let record: HostRecord = serde_json::from_str(&json).map_err(|e| db.corrupt(format!("host record: {e}")))?;
        if let Some(r) = state.rollouts.get_mut(&record.rollout_id) {
            let live = record.is_live().then(|| (record.hostname.clone(), record.rollout_id.clone()));
            r.set_record(record);
            if let Some((host, id)) = live {
                state.set_live(&host, &id, true);
            }
        }
    }
    Ok(())
}

fn load_skipped(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    for (id, host) in db.rows("load skipped hosts", "SELECT rollout_id, hostname FROM skipped_hosts", [], two_texts)? {
        let bad = |e: crate::ids::IdError| db.corrupt(format!("skipped host {id}/{host}: {e}"));
        let rollout_id = RolloutId::parse(&id).map_err(bad)?;
        let hostname = Hostname::parse(&host).map_err(bad)?;
        if let Some(r) = state.rollouts.get_mut(&rollout_id) {
            r.insert_skip(hostname);
        }
    }
    Ok(())
}

fn load_dispatches(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    let mut stmt = db
        .conn()
        .prepare("SELECT rollout_id, hostname, target_closure, wave, soak_secs, issued_at FROM dispatches")
        .map_err(db.sql("load dispatches"))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .map_err(db.sql("load dispatches"))?;
    for row in rows {
        let (id, host, closure, wave, soak, issued) = row.map_err(db.sql("load dispatches"))?;
        let bad = |what: &str| db.corrupt(format!("dispatch {id}/{host}: {what}"));
        let rollout_id = RolloutId::parse(&id).map_err(|e| bad(&e.to_string()))?;
        let hostname = Hostname::parse(&host).map_err(|e| bad(&e.to_string()))?;
        let dispatch = Dispatch {
            rollout_id: rollout_id.clone(),
            target_closure: Closure::parse(&closure).map_err(|e| bad(&e.to_string()))?,
            wave: usize::try_from(wave).map_err(|_| bad("wave"))?,
            soak_secs: u64::try_from(soak).map_err(|_| bad("soak_secs"))?,
            issued_at: parse_ts(&issued).ok_or_else(|| bad("issued_at"))?,
        };
        if let Some(r) = state.rollouts.get_mut(&rollout_id) {
            r.insert_dispatch(hostname, dispatch);
        }
    }
    Ok(())
}

fn load_quarantine(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    for (channel, closure) in
        db.rows("load quarantine", "SELECT channel, closure FROM quarantined_closures", [], two_texts)?
    {
        let closure = Closure::parse(&closure).map_err(|e| db.corrupt(e.to_string()))?;
        state.quarantine_insert(&channel, &closure);
    }
    Ok(())
}

/// The current records of one rollout: stored rows over the manifest's
/// Pending records.
pub fn host_records_of(
    conn: &Connection,
    path: &Path,
    manifest: &Manifest,
) -> Result<BTreeMap<Hostname, HostRecord>, StoreError> {
    let db = Db::new(conn, path);
    let mut out = pending_records(manifest);
    let mut stmt = conn
        .prepare_cached("SELECT record FROM host_records WHERE rollout_id = ?1")
        .map_err(db.sql("read host records"))?;
    let rows = stmt
        .query_map(params![manifest.rollout_id.as_str()], |r| r.get::<_, String>(0))
        .map_err(db.sql("read host records"))?;
    for row in rows {
        let record: HostRecord = serde_json::from_str(&row.map_err(db.sql("read host records"))?)
            .map_err(|e| db.corrupt(format!("host record: {e}")))?;
        out.insert(record.hostname.clone(), record);
    }
    Ok(out)
}

/// A host the planner skipped in one rollout, as the views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedHost {
    pub reason: String,
    pub skipped_at: String,
}

/// The skipped hosts of one rollout (`skipped_hosts`).
pub fn skipped_of(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
) -> Result<BTreeMap<Hostname, SkippedHost>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare_cached("SELECT hostname, reason, skipped_at FROM skipped_hosts WHERE rollout_id = ?1")
        .map_err(db.sql("read skipped hosts"))?;
    let rows = stmt
        .query_map(params![id.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })
        .map_err(db.sql("read skipped hosts"))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (host, reason, skipped_at) = row.map_err(db.sql("read skipped hosts"))?;
        let host = Hostname::parse(&host).map_err(|e| db.corrupt(format!("skipped host {id}/{host}: {e}")))?;
        out.insert(host, SkippedHost { reason, skipped_at });
    }
    Ok(out)
}

/// Per host, the rollouts it is live in (`docs/protocol.md` §3 rule 8), read from the
/// cached records: the views' counterpart of [`CpState::live`].
pub fn live_rollouts(conn: &Connection, path: &Path) -> Result<HashMap<Hostname, BTreeSet<RolloutId>>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare_cached(
            "SELECT record FROM host_records WHERE state IN ('Activating', 'Deferred', 'Soaking', 'Failed')",
        )
        .map_err(db.sql("read live hosts"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db.sql("read live hosts"))?;
    let mut out: HashMap<Hostname, BTreeSet<RolloutId>> = HashMap::new();
    for row in rows {
        let record: HostRecord = serde_json::from_str(&row.map_err(db.sql("read live hosts"))?)
            .map_err(|e| db.corrupt(format!("host record: {e}")))?;
        if record.is_live() {
            out.entry(record.hostname).or_default().insert(record.rollout_id);
        }
    }
    Ok(out)
}

/// Every rollout's manifest, in publish order.
pub fn manifests(conn: &Connection, path: &Path) -> Result<Vec<Manifest>, StoreError> {
    let db = Db::new(conn, path);
    let payloads: Vec<Vec<u8>> =
        db.rows("read manifests", "SELECT payload FROM rollouts ORDER BY published_at, rollout_id", [], |r| r.get(0))?;
    payloads.iter().map(|p| Manifest::parse(p).map_err(|e| db.corrupt(e.to_string()))).collect()
}

/// Rebuilds every host record from the event log (what a lost cache is
/// rebuilt from): a Pending record from the manifest, or the (host,
/// rollout)'s record checkpoint where one was taken, then the logged events
/// folded through `replay` (those at or below the checkpoint are
/// duplicates of it). `nixfleet replay` also proves the checkpoint.
pub fn rebuild_host_records(
    conn: &Connection,
    path: &Path,
) -> Result<BTreeMap<(RolloutId, Hostname), HostRecord>, StoreError> {
    let db = Db::new(conn, path);
    let mut out = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT payload FROM rollouts").map_err(db.sql("rebuild"))?;
    let payloads: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get(0))
        .map_err(db.sql("rebuild"))?
        .collect::<Result<_, _>>()
        .map_err(db.sql("rebuild"))?;
    let mut events = conn
        .prepare("SELECT event FROM event_log WHERE rollout_id = ?1 AND hostname = ?2 ORDER BY seq")
        .map_err(db.sql("rebuild"))?;
    let checkpoints = super::checkpoint::has_checkpoint_table(conn, path)?;
    for payload in payloads {
        let manifest = Manifest::parse(&payload).map_err(|e| db.corrupt(e.to_string()))?;
        let policy = manifest.machine_policy();
        for (host, entry) in &manifest.hosts {
            let id = &manifest.rollout_id;
            let rows: Vec<String> = events
                .query_map(params![id.as_str(), host.as_str()], |r| r.get(0))
                .map_err(db.sql("rebuild"))?
                .collect::<Result<_, _>>()
                .map_err(db.sql("rebuild"))?;
            let mut evs = Vec::with_capacity(rows.len());
            for json in rows {
                let wire: OutboundEvent =
                    serde_json::from_str(&json).map_err(|e| db.corrupt(format!("event log: {e}")))?;
                evs.push(wire.to_remote().map_err(|e| db.corrupt(format!("event log: {e}")))?);
            }
            let checkpoint = if checkpoints { super::checkpoint::checkpoint_of(conn, path, id, host)? } else { None };
            let start = match checkpoint {
                Some(checkpoint) => checkpoint.record,
                None => HostRecord::pending(id.clone(), host.clone(), Some(entry.target_closure.clone())),
            };
            let record = machine::replay(start, &evs, &policy)
                .map_err(|(idx, e)| db.corrupt(format!("event log of {host} in {id}, event {idx}: {e}")))?;
            out.insert((id.clone(), host.clone()), record);
        }
    }
    Ok(out)
}

/// The current host records of every rollout: stored rows over the
/// manifests' Pending records (for tests and `replay` comparisons).
pub fn cached_host_records(
    conn: &Connection,
    path: &Path,
) -> Result<BTreeMap<(RolloutId, Hostname), HostRecord>, StoreError> {
    let mut out = BTreeMap::new();
    for manifest in manifests(conn, path)? {
        for (host, record) in host_records_of(conn, path, &manifest)? {
            out.insert((manifest.rollout_id.clone(), host), record);
        }
    }
    Ok(out)
}

/// The rollout envelope as published, if known.
pub fn envelope(conn: &Connection, path: &Path, id: &RolloutId) -> Result<Option<Vec<u8>>, StoreError> {
    conn.query_row("SELECT envelope FROM rollouts WHERE rollout_id = ?1", params![id.as_str()], |r| r.get(0))
        .optional()
        .map_err(Db::new(conn, path).sql("read envelope"))
}

/// One host's logged events in one rollout, in seq order, as stored: the
/// seq and the wire JSON, unchecked (`nixfleet replay` reports a bad row
/// instead of stopping at it).
pub fn logged_events_of(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    host: &Hostname,
) -> Result<Vec<(i64, String)>, StoreError> {
    let db = Db::new(conn, path);
    let mut stmt = conn
        .prepare_cached("SELECT seq, event FROM event_log WHERE rollout_id = ?1 AND hostname = ?2 ORDER BY seq")
        .map_err(db.sql("read event log"))?;
    let rows = stmt
        .query_map(params![id.as_str(), host.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db.sql("read event log"))?;
    rows.collect::<Result<_, _>>().map_err(db.sql("read event log"))
}
