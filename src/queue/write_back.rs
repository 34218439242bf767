//! Writing a rebuilt event back as a pending record (crash case 12 of the
//! queue's doc): the restart rebuild (`agent::rebuild`) remakes a record
//! that rotted, and the control plane must still receive its seq. Apart
//! from `mod.rs` so the queue's core stays as it is.

use std::io;

use super::record;
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
        let queued = self.record(qseq, rollout_id, event);
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use time::macros::datetime;

    use super::super::sim::{SimFs, SimStorage, EIO, ENOSPC};
    use super::super::{QueueConfig, Storage, DEAD_DIR, QUEUE_DIR};
    use super::*;
    use crate::clock::ClockHandle;
    use crate::ids::Hostname;
    use crate::wire::WireEventBody;

    const ROOT: &str = "/state";

    fn rollout() -> RolloutId {
        RolloutId::parse("stable@r1").expect("valid")
    }

    fn event(seq: u64) -> OutboundEvent {
        let started_at = datetime!(2026-11-25 12:00 UTC) + time::Duration::seconds(seq as i64);
        OutboundEvent { seq, body: WireEventBody::ActivationStarted { started_at, switch_method: format!("s{seq}") } }
    }

    fn open(storage: &SimStorage) -> Queue {
        let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let host = Hostname::parse("web-1").expect("valid");
        Queue::open_with_storage(Box::new(storage.clone()), Path::new(ROOT), host, QueueConfig::default(), clock)
            .expect("open")
    }

    fn dead_dir() -> PathBuf {
        PathBuf::from(ROOT).join(QUEUE_DIR).join(DEAD_DIR)
    }

    fn seqs(q: &Queue) -> Vec<(u64, u64)> {
        q.pending().iter().map(|e| (e.qseq, e.seq())).collect()
    }

    /// Seqs 1..=3 enqueued, then the record of seq 2 rots durably and the
    /// queue is reopened: seq 2 is a corrupt file in dead/.
    fn rotted_queue() -> (Queue, SimStorage) {
        let storage = SimStorage::default();
        let mut q = open(&storage);
        let refs: Vec<QueuedRef> = (1..=3).map(|s| q.enqueue(&rollout(), &event(s)).expect("enqueue")).collect();
        drop(q);
        storage.write_file(&refs[1].path, b"{\"rotted").expect("rot");
        storage.fsync_file(&refs[1].path).expect("rot durable");
        storage.fsync_dir(refs[1].path.parent().expect("dir")).expect("rot durable");
        let q = open(&storage);
        assert_eq!(q.recovery_report().moved_to_dead.len(), 1);
        assert_eq!(seqs(&q), vec![(1, 1), (3, 3)]);
        (q, storage)
    }

    /// The rebuilt seq 2 goes back to its place (qseq 2, between 1 and 3),
    /// stays there across a reopen, and the corrupt copy and its reason
    /// leave dead/. A second write-back, one over a readable record, and a
    /// seq never handed out are refused.
    #[test]
    fn a_rotted_record_is_written_back_under_its_qseq_and_survives_reopen() {
        let (mut q, storage) = rotted_queue();
        let written = q.write_back(&rollout(), 2, &event(2)).expect("write back");
        assert_eq!((written.qseq, written.seq), (2, 2));
        assert_eq!(seqs(&q), vec![(1, 1), (2, 2), (3, 3)], "delivery order stays by seq");
        assert!(matches!(q.write_back(&rollout(), 2, &event(2)), Err(QueueError::NotRotted { .. })));
        assert!(matches!(q.write_back(&rollout(), 1, &event(1)), Err(QueueError::NotRotted { .. })));
        assert!(matches!(q.write_back(&rollout(), 9, &event(4)), Err(QueueError::NotRotted { .. })));
        drop(q);
        let q = open(&storage);
        assert_eq!(seqs(&q), vec![(1, 1), (2, 2), (3, 3)]);
        assert!(q.recovery_report().moved_to_dead.is_empty());
        assert_eq!(q.pending()[1].event, event(2));
        assert!(storage.fs().paths().iter().all(|p| p.parent() != Some(dead_dir().as_path())), "dead/ is empty");
        assert_eq!(q.next_seq(&rollout()), 4);
    }

    /// After a fault at any step, and after a crash at any step (every
    /// state the crash model allows), a reopen finds seq 2 either pending
    /// whole under qseq 2 or still rotted in dead/, never lost, never twice;
    /// in the second case a write-back on the reopened queue completes.
    #[test]
    fn faults_and_crashes_during_a_write_back_leave_a_state_restore_handles_again() {
        let check = |storage: &SimStorage, context: &str| {
            let mut q = open(storage);
            if seqs(&q) == vec![(1, 1), (3, 3)] {
                q.write_back(&rollout(), 2, &event(2)).unwrap_or_else(|e| panic!("{context}: retry: {e}"));
            }
            assert_eq!(seqs(&q), vec![(1, 1), (2, 2), (3, 3)], "{context}");
            assert_eq!(q.pending()[1].event, event(2), "{context}");
        };
        let (mut q, storage) = rotted_queue();
        let before = storage.fs().n_ops();
        q.write_back(&rollout(), 2, &event(2)).expect("clean run");
        let n_steps = storage.fs().n_ops() - before;
        assert_eq!(n_steps, 7, "write, fsync, rename, fsync dir; remove, remove, fsync dead/");
        let mut n_states = 0;
        for step in 0..n_steps {
            for errno in [ENOSPC, EIO] {
                let (mut q, storage) = rotted_queue();
                let at = storage.fs().n_ops() + step;
                storage.fs().fail_at(at, errno);
                let err = q.write_back(&rollout(), 2, &event(2)).expect_err("the fault reaches the caller");
                drop(q);
                check(&storage, &format!("fault at step {step} errno {errno}: {err}"));
            }
            let (mut q, storage) = rotted_queue();
            let at = storage.fs().n_ops() + step;
            storage.fs().crash_at(at);
            let _ = q.write_back(&rollout(), 2, &event(2));
            drop(q);
            let states: Vec<SimFs> = storage.fs().crash_states();
            for (idx, state) in states.into_iter().enumerate() {
                n_states += 1;
                check(&SimStorage::new(state), &format!("crash at step {step}, state #{idx}"));
            }
        }
        assert!(n_states > n_steps, "the crash model yields several states: {n_states}");
    }
}
