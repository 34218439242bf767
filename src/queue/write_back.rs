//! Writing a rebuilt event back as a pending record (crash case 12 of the
//! queue's doc): the restart rebuild (`agent::rebuild`) remakes a record
//! that rotted, and the control plane must still receive its seq. Apart
//! from `mod.rs` so the queue's core stays as it is.

use std::io;

use super::record::{self, QueuedEvent};
use super::{io_err, Queue, QueueError, QueuedRef};
use crate::ids::RolloutId;
use crate::wire::OutboundEvent;

impl Queue {
    /// Writes `event`, rebuilt in place of the unreadable record `qseq` that
    /// start-up recovery moved to `dead/`, back as a pending event under
    /// that qseq and seq: it keeps its place in enqueue order, so the
    /// drainer delivers it before the rollout's later events (the CP
    /// answers `duplicate` if it had arrived before it rotted).
    ///
    /// Refused unless `dead/` holds a file of that exact name without a
    /// readable record (nothing else may be overwritten) and the rollout
    /// has no readable event with that seq. Order: the record durably
    /// (tmp, fsync, rename, fsync of the queue folder), then the corrupt
    /// copy and its reason are removed and `dead/` is fsynced. A crash
    /// before the removal leaves both names; open then drops the pending
    /// copy (crash case 8) and the next rebuild writes it back again. An
    /// error after the record is written leaves the same two names: the
    /// caller (the rebuild) stops the agent, and the reopen sorts it out.
    pub fn write_back(
        &mut self,
        rollout_id: &RolloutId,
        qseq: u64,
        event: &OutboundEvent,
    ) -> Result<QueuedRef, QueueError> {
        self.check_poisoned()?;
        let queued = QueuedEvent {
            qseq,
            hostname: self.hostname.clone(),
            rollout_id: rollout_id.clone(),
            created_at: self.clock.now().to_offset(time::UtcOffset::UTC),
            event: event.clone(),
        };
        let name = queued.file_name();
        let dead_path = self.dead_dir.join(&name);
        let rotted = match self.storage.read_file(&dead_path) {
            Ok(bytes) => record::decode(&bytes).is_err(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => return Err(QueueError::Io { op: "read", path: dead_path, source }),
        };
        let seq_taken = self.events_after(rollout_id, event.seq.saturating_sub(1)).iter().any(|q| q.seq() == event.seq);
        if !rotted
            || seq_taken
            || event.seq == 0
            || self.dead.contains_key(&qseq)
            || event.seq > self.last_seq(rollout_id)
        {
            return Err(QueueError::NotRotted { name });
        }
        let (root, dead_dir) = (self.root.clone(), self.dead_dir.clone());
        let path = root.join(&name);
        self.write_durably(&root, &path, &record::encode(&queued))?;
        self.pending.insert(qseq, queued);
        let reason_path = dead_dir.join(format!("{name}{}", record::REASON_SUFFIX));
        for gone in [&dead_path, &reason_path] {
            match self.storage.remove_file(gone) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(QueueError::Io { op: "remove", path: gone.clone(), source }),
            }
        }
        self.storage.fsync_dir(&dead_dir).map_err(io_err("fsync directory", &dead_dir))?;
        Ok(QueuedRef { qseq, seq: event.seq, path })
    }
}
