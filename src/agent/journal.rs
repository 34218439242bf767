//! The agent's durable memory: the outbound queue as the reducer's
//! [`Journal`], the cache of signed manifests, and the rebuild of every
//! rollout's record at start, before any worker runs (a worker started
//! earlier would act on records that do not exist yet). Works with the control
//! plane down: nothing here talks to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use super::admission::{check_cached, verified_manifest, Refusal};
use super::channels::{ChannelHistory, ChannelsError};
use super::rebuild::{history, lost_records, History, LostRecord, Repair, Verdict};
use super::reducer::{Journal, JournalError};
use super::rollouts::Rollouts;
use crate::ids::{Hostname, RolloutId};
use crate::machine::{Event, HostState, Policy};
use crate::queue::{DeadCause, EntryState, Queue, QueueError, QueueView, QueuedEvent, QueuedRef, ViewError};
use crate::sign::{PublicKey, SignError};
use crate::wire::{Manifest, OutboundEvent};

/// A replay parameter, never a decision policy: the policy a rollout is
/// rebuilt under when no cached manifest proves its own AND the rollout can
/// never decide again (never accepted, or over; see `restore`). A rollout
/// that can still act is never given it.
pub const FALLBACK_POLICY: Policy =
    Policy { on_health_failure: crate::machine::OnHealthFailure::Halt, sustained_failure_secs: 60 };

/// Folder of cached DSSE envelopes inside the state dir, one per rollout.
pub const MANIFEST_DIR: &str = "manifests";

/// The queue shared by the reducer (enqueue), the drainer (ack, reject,
/// revive, prune) and the heartbeat and long-poll workers (read-only).
///
/// Runtime threads never wait on an fsync: the queue itself is locked only
/// on tokio's blocking pool ([`SharedQueue::with`]), where a call may hold
/// it across fsyncs; what the async workers read without I/O (the last seq
/// of every rollout) is a copy refreshed after every call, behind its own
/// lock that is held only to copy a small map. (Before, the heartbeat and
/// the long-poll locked the queue on a runtime thread and stalled it for as
/// long as the reducer's append was fsyncing.)
///
/// When the queue stops ([`QueueError::Poisoned`]: after a failed write
/// whose undo also failed, the state on disk is unknown), [`SharedQueue::stopped`]
/// resolves with the reason and the agent exits with an error naming the
/// queue; its service manager restarts it and reopening recovers from disk.
#[derive(Debug, Clone)]
pub struct SharedQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: Mutex<Queue>,
    dir: PathBuf,
    last_seqs: Mutex<BTreeMap<RolloutId, u64>>,
    stopped: watch::Sender<Option<String>>,
    /// Re-sends asked for (Replay-From), per rollout the lowest seq the CP
    /// has (re-send from the next one); the drainer takes them.
    resend: Mutex<BTreeMap<RolloutId, u64>>,
    resend_wake: Notify,
}

/// Why [`SharedQueue::append_event`] did not make an event durable.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A visibility event refused at the queue's soft cap
    /// ([`QueueError::SoftCapReached`]): nothing was written and the seq is
    /// not spent. Skip or coalesce it; retrying in a loop would block the
    /// reducer until the control plane is back.
    #[error("{0}")]
    SoftCap(QueueError),
    /// The hard limit ([`QueueError::Full`]): even a decisive event finds no
    /// room; retry with backoff (delivery frees room).
    #[error("{0}")]
    Full(QueueError),
    /// The queue stopped ([`QueueError::Poisoned`]); the agent is exiting
    /// (see [`SharedQueue::stopped`]). Retrying cannot succeed in this process.
    #[error("{0}")]
    Stopped(QueueError),
    /// Any other failure (disk full, I/O error): nothing is applied; retry
    /// with backoff.
    #[error("{0}")]
    Failed(QueueError),
    /// The blocking-pool task running the enqueue did not finish.
    #[error(transparent)]
    Task(#[from] QueueTaskError),
}

/// The blocking-pool task of [`SharedQueue::with`] did not finish (it
/// panicked, or the runtime is shutting down): whether the queue call ran is
/// unknown to the caller, which retries or pauses.
#[derive(Debug, thiserror::Error)]
#[error("the queue task on {} did not finish: {source}", dir.display())]
pub struct QueueTaskError {
    pub dir: PathBuf,
    #[source]
    pub source: tokio::task::JoinError,
}

impl AppendError {
    /// True for a visibility event refused at the soft cap.
    pub fn is_soft_cap(&self) -> bool {
        matches!(self, AppendError::SoftCap(_))
    }
}

/// The queue, locked, for synchronous code (tests, start-up); refreshes the
/// copies the async workers read when dropped.
#[derive(Debug)]
pub struct QueueGuard<'a> {
    guard: MutexGuard<'a, Queue>,
    inner: &'a Inner,
}

impl std::ops::Deref for QueueGuard<'_> {
    type Target = Queue;
    fn deref(&self) -> &Queue {
        &self.guard
    }
}

impl std::ops::DerefMut for QueueGuard<'_> {
    fn deref_mut(&mut self) -> &mut Queue {
        &mut self.guard
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.inner.after_use(&self.guard);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A poisoned lock only means a thread panicked while holding it; the
        // queue's own state is kept consistent by its write discipline.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After every use of the queue: refresh the copies and notice a stop.
    fn after_use(&self, queue: &Queue) {
        {
            let mut copy = self.last_seqs.lock().unwrap_or_else(|p| p.into_inner());
            if *copy != *queue.last_seqs() {
                copy.clone_from(queue.last_seqs());
            }
        }
        if let Some(why) = queue.poisoned() {
            self.stopped.send_if_modified(|stopped| {
                if stopped.is_some() {
                    return false;
                }
                tracing::error!(queue = %self.dir.display(), %why, "the agent's queue stopped; the agent exits");
                *stopped = Some(why.to_owned());
                true
            });
        }
    }
}

impl SharedQueue {
    pub fn new(queue: Queue) -> SharedQueue {
        let last_seqs = Mutex::new(queue.last_seqs().clone());
        let dir = queue.dir().to_owned();
        let (stopped, _) = watch::channel(None);
        let inner = Inner {
            queue: Mutex::new(queue),
            dir,
            last_seqs,
            stopped,
            resend: Mutex::new(BTreeMap::new()),
            resend_wake: Notify::new(),
        };
        let shared = SharedQueue { inner: Arc::new(inner) };
        shared.inner.after_use(&shared.inner.lock());
        shared
    }

