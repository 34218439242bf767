//! Record checkpoints: the event log bounded per (host, rollout).
//!
//! `step` reads nothing but the record, the event and the rollout's policy,
//! so the record as `step` made it at seq K is everything the state machine
//! needs to continue from K: its probe records, the declared topology and
//! the sustained-failure clock included. When more than
//! [`Checkpoints::bound`] events of one (host, rollout) were applied since
//! its last checkpoint and the event just applied is a probe event, the
//! writer, in the same transaction, stores that record as the checkpoint
//! at K (its `last_seq`) and deletes the probe events at or below K
//! ([`is_compactable`]).
//!
//! Why only probe events, and why the hole is one range: they are legal
//! only while Soaking, a host soaks once per rollout (Soaking is entered
//! only by ActivationCompleted and left only for Converged or Failed), and
//! the checkpoint is taken in Soaking. So with A the seq of the
//! ActivationCompleted, the log keeps seqs 1..=A and K+1.. and the deleted
//! rows are exactly A+1..=K: `nixfleet replay` proves 1..=A from seq 1 and
//! K+1.. from the checkpoint, and checks that the checkpoint continues the
//! record at A in every field but the probe records, the topology and the
//! clock (`docs/protocol.md`, "Record checkpoints").
//!
//! Nothing the agent sees changes: duplicates and gaps are judged against
//! the record's `last_seq` (at or above K), never against the log's rows.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use time::OffsetDateTime;

use super::state::CpState;
use super::{ts, Db, StoreError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::{EventKind, HostRecord, HostState};

/// Events of one (host, rollout) applied since its last checkpoint before
/// the next one is taken: a soaking host stores at most this many probe
/// events (a flapping probe or a compromised host sends up to 180,000 an
/// hour within the event quota). A real soak stores a few dozen.
pub const MAX_EVENTS_SINCE_CHECKPOINT: u64 = 10_000;

/// The event kinds a checkpoint replaces: the probe events, whose whole
/// effect is on the probe records, the topology and the failure clock.
/// Never a decision (DispatchAck, Activation*, Failed, Rollback*,
/// Converged, DispatchRejected).
pub const COMPACTABLE_KINDS: [EventKind; 4] = [
    EventKind::ProbeTopologyDeclared,
    EventKind::ProbeObservedFirst,
    EventKind::ProbeResult,
    EventKind::ProbeFailureFirst,
];

pub fn is_compactable(kind: EventKind) -> bool {
    COMPACTABLE_KINDS.contains(&kind)
}

/// The writer's in-memory view of `record_checkpoints`: the bound, and the
/// seq of each (host, rollout)'s checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// [`MAX_EVENTS_SINCE_CHECKPOINT`] unless a test lowers it
    /// (`Writer::set_checkpoint_bound`).
    pub bound: u64,
    seqs: HashMap<RolloutId, HashMap<Hostname, u64>>,
}

impl Default for Checkpoints {
    fn default() -> Checkpoints {
        Checkpoints { bound: MAX_EVENTS_SINCE_CHECKPOINT, seqs: HashMap::new() }
    }
}

impl Checkpoints {
    /// The seq of the checkpoint of `host` in `id`; 0 without one.
    pub fn seq_of(&self, id: &RolloutId, host: &Hostname) -> u64 {
        self.seqs.get(id).and_then(|m| m.get(host)).copied().unwrap_or(0)
    }

    fn set(&mut self, id: &RolloutId, host: &Hostname, seq: u64) {
        self.seqs.entry(id.clone()).or_default().insert(host.clone(), seq);
    }
}

/// After `step` applied an event of `kind` to `host` in `id` and the
/// record was stored: takes a checkpoint when one is due.
pub(super) fn after_applied(
    db: Db<'_>,
    state: &mut CpState,
    now: OffsetDateTime,
    host: &Hostname,
    id: &RolloutId,
    kind: EventKind,
) -> Result<(), StoreError> {
    if !is_compactable(kind) {
        return Ok(());
    }
    let since = state.checkpoints.seq_of(id, host);
    let Some(record) = state.rollouts.get(id).and_then(|r| r.records.get(host)) else { return Ok(()) };
    // A probe event leaves the host Soaking; the check keeps the proof's
    // premise (one range deleted, inside the soak) true by construction.
    if record.last_seq.saturating_sub(since) <= state.checkpoints.bound || record.state != HostState::Soaking {
        return Ok(());
    }
    let seq = record.last_seq;
    let n_deleted = write(db, record, now)?;
    tracing::info!(%host, rollout = %id, seq, n_deleted, "record checkpoint: probe events at or below seq deleted");
    state.checkpoints.set(id, host, seq);
    Ok(())
}

