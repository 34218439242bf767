//! The agent's durable memory: the outbound queue as the reducer's
//! [`Journal`], the cache of signed manifests, and the rebuild of every
//! rollout's record at start, before any worker runs (reference defect 14:
//! workers started before state was restored). Works with the control
//! plane down: nothing here talks to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use super::admission::admit_cached;
use super::reducer::Journal;
use super::rollouts::{Rollouts, RolloutsError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::{Event, Policy};
use crate::queue::{DeadCause, EntryState, Queue, QueueError, QueueView, QueuedEvent, QueuedRef};
use crate::sign::PublicKey;
use crate::wire::OutboundEvent;

/// The policy of a rollout whose manifest cannot be re-verified at start:
/// never roll back on a guess, and the default failure threshold.
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
    /// The queue stopped ([`QueueError::Poisoned`]); the agent is exiting
    /// (see [`SharedQueue::stopped`]). Retrying cannot succeed in this process.
    #[error("{0}")]
    Stopped(QueueError),
    /// Any other failure (disk full, I/O error, the hard limit): nothing is
    /// applied; retry with backoff.
    #[error("{0}")]
    Failed(String),
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
    pub async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Queue) -> T + Send + 'static) -> Result<T, String> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = inner.lock();
            let out = f(&mut guard);
            inner.after_use(&guard);
            out
        })
        .await
        .map_err(|e| format!("queue task failed: {e}"))
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
            Ok(Err(e)) => Err(AppendError::Failed(e.to_string())),
            Err(e) => Err(AppendError::Failed(e)),
        }
    }
}

impl Journal for SharedQueue {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), String> {
        self.append_event(rollout_id, event).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Signed manifests the agent acted on, kept so a restart can re-verify
/// them and recover each rollout's policy without the control plane.
#[derive(Debug, Clone)]
pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    pub fn new(state_dir: &Path) -> ManifestCache {
        ManifestCache { dir: state_dir.join(MANIFEST_DIR) }
    }

    fn path(&self, rollout_id: &RolloutId) -> PathBuf {
        // Rollout ids are `[a-z0-9_-]@[A-Za-z0-9._-]`: safe as a file name.
        self.dir.join(format!("{rollout_id}.json"))
    }

    /// Stores the envelope durably (tmp, fsync, rename, fsync dir) before
    /// the agent acknowledges the dispatch.
    pub fn store(&self, rollout_id: &RolloutId, envelope: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        fs_err::create_dir_all(&self.dir)?;
        let path = self.path(rollout_id);
        let tmp = path.with_extension("json.tmp");
        let mut file = fs_err::File::create(&tmp)?;
        file.write_all(envelope)?;
        file.sync_all()?;
        drop(file);
        fs_err::rename(&tmp, &path)?;
        fs_err::File::open(&self.dir)?.sync_all()
    }

