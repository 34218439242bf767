//! The control plane's durable state in SQLite, and the ONE writer that
//! changes it (STYLE.md §3, §7).
//!
//! Every change (publish, ingest, heartbeat, planner tick) is a [`Command`]
//! sent over a bounded channel to a dedicated writer thread. The writer
//! drains whatever commands are ready, applies them to its in-memory
//! [`CpState`] and to the database inside ONE transaction (group commit),
//! runs the planner, commits with `synchronous=FULL`, and only then answers
//! the callers and updates the long-poll board. So an `applied` answer means
//! the event is on disk (the reference system answered 204 before doing
//! anything, seed-system.md §11 item 3).
//!
//! Crash cases:
//! - killed before commit: nothing of the group is on disk and nobody got an
//!   answer; agents retry and the events are applied then.
//! - killed after commit, before the answers left: the events are in the
//!   log; the agents retry and get `duplicate`, which also retires them.
//! - commit fails (disk full, I/O error): every caller of the group gets an
//!   error (HTTP 503, the agent retries) and the in-memory state is reloaded
//!   from the database, so memory never runs ahead of the disk.
//!
//! Host records are a cache of `step` results; [`rebuild_host_records`]
//! rebuilds them from the event log alone.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::longpoll::Board;
use super::metrics::Counters;
use super::planner::{self, PlanInput, RolloutState};
use crate::clock::ClockHandle;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{self, Effect, EventBody, HostRecord, HostState, Outcome, TransitionError};
use crate::wire::{BatchItem, Dispatch, EventResult, Heartbeat, Manifest, OutboundEvent, ResultStatus};

/// Commands waiting for the writer. Handlers `send().await`, so a full
/// channel back-pressures requests instead of failing them; 1024 covers a
/// burst of one request from each of 1024 agents while a commit is flushing.
pub const WRITER_CHANNEL_CAPACITY: usize = 1024;
/// Events applied in one transaction at most: bounds the time callers wait
/// for a commit and the size of the WAL frame written at once. The first
/// command of a group is always taken, so one full batch (256) always fits.
pub const MAX_GROUP_EVENTS: usize = 4096;
/// A group slower than this is logged as a warning: agents wait for it.
pub const SLOW_GROUP_MS: u128 = 250;
/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 2;
/// Rows of `/v1/rollouts/{id}/events` per page: bounds one answer.
pub const MAX_EVENTS_PAGE: usize = 10_000;

/// A storage failure, naming the database and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {op}: {source}")]
    Sql {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}, newer than this nixfleet understands ({SCHEMA_VERSION})")]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("database {path} holds corrupt data: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("the store writer has stopped")]
    WriterGone,
    /// A value could not be turned into the JSON the database keeps; the
    /// event log is the replay source, so nothing is written instead of an
    /// empty or partial row (the group fails and the agent retries).
    #[error("database {path}: cannot encode {what} as JSON: {source}")]
    Encode {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A number too large for SQLite's INTEGER (i64): refused, never wrapped.
    #[error("database {path}: {what} = {value} does not fit a database integer")]
    OutOfRange { path: PathBuf, what: &'static str, value: u64 },
}

const MIGRATION_1: &str = r#"
CREATE TABLE rollouts (
    rollout_id     TEXT PRIMARY KEY,
    channel        TEXT NOT NULL,
    envelope       BLOB NOT NULL,            -- the DSSE envelope as published
    payload        BLOB NOT NULL,            -- the exact signed manifest bytes
    payload_sha256 TEXT NOT NULL,
    issued_at      TEXT NOT NULL,            -- from the manifest
    published_at   TEXT NOT NULL,            -- CP receive time
    state          TEXT NOT NULL CHECK (state IN ('active','converging','halted','completed','superseded')),
    current_wave   INTEGER NOT NULL,
    halt_reason    TEXT,
    superseded_by  TEXT,
    updated_at     TEXT NOT NULL
);
CREATE INDEX rollouts_by_channel ON rollouts (channel);

CREATE TABLE host_records (
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id),
    hostname   TEXT NOT NULL,
    wave       INTEGER NOT NULL,
    state      TEXT NOT NULL,
    last_seq   INTEGER NOT NULL,
    record     TEXT NOT NULL,                -- HostRecord as JSON: a cache of step results
    -- A row appears with the host's first applied event; until then the
    -- host is Pending as the manifest says (publishing 100k hosts writes no rows).
    PRIMARY KEY (rollout_id, hostname)
);
CREATE INDEX host_records_by_host ON host_records (hostname);

CREATE TABLE event_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    hostname    TEXT NOT NULL,
    rollout_id  TEXT NOT NULL REFERENCES rollouts (rollout_id),
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    event       TEXT NOT NULL,               -- the wire event (OutboundEvent JSON)
    agent_at    TEXT NOT NULL,               -- the agent's timestamp of the fact
    received_at TEXT NOT NULL,               -- CP receive time (never host state)
    UNIQUE (hostname, rollout_id, seq)
);
CREATE INDEX event_log_by_rollout ON event_log (rollout_id, id);

CREATE TABLE dispatches (
    rollout_id     TEXT NOT NULL REFERENCES rollouts (rollout_id),
    hostname       TEXT NOT NULL,
    target_closure TEXT NOT NULL,
    wave           INTEGER NOT NULL,
    soak_secs      INTEGER NOT NULL,
    issued_at      TEXT NOT NULL,
    PRIMARY KEY (rollout_id, hostname)
);

CREATE TABLE quarantined_closures (
    channel        TEXT NOT NULL,
    closure        TEXT NOT NULL,
    rollout_id     TEXT NOT NULL,
    hostname       TEXT NOT NULL,
    quarantined_at TEXT NOT NULL,            -- the agent's rollback completion time
    PRIMARY KEY (channel, closure)
);

CREATE TABLE hosts (
    hostname          TEXT PRIMARY KEY,
    last_heartbeat_at TEXT NOT NULL,         -- CP receive time: liveness is the CP's view
    current_closure   TEXT NOT NULL,
    booted_closure    TEXT,
    agent_version     TEXT NOT NULL,
    uptime_secs       INTEGER NOT NULL
);
"#;

