//! A simulated agent process: the REAL reducer (`agent::reducer::Reducer`)
//! over the REAL queue (`queue::Queue` on [`MemStorage`]), restarted with
//! the REAL rebuild (`agent::journal::restore_from`), admitting dispatches
//! with the REAL checks (`agent::admission`). What is modelled instead of
//! run: the workers' scheduling (activation, probes, tick, long-poll,
//! drainer, heartbeat), because the real ones sleep on tokio timers and do
//! real I/O. Their decisions are copied from `agent/workers/*.rs`; the
//! delivery loop (drain, ack/reject/back off, Replay-From) lives in
//! [`delivery`] alone so the coming `gap` / `busy` results change one place.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

use super::storage::MemStorage;
use crate::agent::backoff::Backoff;
use crate::agent::journal::{restore_from, RestoreReport};
use crate::agent::reducer::{commands, CommandReceivers, Input, Journal, Reducer};
use crate::agent::rollouts::Rollouts;
use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::queue::record::{self, DeadCause, DeadReason, QueuedEvent};
use crate::queue::{Queue, QueueConfig, ACKED_DIR, DEAD_DIR, QUEUE_DIR};
use crate::sign::PublicKey;
use crate::wire::{EventBatch, OutboundEvent};

/// The journal of a simulated agent: the real queue, appended to
/// synchronously (the real `SharedQueue` only adds a hop to the blocking
/// pool around the same `enqueue`).
#[derive(Debug, Clone)]
pub struct SimJournal {
    pub queue: Arc<Mutex<Queue>>,
}

impl SimJournal {
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Journal for SimJournal {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), String> {
        self.lock().enqueue(rollout_id, event).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Drives a future that never waits (the reducer's `handle` with a journal
/// that answers at once) to completion; `None` if it would have waited.
pub fn run_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The drainer's state (`workers/net.rs::run_drain_worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drain {
    /// Waiting for a wake-up or the 15 s interval (timer token).
    Idle(u64),
    /// A batch is on its way; the qseqs it carries.
    InFlight { req: u64, qseqs: Vec<u64> },
    /// Backing off after a failure (timer token).
    Paused(u64),
}

/// The long-poll worker's state (`workers/net.rs::run_longpoll_worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LongPoll {
    Polling(u64),
    FetchingManifest(u64, Box<crate::wire::Dispatch>),
    Paused(u64),
}

/// One running agent process; dropped on a crash.
#[derive(Debug)]
pub struct Proc {
    pub reducer: Reducer<SimJournal>,
    pub rx: CommandReceivers,
    pub snapshot: watch::Receiver<Rollouts>,
    pub journal: SimJournal,
    pub started_ms: u64,
    pub restore: RestoreReport,
    pub last_switch_generation: u64,
    pub probe_generation: u64,
    pub probe_rollout: Option<RolloutId>,
    /// Enforce probes that produced a result in THIS run, per rollout
    /// (SPEC rule 9 is checked against it).
    pub fresh: BTreeSet<(RolloutId, String)>,
    pub drain: Drain,
    pub drain_backoff: Backoff,
    pub next_prune_ms: u64,
    pub heartbeat_req: Option<u64>,
    pub replay: VecDeque<EventBatch>,
    pub replay_req: Option<u64>,
    pub poll: LongPoll,
    pub poll_backoff: Backoff,
    pub known_pause_ms: u64,
    pub next_timer: u64,
}

/// One simulated host's agent: what survives its process (the queue's
/// files, the manifest cache, its configuration) and the process.
#[derive(Debug)]
pub struct SimAgent {
    pub idx: usize,
    pub host: Hostname,
    pub storage: MemStorage,
    pub state_dir: PathBuf,
    /// `{state_dir}/manifests/`: envelopes kept before the DispatchAck.
    pub manifests: BTreeMap<RolloutId, Vec<u8>>,
    pub trust_keys: Vec<PublicKey>,
    pub proc: Option<Proc>,
    /// Bumped at every start: messages and timers of a dead process are
    /// recognised and dropped.
    pub incarnation: u64,
}

impl SimAgent {
    pub fn new(idx: usize, host: Hostname, trust_keys: Vec<PublicKey>) -> SimAgent {
        SimAgent {
            idx,
            state_dir: PathBuf::from(format!("/sim/{host}")),
            host,
            storage: MemStorage::default(),
            manifests: BTreeMap::new(),
            trust_keys,
            proc: None,
            incarnation: 0,
        }
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.state_dir.join(QUEUE_DIR)
    }

    /// Starts the process the way `agent::runtime::serve` does: open the
    /// queue (start-up recovery), rebuild every rollout, create the reducer,
    /// `resume` what was in progress.
    pub fn start(&mut self, clock: &ClockHandle, now_ms: u64) -> Result<(), String> {
        let queue = Queue::open_with_storage(
            Box::new(self.storage.clone()),
            &self.state_dir,
            self.host.clone(),
            QueueConfig::default(),
            clock.clone(),
        )
        .map_err(|e| format!("{}: queue open: {e}", self.host))?;
        let dead = self.dead_letters();
        let manifests = &self.manifests;
        let envelope_of = |id: &RolloutId| Ok(manifests.get(id).cloned());
        let (rollouts, report) = restore_from(&queue, dead, &envelope_of, &self.host, &self.trust_keys)?;
        let journal = SimJournal { queue: Arc::new(Mutex::new(queue)) };
        let (cmds, rx) = commands();
        let (mut reducer, snapshot) = Reducer::new(rollouts, journal.clone(), cmds);
        reducer.resume();
        self.incarnation += 1;
        self.proc = Some(Proc {
            reducer,
            rx,
            snapshot,
            journal,
            started_ms: now_ms,
            restore: report,
            last_switch_generation: 0,
            probe_generation: 0,
            probe_rollout: None,
            fresh: BTreeSet::new(),
            drain: Drain::Idle(0),
            drain_backoff: Backoff::new(),
            next_prune_ms: now_ms,
            heartbeat_req: None,
            replay: VecDeque::new(),
            replay_req: None,
            poll: LongPoll::Paused(0),
            poll_backoff: Backoff::new(),
            known_pause_ms: 20,
            next_timer: 1,
        });
        Ok(())
    }

