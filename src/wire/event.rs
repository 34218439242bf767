//! The agent's outbound events: what it journals in its queue and posts to
//! the control plane. One variant per event kind, tagged by `kind` with the
//! wire names of `docs/protocol.md` §3 (`DispatchAck`, `Failed`, …). Converting
//! to the machine's [`EventBody`] validates sizes and shapes and names the
//! offending field.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::WireError;
use crate::ids::Closure;
use crate::machine::{Event, EventBody, OnHealthFailure, ProbeDecl, ProbeMode, ProbeStatus, RejectCode};

/// The tail of a failed command's stderr that travels with the event; the
/// head of a Nix error is usually repeated at its end, and 4 KiB keeps a
/// full batch far below the body limit.
pub const MAX_STDERR_TAIL_BYTES: usize = 4096;
/// `docs/protocol.md` §6: a probe failure reason is at most 512 bytes.
pub const MAX_FAILURE_REASON_BYTES: usize = 512;
/// Free-text fields (switch method, deferred component, rejection reason).
pub const MAX_SHORT_TEXT_BYTES: usize = 1024;
/// Probes per host: a health-checks file with more is a mistake, and the
/// bound keeps a topology event small.
pub const MAX_PROBES: usize = 64;
/// Probe names are identifiers shown in tables and metrics labels.
pub const MAX_PROBE_NAME_LEN: usize = 64;

/// The largest seq on the wire: the CP stores seqs as SQLite INTEGER (i64),
/// and a larger one would wrap there and then shadow every later event.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// One outbound event: its per-(host, rollout) seq and its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundEvent {
    pub seq: u64,
    #[serde(flatten)]
    pub body: WireEventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum WireEventBody {
    DispatchAck {
        current_closure_at_dispatch: Closure,
        target_closure: Closure,
        soak_secs: u64,
        #[serde(with = "super::ts")]
        received_at: OffsetDateTime,
    },
    ActivationStarted {
        #[serde(with = "super::ts")]
        started_at: OffsetDateTime,
        switch_method: String,
    },
    ActivationCompleted {
        observed_current_closure: Closure,
        exit_code: i32,
        #[serde(with = "super::ts")]
        completed_at: OffsetDateTime,
    },
    ActivationDeferred {
        component: String,
        #[serde(with = "super::ts")]
        deferred_at: OffsetDateTime,
    },
    ActivationFailed {
        exit_code: i32,
        stderr_tail: String,
        #[serde(with = "super::ts")]
        failed_at: OffsetDateTime,
    },
    ProbeTopologyDeclared {
        probes: Vec<ProbeDecl>,
        #[serde(with = "super::ts")]
        declared_at: OffsetDateTime,
    },
    ProbeObservedFirst {
        probe_name: String,
        mode: ProbeMode,
        #[serde(with = "super::ts")]
        observed_at: OffsetDateTime,
    },
    ProbeResult {
        probe_name: String,
        mode: ProbeMode,
        status: ProbeStatus,
        #[serde(with = "super::ts")]
        observed_at: OffsetDateTime,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure_reason: Option<String>,
    },
    ProbeFailureFirst {
        probe_name: String,
        mode: ProbeMode,
        #[serde(with = "super::ts")]
        first_failed_at: OffsetDateTime,
    },
    Failed {
        #[serde(with = "super::ts")]
        failed_at: OffsetDateTime,
        sustained_duration_secs: u64,
        failing_probes: Vec<String>,
        policy_applied: OnHealthFailure,
    },
    RollbackComplete {
        reverted_to_closure: Closure,
        exit_code: i32,
        #[serde(with = "super::ts")]
        completed_at: OffsetDateTime,
    },
    RollbackFailed {
        exit_code: i32,
        stderr_tail: String,
        #[serde(with = "super::ts")]
        failed_at: OffsetDateTime,
    },
    DispatchRejected {
        target_closure: Closure,
        /// `refused` (the default, so older agents' events still parse),
        /// `busy` or `stale`.
        #[serde(default)]
        code: RejectCode,
        reason: String,
        #[serde(with = "super::ts")]
        rejected_at: OffsetDateTime,
    },
    Converged {
        #[serde(with = "super::ts")]
        converged_at: OffsetDateTime,
        current_closure: Closure,
    },
}

impl OutboundEvent {
    /// The agent's side: the outbound form of an event it just applied.
    pub fn from_machine(seq: u64, body: &EventBody) -> OutboundEvent {
        OutboundEvent { seq, body: WireEventBody::from_machine(body) }
    }

    /// The kind as used in queue file names and the CP's event log.
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// Validates and converts to the machine body (instants in UTC).
    pub fn to_body(&self) -> Result<EventBody, WireError> {
        if self.seq == 0 {
            return Err(WireError::new("seq", "must be at least 1"));
        }
        if self.seq > MAX_SEQ {
            return Err(WireError::new("seq", format!("must be at most {MAX_SEQ}")));
        }
        self.body.to_machine()
    }