/// Schema 2: CP-only outcomes and drift.
/// - `skipped_hosts`: a host whose target closure became quarantined on the
///   channel before it acked is skipped by the planner: a terminal outcome
///   of the CONTROL PLANE, kept apart from `host_records` (which stay a pure
///   fold of the agent's events, so `replay` never sees it).
/// - `hosts.expected_closure/expected_from/drift`: what the records say the
///   host runs, and the verdict of the last heartbeat (SPEC §4 rule 10).
const MIGRATION_2: &str = r#"
CREATE TABLE skipped_hosts (
    rollout_id     TEXT NOT NULL REFERENCES rollouts (rollout_id),
    hostname       TEXT NOT NULL,
    target_closure TEXT NOT NULL,
    reason         TEXT NOT NULL,
    skipped_at     TEXT NOT NULL,            -- CP time: this is the CP's decision
    PRIMARY KEY (rollout_id, hostname)
);
ALTER TABLE hosts ADD COLUMN expected_closure TEXT;
ALTER TABLE hosts ADD COLUMN expected_from TEXT;
ALTER TABLE hosts ADD COLUMN drift TEXT NOT NULL DEFAULT 'unknown'
    CHECK (drift IN ('in_sync', 'drifting', 'unknown'));
"#;

pub(crate) fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

pub(crate) fn parse_ts(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn sql<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sql { path: path.to_owned(), op, source }
}

/// Opens (creating if needed) the database with the durability settings the
/// acknowledgement contract needs, and migrates it.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql(path, "open"))?;
    // FULL: the WAL is synced at every commit, so an `applied` answer
    // survives power loss; NORMAL would only survive a process crash.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
    )
    .map_err(sql(path, "set pragmas"))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql(path, "read version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_owned(), found: version });
    }
    if version < 1 {
        conn.execute_batch(&format!("BEGIN; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;"))
            .map_err(sql(path, "migrate to schema 1"))?;
    }
    if version < 2 {
        conn.execute_batch(&format!("BEGIN; {MIGRATION_2} PRAGMA user_version = 2; COMMIT;"))
            .map_err(sql(path, "migrate to schema 2"))?;
    }
    Ok(conn)
}

/// Opens a read-only view connection (status routes).
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql(path, "open reader"))?;
    conn.execute_batch("PRAGMA query_only = 1; PRAGMA busy_timeout = 5000;").map_err(sql(path, "reader pragmas"))?;
    Ok(conn)
}

/// One rollout as the writer holds it.
#[derive(Debug, Clone)]
pub struct LiveRollout {
    pub manifest: Manifest,
    pub payload_sha256: String,
    pub state: RolloutState,
    pub current_wave: usize,
    pub halt_reason: Option<String>,
    pub records: BTreeMap<Hostname, HostRecord>,
    /// Standing dispatches, until the host's DispatchAck/DispatchRejected.
    pub dispatched: BTreeMap<Hostname, Dispatch>,
    /// Hosts the planner skipped (`skipped_hosts`).
    pub skipped: BTreeSet<Hostname>,
}

/// Everything the writer needs in memory; a projection of the database.
#[derive(Debug, Default, Clone)]
pub struct CpState {
    pub rollouts: BTreeMap<RolloutId, LiveRollout>,
    pub quarantine: HashMap<String, HashSet<Closure>>,
    /// Per host, the rollouts it is live in (SPEC §4 rule 7; at most one
    /// unless agents broke the rule): derived from the records, so the
    /// planner finds the held hosts without scanning every record.
    pub live: HashMap<Hostname, BTreeSet<RolloutId>>,
}

impl CpState {
    /// The hosts of rollout `id` that are live in another rollout.
    pub fn busy_elsewhere(&self, id: &RolloutId, manifest: &Manifest) -> BTreeMap<Hostname, RolloutId> {
        self.live
            .iter()
            .filter(|(host, _)| manifest.hosts.contains_key(*host))
            .filter_map(|(host, ids)| ids.iter().find(|other| *other != id).map(|other| (host.clone(), other.clone())))
            .collect()
    }

    fn set_live(&mut self, host: &Hostname, id: &RolloutId, live: bool) {
        if live {
            self.live.entry(host.clone()).or_default().insert(id.clone());
        } else if let Some(ids) = self.live.get_mut(host) {
            ids.remove(id);
            if ids.is_empty() {
                self.live.remove(host);
            }
        }
    }

