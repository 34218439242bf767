//! The agent's I/O workers that feed the reducer: they turn the host's
//! facts (an activation finished, a probe answered, time passed) into
//! [`Input`]s on the reducer's one bounded channel, and turn the reducer's
//! `watch` commands into work. They never touch per-rollout state: the
//! reducer is the one mutator, so no two tasks ever race on a record.
//!
//! Common contract of every worker here:
//! - It takes its resources and a [`Shutdown`] and returns a [`WorkerExit`]
//!   saying why it stopped, so the runtime and the tests can
//!   tell a requested stop from a dead reducer.
//! - It owns every task it starts (a `JoinSet`, aborted when the work they
//!   do is no longer wanted); nothing is fire-and-forget.
//! - A failed `inputs.send` means the reducer is gone: the worker exits.
//! - Every timestamp comes from the injected [`ClockHandle`]; tokio time
//!   only paces the work.
//!
//! [`Input`]: crate::agent::reducer::Input
//! [`ClockHandle`]: crate::clock::ClockHandle

pub mod activation;
pub mod net;
pub mod probes;
pub mod tick;

use tokio::sync::watch;

pub use activation::{activation_id, run_activation_worker};
pub use probes::{run_probe_worker, HEALTH_CHECKS_FILE_PROBE};
pub use tick::{run_tick_worker, DEFAULT_TICK_INTERVAL};

/// Why a worker returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// The runtime asked it to stop.
    Shutdown,
    /// The reducer's input channel or its command channel is closed: there is
    /// nobody left to report to or to take orders from.
    ReducerGone,
}

/// The shutdown signal every worker takes: a `watch` of a bool that turns
/// true once. Dropping the [`ShutdownTrigger`] also counts as a request,
/// so a runtime that unwinds cannot leave workers waiting forever.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side, kept by the runtime (one per agent).
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A new trigger and the signal to clone into each worker.
pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    /// Asks every worker holding a clone of the signal to stop.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl From<watch::Receiver<bool>> for Shutdown {
    fn from(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown { rx }
    }
}

impl Shutdown {
    /// True once a stop was requested (or the trigger was dropped).
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves when a stop is requested; at once if it already was.
    pub async fn requested(&mut self) {
        // Err means the trigger is gone: nobody can ask any more, so stop.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests;
