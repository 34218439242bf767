//! The agent-facing request bodies the CP decodes, through the same calls
//! its routes make: an event batch (`EventBatch::parse`, then every event
//! converted to the machine's type, as ingest does) and a heartbeat
//! (`Heartbeat::parse`, with its bounds). Any input must give a value or an
//! error, never a panic; what is accepted serialises back and parses to
//! itself (the agent writes these bodies with serde).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixfleet::wire::{EventBatch, Heartbeat};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = EventBatch::parse(data) {
        for item in &batch.events {
            let _ = item.event.to_remote();
        }
        let again = serde_json::to_vec(&batch).expect("serialises");
        assert_eq!(EventBatch::parse(&again).expect("round trip"), batch);
    }
    if let Ok(heartbeat) = Heartbeat::parse(data) {
        let again = serde_json::to_vec(&heartbeat).expect("serialises");
        assert_eq!(Heartbeat::parse(&again).expect("round trip"), heartbeat);
    }
});
