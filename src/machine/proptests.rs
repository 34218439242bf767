//! Property tests of the state machine's invariants:
//! - `step` is total: no panic for any record and any event (`docs/protocol.md` §3 rule 11);
//! - the agent (Local events) and the control plane (the same events sent
//!   through the wire format and back as Remote events) reach identical
//!   records after every event ("same step, both sides");
//! - replaying the agent's own outbound journal from a fresh record rebuilds
//!   the live record (agent restart, CP replay);
//! - the gates are monotonic in time while nothing else happens.

use proptest::prelude::*;
use time::{Duration, PrimitiveDateTime};

use super::tests::{fresh, new, old, other, T0};
use super::*;
use crate::ids::Closure;
use crate::wire::OutboundEvent;

const PROBE_NAMES: [&str; 3] = ["web", "db", "log"];

fn any_closure() -> impl Strategy<Value = Closure> {
    prop_oneof![Just(old()), Just(new()), Just(other())]
}

fn any_time() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        8 => (0i64..100_000).prop_map(|s| T0 + Duration::seconds(s)),
        1 => Just(PrimitiveDateTime::MIN.assume_utc()),
        1 => Just(PrimitiveDateTime::MAX.assume_utc()),
    ]
}

fn any_mode() -> impl Strategy<Value = ProbeMode> {
    prop_oneof![Just(ProbeMode::Enforce), Just(ProbeMode::Observe), Just(ProbeMode::Disabled)]
}

fn any_status() -> impl Strategy<Value = ProbeStatus> {
    prop_oneof![Just(ProbeStatus::Pass), Just(ProbeStatus::Fail)]
}

fn any_probe_name() -> impl Strategy<Value = String> {
    prop::sample::select(PROBE_NAMES.to_vec()).prop_map(str::to_owned)
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![Just(OnHealthFailure::Halt), Just(OnHealthFailure::RollbackAndHalt)],
        prop_oneof![Just(60u64), 0u64..200, Just(u64::MAX)],
    )
        .prop_map(|(on_health_failure, sustained_failure_secs)| Policy { on_health_failure, sustained_failure_secs })
}

fn any_decls() -> impl Strategy<Value = Vec<ProbeDecl>> {
    prop::collection::vec(
        (any_probe_name(), any_mode()).prop_map(|(name, mode)| ProbeDecl { name, kind: ProbeKind::Exec, mode }),
        0..4,
    )
}

fn any_body() -> impl Strategy<Value = EventBody> {
    any_body_at(any_time)
}

/// Instants the agent's clock can produce (and RFC 3339 can carry).
fn wire_time() -> impl Strategy<Value = Timestamp> {
    (0i64..100_000).prop_map(|s| T0 + Duration::seconds(s))
}

