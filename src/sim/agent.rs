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

/// The drainer's state (`workers/net/drain.rs::run_drain_worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drain {
    /// Waiting for a wake-up or the 15 s interval (timer token).
    Idle(u64),
    /// A request of a drain pass is on its way.
    InFlight { req: u64, pass: Box<delivery::Pass> },
    /// Backing off after a failure (timer token).
    Paused(u64),
}

/// The long-poll worker's state (`workers/net/longpoll.rs::run_longpoll_worker`).
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
    /// The number of the last `ActivationOrder` started (orders are
    /// numbered by the reducer; an older one is not started again).
    pub last_switch_order: u64,
    /// The number of the probe plan the probe timers belong to: a timer of
    /// an older plan is dropped.
    pub probe_plan_number: u64,
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
            last_switch_order: 0,
            probe_plan_number: 0,
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

    /// The reason of the dead letter of a rollout with this seq, if any.
    pub fn dead_reason(&self, rollout_id: &RolloutId, seq: u64) -> Option<String> {
        let dir = self.queue_dir().join(DEAD_DIR);
        self.storage.names(&dir).into_iter().filter(|n| record::is_event_name(n)).find_map(|name| {
            let ev = self.storage.read(&dir.join(&name)).and_then(|b| record::decode(&b).ok())?;
            if &ev.rollout_id != rollout_id || ev.event.seq != seq {
                return None;
            }
            let reason = self.storage.read(&dir.join(format!("{name}.reason")))?;
            DeadReason::decode(&reason).ok().map(|r| r.reason)
        })
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

pub mod delivery;
