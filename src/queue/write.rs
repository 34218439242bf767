//! The calls that change what the queue holds: `enqueue` (write-ahead,
//! with the soft cap, the reserve and the hard cap), `ack`, `reject` and
//! `revive` (crash cases 1 to 6 and 10 of the module doc).

use std::io;

use super::record::{self, DeadCause, DeadReason, QueuedEvent, RevivedNote};
use super::{io_err, is_visibility, DeadEntry, Queue, QueueError, QueuedRef, MAX_QSEQ};
use crate::ids::RolloutId;
use crate::wire::{OutboundEvent, MAX_SEQ};

impl Queue {
    /// The record `event` is journaled as under `qseq` (by `enqueue`, and
    /// by `write_back` under the qseq a rotted copy had), stamped now.
    pub(super) fn record(&self, qseq: u64, rollout_id: &RolloutId, event: &OutboundEvent) -> QueuedEvent {
        QueuedEvent {
            qseq,
            hostname: self.hostname.clone(),
            rollout_id: rollout_id.clone(),
            created_at: self.clock.now().to_offset(time::UtcOffset::UTC),
            event: event.clone(),
        }
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
        let queued = self.record(qseq, rollout_id, event);
        let path = self.root.join(queued.file_name());
        let root = self.root.clone();
        self.write_durably(&root, &path, &record::encode(&queued))?;
        self.last_seq.insert(rollout_id.clone(), event.seq);
        self.pending.insert(qseq, queued);
        Ok(QueuedRef { qseq, seq: event.seq, path })
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
}
