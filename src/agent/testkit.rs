//! Shared by the agent's unit tests and the worker tests of `tests/it`:
//! values for one host and one rollout, and [`MemJournal`], the reducer's
//! journal in memory. Nothing in the agent uses it; it is compiled only for
//! tests (`agent/mod.rs`: `cfg(test)` or the `testkit` feature).

use std::sync::{Arc, Mutex, MutexGuard};

use time::macros::datetime;

use super::reducer::{deferrable, Journal, JournalError};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{Event, OnHealthFailure, Policy, Timestamp};
use crate::wire::OutboundEvent;

pub const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);

/// A store path whose hash is `c` repeated.
pub fn closure(c: char) -> Closure {
    Closure::parse(&format!("/nix/store/{}-nixos-system-web-1", c.to_string().repeat(32))).expect("valid")
}

pub fn rid() -> RolloutId {
    RolloutId::parse("stable@r1").expect("valid")
}

pub fn host() -> Hostname {
    Hostname::parse("web-1").expect("valid")
}

pub fn policy() -> Policy {
    Policy { on_health_failure: OnHealthFailure::RollbackAndHalt, sustained_failure_secs: 60 }
}

/// The reducer's journal in memory; clones share the same events, so a test
/// keeps one to read what the reducer journaled (or to "restart" from it).
#[derive(Debug, Clone, Default)]
pub struct MemJournal {
    pub events: Arc<Mutex<Vec<(RolloutId, OutboundEvent)>>>,
    /// Appends fail while this is > 0 (decremented on each failure), as a
    /// full disk would.
    pub failures_left: Arc<Mutex<u32>>,
    /// With Some(n): once n events are held, every visibility event is
    /// `Full` (the queue's soft cap as the reducer sees it).
    pub full_at: Arc<Mutex<Option<usize>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Journal for MemJournal {
    async fn append(&mut self, rollout_id: &RolloutId, event: &OutboundEvent) -> Result<(), JournalError> {
        if let Some(max) = *lock(&self.full_at) {
            let decisive = !deferrable(&event.to_body().map_err(|e| JournalError::Failed(e.to_string()))?);
            if !decisive && lock(&self.events).len() >= max {
                return Err(JournalError::Full(format!("queue full: {max} of {max} pending")));
            }
        }
        let mut left = lock(&self.failures_left);
        if *left > 0 {
            *left -= 1;
            return Err(JournalError::Failed("No space left on device (os error 28)".into()));
        }
        lock(&self.events).push((rollout_id.clone(), event.clone()));
        Ok(())
    }
}

impl MemJournal {
    /// The wire kinds journaled, in order.
    pub fn kinds(&self) -> Vec<&'static str> {
        lock(&self.events).iter().map(|(_, e)| e.kind()).collect()
    }

    /// Every event journaled, as the Local events a restart replays.
    pub fn local_events(&self) -> Vec<Event> {
        lock(&self.events).iter().map(|(_, e)| e.to_local().expect("the reducer journals valid events")).collect()
    }
}
