//! Table-driven tests of `step`, one file per concern: `table` (every
//! (state, event kind, side) pair), `rules` (the numbered rules of
//! `docs/protocol.md` §3: the wrong rollback target, a failure clock that
//! does not reset, early convergence, the soak's start), `scenarios` (lost
//! rollback failures, completion on another closure, replay) and
//! `boundaries` (the machine's purity, the roles' imports). The fixtures
//! here are shared with `proptests`.

use time::macros::datetime;
use time::Duration;

use super::*;
use crate::ids::{Closure, Hostname, RolloutId};

pub(crate) const T0: Timestamp = datetime!(2026-11-25 12:00 UTC);
pub(crate) const SOAK_SECS: u64 = 300;

pub(crate) fn old() -> Closure {
    Closure::parse("/nix/store/00000000000000000000000000000000-nixos-system-web-1-old").expect("valid")
}
pub(crate) fn new() -> Closure {
    Closure::parse("/nix/store/11111111111111111111111111111111-nixos-system-web-1-new").expect("valid")
}
pub(crate) fn other() -> Closure {
    Closure::parse("/nix/store/22222222222222222222222222222222-nixos-system-web-1-other").expect("valid")
}
pub(crate) fn rollback_policy() -> Policy {
    Policy { on_health_failure: OnHealthFailure::RollbackAndHalt, sustained_failure_secs: 60 }
}
pub(crate) fn halt_policy() -> Policy {
    Policy { on_health_failure: OnHealthFailure::Halt, sustained_failure_secs: 60 }
}
pub(crate) fn fresh(target: Option<Closure>) -> HostRecord {
    HostRecord::pending(
        RolloutId::parse("stable@2026-11-25.1").expect("valid"),
        Hostname::parse("web-1").expect("valid"),
        target,
    )
}
fn at(secs: i64) -> Timestamp {
    T0 + Duration::seconds(secs)
}

/// A small driver that assigns seqs like the agent does and fails loudly.
pub(crate) struct Host {
    pub record: HostRecord,
    pub policy: Policy,
    pub origin: Origin,
    pub effects: Vec<Effect>,
}

impl Host {
    pub fn new(policy: Policy) -> Host {
        Host { record: fresh(Some(new())), policy, origin: Origin::Local, effects: Vec::new() }
    }
    pub fn event(&self, body: EventBody) -> Event {
        Event { origin: self.origin, seq: self.record.last_seq + 1, body }
    }
    pub fn try_feed(&mut self, body: EventBody) -> Result<(), TransitionError> {
        let event = self.event(body);
        match step(&self.record, &event, &self.policy)? {
            Outcome::Applied { record, effects } => {
                self.record = *record;
                self.effects = effects;
                Ok(())
            }
            Outcome::Duplicate { .. } => panic!("unexpected duplicate"),
            Outcome::Gap { expected } => panic!("unexpected gap (expected seq {expected})"),
        }
    }
    #[track_caller]
    pub fn feed(&mut self, body: EventBody) -> &mut Host {
        if let Err(e) = self.try_feed(body) {
            panic!("step refused: {e}");
        }
        self
    }
    pub fn activate(&mut self) -> &mut Host {
        self.feed(EventBody::Activate {
            current_closure_at_dispatch: old(),
            target_closure: new(),
            soak_secs: SOAK_SECS,
            received_at: at(0),
        })
    }
    pub fn complete(&mut self, secs: i64) -> &mut Host {
        self.feed(EventBody::ActivationCompleted {
            observed_current_closure: new(),
            exit_code: 0,
            completed_at: at(secs),
        })
    }
    pub fn declare(&mut self, probes: &[(&str, ProbeMode)]) -> &mut Host {
        let probes = probes
            .iter()
            .map(|(name, mode)| ProbeDecl { name: (*name).to_owned(), kind: ProbeKind::Http, mode: *mode })
            .collect();
        self.feed(EventBody::ProbeTopologyDeclared { probes, declared_at: at(11) })
    }
    pub fn probe(&mut self, name: &str, mode: ProbeMode, status: ProbeStatus, secs: i64) -> &mut Host {
        let failure_reason = (status == ProbeStatus::Fail).then(|| "HTTP 503".to_owned());
        self.feed(EventBody::ProbeResult {
            probe_name: name.to_owned(),
            mode,
            status,
            observed_at: at(secs),
            failure_reason,
        })
    }
}

/// A record in `state`, reached through legal events under `policy`:
/// Soaking has one enforce probe "web" declared and not yet observed.
fn host_in(state: HostState, policy: Policy) -> Host {
    let mut h = Host::new(policy);
    match state {
        HostState::Pending => {}
        HostState::Activating => {
            h.activate();
        }
        HostState::Deferred => {
            h.activate().feed(EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: at(5) });
        }
        HostState::Soaking => {
            h.activate().complete(10).declare(&[("web", ProbeMode::Enforce)]);
        }
        HostState::Converged => {
            h.activate().complete(10).declare(&[("web", ProbeMode::Enforce)]);
            h.probe("web", ProbeMode::Enforce, ProbeStatus::Pass, 20);
            h.feed(EventBody::ConvergedReached { converged_at: at(10 + SOAK_SECS as i64), current_closure: new() });
        }
        HostState::Failed => {
            h.activate().feed(EventBody::ActivationFailed {
                exit_code: 1,
                stderr_tail: "boom".into(),
                failed_at: at(5),
            });
        }
        HostState::Reverted => {
            h.activate().feed(EventBody::ActivationFailed {
                exit_code: 1,
                stderr_tail: "boom".into(),
                failed_at: at(5),
            });
            h.feed(EventBody::RollbackCompleted { reverted_to_closure: old(), exit_code: 0, completed_at: at(8) });
        }
    }
    assert_eq!(h.record.state, state, "fixture for {state}");
    h
}

mod boundaries;
mod rules;
mod scenarios;
mod table;
