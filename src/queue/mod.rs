//! The agent's outbound event queue: its write-ahead journal (`docs/protocol.md` §5).
//! Every event the agent's state machine emits is durable here before its
//! effects run, survives `kill -9`, power loss and reboots, is handed to
//! the drainer in enqueue order, and is never silently lost.
//!
//! # Layout
//!
//! ```text
//! {state_dir}/outbound-queue/
//!   queue.lock                      exclusive lock of the running agent
//!   high-water.json                 highest qseq and per-rollout seq ever used
//!   {qseq:020}-{host}-{rollout}-{kind}.json   pending events
//!   acked/{same name}               delivered (applied/duplicate), kept for Replay-From
//!   acked/{same name}.revived       an event revived from dead/ (JSON: was_dead, revived_at)
//!   dead/{same name}                rejected by the CP, undeliverable, or unreadable at start
//!   dead/{same name}.reason         why (JSON: cause, reason, dead_at)
//! ```
//!
//! `qseq` is the queue's own number, global across rollouts, so listing
//! order is enqueue order and two rollouts with equal `seq` never collide.
//! It is bounded by [`MAX_QSEQ`] and a rollout's seq by `wire::MAX_SEQ`: a
//! file or record beyond them is corrupt (moved to `dead/`, never used for
//! numbering), a high-water mark beyond them is refused.
//!
//! # API (what the agent runtime calls)
//!
//! - [`Queue::open`]`(state_dir, hostname, config, clock)`: takes the
//!   exclusive lock (a second open fails with [`QueueError::Locked`] naming
//!   the lock file), runs start-up recovery, loads the index.
//! - [`Queue::next_seq`]`(rollout)` / [`Queue::last_seq`]: the agent takes
//!   the seq of its next event from the queue; [`Queue::enqueue`] refuses
//!   any other seq, so seqs are never reused or skipped.
//! - [`Queue::enqueue`]`(rollout, &event) -> QueuedRef`: returns once the
//!   event is durable. From [`SOFT_MAX_PENDING_COUNT`] pending events on, a
//!   visibility event ([`is_visibility`]) is refused with
//!   [`QueueError::SoftCapReached`] (nothing written, seq not spent); the
//!   [`PENDING_RESERVE_COUNT`] above it is for decisive events only, and at
//!   [`MAX_PENDING_COUNT`] every event is refused with [`QueueError::Full`].
//! - [`Queue::pending`] in enqueue order; [`Queue::ack`]`(qseq)` after the CP
//!   answered `applied`/`duplicate`; [`Queue::reject`]`(qseq, reason)` after
//!   `rejected` (the queue moves on: no head-of-line blocking).
//! - [`Queue::events_after`]`(rollout, seq)`: pending + acked events of one
//!   rollout with seq > N, in seq order (Replay-From, and rebuilding the
//!   agent's state at start). [`Queue::rollouts`] lists what is known.
//! - [`Queue::history_from`]`(rollout, seq)`: the delivered history (acked
//!   events and dead letters the CP refused) from a seq up to the first
//!   pending event, for the re-send after a `gap` or a Replay-From;
//!   [`Queue::revive`]`(qseq)` moves a dead letter the CP applied on such a
//!   re-send back to `acked/`.
//! - [`Queue::prune_acked`]: retention of `acked/` by count and age.
//! - [`QueueView::open`]`(state_dir)`: read-only, lock-free, for
//!   `nixfleet queue ls|inspect` while an agent runs.
//!
//! # Write discipline
//!
//! New file: write `name.tmp` → fsync it → rename to `name` → fsync the
//! directory. Move (ack, reject): rename into the other folder → fsync the
//! destination folder. (A rename is one journal transaction on the file
//! systems NixOS uses, so that fsync commits both names; were the source
//! name ever to survive, open removes a pending file that also exists in
//! `acked/` or `dead/`, crash case 8.) A failed step returns an
//! error naming the path and the operation. A failed fsync is never
//! retried and trusted: the `.tmp` is removed and the next call writes the
//! whole event again under a new qseq. If the queue cannot tell what is on
//! disk after a failure and its clean-up also failed, it refuses every
//! further call ([`QueueError::Poisoned`]) until reopened, because only
//! start-up recovery reads the truth back from disk.
//!
//! # Crash cases (what a crash at each point leaves, and what open does)
//!
//! 1. Enqueue, before the rename: a `.tmp` (possibly empty or torn) or
//!    nothing. The caller never got Ok. Open removes every `.tmp`.
//! 2. Enqueue, after the rename, before the directory fsync: the event may
//!    or may not be there after power loss; if there, it is whole (its data
//!    was synced before the rename). The caller never got Ok; an event
//!    that survives is the same as a crash just after Ok: the agent
//!    rebuilds its state from the queue and its effects are idempotent.
//! 3. Enqueue returned Ok: the event is there, whole, and stays pending
//!    until acked or rejected.
//! 4. Ack, before the fsync of `acked/`: the event is in `acked/` or still
//!    pending (rename is atomic). If still pending it is sent again and the
//!    CP answers `duplicate`.
//! 5. Ack returned Ok: the event is in `acked/` and is never sent again.
//! 6. Reject: the reason sidecar is written first (tmp, fsync, rename,
//!    fsync of `dead/`), then the event moves. A crash between leaves a
//!    sidecar without its event (harmless, overwritten when the CP rejects
//!    the re-sent event), never an event in `dead/` without its reason
//!    (the restart rebuild ignores such an event, which would leave a hole
//!    in its rollout's history). Reject returned Ok: both are there.
//! 7. Prune: `high-water.json` is written durably (tmp, fsync, rename,
//!    fsync) BEFORE any acked file is removed, so a pruned qseq or seq can
//!    never be handed out again, whichever removals survive.
//! 8. A file that fails to parse or whose checksum does not match (bit rot,
//!    a hand edit; crashes cannot produce one, see 1 and 2) is moved to
//!    `dead/` at open with the parse error as its reason; the rest of the
//!    queue drains. A same-name copy in both pending and `acked/` or
//!    `dead/` (not producible by an atomic rename, handled anyway) is
//!    removed from pending: the move had happened.
//! 9. The next qseq is one more than the highest qseq in any folder
//!    (corrupt files included, by name) or in `high-water.json`; the last
//!    seq of a rollout is the highest among pending, acked and dead records
//!    and `high-water.json`. Names and records beyond [`MAX_QSEQ`] /
//!    `wire::MAX_SEQ` do not count (a name of u64::MAX used to wrap the
//!    numbering to 0).
//! 10. Revive (dead → acked): the `.revived` note is written durably first,
//!     then the event is renamed into `acked/` and `acked/` is fsynced, then
//!     the old reason is removed. At every point the event is in `dead/` with
//!     its reason or in `acked/` (rename is atomic), so the restart rebuild
//!     always sees it; a retry after a rename whose fsync failed finds it in
//!     `acked/` and completes.
//! 11. Leftovers of 6 and 10: a `.reason` in `dead/` without its event, or a
//!     `.revived` note in `acked/` without its event, is removed at open.
//! 12. Write-back ([`Queue::write_back`], the restart rebuild of a rotted
//!     record, see 8): the rebuilt record is written pending under the
//!     rotted file's name (tmp, fsync, rename, fsync), then the corrupt copy
//!     and its reason are removed from `dead/` and `dead/` is fsynced. A
//!     crash in between leaves the name in both folders; open drops the
//!     pending copy (8), and the rebuild writes it back again.
//!
//! Known limit: an event file damaged after it was durable (bit rot) moves
//! to `dead/` and its seq is no longer known; if it was the last event of
//! its rollout, that seq can be handed out again.

