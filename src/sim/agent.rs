//! A simulated agent process: the REAL reducer (`agent::reducer::Reducer`)
//! over the REAL queue (`queue::Queue` on [`MemStorage`]), restarted with
//! the REAL rebuild (`agent::journal::restore_from`), admitting dispatches
//! with the REAL checks (`agent::admission`, then the reducer's own
//! busy / stale / clock checks). What is modelled instead of run: the
//! workers' scheduling (activation, probes, tick, long-poll, drainer,
//! heartbeat), because the real ones sleep on tokio timers and do real
//! I/O. Their decisions are copied from `agent/workers/*.rs`; the delivery
//! loop (drain, gap re-sends, revive, dead letters, Replay-From) lives in
//! [`delivery`] alone, next to the real queue calls it makes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

use super::storage::MemStorage;
use std::cell::RefCell;

use super::cp::SharedEnvelope;
use crate::agent::admission::{verified_manifest_by, Refusal};
use crate::agent::backoff::Backoff;
use crate::agent::channels::ChannelHistory;
use crate::agent::journal::{
    restore_from, CachedManifestError, RestoreError, RestoreReport, RestoreSource, MANIFEST_DIR,
};
use crate::agent::reducer::{commands, CommandReceivers, Input, Journal, JournalError, Reducer};
use crate::agent::rollouts::Rollouts;
use crate::clock::ClockHandle;
use crate::ids::{Hostname, RolloutId};
use crate::queue::record::{self, DeadCause, DeadReason, QueuedEvent};
use crate::queue::{Queue, QueueConfig, QueueError, ACKED_DIR, DEAD_DIR, QUEUE_DIR};
use crate::sign::PublicKey;
use crate::wire::{Manifest, OutboundEvent};

/// One signature check per (envelope digest, trust key ids), shared by
/// every simulated agent (admission and the restart rebuild): the manifest
/// and the key that verified it, or the refusal. Checking a 10,000-host
/// envelope (1.2 MB) on every host would be most of a large run.
pub type VerifyCache = BTreeMap<([u8; 32], Vec<String>), Result<(Arc<Manifest>, PublicKey), Refusal>>;

/// `admission::verified_manifest_by`, once per (envelope, keys).
pub fn verify_shared(
    cache: &mut VerifyCache,
    trust_keys: &[PublicKey],
    envelope: &SharedEnvelope,
) -> Result<(Arc<Manifest>, PublicKey), Refusal> {
    let key = (envelope.digest, trust_keys.iter().map(PublicKey::keyid).collect());
    cache
        .entry(key)
        .or_insert_with(|| verified_manifest_by(trust_keys, &envelope.bytes).map(|(m, k)| (Arc::new(m), k)))
        .clone()
}

/// The journal of a simulated agent: the real queue, appended to
/// synchronously (the real `SharedQueue` only adds a hop to the blocking
/// pool around the same `enqueue`, and maps the queue's caps the same way).
#[derive(Debug, Clone)]
pub struct SimJournal {
    pub queue: Arc<Mutex<Queue>>,
    /// The agent's `accepted-channels.json`, kept in memory across restarts.
    pub channels: Arc<Mutex<ChannelHistory>>,
}

impl SimJournal {
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Journal for SimJournal {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), JournalError> {
        // As `impl Journal for SharedQueue`: the soft and hard caps are Full.
        self.lock().enqueue(rollout_id, event).map(|_| ()).map_err(|e| match e {
            e @ (QueueError::SoftCapReached { .. } | QueueError::Full { .. }) => JournalError::Full(e.to_string()),
            e => JournalError::Failed(e.to_string()),
        })
    }