    /// Locks the queue for a short synchronous use (tests, start-up). Never
    /// call it from async code: it blocks the runtime thread for as long as
    /// another thread holds the queue, which may be an fsync; async code
    /// uses [`SharedQueue::with`].
    pub fn lock(&self) -> QueueGuard<'_> {
        QueueGuard { guard: self.inner.lock(), inner: &self.inner }
    }

    /// Runs `f` on the queue on the blocking pool; the calling task waits
    /// without holding a runtime thread.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Queue) -> T + Send + 'static,
    ) -> Result<T, QueueTaskError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock();
            let out = f(&mut guard);
            inner.after_use(&guard);
            out
        })
        .await
        .map_err(|source| QueueTaskError { dir: self.inner.dir.clone(), source })
    }

    /// The queue folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The last seq of a rollout (0 if unknown), without waiting for the
    /// queue: safe on a runtime thread.
    pub fn last_seq(&self, rollout_id: &RolloutId) -> u64 {
        self.inner.last_seqs.lock().unwrap_or_else(|p| p.into_inner()).get(rollout_id).copied().unwrap_or(0)
    }

    /// The last seq of every rollout, without waiting for the queue.
    pub fn last_seqs(&self) -> BTreeMap<RolloutId, u64> {
        self.inner.last_seqs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resolves with the reason once the queue has stopped (poisoned).
    pub async fn stopped(&self) -> String {
        let mut rx = self.inner.stopped.subscribe();
        // The sender lives in `inner`, which `self` keeps alive, so this
        // only ends with a reason.
        let why: Option<String> = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        why.unwrap_or_default()
    }

    /// Why the queue stopped, if it has.
    pub fn stop_reason(&self) -> Option<String> {
        self.inner.stopped.borrow().clone()
    }

    /// Asks the drainer to re-send a rollout's events after `after_seq`
    /// (the control plane's Replay-From): the drainer is the one sender, so
    /// re-sends and new events reach the CP in seq order.
    pub fn request_resend(&self, rollout_id: RolloutId, after_seq: u64) {
        {
            let mut resend = self.inner.resend.lock().unwrap_or_else(|p| p.into_inner());
            let after = resend.entry(rollout_id).or_insert(after_seq);
            *after = (*after).min(after_seq);
        }
        self.inner.resend_wake.notify_one();
    }

    /// The re-sends asked for since the last call.
    pub fn take_resend_requests(&self) -> BTreeMap<RolloutId, u64> {
        std::mem::take(&mut *self.inner.resend.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Woken when a re-send is asked for.
    pub fn resend_wake(&self) -> &Notify {
        &self.inner.resend_wake
    }

    /// Makes one event durable (write-ahead), off the runtime threads.
    pub async fn append_event(&self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<QueuedRef, AppendError> {
        let (rollout_id, event) = (rollout_id.clone(), event.clone());
        match self.with(move |q| q.enqueue(&rollout_id, &event)).await {
            Ok(Ok(queued)) => Ok(queued),
            Ok(Err(e @ QueueError::SoftCapReached { .. })) => Err(AppendError::SoftCap(e)),
            Ok(Err(e @ QueueError::Poisoned(_))) => Err(AppendError::Stopped(e)),
            Ok(Err(e @ QueueError::Full { .. })) => Err(AppendError::Full(e)),
            Ok(Err(e)) => Err(AppendError::Failed(e)),
            Err(e) => Err(AppendError::Task(e)),
        }
    }
}

impl Journal for SharedQueue {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), JournalError> {
        // A visibility event at the soft cap, or any event at the hard cap:
        // the reducer skips the first kind and retries the decisive ones
        // (they use the reserve).
        self.append_event(rollout_id, event).await.map(|_| ()).map_err(|e| match e {
            AppendError::SoftCap(e) | AppendError::Full(e) => JournalError::Full(e.to_string()),
            other => JournalError::Failed(other.to_string()),
        })
    }
}

/// Signed manifests the agent acted on, kept so a restart can re-verify
/// them and recover each rollout's policy without the control plane. Next
/// to each envelope, `{rollout}.key` holds the public key that verified it
/// when the dispatch was accepted (trust keys may rotate later).
#[derive(Debug, Clone)]
pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    pub fn new(state_dir: &Path) -> ManifestCache {
        ManifestCache { dir: state_dir.join(MANIFEST_DIR) }
    }

    /// The cached envelope of a rollout.
    pub fn path(&self, rollout_id: &RolloutId) -> PathBuf {
        // Rollout ids are `[a-z0-9_-]@[A-Za-z0-9._-]`: safe as a file name.
        self.dir.join(format!("{rollout_id}.json"))
    }

    fn key_path(&self, rollout_id: &RolloutId) -> PathBuf {
        self.dir.join(format!("{rollout_id}.key"))
    }

    /// Stores the key that verified the envelope, then the envelope, each
    /// durably (tmp, fsync, rename, fsync dir), before the agent
    /// acknowledges the dispatch. Key first: an envelope written by this
    /// version always has its key beside it.
    pub fn store(&self, rollout_id: &RolloutId, envelope: &[u8], verified_by: &PublicKey) -> std::io::Result<()> {
        fs_err::create_dir_all(&self.dir)?;
        let key = format!("{}\n", verified_by.to_text());
        write_durably(&self.dir, &self.key_path(rollout_id), key.as_bytes())?;
        write_durably(&self.dir, &self.path(rollout_id), envelope)
    }

    pub fn load(&self, rollout_id: &RolloutId) -> std::io::Result<Option<Vec<u8>>> {
        read_optional(&self.path(rollout_id))
    }

    /// The key recorded when the rollout was accepted (None: none recorded,
    /// e.g. cached by an older agent).
    pub fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError> {
        let path = self.key_path(rollout_id);
        let read =
            read_optional(&path).map_err(|source| CachedManifestError::ReadKey { path: path.clone(), source })?;
        let Some(bytes) = read else { return Ok(None) };
        let text = String::from_utf8_lossy(&bytes);
        PublicKey::from_text(&text).map(Some).map_err(|source| CachedManifestError::BadKey { path, source })
    }
}

fn read_optional(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match fs_err::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut file = fs_err::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs_err::rename(&tmp, path)?;
    fs_err::File::open(dir)?.sync_all()
}

/// Why [`restore`] cannot rebuild the agent's state (the agent does not
/// start).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The queue's `dead/` folder cannot be listed or read.
    #[error("cannot read the rejected events of the queue in {}: {source}", state_dir.display())]
    ReadQueue { state_dir: PathBuf, source: ViewError },
    /// The accepted-channels file (no downgrade) cannot be read.
    #[error(transparent)]
    Channels(#[from] ChannelsError),
    /// A rollout that can still decide has no manifest that proves its
    /// policy; guessing one could make the agent act on the wrong policy.
    #[error(
        "rollout {rollout_id} is still under way on this host but its manifest cannot be proven ({why}; file {}): refusing to guess its policy. Restore the trust key that accepted it, or finish the rollout by hand and remove its events from {}",
        file.display(),
        queue_dir.display()
    )]
    Unproven { rollout_id: RolloutId, why: Box<CachedManifestError>, file: PathBuf, queue_dir: PathBuf },
    /// A rollout that may still act on the host (accepted, and no readable
    /// event ends it) lost records that cannot be rebuilt: carrying on
    /// without it would leave the host unsupervised without saying so.
    #[error(
        "rollout {rollout_id} may still be under way on this host, but its history cannot be rebuilt ({why}); the agent does not start rather than leave the host unsupervised: check what the host runs (/run/current-system), finish or roll back the rollout by hand, then move its records out of {}",
        queue_dir.display()
    )]
    Lost { rollout_id: RolloutId, why: String, queue_dir: PathBuf },
}

