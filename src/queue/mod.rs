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

pub mod record;
pub mod storage;
pub mod view;
mod write_back;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::wire::{OutboundEvent, MAX_SEQ};

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

/// One event of a rollout's delivered history, as [`Queue::history_from`]
/// returns it for a re-send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEvent {
    pub queued: QueuedEvent,
    /// In `dead/` (a dead letter that is part of the history), else acked.
    pub dead: bool,
}

/// The first seq from `from` on that `history` (as [`Queue::history_from`]
/// returns it, in seq order) does not hold: a re-send can cover the seqs
/// before it and no more. The drain worker and the simulator both decide
/// "re-send" or "unavailable" by comparing it with the first pending seq.
pub fn first_missing_seq(history: &[HistoryEvent], from: u64) -> u64 {
    let mut want = from;
    for h in history {
        if h.queued.seq() != want {
            break;
        }
        want += 1;
    }
    want
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

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record file that does not decode (bad JSON, checksum mismatch).
    #[error("corrupt record {}: {source}", path.display())]
    Corrupt { path: PathBuf, source: record::RecordError },
    #[error("another process holds the queue lock {} (only one nixfleet agent may use a state dir)", path.display())]
    Locked { path: PathBuf },
    #[error("{}: {source}; remove or repair it by hand (it guards against reusing event numbers)", path.display())]
    HighWaterCorrupt { path: PathBuf, source: HighWaterError },
    #[error(
        "event for rollout {rollout_id} has seq {got}, the queue expects {expected} (seqs are never reused or skipped)"
    )]
    SeqOutOfOrder { rollout_id: RolloutId, expected: u64, got: u64 },
    #[error("event for host {got} cannot go into the queue of host {expected}")]
    WrongHost { expected: Hostname, got: Hostname },
    #[error("queue full: {pending} pending events (limit {max}); the control plane has not acknowledged events for a long time")]
    Full { pending: usize, max: usize },
    /// A visibility event refused at the soft cap: nothing was written; the
    /// caller may skip or coalesce it (decisive events still have room).
    #[error("visibility event {kind} not queued: {pending} pending events reached the soft cap {soft_max} (the rest is kept for decisive events); the control plane has not acknowledged events for a long time")]
    SoftCapReached { kind: &'static str, pending: usize, soft_max: usize },
    #[error("numbers exhausted: the next {what} would exceed {max}")]
    Exhausted { what: &'static str, max: u64 },
    #[error("qseq {qseq} is not a dead event of this queue")]
    NotDead { qseq: u64 },
    #[error("qseq {qseq} is not a pending event")]
    NotPending { qseq: u64 },
    /// [`Queue::write_back`] of an event whose record did not rot (no
    /// unreadable `dead/{name}`, or its seq is held by a readable event).
    #[error("dead/{name} is not an unreadable record whose seq is free; nothing written back")]
    NotRotted { name: String },
    #[error("queue stopped after an unrecoverable write failure ({0}); reopen it to recover from disk")]
    Poisoned(String),
}

/// Why `high-water.json` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HighWaterError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("unknown format {0}")]
    Format(u32),
    #[error("checksum mismatch: file says {stored}, content hashes to {computed}")]
    Checksum { stored: String, computed: String },
    #[error("qseq {0} is beyond the queue's bound {MAX_QSEQ}")]
    QseqBeyondBound(u64),
    #[error("seq {seq} of rollout {rollout_id} is beyond the wire's bound {MAX_SEQ}")]
    SeqBeyondBound { rollout_id: RolloutId, seq: u64 },
}

/// Why a record that decodes is still not this queue's event (it goes to
/// `dead/` at start with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordCheckError {
    #[error(transparent)]
    Record(#[from] record::RecordError),
    #[error("belongs to host {found}, this queue is host {queue}")]
    OtherHost { found: Hostname, queue: Hostname },
    #[error("qseq {0} is beyond the queue's bound {MAX_QSEQ} (only damage or a hand edit makes one)")]
    QseqBeyondBound(u64),
    #[error("seq {0} is outside 1..={MAX_SEQ}")]
    SeqOutOfRange(u64),
    #[error("record qseq {0} does not match its file name")]
    NameMismatch(u64),
    #[error("a second event with seq {seq} of rollout {rollout_id}")]
    SecondSeq { rollout_id: RolloutId, seq: u64 },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> QueueError + 'a {
    move |source| QueueError::Io { op, path: path.to_owned(), source }
}

/// The highest numbers ever used, persisted before pruning (crash case 7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct HighWater {
    qseq: u64,
    seqs: BTreeMap<RolloutId, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HighWaterOnDisk {
    format: u32,
    high_water: HighWater,
    checksum: String,
}