    /// The events of `dead/` the CP rejected, as `journal::recorded_events`
    /// reads them (corrupt files and reasonless ones are not history).
    fn dead_letters(&self) -> Vec<QueuedEvent> {
        let dir = self.queue_dir().join(DEAD_DIR);
        let mut out = Vec::new();
        for name in self.storage.names(&dir) {
            if !record::is_event_name(&name) {
                continue;
            }
            let reason =
                self.storage.read(&dir.join(format!("{name}.reason"))).and_then(|b| DeadReason::decode(&b).ok());
            if reason.as_ref().map(|r| r.cause) != Some(DeadCause::Rejected) {
                continue;
            }
            if let Some(ev) = self.storage.read(&dir.join(&name)).and_then(|b| record::decode(&b).ok()) {
                out.push(ev);
            }
        }
        out
    }

    /// An acked or pending event file of a rollout with this seq, if any.
    pub fn event_file(&self, rollout_id: &RolloutId, seq: u64) -> Option<PathBuf> {
        for dir in [self.queue_dir().join(ACKED_DIR), self.queue_dir()] {
            for name in self.storage.names(&dir) {
                if !record::is_event_name(&name) {
                    continue;
                }
                let path = dir.join(&name);
                let Some(ev) = self.storage.read(&path).and_then(|b| record::decode(&b).ok()) else { continue };
                if &ev.rollout_id == rollout_id && ev.event.seq == seq {
                    return Some(path);
                }
            }
        }
        None
    }

    /// Feeds one input to the real reducer.
    pub fn handle(&mut self, input: Input) -> Result<(), String> {
        let Some(proc) = self.proc.as_mut() else { return Ok(()) };
        run_now(proc.reducer.handle(input))
            .ok_or_else(|| format!("{}: the reducer waited (journal append failed?)", self.host))
    }

    pub fn rollouts(&self) -> Option<&Rollouts> {
        self.proc.as_ref().map(|p| p.reducer.rollouts())
    }
}

impl Proc {
    pub fn timer(&mut self) -> u64 {
        self.next_timer += 1;
        self.next_timer
    }
}

/// The delivery loop of `agent/workers/net.rs`, in one place: which batch
/// the drainer sends, what it does with each answer, and what a heartbeat's
/// Replay-From re-sends. The protocol will gain `gap` (re-send from
/// `expected_seq`) and a `busy` DispatchRejected (SPEC rule 7, 8): change
/// it here.
pub mod delivery {
    use super::*;
    use crate::wire::{BatchItem, EventResult, ResultStatus, MAX_BATCH_EVENTS};

    /// The next batch from the head of `pending/`, in enqueue order.
    pub fn next_batch(queue: &Queue, host: &Hostname) -> Option<(EventBatch, Vec<u64>)> {
        let batch = queue.pending_head(MAX_BATCH_EVENTS);
        if batch.is_empty() {
            return None;
        }
        let qseqs = batch.iter().map(|q| q.qseq).collect();
        let events =
            batch.into_iter().map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event }).collect();
        Some((EventBatch { hostname: host.clone(), events }, qseqs))
    }

    /// What the drainer does after the CP answered a batch.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum AfterAnswer {
        /// Everything moved: look at the queue again at once.
        Continue,
        /// `retry` (or a malformed answer): keep order, back off.
        Pause(String),
    }

    /// Applies the CP's answers in order: applied/duplicate → ack,
    /// rejected → dead letter with the reason, retry → stop here (order is
    /// kept) and back off. Returns the rejected events for the checker.
    pub fn apply_answer(
        queue: &mut Queue,
        qseqs: &[u64],
        results: &[EventResult],
    ) -> Result<(AfterAnswer, Vec<(u64, String)>), String> {
        if results.len() != qseqs.len() {
            return Ok((
                AfterAnswer::Pause(format!("the CP answered {} results for {} events", results.len(), qseqs.len())),
                Vec::new(),
            ));
        }
        let mut rejected = Vec::new();
        for (qseq, result) in qseqs.iter().zip(results) {
            match result.status {
                ResultStatus::Applied | ResultStatus::Duplicate => queue.ack(*qseq).map_err(|e| e.to_string())?,
                ResultStatus::Rejected => {
                    let reason = result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                    queue.reject(*qseq, &reason).map_err(|e| e.to_string())?;
                    rejected.push((*qseq, reason));
                }
                ResultStatus::Retry => {
                    return Ok((AfterAnswer::Pause(result.reason.clone().unwrap_or_default()), rejected));
                }
            }
        }
        Ok((AfterAnswer::Continue, rejected))
    }

    /// Replay-From: the batches re-sent for each rollout the heartbeat
    /// named, from pending + acked events with seq > the CP's value.
    pub fn replay_batches(queue: &Queue, host: &Hostname, replay_from: &BTreeMap<RolloutId, u64>) -> Vec<EventBatch> {
        let mut out = Vec::new();
        for (rollout_id, after) in replay_from {
            let events = queue.events_after(rollout_id, *after);
            for chunk in events.chunks(MAX_BATCH_EVENTS) {
                out.push(EventBatch {
                    hostname: host.clone(),
                    events: chunk
                        .iter()
                        .map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event.clone() })
                        .collect(),
                });
            }
        }
        out
    }
}
