//! The long-poll board: the standing dispatch of every host, and a way for
//! a parked `GET /v1/agent/dispatch` to be woken the moment the writer
//! offers one. A parked request costs one `Notified` future on a per-host
//! [`Notify`]: no task, thread or polling loop per connection, so thousands
//! of idle agents are cheap.
//!
//! The writer updates the board only after the transaction that created or
//! removed the dispatch has committed, so an agent never sees a dispatch the
//! database could still lose.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::ids::{Hostname, RolloutId};
use crate::wire::Dispatch;

#[derive(Debug, Default)]
struct Slot {
    dispatches: BTreeMap<RolloutId, Dispatch>,
    notify: Arc<Notify>,
    /// Counts the long-polls of this host; only the newest one may wait
    /// (one outstanding long-poll per host), an older one sees a higher
    /// number when woken and ends as [`PollOutcome::Replaced`].
    newest_poll: u64,
}

/// Standing dispatches by host. A slot exists while the host has a dispatch
/// or a parked request, so the map is bounded by the fleet plus the number
/// of open connections.
#[derive(Debug, Default)]
pub struct Board {
    slots: Mutex<HashMap<Hostname, Slot>>,
    /// Requests currently parked (a gauge for `/metrics` and benchmarks).
    parked: AtomicUsize,
    /// The hosts woken by offers since the last [`Board::take_woken`], when
    /// someone asked for them ([`Board::log_wakes`]): the simulator parks
    /// its requests outside tokio and wakes exactly these, as the real
    /// `Notify` wakes the parked futures. `None` (the daemon): not kept.
    woken: Mutex<Option<Vec<Hostname>>>,
}