mod error;
mod files;
mod high_water;
mod history;
mod open;
pub mod record;
mod retention;
pub mod storage;
pub mod view;
mod write;
mod write_back;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use time::Duration;

use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::wire::OutboundEvent;

use error::io_err;
pub use error::{HighWaterError, QueueError, RecordCheckError};
use high_water::HighWater;
pub use history::{first_missing_seq, HistoryEvent};
pub use record::{DeadCause, DeadReason, QueuedEvent, RecordError, RecordHeader, RevivedNote};
pub use storage::{RealStorage, Storage};
pub use view::{Counts, EntryState, InspectError, Inspected, QueueView, ViewEntry, ViewError};

/// The queue folder inside the agent's state dir.
pub const QUEUE_DIR: &str = "outbound-queue";
pub const ACKED_DIR: &str = "acked";
pub const DEAD_DIR: &str = "dead";
pub const LOCK_FILE: &str = "queue.lock";
pub const HIGH_WATER_FILE: &str = "high-water.json";

/// Acked events kept at most (oldest whole rollouts pruned first): a
/// rollout yields tens to hundreds of events, so this holds the history of
/// many rollouts for Replay-From, while bounding the folder to ~10 MB and
/// the start-up scan to well under a second. The rollout of the newest
/// event is never pruned, so one huge rollout can exceed this.
pub const MAX_ACKED_COUNT: usize = 10_000;
/// Acked rollouts whose newest event is older than this are pruned even
/// under the count: a month covers restoring the CP database from a
/// backup, after which Replay-From rebuilds it from the agents' queues.
pub const MAX_ACKED_AGE: Duration = Duration::days(30);
/// Pending events at which VISIBILITY events (see [`is_visibility`]:
/// probe results, first observations, activation started, topology) are
/// refused with [`QueueError::SoftCapReached`], so the reducer can skip or
/// coalesce them without blocking. A host emits tens of events per rollout,
/// so this is weeks of a dead control plane; what arrives after it is
/// mostly a steady stream of probe results, and the reserve above keeps
/// room for the events that decide something.
pub const SOFT_MAX_PENDING_COUNT: usize = 100_000;
/// Pending events above the soft cap that only DECISIVE events (every kind
/// that is not a visibility event: dispatch ack or refusal, activation
/// outcome, failure clock, failure, rollback outcome, convergence) may use,
/// so that after a long control-plane outage the agent can still record a
/// failure and roll back. A rollout emits fewer than ten decisive events,
/// so this is a thousand rollouts' worth.
pub const PENDING_RESERVE_COUNT: usize = 10_000;
/// Pending events at most: at this hard limit `enqueue` fails with
/// [`QueueError::Full`] for every event, and the agent does not apply the
/// transition (it retries and reports). It bounds the memory of the
/// in-memory index (~1 KiB per event, ~110 MB at the limit).
pub const MAX_PENDING_COUNT: usize = SOFT_MAX_PENDING_COUNT + PENDING_RESERVE_COUNT;
/// The largest qseq the queue hands out or accepts from disk. A million
/// events a second would take 290,000 years to reach it, so a file name or
/// record beyond it can only come from damage or a hand edit: such a file
/// is moved to `dead/` and never used for numbering (a name of u64::MAX
/// used to wrap the numbering to 0, after which pending events vanished and
/// qseqs were reused). It equals `wire::MAX_SEQ`, so both numbers fit the
/// signed 64-bit integers of SQLite and most JSON tools, and `+ 1` never
/// overflows.
pub const MAX_QSEQ: u64 = i64::MAX as u64;