fn any_body_at<S: Strategy<Value = Timestamp> + 'static>(any_time: fn() -> S) -> impl Strategy<Value = EventBody> {
    prop_oneof![
        (any_closure(), any_closure(), prop_oneof![0u64..1000, Just(u64::MAX)], any_time()).prop_map(
            |(c, t, soak_secs, received_at)| EventBody::Activate {
                current_closure_at_dispatch: c,
                target_closure: t,
                soak_secs,
                received_at
            }
        ),
        any_time().prop_map(|t| EventBody::ActivationStarted { started_at: t, switch_method: "direct".into() }),
        (any_closure(), any::<i32>(), any_time()).prop_map(|(c, exit_code, t)| EventBody::ActivationCompleted {
            observed_current_closure: c,
            exit_code,
            completed_at: t
        }),
        any_time().prop_map(|t| EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: t }),
        (any::<i32>(), any_time()).prop_map(|(exit_code, t)| EventBody::ActivationFailed {
            exit_code,
            stderr_tail: "e".into(),
            failed_at: t
        }),
        (any_decls(), any_time()).prop_map(|(probes, t)| EventBody::ProbeTopologyDeclared { probes, declared_at: t }),
        (any_probe_name(), any_mode(), any_time())
            .prop_map(|(probe_name, mode, t)| { EventBody::ProbeObservedFirst { probe_name, mode, observed_at: t } }),
        (any_probe_name(), any_mode(), any_status(), any_time()).prop_map(|(probe_name, mode, status, t)| {
            EventBody::ProbeResult { probe_name, mode, status, observed_at: t, failure_reason: None }
        }),
        (any_probe_name(), any_mode(), any_time()).prop_map(|(probe_name, mode, t)| {
            EventBody::ProbeFailureFirst { probe_name, mode, first_failed_at: t }
        }),
        (any_time(), any::<u64>(), prop::collection::vec(any_probe_name(), 0..3), any_policy()).prop_map(
            |(t, d, failing_probes, p)| EventBody::SustainedFailureCrossed {
                failed_at: t,
                sustained_duration_secs: d,
                failing_probes,
                policy_applied: p.on_health_failure
            }
        ),
        (any_closure(), any::<i32>(), any_time()).prop_map(|(c, exit_code, t)| EventBody::RollbackCompleted {
            reverted_to_closure: c,
            exit_code,
            completed_at: t
        }),
        (any::<i32>(), any_time()).prop_map(|(exit_code, t)| EventBody::RollbackFailed {
            exit_code,
            stderr_tail: "e".into(),
            failed_at: t
        }),
        (
            any_closure(),
            any_time(),
            prop_oneof![Just(RejectCode::Refused), Just(RejectCode::Busy), Just(RejectCode::Stale)]
        )
            .prop_map(|(c, t, code)| EventBody::DispatchRejected {
                target_closure: c,
                code,
                reason: "r".into(),
                rejected_at: t
            }),
        (any_time(), any_closure())
            .prop_map(|(t, c)| EventBody::ConvergedReached { converged_at: t, current_closure: c }),
    ]
}

fn any_state() -> impl Strategy<Value = HostState> {
    prop::sample::select(HostState::ALL.to_vec())
}

/// Records that may be inconsistent: a reachable record from a random script,
/// then with its state and clocks overwritten at random.
fn any_record() -> impl Strategy<Value = HostRecord> {
    (
        prop::collection::vec(any_body(), 0..12),
        any_policy(),
        prop::option::of(any_state()),
        prop::option::of(any_time()),
        prop::option::of(any_time()),
        any::<bool>(),
    )
        .prop_map(|(bodies, policy, state, due, clock, fired)| {
            let mut record = fresh(Some(new()));
            for body in bodies {
                let event = Event::local(record.last_seq + 1, body);
                if let Ok(Outcome::Applied { record: next, .. }) = step(&record, &event, &policy) {
                    record = *next;
                }
            }
            if let Some(state) = state {
                record.state = state;
                record.soak_due_at = due;
                record.failure_clock_since = clock;
                record.rollback_fired = fired;
            }
            record
        })
}

/// One step of a guided script: which plausible event to build and how far
/// time moves. Guided choices reach deep states far more often than
/// uniformly random events would.
#[derive(Debug, Clone)]
struct Choice {
    pick: u8,
    alt: u8,
    advance_secs: u16,
    random: Option<EventBody>,
}

fn any_choice() -> impl Strategy<Value = Choice> {
    (any::<u8>(), any::<u8>(), 0u16..400, prop::option::weighted(0.1, any_body_at(wire_time)))
        .prop_map(|(pick, alt, advance_secs, random)| Choice { pick, alt, advance_secs, random })
}

