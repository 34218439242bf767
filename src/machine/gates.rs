//! Time-driven decisions, kept out of `step` (`docs/protocol.md` §3: "Timers are
//! not in `step`"). The agent's tick asks these pure helpers whether an event is due
//! at `now` and feeds the answer through `step` like any other event, so the
//! decision and its check share one implementation (`converge_holds`,
//! `sustained_failure_holds`) and cannot drift apart.

use super::event::{EventBody, ProbeMode};
use super::state::{HostRecord, HostState, Policy};
use super::step::{converge_holds, sustained_failure_holds};
use super::Timestamp;

/// `ConvergedReached` if every convergence invariant holds at `now`.
pub fn converge_due(record: &HostRecord, now: Timestamp) -> Option<EventBody> {
    converge_holds(record, now).ok()?;
    let current_closure = record.current_closure.clone()?;
    Some(EventBody::ConvergedReached { converged_at: now, current_closure })
}

/// `SustainedFailureCrossed` if enforce probes have failed continuously for
/// the policy's threshold at `now`.
pub fn sustained_failure_due(record: &HostRecord, policy: &Policy, now: Timestamp) -> Option<EventBody> {
    sustained_failure_holds(record, policy, now).ok()?;
    let since = record.failure_clock_since?;
    let sustained_duration_secs = u64::try_from((now - since).whole_seconds()).unwrap_or(0);
    Some(EventBody::SustainedFailureCrossed {
        failed_at: now,
        sustained_duration_secs,
        failing_probes: record.failing_enforce_probes(),
        policy_applied: policy.on_health_failure,
    })
}

/// `ProbeFailureFirst` when an enforce probe is failing and the sustained
/// failure clock is not running yet. The clock starts at the beginning of
/// the earliest current failure run, not at the time this is asked, so a
/// late tick cannot shorten or lengthen the grace period.
pub fn failure_clock_start_due(record: &HostRecord) -> Option<EventBody> {
    if record.state != HostState::Soaking || record.failure_clock_since.is_some() {
        return None;
    }
    record
        .enforce_probes()
        .filter_map(|p| {
            let since = record.probes.get(&p.name)?.failing_since?;
            Some((since, p.name.clone()))
        })
        .min()
        .map(|(first_failed_at, probe_name)| EventBody::ProbeFailureFirst {
            probe_name,
            mode: ProbeMode::Enforce,
            first_failed_at,
        })
}

/// The one event the tick should feed now, failure before convergence (a
/// host that is both past its soak and failing must not converge).
pub fn due_event(record: &HostRecord, policy: &Policy, now: Timestamp) -> Option<EventBody> {
    failure_clock_start_due(record)
        .or_else(|| sustained_failure_due(record, policy, now))
        .or_else(|| converge_due(record, now))
}
