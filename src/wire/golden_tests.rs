//! The wire format, pinned (tests only): every event kind and every API body is
//! serialised and compared with `tests/golden/wire.json`, and the golden
//! JSON parses back into the same value. The machine's types travel on the
//! wire through `wire`, so a rename there must show up here as a failing
//! test, never as a silent protocol change. After an intended change, run
//! with `NIXFLEET_BLESS=1` and review the diff of the golden file.

use std::collections::BTreeMap;

use super::{
    BatchItem, Dispatch, ErrorBody, EventBatch, EventBatchResponse, EventResult, Heartbeat, HeartbeatResponse,
    OutboundEvent, ResultStatus,
};
use crate::ids::{Closure, Hostname, RolloutId};
use crate::machine::{EventBody, EventKind};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use time::macros::datetime;

const GOLDEN: &str = "tests/golden/wire.json";

fn closure(c: char) -> Closure {
    Closure::parse(&format!("/nix/store/{}-nixos-system-web-1", c.to_string().repeat(32))).expect("closure")
}

fn golden_entries() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let bodies = super::tests::one_of_each_kind();
    let kinds: Vec<EventKind> = bodies.iter().map(EventBody::kind).collect();
    assert_eq!(kinds, EventKind::ALL.to_vec(), "one golden event per kind, in EventKind::ALL order");
    for (idx, body) in bodies.iter().enumerate() {
        let event = OutboundEvent::from_machine(idx as u64 + 1, body);
        out.insert(format!("event.{}", event.kind()), check_round_trip(&event));
    }
    let rollout_id = RolloutId::parse("stable@2026-11-25.1").expect("id");
    let hostname = Hostname::parse("web-1").expect("host");
    let t = datetime!(2026-11-25 12:00 UTC);
    let batch = EventBatch {
        hostname: hostname.clone(),
        events: vec![BatchItem { rollout_id: rollout_id.clone(), event: OutboundEvent::from_machine(1, &bodies[0]) }],
    };
    out.insert("api.EventBatch".into(), check_round_trip(&batch));
    let results = EventBatchResponse {
        results: vec![
            EventResult { status: ResultStatus::Applied, reason: None, expected_seq: None },
            EventResult { status: ResultStatus::Duplicate, reason: None, expected_seq: None },
            EventResult { status: ResultStatus::Rejected, reason: Some("illegal".into()), expected_seq: None },
            EventResult { status: ResultStatus::Retry, reason: Some("unknown rollout".into()), expected_seq: None },
            EventResult { status: ResultStatus::Gap, reason: Some("send from 2".into()), expected_seq: Some(2) },
        ],
    };
    out.insert("api.EventBatchResponse".into(), check_round_trip(&results));
    let dispatch = Dispatch {
        rollout_id: rollout_id.clone(),
        target_closure: closure('b'),
        wave: 0,
        soak_secs: 300,
        issued_at: t,
    };
    out.insert("api.Dispatch".into(), check_round_trip(&dispatch));
    let heartbeat = Heartbeat {
        hostname,
        current_closure: closure('b'),
        booted_closure: Some(closure('b')),
        uptime_secs: 86_400,
        agent_version: "0.1.0".into(),
        last_seq: BTreeMap::from([(rollout_id.clone(), 8)]),
    };
    out.insert("api.Heartbeat".into(), check_round_trip(&heartbeat));
    let answer = HeartbeatResponse { server_time: t, replay_from: BTreeMap::from([(rollout_id, 0)]) };
    out.insert("api.HeartbeatResponse".into(), check_round_trip(&answer));
    let error = ErrorBody { error: "body_too_large".into(), message: "the body is larger than 1 MiB".into() };
    out.insert("api.ErrorBody".into(), check_round_trip(&error));
    out
}

/// Serialises, parses back and checks the value survived; returns the JSON.
#[track_caller]
fn check_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) -> Value {
    let json = serde_json::to_value(value).expect("serialise");
    let back: T = serde_json::from_value(json.clone()).expect("parse back");
    assert_eq!(&back, value, "round trip changed the value");
    json
}

#[test]
fn every_event_kind_and_api_body_matches_the_golden_json() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let now = golden_entries();
    if std::env::var_os("NIXFLEET_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&now).expect("serialise") + "\n";
        std::fs::write(&path, text).expect("write golden file");
        return;
    }
    let text = std::fs::read_to_string(&path).expect("tests/golden/wire.json (NIXFLEET_BLESS=1 writes it)");
    let golden: BTreeMap<String, Value> = serde_json::from_str(&text).expect("golden JSON");
    let names = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&golden), names(&now), "the set of pinned bodies changed");
    for (name, value) in &now {
        assert_eq!(
            &golden[name],
            value,
            "the wire form of {name} changed; if intended, bless it (NIXFLEET_BLESS=1) and say so in the protocol document"
        );
    }
    // Also the other way round: the pinned JSON parses with today's types,
    // so agents of this version still read what the golden file says.
    for (name, value) in &golden {
        if name.starts_with("event.") {
            let event: OutboundEvent = serde_json::from_value(value.clone()).expect(name);
            event.to_body().expect(name);
        }
    }
}