/// Why a rollout's cached manifest proves nothing ([`cached_manifest`]).
#[derive(Debug, thiserror::Error)]
pub enum CachedManifestError {
    #[error("cannot read the cached manifest {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("no cached manifest")]
    Missing { path: PathBuf },
    #[error("cannot read the key recorded when it was accepted, {}: {source}", path.display())]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    BadKey { path: PathBuf, source: SignError },
    /// The current trust keys refuse it and no key was recorded at
    /// acceptance (cached by an older agent).
    #[error("{now} (and no key was recorded when it was accepted)")]
    NoKeyRecorded { now: Box<Refusal> },
    /// Neither the current trust keys nor the key recorded at acceptance
    /// verify it.
    #[error("{now}; with key {keyid} that accepted it: {then}")]
    Refused { now: Box<Refusal>, keyid: String, then: Box<Refusal> },
}

/// What the start-up rebuild did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<RolloutId>,
    /// Rollouts whose first events were pruned by retention (old, finished
    /// history): known only by their last seq.
    pub pruned: Vec<RolloutId>,
    /// Rebuilt although no cached manifest verifies, because the rollout
    /// can never decide anything again (never accepted, or over): its
    /// policy is a replay parameter only ([`FALLBACK_POLICY`]), with why.
    pub without_manifest: Vec<(RolloutId, String)>,
    /// Rebuilt under the manifest verified when the dispatch was accepted,
    /// whose key this host no longer trusts: (rollout, keyid).
    pub untrusted_key: Vec<(RolloutId, String)>,
    /// Rollouts rebuilt although records of theirs were lost (see
    /// `agent::rebuild`), with what was rebuilt or bridged; logged at ERROR.
    pub rebuilt: Vec<(RolloutId, String)>,
    /// Rollouts that could not be rebuilt and no longer act on the host (a
    /// corrupt or missing record, a history that does not replay), with the
    /// reason; logged at ERROR and counted as a problem by `nixfleet replay
    /// --state-dir`. A rollout that may still act is a [`RestoreError::Lost`].
    pub skipped: Vec<(RolloutId, String)>,
}

/// A cached manifest that still proves what the host accepted.
#[derive(Debug, Clone)]
pub struct CachedManifest {
    pub manifest: crate::wire::Manifest,
    /// `Some(keyid)` when only the key recorded at acceptance verifies it
    /// (the trust keys changed since).
    pub no_longer_trusted: Option<String>,
}

/// Rebuilds every rollout from the queue: pending + acked events, plus
/// events the CP rejected (the agent applied them before sending, so they
/// are part of its history), each rollout under the policy of its cached
/// manifest, re-verified.
///
/// Trust-key rotation (decision): a rollout whose envelope no longer
/// verifies with the current trust keys but does with the key recorded when
/// it was accepted is FINISHED under that manifest, with a WARN naming the
/// rollout and the key. The host already runs its closure; refusing to
/// finish would leave it unsupervised (no gate, no rollback, the CP
/// Soaking forever), and inventing a policy is what made the CP refuse the
/// agent's Failed event. Rotation stops NEW manifests signed by the old key
/// (admission uses the current keys only). A live rollout whose manifest
/// cannot be proven at all (missing, corrupt, or cached without its key by
/// an older agent) is an error that stops the agent, naming the rollout and
/// the file: it cannot be finished without a policy and must not be guessed.
pub fn restore(
    queue: &Queue,
    state_dir: &Path,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), RestoreError> {
    restore_from(queue, &StateDirFiles::new(state_dir), hostname, trust_keys)
}

/// What the restart rebuild reads besides the open queue: the agent's
/// files next to it. [`StateDirFiles`] reads them from the state dir (the
/// daemon); `nixfleet sim` keeps them in memory (one shared copy of each
/// envelope for thousands of simulated hosts). Every decision stays in
/// [`restore_from`].
pub trait RestoreSource {
    /// The events of `dead/` the CP rejected (see [`recorded_events`]).
    fn dead_letters(&self) -> Result<Vec<QueuedEvent>, RestoreError>;
    /// (file name, reason) of the records of `dead/` that are not rejected
    /// events (see [`corrupt_records`]).
    fn corrupt_records(&self) -> Result<Vec<(String, String)>, RestoreError>;
    /// The no-downgrade history (`accepted-channels.json`).
    fn channel_history(&self) -> Result<ChannelHistory, RestoreError>;
    /// The cached envelope of a rollout ([`CachedManifestError::Missing`]:
    /// none cached).
    fn cached_envelope(&self, rollout_id: &RolloutId) -> Result<Arc<[u8]>, CachedManifestError>;
    /// The key recorded when the rollout was accepted (see
    /// [`ManifestCache::accepted_key`]).
    fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError>;
    /// Where the cached envelope is, for messages.
    fn manifest_path(&self, rollout_id: &RolloutId) -> PathBuf;
    /// The signature check of a cached envelope (default:
    /// [`verified_manifest`]). Seam for `nixfleet sim`, which checks each
    /// (envelope, keys) once for all its hosts.
    fn verify_envelope(&self, trust_keys: &[PublicKey], envelope: &[u8]) -> Result<Arc<Manifest>, Refusal> {
        verified_manifest(trust_keys, envelope).map(Arc::new)
    }
}

