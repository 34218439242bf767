//! `docs/protocol.md` is the project's contract; its typed JSON examples are
//! parsed here by the same parsers the product uses, so the document cannot
//! drift from the code.

use std::collections::BTreeMap;

use nixfleet::agent::probes::HealthChecks;
use nixfleet::wire::{
    Dispatch, ErrorBody, EventBatch, EventBatchResponse, Heartbeat, HeartbeatResponse, Manifest, OutboundEvent,
    ResultStatus,
};

/// The ```json <tag> blocks of the document, in order.
fn typed_blocks(doc: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        match current.as_mut() {
            None => {
                if let Some(tag) = line.strip_prefix("```json ") {
                    current = Some((tag.trim().to_owned(), String::new()));
                }
            }
            Some(_) if line.starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated code block in docs/protocol.md");
    blocks
}

#[track_caller]
fn fail<T>(tag: &str, text: &str, e: &dyn std::fmt::Display) -> T {
    panic!("docs/protocol.md `{tag}` example does not parse: {e}\n{text}")
}

#[test]
fn every_typed_json_example_in_the_protocol_document_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md");
    let doc = std::fs::read_to_string(&path).expect("docs/protocol.md");
    let blocks = typed_blocks(&doc);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (tag, text) in &blocks {
        let bytes = text.as_bytes();
        match tag.as_str() {
            "manifest" => drop(Manifest::parse(bytes).unwrap_or_else(|e| fail(tag, text, &e))),
            "envelope" => drop(nixfleet::sign::parse_envelope(bytes).unwrap_or_else(|e| fail(tag, text, &e))),
            "error" => drop(serde_json::from_slice::<ErrorBody>(bytes).unwrap_or_else(|e| fail(tag, text, &e))),
            "dispatch" => drop(serde_json::from_slice::<Dispatch>(bytes).unwrap_or_else(|e| fail(tag, text, &e))),
            "batch" => {
                let batch = EventBatch::parse(bytes).unwrap_or_else(|e| fail(tag, text, &e));
                for item in &batch.events {
                    item.event.to_body().unwrap_or_else(|e| fail(tag, text, &e));
                }
            }
            "event" => {
                let event: OutboundEvent = serde_json::from_slice(bytes).unwrap_or_else(|e| fail(tag, text, &e));
                event.to_body().unwrap_or_else(|e| fail(tag, text, &e));
            }
            "results" => {
                let results: EventBatchResponse = serde_json::from_slice(bytes).unwrap_or_else(|e| fail(tag, text, &e));
                let gap = results.results.iter().find(|r| r.status == ResultStatus::Gap);
                assert!(gap.is_some_and(|g| g.expected_seq.is_some()), "the gap example names expected_seq");
            }
            "heartbeat" => drop(serde_json::from_slice::<Heartbeat>(bytes).unwrap_or_else(|e| fail(tag, text, &e))),
            "heartbeat-response" => {
                drop(serde_json::from_slice::<HeartbeatResponse>(bytes).unwrap_or_else(|e| fail(tag, text, &e)))
            }
            "health-checks" => drop(HealthChecks::parse(text).unwrap_or_else(|e| fail(tag, text, &e))),
            "operator-action" => drop(
                serde_json::from_slice::<nixfleet::cp::store::ActionRecord>(bytes)
                    .unwrap_or_else(|e| fail(tag, text, &e)),
            ),
            "plan-preview" => drop(
                serde_json::from_slice::<nixfleet::cp::preview::PlanPreview>(bytes)
                    .unwrap_or_else(|e| fail(tag, text, &e)),
            ),
            other => panic!("docs/protocol.md has a ```json block tagged `{other}` that no parser checks"),
        }
        *seen.entry(tag.clone()).or_default() += 1;
    }
    // Every kind of example is present, so deleting one is noticed too.
    for tag in [
        "manifest",
        "envelope",
        "error",
        "dispatch",
        "batch",
        "event",
        "results",
        "heartbeat",
        "heartbeat-response",
        "health-checks",
        "operator-action",
        "plan-preview",
    ] {
        assert!(seen.contains_key(tag), "docs/protocol.md lost its `{tag}` example");
    }
}