    /// What the records say `host` runs (SPEC §4 rule 10): the record of
    /// the rollout the host accepted last (latest `dispatch_acked_at`, the
    /// agent's time; ties by rollout id), if that record knows its closure
    /// (`HostRecord::known_running_closure`). `None`: not known, not judged.
    pub fn expected_closure(&self, host: &Hostname) -> Option<(Closure, RolloutId)> {
        let (id, record) = self
            .rollouts
            .iter()
            .filter_map(|(id, r)| r.records.get(host).map(|record| (id, record)))
            .filter(|(_, record)| record.dispatch_acked_at.is_some())
            .max_by(|a, b| (a.1.dispatch_acked_at, a.0).cmp(&(b.1.dispatch_acked_at, b.0)))?;
        record.known_running_closure().map(|c| (c.clone(), id.clone()))
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Corrupt { path: path.to_owned(), what: what.into() }
}

/// Loads the writer's state from the database (at start, and after a
/// failed commit).
pub fn load_state(conn: &Connection, path: &Path) -> Result<CpState, StoreError> {
    let mut state = CpState::default();
    let mut stmt = conn
        .prepare("SELECT rollout_id, payload, payload_sha256, state, current_wave, halt_reason FROM rollouts")
        .map_err(sql(path, "load rollouts"))?;
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
        .map_err(sql(path, "load rollouts"))?;
    for row in rows {
        let (id, payload, sha, st, wave, halt_reason) = row.map_err(sql(path, "load rollouts"))?;
        let manifest = Manifest::parse(&payload).map_err(|e| corrupt(path, format!("rollout {id}: {e}")))?;
        let state_ = RolloutState::parse(&st).ok_or_else(|| corrupt(path, format!("rollout {id}: state {st}")))?;
        let records = pending_records(&manifest);
        state.rollouts.insert(
            manifest.rollout_id.clone(),
            LiveRollout {
                manifest,
                payload_sha256: sha,
                state: state_,
                current_wave: usize::try_from(wave)
                    .map_err(|_| corrupt(path, format!("rollout {id}: current_wave {wave}")))?,
                halt_reason,
                records,
                dispatched: BTreeMap::new(),
                skipped: BTreeSet::new(),
            },
        );
    }
    let mut stmt = conn.prepare("SELECT record FROM host_records").map_err(sql(path, "load host records"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql(path, "load host records"))?;
    for row in rows {
        let json = row.map_err(sql(path, "load host records"))?;
        let record: HostRecord = serde_json::from_str(&json).map_err(|e| corrupt(path, format!("host record: {e}")))?;
        if let Some(r) = state.rollouts.get_mut(&record.rollout_id) {
            if record.is_live() {
                state.live.entry(record.hostname.clone()).or_default().insert(record.rollout_id.clone());
            }
            r.records.insert(record.hostname.clone(), record);
        }
    }
    let mut stmt =
        conn.prepare("SELECT rollout_id, hostname FROM skipped_hosts").map_err(sql(path, "load skipped hosts"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(sql(path, "load skipped hosts"))?;
    for row in rows {
        let (id, host) = row.map_err(sql(path, "load skipped hosts"))?;
        let bad = |e: crate::ids::IdError| corrupt(path, format!("skipped host {id}/{host}: {e}"));
        let rollout_id = RolloutId::parse(&id).map_err(bad)?;
        let hostname = Hostname::parse(&host).map_err(bad)?;
        if let Some(r) = state.rollouts.get_mut(&rollout_id) {
            r.skipped.insert(hostname);
        }
    }
    let mut stmt = conn
        .prepare("SELECT rollout_id, hostname, target_closure, wave, soak_secs, issued_at FROM dispatches")
        .map_err(sql(path, "load dispatches"))?;
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
        .map_err(sql(path, "load dispatches"))?;
    for row in rows {
        let (id, host, closure, wave, soak, issued) = row.map_err(sql(path, "load dispatches"))?;
        let bad = |what: &str| corrupt(path, format!("dispatch {id}/{host}: {what}"));
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
            r.dispatched.insert(hostname, dispatch);
        }
    }
    let mut stmt = conn.prepare("SELECT channel, closure FROM quarantined_closures").map_err(sql(path, "load q"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(sql(path, "load quarantine"))?;
    for row in rows {
        let (channel, closure) = row.map_err(sql(path, "load quarantine"))?;
        let closure = Closure::parse(&closure).map_err(|e| corrupt(path, e.to_string()))?;
        state.quarantine.entry(channel).or_default().insert(closure);
    }
    Ok(state)
}

/// The record of every manifest host before its first event: Pending with
/// the manifest's target. Stored rows override these.
pub fn pending_records(manifest: &Manifest) -> BTreeMap<Hostname, HostRecord> {
    let id = &manifest.rollout_id;
    manifest
        .hosts
        .iter()
        .map(|(h, e)| (h.clone(), HostRecord::pending(id.clone(), h.clone(), Some(e.target_closure.clone()))))
        .collect()
}

/// The current records of one rollout: stored rows over the manifest's
/// Pending records.
pub fn host_records_of(
    conn: &Connection,
    path: &Path,
    manifest: &Manifest,
) -> Result<BTreeMap<Hostname, HostRecord>, StoreError> {
    let mut out = pending_records(manifest);
    let mut stmt = conn
        .prepare_cached("SELECT record FROM host_records WHERE rollout_id = ?1")
        .map_err(sql(path, "read host records"))?;
    let rows = stmt
        .query_map(params![manifest.rollout_id.as_str()], |r| r.get::<_, String>(0))
        .map_err(sql(path, "read host records"))?;
    for row in rows {
        let record: HostRecord = serde_json::from_str(&row.map_err(sql(path, "read host records"))?)
            .map_err(|e| corrupt(path, format!("host record: {e}")))?;
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
    let mut stmt = conn
        .prepare_cached("SELECT hostname, reason, skipped_at FROM skipped_hosts WHERE rollout_id = ?1")
        .map_err(sql(path, "read skipped hosts"))?;
    let rows = stmt
        .query_map(params![id.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })
        .map_err(sql(path, "read skipped hosts"))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (host, reason, skipped_at) = row.map_err(sql(path, "read skipped hosts"))?;
        let host = Hostname::parse(&host).map_err(|e| corrupt(path, format!("skipped host {id}/{host}: {e}")))?;
        out.insert(host, SkippedHost { reason, skipped_at });
    }
    Ok(out)
}

/// Per host, the rollouts it is live in (SPEC §4 rule 7), read from the
/// cached records: the views' counterpart of [`CpState::live`].
pub fn live_rollouts(conn: &Connection, path: &Path) -> Result<HashMap<Hostname, BTreeSet<RolloutId>>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT record FROM host_records WHERE state IN ('Activating', 'Deferred', 'Soaking', 'Failed')",
        )
        .map_err(sql(path, "read live hosts"))?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql(path, "read live hosts"))?;
    let mut out: HashMap<Hostname, BTreeSet<RolloutId>> = HashMap::new();
    for row in rows {
        let record: HostRecord = serde_json::from_str(&row.map_err(sql(path, "read live hosts"))?)
            .map_err(|e| corrupt(path, format!("host record: {e}")))?;
        if record.is_live() {
            out.entry(record.hostname).or_default().insert(record.rollout_id);
        }
    }
    Ok(out)
}

/// Every rollout's manifest, in publish order.
pub fn manifests(conn: &Connection, path: &Path) -> Result<Vec<Manifest>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT payload FROM rollouts ORDER BY published_at, rollout_id")
        .map_err(sql(path, "read manifests"))?;
    let payloads: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get(0))
        .map_err(sql(path, "read manifests"))?
        .collect::<Result<_, _>>()
        .map_err(sql(path, "read manifests"))?;
    payloads.iter().map(|p| Manifest::parse(p).map_err(|e| corrupt(path, e.to_string()))).collect()
}

/// Rebuilds every host record from the event log alone (SPEC §8): a Pending
/// record from the manifest, then the logged events folded through `replay`.
pub fn rebuild_host_records(
    conn: &Connection,
    path: &Path,
) -> Result<BTreeMap<(RolloutId, Hostname), HostRecord>, StoreError> {
    let mut out = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT payload FROM rollouts").map_err(sql(path, "rebuild"))?;
    let payloads: Vec<Vec<u8>> = stmt
        .query_map([], |r| r.get(0))
        .map_err(sql(path, "rebuild"))?
        .collect::<Result<_, _>>()
        .map_err(sql(path, "rebuild"))?;
    let mut events = conn
        .prepare("SELECT event FROM event_log WHERE rollout_id = ?1 AND hostname = ?2 ORDER BY seq")
        .map_err(sql(path, "rebuild"))?;
    for payload in payloads {
        let manifest = Manifest::parse(&payload).map_err(|e| corrupt(path, e.to_string()))?;
        let policy = manifest.machine_policy();
        for (host, entry) in &manifest.hosts {
            let id = &manifest.rollout_id;
            let rows: Vec<String> = events
                .query_map(params![id.as_str(), host.as_str()], |r| r.get(0))
                .map_err(sql(path, "rebuild"))?
                .collect::<Result<_, _>>()
                .map_err(sql(path, "rebuild"))?;
            let mut evs = Vec::with_capacity(rows.len());
            for json in rows {
                let wire: OutboundEvent =
                    serde_json::from_str(&json).map_err(|e| corrupt(path, format!("event log: {e}")))?;
                evs.push(wire.to_remote().map_err(|e| corrupt(path, format!("event log: {e}")))?);
            }
            let start = HostRecord::pending(id.clone(), host.clone(), Some(entry.target_closure.clone()));
            let record = machine::replay(start, &evs, &policy)
                .map_err(|(idx, e)| corrupt(path, format!("event log of {host} in {id}, event {idx}: {e}")))?;
            out.insert((id.clone(), host.clone()), record);
        }
    }
    Ok(out)
}