impl HighWater {
    fn encode(&self) -> Vec<u8> {
        let checksum = record::sha256_tagged(&serde_json::to_vec(self).expect("high water serialises"));
        let on_disk = HighWaterOnDisk { format: record::RECORD_FORMAT, high_water: self.clone(), checksum };
        let mut bytes = serde_json::to_vec(&on_disk).expect("high water serialises");
        bytes.push(b'\n');
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<HighWater, HighWaterError> {
        let on_disk: HighWaterOnDisk =
            serde_json::from_slice(bytes).map_err(|e| HighWaterError::Json(e.to_string()))?;
        if on_disk.format != record::RECORD_FORMAT {
            return Err(HighWaterError::Format(on_disk.format));
        }
        let computed = record::sha256_tagged(&serde_json::to_vec(&on_disk.high_water).expect("high water serialises"));
        if computed != on_disk.checksum {
            return Err(HighWaterError::Checksum { stored: on_disk.checksum, computed });
        }
        let hw = on_disk.high_water;
        if hw.qseq > MAX_QSEQ {
            return Err(HighWaterError::QseqBeyondBound(hw.qseq));
        }
        if let Some((rollout_id, seq)) = hw.seqs.iter().find(|(_, seq)| **seq > MAX_SEQ) {
            return Err(HighWaterError::SeqBeyondBound { rollout_id: rollout_id.clone(), seq: *seq });
        }
        Ok(hw)
    }
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
    dead_rollouts: std::collections::BTreeSet<RolloutId>,
    /// Dead letters that are part of their rollout's history (rejected or
    /// undeliverable, record readable, reason beside it), by qseq: what a
    /// gap or Replay-From re-sends besides acked events.
    dead: BTreeMap<u64, DeadEntry>,
    /// Acked events that were revived from `dead/` (they have a
    /// `.revived` note beside them in `acked/`).
    revived: std::collections::BTreeSet<u64>,
    last_seq: BTreeMap<RolloutId, u64>,
    high_water: HighWater,
    poisoned: Option<String>,
    recovery: RecoveryReport,
    /// Held for the queue's lifetime; the OS drops the lock when the
    /// process dies, so a `kill -9` never leaves a stale lock.
    _lock: Option<File>,
}

impl Queue {
    /// Opens the queue of `state_dir` on the real file system: creates the
    /// folders, takes the exclusive lock, and runs start-up recovery.
    pub fn open(
        state_dir: &Path,
        hostname: Hostname,
        config: QueueConfig,
        clock: ClockHandle,
    ) -> Result<Queue, QueueError> {
        let root = state_dir.join(QUEUE_DIR);
        std::fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(QueueError::Locked { path: lock_path }),
            Err(TryLockError::Error(source)) => return Err(QueueError::Io { op: "lock", path: lock_path, source }),
        }
        let mut queue = Queue::open_with_storage(Box::new(RealStorage), state_dir, hostname, config, clock)?;
        queue._lock = Some(lock);
        Ok(queue)
    }

    /// Opens with any storage and without the process lock: for tests
    /// through the storage seam, and for callers that lock on their own.
    pub fn open_with_storage(
        storage: Box<dyn Storage>,
        state_dir: &Path,
        hostname: Hostname,
        config: QueueConfig,
        clock: ClockHandle,
    ) -> Result<Queue, QueueError> {
        let root = state_dir.join(QUEUE_DIR);
        let mut queue = Queue {
            storage,
            state_dir: state_dir.to_owned(),
            acked_dir: root.join(ACKED_DIR),
            dead_dir: root.join(DEAD_DIR),
            root,
            hostname,
            config,
            clock,
            next_qseq: 1,
            pending: BTreeMap::new(),
            acked: BTreeMap::new(),
            dead_rollouts: std::collections::BTreeSet::new(),
            dead: BTreeMap::new(),
            revived: std::collections::BTreeSet::new(),
            last_seq: BTreeMap::new(),
            high_water: HighWater::default(),
            poisoned: None,
            recovery: RecoveryReport::default(),
            _lock: None,
        };
        queue.recover()?;
        Ok(queue)
    }

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