    /// The control plane's side: the Remote mirror of this event.
    pub fn to_remote(&self) -> Result<Event, WireError> {
        Ok(Event::remote(self.seq, self.to_body()?))
    }

    /// The agent rebuilding from its own journal: the Local event again.
    pub fn to_local(&self) -> Result<Event, WireError> {
        Ok(Event::local(self.seq, self.to_body()?))
    }
}

fn utc(t: OffsetDateTime) -> OffsetDateTime {
    t.to_offset(time::UtcOffset::UTC)
}

fn text(field: &str, value: &str, max_bytes: usize) -> Result<String, WireError> {
    if value.len() > max_bytes {
        return Err(WireError::new(field, format!("longer than {max_bytes} bytes")));
    }
    Ok(value.to_owned())
}

/// A list of probe names (a declared topology, the failing probes): at
/// most [`MAX_PROBES`], each a valid name; `name_path` is the path of the
/// name at an index, for the error.
fn check_probe_names<'a>(
    field: &str,
    names: impl ExactSizeIterator<Item = &'a String>,
    name_path: impl Fn(usize) -> String,
) -> Result<(), WireError> {
    if names.len() > MAX_PROBES {
        return Err(WireError::new(field, format!("more than {MAX_PROBES} probes")));
    }
    for (idx, name) in names.enumerate() {
        validate_probe_name(&name_path(idx), name)?;
    }
    Ok(())
}

/// Probe names: `[A-Za-z0-9._-]{1,64}`, so they are safe in tables, file
/// names and metric labels.
pub fn validate_probe_name(field: &str, name: &str) -> Result<String, WireError> {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_PROBE_NAME_LEN || !name.bytes().all(ok_char) {
        return Err(WireError::new(field, format!("probe name {name:?} must match [A-Za-z0-9._-]{{1,64}}")));
    }
    Ok(name.to_owned())
}

