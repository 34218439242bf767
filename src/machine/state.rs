//! What is known about one host in one rollout: the record `step` folds
//! events into. It is serialisable so the control plane can cache it and the
//! status views can show it, but it is never sent to an agent to overwrite
//! the agent's own record: the agent owns its host's transitions
//! (`docs/protocol.md` §1).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::event::{ProbeDecl, ProbeMode, ProbeStatus};
use super::Timestamp;
use crate::ids::{Closure, Hostname, RolloutId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HostState {
    Pending,
    Activating,
    Deferred,
    Soaking,
    Converged,
    Failed,
    Reverted,
}

impl HostState {
    pub const ALL: [HostState; 7] = [
        HostState::Pending,
        HostState::Activating,
        HostState::Deferred,
        HostState::Soaking,
        HostState::Converged,
        HostState::Failed,
        HostState::Reverted,
    ];

    /// Converged and Reverted accept no further events.
    pub fn is_terminal(self) -> bool {
        matches!(self, HostState::Converged | HostState::Reverted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Pending => "Pending",
            HostState::Activating => "Activating",
            HostState::Deferred => "Deferred",
            HostState::Soaking => "Soaking",
            HostState::Converged => "Converged",
            HostState::Failed => "Failed",
            HostState::Reverted => "Reverted",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent does when a host fails (`docs/protocol.md` §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OnHealthFailure {
    /// The host stays Failed; the operator decides.
    #[serde(rename = "halt")]
    Halt,
    /// The agent switches back to the closure it ran before the dispatch.
    #[serde(rename = "rollback-and-halt")]
    RollbackAndHalt,
}

impl OnHealthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnHealthFailure::Halt => "halt",
            OnHealthFailure::RollbackAndHalt => "rollback-and-halt",
        }
    }
}

/// The part of the signed manifest's policy that `step` consults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub on_health_failure: OnHealthFailure,
    /// Continuous enforce-mode failure longer than this fails the host.
    pub sustained_failure_secs: u64,
}

impl Policy {
    /// The manifest's default `sustained_failure_secs` (`docs/protocol.md` §2).
    pub const DEFAULT_SUSTAINED_FAILURE_SECS: u64 = 60;
}

/// The latest knowledge about one declared probe since the last activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub mode: ProbeMode,
    pub first_observed_at: Option<Timestamp>,
    pub last_status: Option<ProbeStatus>,
    pub last_observed_at: Option<Timestamp>,
    pub last_pass_at: Option<Timestamp>,
    /// Start of the current unbroken run of Fail results; cleared by a Pass.
    pub failing_since: Option<Timestamp>,
    pub failure_reason: Option<String>,
}

impl ProbeRecord {
    pub(crate) fn new(mode: ProbeMode) -> ProbeRecord {
        ProbeRecord {
            mode,
            first_observed_at: None,
            last_status: None,
            last_observed_at: None,
            last_pass_at: None,
            failing_since: None,
            failure_reason: None,
        }
    }
}

/// Why a host is Failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Failure {
    /// The switch (or realise, or profile set) exited non-zero.
    ActivationFailed { exit_code: i32, stderr_tail: String },
    /// The switch claimed success but `/run/current-system` is another closure.
    WrongClosure { observed: Closure },
    /// Enforce probes failed continuously for the policy's threshold.
    SustainedProbeFailure { failing_probes: Vec<String>, sustained_duration_secs: u64 },
    /// The agent refused the dispatch (signature, target mismatch, quarantine).
    DispatchRejected { reason: String },
}

/// A rollback that did not work: the operator must act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackFailure {
    pub exit_code: i32,
    pub stderr_tail: String,
    pub failed_at: Timestamp,
}