    /// Writes one event durably (write-ahead: call before applying its
    /// effects). The event's seq must be [`Queue::next_seq`] of its rollout.
    pub fn enqueue(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<QueuedRef, QueueError> {
        self.check_poisoned()?;
        let expected = self.next_seq(rollout_id);
        if expected > MAX_SEQ {
            return Err(QueueError::Exhausted { what: "seq", max: MAX_SEQ });
        }
        if event.seq != expected {
            return Err(QueueError::SeqOutOfOrder { rollout_id: rollout_id.clone(), expected, got: event.seq });
        }
        if self.pending.len() >= self.config.pending_max_count {
            return Err(QueueError::Full { pending: self.pending.len(), max: self.config.pending_max_count });
        }
        if self.pending.len() >= self.config.pending_soft_max_count && is_visibility(event) {
            return Err(QueueError::SoftCapReached {
                kind: event.kind(),
                pending: self.pending.len(),
                soft_max: self.config.pending_soft_max_count,
            });
        }
        if self.next_qseq > MAX_QSEQ {
            return Err(QueueError::Exhausted { what: "qseq", max: MAX_QSEQ });
        }
        // The number is spent whatever happens next: a failed attempt may
        // have left a file under it that only recovery will see.
        let qseq = self.next_qseq;
        self.next_qseq += 1;
        let queued = QueuedEvent {
            qseq,
            hostname: self.hostname.clone(),
            rollout_id: rollout_id.clone(),
            created_at: self.clock.now().to_offset(time::UtcOffset::UTC),
            event: event.clone(),
        };
        let path = self.root.join(queued.file_name());
        let root = self.root.clone();
        self.write_durably(&root, &path, &record::encode(&queued))?;
        self.last_seq.insert(rollout_id.clone(), event.seq);
        self.pending.insert(qseq, queued);
        Ok(QueuedRef { qseq, seq: event.seq, path })
    }

    /// Pending events in enqueue order.
    pub fn pending(&self) -> Vec<QueuedEvent> {
        self.pending.values().cloned().collect()
    }

    /// At most `max` pending events from the head, in enqueue order (one
    /// batch for the drainer).
    pub fn pending_head(&self, max: usize) -> Vec<QueuedEvent> {
        self.pending.values().take(max).cloned().collect()
    }

    /// Acked events still kept, in enqueue order.
    pub fn acked(&self) -> Vec<QueuedEvent> {
        self.acked.values().cloned().collect()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn acked_len(&self) -> usize {
        self.acked.len()
    }

    /// Marks a pending event delivered (`applied` or `duplicate`): moves it
    /// to `acked/`. Acking an already acked event is Ok.
    pub fn ack(&mut self, qseq: u64) -> Result<(), QueueError> {
        self.check_poisoned()?;
        if self.acked.contains_key(&qseq) {
            return Ok(());
        }
        let name = self.pending.get(&qseq).ok_or(QueueError::NotPending { qseq })?.file_name();
        let (root, acked_dir) = (self.root.clone(), self.acked_dir.clone());
        self.move_durably(&root, &acked_dir, &name)?;
        let queued = self.pending.remove(&qseq).expect("checked above, and &mut self excludes other callers");
        self.acked.insert(qseq, queued);
        Ok(())
    }

    /// Marks a pending event rejected by the control plane: moves it to
    /// `dead/` with the reason beside it, so later events are not blocked.
    pub fn reject(&mut self, qseq: u64, reason: &str) -> Result<(), QueueError> {
        self.check_poisoned()?;
        let name = self.pending.get(&qseq).ok_or(QueueError::NotPending { qseq })?.file_name();
        let dead_reason = DeadReason::new(DeadCause::Rejected, reason, self.clock.now());
        let (root, dead_dir) = (self.root.clone(), self.dead_dir.clone());
        self.write_dead_reason(&name, &dead_reason)?;
        self.move_durably(&root, &dead_dir, &name)?;
        if let Some(queued) = self.pending.remove(&qseq) {
            let entry = DeadEntry { rollout_id: queued.rollout_id.clone(), seq: queued.seq(), name };
            self.dead.insert(qseq, entry);
            self.dead_rollouts.insert(queued.rollout_id);
        }
        Ok(())
    }

    /// Moves a dead letter back to `acked/` after the control plane
    /// applied it on a re-send (after a database loss the CP needs the
    /// whole history, and the agent applied this event before sending it).
    /// A `.revived` note with the old reason goes beside it, so `queue ls`
    /// shows what happened. Reviving an event already acked is Ok.
    ///
    /// Order (crash case 10): the note (tmp, fsync, rename, fsync
    /// `acked/`), then the event's rename into `acked/` and the fsync of
    /// `acked/`, then the removal of the old reason. The event is in `dead/`
    /// with its reason or in `acked/` at every point; a leftover note or
    /// reason without its event is removed at open.
    pub fn revive(&mut self, qseq: u64) -> Result<(), QueueError> {
        self.check_poisoned()?;
        if self.acked.contains_key(&qseq) {
            return Ok(());
        }
        let entry = self.dead.get(&qseq).ok_or(QueueError::NotDead { qseq })?.clone();
        let (acked_dir, dead_dir) = (self.acked_dir.clone(), self.dead_dir.clone());
        // A retry after a rename that happened but whose fsync failed finds
        // the event in acked/ already.
        let queued = match self.read_dead(&entry.name) {
            Err(QueueError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let path = acked_dir.join(&entry.name);
                let bytes = self.storage.read_file(&path).map_err(io_err("read", &path))?;
                record::decode(&bytes).map_err(|source| QueueError::Corrupt { path, source })?
            }
            other => other?,
        };
        let reason_path = dead_dir.join(format!("{}{}", entry.name, record::REASON_SUFFIX));
        let was_dead = match self.storage.read_file(&reason_path) {
            Ok(bytes) => DeadReason::decode(&bytes).ok(),
            Err(_) => None,
        }
        .unwrap_or_else(|| DeadReason::new(DeadCause::Rejected, "(reason unreadable)", self.clock.now()));
        let note = RevivedNote { was_dead, revived_at: self.clock.now() };
        let note_path = acked_dir.join(format!("{}{}", entry.name, record::REVIVED_SUFFIX));
        self.write_durably(&acked_dir, &note_path, &note.encode())?;
        self.move_durably(&dead_dir, &acked_dir, &entry.name)?;
        self.dead.remove(&qseq);
        self.acked.insert(qseq, queued);
        self.revived.insert(qseq);
        // The reason is now a leftover: a failure here is reported, but the
        // event is revived (a retry answers Ok) and open removes the reason.
        match self.storage.remove_file(&reason_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(QueueError::Io { op: "remove", path: reason_path, source }),
        }
        self.storage.fsync_dir(&dead_dir).map_err(io_err("fsync directory", &dead_dir))
    }

    /// Reads and decodes a file of `dead/`.
    fn read_dead(&self, name: &str) -> Result<QueuedEvent, QueueError> {
        let path = self.dead_dir.join(name);
        let bytes = self.storage.read_file(&path).map_err(io_err("read", &path))?;
        record::decode(&bytes).map_err(|source| QueueError::Corrupt { path, source })
    }

    /// The seq of the oldest pending event of a rollout, if any.
    pub fn first_pending_seq(&self, rollout_id: &RolloutId) -> Option<u64> {
        self.pending.values().filter(|q| &q.rollout_id == rollout_id).map(QueuedEvent::seq).min()
    }

    /// The delivered part of a rollout's history from `from_seq` on, in
    /// seq order: acked events and dead letters (re-sent after a gap or a
    /// Replay-From), up to the rollout's first pending event (those the
    /// drainer sends in its own order). A seq that is missing here (pruned,
    /// or unreadable) simply does not appear: the caller checks that the
    /// events run without a hole from `from_seq`. Dead events are read from
    /// disk; one that no longer reads is left out.
    pub fn history_from(&self, rollout_id: &RolloutId, from_seq: u64) -> Vec<HistoryEvent> {
        let below = self.first_pending_seq(rollout_id).unwrap_or(u64::MAX);
        let in_range = |r: &RolloutId, seq: u64| r == rollout_id && seq >= from_seq && seq < below;
        let mut out: Vec<HistoryEvent> = self
            .acked
            .values()
            .filter(|q| in_range(&q.rollout_id, q.seq()))
            .map(|q| HistoryEvent { queued: q.clone(), dead: false })
            .collect();
        for entry in self.dead.values().filter(|d| in_range(&d.rollout_id, d.seq)) {
            match self.read_dead(&entry.name) {
                Ok(queued) => out.push(HistoryEvent { queued, dead: true }),
                Err(e) => tracing::warn!(error = %e, "a dead letter no longer reads; left out of the re-send"),
            }
        }
        out.sort_by_key(|h| (h.queued.seq(), h.queued.qseq));
        out
    }

    /// Dead letters of the history index: (qseq, rollout, seq), for tests
    /// and tools.
    pub fn dead_history(&self) -> Vec<(u64, RolloutId, u64)> {
        self.dead.iter().map(|(q, d)| (*q, d.rollout_id.clone(), d.seq)).collect()
    }

    /// Why the queue refuses every call, if it does ([`QueueError::Poisoned`]).
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// The last seq of every rollout the queue has seen.
    pub fn last_seqs(&self) -> &BTreeMap<RolloutId, u64> {
        &self.last_seq
    }

    /// Pending and acked events of one rollout with seq > `after_seq`, in
    /// seq order: what Replay-From re-sends, and what the agent replays to
    /// rebuild its state (`after_seq` = 0).
    pub fn events_after(&self, rollout_id: &RolloutId, after_seq: u64) -> Vec<QueuedEvent> {
        let mut events: Vec<QueuedEvent> = self
            .pending
            .values()
            .chain(self.acked.values())
            .filter(|q| &q.rollout_id == rollout_id && q.seq() > after_seq)
            .cloned()
            .collect();
        events.sort_by_key(|q| (q.seq(), q.qseq));
        events
    }

    /// Removes acked events past the retention limits, whole rollouts at a
    /// time (oldest first), so a rollout is either fully replayable or not
    /// at all. Never prunes a rollout with pending events, with a dead letter
    /// (the agent's rebuild replays rejected events too, so its history
    /// would come back with a hole), or the rollout of the newest event.
    /// Returns how many events were removed.
    pub fn prune_acked(&mut self) -> Result<usize, QueueError> {
        self.check_poisoned()?;
        let doomed = self.prune_plan();
        if doomed.is_empty() {
            return Ok(0);
        }
        // Crash case 7: the high-water mark first, durably.
        let high_water = HighWater { qseq: self.next_qseq - 1, seqs: self.last_seq.clone() };
        let (root, path) = (self.root.clone(), self.root.join(HIGH_WATER_FILE));
        self.write_durably(&root, &path, &high_water.encode())?;
        self.high_water = high_water;
        // The first event of each doomed rollout goes first, durably: from
        // then on a crash can leave only a tail of its history, which the
        // rebuild treats as pruned, never a history with a hole.
        // Within a rollout seq grows with qseq, so its first event is its
        // lowest doomed qseq.
        let mut first_of: BTreeMap<&RolloutId, u64> = BTreeMap::new();
        for qseq in &doomed {
            first_of.entry(&self.acked[qseq].rollout_id).and_modify(|f| *f = (*f).min(*qseq)).or_insert(*qseq);
        }
        let firsts: std::collections::BTreeSet<u64> = first_of.into_values().collect();
        let acked_dir = self.acked_dir.clone();
        let (firsts, rest): (Vec<u64>, Vec<u64>) = doomed.into_iter().partition(|q| firsts.contains(q));
        let mut removed = 0;
        for batch in [firsts, rest] {
            for qseq in batch {
                let name = self.acked[&qseq].file_name();
                let path = self.acked_dir.join(&name);
                match self.storage.remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(QueueError::Io { op: "remove", path, source }),
                }
                self.acked.remove(&qseq);
                if self.revived.remove(&qseq) {
                    // Its note goes with it (a leftover is removed at open).
                    let note = self.acked_dir.join(format!("{name}{}", record::REVIVED_SUFFIX));
                    match self.storage.remove_file(&note) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => return Err(QueueError::Io { op: "remove", path: note, source }),
                    }
                }
                removed += 1;
            }
            self.storage.fsync_dir(&acked_dir).map_err(io_err("fsync directory", &acked_dir))?;
        }
        Ok(removed)
    }

