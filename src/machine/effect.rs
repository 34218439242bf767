//! Effects: commands `step` asks the caller to carry out. Events name facts
//! (`ActivationCompleted`); effects name commands (`FireActivation`). Local
//! effects are executed by the agent, Remote ones by the control plane.
//!
//! Ordering contract: the journal effect (`EmitOutbound` on the agent,
//! `AppendEventLog` on the control plane) is always FIRST, so a caller that
//! runs effects in order is write-ahead by construction: the event is durable
//! before a switch fires or a quarantine is inserted.

use super::event::EventBody;
use super::state::HostState;
use super::Timestamp;
use crate::ids::Closure;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Agent: persist this outbound event in the queue, then deliver it.
    EmitOutbound { seq: u64, body: EventBody },
    /// Agent: activate the target closure (realise, set the profile, switch).
    FireActivation { target: Closure },
    /// Agent: activate exactly this closure again, a rollback (`docs/protocol.md` §3 rule 7).
    FireRollback { to: Closure },
    /// Agent: restart the probe worker against the newly active system.
    ResetProbes,
    /// Control plane: append the agent's event to the event log.
    AppendEventLog { seq: u64, body: EventBody },
    /// Control plane: never dispatch this closure on this channel again.
    InsertQuarantine { channel: String, closure: Closure },
    /// Both: the host moved between states (log line, status, planner).
    RecordTransition { from: HostState, to: HostState, at: Timestamp },
}