/// The answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new rollout was opened.
    Created,
    /// The same manifest bytes were already published (idempotent).
    Identical,
    /// The id exists with different manifest bytes.
    Conflict,
}

/// Work for the writer. Each carries its reply channel.
#[derive(Debug)]
pub enum Command {
    Publish {
        envelope: Vec<u8>,
        payload: Vec<u8>,
        manifest: Box<Manifest>,
        reply: oneshot::Sender<Reply<PublishOutcome>>,
    },
    Ingest {
        hostname: Hostname,
        items: Vec<BatchItem>,
        reply: oneshot::Sender<Reply<Vec<EventResult>>>,
    },
    Heartbeat {
        heartbeat: Heartbeat,
        reply: oneshot::Sender<Reply<BTreeMap<RolloutId, u64>>>,
    },
    /// Re-plan every rollout (safety net; the planner also runs on change).
    Tick,
}

/// What the writer answers: the commit failed → `Err` (callers answer 503).
pub type Reply<T> = Result<T, Arc<StoreError>>;

impl Command {
    fn n_events(&self) -> usize {
        match self {
            Command::Ingest { items, .. } => items.len(),
            _ => 1,
        }
    }
}

/// A reply held back until the group's commit.
enum Pending {
    Publish(oneshot::Sender<Reply<PublishOutcome>>, PublishOutcome),
    Ingest(oneshot::Sender<Reply<Vec<EventResult>>>, Vec<EventResult>),
    Heartbeat(oneshot::Sender<Reply<BTreeMap<RolloutId, u64>>>, BTreeMap<RolloutId, u64>),
}

impl Pending {
    fn send_ok(self) {
        // A caller that went away (client disconnected) needs no answer.
        match self {
            Pending::Publish(tx, v) => drop(tx.send(Ok(v))),
            Pending::Ingest(tx, v) => drop(tx.send(Ok(v))),
            Pending::Heartbeat(tx, v) => drop(tx.send(Ok(v))),
        }
    }

    fn send_err(self, err: &Arc<StoreError>) {
        match self {
            Pending::Publish(tx, _) => drop(tx.send(Err(err.clone()))),
            Pending::Ingest(tx, _) => drop(tx.send(Err(err.clone()))),
            Pending::Heartbeat(tx, _) => drop(tx.send(Err(err.clone()))),
        }
    }
}

/// A change to the long-poll board, applied only after the commit.
enum BoardChange {
    Offer(Hostname, Dispatch),
    Withdraw(Hostname, RolloutId),
}

/// The single writer: owns the write connection and the in-memory state.
pub struct Writer {
    conn: Connection,
    path: PathBuf,
    state: CpState,
    clock: ClockHandle,
    board: Arc<Board>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("path", &self.path).finish()
    }
}

/// Statistics of the writer's life, logged at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub n_commits: u64,
    pub n_commands: u64,
    pub n_events_applied: u64,
}

impl Writer {
    /// Opens the database, loads the state and publishes the standing
    /// dispatches on the board (they survive restarts).
    pub fn open(
        path: &Path,
        clock: ClockHandle,
        board: Arc<Board>,
        counters: Arc<Counters>,
    ) -> Result<Writer, StoreError> {
        let conn = open(path)?;
        let state = load_state(&conn, path)?;
        for rollout in state.rollouts.values() {
            for (host, d) in &rollout.dispatched {
                board.offer(host, d.clone());
            }
        }
        Ok(Writer { conn, path: path.to_owned(), state, clock, board, counters })
    }

