//! The agent's durable memory: the outbound queue as the reducer's
//! [`Journal`], the cache of signed manifests, and the rebuild of every
//! rollout's record at start, before any worker runs (reference defect 14:
//! workers started before state was restored). Works with the control
//! plane down: nothing here talks to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::admission::admit_cached;
use super::channels::ChannelHistory;
use super::reducer::{Journal, JournalError};
use super::rollouts::{Rollouts, RolloutsError};
use crate::ids::{Hostname, RolloutId};
use crate::machine::{Event, Policy};
use crate::queue::{DeadCause, EntryState, Queue, QueueError, QueueView, QueuedEvent};
use crate::sign::PublicKey;
use crate::wire::OutboundEvent;

/// The policy of a rollout whose manifest cannot be re-verified at start:
/// never roll back on a guess, and the default failure threshold.
pub const FALLBACK_POLICY: Policy =
    Policy { on_health_failure: crate::machine::OnHealthFailure::Halt, sustained_failure_secs: 60 };

/// Folder of cached DSSE envelopes inside the state dir, one per rollout.
pub const MANIFEST_DIR: &str = "manifests";

/// The queue shared by the reducer (enqueue) and the drainer (ack/reject).
/// Every call that fsyncs runs on tokio's blocking pool, off the reactor.
#[derive(Debug, Clone)]
pub struct SharedQueue {
    queue: Arc<Mutex<Queue>>,
}

impl SharedQueue {
    pub fn new(queue: Queue) -> SharedQueue {
        SharedQueue { queue: Arc::new(Mutex::new(queue)) }
    }

    /// Locks the queue for a short, synchronous use. A poisoned lock only
    /// means a thread panicked while holding it; the queue's own state is
    /// kept consistent by its write discipline, so carry on.
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the queue on the blocking pool.
    pub async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Queue) -> T + Send + 'static) -> Result<T, String> {
        let queue = self.queue.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = queue.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| format!("queue task failed: {e}"))
    }
}

impl Journal for SharedQueue {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), JournalError> {
        let (rollout_id, event) = (rollout_id.clone(), event.clone());
        self.with(move |q| {
            q.enqueue(&rollout_id, &event).map(|_| ()).map_err(|e| match e {
                QueueError::Full { .. } => JournalError::Full(e.to_string()),
                other => JournalError::Failed(other.to_string()),
            })
        })
        .await?
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
    rollouts.set_channels(ChannelHistory::load(state_dir).map_err(|e| e.to_string())?);
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
            issued_at: manifest.issued_at,
            at: datetime!(2026-11-25 12:00 UTC),
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