/// The daemon's [`RestoreSource`]: the files of the state dir.
#[derive(Debug, Clone)]
pub struct StateDirFiles<'a> {
    state_dir: &'a Path,
    cache: ManifestCache,
}

impl<'a> StateDirFiles<'a> {
    pub fn new(state_dir: &'a Path) -> StateDirFiles<'a> {
        StateDirFiles { state_dir, cache: ManifestCache::new(state_dir) }
    }

    fn read_dead(&self, source: ViewError) -> RestoreError {
        RestoreError::ReadQueue { state_dir: self.state_dir.to_owned(), source }
    }
}

impl RestoreSource for StateDirFiles<'_> {
    fn dead_letters(&self) -> Result<Vec<QueuedEvent>, RestoreError> {
        recorded_events(self.state_dir, &[EntryState::Dead]).map_err(|e| self.read_dead(e))
    }

    fn corrupt_records(&self) -> Result<Vec<(String, String)>, RestoreError> {
        corrupt_records(self.state_dir).map_err(|e| self.read_dead(e))
    }

    fn channel_history(&self) -> Result<ChannelHistory, RestoreError> {
        Ok(ChannelHistory::load(self.state_dir)?)
    }

    fn cached_envelope(&self, rollout_id: &RolloutId) -> Result<Arc<[u8]>, CachedManifestError> {
        let path = self.cache.path(rollout_id);
        let bytes = self
            .cache
            .load(rollout_id)
            .map_err(|source| CachedManifestError::Read { path: path.clone(), source })?
            .ok_or(CachedManifestError::Missing { path })?;
        Ok(Arc::from(bytes))
    }

    fn accepted_key(&self, rollout_id: &RolloutId) -> Result<Option<PublicKey>, CachedManifestError> {
        self.cache.accepted_key(rollout_id)
    }

    fn manifest_path(&self, rollout_id: &RolloutId) -> PathBuf {
        self.cache.path(rollout_id)
    }
}

/// [`restore`] with the agent's files read through `source`.
pub fn restore_from(
    queue: &Queue,
    source: &dyn RestoreSource,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), RestoreError> {
    let mut journals: BTreeMap<RolloutId, Vec<(u64, OutboundEvent)>> = BTreeMap::new();
    for (rollout_id, _) in queue.rollouts() {
        let events = queue.events_after(&rollout_id, 0).into_iter().map(|q| (q.qseq, q.event));
        journals.entry(rollout_id).or_default().extend(events);
    }
    for q in source.dead_letters()? {
        journals.entry(q.rollout_id).or_default().push((q.qseq, q.event));
    }
    let corrupt = source.corrupt_records()?;
    let with_pending: std::collections::BTreeSet<RolloutId> =
        queue.pending().into_iter().map(|q| q.rollout_id).collect();
    let mut rebuild = Rebuild {
        source,
        hostname,
        trust_keys,
        queue_dir: queue.dir(),
        rollouts: Rollouts::new(hostname.clone()),
        channels: source.channel_history()?,
        report: RestoreReport::default(),
    };
    for (rollout_id, events) in journals {
        let lost = lost_records(&corrupt, hostname, &rollout_id);
        let pending = with_pending.contains(&rollout_id);
        let acceptance = rebuild.channels.dispatch_of(&rollout_id).cloned();
        match history(&rollout_id, events.clone(), &lost, pending, acceptance.as_ref()) {
            Verdict::Pruned => rebuild.report.pruned.push(rollout_id),
            Verdict::Lost(why) => rebuild.lost(rollout_id, &events, &lost, why)?,
            Verdict::Complete(history) => rebuild.one(rollout_id, history)?,
        }
    }
    let Rebuild { mut rollouts, channels, report, .. } = rebuild;
    rollouts.set_channels(channels);
    Ok((rollouts, report))
}

/// The state of one start-up rebuild, rollout by rollout.
struct Rebuild<'a> {
    source: &'a dyn RestoreSource,
    hostname: &'a Hostname,
    trust_keys: &'a [PublicKey],
    queue_dir: &'a Path,
    rollouts: Rollouts,
    channels: ChannelHistory,
    report: RestoreReport,
}

