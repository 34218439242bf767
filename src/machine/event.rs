//! Events: facts about one host in one rollout. Each Local/Remote pair of
//! `docs/protocol.md` §3 is ONE body type with an [`Origin`]: the agent applies `Local`
//! events it synthesised, the control plane applies the `Remote` mirror it
//! received. Sharing the body makes "both sides see the same fields" a
//! property of the type system rather than of discipline.

use serde::{Deserialize, Serialize};

use super::state::OnHealthFailure;
use super::Timestamp;
use crate::ids::Closure;

/// Which side applies the event: decides the effects, never the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// Synthesised by the agent (it will also emit the outbound event).
    Local,
    /// Mirrored by the control plane from an agent's outbound event.
    Remote,
}

/// One event with its per-(host, rollout) sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub origin: Origin,
    /// Assigned by the agent: starts at 1, +1 per emitted event.
    pub seq: u64,
    pub body: EventBody,
}

impl Event {
    pub fn local(seq: u64, body: EventBody) -> Event {
        Event { origin: Origin::Local, seq, body }
    }

    pub fn remote(seq: u64, body: EventBody) -> Event {
        Event { origin: Origin::Remote, seq, body }
    }

    /// The name of the event on this side (`docs/decisions.md`, "State machine, wire and queue" 1),
    /// e.g. `LocalActivate` or `RemoteDispatchAck`.
    pub fn name(&self) -> &'static str {
        let kind = self.body.kind();
        match self.origin {
            Origin::Local => kind.local_name(),
            Origin::Remote => kind.remote_name(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Exec,
    Http,
    Tcp,
    Systemd,
}

/// Only `Enforce` probes gate convergence and start the failure clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    Enforce,
    Observe,
    Disabled,
}

/// There is no "Unknown": a runner error is a Fail with a reason (`docs/protocol.md` §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeStatus {
    Pass,
    Fail,
}

/// One probe of the declared topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeDecl {
    pub name: String,
    pub kind: ProbeKind,
    pub mode: ProbeMode,
}

/// The fields of an event; the same for the Local and the Remote side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    /// Local `Activate` / Remote `DispatchAck`. Carries everything later
    /// transitions need (target, rollback target, soak length), so a journal
    /// of outbound events rebuilds a record from nothing.
    Activate {
        /// The closure the host actually ran when it accepted the dispatch:
        /// the rollback target (`docs/protocol.md` §3 rule 7).
        current_closure_at_dispatch: Closure,
        target_closure: Closure,
        soak_secs: u64,
        received_at: Timestamp,
    },
    ActivationStarted {
        started_at: Timestamp,
        switch_method: String,
    },
    ActivationCompleted {
        observed_current_closure: Closure,
        exit_code: i32,
        completed_at: Timestamp,
    },
    ActivationDeferred {
        component: String,
        deferred_at: Timestamp,
    },
    ActivationFailed {
        exit_code: i32,
        stderr_tail: String,
        failed_at: Timestamp,
    },
    ProbeTopologyDeclared {
        probes: Vec<ProbeDecl>,
        declared_at: Timestamp,
    },
    ProbeObservedFirst {
        probe_name: String,
        mode: ProbeMode,
        observed_at: Timestamp,
    },
    ProbeResult {
        probe_name: String,
        mode: ProbeMode,
        status: ProbeStatus,
        observed_at: Timestamp,
        failure_reason: Option<String>,
    },
    ProbeFailureFirst {
        probe_name: String,
        mode: ProbeMode,
        first_failed_at: Timestamp,
    },
    /// Local `SustainedFailureCrossed` / Remote `Failed`.
    SustainedFailureCrossed {
        failed_at: Timestamp,
        sustained_duration_secs: u64,
        failing_probes: Vec<String>,
        policy_applied: OnHealthFailure,
    },
    /// Local `RollbackCompleted` / Remote `RollbackComplete`.
    RollbackCompleted {
        reverted_to_closure: Closure,
        exit_code: i32,
        completed_at: Timestamp,
    },
    RollbackFailed {
        exit_code: i32,
        stderr_tail: String,
        failed_at: Timestamp,
    },
    DispatchRejected {
        /// The closure the refused dispatch named (so a journal holding only
        /// this event still rebuilds the record's target).
        target_closure: Closure,
        /// What kind of refusal: decides whether the host fails or waits.
        code: RejectCode,
        reason: String,
        rejected_at: Timestamp,
    },
    /// Local `ConvergedReached` / Remote `Converged`.
    ConvergedReached {
        converged_at: Timestamp,
        current_closure: Closure,
    },
}

/// Why an agent refused a dispatch. Only `Busy` leaves the host Pending: the
/// host is live in another rollout of its own (one live rollout per host),
/// and the control plane offers the dispatch again once that one is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectCode {
    /// Bad signature, target mismatch, quarantined closure: the host fails.
    #[default]
    Refused,
    /// Another rollout is live on the host: ask again later; not a failure.
    Busy,
    /// The manifest is older than one this host accepted on the channel
    /// (no downgrade): the host fails this rollout.
    Stale,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Refused => "refused",
            RejectCode::Busy => "busy",
            RejectCode::Stale => "stale",
        }
    }
}

/// The kind of an event without its fields: for tables, names and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Activate,
    ActivationStarted,
    ActivationCompleted,
    ActivationDeferred,
    ActivationFailed,
    ProbeTopologyDeclared,
    ProbeObservedFirst,
    ProbeResult,
    ProbeFailureFirst,
    SustainedFailureCrossed,
    RollbackCompleted,
    RollbackFailed,
    DispatchRejected,
    ConvergedReached,
}

