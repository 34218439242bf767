//! Retention of `acked/`: whole rollouts past the count or the age limit,
//! oldest first, with the high-water mark written before any removal
//! (crash case 7 of the module doc).

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use time::OffsetDateTime;

use super::high_water::HighWater;
use super::{io_err, record, Queue, QueueError, HIGH_WATER_FILE};
use crate::ids::RolloutId;

impl Queue {
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
        let firsts: BTreeSet<u64> = first_of.into_values().collect();
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
    pub(super) fn prune_plan(&self) -> Vec<u64> {
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
        let with_pending: BTreeSet<&RolloutId> = self.pending.values().map(|q| &q.rollout_id).collect();
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
}
