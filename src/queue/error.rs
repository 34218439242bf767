//! The queue's errors: what a call answers ([`QueueError`]), why the
//! high-water mark is refused, and why a record goes to `dead/` at start.

use std::io;
use std::path::{Path, PathBuf};

use super::{record, MAX_QSEQ};
use crate::ids::{Hostname, RolloutId};
use crate::wire::MAX_SEQ;

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
    /// [`Queue::write_back`](super::Queue::write_back) of an event whose
    /// record did not rot (no unreadable `dead/{name}`, or its seq is held
    /// by a readable event).
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

pub(super) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> QueueError + 'a {
    move |source| QueueError::Io { op, path: path.to_owned(), source }
}
