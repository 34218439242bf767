//! The per-host rollout state machine (`docs/protocol.md` §3), shared by the agent and the
//! control plane: "same step, both sides".
//!
//! This module is pure. It never performs I/O, never reads a clock and never
//! awaits: every instant arrives inside an event or as a `now` argument to a
//! gate helper. The agent feeds `Local` events and executes the resulting
//! effects; the control plane feeds the `Remote` mirror of the same events
//! (rebuilt from the agent's outbound events) and both reach identical
//! records. Because a record is a fold of its events, an agent restart and
//! the control plane's `replay` are the same operation as live processing.
//!
//! Reading order: [`event`] (what happened), [`state`] (what we know about
//! one host in one rollout), [`effect`] (what must be done), [`step()`] (the
//! transition function), [`gates`] (the time-driven decisions of the tick).

pub mod effect;
pub mod event;
pub mod gates;
pub mod state;
mod step;

pub use effect::Effect;
pub use event::{Event, EventBody, EventKind, Origin, ProbeDecl, ProbeKind, ProbeMode, ProbeStatus, RejectCode};
pub use gates::{converge_due, due_event, failure_clock_start_due, sustained_failure_due};
pub use state::{Failure, HostRecord, HostState, OnHealthFailure, Policy, ProbeRecord, RollbackFailure};
pub use step::{replay, step, Outcome, TransitionError};

/// Instants are UTC `OffsetDateTime`s; the type alias documents intent.
pub type Timestamp = time::OffsetDateTime;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
