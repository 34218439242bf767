//! The agent role (`nixfleet agent`): one reducer owns the per-rollout
//! records and is the only caller of `step`; workers feed it; an applier
//! runs effects after the outbound event is durable.

pub mod admission;
pub mod backoff;
pub mod reducer;
pub mod rollouts;
