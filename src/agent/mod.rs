//! The host agent (`nixfleet agent`): one reducer owns the per-rollout
//! records and is the only caller of `step`; workers (long-poll, activation,
//! probes, tick, heartbeat, drainer) feed it; commands run after the
//! outbound event is durable. So far: the pure bookkeeping and the reducer,
//! dispatch admission, delivery backoff, activation (nix-store, nix-env, a
//! detached switch), the probe runners, and the activation, probe and tick
//! workers. The runtime that wires them to the queue and the control plane
//! is still to come.

pub mod activation;
pub mod admission;
pub mod backoff;
pub mod journal;
pub mod probes;
pub mod reducer;
pub mod rollouts;
pub mod workers;