/// One host in one rollout. Create it only with [`HostRecord::pending`];
/// change it only with [`super::step()`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub rollout_id: RolloutId,
    pub hostname: Hostname,
    pub state: HostState,
    /// Highest seq applied; anything at or below it is a duplicate.
    pub last_seq: u64,
    /// Known from the manifest (control plane) or from the Activate event.
    pub target_closure: Option<Closure>,
    /// The rollback target: what the host ran when it accepted the dispatch.
    pub current_closure_at_dispatch: Option<Closure>,
    /// The wave's soak length, carried by Activate.
    pub soak_secs: Option<u64>,
    pub dispatch_acked_at: Option<Timestamp>,
    pub activation_started_at: Option<Timestamp>,
    pub switch_method: Option<String>,
    pub deferred_at: Option<Timestamp>,
    pub deferred_component: Option<String>,
    pub activation_completed_at: Option<Timestamp>,
    /// The closure the host was last seen running (observed, not assumed).
    pub current_closure: Option<Closure>,
    /// `activation_completed_at + soak_secs` (`docs/protocol.md` §3 rule 4).
    pub soak_due_at: Option<Timestamp>,
    /// The probe topology declared since the last activation, if any.
    pub topology: Option<Vec<ProbeDecl>>,
    pub probes: BTreeMap<String, ProbeRecord>,
    /// Sustained-failure clock: set by ProbeFailureFirst, reset when no
    /// enforce probe is failing any more (`docs/protocol.md` §3 rule 5).
    pub failure_clock_since: Option<Timestamp>,
    pub failed_at: Option<Timestamp>,
    pub failure: Option<Failure>,
    pub policy_applied: Option<OnHealthFailure>,
    /// A rollback was fired and its outcome is expected.
    pub rollback_fired: bool,
    pub rollback_failure: Option<RollbackFailure>,
    pub reverted_to: Option<Closure>,
    pub reverted_at: Option<Timestamp>,
    pub converged_at: Option<Timestamp>,
}

impl HostRecord {
    /// A fresh record: the control plane passes the manifest's target, the
    /// agent rebuilding from its journal passes `None` (Activate carries it).
    pub fn pending(rollout_id: RolloutId, hostname: Hostname, target: Option<Closure>) -> HostRecord {
        HostRecord {
            rollout_id,
            hostname,
            state: HostState::Pending,
            last_seq: 0,
            target_closure: target,
            current_closure_at_dispatch: None,
            soak_secs: None,
            dispatch_acked_at: None,
            activation_started_at: None,
            switch_method: None,
            deferred_at: None,
            deferred_component: None,
            activation_completed_at: None,
            current_closure: None,
            soak_due_at: None,
            topology: None,
            probes: BTreeMap::new(),
            failure_clock_since: None,
            failed_at: None,
            failure: None,
            policy_applied: None,
            rollback_fired: false,
            rollback_failure: None,
            reverted_to: None,
            reverted_at: None,
            converged_at: None,
        }
    }

    /// Whether this rollout holds the host (`docs/protocol.md` §3 rule 8, one live rollout
    /// per host): it is switching, waiting for a reboot, soaking, or Failed
    /// with a rollback fired whose outcome has not arrived. Nothing of
    /// another rollout may touch the host meanwhile. A failed rollback ends
    /// it (the operator must act; a retry's completion is still accepted).
    pub fn is_live(&self) -> bool {
        match self.state {
            HostState::Activating | HostState::Deferred | HostState::Soaking => true,
            HostState::Failed => self.rollback_fired && self.rollback_failure.is_none(),
            HostState::Pending | HostState::Converged | HostState::Reverted => false,
        }
    }

    /// The closure this record says the host runs, when the events prove
    /// it (`docs/protocol.md` §3 rule 10): Soaking, Converged and Failed without a
    /// rollback → the closure last observed on the host (the target after
    /// a completed activation, the other closure after a wrong one);
    /// Reverted → the closure rolled back to. Pending, Activating, Deferred
    /// (a reboot may come at any time), a Failed host with a rollback fired
    /// or a failed switch (nothing observed) → `None`: not known.
    pub fn known_running_closure(&self) -> Option<&Closure> {
        match self.state {
            HostState::Soaking | HostState::Converged => self.current_closure.as_ref(),
            HostState::Failed if !self.rollback_fired => self.current_closure.as_ref(),
            HostState::Reverted => self.reverted_to.as_ref(),
            HostState::Pending | HostState::Activating | HostState::Deferred | HostState::Failed => None,
        }
    }

    /// Enforce probes of the declared topology, in declaration order.
    pub fn enforce_probes(&self) -> impl Iterator<Item = &ProbeDecl> {
        self.topology.iter().flatten().filter(|p| p.mode == ProbeMode::Enforce)
    }

    /// Names of enforce probes whose latest result is Fail.
    pub fn failing_enforce_probes(&self) -> Vec<String> {
        self.enforce_probes()
            .filter(|p| self.probes.get(&p.name).and_then(|r| r.last_status) == Some(ProbeStatus::Fail))
            .map(|p| p.name.clone())
            .collect()
    }

    /// The mode the topology declares for a probe, if it is declared.
    pub fn declared_mode(&self, probe_name: &str) -> Option<ProbeMode> {
        self.topology.iter().flatten().find(|p| p.name == probe_name).map(|p| p.mode)
    }
}