/// Limits of one queue; the defaults are the constants above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub acked_max_count: usize,
    pub acked_max_age: Duration,
    /// Visibility events are refused from this many pending events on.
    pub pending_soft_max_count: usize,
    /// Every event is refused from this many pending events on (the soft
    /// cap plus the reserve for decisive events).
    pub pending_max_count: usize,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            acked_max_count: MAX_ACKED_COUNT,
            acked_max_age: MAX_ACKED_AGE,
            pending_soft_max_count: SOFT_MAX_PENDING_COUNT,
            pending_max_count: MAX_PENDING_COUNT,
        }
    }
}

/// Whether an event only makes the host's progress visible (probe results,
/// a probe's first observation, the switch having started, the declared
/// probe topology), as opposed to deciding something. Visibility events are
/// the ones refused at the soft cap ([`SOFT_MAX_PENDING_COUNT`]); the match
/// is exhaustive so a new event kind must be classified here.
pub fn is_visibility(event: &OutboundEvent) -> bool {
    use crate::wire::WireEventBody as B;
    match &event.body {
        B::ProbeResult { .. } | B::ProbeObservedFirst { .. } | B::ActivationStarted { .. } => true,
        B::ProbeTopologyDeclared { .. } => true,
        B::DispatchAck { .. }
        | B::ActivationCompleted { .. }
        | B::ActivationDeferred { .. }
        | B::ActivationFailed { .. }
        | B::ProbeFailureFirst { .. }
        | B::Failed { .. }
        | B::RollbackComplete { .. }
        | B::RollbackFailed { .. }
        | B::DispatchRejected { .. }
        | B::Converged { .. } => false,
    }
}

