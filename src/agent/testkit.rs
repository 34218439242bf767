//! Values shared by the agent's unit tests (one host, one rollout).

use time::macros::datetime;

use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{OnHealthFailure, Policy, Timestamp};

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