    /// The acked qseqs retention removes, per the rules of `prune_acked`.
    fn prune_plan(&self) -> Vec<u64> {
        struct Group {
            newest_qseq: u64,
            newest_at: OffsetDateTime,
            qseqs: Vec<u64>,
        }
        let newest_rollout =
            self.pending.values().chain(self.acked.values()).max_by_key(|q| q.qseq).map(|q| q.rollout_id.clone());
        let mut groups: BTreeMap<&RolloutId, Group> = BTreeMap::new();
        for q in self.acked.values() {
            let group = groups.entry(&q.rollout_id).or_insert(Group {
                newest_qseq: 0,
                newest_at: q.created_at,
                qseqs: Vec::new(),
            });
            group.newest_qseq = group.newest_qseq.max(q.qseq);
            group.newest_at = group.newest_at.max(q.created_at);
            group.qseqs.push(q.qseq);
        }
        let with_pending: std::collections::BTreeSet<&RolloutId> =
            self.pending.values().map(|q| &q.rollout_id).collect();
        let mut candidates: Vec<(&RolloutId, Group)> = groups
            .into_iter()
            .filter(|(rollout, _)| {
                Some(*rollout) != newest_rollout.as_ref()
                    && !with_pending.contains(rollout)
                    && !self.dead_rollouts.contains(*rollout)
            })
            .collect();
        candidates.sort_by_key(|(_, g)| g.newest_qseq);
        let now = self.clock.now();
        let mut kept = self.acked.len();
        let mut doomed = Vec::new();
        for (_, group) in candidates {
            let too_many = kept > self.config.acked_max_count;
            let too_old = now - group.newest_at > self.config.acked_max_age;
            if too_many || too_old {
                kept -= group.qseqs.len();
                doomed.extend(group.qseqs);
            }
        }
        doomed
    }