impl Rebuild<'_> {
    /// A rollout whose history is complete (or repaired): its policy from
    /// the cached manifest, then the replay.
    fn one(&mut self, rollout_id: RolloutId, history: History) -> Result<(), RestoreError> {
        let journal = match history.events.iter().map(OutboundEvent::to_local).collect::<Result<Vec<Event>, _>>() {
            Ok(j) => j,
            Err(e) => {
                let why = format!("an event does not convert: {e}");
                tracing::error!(%rollout_id, %why, "rollout NOT rebuilt");
                self.report.skipped.push((rollout_id, why));
                return Ok(());
            }
        };
        let (policy, manifest) = self.policy(&rollout_id, &journal)?;
        let repaired = !history.repairs.is_empty();
        if repaired {
            if let Err(why) = check_rebuilt_ack(&history, manifest.as_deref(), self.hostname) {
                return self.not_rebuilt(rollout_id, &journal, why);
            }
        }
        match self.rollouts.restore_bridged(rollout_id.clone(), policy, &journal, &history.bridged) {
            Ok(()) if repaired => {
                let what: Vec<String> = history.repairs.iter().map(ToString::to_string).collect();
                let what = what.join("; ");
                tracing::error!(%rollout_id, repaired = %what, "part of the rollout's history was lost and is rebuilt; the rollout carries on under supervision");
                self.report.rebuilt.push((rollout_id.clone(), what));
                self.report.restored.push(rollout_id);
                Ok(())
            }
            Ok(()) => {
                self.report.restored.push(rollout_id);
                Ok(())
            }
            Err(e) => self.not_rebuilt(rollout_id, &journal, format!("its history does not replay: {e}")),
        }
    }

    /// The rollout's policy from its verified cached manifest (and the
    /// manifest), or the replay-only fallback for a rollout that can never
    /// decide again; an unproven live rollout stops the agent.
    fn policy(
        &mut self,
        rollout_id: &RolloutId,
        journal: &[Event],
    ) -> Result<(Policy, Option<Arc<Manifest>>), RestoreError> {
        let source = self.source;
        let cached = source.cached_envelope(rollout_id).and_then(|bytes| {
            let verify = |keys: &[PublicKey], bytes: &[u8]| source.verify_envelope(keys, bytes);
            verify_cached(
                &bytes,
                || source.accepted_key(rollout_id),
                rollout_id,
                self.hostname,
                self.trust_keys,
                &verify,
            )
        });
        match cached {
            Ok((manifest, no_longer_trusted)) => {
                if let Some(keyid) = &no_longer_trusted {
                    tracing::warn!(
                        %rollout_id, %keyid,
                        "the rollout's manifest was verified by key {keyid} when it was accepted; this host no longer trusts that key, and the rollout is finished under that manifest (new manifests need a trusted key)"
                    );
                    self.report.untrusted_key.push((rollout_id.clone(), keyid.clone()));
                }
                let accepted = journal.iter().any(|e| matches!(e.body, crate::machine::EventBody::Activate { .. }));
                if accepted {
                    let offered = super::channels::Accepted {
                        rollout_id: manifest.rollout_id.clone(),
                        issued_at: manifest.issued_at,
                        dispatch: None,
                    };
                    self.channels = self.channels.with(offered);
                }
                Ok((manifest.machine_policy(), Some(manifest)))
            }
            Err(why) => {
                // Only a rollout that can never decide again may be rebuilt
                // without its policy (the fallback is then a replay
                // parameter, never consulted for a decision).
                let mut probe = Rollouts::new(self.hostname.clone());
                let over = probe.restore(rollout_id.clone(), FALLBACK_POLICY, journal).is_ok()
                    && probe.get(rollout_id).is_some_and(|s| never_decides_again(s, journal));
                if !over {
                    return Err(RestoreError::Unproven {
                        file: source.manifest_path(rollout_id),
                        queue_dir: self.queue_dir.to_owned(),
                        rollout_id: rollout_id.clone(),
                        why: Box::new(why),
                    });
                }
                self.report.without_manifest.push((rollout_id.clone(), why.to_string()));
                Ok((FALLBACK_POLICY, None))
            }
        }
    }

    /// A history that cannot be rebuilt (`why`): a rollout that may still
    /// act on the host stops the agent; one that is over is skipped, loudly.
    fn lost(
        &mut self,
        rollout_id: RolloutId,
        events: &[(u64, OutboundEvent)],
        lost: &[LostRecord],
        why: String,
    ) -> Result<(), RestoreError> {
        let kinds = events.iter().map(|(_, e)| e.kind()).chain(lost.iter().map(|l| l.kind.as_str()));
        let over = events.iter().any(|(_, e)| ends_the_rollout(e));
        let accepted = kinds.into_iter().any(|k| k != "DispatchRejected");
        if accepted && !over {
            return Err(RestoreError::Lost { rollout_id, why, queue_dir: self.queue_dir.to_owned() });
        }
        tracing::error!(%rollout_id, %why, "rollout NOT rebuilt: part of its history is lost (it no longer acts on the host)");
        self.report.skipped.push((rollout_id, why));
        Ok(())
    }

    /// A repaired history that does not hold: as [`Rebuild::lost`].
    fn not_rebuilt(&mut self, rollout_id: RolloutId, journal: &[Event], why: String) -> Result<(), RestoreError> {
        let events: Vec<(u64, OutboundEvent)> =
            journal.iter().map(|e| (0, OutboundEvent::from_machine(e.seq, &e.body))).collect();
        self.lost(rollout_id, &events, &[], why)
    }
}

/// True for an event after which the rollout never acts on the host again
/// (converged, rolled back, a failed rollback, refused, halted).
fn ends_the_rollout(event: &OutboundEvent) -> bool {
    use crate::machine::{EventBody as B, OnHealthFailure, RejectCode};
    match event.to_body() {
        Ok(B::ConvergedReached { .. } | B::RollbackCompleted { .. } | B::RollbackFailed { .. }) => true,
        Ok(B::DispatchRejected { code, .. }) => code != RejectCode::Busy,
        Ok(B::SustainedFailureCrossed { policy_applied, .. }) => policy_applied == OnHealthFailure::Halt,
        _ => false,
    }
}

/// A rebuilt DispatchAck must be the one the verified manifest allows this
/// host: its target and its wave's soak.
fn check_rebuilt_ack(history: &History, manifest: Option<&Manifest>, hostname: &Hostname) -> Result<(), String> {
    use crate::machine::EventBody as B;
    let rebuilt: Vec<u64> = history
        .repairs
        .iter()
        .filter_map(|r| match r {
            Repair::Rebuilt { seq, kind, .. } if kind == "DispatchAck" => Some(*seq),
            _ => None,
        })
        .collect();
    for event in history.events.iter().filter(|e| rebuilt.contains(&e.seq)) {
        let Ok(B::Activate { target_closure, soak_secs, .. }) = event.to_body() else { continue };
        let Some(manifest) = manifest else {
            return Err("its DispatchAck is lost and no verified manifest confirms the kept acceptance".to_owned());
        };
        let entry = manifest.hosts.get(hostname);
        let soak = entry.and_then(|e| manifest.waves.get(e.wave)).map(|w| w.soak_secs);
        if entry.map(|e| &e.target_closure) != Some(&target_closure) || soak != Some(soak_secs) {
            return Err(format!(
                "the acceptance kept in accepted-channels.json ({target_closure}, soak {soak_secs} s) is not what the verified manifest gives this host"
            ));
        }
    }
    Ok(())
}

/// True when no decision of this rollout can follow: never accepted
/// (refused, stale, busy), or ended in a way that does not depend on the
/// policy (converged, reverted, a rollback that failed, halted by a
/// sustained failure whose event names the policy).
fn never_decides_again(slot: &super::rollouts::Slot, journal: &[Event]) -> bool {
    use crate::machine::{EventBody as B, OnHealthFailure};
    let accepted = journal.iter().any(|e| matches!(e.body, B::Activate { .. }));
    if !accepted {
        return true;
    }
    let r = &slot.record;
    match r.state {
        HostState::Converged | HostState::Reverted => true,
        HostState::Failed => {
            r.rollback_failure.is_some()
                || journal
                    .iter()
                    .any(|e| matches!(e.body, B::SustainedFailureCrossed { policy_applied: OnHealthFailure::Halt, .. }))
        }
        _ => false,
    }
}

