//! The agent-facing request bodies the CP decodes: an event batch (with
//! every event converted to the machine's type, as ingest does) and a
//! heartbeat. Any input must give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::wire::{EventBatch, Heartbeat};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = EventBatch::parse(data) {
        for item in &batch.events {
            let _ = item.event.to_remote();
        }
    }
    let _ = serde_json::from_slice::<Heartbeat>(data);
});