    /// Runs until every sender is dropped, then checkpoints the WAL.
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) -> WriterStats {
        let mut stats = WriterStats::default();
        // Plan once at start: a tick may have been lost in a crash.
        let mut group = vec![Command::Tick];
        loop {
            let mut n_events: usize = group.iter().map(Command::n_events).sum();
            while n_events < MAX_GROUP_EVENTS {
                match rx.try_recv() {
                    Ok(cmd) => {
                        n_events += cmd.n_events();
                        group.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            stats.n_commands += group.len() as u64;
            stats.n_events_applied += self.run_group(std::mem::take(&mut group));
            stats.n_commits += 1;
            match rx.blocking_recv() {
                Some(cmd) => group.push(cmd),
                None => break,
            }
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(db = %self.path.display(), error = %e, "WAL checkpoint at shutdown failed");
        }
        stats
    }

    /// Applies a group of commands in one transaction; answers after commit.
    fn run_group(&mut self, group: Vec<Command>) -> u64 {
        let started = std::time::Instant::now();
        let n_commands = group.len();
        let now = self.clock.now();
        let mut replies = Vec::with_capacity(group.len());
        let mut board = Vec::new();
        let mut n_applied = 0u64;
        // Elapsed at the end of: applying the commands, planning, commit.
        let mut phases = [std::time::Duration::ZERO; 3];
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.transaction().map_err(sql(&self.path, "begin"))?;
            let mut dirty: BTreeSet<RolloutId> = BTreeSet::new();
            for cmd in group {
                match cmd {
                    Command::Publish { envelope, payload, manifest, reply } => {
                        let outcome =
                            publish(&tx, &self.path, &mut self.state, &envelope, &payload, *manifest, now, &mut dirty)?;
                        replies.push(Pending::Publish(reply, outcome));
                    }
                    Command::Ingest { hostname, items, reply } => {
                        let results =
                            ingest(&tx, &self.path, &mut self.state, &hostname, &items, now, &mut dirty, &mut board)?;
                        n_applied += results.iter().filter(|r| r.status == ResultStatus::Applied).count() as u64;
                        replies.push(Pending::Ingest(reply, results));
                    }
                    Command::Heartbeat { heartbeat, reply } => {
                        let replay = heartbeat_cmd(&tx, &self.path, &self.state, &heartbeat, now)?;
                        replies.push(Pending::Heartbeat(reply, replay));
                    }
                    Command::Tick => dirty.extend(self.state.rollouts.keys().cloned()),
                }
            }
            phases[0] = started.elapsed();
            run_planner(&tx, &self.path, &mut self.state, &dirty, now, &mut board)?;
            phases[1] = started.elapsed();
            tx.commit().map_err(sql(&self.path, "commit"))?;
            phases[2] = started.elapsed();
            Ok(())
        })();
        match result {
            Ok(()) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.counters.commits.fetch_add(1, Relaxed);
                for reply in &replies {
                    if let Pending::Ingest(_, results) = reply {
                        for r in results {
                            let counter = match r.status {
                                ResultStatus::Applied => &self.counters.events_applied,
                                ResultStatus::Duplicate => &self.counters.events_duplicate,
                                ResultStatus::Rejected => &self.counters.events_rejected,
                                ResultStatus::Retry => &self.counters.events_retry,
                                ResultStatus::Gap => &self.counters.events_gap,
                            };
                            counter.fetch_add(1, Relaxed);
                        }
                    }
                }
                let mut offers = Vec::new();
                let mut withdrawals = Vec::new();
                for change in board {
                    match change {
                        BoardChange::Offer(host, d) => offers.push((host, d)),
                        BoardChange::Withdraw(host, id) => withdrawals.push((host, id)),
                    }
                }
                let n_offers = offers.len();
                self.board.apply(offers, withdrawals);
                for reply in replies {
                    reply.send_ok();
                }
                let ms = started.elapsed().as_millis();
                let [applied, planned, committed] = phases.map(|d| d.as_millis());
                let text = format!(
                    "{n_commands} commands, {n_applied} events applied, {n_offers} dispatches offered in {ms} ms \
                     (commands {applied} ms, planned by {planned} ms, committed by {committed} ms)"
                );
                if ms > SLOW_GROUP_MS {
                    tracing::warn!("slow commit: {text}");
                } else {
                    tracing::debug!("commit: {text}");
                }
                n_applied
            }
            Err(e) => {
                tracing::error!(error = %e, "transaction failed; answering 503 and reloading state from the database");
                self.counters.commit_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let err = Arc::new(e);
                for reply in replies {
                    reply.send_err(&err);
                }
                match load_state(&self.conn, &self.path) {
                    Ok(state) => self.state = state,
                    Err(e) => tracing::error!(error = %e, "reloading state failed; keeping the previous state"),
                }
                0
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn publish(
    tx: &Transaction<'_>,
    path: &Path,
    state: &mut CpState,
    envelope: &[u8],
    payload: &[u8],
    manifest: Manifest,
    now: OffsetDateTime,
    dirty: &mut BTreeSet<RolloutId>,
) -> Result<PublishOutcome, StoreError> {
    let sha = hex(&Sha256::digest(payload));
    let id = manifest.rollout_id.clone();
    if let Some(existing) = state.rollouts.get(&id) {
        return Ok(if existing.payload_sha256 == sha { PublishOutcome::Identical } else { PublishOutcome::Conflict });
    }
    let channel = id.channel().to_owned();
    // "Newer" is `Manifest::newness` (issued_at, then the byte-greater
    // ref), the order the agents use too: re-publishing old and new
    // manifests in any order ends in the same state, and an older manifest
    // never rolls the channel back (it opens superseded).
    let newer = state
        .rollouts
        .iter()
        .filter(|(other, r)| other.channel() == channel && r.manifest.newness() > manifest.newness())
        .max_by(|(_, a), (_, b)| a.manifest.newness().cmp(&b.manifest.newness()))
        .map(|(other, _)| other.clone());
    let initial = if newer.is_some() { RolloutState::Superseded } else { RolloutState::Active };
    tx.execute(
        "INSERT INTO rollouts (rollout_id, channel, envelope, payload, payload_sha256, issued_at, published_at, state,
                               current_wave, halt_reason, superseded_by, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, NULL, ?9, ?7)",
        params![
            id.as_str(),
            channel,
            envelope,
            payload,
            sha,
            ts(manifest.issued_at),
            ts(now),
            initial.as_str(),
            newer.as_ref().map(RolloutId::as_str)
        ],
    )
    .map_err(sql(path, "insert rollout"))?;
    let records = pending_records(&manifest);
    if newer.is_none() {
        let older: Vec<RolloutId> = state
            .rollouts
            .iter()
            // A completed rollout has nothing left to stop; it keeps saying
            // "completed", which tells the operator more than "superseded".
            .filter(|(other, r)| {
                other.channel() == channel && !matches!(r.state, RolloutState::Superseded | RolloutState::Completed)
            })
            .map(|(other, _)| other.clone())
            .collect();
        for old in older {
            tx.execute(
                "UPDATE rollouts SET state = 'superseded', superseded_by = ?2, updated_at = ?3 WHERE rollout_id = ?1",
                params![old.as_str(), id.as_str(), ts(now)],
            )
            .map_err(sql(path, "supersede rollout"))?;
            if let Some(r) = state.rollouts.get_mut(&old) {
                r.state = RolloutState::Superseded;
            }
            dirty.insert(old);
        }
    }
    state.rollouts.insert(
        id.clone(),
        LiveRollout {
            manifest,
            payload_sha256: sha,
            state: initial,
            current_wave: 0,
            halt_reason: None,
            records,
            dispatched: BTreeMap::new(),
            skipped: BTreeSet::new(),
        },
    );
    dirty.insert(id);
    Ok(PublishOutcome::Created)
}

/// JSON for a database column. Serialising plain data does not fail in
/// practice, but if it ever did, an empty string in the event log would
/// break every later replay: the group fails instead (503, agents retry).
fn to_json<T: serde::Serialize + ?Sized>(
    path: &Path,
    what: impl FnOnce() -> String,
    value: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode { path: path.to_owned(), what: what(), source })
}

/// A count or seq as a database integer: refused, never wrapped.
fn db_int<T: TryInto<i64> + TryInto<u64> + Copy>(path: &Path, what: &'static str, value: T) -> Result<i64, StoreError> {
    <T as TryInto<i64>>::try_into(value).map_err(|_| StoreError::OutOfRange {
        path: path.to_owned(),
        what,
        value: <T as TryInto<u64>>::try_into(value).unwrap_or(u64::MAX),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn result(status: ResultStatus, reason: Option<String>) -> EventResult {
    EventResult { status, reason, expected_seq: None }
}

#[allow(clippy::too_many_arguments)]
fn ingest(
    tx: &Transaction<'_>,
    path: &Path,
    state: &mut CpState,
    hostname: &Hostname,
    items: &[BatchItem],
    now: OffsetDateTime,
    dirty: &mut BTreeSet<RolloutId>,
    board: &mut Vec<BoardChange>,
) -> Result<Vec<EventResult>, StoreError> {
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let Some(rollout) = state.rollouts.get(&item.rollout_id) else {
            results.push(result(
                ResultStatus::Retry,
                Some(format!("rollout {} is not known here (yet); keep the event and send it again", item.rollout_id)),
            ));
            continue;
        };
        let Some(record) = rollout.records.get(hostname).cloned() else {
            results.push(result(
                ResultStatus::Rejected,
                Some(format!("host {hostname} is not in the manifest of rollout {}", item.rollout_id)),
            ));
            continue;
        };
        let event = match item.event.to_remote() {
            Ok(e) => e,
            Err(e) => {
                results.push(result(ResultStatus::Rejected, Some(format!("malformed event: {e}"))));
                continue;
            }
        };
        let policy = rollout.manifest.machine_policy();
        // The wave's soak is as binding as the target (the agent checks both
        // against the signed manifest; the CP's record knows only the target).
        let wave_soak_secs = rollout
            .manifest
            .hosts
            .get(hostname)
            .and_then(|e| rollout.manifest.waves.get(e.wave).map(|w| (e.wave, w.soak_secs)));
        match machine::step(&record, &event, &policy) {
            Ok(Outcome::Duplicate { .. }) => results.push(result(ResultStatus::Duplicate, None)),
            // Nothing stored: the agent re-sends from the expected seq.
            Ok(Outcome::Gap { expected }) => results.push(EventResult {
                status: ResultStatus::Gap,
                reason: Some(format!("seq {} arrived before seq {expected}; send from seq {expected}", event.seq)),
                expected_seq: Some(expected),
            }),
            Err(e) => results.push(result(ResultStatus::Rejected, Some(e.to_string()))),
            Ok(Outcome::Applied { record: next, effects }) => {
                if let (EventBody::Activate { soak_secs, .. }, Some((wave, expected))) = (&event.body, wave_soak_secs) {
                    if *soak_secs != expected {
                        let refused = TransitionError::Refused {
                            state: record.state,
                            event: event.name(),
                            seq: event.seq,
                            hostname: hostname.clone(),
                            rollout_id: item.rollout_id.clone(),
                            reason: format!(
                                "soak_secs {soak_secs} differs from the manifest's {expected} for wave {wave}"
                            ),
                        };
                        results.push(result(ResultStatus::Rejected, Some(refused.to_string())));
                        continue;
                    }
                }
                let event_json = to_json(
                    path,
                    || format!("event seq {} of {hostname} in {}", event.seq, item.rollout_id),
                    &item.event,
                )?;
                for effect in &effects {
                    match effect {
                        Effect::AppendEventLog { seq, body } => {
                            let seq = db_int(path, "seq", *seq)?;
                            tx.prepare_cached(
                                "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            )
                            .and_then(|mut s| {
                                s.execute(params![
                                    hostname.as_str(),
                                    item.rollout_id.as_str(),
                                    seq,
                                    item.event.kind(),
                                    event_json,
                                    ts(body.occurred_at()),
                                    ts(now)
                                ])
                            })
                            .map_err(sql(path, "append event log"))?;
                        }
                        Effect::InsertQuarantine { channel, closure } => {
                            tx.execute(
                                "INSERT OR IGNORE INTO quarantined_closures
                                     (channel, closure, rollout_id, hostname, quarantined_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5)",
                                params![
                                    channel,
                                    closure.as_str(),
                                    item.rollout_id.as_str(),
                                    hostname.as_str(),
                                    ts(event.body.occurred_at())
                                ],
                            )
                            .map_err(sql(path, "insert quarantine"))?;
                            state.quarantine.entry(channel.clone()).or_default().insert(closure.clone());
                            // Every rollout of the channel must re-check its hosts.
                            dirty.extend(state.rollouts.keys().filter(|id| id.channel() == channel).cloned());
                        }
                        Effect::RecordTransition { from, to, at } => {
                            tracing::info!(host = %hostname, rollout = %item.rollout_id, %from, %to, at = %ts(*at), "host transition");
                        }
                        // Agent-side effects never come out of a Remote event.
                        Effect::EmitOutbound { .. }
                        | Effect::FireSwitch { .. }
                        | Effect::FireRollback { .. }
                        | Effect::ResetProbes => {}
                    }
                }
                let Some(rollout) = state.rollouts.get_mut(&item.rollout_id) else { continue };
                let wave = db_int(path, "wave", rollout.manifest.hosts.get(hostname).map_or(0, |e| e.wave))?;
                let last_seq = db_int(path, "last_seq", next.last_seq)?;
                let record_json = to_json(path, || format!("the record of {hostname} in {}", item.rollout_id), &*next)?;
                tx.prepare_cached(
                    "INSERT INTO host_records (rollout_id, hostname, wave, state, last_seq, record)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (rollout_id, hostname) DO UPDATE
                         SET state = excluded.state, last_seq = excluded.last_seq, record = excluded.record",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        item.rollout_id.as_str(),
                        hostname.as_str(),
                        wave,
                        next.state.as_str(),
                        last_seq,
                        record_json
                    ])
                })
                .map_err(sql(path, "update host record"))?;
                // The ack (or rejection) ends the standing dispatch.
                if next.state != HostState::Pending && rollout.dispatched.remove(hostname).is_some() {
                    tx.execute(
                        "DELETE FROM dispatches WHERE rollout_id = ?1 AND hostname = ?2",
                        params![item.rollout_id.as_str(), hostname.as_str()],
                    )
                    .map_err(sql(path, "delete dispatch"))?;
                    board.push(BoardChange::Withdraw(hostname.clone(), item.rollout_id.clone()));
                }
                if record.state != next.state {
                    dirty.insert(item.rollout_id.clone());
                }
                let live = next.is_live();
                rollout.records.insert(hostname.clone(), *next);
                results.push(result(ResultStatus::Applied, None));
                if live != record.is_live() {
                    // The host's hold moved: every other rollout naming it
                    // re-checks (rule 7), in this same transaction.
                    state.set_live(hostname, &item.rollout_id, live);
                    dirty.extend(
                        state
                            .rollouts
                            .iter()
                            .filter(|(id, r)| **id != item.rollout_id && r.manifest.hosts.contains_key(hostname))
                            .map(|(id, _)| id.clone()),
                    );
                }
            }
        }
    }
    Ok(results)
}

/// The verdict of the last heartbeat on what a host runs (SPEC §4 rule 10).
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

fn heartbeat_cmd(
    tx: &Transaction<'_>,
    path: &Path,
    state: &CpState,
    hb: &Heartbeat,
    now: OffsetDateTime,
) -> Result<BTreeMap<RolloutId, u64>, StoreError> {
    // Compare only; a heartbeat never changes host state (the reference
    // system synthesised transitions and overwrote agents, §11 items 11, 13).
    let mut replay_from = BTreeMap::new();
    for (id, agent_last) in &hb.last_seq {
        let cp_last = state.rollouts.get(id).and_then(|r| r.records.get(&hb.hostname)).map(|r| r.last_seq);
        if let Some(cp_last) = cp_last {
            if *agent_last > cp_last {
                replay_from.insert(id.clone(), cp_last);
            }
        }
    }
    // Drift is judged only on complete knowledge: when the CP is behind the
    // agent, its records describe the past and would cry wolf.
    let expected = if replay_from.is_empty() { state.expected_closure(&hb.hostname) } else { None };
    let drift = match &expected {
        None => Drift::Unknown,
        Some((closure, _)) if *closure == hb.current_closure => Drift::InSync,
        Some(_) => Drift::Drifting,
    };
    let previous: Option<String> = tx
        .query_row("SELECT drift FROM hosts WHERE hostname = ?1", params![hb.hostname.as_str()], |r| r.get(0))
        .optional()
        .map_err(sql(path, "read drift"))?;
    if drift == Drift::Drifting && previous.as_deref() != Some(Drift::Drifting.as_str()) {
        if let Some((closure, from)) = &expected {
            tracing::warn!(host = %hb.hostname, current = %hb.current_closure, expected = %closure, rollout = %from, "drift: the host runs another closure than its records say");
        }
    } else if drift == Drift::InSync && previous.as_deref() == Some(Drift::Drifting.as_str()) {
        tracing::info!(host = %hb.hostname, current = %hb.current_closure, "drift resolved");
    }
    tx.prepare_cached(
        "INSERT INTO hosts (hostname, last_heartbeat_at, current_closure, booted_closure, agent_version, uptime_secs,
                            expected_closure, expected_from, drift)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (hostname) DO UPDATE SET last_heartbeat_at = ?2, current_closure = ?3, booted_closure = ?4,
             agent_version = ?5, uptime_secs = ?6, expected_closure = ?7, expected_from = ?8, drift = ?9",
    )
    .and_then(|mut s| {
        s.execute(params![
            hb.hostname.as_str(),
            ts(now),
            hb.current_closure.as_str(),
            hb.booted_closure.as_ref().map(Closure::as_str),
            hb.agent_version,
            // Clamped, not wrapped: shown only, and 2^63 s is not an uptime.
            i64::try_from(hb.uptime_secs).unwrap_or(i64::MAX),
            expected.as_ref().map(|(c, _)| c.as_str()),
            expected.as_ref().map(|(_, id)| id.as_str()),
            drift.as_str()
        ])
    })
    .map_err(sql(path, "record heartbeat"))?;
    Ok(replay_from)
}

