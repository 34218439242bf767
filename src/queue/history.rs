//! Reading the queue's index: pending and acked events, and a rollout's
//! history (what Replay-From and a re-send after a `gap` need, dead letters
//! included, and what the agent replays at start).

use super::record::{self, QueuedEvent};
use super::{io_err, Queue, QueueError};
use crate::ids::RolloutId;

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

impl Queue {
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

    /// Reads and decodes a file of `dead/`.
    pub(super) fn read_dead(&self, name: &str) -> Result<QueuedEvent, QueueError> {
        let path = self.dead_dir.join(name);
        let bytes = self.storage.read_file(&path).map_err(io_err("read", &path))?;
        record::decode(&bytes).map_err(|source| QueueError::Corrupt { path, source })
    }
}