/// The manifest of a rollout from its cached envelope, verified with
/// `trust_keys`, or else with the key recorded when it was accepted; Err
/// says why neither works.
pub fn cached_manifest(
    cache: &ManifestCache,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<CachedManifest, CachedManifestError> {
    let path = cache.path(rollout_id);
    let bytes = cache
        .load(rollout_id)
        .map_err(|source| CachedManifestError::Read { path: path.clone(), source })?
        .ok_or(CachedManifestError::Missing { path })?;
    let verify = |keys: &[PublicKey], bytes: &[u8]| verified_manifest(keys, bytes).map(Arc::new);
    verify_cached(&bytes, || cache.accepted_key(rollout_id), rollout_id, hostname, trust_keys, &verify).map(
        |(manifest, no_longer_trusted)| CachedManifest { manifest: Arc::unwrap_or_clone(manifest), no_longer_trusted },
    )
}

/// Verifies a signed envelope with the given keys.
type Verify<'a> = &'a dyn Fn(&[PublicKey], &[u8]) -> Result<Arc<Manifest>, Refusal>;

/// [`cached_manifest`] once the envelope is read (`admission::admit_cached`
/// with the signature check passed in): the manifest, and `Some(keyid)`
/// when only the key recorded at acceptance verifies it. `accepted_key` is
/// asked only when the current trust keys do not verify it.
fn verify_cached(
    bytes: &[u8],
    accepted_key: impl FnOnce() -> Result<Option<PublicKey>, CachedManifestError>,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
    verify: Verify<'_>,
) -> Result<(Arc<Manifest>, Option<String>), CachedManifestError> {
    let admit = |keys: &[PublicKey]| -> Result<Arc<Manifest>, Refusal> {
        let manifest = verify(keys, bytes)?;
        check_cached(hostname, &manifest, rollout_id)?;
        Ok(manifest)
    };
    let now = match admit(trust_keys) {
        Ok(manifest) => return Ok((manifest, None)),
        Err(e) => e,
    };
    let Some(key) = accepted_key()? else {
        return Err(CachedManifestError::NoKeyRecorded { now: Box::new(now) });
    };
    let keyid = key.keyid();
    admit(&[key]).map(|manifest| (manifest, Some(keyid.clone()))).map_err(|then| CachedManifestError::Refused {
        now: Box::new(now),
        keyid,
        then: Box::new(then),
    })
}

/// The policy of a rollout from its cached manifest (see
/// [`cached_manifest`]); Err says why there is none.
pub fn cached_policy(
    cache: &ManifestCache,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<Policy, CachedManifestError> {
    cached_manifest(cache, rollout_id, hostname, trust_keys).map(|c| c.manifest.machine_policy())
}

/// The events of the given folders of an agent's queue, read lock-free:
/// every record in `pending/` and `acked/`, and in `dead/` only those the
/// CP rejected (an unreadable file is no event). For the restart rebuild
/// (rejected events only; the open queue holds the rest) and `replay`.
pub fn recorded_events(state_dir: &Path, folders: &[EntryState]) -> Result<Vec<QueuedEvent>, ViewError> {
    let view = QueueView::open(state_dir)?;
    let mut out = Vec::new();
    for entry in view.list(folders)? {
        let Ok(inspected) = view.inspect(entry.name()) else { continue };
        let corrupt = inspected.dead_reason.as_ref().is_some_and(|r| r.cause != DeadCause::Rejected);
        let unexplained_dead = entry.folder == EntryState::Dead && inspected.dead_reason.is_none();
        if let (false, false, Ok(record)) = (corrupt, unexplained_dead, inspected.record) {
            out.push(record);
        }
    }
    Ok(out)
}

/// (file name, reason) of every record in `dead/` that is not a rejected
/// event: unreadable at start-up (corrupt) or without its reason.
pub fn corrupt_records(state_dir: &Path) -> Result<Vec<(String, String)>, ViewError> {
    let view = QueueView::open(state_dir)?;
    let mut out = Vec::new();
    for entry in view.list(&[EntryState::Dead])? {
        let rejected =
            view.inspect(entry.name()).ok().and_then(|i| i.dead_reason).is_some_and(|r| r.cause == DeadCause::Rejected);
        if !rejected {
            let reason = entry.reason.clone().unwrap_or_else(|| "no reason recorded".to_owned());
            out.push((entry.name().to_owned(), reason));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::agent::reducer::{commands, Input, Reducer};
    use crate::clock::ClockHandle;
    use crate::ids::Closure;
    use crate::ids::RolloutId;
    use crate::machine::HostState;
    use crate::queue::QueueConfig;
    use crate::sign::{sign_envelope, SigningKey};
    use crate::wire::Manifest;

    const MANIFEST: &str = include_str!("../../examples/manifest.json");

    fn setup(dir: &Path) -> (SharedQueue, PublicKey, Manifest) {
        let key = SigningKey::from_seed(&[3; 32]);
        let manifest = Manifest::parse(MANIFEST.as_bytes()).expect("valid");
        let envelope = serde_json::to_vec(&sign_envelope(&key, MANIFEST.as_bytes())).expect("json");
        ManifestCache::new(dir).store(&manifest.rollout_id, &envelope, &key.public_key()).expect("cache");
        let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let queue = Queue::open(dir, host(), QueueConfig::default(), clock).expect("open queue");
        (SharedQueue::new(queue), key.public_key(), manifest)
    }

    fn host() -> Hostname {
        Hostname::parse("web-1").expect("valid")
    }

    fn dispatch(manifest: &Manifest) -> Input {
        Input::Dispatch {
            rollout_id: manifest.rollout_id.clone(),
            policy: manifest.machine_policy(),
            target_closure: manifest.hosts[&host()].target_closure.clone(),
            soak_secs: 300,
            current_closure: Closure::parse("/nix/store/00000000000000000000000000000000-old").expect("valid"),
            issued_at: manifest.issued_at,
            at: datetime!(2026-11-25 12:00 UTC),
        }
    }

    #[test]
    fn async_workers_never_lock_the_queue_on_a_runtime_thread() {
        // Proves, by reading the source, that the workers and the runtime use
        // only `SharedQueue::with` (blocking pool) and the lock-free copies:
        // `lock()` there would stall a runtime thread behind an fsync.
        for (file, source) in
            [("workers/net.rs", include_str!("workers/net.rs")), ("runtime.rs", include_str!("runtime.rs"))]
        {
            assert!(!source.contains(".lock()"), "src/agent/{file} locks something on a runtime thread");
        }
    }

    #[tokio::test]
    async fn the_real_queue_at_its_soft_cap_tells_the_reducer_full_for_visibility_and_keeps_room_for_decisions() {
        // Proves the glue between the queue's caps and the reducer: at the
        // soft cap a visibility event is `JournalError::Full` (the reducer
        // skips it, never loops), a decisive event still lands in the
        // reserve, and at the hard cap a decisive event is `Full` too.
        use crate::machine::{EventBody, ProbeMode, ProbeStatus};
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ClockHandle::manual(datetime!(2026-11-25 12:00 UTC));
        let config = QueueConfig { pending_soft_max_count: 2, pending_max_count: 3, ..QueueConfig::default() };
        let mut queue = SharedQueue::new(Queue::open(dir.path(), host(), config, clock).expect("open"));
        let id = RolloutId::parse("stable@r1").expect("id");
        let t = datetime!(2026-11-25 12:00 UTC);
        let closure = Closure::parse("/nix/store/00000000000000000000000000000000-new").expect("closure");
        let started = |seq| {
            OutboundEvent::from_machine(
                seq,
                &EventBody::ActivationStarted { started_at: t, switch_method: "direct".into() },
            )
        };
        let probe = |seq| {
            OutboundEvent::from_machine(
                seq,
                &EventBody::ProbeResult {
                    probe_name: "web".into(),
                    mode: ProbeMode::Enforce,
                    status: ProbeStatus::Fail,
                    observed_at: t,
                    failure_reason: None,
                },
            )
        };
        let decisive = |seq| {
            OutboundEvent::from_machine(
                seq,
                &EventBody::ActivationFailed { exit_code: 1, stderr_tail: String::new(), failed_at: t },
            )
        };
        let ack = OutboundEvent::from_machine(
            1,
            &EventBody::Activate {
                current_closure_at_dispatch: closure.clone(),
                target_closure: closure,
                soak_secs: 1,
                received_at: t,
            },
        );
        queue.append(&id, &ack).await.expect("below the soft cap");
        queue.append(&id, &started(2)).await.expect("below the soft cap");
        let refused = queue.append(&id, &probe(3)).await;
        assert!(matches!(refused, Err(JournalError::Full(_))), "{refused:?}");
        queue.append(&id, &decisive(3)).await.expect("the reserve takes a decisive event (the seq was not spent)");
        let refused = queue.append(&id, &decisive(4)).await;
        assert!(matches!(refused, Err(JournalError::Full(_))), "{refused:?}");
    }

    #[tokio::test]
    async fn events_journaled_through_the_real_queue_rebuild_the_record_after_a_restart() {
        // Proves the agent's restart path on real files: the reducer writes
        // through the queue, a new process (queue reopened) rebuilds the same
        // record from pending + acked + rejected events and the cached manifest.
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, public, manifest) = setup(dir.path());
        let (cmds, _rx) = commands();
        let (mut reducer, _snap) = Reducer::new(Rollouts::new(host()), queue.clone(), cmds);
        reducer.handle(dispatch(&manifest)).await;
        let rid = manifest.rollout_id.clone();
        reducer
            .handle(Input::ActivationStarted {
                rollout_id: rid.clone(),
                switch_method: "setsid".into(),
                at: datetime!(2026-11-25 12:00:01 UTC),
            })
            .await;
        let live = reducer.rollouts().get(&rid).expect("slot").clone();
        assert_eq!(live.record.state, HostState::Activating);
        {
            // The CP acked the first event and rejected the second.
            let mut q = queue.lock();
            let pending = q.pending();
            q.ack(pending[0].qseq).expect("ack");
            q.reject(pending[1].qseq, "illegal for the CP's record").expect("reject");
            assert!(q.pending().is_empty());
        }
        drop(reducer);
        drop(queue);

        let reopened = Queue::open(
            dir.path(),
            host(),
            QueueConfig::default(),
            ClockHandle::manual(datetime!(2026-11-25 13:00 UTC)),
        )
        .expect("reopen");
        let (rollouts, report) = restore(&reopened, dir.path(), &host(), &[public]).expect("restore");
        assert_eq!(report.restored, vec![rid.clone()]);
        assert_eq!(rollouts.get(&rid), Some(&live), "rejected events are part of the agent's history");
        assert_eq!(reopened.next_seq(&rid), live.record.last_seq + 1, "queue and record agree on the next seq");
    }

    #[tokio::test]
    async fn a_rollout_accepted_under_a_key_no_longer_trusted_is_finished_under_its_accepted_manifest() {
        // Proves the trust-key rotation decision: the restarted agent keeps
        // the policy verified at acceptance (key recorded beside the
        // envelope) and reports the key, instead of inventing a `halt`
        // policy the CP then refuses (before the fix: FALLBACK_POLICY). A
        // live rollout whose manifest cannot be proven at all stops the
        // agent with an error naming the rollout and the file.
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, public, manifest) = setup(dir.path());
        let (cmds, _rx) = commands();
        let (mut reducer, _snap) = Reducer::new(Rollouts::new(host()), queue.clone(), cmds);
        reducer.handle(dispatch(&manifest)).await;
        let other = SigningKey::from_seed(&[4; 32]).public_key();
        let (rollouts, report) =
            restore(&queue.lock(), dir.path(), &host(), std::slice::from_ref(&other)).expect("restore");
        let slot = rollouts.get(&manifest.rollout_id).expect("rebuilt");
        assert_eq!(slot.policy, manifest.machine_policy(), "the accepted manifest's policy, not a guess");
        assert_eq!(slot.record.last_seq, 1);
        assert_eq!(report.untrusted_key, vec![(manifest.rollout_id.clone(), public.keyid())]);
        assert_eq!(
            rollouts.channels().newest("stable").map(|a| a.rollout_id.clone()),
            Some(manifest.rollout_id.clone()),
            "the accepted manifest also seeds the no-downgrade history"
        );

        fs_err::remove_file(dir.path().join(MANIFEST_DIR).join(format!("{}.key", manifest.rollout_id))).expect("rm");
        let err = restore(&queue.lock(), dir.path(), &host(), &[other]).expect_err("cannot be proven").to_string();
        assert!(err.contains(manifest.rollout_id.as_str()) && err.contains(MANIFEST_DIR), "{err}");
        assert!(err.contains("refusing to guess its policy"), "{err}");
    }

    /// A rollout Soaking through the real reducer and queue, every event
    /// acked, the agent stopped; the record before the stop and the key.
    async fn soaking_then_stopped(dir: &Path) -> (RolloutId, crate::agent::rollouts::Slot, PublicKey) {
        let (queue, public, manifest) = setup(dir);
        let (cmds, _rx) = commands();
        // As the agent: the durable channel history of the state dir.
        let mut rollouts = Rollouts::new(host());
        rollouts.set_channels(ChannelHistory::load(dir).expect("channels"));
        let (mut reducer, _snap) = Reducer::new(rollouts, queue.clone(), cmds);
        reducer.handle(dispatch(&manifest)).await;
        let rid = manifest.rollout_id.clone();
        let at = datetime!(2026-11-25 12:00:01 UTC);
        reducer.handle(Input::ActivationStarted { rollout_id: rid.clone(), switch_method: "setsid".into(), at }).await;
        let target = manifest.hosts[&host()].target_closure.clone();
        let order = reducer_order(&rid, &target);
        let outcome = crate::agent::activation::ActivationOutcome::Completed { observed: target };
        reducer.handle(Input::ActivationFinished { rollout_id: rid.clone(), order, outcome, at }).await;
        let live = reducer.rollouts().get(&rid).expect("slot").clone();
        assert_eq!(live.record.state, HostState::Soaking);
        {
            let mut q = queue.lock();
            for p in q.pending() {
                q.ack(p.qseq).expect("ack");
            }
        }
        (rid, live, public)
    }

    fn reducer_order(rid: &RolloutId, closure: &Closure) -> crate::agent::reducer::ActivationOrder {
        crate::agent::reducer::ActivationOrder {
            rollout_id: rid.clone(),
            closure: closure.clone(),
            rollback: false,
            number: 1,
            restore_boot_from: None,
        }
    }

    /// Corrupts the acked file of `kind`; its name.
    fn rot(dir: &Path, kind: &str) -> String {
        let acked_dir = dir.join("outbound-queue/acked");
        let file = fs_err::read_dir(&acked_dir)
            .expect("acked")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-{kind}.json")))
            .expect("on disk");
        fs_err::write(&file, b"{ bit rot").expect("corrupt");
        file.file_name().and_then(|n| n.to_str()).expect("name").to_owned()
    }

    fn reopen(dir: &Path) -> Queue {
        let clock = ClockHandle::manual(datetime!(2026-11-25 13:00 UTC));
        Queue::open(dir, host(), QueueConfig::default(), clock).expect("reopen")
    }

    #[tokio::test]
    async fn a_corrupt_dispatch_ack_of_a_soaking_rollout_is_rebuilt_exactly_and_replay_reports_it() {
        // Proves bug 8's fix: the rotted seq 1 (the DispatchAck, which alone
        // holds the rollback target) is rebuilt from the acceptance kept in
        // accepted-channels.json, so the restarted agent supervises the
        // soak with the same record (before: skipped with an ERROR, the host
        // unsupervised); the report and `replay --state-dir` name it.
        let dir = tempfile::tempdir().expect("tempdir");
        let (rid, live, public) = soaking_then_stopped(dir.path()).await;
        let name = rot(dir.path(), "DispatchAck");
        let reopened = reopen(dir.path());
        let (rollouts, report) =
            restore(&reopened, dir.path(), &host(), std::slice::from_ref(&public)).expect("restore");
        assert_eq!(rollouts.get(&rid), Some(&live), "the same record, rollback target included");
        assert_eq!(report.restored, vec![rid.clone()]);
        assert!(report.skipped.is_empty() && report.pruned.is_empty(), "{report:?}");
        let [(rebuilt, what)] = report.rebuilt.as_slice() else { panic!("{report:?}") };
        assert_eq!(rebuilt, &rid);
        assert!(what.contains("seq 1 (DispatchAck") && what.contains(&name), "{what}");
        assert!(what.contains("accepted-channels.json"), "{what}");
        drop(reopened);

        let key_path = dir.path().join("release.pub");
        fs_err::write(&key_path, public.to_text()).expect("key file");
        let replayed = crate::tools::replay::replay_queue(dir.path(), &[key_path], true);
        let err = replayed.expect_err("a lost record is a problem, even rebuilt").to_string();
        assert!(err.contains(rid.as_str()) && err.contains("seq 1 (DispatchAck") && err.contains("rebuilt"), "{err}");
    }

    #[tokio::test]
    async fn a_lost_dispatch_ack_without_a_kept_acceptance_stops_the_agent_naming_the_rollout() {
        // Proves the loud stop: an accepted-channels.json written by an
        // older agent has no copy of the acceptance, so the rollback target
        // is unknowable; the live rollout is neither dropped nor guessed.
        let dir = tempfile::tempdir().expect("tempdir");
        let (rid, _live, public) = soaking_then_stopped(dir.path()).await;
        let name = rot(dir.path(), "DispatchAck");
        let file = dir.path().join(super::super::channels::CHANNELS_FILE);
        let mut body: serde_json::Value = serde_json::from_slice(&fs_err::read(&file).expect("read")).expect("json");
        body["channels"]["stable"].as_object_mut().expect("entry").remove("dispatch").expect("kept");
        fs_err::write(&file, serde_json::to_vec(&body).expect("json")).expect("older format");
        let reopened = reopen(dir.path());
        let err = restore(&reopened, dir.path(), &host(), &[public]).expect_err("cannot be rebuilt").to_string();
        assert!(err.contains(rid.as_str()) && err.contains(&name) && err.contains("rollback target"), "{err}");
        assert!(err.contains("does not start"), "{err}");
    }

    #[tokio::test]
    async fn a_corrupt_visibility_event_in_the_middle_is_bridged_and_the_rollout_carries_on() {
        // Proves a lost ActivationStarted (seq 2) no longer drops the
        // rollout: its seq is kept, its content not guessed, the rest
        // replays, and the next seq agrees with the queue.
        let dir = tempfile::tempdir().expect("tempdir");
        let (rid, live, public) = soaking_then_stopped(dir.path()).await;
        rot(dir.path(), "ActivationStarted");
        let reopened = reopen(dir.path());
        let (rollouts, report) = restore(&reopened, dir.path(), &host(), &[public]).expect("restore");
        let slot = rollouts.get(&rid).expect("rebuilt");
        assert_eq!(slot.record.state, HostState::Soaking);
        assert_eq!(slot.record.last_seq, live.record.last_seq);
        assert_eq!(slot.record.current_closure_at_dispatch, live.record.current_closure_at_dispatch);
        assert_eq!(slot.record.switch_method, None, "not guessed");
        assert_eq!(reopened.next_seq(&rid), slot.record.last_seq + 1);
        assert!(report.rebuilt[0].1.contains("seq 2 (ActivationStarted"), "{report:?}");
    }
}