fn run_planner(
    tx: &Transaction<'_>,
    path: &Path,
    state: &mut CpState,
    dirty: &BTreeSet<RolloutId>,
    now: OffsetDateTime,
    board: &mut Vec<BoardChange>,
) -> Result<(), StoreError> {
    let empty = HashSet::new();
    for id in dirty {
        let busy = match state.rollouts.get(id) {
            Some(r) if r.state != RolloutState::Completed => state.busy_elsewhere(id, &r.manifest),
            _ => continue,
        };
        let Some(rollout) = state.rollouts.get_mut(id) else { continue };
        let dispatched: BTreeSet<Hostname> = rollout.dispatched.keys().cloned().collect();
        let quarantined = state.quarantine.get(id.channel()).unwrap_or(&empty);
        let plan = planner::plan(&PlanInput {
            manifest: &rollout.manifest,
            state: rollout.state,
            current_wave: rollout.current_wave,
            halt_reason: rollout.halt_reason.as_deref(),
            records: &rollout.records,
            dispatched: &dispatched,
            quarantined,
            busy_elsewhere: &busy,
            skipped: &rollout.skipped,
        });
        // Skips and withdrawals before the rollout's new state, all in this
        // transaction: a quarantine never leaves a dispatch standing.
        for host in &plan.skip {
            let Some(entry) = rollout.manifest.hosts.get(host) else { continue };
            let reason = format!("target closure {} is quarantined on channel {}", entry.target_closure, id.channel());
            tracing::info!(rollout = %id, %host, %reason, "host skipped");
            tx.prepare_cached(
                "INSERT OR IGNORE INTO skipped_hosts (rollout_id, hostname, target_closure, reason, skipped_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![id.as_str(), host.as_str(), entry.target_closure.as_str(), reason, ts(now)])
            })
            .map_err(sql(path, "skip host"))?;
            rollout.skipped.insert(host.clone());
        }
        if plan.state != rollout.state
            || plan.current_wave != rollout.current_wave
            || plan.halt_reason != rollout.halt_reason
        {
            if plan.state != rollout.state {
                tracing::info!(rollout = %id, from = %rollout.state, to = %plan.state, reason = plan.halt_reason.as_deref().unwrap_or(""), "rollout state");
            }
            if plan.current_wave != rollout.current_wave {
                tracing::info!(rollout = %id, wave = plan.current_wave, "wave promoted");
            }
            tx.execute(
                "UPDATE rollouts SET state = ?2, current_wave = ?3, halt_reason = ?4, updated_at = ?5 WHERE rollout_id = ?1",
                params![
                    id.as_str(),
                    plan.state.as_str(),
                    db_int(path, "current_wave", plan.current_wave)?,
                    plan.halt_reason,
                    ts(now)
                ],
            )
            .map_err(sql(path, "update rollout"))?;
            rollout.state = plan.state;
            rollout.current_wave = plan.current_wave;
            rollout.halt_reason = plan.halt_reason.clone();
        }
        for host in plan.withdraw {
            tx.execute(
                "DELETE FROM dispatches WHERE rollout_id = ?1 AND hostname = ?2",
                params![id.as_str(), host.as_str()],
            )
            .map_err(sql(path, "withdraw dispatch"))?;
            rollout.dispatched.remove(&host);
            board.push(BoardChange::Withdraw(host, id.clone()));
        }
        let mut offers = Vec::with_capacity(plan.dispatch.len());
        for host in plan.dispatch {
            let Some(entry) = rollout.manifest.hosts.get(&host) else { continue };
            let wave = entry.wave;
            let soak_secs = rollout.manifest.waves.get(wave).map_or(0, |w| w.soak_secs);
            let dispatch = Dispatch {
                rollout_id: id.clone(),
                target_closure: entry.target_closure.clone(),
                wave,
                soak_secs,
                issued_at: now,
            };
            offers.push((host, dispatch));
        }
        insert_dispatches(tx, path, &offers, now)?;
        for (host, dispatch) in offers {
            rollout.dispatched.insert(host.clone(), dispatch.clone());
            board.push(BoardChange::Offer(host, dispatch));
        }
    }
    Ok(())
}