/// The checkpoint row and the deletion, in the caller's transaction;
/// returns the number of rows deleted.
fn write(db: Db<'_>, record: &HostRecord, now: OffsetDateTime) -> Result<u64, StoreError> {
    let (id, host) = (record.rollout_id.as_str(), record.hostname.as_str());
    let seq = db.int("checkpoint seq", record.last_seq)?;
    let [k0, k1, k2, k3] = COMPACTABLE_KINDS.map(EventKind::wire_name);
    let deleted = db
        .conn()
        .prepare_cached(
            "DELETE FROM event_log WHERE hostname = ?1 AND rollout_id = ?2 AND seq <= ?3 AND kind IN (?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| s.execute(params![host, id, seq, k0, k1, k2, k3]))
        .map_err(db.sql("delete checkpointed events"))?;
    let n_deleted = db.int("deleted rows", deleted)?;
    let deleted = u64::try_from(deleted).unwrap_or(u64::MAX);
    let record_json = db.json(|| format!("the checkpoint of {host} in {id}"), record)?;
    db.conn()
        .prepare_cached(
            "INSERT INTO record_checkpoints (rollout_id, hostname, seq, record, compacted, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (rollout_id, hostname) DO UPDATE
                 SET seq = excluded.seq, record = excluded.record,
                     compacted = compacted + excluded.compacted, at = excluded.at",
        )
        .and_then(|mut s| s.execute(params![id, host, seq, record_json, n_deleted, ts(now)]))
        .map_err(db.sql("write record checkpoint"))?;
    Ok(deleted)
}

/// Loads the seq of every checkpoint (`load_state`).
pub(super) fn load(db: Db<'_>, state: &mut CpState) -> Result<(), StoreError> {
    let rows: Vec<(String, String, i64)> =
        db.rows("load checkpoints", "SELECT rollout_id, hostname, seq FROM record_checkpoints", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    for (id, host, seq) in rows {
        let bad = |what: String| db.corrupt(format!("checkpoint of {host} in {id}: {what}"));
        let rollout_id = RolloutId::parse(&id).map_err(|e| bad(e.to_string()))?;
        let hostname = Hostname::parse(&host).map_err(|e| bad(e.to_string()))?;
        let seq = u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?;
        state.checkpoints.set(&rollout_id, &hostname, seq);
    }
    Ok(())
}

/// One stored checkpoint, as `replay` and the rebuild read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The record's `last_seq`: every probe event at or below it is deleted.
    pub seq: u64,
    pub record: HostRecord,
    /// Rows deleted by every checkpoint of this (host, rollout) so far.
    pub compacted: u64,
    /// CP time of the latest checkpoint.
    pub at: String,
}

/// Whether the database can hold checkpoints (schema 4 or later). A reader
/// opened on a copy an older version wrote, never migrated (a backup), has
/// none: its log is complete.
pub fn has_checkpoint_table(conn: &Connection, path: &Path) -> Result<bool, StoreError> {
    conn.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'record_checkpoints'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n > 0)
    .map_err(Db::new(conn, path).sql("look for the checkpoint table"))
}

/// The checkpoint of `host` in `id`, if one was taken (the table must
/// exist: [`has_checkpoint_table`]). A row whose record
/// names another host, rollout or seq is corrupt.
pub fn checkpoint_of(
    conn: &Connection,
    path: &Path,
    id: &RolloutId,
    host: &Hostname,
) -> Result<Option<Checkpoint>, StoreError> {
    let db = Db::new(conn, path);
    let row: Option<(i64, String, i64, String)> = conn
        .prepare_cached(
            "SELECT seq, record, compacted, at FROM record_checkpoints WHERE rollout_id = ?1 AND hostname = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![id.as_str(), host.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()
        })
        .map_err(db.sql("read record checkpoint"))?;
    let Some((seq, json, compacted, at)) = row else { return Ok(None) };
    let bad = |what: String| db.corrupt(format!("checkpoint of {host} in {id}: {what}"));
    let seq = u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?;
    let compacted = u64::try_from(compacted).map_err(|_| bad(format!("compacted {compacted}")))?;
    let record: HostRecord = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
    if record.rollout_id != *id || record.hostname != *host || record.last_seq != seq {
        return Err(bad(format!(
            "its record is of {} in {} at seq {}",
            record.hostname, record.rollout_id, record.last_seq
        )));
    }
    Ok(Some(Checkpoint { seq, record, compacted, at }))
}
