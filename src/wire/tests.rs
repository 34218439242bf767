//! Round trips and rejections at the wire boundary.

use serde_json::json;
use time::macros::datetime;

use super::event::{MAX_PROBES, MAX_STDERR_TAIL_BYTES};
use super::*;
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{
    EventBody, EventKind, OnHealthFailure, Origin, ProbeDecl, ProbeKind, ProbeMode, ProbeStatus, RejectCode,
};

const OLD: &str = "/nix/store/00000000000000000000000000000000-nixos-system-web-1-old";
const NEW: &str = "/nix/store/11111111111111111111111111111111-nixos-system-web-1-new";

fn closure(s: &str) -> Closure {
    Closure::parse(s).expect("valid")
}

pub(super) fn one_of_each_kind() -> Vec<EventBody> {
    let t = datetime!(2026-11-25 12:00:00.123456789 UTC);
    vec![
        EventBody::Activate {
            current_closure_at_dispatch: closure(OLD),
            target_closure: closure(NEW),
            soak_secs: 300,
            received_at: t,
        },
        EventBody::ActivationStarted { started_at: t, switch_method: "systemd-run".into() },
        EventBody::ActivationCompleted { observed_current_closure: closure(NEW), exit_code: 0, completed_at: t },
        EventBody::ActivationDeferred { component: "kernel".into(), deferred_at: t },
        EventBody::ActivationFailed { exit_code: -9, stderr_tail: "error: ünïcode\n".into(), failed_at: t },
        EventBody::ProbeTopologyDeclared {
            probes: vec![
                ProbeDecl { name: "web".into(), kind: ProbeKind::Http, mode: ProbeMode::Enforce },
                ProbeDecl { name: "sshd".into(), kind: ProbeKind::Systemd, mode: ProbeMode::Observe },
            ],
            declared_at: t,
        },
        EventBody::ProbeObservedFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, observed_at: t },
        EventBody::ProbeResult {
            probe_name: "web".into(),
            mode: ProbeMode::Enforce,
            status: ProbeStatus::Fail,
            observed_at: t,
            failure_reason: Some("HTTP 503".into()),
        },
        EventBody::ProbeFailureFirst { probe_name: "web".into(), mode: ProbeMode::Enforce, first_failed_at: t },
        EventBody::SustainedFailureCrossed {
            failed_at: t,
            sustained_duration_secs: 61,
            failing_probes: vec!["web".into()],
            policy_applied: OnHealthFailure::RollbackAndHalt,
        },
        EventBody::RollbackCompleted { reverted_to_closure: closure(OLD), exit_code: 0, completed_at: t },
        EventBody::RollbackFailed { exit_code: 1, stderr_tail: "x".into(), failed_at: t },
        EventBody::DispatchRejected {
            target_closure: closure(NEW),
            code: RejectCode::Refused,
            reason: "bad signature".into(),
            rejected_at: t,
        },
        EventBody::ConvergedReached { converged_at: t, current_closure: closure(NEW) },
    ]
}

#[test]
fn every_event_kind_round_trips_through_json_exactly() {
    // Proves the outbound format loses nothing (nanoseconds included) and
    // carries the wire names of `docs/protocol.md` §3 as `kind`.
    let bodies = one_of_each_kind();
    let kinds: Vec<EventKind> = bodies.iter().map(EventBody::kind).collect();
    assert_eq!(kinds, EventKind::ALL.to_vec(), "one sample per kind");
    for (idx, body) in bodies.iter().enumerate() {
        let seq = idx as u64 + 1;
        let event = OutboundEvent::from_machine(seq, body);
        let json = serde_json::to_value(&event).expect("serialise");
        assert_eq!(json["kind"], body.kind().wire_name(), "{json}");
        assert_eq!(json["seq"], seq);
        let back: OutboundEvent = serde_json::from_value(json).expect("parse");
        assert_eq!(back, event);
        let remote = back.to_remote().expect("valid");
        assert_eq!((remote.origin, remote.seq, &remote.body), (Origin::Remote, seq, body));
        assert_eq!(back.to_local().expect("valid").origin, Origin::Local);
    }
}

