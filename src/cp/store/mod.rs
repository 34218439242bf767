//! The control plane's durable state in SQLite, and the ONE writer that
//! changes it (one mutator; SQLite's blocking calls stay off the async
//! runtime).
//!
//! Every change (publish, ingest, heartbeat, planner tick) is a [`Command`]
//! sent over a bounded channel to a dedicated writer thread. The writer
//! drains whatever commands are ready, applies them to its in-memory
//! [`CpState`] and to the database inside ONE transaction (group commit),
//! runs the planner, commits with `synchronous=FULL`, and only then answers
//! the callers and updates the long-poll board. So an `applied` answer means
//! the event is on disk, and the agent may retire its copy
//! (`docs/protocol.md` §4: `applied`).
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
//! rebuilds them from the event log, starting from a (host, rollout)'s
//! record checkpoint where [`checkpoint`] took one.
//!
//! Layout: [`schema`] (tables, migrations, opening the file), [`db`] (the
//! one database handle and its error helpers), [`state`] (the writer's
//! in-memory projection), [`reads`] (loading and rebuilding state, the
//! tools' reads), [`status`] (the rows behind the status views and
//! metrics), [`fleet`] (fleet-wide counts in SQL), [`pages`] (the paged
//! views' reads), [`writer`] (commands, group commit, answers after
//! commit), [`group`] (what a group's transaction carries to the planner
//! and the board), and
//! what one command does inside the group's transaction: [`publish`],
//! [`ingest`], [`heartbeat`] (with the drift verdict), [`operator`]
//! (`cp resume`/`cancel`/`unquarantine`), [`plan`] (the pure
//! planner's decisions written down), and [`backup`] (`cp backup`'s online
//! copy). All SQL of the control plane is in
//! this module, so another backend would replace this module alone.

use std::path::PathBuf;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod backup;
mod checkpoint;
#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod commit_thread_tests;
#[cfg(test)]
mod writer_testkit;
mod db;
mod fleet;
mod group;
mod heartbeat;
mod ingest;
mod operator;
mod pages;
mod plan;
mod publish;
mod reads;
mod schema;
mod state;
mod status;
mod writer;

pub use backup::{backup_file, BackupError};
pub use checkpoint::{
    checkpoint_of, has_checkpoint_table, is_compactable, Checkpoint, Checkpoints, COMPACTABLE_KINDS,
    MAX_EVENTS_SINCE_CHECKPOINT,
};
pub(crate) use db::Db;
pub use fleet::{
    host_rollout_states, liveness_counts, record_counts, rollout_head, rollout_heads, unreachable_host_rows,
    wave_counts, LivenessCounts, RolloutHead,
};
pub use heartbeat::Drift;
pub use operator::{
    accepted_of, action_rows, check_reason, ActionKind, ActionOutcome, ActionRecord, OperatorRequest, Refusal,
    MAX_REASON_BYTES, UNAUTHENTICATED,
};
pub use pages::{host_records_named, host_records_page, n_skipped_pending, records_in_state, state_counts};
pub use publish::PublishOutcome;
pub use reads::{
    cached_host_records, envelope, host_records_of, live_rollouts, load_state, logged_events_of, manifests,
    rebuild_host_records, skipped_of, SkippedHost,
};
pub use schema::{open, open_reader, SCHEMA_VERSION};
pub use state::{pending_records, CpState, LiveRollout};
pub use status::{
    dispatch_times, drifting_host_rows, event_rows, host_event_rows, host_names_after, host_rows, host_rows_between,
    metric_counts, quarantine_rows, rollout_exists, rollout_row, rollout_rows, HostRow, LoggedRow, MetricCounts,
    QuarantineRow, RolloutRow,
};
pub use writer::{
    Command, Counters, Reply, Writer, WriterStats, MAX_GROUP_EVENTS, SLOW_GROUP_MS, WRITER_CHANNEL_CAPACITY,
};

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
    /// A status read panicked on its blocking thread (a bug in a view, not
    /// a storage failure and not the writer).
    #[error("database {path}: a status read panicked")]
    ReaderPanicked { path: PathBuf },
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

pub(crate) fn ts(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

pub(crate) fn parse_ts(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}