    /// The seam of `Journal::save_channels`: durable at once (the sim's
    /// disk keeps every write; there is no blocking pool to hop to).
    async fn save_channels(
        &mut self,
        channels: &ChannelHistory,
    ) -> Result<std::io::Result<()>, tokio::task::JoinError> {
        *self.channels.lock().unwrap_or_else(|p| p.into_inner()) = channels.clone();
        Ok(Ok(()))
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
    /// A request of a drain pass is on its way.
    InFlight { req: u64, pass: Box<delivery::Pass> },
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
    /// (protocol rule 6 is checked against it).
    pub fresh: BTreeSet<(RolloutId, String)>,
    pub drain: Drain,
    pub drain_backoff: Backoff,
    pub next_prune_ms: u64,
    /// The drainer's `Blocked` (per process, as in the real worker).
    pub blocked: delivery::Blocked,
    /// Replay-From requests (`SharedQueue::request_resend`): per rollout the
    /// lowest seq the CP has; the drainer takes them at its next pass.
    pub resend: BTreeMap<RolloutId, u64>,
    pub heartbeat_req: Option<u64>,
    /// (request, simulated ms) of the heartbeat the CP last answered, set
    /// when the CP commits it; `heartbeat_seen_ms` takes the instant once
    /// the answer (and so any Replay-From) reaches this process.
    pub heartbeat_committed: Option<(u64, u64)>,
    /// When the CP committed the last heartbeat whose answer arrived: the
    /// end of the run waits until this is after the last re-publish (see
    /// `Checker::republished_ms`).
    pub heartbeat_seen_ms: u64,
    pub poll: LongPoll,
    pub poll_backoff: Backoff,
    pub known_pause_ms: u64,
    pub next_timer: u64,
}

/// The files of `{state_dir}` besides the queue that survive a process:
/// the manifest cache (envelope + the key that verified it) and the
/// no-downgrade history. Envelopes are shared (`Arc`): one copy per
/// rollout for the whole fleet, however many hosts cached it.
#[derive(Debug, Default)]
pub struct AgentFiles {
    pub manifests: BTreeMap<RolloutId, (SharedEnvelope, PublicKey)>,
    pub channels: Arc<Mutex<ChannelHistory>>,
}

/// One simulated host's agent: what survives its process (the queue's
/// files, the manifest cache, its configuration) and the process.
#[derive(Debug)]
pub struct SimAgent {
    pub idx: usize,
    pub host: Hostname,
    pub storage: MemStorage,
    pub state_dir: PathBuf,
    pub files: AgentFiles,
    pub trust_keys: Vec<PublicKey>,
    pub proc: Option<Proc>,
    /// Bumped at every start: messages and timers of a dead process are
    /// recognised and dropped.
    pub incarnation: u64,
}

/// The sim's [`RestoreSource`]: the in-memory files of one agent.
struct SimFiles<'a> {
    agent: &'a SimAgent,
    verified: &'a RefCell<VerifyCache>,
}