/// Builds the next event the agent would plausibly produce in this state.
fn plausible(record: &HostRecord, policy: &Policy, now: Timestamp, c: &Choice) -> EventBody {
    if let Some(body) = &c.random {
        return body.clone();
    }
    let alt = c.alt;
    match record.state {
        HostState::Pending => match c.pick % 6 {
            0 => EventBody::DispatchRejected {
                target_closure: new(),
                code: RejectCode::Refused,
                reason: "bad signature".into(),
                rejected_at: now,
            },
            _ => EventBody::Activate {
                current_closure_at_dispatch: if alt.is_multiple_of(4) { new() } else { old() },
                target_closure: new(),
                soak_secs: [0, 30, 300][usize::from(alt % 3)],
                received_at: now,
            },
        },
        HostState::Activating | HostState::Deferred => match c.pick % 5 {
            0 => EventBody::ActivationStarted { started_at: now, switch_method: "systemd-run".into() },
            1 => EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: now },
            2 => EventBody::ActivationFailed { exit_code: 1, stderr_tail: "boom".into(), failed_at: now },
            _ => EventBody::ActivationCompleted {
                observed_current_closure: if alt.is_multiple_of(8) { other() } else { new() },
                exit_code: 0,
                completed_at: now,
            },
        },
        HostState::Soaking => {
            let probe_name = PROBE_NAMES[usize::from(alt) % PROBE_NAMES.len()].to_owned();
            let mode = record.declared_mode(&probe_name).unwrap_or(ProbeMode::Enforce);
            match c.pick % 8 {
                0 => EventBody::ProbeTopologyDeclared {
                    probes: PROBE_NAMES
                        .iter()
                        .take(usize::from(alt % 4))
                        .enumerate()
                        .map(|(idx, name)| ProbeDecl {
                            name: (*name).to_owned(),
                            kind: ProbeKind::Http,
                            mode: [ProbeMode::Enforce, ProbeMode::Observe, ProbeMode::Disabled]
                                [(idx + usize::from(alt / 4)) % 3],
                        })
                        .collect(),
                    declared_at: now,
                },
                1 => EventBody::ProbeObservedFirst { probe_name, mode, observed_at: now },
                2..=4 => EventBody::ProbeResult {
                    probe_name,
                    mode,
                    status: if alt.is_multiple_of(3) { ProbeStatus::Fail } else { ProbeStatus::Pass },
                    observed_at: now,
                    failure_reason: None,
                },
                _ => due_event(record, policy, now).unwrap_or(EventBody::ProbeResult {
                    probe_name,
                    mode,
                    status: ProbeStatus::Pass,
                    observed_at: now,
                    failure_reason: None,
                }),
            }
        }
        HostState::Failed => match c.pick % 3 {
            0 => EventBody::RollbackFailed { exit_code: 2, stderr_tail: "x".into(), failed_at: now },
            _ => EventBody::RollbackCompleted {
                reverted_to_closure: record.current_closure_at_dispatch.clone().unwrap_or_else(old),
                exit_code: 0,
                completed_at: now,
            },
        },
        HostState::Converged | HostState::Reverted => {
            EventBody::ActivationStarted { started_at: now, switch_method: "late".into() }
        }
    }
}

