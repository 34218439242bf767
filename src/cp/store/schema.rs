//! The SQLite schema and its migrations (`PRAGMA user_version`), and the
//! two ways to open the database: the writer's ([`open`], durable
//! settings, migrates) and a status reader's ([`open_reader`], query-only).

use std::path::Path;

use rusqlite::Connection;

use super::db::sql_error;
use super::StoreError;

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 4;

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
///   host runs, and the verdict of the last heartbeat (`docs/protocol.md` §3 rule 10).
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

/// Schema 3: operator actions.
/// - `rollouts.state` admits `cancelled` (`cp cancel`). SQLite cannot
///   change a CHECK in place, so the table is rebuilt (create, copy, drop,
///   rename) with foreign keys off for the migration only; the other
///   tables keep naming `rollouts`.
/// - `operator_actions`: who did what, when and why (`cp resume`,
///   `cp cancel`, `cp unquarantine`). Rollout-level facts of the CP, kept
///   apart from the event log, which stays the agents' facts alone.
const MIGRATION_3: &str = r#"
CREATE TABLE rollouts_v3 (
    rollout_id     TEXT PRIMARY KEY,
    channel        TEXT NOT NULL,
    envelope       BLOB NOT NULL,
    payload        BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL,
    issued_at      TEXT NOT NULL,
    published_at   TEXT NOT NULL,
    state          TEXT NOT NULL
                   CHECK (state IN ('active','converging','halted','completed','superseded','cancelled')),
    current_wave   INTEGER NOT NULL,
    halt_reason    TEXT,
    superseded_by  TEXT,
    updated_at     TEXT NOT NULL
);
INSERT INTO rollouts_v3 SELECT rollout_id, channel, envelope, payload, payload_sha256, issued_at, published_at,
    state, current_wave, halt_reason, superseded_by, updated_at FROM rollouts;
DROP TABLE rollouts;
ALTER TABLE rollouts_v3 RENAME TO rollouts;
CREATE INDEX rollouts_by_channel ON rollouts (channel);

CREATE TABLE operator_actions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    action     TEXT NOT NULL CHECK (action IN ('resume', 'cancel', 'unquarantine')),
    rollout_id TEXT REFERENCES rollouts (rollout_id),  -- resume, cancel
    channel    TEXT NOT NULL,
    closure    TEXT,                                   -- unquarantine
    operator   TEXT NOT NULL,                          -- the client certificate's name, or 'unauthenticated (plaintext)'
    reason     TEXT NOT NULL,
    at         TEXT NOT NULL,                          -- CP time: the operator's act happens at the CP
    detail     TEXT NOT NULL                           -- JSON: what the action found and changed
);
CREATE INDEX operator_actions_by_rollout ON operator_actions (rollout_id, id);
"#;

/// Schema 4: record checkpoints (`store::checkpoint`).
/// - `record_checkpoints`: per (host, rollout) at most one row, the host
///   record as `step` made it at `seq`, written in the transaction that
///   deleted the probe events at or below `seq` from `event_log`;
///   `compacted` counts every row those deletions removed. A database of
///   schema 3 has no compacted log, so it needs no row here.
const MIGRATION_4: &str = r#"
CREATE TABLE record_checkpoints (
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id),
    hostname   TEXT NOT NULL,
    seq        INTEGER NOT NULL,                 -- the record's last_seq
    record     TEXT NOT NULL,                    -- HostRecord JSON at seq
    compacted  INTEGER NOT NULL,                 -- event_log rows deleted so far
    at         TEXT NOT NULL,                    -- CP time of the last checkpoint
    PRIMARY KEY (rollout_id, hostname)
);
"#;

/// Prepared statements the writer keeps: its dozen fixed statements plus
/// the dispatch INSERT in each of its 64 row counts (`plan.rs`), so a plan
/// of a few dispatches never evicts the per-event statements (rusqlite's
/// default keeps 16, and each miss parses the SQL again).
const WRITER_STATEMENT_CACHE: usize = 96;