impl RestoreSource for SimFiles<'_> {
    fn dead_letters(&self) -> Result<Vec<QueuedEvent>, RestoreError> {
        Ok(self.agent.dead_files().into_iter().filter_map(|(_, reason, ev)| ev.filter(|_| reason.is_ok())).collect())
    }

    fn corrupt_records(&self) -> Result<Vec<(String, String)>, RestoreError> {
        Ok(self
            .agent
            .dead_files()
            .into_iter()
            .filter_map(|(name, reason, _)| reason.err().map(|why| (name, why)))
            .collect())
    }

    fn channel_history(&self) -> Result<ChannelHistory, RestoreError> {
        Ok(self.agent.files.channels.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn cached_envelope(&self, rollout_id: &RolloutId) -> Result<Arc<[u8]>, CachedManifestError> {
        match self.agent.files.manifests.get(rollout_id) {
            Some((e, _)) => Ok(e.bytes.clone()),
            None => Err(CachedManifestError::Missing { path: self.manifest_path(rollout_id) }),
        }
    }

    fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError> {
        Ok(self.agent.files.manifests.get(rollout_id).map(|(_, k)| k.clone()))
    }

    fn manifest_path(&self, rollout_id: &RolloutId) -> PathBuf {
        self.agent.state_dir.join(MANIFEST_DIR).join(format!("{rollout_id}.json"))
    }

    /// What the sim's probe worker declares for every closure
    /// (`Sim::agent_timer`, `Timer::ProbeDeclare`).
    fn probe_topology(&self) -> Option<Vec<crate::machine::ProbeDecl>> {
        Some(super::enforce_topology().into_iter().map(|(d, _)| d).collect())
    }

    /// The shared check: `envelope` is one this agent cached (the rebuild
    /// reads it through [`Self::cached_envelope`]), found by its address.
    fn verify_envelope(&self, trust_keys: &[PublicKey], envelope: &[u8]) -> Result<Arc<Manifest>, Refusal> {
        let shared = self
            .agent
            .files
            .manifests
            .values()
            .map(|(e, _)| e)
            .find(|e| std::ptr::eq(e.bytes.as_ptr(), envelope.as_ptr()) && e.bytes.len() == envelope.len());
        match shared {
            Some(e) => verify_shared(&mut self.verified.borrow_mut(), trust_keys, e).map(|(m, _)| m),
            None => crate::agent::admission::verified_manifest(trust_keys, envelope).map(Arc::new),
        }
    }
}

impl SimAgent {
    pub fn new(idx: usize, host: Hostname, trust_keys: Vec<PublicKey>) -> SimAgent {
        SimAgent {
            idx,
            state_dir: PathBuf::from(format!("/sim/{host}")),
            host,
            storage: MemStorage::default(),
            files: AgentFiles::default(),
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
    pub fn start(&mut self, clock: &ClockHandle, now_ms: u64, verified: &RefCell<VerifyCache>) -> Result<(), String> {
        let mut queue = Queue::open_with_storage(
            Box::new(self.storage.clone()),
            &self.state_dir,
            self.host.clone(),
            QueueConfig::default(),
            clock.clone(),
        )
        .map_err(|e| format!("{}: queue open: {e}", self.host))?;
        let (rollouts, report) =
            restore_from(&mut queue, &SimFiles { agent: self, verified }, &self.host, &self.trust_keys)
                .map_err(|e| e.to_string())?;
        let journal = SimJournal { queue: Arc::new(Mutex::new(queue)), channels: self.files.channels.clone() };
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
            blocked: BTreeMap::new(),
            resend: BTreeMap::new(),
            heartbeat_req: None,
            heartbeat_committed: None,
            heartbeat_seen_ms: 0,
            poll: LongPoll::Paused(0),
            poll_backoff: Backoff::new(),
            known_pause_ms: 20,
            next_timer: 1,
        });
        Ok(())
    }

    /// Every event file of `dead/`: (name, Ok(()) for an event the CP
    /// rejected | Err(reason) for a corrupt or reasonless record, the
    /// record if it reads), as `journal::recorded_events` and
    /// `journal::corrupt_records` read them.
    fn dead_files(&self) -> Vec<(String, Result<(), String>, Option<QueuedEvent>)> {
        let dir = self.queue_dir().join(DEAD_DIR);
        let mut out = Vec::new();
        for name in self.storage.names(&dir) {
            if !record::is_event_name(&name) {
                continue;
            }
            let reason =
                self.storage.read(&dir.join(format!("{name}.reason"))).and_then(|b| DeadReason::decode(&b).ok());
            let kind = match &reason {
                Some(r) if r.cause == DeadCause::Rejected => Ok(()),
                Some(r) => Err(r.reason.clone()),
                None => Err("no reason recorded".to_owned()),
            };
            let ev = self.storage.read(&dir.join(&name)).and_then(|b| record::decode(&b).ok());
            out.push((name, kind, ev));
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

/// The delivery loop of `agent/workers/net.rs` (`drain_once`,
/// `resend_history`, `settle`), in one place, as a state machine because
/// the sim's network answers later in simulated time where the real worker
/// `await`s. Every queue change is the real `Queue` call the worker makes
/// (`pending_head`, `ack`, `reject`, `first_pending_seq`, `history_from`,
/// `revive`); the decisions follow the worker line by line and the
/// dead-letter reasons are its texts. Not modelled: batches refused whole
/// (400 `bad_event_batch` / 413), which the simulated CP never answers.
pub mod delivery {
    use super::*;
    use crate::queue::HistoryEvent;
    use crate::wire::{BatchItem, EventBatch, EventResult, ResultStatus, MAX_BATCH_EVENTS};

    /// `workers/net.rs::BLOCKED_RECHECK`, in simulated ms.
    pub const BLOCKED_RECHECK_MS: u64 = crate::agent::workers::net::BLOCKED_RECHECK.as_millis() as u64;

    /// The worker's `Blocked`: per rollout the seq its history cannot get
    /// past, the dead-letter text, and since when (simulated ms).
    pub type Blocked = BTreeMap<RolloutId, (u64, String, u64)>;

    fn blocked_at<'a>(blocked: &'a Blocked, rollout_id: &RolloutId, seq: u64, now_ms: u64) -> Option<&'a str> {
        blocked
            .get(rollout_id)
            .filter(|(s, _, at)| *s == seq && now_ms.saturating_sub(*at) < BLOCKED_RECHECK_MS)
            .map(|(_, text, _)| text.as_str())
    }

    /// `workers/net.rs::refused_reason`.
    pub fn refused_reason(rollout_id: &RolloutId, seq: u64, why: &str) -> String {
        format!(
            "undeliverable: the control plane needs seq {seq} of {rollout_id} first and refuses it ({why}); no later event of the rollout can be applied"
        )
    }

    /// `workers/net.rs::unavailable_reason`.
    pub fn unavailable_reason(rollout_id: &RolloutId, seq: u64) -> String {
        format!(
            "undeliverable: the control plane needs seq {seq} of {rollout_id} first, which this agent no longer has (pruned from acked/ or unreadable); no later event of the rollout can be applied"
        )
    }

    /// Why a history re-send was started.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ResendFor {
        /// A Replay-From request (`after` = the CP's last seq).
        Request { after: u64 },
        /// A `gap` answer: the held events wait on it (they stay pending).
        Gap { expected: u64, held: Vec<QueuedEvent> },
    }

    /// What the request in flight carries.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Sending {
        Batch(Vec<QueuedEvent>),
        /// `resend_history`: `history[sent..sent + chunk]` is in flight.
        Resend {
            why: ResendFor,
            rollout_id: RolloutId,
            history: Vec<HistoryEvent>,
            sent: usize,
            chunk: usize,
        },
    }

    /// One `drain_once` call in progress.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Pass {
        /// Replay-From requests taken at the start, not served yet.
        pub requests: VecDeque<(RolloutId, u64)>,
        /// (rollout, expected seq) re-sent in this pass.
        pub resent: BTreeSet<(RolloutId, u64)>,
        /// Gaps of the last batch still to handle, and that batch's
        /// rejections and pause.
        pub gaps: VecDeque<(RolloutId, u64, Vec<QueuedEvent>)>,
        pub rejected: BTreeMap<RolloutId, (u64, String)>,
        pub pause: Option<String>,
        pub sending: Sending,
    }

    /// What the drainer does next.
    #[derive(Debug)]
    pub enum Step {
        /// Post this batch (the pass goes on when it is answered).
        Send(EventBatch, Box<Pass>),
        /// The queue is empty: `drain_once` returned Ok.
        Done,
        /// `drain_once` returned Err: back off. `requeue` are Replay-From
        /// requests to keep (`queue.request_resend`).
        Pause { why: String, requeue: Vec<(RolloutId, u64)> },
    }

    /// What the drainer tells the sim happened, for the trace and checks.
    #[derive(Debug, Default)]
    pub struct Notes {
        pub lines: Vec<String>,
        pub dead_lettered: u64,
        pub revived: u64,
    }

    fn to_batch(host: &Hostname, events: impl Iterator<Item = QueuedEvent>) -> EventBatch {
        EventBatch {
            hostname: host.clone(),
            events: events.map(|q| BatchItem { rollout_id: q.rollout_id.clone(), event: q.event }).collect(),
        }
    }

    /// Starts a pass with the Replay-From requests taken from the queue.
    pub fn start_pass(
        queue: &mut Queue,
        host: &Hostname,
        requests: BTreeMap<RolloutId, u64>,
        blocked: &mut Blocked,
        now_ms: u64,
        notes: &mut Notes,
    ) -> Result<Step, String> {
        let pass = Pass {
            requests: requests.into_iter().collect(),
            resent: BTreeSet::new(),
            gaps: VecDeque::new(),
            rejected: BTreeMap::new(),
            pause: None,
            sending: Sending::Batch(Vec::new()),
        };
        advance(queue, host, Box::new(pass), blocked, now_ms, notes)
    }

    /// The start of `resend_history`: the history from `from` up to the
    /// rollout's first pending event, or where it has a hole.
    enum Start {
        Done,
        Unavailable { seq: u64 },
        Send(Vec<HistoryEvent>),
    }

    fn start_resend(queue: &Queue, rollout_id: &RolloutId, from: u64) -> Start {
        let end = queue.first_pending_seq(rollout_id).unwrap_or_else(|| queue.last_seq(rollout_id).saturating_add(1));
        let history = queue.history_from(rollout_id, from);
        let want = crate::queue::first_missing_seq(&history, from);
        if want < end {
            return Start::Unavailable { seq: want };
        }
        if history.is_empty() {
            return Start::Done;
        }
        Start::Send(history)
    }

    fn send_chunk(host: &Hostname, mut pass: Box<Pass>) -> Step {
        let Sending::Resend { history, sent, chunk, .. } = &mut pass.sending else {
            unreachable!("send_chunk is only called for a re-send")
        };
        *chunk = (history.len() - *sent).min(MAX_BATCH_EVENTS);
        let batch = to_batch(host, history[*sent..*sent + *chunk].iter().map(|h| h.queued.clone()));
        Step::Send(batch, pass)
    }

    fn dead_letter(queue: &mut Queue, held: &[QueuedEvent], reason: &str, notes: &mut Notes) -> Result<(), String> {
        for q in held {
            queue.reject(q.qseq, reason).map_err(|e| e.to_string())?;
            notes.dead_lettered += 1;
            notes.lines.push(format!("{} seq {} dead-lettered: {reason}", q.rollout_id, q.seq()));
        }
        Ok(())
    }

    /// Goes on with the pass until something must be sent or it ends:
    /// Replay-From requests first, then the gaps of the last batch, then
    /// the next batch from the head of `pending/`.
    fn advance(
        queue: &mut Queue,
        host: &Hostname,
        mut pass: Box<Pass>,
        blocked: &mut Blocked,
        now_ms: u64,
        notes: &mut Notes,
    ) -> Result<Step, String> {
        while let Some((rollout_id, after)) = pass.requests.pop_front() {
            let from = after.saturating_add(1);
            if blocked_at(blocked, &rollout_id, from, now_ms).is_some() {
                continue;
            }
            match start_resend(queue, &rollout_id, from) {
                Start::Done => {}
                Start::Unavailable { seq } => {
                    let text = unavailable_reason(&rollout_id, seq);
                    notes.lines.push(text.clone());
                    blocked.insert(rollout_id, (from, text, now_ms));
                }
                Start::Send(history) => {
                    pass.sending =
                        Sending::Resend { why: ResendFor::Request { after }, rollout_id, history, sent: 0, chunk: 0 };
                    return Ok(send_chunk(host, pass));
                }
            }
        }
        while let Some((rollout_id, expected, held)) = pass.gaps.pop_front() {
            let dead_reason = if let Some((seq, why)) = pass.rejected.get(&rollout_id).filter(|(s, _)| *s == expected) {
                Some(refused_reason(&rollout_id, *seq, why))
            } else if let Some(text) = blocked_at(blocked, &rollout_id, expected, now_ms) {
                Some(text.to_owned())
            } else if !pass.resent.insert((rollout_id.clone(), expected)) {
                return Ok(Step::Pause {
                    why: format!("the CP still expects seq {expected} of {rollout_id} after a re-send"),
                    requeue: Vec::new(),
                });
            } else {
                notes.lines.push(format!("the CP lacks {rollout_id} from seq {expected}; re-sending its history"));
                match start_resend(queue, &rollout_id, expected) {
                    Start::Done => None,
                    Start::Unavailable { seq } => {
                        let text = unavailable_reason(&rollout_id, seq);
                        blocked.insert(rollout_id.clone(), (expected, text.clone(), now_ms));
                        Some(text)
                    }
                    Start::Send(history) => {
                        let why = ResendFor::Gap { expected, held };
                        pass.sending = Sending::Resend { why, rollout_id, history, sent: 0, chunk: 0 };
                        return Ok(send_chunk(host, pass));
                    }
                }
            };
            if let Some(reason) = dead_reason {
                dead_letter(queue, &held, &reason, notes)?;
            }
        }
        if let Some(why) = pass.pause.take() {
            return Ok(Step::Pause { why, requeue: Vec::new() });
        }
        let batch = queue.pending_head(MAX_BATCH_EVENTS);
        if batch.is_empty() {
            return Ok(Step::Done);
        }
        pass.rejected.clear();
        let out = to_batch(host, batch.iter().cloned());
        pass.sending = Sending::Batch(batch);
        Ok(Step::Send(out, pass))
    }

    /// The CP answered the request in flight.
    pub fn on_answer(
        queue: &mut Queue,
        host: &Hostname,
        mut pass: Box<Pass>,
        results: &[EventResult],
        blocked: &mut Blocked,
        now_ms: u64,
        notes: &mut Notes,
    ) -> Result<Step, String> {
        match std::mem::replace(&mut pass.sending, Sending::Batch(Vec::new())) {
            Sending::Batch(batch) => {
                if results.len() != batch.len() {
                    let why = format!("the CP answered {} results for {} events", results.len(), batch.len());
                    return Ok(Step::Pause { why, requeue: Vec::new() });
                }
                let mut moves: Vec<(u64, Option<String>)> = Vec::new();
                let mut gapped: BTreeMap<RolloutId, (u64, Vec<QueuedEvent>)> = BTreeMap::new();
                for (queued, result) in batch.iter().zip(results) {
                    if let Some((_, held)) = gapped.get_mut(&queued.rollout_id) {
                        held.push(queued.clone());
                        continue;
                    }
                    match result.status {
                        ResultStatus::Applied | ResultStatus::Duplicate => moves.push((queued.qseq, None)),
                        ResultStatus::Rejected => {
                            let reason =
                                result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                            notes.lines.push(format!("{} seq {} rejected: {reason}", queued.rollout_id, queued.seq()));
                            notes.dead_lettered += 1;
                            pass.rejected.insert(queued.rollout_id.clone(), (queued.seq(), reason.clone()));
                            moves.push((queued.qseq, Some(reason)));
                        }
                        ResultStatus::Gap => match result.expected_seq {
                            Some(expected) if expected < queued.seq() => {
                                gapped.insert(queued.rollout_id.clone(), (expected, vec![queued.clone()]));
                            }
                            _ => {
                                pass.pause = Some(format!(
                                    "the CP answered gap with expected seq {:?} for seq {}",
                                    result.expected_seq,
                                    queued.seq()
                                ));
                                break;
                            }
                        },
                        ResultStatus::Retry => {
                            pass.pause = Some(format!(
                                "the CP asked to retry: {}",
                                result.reason.clone().unwrap_or_else(|| "retry".to_owned())
                            ));
                            break;
                        }
                    }
                }
                for (qseq, rejected) in moves {
                    match rejected {
                        None => queue.ack(qseq),
                        Some(reason) => queue.reject(qseq, &reason),
                    }
                    .map_err(|e| e.to_string())?;
                }
                pass.gaps = gapped.into_iter().map(|(id, (expected, held))| (id, expected, held)).collect();
                advance(queue, host, pass, blocked, now_ms, notes)
            }
            Sending::Resend { why, rollout_id, history, sent, chunk } => {
                let part = &history[sent..sent + chunk];
                let mut revive = Vec::new();
                // None: this chunk went through; Some(Ok(..)) refused; Some(Err) pause.
                let mut outcome: Option<Result<(u64, String), String>> = None;
                for (h, result) in part.iter().zip(results) {
                    match result.status {
                        ResultStatus::Applied | ResultStatus::Duplicate => {
                            if h.dead {
                                revive.push(h.queued.qseq);
                            }
                        }
                        ResultStatus::Rejected => {
                            let reason =
                                result.reason.clone().unwrap_or_else(|| "rejected without a reason".to_owned());
                            outcome = Some(Ok((h.queued.seq(), reason)));
                            break;
                        }
                        ResultStatus::Retry | ResultStatus::Gap => {
                            outcome = Some(Err(format!(
                                "re-sending seq {} of {rollout_id}: the CP answered {:?} ({})",
                                h.queued.seq(),
                                result.status,
                                result.reason.as_deref().unwrap_or("")
                            )));
                            break;
                        }
                    }
                }
                if outcome.is_none() && results.len() != part.len() {
                    outcome = Some(Err(format!("the CP answered {} results for {} events", results.len(), part.len())));
                }
                for qseq in &revive {
                    queue.revive(*qseq).map_err(|e| e.to_string())?;
                }
                if !revive.is_empty() {
                    notes.revived += revive.len() as u64;
                    notes
                        .lines
                        .push(format!("{} dead letter(s) of {rollout_id} applied on re-send; revived", revive.len()));
                }
                if outcome.is_none() && sent + chunk < history.len() {
                    pass.sending = Sending::Resend { why, rollout_id, history, sent: sent + chunk, chunk: 0 };
                    return Ok(send_chunk(host, pass));
                }
                resend_over(queue, host, pass, why, rollout_id, outcome, blocked, now_ms, notes)
            }
        }
    }

    /// The request in flight failed (network, timeout, 503): the worker's
    /// `post_in_batches` stopped, so `drain_once` returns Err.
    pub fn on_failure(pass: Box<Pass>, why: &str) -> Step {
        let mut requeue: Vec<(RolloutId, u64)> = Vec::new();
        if let Sending::Resend { why: ResendFor::Request { after }, rollout_id, .. } = &pass.sending {
            // Keep this request and the ones not served yet.
            requeue.push((rollout_id.clone(), *after));
            requeue.extend(pass.requests.iter().cloned());
        }
        Step::Pause { why: why.to_owned(), requeue }
    }

    /// What `drain_once` does with the `Resent` outcome of a re-send.
    #[allow(clippy::too_many_arguments)]
    fn resend_over(
        queue: &mut Queue,
        host: &Hostname,
        pass: Box<Pass>,
        why: ResendFor,
        rollout_id: RolloutId,
        outcome: Option<Result<(u64, String), String>>,
        blocked: &mut Blocked,
        now_ms: u64,
        notes: &mut Notes,
    ) -> Result<Step, String> {
        match (why, outcome) {
            (_, None) => {}
            (ResendFor::Request { after }, Some(Err(why))) => {
                let mut requeue = vec![(rollout_id, after)];
                requeue.extend(pass.requests.iter().cloned());
                return Ok(Step::Pause { why, requeue });
            }
            (ResendFor::Gap { .. }, Some(Err(why))) => return Ok(Step::Pause { why, requeue: Vec::new() }),
            (ResendFor::Request { .. }, Some(Ok((seq, reason)))) => {
                let text = refused_reason(&rollout_id, seq, &reason);
                notes.lines.push(text.clone());
                blocked.insert(rollout_id, (seq, text, now_ms));
            }
            (ResendFor::Gap { held, .. }, Some(Ok((seq, reason)))) => {
                let text = refused_reason(&rollout_id, seq, &reason);
                blocked.insert(rollout_id, (seq, text.clone(), now_ms));
                dead_letter(queue, &held, &text, notes)?;
            }
        }
        advance(queue, host, pass, blocked, now_ms, notes)
    }
}