/// The CP's view of an outbound event: serialised as the agent would send it,
/// parsed as the CP would receive it, converted to a Remote event.
fn through_the_wire(seq: u64, body: &EventBody) -> Event {
    let json = serde_json::to_string(&OutboundEvent::from_machine(seq, body)).expect("serialise");
    let parsed: OutboundEvent = serde_json::from_str(&json).expect("parse what we sent");
    parsed.to_remote().expect("valid on the wire")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Rule 11: `step` never panics, and its answer is well-formed.
    #[test]
    fn step_is_total(record in any_record(), body in any_body(), seq in 0u64..40,
                     remote in any::<bool>(), policy in any_policy()) {
        let event = if remote { Event::remote(seq, body) } else { Event::local(seq, body) };
        match step(&record, &event, &policy) {
            Ok(Outcome::Applied { record: next, effects }) => {
                prop_assert_eq!(next.last_seq, seq);
                let journal_first = matches!(
                    effects.first(),
                    Some(Effect::EmitOutbound { .. } | Effect::AppendEventLog { .. })
                );
                prop_assert!(journal_first, "journal effect must come first: {:?}", effects);
                prop_assert!(!record.state.is_terminal());
            }
            Ok(Outcome::Duplicate { last_seq }) => prop_assert!(seq <= last_seq),
            Ok(Outcome::Gap { expected }) => {
                prop_assert_eq!(expected, record.last_seq + 1);
                prop_assert!(seq > expected);
            }
            Err(e) => prop_assert_eq!(e.state(), record.state),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Same step, both sides: after every event the agent applied, the CP's
    /// record (fed through the wire format) is identical to the agent's; and
    /// the agent's journal alone rebuilds its record.
    #[test]
    fn agent_and_cp_agree_and_the_journal_rebuilds_the_record(
        choices in prop::collection::vec(any_choice(), 1..60),
        policy in any_policy(),
    ) {
        let mut agent = fresh(Some(new()));
        let mut cp = fresh(Some(new()));
        let mut journal: Vec<Event> = Vec::new();
        let mut now = T0;
        for choice in &choices {
            now += Duration::seconds(i64::from(choice.advance_secs));
            let body = plausible(&agent, &policy, now, choice);
            let event = Event::local(agent.last_seq + 1, body);
            let Ok(Outcome::Applied { record, effects }) = step(&agent, &event, &policy) else {
                continue; // the agent refuses it: nothing is emitted, nothing reaches the CP
            };
            agent = *record;
            let emitted: Vec<_> = effects.iter().filter_map(|e| match e {
                Effect::EmitOutbound { seq, body } => Some((*seq, body.clone())),
                _ => None,
            }).collect();
            prop_assert_eq!(emitted.len(), 1);
            let (seq, body) = &emitted[0];
            prop_assert_eq!(*seq, event.seq);
            journal.push(Event::local(*seq, body.clone()));

            let remote = through_the_wire(*seq, body);
            match step(&cp, &remote, &policy) {
                Ok(Outcome::Applied { record, effects }) => {
                    let journal_first = matches!(effects.first(), Some(Effect::AppendEventLog { .. }));
                    prop_assert!(journal_first, "append first: {:?}", effects);
                    cp = *record;
                }
                other => prop_assert!(false, "CP refused what the agent applied: {:?}", other),
            }
            prop_assert_eq!(&cp, &agent);
        }
        if !journal.is_empty() {
            let rebuilt = replay(fresh(None), &journal, &policy).map_err(|(i, e)| {
                TestCaseError::fail(format!("replay failed at {i}: {e}"))
            })?;
            prop_assert_eq!(&rebuilt, &agent);
        }
    }

    /// The gates are monotonic: once due at t, still due at any later t'
    /// (nothing else changed), so a late tick never misses a decision.
    #[test]
    fn gates_stay_due_as_time_advances(
        choices in prop::collection::vec(any_choice(), 1..40),
        policy in any_policy(),
        later_secs in 0i64..100_000,
    ) {
        let mut record = fresh(Some(new()));
        let mut now = T0;
        for choice in &choices {
            now += Duration::seconds(i64::from(choice.advance_secs));
            let event = Event::local(record.last_seq + 1, plausible(&record, &policy, now, choice));
            if let Ok(Outcome::Applied { record: next, .. }) = step(&record, &event, &policy) {
                record = *next;
            }
        }
        let later = now + Duration::seconds(later_secs);
        if converge_due(&record, now).is_some() {
            prop_assert!(converge_due(&record, later).is_some());
        }
        if sustained_failure_due(&record, &policy, now).is_some() {
            prop_assert!(sustained_failure_due(&record, &policy, later).is_some());
        }
        if let Some(body) = due_event(&record, &policy, now) {
            let event = Event::local(record.last_seq + 1, body);
            let applied = matches!(step(&record, &event, &policy), Ok(Outcome::Applied { .. }));
            prop_assert!(applied, "a gate's event must be accepted by step");
        }
    }
}