#[test]
fn the_dispatch_ack_has_the_documented_shape() {
    // Proves the wire shape of `docs/protocol.md` §4 for the most important event.
    let event = OutboundEvent::from_machine(1, &one_of_each_kind()[0]);
    let json = serde_json::to_value(&event).expect("serialise");
    assert_eq!(
        json,
        json!({
            "seq": 1,
            "kind": "DispatchAck",
            "current_closure_at_dispatch": OLD,
            "target_closure": NEW,
            "soak_secs": 300,
            "received_at": "2026-11-25T12:00:00.123456789Z"
        })
    );
}

#[test]
fn non_utc_offsets_are_normalised_to_utc() {
    // Proves an agent with a local offset still yields UTC instants.
    let raw = json!({"seq": 3, "kind": "ActivationStarted", "started_at": "2026-11-25T14:00:00+02:00",
                     "switch_method": "direct"});
    let event: OutboundEvent = serde_json::from_value(raw).expect("parse");
    let EventBody::ActivationStarted { started_at, .. } = event.to_body().expect("valid") else { panic!() };
    assert_eq!(started_at, datetime!(2026-11-25 12:00 UTC));
    assert_eq!(started_at.offset(), time::UtcOffset::UTC);
}

#[test]
fn malformed_events_are_refused_naming_the_problem() {
    // Proves bad input is an error that says what is wrong, never a panic
    // or a silently altered event.
    let parse = |v: serde_json::Value| from_json_slice::<OutboundEvent>(v.to_string().as_bytes());
    let cases = [
        (json!({"seq": 1, "kind": "Teleported", "at": "x"}), "Teleported"),
        (json!({"seq": 1, "kind": "ActivationStarted"}), "started_at"),
        (
            json!({"seq": 1, "kind": "DispatchAck", "current_closure_at_dispatch": "/tmp/x", "target_closure": NEW,
                "soak_secs": 1, "received_at": "2026-11-25T12:00:00Z"}),
            "closure",
        ),
        (
            json!({"seq": -1, "kind": "ActivationStarted", "started_at": "2026-11-25T12:00:00Z", "switch_method": ""}),
            "seq",
        ),
        (
            json!({"seq": 1, "kind": "ActivationStarted", "started_at": "yesterday", "switch_method": ""}),
            "\"yesterday\"",
        ),
        (
            json!({"seq": 1, "kind": "ProbeResult", "probe_name": "web", "mode": "sometimes", "status": "pass",
                "observed_at": "2026-11-25T12:00:00Z"}),
            "sometimes",
        ),
        (
            json!({"seq": 1, "kind": "ProbeResult", "probe_name": "web", "mode": "enforce", "status": "unknown",
                "observed_at": "2026-11-25T12:00:00Z"}),
            "unknown",
        ),
    ];
    for (value, needle) in cases {
        let err = parse(value.clone()).expect_err(&value.to_string()).to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
}

#[test]
fn field_limits_are_enforced_when_converting_to_the_machine() {
    // Proves the size/shape bounds: seq >= 1, stderr tail <= 4 KiB, probe
    // names, probe count; each error names its field.
    let t = datetime!(2026-11-25 12:00 UTC);
    let to_body = |seq, body: &EventBody| OutboundEvent::from_machine(seq, body).to_body().map_err(|e| e.field);
    let ok = EventBody::ActivationStarted { started_at: t, switch_method: "direct".into() };
    assert_eq!(to_body(0, &ok), Err("seq".into()));
    // Above i64::MAX a seq would wrap in the CP's INTEGER column.
    assert_eq!(to_body(MAX_SEQ + 1, &ok), Err("seq".into()));
    assert_eq!(to_body(u64::MAX, &ok), Err("seq".into()));
    assert!(to_body(MAX_SEQ, &ok).is_ok());
    let long =
        EventBody::ActivationFailed { exit_code: 1, stderr_tail: "x".repeat(MAX_STDERR_TAIL_BYTES + 1), failed_at: t };
    assert_eq!(to_body(1, &long), Err("stderr_tail".into()));
    let bad_name = EventBody::ProbeObservedFirst { probe_name: "a b".into(), mode: ProbeMode::Enforce, observed_at: t };
    assert_eq!(to_body(1, &bad_name), Err("probe_name".into()));
    let many = EventBody::ProbeTopologyDeclared {
        probes: (0..=MAX_PROBES)
            .map(|i| ProbeDecl { name: format!("p{i}"), kind: ProbeKind::Tcp, mode: ProbeMode::Observe })
            .collect(),
        declared_at: t,
    };
    assert_eq!(to_body(1, &many), Err("probes".into()));
    let bad_decl = EventBody::ProbeTopologyDeclared {
        probes: vec![ProbeDecl { name: String::new(), kind: ProbeKind::Tcp, mode: ProbeMode::Observe }],
        declared_at: t,
    };
    assert_eq!(to_body(1, &bad_decl), Err("probes[0].name".into()));
    let long_reason = EventBody::ProbeResult {
        probe_name: "web".into(),
        mode: ProbeMode::Enforce,
        status: ProbeStatus::Fail,
        observed_at: t,
        failure_reason: Some("r".repeat(513)),
    };
    assert_eq!(to_body(1, &long_reason), Err("failure_reason".into()));
}

#[test]
fn event_batches_round_trip_and_their_bounds_hold() {
    // Proves the batch envelope, the empty and >256 refusals, and hostname
    // validation at parse time.
    let item = BatchItem {
        rollout_id: RolloutId::parse("stable@r1").expect("valid"),
        event: OutboundEvent::from_machine(1, &one_of_each_kind()[1]),
    };
    let batch = EventBatch { hostname: Hostname::parse("web-1").expect("valid"), events: vec![item.clone()] };
    let bytes = serde_json::to_vec(&batch).expect("serialise");
    assert_eq!(EventBatch::parse(&bytes).expect("parse"), batch);

    let empty = EventBatch { events: vec![], ..batch.clone() };
    let err = EventBatch::parse(&serde_json::to_vec(&empty).expect("serialise")).expect_err("empty");
    assert_eq!(err.field, "events");
    let full = EventBatch { events: vec![item; MAX_BATCH_EVENTS + 1], ..batch };
    let err = EventBatch::parse(&serde_json::to_vec(&full).expect("serialise")).expect_err("too many");
    assert!(err.message.contains("256"), "{err}");
    let err = EventBatch::parse(br#"{"hostname":"Web_1","events":[]}"#).expect_err("bad host");
    assert!(err.message.contains("invalid hostname"), "{err}");
    let err = EventBatch::parse(b"{not json").expect_err("bad json");
    assert_eq!(err.field, "body");
}

#[test]
fn heartbeats_parse_and_their_bounds_hold() {
    // Proves `Heartbeat::parse` (the CP's decoder) refuses, naming the field,
    // an over-long version and a last_seq beyond the wire's seq range.
    let body = |version: &str, seq: u64| {
        serde_json::to_vec(&json!({
            "hostname": "web-1", "current_closure": OLD, "uptime_secs": 5, "agent_version": version,
            "last_seq": {"stable@r1": seq}
        }))
        .expect("serialise")
    };
    let hb = Heartbeat::parse(&body("0.1.0", MAX_SEQ)).expect("parse");
    assert_eq!(hb.last_seq.values().copied().collect::<Vec<_>>(), [MAX_SEQ]);
    let long = "v".repeat(MAX_AGENT_VERSION_BYTES + 1);
    let err = Heartbeat::parse(&body(&long, 1)).expect_err("long version");
    assert_eq!(err.to_string(), format!("agent_version: longer than {MAX_AGENT_VERSION_BYTES} bytes"));
    let err = Heartbeat::parse(&body("0.1.0", MAX_SEQ + 1)).expect_err("seq beyond the bound");
    assert_eq!(err.field, "last_seq.stable@r1");
    let err = Heartbeat::parse(br#"{"hostname":"web-1","uptime_secs":"x"}"#).expect_err("bad json");
    assert_eq!(err.field, "body");
    assert!(err.message.contains("uptime_secs"), "names the JSON path: {err}");
}

#[test]
fn results_dispatch_and_heartbeat_round_trip() {
    // Proves the remaining API bodies keep their `docs/protocol.md` §4 field names.
    let results = EventBatchResponse {
        results: vec![
            EventResult { status: ResultStatus::Applied, reason: None, expected_seq: None },
            EventResult { status: ResultStatus::Rejected, reason: Some("illegal".into()), expected_seq: None },
            EventResult { status: ResultStatus::Gap, reason: None, expected_seq: Some(3) },
        ],
    };
    let v = serde_json::to_value(&results).expect("serialise");
    assert_eq!(
        v,
        json!({"results": [
            {"status": "applied"},
            {"status": "rejected", "reason": "illegal"},
            {"status": "gap", "expected_seq": 3}
        ]})
    );
    assert!(serde_json::from_value::<EventResult>(json!({"status": "maybe"})).is_err());

    let dispatch = Dispatch {
        rollout_id: RolloutId::parse("stable@r1").expect("valid"),
        target_closure: closure(NEW),
        wave: 1,
        soak_secs: 600,
        issued_at: datetime!(2026-11-25 12:00 UTC),
    };
    let v = serde_json::to_value(&dispatch).expect("serialise");
    assert_eq!(v["rollout_id"], "stable@r1");
    assert_eq!(serde_json::from_value::<Dispatch>(v).expect("parse"), dispatch);

    let hb: Heartbeat = serde_json::from_value(json!({
        "hostname": "web-1", "current_closure": OLD, "uptime_secs": 5, "agent_version": "0.1.0",
        "last_seq": {"stable@r1": 7}
    }))
    .expect("parse");
    assert_eq!(hb.last_seq.get(&RolloutId::parse("stable@r1").expect("valid")), Some(&7));
    assert_eq!(hb.booted_closure, None);
    let resp = HeartbeatResponse {
        server_time: datetime!(2026-11-25 12:00 UTC),
        replay_from: [(RolloutId::parse("stable@r1").expect("valid"), 4)].into(),
    };
    let v = serde_json::to_value(&resp).expect("serialise");
    assert_eq!(v, json!({"server_time": "2026-11-25T12:00:00Z", "replay_from": {"stable@r1": 4}}));
    assert!(serde_json::from_value::<Heartbeat>(json!({"hostname": "web-1", "last_seq": {"nochannel": 1},
        "current_closure": OLD, "uptime_secs": 1, "agent_version": "x"}))
    .is_err());
}

fn manifest_json() -> serde_json::Value {
    serde_json::from_str(include_str!("../../examples/manifest.json")).expect("the example manifest is JSON")
}

fn parse_manifest(v: &serde_json::Value) -> Result<Manifest, ManifestError> {
    Manifest::parse(&serde_json::to_vec(v).expect("serialise"))
}

#[test]
fn the_example_manifest_validates() {
    // Proves `examples/manifest.json` (the `docs/protocol.md` §2 shape) parses into typed values, and defaults apply.
    let m = parse_manifest(&manifest_json()).expect("valid");
    assert_eq!(m.rollout_id.as_str(), "stable@2026-11-25.1");
    assert_eq!(m.waves.len(), 2);
    assert_eq!(m.hosts_in_wave(1).count(), 1);
    assert_eq!(m.machine_policy().on_health_failure, OnHealthFailure::RollbackAndHalt);
    assert_eq!(parse_manifest(&m.to_json()).expect("round trip"), m);

    let mut v = manifest_json();
    v["policy"] = json!({"on_health_failure": "halt"});
    let m = parse_manifest(&v).expect("valid");
    assert_eq!((m.policy.sustained_failure_secs, m.policy.max_failed_hosts), (60, 0));
}

/// The manifest's host bound: MAX_HOSTS hosts parse, one more is refused
/// naming `hosts`.
#[test]
fn a_manifest_beyond_max_hosts_is_refused() {
    use crate::wire::manifest::MAX_HOSTS;
    let closure = manifest_json()["hosts"].as_object().and_then(|h| h.values().next().cloned()).expect("a host");
    let mut v = manifest_json();
    let hosts: serde_json::Map<String, serde_json::Value> = (0..MAX_HOSTS)
        .map(|i| (format!("h{i}"), json!({"wave": 0, "target_closure": closure["target_closure"].clone()})))
        .collect();
    v["hosts"] = serde_json::Value::Object(hosts);
    assert_eq!(parse_manifest(&v).expect("MAX_HOSTS hosts fit").hosts.len(), MAX_HOSTS);
    v["hosts"]["one-more"] = json!({"wave": 0, "target_closure": closure["target_closure"].clone()});
    let err = parse_manifest(&v).expect_err("one host too many");
    assert!(err.to_string().contains("hosts") && err.to_string().contains("more than 100000"), "{err}");
}

#[test]
fn invalid_manifests_are_refused_naming_the_field() {
    // Proves every validation rule gives an error that names its field.
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(Edit, &str)> = vec![
        (|v| v["schema"] = json!(2), "schema"),
        (|v| v["channel"] = json!("Stable!"), "channel"),
        (|v| v["ref"] = json!("a@b"), "ref"),
        (|v| v["waves"] = json!([]), "waves"),
        (|v| v["waves"][1]["name"] = json!("canary"), "waves[1].name"),
        (|v| v["waves"][0]["name"] = json!(""), "waves[0].name"),
        (|v| v["waves"][0]["max_in_flight"] = json!(0), "waves[0].max_in_flight"),
        (|v| v["waves"][1]["soak_secs"] = json!(700_000), "waves[1].soak_secs"),
        (|v| v["policy"]["sustained_failure_secs"] = json!(0), "policy.sustained_failure_secs"),
        (|v| v["hosts"] = json!({}), "hosts"),
        (|v| v["hosts"]["web-2"]["wave"] = json!(2), "hosts.web-2.wave"),
        (|v| v["hosts"]["web-2"]["target_closure"] = json!("/nix/store/x"), "hosts.web-2.target_closure"),
        (|v| v["hosts"]["Web_3"] = json!({"wave": 0, "target_closure": NEW}), "hosts.Web_3"),
    ];
    for (edit, field) in cases {
        let mut v = manifest_json();
        edit(&mut v);
        match parse_manifest(&v) {
            Err(ManifestError::Invalid { field: got, message }) => {
                assert_eq!(got, field, "{message}");
                assert!(!message.is_empty());
            }
            other => panic!("expected Invalid({field}), got {other:?}"),
        }
    }
}

#[test]
fn manifest_json_errors_name_the_unknown_or_missing_field() {
    // Proves strict parsing: a typo is an error, not a silently ignored field.
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(Edit, &str)> = vec![
        (|v| v["waves"][0]["max_inflight"] = json!(3), "max_inflight"),
        (|v| v["extra"] = json!(true), "extra"),
        (|v| drop(v.as_object_mut().map(|o| o.remove("hosts"))), "hosts"),
        (|v| v["policy"]["on_health_failure"] = json!("halt-only"), "halt-only"),
        (|v| v["issued_at"] = json!("tomorrow"), "issued_at"),
        (|v| v["hosts"]["web-1"]["wave"] = json!(-1), "-1"),
    ];
    for (edit, needle) in cases {
        let mut v = manifest_json();
        edit(&mut v);
        match parse_manifest(&v) {
            Err(ManifestError::Json(e)) => {
                let msg = e.to_string();
                assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
            }
            other => panic!("expected Json error mentioning {needle}, got {other:?}"),
        }
    }
    assert!(matches!(Manifest::parse(b"\xff\xfe"), Err(ManifestError::Json(_))));
}