/// Opens (creating if needed) the database with the durability settings the
/// acknowledgement contract needs, and migrates it.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql_error(path, "open"))?;
    // FULL: the WAL is synced at every commit, so an `applied` answer
    // survives power loss; NORMAL would only survive a process crash.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
    )
    .map_err(sql_error(path, "set pragmas"))?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
    let version: i64 =
        conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql_error(path, "read version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema { path: path.to_owned(), found: version });
    }
    if version < 1 {
        conn.execute_batch(&format!("BEGIN; {MIGRATION_1} PRAGMA user_version = 1; COMMIT;"))
            .map_err(sql_error(path, "migrate to schema 1"))?;
    }
    if version < 2 {
        conn.execute_batch(&format!("BEGIN; {MIGRATION_2} PRAGMA user_version = 2; COMMIT;"))
            .map_err(sql_error(path, "migrate to schema 2"))?;
    }
    if version < 3 {
        // Dropping the old `rollouts` with foreign keys on would check the
        // children; the pragma is a no-op inside a transaction, so it is
        // switched around it, and the keys are checked before the commit.
        conn.execute_batch(&format!(
            "PRAGMA foreign_keys = OFF; BEGIN; {MIGRATION_3} PRAGMA user_version = 3; COMMIT; PRAGMA foreign_keys = ON;"
        ))
        .map_err(sql_error(path, "migrate to schema 3"))?;
        let broken: i64 = conn
            .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| r.get(0))
            .map_err(sql_error(path, "check foreign keys after migration 3"))?;
        if broken != 0 {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                what: format!("{broken} rows name a rollout that does not exist after migration 3"),
            });
        }
    }
    if version < 4 {
        conn.execute_batch(&format!("BEGIN; {MIGRATION_4} PRAGMA user_version = 4; COMMIT;"))
            .map_err(sql_error(path, "migrate to schema 4"))?;
    }
    Ok(conn)
}

/// Opens a read-only view connection (status routes).
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql_error(path, "open reader"))?;
    conn.execute_batch("PRAGMA query_only = 1; PRAGMA busy_timeout = 5000;")
        .map_err(sql_error(path, "reader pragmas"))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acknowledgement contract depends on WAL + synchronous=FULL, and a
    /// fresh database is migrated to the current schema version.
    #[test]
    fn open_sets_durability_pragmas_and_migrates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.db");
        let conn = open(&path).expect("open");
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("sync");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!((mode.as_str(), sync, version), ("wal", 2, SCHEMA_VERSION));
        drop(conn);
        open(&path).expect("re-opening a migrated database is a no-op");
    }

    /// A database written by a newer nixfleet is refused, not half-read.
    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("PRAGMA user_version = 99;").expect("set version");
        drop(conn);
        let err = open(&path).expect_err("must refuse");
        assert!(matches!(err, StoreError::NewerSchema { found: 99, .. }), "{err}");
    }

    /// A schema-1 database (before skips and drift) is migrated in place:
    /// its rows are kept, hosts start with drift "unknown", and the new
    /// table exists.
    #[test]
    fn a_schema_1_database_is_migrated_keeping_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.db");
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
        assert_eq!((version, row, n_skipped), (SCHEMA_VERSION, ("/nix/store/x".into(), "unknown".into(), None), 0));
    }

    /// A schema-2 database (before operator actions) is migrated in place:
    /// the rollouts table is rebuilt keeping every row and the rows of the
    /// tables naming it; afterwards `cancelled` is a valid state and a
    /// rollout id that does not exist is still refused by the foreign key.
    #[test]
    fn a_schema_2_database_is_migrated_keeping_its_rollouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(&format!(
            "PRAGMA foreign_keys = ON; BEGIN; {MIGRATION_1} {MIGRATION_2} PRAGMA user_version = 2; COMMIT;"
        ))
        .expect("schema 2");
        conn.execute(
            "INSERT INTO rollouts (rollout_id, channel, envelope, payload, payload_sha256, issued_at, published_at,
                                   state, current_wave, halt_reason, updated_at)
             VALUES ('s@r', 's', x'01', x'02', 'sha', 't', 't', 'halted', 1, 'why', 't')",
            [],
        )
        .expect("rollout");
        conn.execute(
            "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
             VALUES ('h', 's@r', 1, 'k', '{}', 't', 't')",
            [],
        )
        .expect("event");
        drop(conn);
        let conn = open(&path).expect("migrate");
        let row: (String, i64, Option<String>, Vec<u8>) = conn
            .query_row("SELECT state, current_wave, halt_reason, payload FROM rollouts", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .expect("rollout kept");
        assert_eq!(row, ("halted".into(), 1, Some("why".into()), vec![2]));
        let n_events: i64 = conn.query_row("SELECT COUNT(*) FROM event_log", [], |r| r.get(0)).expect("events");
        assert_eq!(n_events, 1);
        conn.execute("UPDATE rollouts SET state = 'cancelled'", []).expect("cancelled is a state now");
        assert!(conn.execute("UPDATE rollouts SET state = 'paused'", []).is_err(), "the CHECK still holds");
        let orphan = conn.execute(
            "INSERT INTO event_log (hostname, rollout_id, seq, kind, event, agent_at, received_at)
             VALUES ('h', 'x@y', 1, 'k', '{}', 't', 't')",
            [],
        );
        assert!(orphan.is_err(), "the event log's foreign key still names the rebuilt table");
        let n_actions: i64 =
            conn.query_row("SELECT COUNT(*) FROM operator_actions", [], |r| r.get(0)).expect("new table");
        assert_eq!(n_actions, 0);
    }

    /// The event log is unique per (host, rollout, seq): a second row
    /// with the same key is refused by the database itself.
    #[test]
    fn event_log_key_is_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cp.db");
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
    }
}