/// Dispatch rows per INSERT statement: a 10,000-host wave is stored with
/// one statement per 64 rows instead of one per row, which is what makes
/// "dispatch a whole fleet" fast (SQLite's per-statement cost dominates a
/// row this small).
const DISPATCH_ROWS_PER_INSERT: usize = 64;

fn insert_dispatches(
    tx: &Transaction<'_>,
    path: &Path,
    offers: &[(Hostname, Dispatch)],
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let issued_at = ts(now);
    for chunk in offers.chunks(DISPATCH_ROWS_PER_INSERT) {
        let rows = vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        // At most two texts per rollout (full chunks and the remainder), so
        // the statement cache keeps both prepared.
        let mut insert = tx
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO dispatches (rollout_id, hostname, target_closure, wave, soak_secs, issued_at)
                 VALUES {rows}"
            ))
            .map_err(sql(path, "insert dispatches"))?;
        let texts: Vec<[&str; 3]> =
            chunk.iter().map(|(h, d)| [d.rollout_id.as_str(), h.as_str(), d.target_closure.as_str()]).collect();
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 6);
        for ([rollout_id, host, closure], (_, d)) in texts.iter().zip(chunk) {
            values.extend([rollout_id as &dyn rusqlite::ToSql, host, closure, &d.wave, &d.soak_secs, &issued_at]);
        }
        insert.execute(values.as_slice()).map_err(sql(path, "insert dispatches"))?;
    }
    Ok(())
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
        .map_err(sql(path, "read envelope"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nixfleet-store-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("cp.db")
    }

    /// The acknowledgement contract depends on WAL + synchronous=FULL, and a
    /// fresh database is migrated to the current schema version.
    #[test]
    fn open_sets_durability_pragmas_and_migrates() {
        let path = temp_db("pragmas");
        let conn = open(&path).expect("open");
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("sync");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!((mode.as_str(), sync, version), ("wal", 2, SCHEMA_VERSION));
        drop(conn);
        open(&path).expect("re-opening a migrated database is a no-op");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// A database written by a newer nixfleet is refused, not half-read.
    #[test]
    fn newer_schema_is_refused() {
        let path = temp_db("newer");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA user_version = 99;").expect("set version");
        drop(conn);
        let err = open(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::NewerSchema { found: 99, .. }), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// A schema-1 database (before skips and drift) is migrated in place:
    /// its rows are kept, hosts start with drift "unknown", and the new
    /// table exists.
    #[test]
    fn a_schema_1_database_is_migrated_keeping_its_rows() {
        let path = temp_db("migrate2");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(&format!("BEGIN; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;")).expect("schema 1");
        conn.execute(
            "INSERT INTO hosts (hostname, last_heartbeat_at, current_closure, agent_version, uptime_secs)
             VALUES ('web-1', 't', '/nix/store/x', 'v', 1)",
            [],
        )
        .expect("host row");
        drop(conn);
        let conn = open(&path).expect("migrate");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        let row: (String, String, Option<String>) = conn
            .query_row("SELECT current_closure, drift, expected_closure FROM hosts", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("row kept");
        let n_skipped: i64 = conn.query_row("SELECT COUNT(*) FROM skipped_hosts", [], |r| r.get(0)).expect("table");
        assert_eq!((version, row, n_skipped), (2, ("/nix/store/x".into(), "unknown".into(), None), 0));
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// A value that cannot be serialised is an error naming it, never the
    /// empty string the event log used to get (the log is the replay source).
    #[test]
    fn unencodable_json_is_an_error_not_an_empty_row() {
        struct Unencodable;
        impl serde::Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no JSON for this"))
            }
        }
        let err = to_json(Path::new("/db"), || "event seq 3 of web-1".to_owned(), &Unencodable)
            .expect_err("must not produce a row");
        assert!(err.to_string().contains("event seq 3 of web-1") && err.to_string().contains("no JSON"), "{err}");
        assert_eq!(to_json(Path::new("/db"), String::new, &7u8).expect("plain data"), "7");
    }

    /// Numbers beyond SQLite's INTEGER are refused with the field's name,
    /// never wrapped to negative values.
    #[test]
    fn numbers_beyond_i64_are_refused_not_wrapped() {
        assert_eq!(db_int(Path::new("/db"), "seq", i64::MAX as u64).expect("fits"), i64::MAX);
        let err = db_int(Path::new("/db"), "seq", i64::MAX as u64 + 1).expect_err("too large");
        assert!(err.to_string().contains("seq = 9223372036854775808"), "{err}");
        assert_eq!(db_int(Path::new("/db"), "wave", 3usize).expect("fits"), 3);
    }

    /// The event log is append-only per (host, rollout, seq): a second row
    /// with the same key is refused by the database itself.
    #[test]
    fn event_log_key_is_unique() {
        let path = temp_db("unique");
        let conn = open(&path).expect("open");
        conn.execute(
            "INSERT INTO rollouts (rollout_id, channel, envelope, payload, payload_sha256, issued_at, published_at,
                                   state, current_wave, updated_at)
             VALUES ('s@r', 's', x'', x'', '', 't', 't', 'active', 0, 't')",
            [],
        )
        .expect("rollout");
        let insert = "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
                      VALUES ('h', 's@r', 1, 'k', '{}', 't', 't')";
        conn.execute(insert, []).expect("first");
        assert!(conn.execute(insert, []).is_err(), "duplicate (hostname, rollout_id, seq)");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