    fn check_poisoned(&self) -> Result<(), QueueError> {
        match &self.poisoned {
            Some(why) => Err(QueueError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// tmp → write → fsync → rename → fsync dir. On failure nothing stays
    /// visible under `path`, or the queue is poisoned.
    fn write_durably(&mut self, dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), QueueError> {
        let tmp = tmp_path(path);
        let result = (|| {
            self.storage.write_file(&tmp, bytes).map_err(io_err("write", &tmp))?;
            self.storage.fsync_file(&tmp).map_err(io_err("fsync", &tmp))?;
            self.storage.rename(&tmp, path).map_err(io_err("rename", &tmp))
        })();
        if let Err(e) = result {
            // Never fsync again and trust it: drop the tmp, the caller
            // writes the whole thing anew.
            let _ = self.storage.remove_file(&tmp);
            self.undo_visible(dir, path);
            return Err(e);
        }
        if let Err(e) = self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir)) {
            self.undo_visible(dir, path);
            return Err(e);
        }
        Ok(())
    }

    /// After a failed write, makes sure `path` is durably absent, or
    /// poisons the queue when that cannot be established.
    fn undo_visible(&mut self, dir: &Path, path: &Path) {
        let outcome = match self.storage.remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => Err(format!("remove {}: {e}", path.display())),
            Ok(()) => self.storage.fsync_dir(dir).map_err(|e| format!("fsync directory {}: {e}", dir.display())),
        };
        if let Err(why) = outcome {
            tracing::error!(path = %path.display(), %why, "cannot undo a failed queue write; queue stopped");
            self.poisoned = Some(why);
        }
    }