    pub fn load(&self, rollout_id: &RolloutId) -> std::io::Result<Option<Vec<u8>>> {
        match fs_err::read(self.path(rollout_id)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// What the start-up rebuild did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: Vec<RolloutId>,
    /// Rollouts whose first events were pruned (old, finished history):
    /// known only by their last seq.
    pub pruned: Vec<RolloutId>,
    /// Rebuilt under [`FALLBACK_POLICY`] because the cached manifest is
    /// missing or no longer verifies (e.g. the trust keys changed), with why.
    pub without_manifest: Vec<(RolloutId, String)>,
    /// Rollouts that could not be rebuilt, with the reason.
    pub skipped: Vec<(RolloutId, String)>,
}

/// Rebuilds every rollout from the queue: pending + acked events, plus
/// events the CP rejected (the agent applied them before sending, so they
/// are part of its history), each rollout under the policy of its cached,
/// re-verified manifest.
pub fn restore(
    queue: &Queue,
    state_dir: &Path,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<(Rollouts, RestoreReport), String> {
    let mut journals: BTreeMap<RolloutId, Vec<(u64, OutboundEvent)>> = BTreeMap::new();
    for (rollout_id, _) in queue.rollouts() {
        let events = queue.events_after(&rollout_id, 0).into_iter().map(|q| (q.event.seq, q.event));
        journals.entry(rollout_id).or_default().extend(events);
    }
    for q in recorded_events(state_dir, &[EntryState::Dead])? {
        journals.entry(q.rollout_id).or_default().push((q.event.seq, q.event));
    }
    let cache = ManifestCache::new(state_dir);
    let mut rollouts = Rollouts::new(hostname.clone());
    let mut report = RestoreReport::default();
    for (rollout_id, mut events) in journals {
        events.sort_by_key(|(seq, _)| *seq);
        events.dedup_by_key(|(seq, _)| *seq);
        if events.first().is_none_or(|(seq, _)| *seq != 1) {
            report.pruned.push(rollout_id);
            continue;
        }
        // Without a verified manifest the rollout is still rebuilt, under a
        // conservative policy: its seq must continue where the queue is, or
        // every later event of it would be refused as out of order.
        let policy = match cached_policy(&cache, &rollout_id, hostname, trust_keys) {
            Ok(p) => p,
            Err(why) => {
                report.without_manifest.push((rollout_id.clone(), why));
                FALLBACK_POLICY
            }
        };
        let journal: Result<Vec<Event>, String> =
            events.iter().map(|(_, e)| e.to_local().map_err(|e| e.to_string())).collect();
        let restored = journal
            .and_then(|j| rollouts.restore(rollout_id.clone(), policy, &j).map_err(|e: RolloutsError| e.to_string()));
        match restored {
            Ok(()) => report.restored.push(rollout_id),
            Err(why) => report.skipped.push((rollout_id, why)),
        }
    }
    Ok((rollouts, report))
}

/// The policy of a rollout from its cached envelope, re-verified with
/// `trust_keys`; Err says why there is none.
pub fn cached_policy(
    cache: &ManifestCache,
    rollout_id: &RolloutId,
    hostname: &Hostname,
    trust_keys: &[PublicKey],
) -> Result<Policy, String> {
    let bytes = cache
        .load(rollout_id)
        .map_err(|e| format!("cannot read the cached manifest: {e}"))?
        .ok_or_else(|| "no cached manifest".to_owned())?;
    admit_cached(hostname, trust_keys, &bytes, rollout_id).map(|m| m.machine_policy()).map_err(|e| e.to_string())
}

/// The events of the given folders of an agent's queue, read lock-free:
/// every record in `pending/` and `acked/`, and in `dead/` only those the
/// CP rejected (an unreadable file is no event). For the restart rebuild
/// (rejected events only; the open queue holds the rest) and `replay`.
pub fn recorded_events(state_dir: &Path, folders: &[EntryState]) -> Result<Vec<QueuedEvent>, String> {
    let view = QueueView::open(state_dir).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for entry in view.list(folders).map_err(|e| e.to_string())? {
        let Ok(inspected) = view.inspect(entry.name()) else { continue };
        let corrupt = inspected.dead_reason.as_ref().is_some_and(|r| r.cause != DeadCause::Rejected);
        let unexplained_dead = entry.folder == EntryState::Dead && inspected.dead_reason.is_none();
        if let (false, false, Ok(record)) = (corrupt, unexplained_dead, inspected.record) {
            out.push(record);
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
    use crate::machine::HostState;
    use crate::queue::QueueConfig;
    use crate::sign::{sign_envelope, SigningKey};
    use crate::wire::Manifest;

    const MANIFEST: &str = include_str!("../../examples/manifest.json");

    fn setup(dir: &Path) -> (SharedQueue, PublicKey, Manifest) {
        let key = SigningKey::from_seed(&[3; 32]);
        let manifest = Manifest::parse(MANIFEST.as_bytes()).expect("valid");
        let envelope = serde_json::to_vec(&sign_envelope(&key, MANIFEST.as_bytes())).expect("json");
        ManifestCache::new(dir).store(&manifest.rollout_id, &envelope).expect("cache");
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
            .handle(Input::SwitchStarted {
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
    async fn a_rollout_whose_manifest_no_longer_verifies_is_rebuilt_under_the_fallback_policy() {
        // Proves a changed trust key is reported and the rollout is not
        // resumed under the unverified policy, while its seq still continues.
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, _public, manifest) = setup(dir.path());
        let (cmds, _rx) = commands();
        let (mut reducer, _snap) = Reducer::new(Rollouts::new(host()), queue.clone(), cmds);
        reducer.handle(dispatch(&manifest)).await;
        let other = SigningKey::from_seed(&[4; 32]).public_key();
        let (rollouts, report) = restore(&queue.lock(), dir.path(), &host(), &[other]).expect("restore");
        let slot = rollouts.get(&manifest.rollout_id).expect("rebuilt");
        assert_eq!(slot.policy, FALLBACK_POLICY);
        assert_eq!(slot.record.last_seq, 1);
        assert_eq!(report.without_manifest.len(), 1);
        assert!(report.without_manifest[0].1.contains("trust"), "{:?}", report.without_manifest);
    }
}