impl WireEventBody {
    pub fn kind(&self) -> &'static str {
        match self {
            WireEventBody::DispatchAck { .. } => "DispatchAck",
            WireEventBody::ActivationStarted { .. } => "ActivationStarted",
            WireEventBody::ActivationCompleted { .. } => "ActivationCompleted",
            WireEventBody::ActivationDeferred { .. } => "ActivationDeferred",
            WireEventBody::ActivationFailed { .. } => "ActivationFailed",
            WireEventBody::ProbeTopologyDeclared { .. } => "ProbeTopologyDeclared",
            WireEventBody::ProbeObservedFirst { .. } => "ProbeObservedFirst",
            WireEventBody::ProbeResult { .. } => "ProbeResult",
            WireEventBody::ProbeFailureFirst { .. } => "ProbeFailureFirst",
            WireEventBody::Failed { .. } => "Failed",
            WireEventBody::RollbackComplete { .. } => "RollbackComplete",
            WireEventBody::RollbackFailed { .. } => "RollbackFailed",
            WireEventBody::DispatchRejected { .. } => "DispatchRejected",
            WireEventBody::Converged { .. } => "Converged",
        }
    }

    pub fn from_machine(body: &EventBody) -> WireEventBody {
        match body.clone() {
            EventBody::Activate { current_closure_at_dispatch, target_closure, soak_secs, received_at } => {
                WireEventBody::DispatchAck { current_closure_at_dispatch, target_closure, soak_secs, received_at }
            }
            EventBody::ActivationStarted { started_at, switch_method } => {
                WireEventBody::ActivationStarted { started_at, switch_method }
            }
            EventBody::ActivationCompleted { observed_current_closure, exit_code, completed_at } => {
                WireEventBody::ActivationCompleted { observed_current_closure, exit_code, completed_at }
            }
            EventBody::ActivationDeferred { component, deferred_at } => {
                WireEventBody::ActivationDeferred { component, deferred_at }
            }
            EventBody::ActivationFailed { exit_code, stderr_tail, failed_at } => {
                WireEventBody::ActivationFailed { exit_code, stderr_tail, failed_at }
            }
            EventBody::ProbeTopologyDeclared { probes, declared_at } => {
                WireEventBody::ProbeTopologyDeclared { probes, declared_at }
            }
            EventBody::ProbeObservedFirst { probe_name, mode, observed_at } => {
                WireEventBody::ProbeObservedFirst { probe_name, mode, observed_at }
            }
            EventBody::ProbeResult { probe_name, mode, status, observed_at, failure_reason } => {
                WireEventBody::ProbeResult { probe_name, mode, status, observed_at, failure_reason }
            }
            EventBody::ProbeFailureFirst { probe_name, mode, first_failed_at } => {
                WireEventBody::ProbeFailureFirst { probe_name, mode, first_failed_at }
            }
            EventBody::SustainedFailureCrossed {
                failed_at,
                sustained_duration_secs,
                failing_probes,
                policy_applied,
            } => WireEventBody::Failed { failed_at, sustained_duration_secs, failing_probes, policy_applied },
            EventBody::RollbackCompleted { reverted_to_closure, exit_code, completed_at } => {
                WireEventBody::RollbackComplete { reverted_to_closure, exit_code, completed_at }
            }
            EventBody::RollbackFailed { exit_code, stderr_tail, failed_at } => {
                WireEventBody::RollbackFailed { exit_code, stderr_tail, failed_at }
            }
            EventBody::DispatchRejected { target_closure, code, reason, rejected_at } => {
                WireEventBody::DispatchRejected { target_closure, code, reason, rejected_at }
            }
            EventBody::ConvergedReached { converged_at, current_closure } => {
                WireEventBody::Converged { converged_at, current_closure }
            }
        }
    }

    pub fn to_machine(&self) -> Result<EventBody, WireError> {
        Ok(match self.clone() {
            WireEventBody::DispatchAck { current_closure_at_dispatch, target_closure, soak_secs, received_at } => {
                EventBody::Activate {
                    current_closure_at_dispatch,
                    target_closure,
                    soak_secs,
                    received_at: utc(received_at),
                }
            }
            WireEventBody::ActivationStarted { started_at, switch_method } => EventBody::ActivationStarted {
                started_at: utc(started_at),
                switch_method: text("switch_method", &switch_method, MAX_SHORT_TEXT_BYTES)?,
            },
            WireEventBody::ActivationCompleted { observed_current_closure, exit_code, completed_at } => {
                EventBody::ActivationCompleted { observed_current_closure, exit_code, completed_at: utc(completed_at) }
            }
            WireEventBody::ActivationDeferred { component, deferred_at } => EventBody::ActivationDeferred {
                component: text("component", &component, MAX_SHORT_TEXT_BYTES)?,
                deferred_at: utc(deferred_at),
            },
            WireEventBody::ActivationFailed { exit_code, stderr_tail, failed_at } => EventBody::ActivationFailed {
                exit_code,
                stderr_tail: text("stderr_tail", &stderr_tail, MAX_STDERR_TAIL_BYTES)?,
                failed_at: utc(failed_at),
            },
            WireEventBody::ProbeTopologyDeclared { probes, declared_at } => {
                check_probe_names("probes", probes.iter().map(|p| &p.name), |idx| format!("probes[{idx}].name"))?;
                EventBody::ProbeTopologyDeclared { probes, declared_at: utc(declared_at) }
            }
            WireEventBody::ProbeObservedFirst { probe_name, mode, observed_at } => EventBody::ProbeObservedFirst {
                probe_name: validate_probe_name("probe_name", &probe_name)?,
                mode,
                observed_at: utc(observed_at),
            },
            WireEventBody::ProbeResult { probe_name, mode, status, observed_at, failure_reason } => {
                let failure_reason =
                    failure_reason.map(|r| text("failure_reason", &r, MAX_FAILURE_REASON_BYTES)).transpose()?;
                EventBody::ProbeResult {
                    probe_name: validate_probe_name("probe_name", &probe_name)?,
                    mode,
                    status,
                    observed_at: utc(observed_at),
                    failure_reason,
                }
            }
            WireEventBody::ProbeFailureFirst { probe_name, mode, first_failed_at } => EventBody::ProbeFailureFirst {
                probe_name: validate_probe_name("probe_name", &probe_name)?,
                mode,
                first_failed_at: utc(first_failed_at),
            },
            WireEventBody::Failed { failed_at, sustained_duration_secs, failing_probes, policy_applied } => {
                check_probe_names("failing_probes", failing_probes.iter(), |idx| format!("failing_probes[{idx}]"))?;
                EventBody::SustainedFailureCrossed {
                    failed_at: utc(failed_at),
                    sustained_duration_secs,
                    failing_probes,
                    policy_applied,
                }
            }
            WireEventBody::RollbackComplete { reverted_to_closure, exit_code, completed_at } => {
                EventBody::RollbackCompleted { reverted_to_closure, exit_code, completed_at: utc(completed_at) }
            }
            WireEventBody::RollbackFailed { exit_code, stderr_tail, failed_at } => EventBody::RollbackFailed {
                exit_code,
                stderr_tail: text("stderr_tail", &stderr_tail, MAX_STDERR_TAIL_BYTES)?,
                failed_at: utc(failed_at),
            },
            WireEventBody::DispatchRejected { target_closure, code, reason, rejected_at } => {
                EventBody::DispatchRejected {
                    target_closure,
                    code,
                    reason: text("reason", &reason, MAX_SHORT_TEXT_BYTES)?,
                    rejected_at: utc(rejected_at),
                }
            }
            WireEventBody::Converged { converged_at, current_closure } => {
                EventBody::ConvergedReached { converged_at: utc(converged_at), current_closure }
            }
        })
    }
}