    /// rename `from_dir/name` → `to_dir/name`, fsync the destination (see
    /// "Write discipline"). A retry after a rename that happened but whose
    /// fsync failed finds the file already moved and only syncs.
    fn move_durably(&mut self, from_dir: &Path, to_dir: &Path, name: &str) -> Result<(), QueueError> {
        let (from, to) = (from_dir.join(name), to_dir.join(name));
        match self.storage.rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.storage.exists(&to).unwrap_or(false) => {}
            Err(source) => return Err(QueueError::Io { op: "rename", path: from, source }),
        }
        self.storage.fsync_dir(to_dir).map_err(io_err("fsync directory", to_dir))
    }

    /// Writes `dead/<name>.reason` (tmp, fsync, rename; the caller's move
    /// syncs `dead/`).
    fn write_dead_reason(&mut self, name: &str, reason: &DeadReason) -> Result<(), QueueError> {
        let path = self.dead_dir.join(format!("{name}{}", record::REASON_SUFFIX));
        let tmp = tmp_path(&path);
        // The directory fsync makes the reason durable before the event
        // moves in: a dead event is never without its reason (the rebuild
        // after a restart ignores unexplained dead events, which would
        // leave a hole in the rollout's history).
        let dead_dir = self.dead_dir.clone();
        let result = (|| {
            self.storage.write_file(&tmp, &reason.encode()).map_err(io_err("write", &tmp))?;
            self.storage.fsync_file(&tmp).map_err(io_err("fsync", &tmp))?;
            self.storage.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            self.storage.fsync_dir(&dead_dir).map_err(io_err("fsync directory", &dead_dir))
        })();
        if result.is_err() {
            let _ = self.storage.remove_file(&tmp);
        }
        result
    }

    /// Start-up recovery (crash cases 1, 8, 9, 10, 11): create folders,
    /// drop `.tmp` files, move unreadable files to `dead/`, load the index
    /// and the numbers to continue from.
    fn recover(&mut self) -> Result<(), QueueError> {
        for dir in [&self.root, &self.acked_dir, &self.dead_dir] {
            self.storage.create_dir(dir).map_err(io_err("create directory", dir))?;
        }
        // Make the folders themselves durable (cheap, once per start).
        for dir in [&self.state_dir, &self.root] {
            self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
        }
        let high_water_path = self.root.join(HIGH_WATER_FILE);
        if self.storage.exists(&high_water_path).map_err(io_err("stat", &high_water_path))? {
            let bytes = self.storage.read_file(&high_water_path).map_err(io_err("read", &high_water_path))?;
            self.high_water = HighWater::decode(&bytes)
                .map_err(|source| QueueError::HighWaterCorrupt { path: high_water_path.clone(), source })?;
        }
        let mut max_qseq = self.high_water.qseq;
        self.last_seq = self.high_water.seqs.clone();

        let (root, acked_dir, dead_dir) = (self.root.clone(), self.acked_dir.clone(), self.dead_dir.clone());
        let mut dead_names = std::collections::BTreeSet::new();
        let mut reason_names = Vec::new();
        let mut revived_notes = Vec::new();
        let mut live_seqs = std::collections::HashSet::new();
        for (dir, is_dead) in [(&dead_dir, true), (&acked_dir, false), (&root, false)] {
            let mut names = self.storage.list_files(dir).map_err(io_err("list", dir))?;
            names.sort();
            for name in names {
                if name.ends_with(record::TMP_SUFFIX) {
                    let path = dir.join(&name);
                    match self.storage.remove_file(&path) {
                        Ok(()) => self.recovery.tmp_removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => return Err(QueueError::Io { op: "remove", path, source }),
                    }
                    continue;
                }
                if is_dead {
                    // Numbering from dead names comes below, from those
                    // whose record reads (bounded) or, for the rest, the
                    // bounded name.
                    if let Some(qseq) = bounded_qseq_of_name(&name) {
                        max_qseq = max_qseq.max(qseq);
                    }
                    match name.strip_suffix(record::REASON_SUFFIX) {
                        Some(event_name) => reason_names.push(event_name.to_owned()),
                        None => {
                            dead_names.insert(name);
                        }
                    }
                    continue;
                }
                if dir == &root && (name == LOCK_FILE || name == HIGH_WATER_FILE) {
                    continue;
                }
                if dir == &acked_dir {
                    if let Some(event_name) = name.strip_suffix(record::REVIVED_SUFFIX) {
                        revived_notes.push(event_name.to_owned());
                        continue;
                    }
                }
                if !name.ends_with(record::EVENT_SUFFIX) {
                    tracing::warn!(dir = %dir.display(), %name, "ignoring a file that is not a queue event");
                    continue;
                }
                if let Some(qseq) = bounded_qseq_of_name(&name) {
                    max_qseq = max_qseq.max(qseq);
                }
                let path = dir.join(&name);
                let moved_already = dead_names.contains(&name)
                    || record::qseq_of_name(&name).is_some_and(|q| self.acked.contains_key(&q));
                if dir == &root && moved_already {
                    // Crash case 8: the move to acked/ or dead/ had happened.
                    self.storage.remove_file(&path).map_err(io_err("remove", &path))?;
                    self.storage.fsync_dir(&root).map_err(io_err("fsync directory", &root))?;
                    continue;
                }
                let bytes = match self.storage.read_file(&path) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    // Too large (or not a regular file): never read into
                    // memory, moved aside like any unreadable record.
                    Err(e) if storage::unsafe_file(&e).is_some() => {
                        let reason = format!("unreadable: {e}");
                        self.move_to_dead(dir, &name, &reason)?;
                        self.recovery.moved_to_dead.push((name, reason));
                        continue;
                    }
                    Err(source) => return Err(QueueError::Io { op: "read", path, source }),
                };
                match self.check_record(&name, &bytes, &mut live_seqs) {
                    Ok(queued) => {
                        max_qseq = max_qseq.max(queued.qseq);
                        let seq = self.last_seq.entry(queued.rollout_id.clone()).or_insert(0);
                        *seq = (*seq).max(queued.seq());
                        if dir == &root {
                            self.pending.insert(queued.qseq, queued);
                        } else {
                            self.acked.insert(queued.qseq, queued);
                        }
                    }
                    Err(refused) => {
                        let reason = refused.to_string();
                        // Its seq, if the header still reads (and is in
                        // bounds), must not come back either (it may have
                        // reached the CP).
                        self.fold_header_numbers(&bytes, &mut max_qseq);
                        self.move_to_dead(dir, &name, &reason)?;
                        self.recovery.moved_to_dead.push((name, reason));
                    }
                }
            }
        }
        // Dead events still hold seqs that must not come back; unreadable
        // ones only their qseq (by name, above). Those the CP refused (a
        // `rejected` reason beside a readable record of this host) are part
        // of their rollout's history: indexed for re-sends.
        let reasons: std::collections::BTreeSet<String> = reason_names.into_iter().collect();
        for name in &dead_names {
            let Ok(bytes) = self.storage.read_file(&dead_dir.join(name)) else { continue };
            if let Some(rollout_id) = self.fold_header_numbers(&bytes, &mut max_qseq) {
                self.dead_rollouts.insert(rollout_id);
            }
            if !reasons.contains(name) {
                continue;
            }
            let reason_path = dead_dir.join(format!("{name}{}", record::REASON_SUFFIX));
            let rejected = self
                .storage
                .read_file(&reason_path)
                .ok()
                .and_then(|b| DeadReason::decode(&b).ok())
                .is_some_and(|r| r.cause == DeadCause::Rejected);
            if !rejected {
                continue;
            }
            let mut no_dupes = std::collections::HashSet::new();
            if let Ok(queued) = self.check_record(name, &bytes, &mut no_dupes) {
                let entry = DeadEntry { rollout_id: queued.rollout_id.clone(), seq: queued.seq(), name: name.clone() };
                self.dead.insert(queued.qseq, entry);
            }
        }
        // Crash cases 6 and 10: a reason without its dead event, or a
        // revived note without its acked event, is a leftover.
        let orphan_reasons: Vec<PathBuf> = reasons
            .iter()
            .filter(|n| !dead_names.contains(*n))
            .map(|n| dead_dir.join(format!("{n}{}", record::REASON_SUFFIX)))
            .collect();
        let mut orphan_notes = Vec::new();
        for event_name in revived_notes {
            match record::qseq_of_name(&event_name).filter(|q| self.acked.contains_key(q)) {
                Some(qseq) => {
                    self.revived.insert(qseq);
                }
                None => orphan_notes.push(acked_dir.join(format!("{event_name}{}", record::REVIVED_SUFFIX))),
            }
        }
        for (dir, orphans) in [(&dead_dir, orphan_reasons), (&acked_dir, orphan_notes)] {
            if orphans.is_empty() {
                continue;
            }
            for path in orphans {
                match self.storage.remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(QueueError::Io { op: "remove", path, source }),
                }
            }
            self.storage.fsync_dir(dir).map_err(io_err("fsync directory", dir))?;
        }
        // max_qseq <= MAX_QSEQ (every source is bounded), so this cannot
        // overflow.
        self.next_qseq = max_qseq + 1;
        self.recovery.pending = self.pending.len();
        self.recovery.acked = self.acked.len();
        if !self.recovery.moved_to_dead.is_empty() || self.recovery.tmp_removed > 0 {
            tracing::warn!(
                tmp_removed = self.recovery.tmp_removed,
                moved_to_dead = self.recovery.moved_to_dead.len(),
                "queue recovery cleaned up"
            );
        }
        Ok(())
    }

    /// Folds the qseq and seq of a record whose header still reads into
    /// the numbering, when they are within bounds; returns its rollout.
    fn fold_header_numbers(&mut self, bytes: &[u8], max_qseq: &mut u64) -> Option<RolloutId> {
        let header = record::decode_header(bytes).ok()?;
        if header.qseq <= MAX_QSEQ {
            *max_qseq = (*max_qseq).max(header.qseq);
        }
        let rollout_id = RolloutId::parse(&header.rollout_id).ok()?;
        if header.seq <= MAX_SEQ {
            let seq = self.last_seq.entry(rollout_id.clone()).or_insert(0);
            *seq = (*seq).max(header.seq);
        }
        Some(rollout_id)
    }

    /// Decodes a record and checks it belongs here under this name.
    /// `live_seqs` holds the (rollout, seq) of the records accepted so far.
    fn check_record(
        &self,
        name: &str,
        bytes: &[u8],
        live_seqs: &mut std::collections::HashSet<(RolloutId, u64)>,
    ) -> Result<QueuedEvent, RecordCheckError> {
        let queued = record::decode(bytes)?;
        if queued.hostname != self.hostname {
            return Err(RecordCheckError::OtherHost { found: queued.hostname, queue: self.hostname.clone() });
        }
        if queued.qseq > MAX_QSEQ {
            return Err(RecordCheckError::QseqBeyondBound(queued.qseq));
        }
        if queued.seq() == 0 || queued.seq() > MAX_SEQ {
            return Err(RecordCheckError::SeqOutOfRange(queued.seq()));
        }
        if queued.file_name() != name {
            return Err(RecordCheckError::NameMismatch(queued.qseq));
        }
        if !live_seqs.insert((queued.rollout_id.clone(), queued.seq())) {
            return Err(RecordCheckError::SecondSeq { rollout_id: queued.rollout_id.clone(), seq: queued.seq() });
        }
        Ok(queued)
    }

    /// Crash case 8: an unreadable file goes to `dead/` with the reason.
    fn move_to_dead(&mut self, dir: &Path, name: &str, reason: &str) -> Result<(), QueueError> {
        let dead_reason = DeadReason::new(DeadCause::Corrupt, reason, self.clock.now());
        let dead_dir = self.dead_dir.clone();
        self.write_dead_reason(name, &dead_reason)?;
        self.move_durably(dir, &dead_dir, name)
    }
}

/// The qseq a file name starts with, if it has the event-name shape and is
/// within [`MAX_QSEQ`]; a larger one is never used for numbering.
fn bounded_qseq_of_name(name: &str) -> Option<u64> {
    record::qseq_of_name(name).filter(|q| *q <= MAX_QSEQ)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut os = path.as_os_str().to_owned();
    os.push(record::TMP_SUFFIX);
    PathBuf::from(os)
}
