//! The agent's durable memory: the outbound queue as the reducer's
//! [`Journal`], the cache of signed manifests, and the rebuild of every
//! rollout's record at start, before any worker runs (a worker started
//! earlier would act on records that do not exist yet). Works with the control
//! plane down: nothing here talks to it.

//!
//! Parts: this file, the queue as the reducer's journal ([`SharedQueue`]);
//! `manifests`, the cache of signed manifests and their re-verification;
//! `restore`, the start-up rebuild.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use super::reducer::{Journal, JournalError};
use crate::ids::RolloutId;
use crate::queue::{Queue, QueueError, QueuedRef};
use crate::wire::OutboundEvent;

mod manifests;
mod restore;
#[cfg(test)]
mod tests;

pub use manifests::{cached_manifest, cached_policy, CachedManifest, CachedManifestError, ManifestCache, MANIFEST_DIR};
pub use restore::{
    corrupt_records, rebuilt_log, recorded_events, restore, restore_and_write_back, restore_from, RestoreError,
    RestoreReport, RestoreSource, StateDirFiles, FALLBACK_POLICY, REBUILT_LOG,
};

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