impl EventKind {
    pub const ALL: [EventKind; 14] = [
        EventKind::Activate,
        EventKind::ActivationStarted,
        EventKind::ActivationCompleted,
        EventKind::ActivationDeferred,
        EventKind::ActivationFailed,
        EventKind::ProbeTopologyDeclared,
        EventKind::ProbeObservedFirst,
        EventKind::ProbeResult,
        EventKind::ProbeFailureFirst,
        EventKind::SustainedFailureCrossed,
        EventKind::RollbackCompleted,
        EventKind::RollbackFailed,
        EventKind::DispatchRejected,
        EventKind::ConvergedReached,
    ];

    pub fn local_name(self) -> &'static str {
        match self {
            EventKind::Activate => "LocalActivate",
            EventKind::ActivationStarted => "LocalActivationStarted",
            EventKind::ActivationCompleted => "LocalActivationCompleted",
            EventKind::ActivationDeferred => "LocalActivationDeferred",
            EventKind::ActivationFailed => "LocalActivationFailed",
            EventKind::ProbeTopologyDeclared => "LocalProbeTopologyDeclared",
            EventKind::ProbeObservedFirst => "LocalProbeObservedFirst",
            EventKind::ProbeResult => "LocalProbeResult",
            EventKind::ProbeFailureFirst => "LocalProbeFailureFirst",
            EventKind::SustainedFailureCrossed => "LocalSustainedFailureCrossed",
            EventKind::RollbackCompleted => "LocalRollbackCompleted",
            EventKind::RollbackFailed => "LocalRollbackFailed",
            EventKind::DispatchRejected => "LocalDispatchRejected",
            EventKind::ConvergedReached => "LocalConvergedReached",
        }
    }

    pub fn remote_name(self) -> &'static str {
        match self {
            EventKind::Activate => "RemoteDispatchAck",
            EventKind::ActivationStarted => "RemoteActivationStarted",
            EventKind::ActivationCompleted => "RemoteActivationCompleted",
            EventKind::ActivationDeferred => "RemoteActivationDeferred",
            EventKind::ActivationFailed => "RemoteActivationFailed",
            EventKind::ProbeTopologyDeclared => "RemoteProbeTopologyDeclared",
            EventKind::ProbeObservedFirst => "RemoteProbeObservedFirst",
            EventKind::ProbeResult => "RemoteProbeResult",
            EventKind::ProbeFailureFirst => "RemoteProbeFailureFirst",
            EventKind::SustainedFailureCrossed => "RemoteFailed",
            EventKind::RollbackCompleted => "RemoteRollbackComplete",
            EventKind::RollbackFailed => "RemoteRollbackFailed",
            EventKind::DispatchRejected => "RemoteDispatchRejected",
            EventKind::ConvergedReached => "RemoteConverged",
        }
    }

    /// The outbound (wire and queue file name) kind: the Remote name without
    /// its prefix, e.g. `DispatchAck`, `Failed`, `RollbackComplete`.
    pub fn wire_name(self) -> &'static str {
        let remote = self.remote_name();
        remote.strip_prefix("Remote").unwrap_or(remote)
    }
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::Activate { .. } => EventKind::Activate,
            EventBody::ActivationStarted { .. } => EventKind::ActivationStarted,
            EventBody::ActivationCompleted { .. } => EventKind::ActivationCompleted,
            EventBody::ActivationDeferred { .. } => EventKind::ActivationDeferred,
            EventBody::ActivationFailed { .. } => EventKind::ActivationFailed,
            EventBody::ProbeTopologyDeclared { .. } => EventKind::ProbeTopologyDeclared,
            EventBody::ProbeObservedFirst { .. } => EventKind::ProbeObservedFirst,
            EventBody::ProbeResult { .. } => EventKind::ProbeResult,
            EventBody::ProbeFailureFirst { .. } => EventKind::ProbeFailureFirst,
            EventBody::SustainedFailureCrossed { .. } => EventKind::SustainedFailureCrossed,
            EventBody::RollbackCompleted { .. } => EventKind::RollbackCompleted,
            EventBody::RollbackFailed { .. } => EventKind::RollbackFailed,
            EventBody::DispatchRejected { .. } => EventKind::DispatchRejected,
            EventBody::ConvergedReached { .. } => EventKind::ConvergedReached,
        }
    }

    /// The agent-owned instant at which the fact happened (`docs/protocol.md` §1: the
    /// control plane stores the agent's time, never its own receive time).
    pub fn occurred_at(&self) -> Timestamp {
        match self {
            EventBody::Activate { received_at, .. } => *received_at,
            EventBody::ActivationStarted { started_at, .. } => *started_at,
            EventBody::ActivationCompleted { completed_at, .. } => *completed_at,
            EventBody::ActivationDeferred { deferred_at, .. } => *deferred_at,
            EventBody::ActivationFailed { failed_at, .. } => *failed_at,
            EventBody::ProbeTopologyDeclared { declared_at, .. } => *declared_at,
            EventBody::ProbeObservedFirst { observed_at, .. } => *observed_at,
            EventBody::ProbeResult { observed_at, .. } => *observed_at,
            EventBody::ProbeFailureFirst { first_failed_at, .. } => *first_failed_at,
            EventBody::SustainedFailureCrossed { failed_at, .. } => *failed_at,
            EventBody::RollbackCompleted { completed_at, .. } => *completed_at,
            EventBody::RollbackFailed { failed_at, .. } => *failed_at,
            EventBody::DispatchRejected { rejected_at, .. } => *rejected_at,
            EventBody::ConvergedReached { converged_at, .. } => *converged_at,
        }
    }
}