/// A dead letter in the queue's index (its event is read from disk when
/// needed: dead letters are rare and re-sent rarely).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeadEntry {
    rollout_id: RolloutId,
    seq: u64,
    name: String,
}

/// Where an event landed: its qseq, its seq and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRef {
    pub qseq: u64,
    pub seq: u64,
    pub path: PathBuf,
}

/// What start-up recovery did, for the agent's start-up log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub tmp_removed: usize,
    /// (file name, reason) of every file moved to `dead/`.
    pub moved_to_dead: Vec<(String, String)>,
    pub pending: usize,
    pub acked: usize,
}

/// The agent's queue: the only writer of `{state_dir}/outbound-queue/`.
#[derive(Debug)]
pub struct Queue {
    storage: Box<dyn Storage>,
    state_dir: PathBuf,
    root: PathBuf,
    acked_dir: PathBuf,
    dead_dir: PathBuf,
    hostname: Hostname,
    config: QueueConfig,
    clock: ClockHandle,
    next_qseq: u64,
    pending: BTreeMap<u64, QueuedEvent>,
    acked: BTreeMap<u64, QueuedEvent>,
    /// Rollouts with a dead letter whose header reads: their history
    /// includes it (the agent applied a rejected event before sending), so
    /// retention never prunes them.
    dead_rollouts: BTreeSet<RolloutId>,
    /// Dead letters that are part of their rollout's history (rejected or
    /// undeliverable, record readable, reason beside it), by qseq: what a
    /// gap or Replay-From re-sends besides acked events.
    dead: BTreeMap<u64, DeadEntry>,
    /// Acked events that were revived from `dead/` (they have a
    /// `.revived` note beside them in `acked/`).
    revived: BTreeSet<u64>,
    last_seq: BTreeMap<RolloutId, u64>,
    high_water: HighWater,
    poisoned: Option<String>,
    recovery: RecoveryReport,
    /// Held for the queue's lifetime; the OS drops the lock when the
    /// process dies, so a `kill -9` never leaves a stale lock.
    _lock: Option<File>,
}

impl Queue {
    /// The queue folder (`{state_dir}/outbound-queue`).
    pub fn dir(&self) -> &Path {
        &self.root
    }

    pub fn hostname(&self) -> &Hostname {
        &self.hostname
    }

    /// What start-up recovery found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The highest seq ever queued for a rollout (0 if none).
    pub fn last_seq(&self, rollout_id: &RolloutId) -> u64 {
        self.last_seq.get(rollout_id).copied().unwrap_or(0)
    }

    /// The seq the next event of this rollout must carry.
    pub fn next_seq(&self, rollout_id: &RolloutId) -> u64 {
        self.last_seq(rollout_id) + 1
    }

    /// Every rollout the queue has seen (including pruned ones) with its
    /// last seq.
    pub fn rollouts(&self) -> Vec<(RolloutId, u64)> {
        self.last_seq.iter().map(|(r, s)| (r.clone(), *s)).collect()
    }

    /// The qseq the next enqueue will use.
    pub fn next_qseq(&self) -> u64 {
        self.next_qseq
    }

    /// Why the queue refuses every call, if it does ([`QueueError::Poisoned`]).
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The last seq of every rollout the queue has seen.
    pub fn last_seqs(&self) -> &BTreeMap<RolloutId, u64> {
        &self.last_seq
    }

    fn check_poisoned(&self) -> Result<(), QueueError> {
        match &self.poisoned {
            Some(why) => Err(QueueError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }
}