/// Decrements the parked gauge however the wait ends (answer, timeout,
/// shutdown, or the client going away and the future being dropped).
struct ParkedGuard<'a>(&'a AtomicUsize);

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a long-poll ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Dispatch(Dispatch),
    /// Nothing within the wait, or the server is shutting down.
    NoWork,
    /// A newer long-poll of the same host arrived: one host holds one
    /// parked request (the older one's client is most likely gone, e.g. a
    /// connection a NAT dropped silently), so a host cannot pin connections.
    Replaced,
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, HashMap<Hostname, Slot>> {
        // The map stays consistent at every await-free step; a panic while
        // holding it cannot leave it half-updated.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a dispatch and wakes the host's parked requests.
    pub fn offer(&self, host: &Hostname, dispatch: Dispatch) {
        let mut slots = self.lock();
        let slot = slots.entry(host.clone()).or_default();
        slot.dispatches.insert(dispatch.rollout_id.clone(), dispatch);
        slot.notify.notify_waiters();
    }

    /// Applies a committed group's offers and withdrawals under ONE lock, then
    /// wakes the hosts that got an offer: woken requests do not fight the
    /// writer for the lock 10,000 times when a big wave is dispatched.
    pub fn apply(&self, offers: Vec<(Hostname, Dispatch)>, withdrawals: Vec<(Hostname, RolloutId)>) {
        let mut to_wake = Vec::with_capacity(offers.len());
        {
            let mut slots = self.lock();
            for (host, rollout_id) in withdrawals {
                if let Some(slot) = slots.get_mut(&host) {
                    slot.dispatches.remove(&rollout_id);
                    if slot.dispatches.is_empty() && Arc::strong_count(&slot.notify) == 1 {
                        slots.remove(&host);
                    }
                }
            }
            let mut woken = self.woken.lock().unwrap_or_else(|p| p.into_inner());
            for (host, dispatch) in offers {
                if let Some(log) = woken.as_mut() {
                    log.push(host.clone());
                }
                let slot = slots.entry(host).or_default();
                slot.dispatches.insert(dispatch.rollout_id.clone(), dispatch);
                to_wake.push(Arc::clone(&slot.notify));
            }
        }
        for notify in to_wake {
            notify.notify_waiters();
        }
    }

    /// Keeps, from now on, the hosts each [`Board::apply`] wakes.
    pub fn log_wakes(&self) {
        self.woken.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Vec::new);
    }

    /// The hosts woken since the last call (in offer order, repeats kept);
    /// empty unless [`Board::log_wakes`] was called.
    pub fn take_woken(&self) -> Vec<Hostname> {
        self.woken.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The dispatch to hand out now: the oldest standing one.
    pub fn current(&self, host: &Hostname) -> Option<Dispatch> {
        let slots = self.lock();
        slots.get(host).and_then(|s| s.dispatches.values().min_by_key(|d| d.issued_at).cloned())
    }

    /// Requests parked right now.
    pub fn n_parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Number of hosts with a slot (standing dispatch or parked request).
    pub fn n_slots(&self) -> usize {
        self.lock().len()
    }

    /// Waits up to `wait` for a dispatch for `host`. Returns at once if one
    /// stands; a shutdown (the watch turning true) ends the wait with no
    /// work; a newer poll of the same host ends it as
    /// [`PollOutcome::Replaced`] at once.
    pub async fn poll(&self, host: &Hostname, wait: Duration, mut shutdown: watch::Receiver<bool>) -> PollOutcome {
        let deadline = tokio::time::Instant::now() + wait;
        let me = {
            let mut slots = self.lock();
            let slot = slots.entry(host.clone()).or_default();
            slot.newest_poll += 1;
            // Wakes the older poll (if parked); it sees it was replaced.
            slot.notify.notify_waiters();
            slot.newest_poll
        };
        loop {
            let notified = {
                let mut slots = self.lock();
                let slot = slots.entry(host.clone()).or_default();
                if slot.newest_poll != me {
                    return PollOutcome::Replaced;
                }
                if let Some(d) = slot.dispatches.values().min_by_key(|d| d.issued_at) {
                    return PollOutcome::Dispatch(d.clone());
                }
                // Registered before the lock is released: an offer between
                // here and the await below still wakes us.
                let notified = Arc::clone(&slot.notify).notified_owned();
                let mut notified = Box::pin(notified);
                notified.as_mut().enable();
                notified
            };
            self.parked.fetch_add(1, Ordering::Relaxed);
            let guard = ParkedGuard(&self.parked);
            let woken = tokio::select! {
                () = notified => true,
                () = tokio::time::sleep_until(deadline) => false,
                _ = shutdown.wait_for(|stop| *stop) => false,
            };
            drop(guard);
            if !woken {
                self.forget_if_idle(host);
                return match self.current(host) {
                    Some(d) => PollOutcome::Dispatch(d),
                    None => PollOutcome::NoWork,
                };
            }
        }
    }

    fn forget_if_idle(&self, host: &Hostname) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(host) {
            if slot.dispatches.is_empty() && Arc::strong_count(&slot.notify) == 1 {
                slots.remove(host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> Hostname {
        Hostname::parse(name).expect("hostname")
    }

    /// One outstanding long-poll per host: a second poll of web-1 ends the
    /// first at once (Replaced), long before its wait; another host's poll
    /// is untouched; the newer poll keeps waiting.
    #[tokio::test]
    async fn a_newer_long_poll_of_the_same_host_replaces_the_older_at_once() {
        let board = Arc::new(Board::default());
        let (_stop_tx, stop) = watch::channel(false);
        let wait = Duration::from_secs(30);
        let first = tokio::spawn({
            let (board, stop) = (Arc::clone(&board), stop.clone());
            async move { board.poll(&host("web-1"), wait, stop).await }
        });
        let other = tokio::spawn({
            let (board, stop) = (Arc::clone(&board), stop.clone());
            async move { board.poll(&host("web-2"), wait, stop).await }
        });
        while board.n_parked() < 2 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let (board, stop) = (Arc::clone(&board), stop.clone());
            async move { board.poll(&host("web-1"), Duration::from_millis(300), stop).await }
        });
        let replaced = tokio::time::timeout(Duration::from_secs(5), first).await.expect("answered at once");
        assert_eq!(replaced.expect("join"), PollOutcome::Replaced);
        assert_eq!(second.await.expect("join"), PollOutcome::NoWork, "the newer poll waited its own wait");
        assert!(!other.is_finished(), "another host's poll is untouched");
        other.abort();
    }
}
